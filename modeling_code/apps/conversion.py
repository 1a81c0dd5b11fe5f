"""Conversion between the authors' original CoDe checkpoint and [`CoDeModel`] (docs/method.md#the-authors-checkpoint).

The original release stores OpenAI-CLIP-named tensors (packed q/k/v, ``c_fc``/``c_proj``, right-multiplied
projections) and keeps three copies of the frozen CLIP plus three constant PAMR kernels. ``original_key_table``
lists every key of such a checkpoint, in the original's order, with the CoDe tensors it comes from and the
transform between the two layouts; conversion in both directions and every check read that one table:

- MAPPED rules carry weights into CoDe (``frozen_clip.*`` is the CLIP that CoDe keeps);
- DUPLICATE rules are the other CLIP copies (``clip_text_encoder.*``, ``clip_image_encoder.*``): they are
  rebuilt from CoDe's single CLIP and, on conversion, only compared with it;
- CONSTANT rules are the PAMR kernels: rebuilt from their definition and, on conversion, only compared.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from transformers import CLIPConfig

from ..configuration_code import CoDeConfig

ORIGINAL_PARALLEL_PREFIX = "module."
# Original keys printed in an error message before the list is cut short.
MAX_LISTED_KEYS = 20


# --------------------------------------------------------------------------------------------------------------
# Transforms between the original layout of a tensor and CoDe's
# --------------------------------------------------------------------------------------------------------------
class Transform:
    """How one original tensor relates to its CoDe tensors (``code`` of a rule, in order)."""

    def to_code(self, tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
        """Original tensor (named ``key``, for error messages) -> CoDe tensors."""
        raise NotImplementedError(f"{type(self).__name__} cannot produce CoDe tensors (needed for {key})")

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """CoDe tensors -> the original tensor."""
        raise NotImplementedError


class Identity(Transform):
    def to_code(self, tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
        return (tensor,)

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0]


class Transpose(Transform):
    """OpenAI projections multiply on the right (``x @ proj``, [in, out]); ``nn.Linear`` stores [out, in]."""

    def to_code(self, tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
        if tensor.ndim != 2:
            raise ValueError(f"{key}: expected a matrix to transpose, got shape {tuple(tensor.shape)}")
        return (tensor.t(),)

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].t()


class SplitQKV(Transform):
    """``attn.in_proj_{weight,bias}`` [3W, ...] packs the query, key and value projections, in that order."""

    def to_code(self, tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
        if tensor.ndim == 0 or tensor.shape[0] % 3:
            raise ValueError(f"{key}: packed q/k/v needs a first dimension divisible by 3, got {tuple(tensor.shape)}")
        return tuple(tensor.chunk(3, dim=0))

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(tensors), dim=0)


@dataclass(frozen=True)
class DropAxis(Transform):
    """The original keeps a singleton axis CoDe does not (``bg_text`` [L, 1, W], ``learnable_image_bg`` [1, 3, S, S])."""

    axis: int

    def to_code(self, tensor: torch.Tensor, key: str) -> tuple[torch.Tensor, ...]:
        if tensor.ndim <= self.axis or tensor.shape[self.axis] != 1:
            raise ValueError(f"{key}: expected size 1 on axis {self.axis}, got shape {tuple(tensor.shape)}")
        return (tensor.squeeze(self.axis),)

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].unsqueeze(self.axis)


@dataclass(frozen=True)
class TokenEmbeddingRow(Transform):
    """CoOp's ``token_prefix`` [1, 1, W]: the embedding of the start-of-text token, a row of the token table."""

    token_id: int

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0][self.token_id][None, None]


@dataclass(frozen=True)
class Constant(Transform):
    """A tensor fixed by its definition (PAMR's kernels): nothing in CoDe is needed to rebuild it."""

    make: Callable[[], torch.Tensor]

    def to_original(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.make()


IDENTITY = Identity()
TRANSPOSE = Transpose()
SPLIT_QKV = SplitQKV()


# --------------------------------------------------------------------------------------------------------------
# PAMR kernels of the original (3x3, neighbours in raster order)
# --------------------------------------------------------------------------------------------------------------
NEIGHBOURS_3X3 = [(row, col) for row in range(3) for col in range(3) if (row, col) != (1, 1)]


def pamr_difference_kernel() -> torch.Tensor:
    """[8, 1, 3, 3]: centre minus each of the 8 neighbours (``aff_x``)."""
    kernel = torch.zeros(8, 1, 3, 3)
    kernel[:, 0, 1, 1] = 1.0
    for index, (row, col) in enumerate(NEIGHBOURS_3X3):
        kernel[index, 0, row, col] = -1.0
    return kernel


def pamr_neighbour_kernel() -> torch.Tensor:
    """[8, 1, 3, 3]: picks each of the 8 neighbours (``aff_m``)."""
    kernel = torch.zeros(8, 1, 3, 3)
    for index, (row, col) in enumerate(NEIGHBOURS_3X3):
        kernel[index, 0, row, col] = 1.0
    return kernel


def pamr_window_kernel() -> torch.Tensor:
    """[9, 1, 3, 3]: picks each of the 9 positions of the window, centre included (``aff_std``)."""
    return torch.eye(9).view(9, 1, 3, 3)


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------
class Role(Enum):
    MAPPED = "mapped"  # a CoDe weight
    DUPLICATE = "duplicate"  # another copy of the frozen CLIP
    CONSTANT = "constant"  # fixed by definition


@dataclass(frozen=True)
class Rule:
    """One original key, the CoDe keys it corresponds to and the transform between them."""

    original: str
    code: tuple[str, ...]
    transform: Transform = IDENTITY
    role: Role = Role.MAPPED


def _rule(original: str, code: str, transform: Transform = IDENTITY) -> Rule:
    return Rule(original, (code,), transform)


def _weight_and_bias(original: str, code: str) -> list[Rule]:
    return [_rule(f"{original}.{name}", f"{code}.{name}") for name in ("weight", "bias")]


def _residual_block(original: str, code: str) -> list[Rule]:
    """An OpenAI ``ResidualAttentionBlock`` (``original`` prefix) <-> a transformers ``CLIPEncoderLayer``."""
    packed = [
        Rule(f"{original}.attn.in_proj_{name}", tuple(f"{code}.self_attn.{x}_proj.{name}" for x in "qkv"), SPLIT_QKV)
        for name in ("weight", "bias")
    ]
    renamed = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2", "ln_2": "layer_norm2"}
    return packed + [rule for old, new in renamed.items() for rule in _weight_and_bias(f"{original}.{old}", f"{code}.{new}")]


def _frozen_clip(num_vision_layers: int, num_text_layers: int) -> list[Rule]:
    """``frozen_clip.*`` (an OpenAI ``CLIP``, in its parameter order) -> ``clip.*`` (a transformers CLIPModel)."""
    vision = [
        _rule("frozen_clip.visual.class_embedding", "clip.vision_model.embeddings.class_embedding"),
        _rule("frozen_clip.visual.positional_embedding", "clip.vision_model.embeddings.position_embedding.weight"),
        _rule("frozen_clip.visual.proj", "clip.visual_projection.weight", TRANSPOSE),
        _rule("frozen_clip.visual.conv1.weight", "clip.vision_model.embeddings.patch_embedding.weight"),
        *_weight_and_bias("frozen_clip.visual.ln_pre", "clip.vision_model.pre_layrnorm"),
        *(rule for i in range(num_vision_layers) for rule in _residual_block(
            f"frozen_clip.visual.transformer.resblocks.{i}", f"clip.vision_model.encoder.layers.{i}")),
        *_weight_and_bias("frozen_clip.visual.ln_post", "clip.vision_model.post_layernorm"),
    ]
    return [
        _rule("frozen_clip.positional_embedding", "clip.text_model.embeddings.position_embedding.weight"),
        _rule("frozen_clip.text_projection", "clip.text_projection.weight", TRANSPOSE),
        _rule("frozen_clip.logit_scale", "clip.logit_scale"),
        *vision,
        *(rule for i in range(num_text_layers) for rule in _residual_block(
            f"frozen_clip.transformer.resblocks.{i}", f"clip.text_model.encoder.layers.{i}")),
        _rule("frozen_clip.token_embedding.weight", "clip.text_model.embeddings.token_embedding.weight"),
        *_weight_and_bias("frozen_clip.ln_final", "clip.text_model.final_layer_norm"),
    ]


@dataclass(frozen=True)
class ClipCopy:
    """A duplicate of part of ``frozen_clip`` in the original: ``copy_prefix + new`` holds ``source_prefix + old``.

    ``parts`` lists ``(old, new)`` name pairs in the copy's order; a name ending in "." stands for every key
    under it.
    """

    copy_prefix: str
    source_prefix: str
    parts: tuple[tuple[str, str], ...]


def _same(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, name) for name in names)


CLIP_COPIES = (
    ClipCopy("clip_text_encoder.prompt_learner.clip_model.", "frozen_clip.",
             _same("positional_embedding", "text_projection", "transformer.", "token_embedding.", "ln_final.")),
    ClipCopy("clip_text_encoder.text_encoder.", "frozen_clip.",
             _same("positional_embedding", "text_projection", "transformer.", "ln_final.")),
    ClipCopy("clip_image_encoder.clip_proj.", "frozen_clip.visual.", (("proj", "proj"), ("ln_post.", "ln."))),
    ClipCopy("clip_image_encoder.clip_visual.", "frozen_clip.visual.",
             _same("class_embedding", "positional_embedding", "conv1.", "ln_pre.", "transformer.")),
)


def _copy_rules(copy: ClipCopy, frozen_rules: Sequence[Rule]) -> list[Rule]:
    rules = []
    for old, new in copy.parts:
        for rule in frozen_rules:
            name = rule.original.removeprefix(copy.source_prefix)
            if rule.original.startswith(copy.source_prefix) and (
                name == old or (old.endswith(".") and name.startswith(old))
            ):
                copied = copy.copy_prefix + new + name[len(old) :]
                rules.append(Rule(copied, rule.code, rule.transform, Role.DUPLICATE))
    return rules


def original_key_table(config: CoDeConfig) -> list[Rule]:
    """Every key of an original CoDe checkpoint for ``config``, in the original's order, with its CoDe keys.

    The masker's block copy is CLIP's last vision block, so its original index is ``num_hidden_layers - 1``.
    """
    vision = config.clip_config.vision_config
    text = config.clip_config.text_config
    frozen_rules = _frozen_clip(vision.num_hidden_layers, text.num_hidden_layers)
    masker = "masker.image_encoder"
    decoder_blocks = [
        rule
        for i in range(config.decoder_num_blocks)
        for rule in [
            *_weight_and_bias(f"{masker}.decoder.decoder.net.{i}.conv.norm", f"masker.decoder.blocks.{i}.norm"),
            *_weight_and_bias(f"{masker}.decoder.decoder.net.{i}.conv.conv", f"masker.decoder.blocks.{i}.conv"),
            _rule(f"{masker}.decoder.decoder.net.{i}.conv.gate.gate", f"masker.decoder.blocks.{i}.gate"),
        ]
    ]
    return [
        _rule("learnable_image_bg", "image_background", DropAxis(0)),
        _rule("text_mask_w", "text_mask_head.weight"),
        _rule("text_mask_b", "text_mask_head.bias"),
        _rule("bg_text", "text_background", DropAxis(1)),
        Rule("pamr.aff_x.kernel", (), Constant(pamr_difference_kernel), Role.CONSTANT),
        Rule("pamr.aff_m.kernel", (), Constant(pamr_neighbour_kernel), Role.CONSTANT),
        Rule("pamr.aff_std.kernel", (), Constant(pamr_window_kernel), Role.CONSTANT),
        *frozen_rules,
        _rule("clip_text_encoder.prompt_learner.ctx", "prompt_learner.context"),
        Rule("clip_text_encoder.prompt_learner.token_prefix", ("clip.text_model.embeddings.token_embedding.weight",),
             TokenEmbeddingRow(text.bos_token_id), Role.DUPLICATE),
        *(rule for copy in CLIP_COPIES for rule in _copy_rules(copy, frozen_rules)),
        *_residual_block(f"{masker}.backbone.transformer.resblocks.{vision.num_hidden_layers - 1}",
                         "masker.backbone_block"),
        *decoder_blocks,
        _rule(f"{masker}.decoder.image_proj.proj", "masker.projection.proj.weight", TRANSPOSE),
        *_weight_and_bias(f"{masker}.decoder.image_proj.ln", "masker.projection.layer_norm"),
        _rule("masker.sim2mask.w", "sim2mask.weight"),
        _rule("masker.sim2mask.b", "sim2mask.bias"),
        _rule("tcli_loss.logit_scale", "tcl_image_logit_scale"),
        _rule("tclf_loss.logit_scale", "tcl_feature_logit_scale"),
        *(rule for i in range(config.text_decoder_num_layers)
          for rule in _residual_block(f"text_decoder.transformer.resblocks.{i}", f"text_decoder.layers.{i}")),
        _rule("hcl_loss.logit_scale", "hcl_logit_scale"),
    ]


# --------------------------------------------------------------------------------------------------------------
# Configuration from an original checkpoint
# --------------------------------------------------------------------------------------------------------------
def _count_indexed(keys: Iterable[str], prefix: str) -> int:
    """1 + the largest ``N`` among keys starting with ``prefix + "N."`` (0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(match.group(1)) for key in keys if (match := pattern.match(key))]
    return max(indices) + 1 if indices else 0


def _shape(original: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in original:
        raise ValueError(f"The checkpoint has no {key!r}: is it an original CoDe checkpoint (docs/method.md#the-authors-checkpoint)?")
    return tuple(original[key].shape)


def config_from_original(
    original_state_dict: Mapping[str, torch.Tensor],
    clip_config: CLIPConfig,
    tokenizer=None,
    **config_overrides,
) -> CoDeConfig:
    """The ``CoDeConfig`` of an original checkpoint, on the CLIP architecture described by ``clip_config``.

    Sizes the checkpoint determines are read from it (prompt context length, decoder blocks, text decoder
    layers, background image size) and every CLIP size is checked against it. The CLIP blocks use QuickGELU,
    as OpenAI's CLIP does. With a ``tokenizer``, the text config's start/end ids are the tokenizer's and the
    pad id is 0, as in the original (some Hub CLIP configs carry legacy ids such as ``eos_token_id=2``).
    Sizes the checkpoint cannot tell, such as ``text_decoder_num_heads``, come from ``config_overrides``.
    """
    clip_config = CLIPConfig.from_dict(clip_config.to_dict())  # never mutate the caller's config
    for tower in (clip_config.text_config, clip_config.vision_config):
        tower.hidden_act = "quick_gelu"
    if tokenizer is not None:
        text_config = clip_config.text_config
        text_config.bos_token_id = tokenizer.bos_token_id
        text_config.eos_token_id = tokenizer.eos_token_id
        text_config.pad_token_id = 0
    _check_clip_sizes(original_state_dict, clip_config)

    keys = list(original_state_dict)
    inferred = {
        "prompt_context_length": _shape(original_state_dict, "clip_text_encoder.prompt_learner.ctx")[0],
        "decoder_num_blocks": _count_indexed(keys, "masker.image_encoder.decoder.decoder.net."),
        "text_decoder_num_layers": _count_indexed(keys, "text_decoder.transformer.resblocks."),
        "image_background_size": _shape(original_state_dict, "learnable_image_bg")[-1],
    }
    conflicts = [
        f"{name}={config_overrides[name]} (the checkpoint has {value})"
        for name, value in inferred.items()
        if name in config_overrides and config_overrides[name] != value
    ]
    if conflicts:
        raise ValueError(f"Overrides contradict the checkpoint: {', '.join(conflicts)}")
    background_shape = _shape(original_state_dict, "learnable_image_bg")
    if background_shape[-2] != background_shape[-1]:
        raise ValueError(f"learnable_image_bg must be square, got {background_shape}")
    text_width = clip_config.text_config.hidden_size
    decoder_mlp = _shape(original_state_dict, "text_decoder.transformer.resblocks.0.mlp.c_fc.weight")
    if decoder_mlp != (4 * text_width, text_width):
        raise ValueError(f"The text decoder's MLP must be {text_width} -> {4 * text_width}; the checkpoint has {decoder_mlp}")
    return CoDeConfig(clip_config=clip_config, **{**inferred, **config_overrides})


def _check_clip_sizes(original: Mapping[str, torch.Tensor], clip_config: CLIPConfig) -> None:
    """Raise if the checkpoint's frozen CLIP does not have the architecture of ``clip_config``."""
    vision, text = clip_config.vision_config, clip_config.text_config
    keys = list(original)
    grid = vision.image_size // vision.patch_size
    checks = [
        ("vision hidden_size", _shape(original, "frozen_clip.visual.conv1.weight")[0], vision.hidden_size),
        ("vision patch_size", _shape(original, "frozen_clip.visual.conv1.weight")[-1], vision.patch_size),
        ("vision positions (image_size / patch_size)^2 + 1",
         _shape(original, "frozen_clip.visual.positional_embedding")[0], grid * grid + 1),
        ("vision num_hidden_layers", _count_indexed(keys, "frozen_clip.visual.transformer.resblocks."),
         vision.num_hidden_layers),
        ("vision intermediate_size", _shape(original, "frozen_clip.visual.transformer.resblocks.0.mlp.c_fc.weight")[0],
         vision.intermediate_size),
        ("text vocab_size", _shape(original, "frozen_clip.token_embedding.weight")[0], text.vocab_size),
        ("text hidden_size", _shape(original, "frozen_clip.token_embedding.weight")[1], text.hidden_size),
        ("text max_position_embeddings", _shape(original, "frozen_clip.positional_embedding")[0],
         text.max_position_embeddings),
        ("text num_hidden_layers", _count_indexed(keys, "frozen_clip.transformer.resblocks."), text.num_hidden_layers),
        ("text intermediate_size", _shape(original, "frozen_clip.transformer.resblocks.0.mlp.c_fc.weight")[0],
         text.intermediate_size),
        ("projection_dim", _shape(original, "frozen_clip.text_projection")[1], clip_config.projection_dim),
        ("projection_dim (visual)", _shape(original, "frozen_clip.visual.proj")[1], clip_config.projection_dim),
    ]
    mismatches = [f"{name}: checkpoint {found}, CLIP config {expected}" for name, found, expected in checks
                  if found != expected]
    if mismatches:
        raise ValueError("The checkpoint's CLIP does not match the given CLIP config: " + "; ".join(mismatches))


# --------------------------------------------------------------------------------------------------------------
# Conversion in both directions
# --------------------------------------------------------------------------------------------------------------
def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def _check_key_sets(found: Iterable[str], expected: Sequence[str], what: str) -> None:
    found = set(found)
    missing = [key for key in expected if key not in found]
    unexpected = sorted(found - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unmapped: {_listed(unexpected)}")
    if problems:
        raise ValueError(f"The {what} does not match the conversion table: " + "; ".join(problems))


def _mapped_code_tensors(original: Mapping[str, torch.Tensor], table: Sequence[Rule]) -> dict[str, torch.Tensor]:
    """CoDe tensors (views, no copies) from the MAPPED rules."""
    code = {}
    for rule in table:
        if rule.role is Role.MAPPED:
            code.update(zip(rule.code, rule.transform.to_code(original[rule.original], rule.original)))
    return code


def _redundant_differences(
    original: Mapping[str, torch.Tensor], table: Sequence[Rule], code: Mapping[str, torch.Tensor], role: Role
) -> dict[str, float]:
    """Max |difference| between each ``role`` entry of the original and its rebuild from CoDe (inf: shapes differ)."""
    differences = {}
    for rule in table:
        if rule.role is not role:
            continue
        expected = rule.transform.to_original([code[key] for key in rule.code])
        found = original[rule.original]
        if found.shape != expected.shape:
            differences[rule.original] = float("inf")
            continue
        difference = (found.double() - expected.double()).abs().max().item() if found.numel() else 0.0
        if difference > 0:
            differences[rule.original] = difference
    return differences


def _warn_differences(differences: Mapping[str, float], tolerance: float, message: str) -> dict[str, float]:
    beyond = {key: value for key, value in differences.items() if value > tolerance}
    if beyond:
        worst = max(beyond, key=beyond.get)
        warnings.warn(
            f"{message}: {len(beyond)} tensor(s) differ, max |difference| {beyond[worst]:.3g} at {worst} "
            f"(all: {_listed(list(beyond))})",
            UserWarning,
            stacklevel=3,
        )
    return beyond


def check_clip_copies_agree(
    original_state_dict: Mapping[str, torch.Tensor], config: CoDeConfig, tolerance: float = 0.0
) -> dict[str, float]:
    """Compare the original's CLIP copies (``clip_text_encoder.*``, ``clip_image_encoder.*``) with ``frozen_clip``.

    Warns when any differs by more than ``tolerance``; returns ``{copy key: max |difference|}`` for those.
    Conversion keeps ``frozen_clip`` whatever the copies hold.
    """
    table = original_key_table(config)
    code = _mapped_code_tensors(original_state_dict, table)
    differences = _redundant_differences(original_state_dict, table, code, Role.DUPLICATE)
    return _warn_differences(
        differences, tolerance, "The checkpoint's duplicated CLIP copies disagree with frozen_clip (frozen_clip is kept)"
    )


def check_constant_buffers(
    original_state_dict: Mapping[str, torch.Tensor], config: CoDeConfig, tolerance: float = 0.0
) -> dict[str, float]:
    """Compare the original's PAMR kernels with their definition; warn and return those that differ."""
    table = original_key_table(config)
    differences = _redundant_differences(original_state_dict, table, {}, Role.CONSTANT)
    return _warn_differences(differences, tolerance, "The checkpoint's PAMR kernels differ from their definition")


def expected_code_shapes(config: CoDeConfig) -> dict[str, torch.Size]:
    """Shape of every tensor of a ``CoDeModel`` state dict for ``config`` (built on the meta device: no memory)."""
    from ..modeling_code import CoDeModel

    with torch.device("meta"):
        model = CoDeModel(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def convert_original_state_dict(
    original: Mapping[str, torch.Tensor], config: CoDeConfig, copy_tolerance: float = 0.0
) -> dict[str, torch.Tensor]:
    """Original CoDe state dict -> ``CoDeModel`` state dict (new contiguous tensors, the original's dtypes).

    Raises ``ValueError`` listing every missing or unmapped original key, and every CoDe tensor whose shape
    differs from what ``config`` builds. Warns when the duplicated CLIP copies differ from ``frozen_clip`` by
    more than ``copy_tolerance`` or the PAMR kernels from their definition.
    """
    code = _checked_code_tensors(original, config, copy_tolerance)
    return {key: tensor.clone(memory_format=torch.contiguous_format) for key, tensor in code.items()}


def _checked_code_tensors(
    original: Mapping[str, torch.Tensor], config: CoDeConfig, copy_tolerance: float
) -> dict[str, torch.Tensor]:
    """``convert_original_state_dict`` without the copies: the CoDe tensors are views of the original's."""
    table = original_key_table(config)
    _check_key_sets(original, [rule.original for rule in table], "checkpoint")
    check_clip_copies_agree(original, config, copy_tolerance)
    check_constant_buffers(original, config)
    code = _mapped_code_tensors(original, table)
    shapes = expected_code_shapes(config)
    _check_key_sets(code, list(shapes), "converted state dict")  # a model parameter the table forgot
    wrong = [f"{key}: {tuple(code[key].shape)} (expected {tuple(shape)})" for key, shape in shapes.items()
             if code[key].shape != shape]
    if wrong:
        raise ValueError(f"Converted tensors have the wrong shape for this config: {_listed(wrong)}")
    return {key: code[key] for key in shapes}


def to_original_state_dict(code_state: Mapping[str, torch.Tensor], config: CoDeConfig) -> dict[str, torch.Tensor]:
    """``CoDeModel`` state dict -> the original checkpoint's state dict, every key in the original's order.

    The inverse of ``convert_original_state_dict``: the duplicated CLIP copies are rebuilt from the single CLIP
    and the PAMR kernels from their definition. Raises ``ValueError`` on missing or unknown CoDe keys.
    """
    table = original_key_table(config)
    needed = list(dict.fromkeys(key for rule in table for key in rule.code))
    _check_key_sets(code_state, needed, "CoDe state dict")
    return {
        rule.original: rule.transform.to_original([code_state[key] for key in rule.code]).clone(
            memory_format=torch.contiguous_format
        )
        for rule in table
    }


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
class UnsafeCheckpointError(ValueError):
    """The checkpoint pickles Python objects that a weights-only load refuses to build."""


def _unsafe_globals(path: str | os.PathLike) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the listing is only a hint for the error message
        return []


def load_original_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load an original CoDe checkpoint's state dict on CPU.

    Reads with ``torch.load(weights_only=True)``, which builds tensors and plain containers only. A file that
    pickles other objects (e.g. a training config object) is refused unless ``allow_pickle`` is set, which
    loads it with full unpickling (able to run code from the file) after a warning. Accepts a dict with a
    ``model`` entry or a bare state dict, with or without a DistributedDataParallel ``module.`` prefix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _unsafe_globals(path)
        objects = f" ({', '.join(found)})" if found else ""
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path} pickles Python objects other than tensors{objects}, so the safe weights-only load refused "
                "it: unpickling them could run code from the file. If you trust the file, pass allow_pickle=True "
                "(--allow_pickle on the command line); the objects' modules must then be importable."
            ) from error
        warnings.warn(
            f"Loading {path} with full unpickling{objects}: only do this for files from a trusted source.",
            UserWarning,
            stacklevel=2,
        )
        payload = torch.load(path, map_location="cpu", weights_only=False)
    return extract_state_dict(payload)


def extract_state_dict(payload: object) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: its ``model`` entry, or the payload itself if it is one."""
    if isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        state = payload["model"]
    elif isinstance(payload, Mapping):
        state = payload
    else:
        raise ValueError(f"Expected a state dict or a dict with a 'model' entry, got {type(payload).__name__}")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            "Expected a state dict (names -> tensors) or a dict with a 'model' entry; these entries are not "
            f"tensors: {_listed(not_tensors)}"
        )
    if state and all(key.startswith(ORIGINAL_PARALLEL_PREFIX) for key in state):
        return {key.removeprefix(ORIGINAL_PARALLEL_PREFIX): value for key, value in state.items()}
    return dict(state)


def model_from_original(
    original_state_dict: Mapping[str, torch.Tensor],
    clip_config: CLIPConfig,
    tokenizer=None,
    copy_tolerance: float = 0.0,
    **config_overrides,
):
    """A ``CoDeModel`` holding an original checkpoint's weights (see ``config_from_original`` for the args)."""
    from ..modeling_code import CoDeModel

    config = config_from_original(original_state_dict, clip_config, tokenizer, **config_overrides)
    model = CoDeModel(config)
    model.load_state_dict(_checked_code_tensors(original_state_dict, config, copy_tolerance), strict=True)
    return model.eval()


__all__ = [
    "CLIP_COPIES",
    "ClipCopy",
    "Role",
    "Rule",
    "UnsafeCheckpointError",
    "check_clip_copies_agree",
    "check_constant_buffers",
    "config_from_original",
    "convert_original_state_dict",
    "expected_code_shapes",
    "extract_state_dict",
    "load_original_checkpoint",
    "model_from_original",
    "original_key_table",
    "pamr_difference_kernel",
    "pamr_neighbour_kernel",
    "pamr_window_kernel",
    "to_original_state_dict",
]
