"""PyTorch CoDe model: Image-Text Co-Decomposition for open-vocabulary semantic segmentation (CVPR 2024).

One frozen ``CLIPModel`` serves every CLIP use of the method (dense features, global image embedding, text
embeddings from ids and from word embeddings). The trainable parts are the masker (a copy of CLIP's last
vision block, an upsampling decoder and a projection), Sim2Mask, the prompt context of the noun encoder, the
text decoder with its word-highlighting head, the two learnable highlighting backgrounds and three logit
scales. Shapes use: B images, K nouns per caption, N = K * B noun rows (noun-major: row ``k * B + b``),
C joint embedding width, W_v / W_t vision / text widths, L text positions, h x w patch grid.

This file holds the model and its text-side modules; ``masker.py`` the masker (the image side); ``ops.py`` the
tensor operations they run (memory-lean autograd functions, the decoder's tap products, the cheaper CLIP blocks,
``use_memory_lean_layers``) and ``losses.py`` the loss terms of the training forward with their collectives. The
method is described in docs/method.md; the definitions that the faster paths here must reproduce are written out
in ``tests/reference_implementations.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPModel, CLIPTextConfig, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.utils import ModelOutput, logging

from .configuration_code import CoDeConfig, InferenceProtocol
from .inference import DEFAULT_WINDOW_BATCH_SIZE, sliding_window_scores, template_ensemble_embeddings
from .losses import (
    LOSS_NAMES,
    _world,
    area_prior_loss,
    gather_with_grad,
    same_noun_pairs,
    symmetric_infonce,
    tcl_feature_logits,
    text_segmentation_loss,
)
from .masker import CoDeMasker, CoDeUpsampleBlock, inference_band_plan
from .ops import (
    causal_attention_mask,
    causal_block_packed,
    class_token_block,
    gumbel_sigmoid_straight_through,
    pack_prefix_groups,
    self_only_attention_block,
    tap_layout,
    total_variation,
    use_memory_lean_layers,
)

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Sim2Mask
# --------------------------------------------------------------------------------------------------------------
class CoDeSim2Mask(nn.Module):
    """``logits = w * cos(E, t) + b`` for every pixel embedding and text embedding."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(config.sim2mask_init_weight)))
        self.bias = nn.Parameter(torch.tensor(float(config.sim2mask_init_bias)))

    def forward(self, embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, C, H, W] (unit norm), text_embeddings [M, C] (unit norm) -> logits [B, M, H, W]."""
        return self.weight * torch.einsum("bchw,mc->bmhw", embeddings, text_embeddings) + self.bias


# --------------------------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------------------------
class CoDePromptLearner(nn.Module):
    """Learnable context (CoOp): ``[SOS] ctx_1..ctx_n <noun tokens> [EOS] pad`` as word embeddings."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        text = config.clip_config.text_config
        self.context = nn.Parameter(torch.zeros(config.prompt_context_length, text.hidden_size))
        self.eos_token_id = text.eos_token_id

    def forward(self, noun_input_ids: torch.Tensor, token_embedding: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """noun_input_ids [N, L] (each noun tokenised alone, padded with 0) -> (embeddings [N, L, W_t], eos [N]).

        The noun keeps ``L - n_ctx - 1`` positions after SOS (as if tokenised with context ``L - n_ctx``); a
        noun too long for them is cut with EOS kept last.
        """
        num_rows, length = noun_input_ids.shape
        num_context = self.context.shape[0]
        suffix = noun_input_ids[:, 1 : length - num_context].clone()
        is_eos = suffix == self.eos_token_id
        suffix[~is_eos.any(1), -1] = self.eos_token_id
        eos_index = 1 + num_context + (suffix == self.eos_token_id).int().argmax(1)
        embeddings = torch.cat(
            [
                token_embedding(noun_input_ids[:, :1]),
                self.context.to(token_embedding.weight.dtype).expand(num_rows, -1, -1),
                token_embedding(suffix),
            ],
            dim=1,
        )
        return embeddings, eos_index


class CoDeTextDecoder(nn.Module):
    """Bidirectional pre-LN transformer blocks over CLIP's caption token states, unit-normalised per token."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        text = config.clip_config.text_config
        block_config = CLIPTextConfig(
            hidden_size=text.hidden_size,
            intermediate_size=4 * text.hidden_size,
            num_attention_heads=config.text_decoder_num_heads,
            hidden_act="quick_gelu",
            layer_norm_eps=text.layer_norm_eps,
        )
        block_config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList([CLIPEncoderLayer(block_config) for _ in range(config.text_decoder_num_layers)])

    def forward(self, token_states: torch.Tensor) -> torch.Tensor:
        """token_states [B, L, W_t] (all positions, padding included) -> [B, L, W_t] unit vectors."""
        for layer in self.layers:
            token_states = layer(token_states, None)
        return F.normalize(token_states, dim=-1)


class CoDeTextMaskHead(nn.Module):
    """Word highlighting: per-token ``w_t * cos(token, noun) + b_t`` against a fixed background logit."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(config.text_mask_init_weight)))
        self.bias = nn.Parameter(torch.tensor(float(config.text_mask_init_bias)))
        self.background_logit = config.text_mask_background_logit

    def forward(self, token_embeddings: torch.Tensor, noun_embeddings: torch.Tensor) -> torch.Tensor:
        """token_embeddings [B, L, C], noun_embeddings [B, K, C] (unit) -> logits [B, K + 1, L] (entry 0: none)."""
        scores = self.weight * torch.einsum("blc,bkc->bkl", token_embeddings, noun_embeddings) + self.bias
        background = torch.full_like(scores[:, :1], self.background_logit)
        return torch.cat([background, scores], dim=1)


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CoDeSegmentationOutput(ModelOutput):
    """Inference output of ``CoDeModel.forward``: per-class score maps of whole images.

    Args:
        scores: class scores in [0, 1], one map per class of the vocabulary in its order (``background`` as its
            constant map at ``background_index``): probabilities after the masker, PAMR, the KP mix and the
            averaging of overlapping windows, in fp32. A tensor [B, N, H, W] when every image has the same
            processed size, else a list of B tensors [N, H_i, W_i]; sizes are those of ``pixel_values``.
        original_sizes: ``(height, width)`` of each image as the processor received it (passed through from the
            processor), which ``post_process_semantic_segmentation`` resizes to by default; None if not given.
        class_embeddings: [N_text, C] the prompted class embeddings used (``background`` has none): pass them
            back with the next images to skip the text encoders.
        kp_class_embeddings: [N_text, C] the template-ensemble embeddings of the KP branch, or None when the
            protocol's ``kp_weight`` is 0.
    """

    scores: torch.Tensor | list[torch.Tensor] | None = None
    original_sizes: list[tuple[int, int]] | None = None
    class_embeddings: torch.Tensor | None = None
    kp_class_embeddings: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor | list[torch.Tensor] | None:
        """Deprecated name of ``scores`` (goes in 0.3): the maps are probabilities, not logits."""
        warnings.warn(
            "CoDeSegmentationOutput.logits is deprecated and goes in 0.3; read .scores (probabilities)",
            FutureWarning,
            stacklevel=2,
        )
        return self.scores


@dataclass
class CoDeModelOutput(ModelOutput):
    """Training output of ``CoDeModel.forward(..., return_loss=True)``.

    Args:
        loss: [] the weighted sum of every term below.
        loss_{name}: [] each weighted loss term (already multiplied by its weight ``config.loss_{name}_weight``),
            for every name of ``losses.LOSS_NAMES``; a term weighted 0 is a zero, not computed.
        positive_masks: [N, H', W'] soft masks of each row's own noun (N = K * B noun rows, H' x W' the masker's
            resolution).
        text_masks: [B, K, L] word-highlighting masks of the selected nouns (None when both co-decomposition
            terms are weighted 0, and so not computed).
    """

    loss: torch.Tensor | None = None
    loss_kg: torch.Tensor | None = None
    loss_tcl_feature: torch.Tensor | None = None
    loss_tcl_image: torch.Tensor | None = None
    loss_tv_image: torch.Tensor | None = None
    loss_tv_mask: torch.Tensor | None = None
    loss_area_positive: torch.Tensor | None = None
    loss_area_negative: torch.Tensor | None = None
    loss_text_segmentation: torch.Tensor | None = None
    loss_hcl: torch.Tensor | None = None
    positive_masks: torch.Tensor | None = None
    text_masks: torch.Tensor | None = None


@dataclass
class CoDeWindowOutput(ModelOutput):
    """Per-window inference output.

    Args:
        masks: [B, N_cls, 4h, 4w] soft masks ``sigmoid(w * cos + b)`` of the masker.
        kp_masks: [B, N_cls, h, w] KP-branch scores ``sigmoid((cos - offset) * scale)`` from dense CLIP features,
            when template class embeddings were given.
    """

    masks: torch.Tensor | None = None
    kp_masks: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
class CoDePreTrainedModel(PreTrainedModel):
    config: CoDeConfig
    config_class = CoDeConfig
    base_model_prefix = "code"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]  # noqa: RUF012
    _supports_sdpa = True

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``; saved as remote code (the package registers the model for it), the
        folder also gets the ``zero-shot-image-segmentation`` pipeline: its module beside the model's and its entry
        under ``custom_pipelines`` in ``config.json`` (``pipeline_code``)."""
        if self._auto_class is not None:
            # imported here: the pipeline module imports this one
            from .pipeline_code import CUSTOM_PIPELINES, ZeroShotImageSegmentationPipeline

            os.makedirs(save_directory, exist_ok=True)
            custom_object_save(ZeroShotImageSegmentationPipeline, save_directory)
            self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        config = self.config
        if isinstance(module, CoDeModel):
            init.zeros_(module.text_background)
            init.zeros_(module.image_background)
            for scale in (module.tcl_feature_logit_scale, module.tcl_image_logit_scale, module.hcl_logit_scale):
                init.constant_(scale, config.logit_scale_init_value)
        elif isinstance(module, CoDeUpsampleBlock):
            init.constant_(module.gate, config.decoder_gate_init)
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)
            init.kaiming_uniform_(module.conv.weight, a=math.sqrt(5))
            fan_in = module.conv.weight[0].numel()
            init.uniform_(module.conv.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, CoDeSim2Mask):
            init.constant_(module.weight, config.sim2mask_init_weight)
            init.constant_(module.bias, config.sim2mask_init_bias)
        elif isinstance(module, CoDeTextMaskHead):
            init.constant_(module.weight, config.text_mask_init_weight)
            init.constant_(module.bias, config.text_mask_init_bias)
        elif isinstance(module, CoDePromptLearner):
            init.normal_(module.context, std=0.02)
        elif isinstance(module, CoDeTextDecoder):
            for layer in module.layers:
                for submodule in layer.modules():
                    if isinstance(submodule, nn.Linear):
                        init.normal_(submodule.weight, std=0.02)
                        init.zeros_(submodule.bias)
                    elif isinstance(submodule, nn.LayerNorm):
                        init.ones_(submodule.weight)
                        init.zeros_(submodule.bias)
        elif isinstance(module, (CoDeMasker, CLIPModel)):
            # CLIP initialises itself; the masker copies CLIP (see CoDeModel.copy_clip_into_masker).
            pass


class CoDeModel(CoDePreTrainedModel):
    """CoDe: a frozen CLIP plus the trainable image and text co-decomposition modules."""

    def __init__(self, config: CoDeConfig):
        super().__init__(config)
        clip_config = config.clip_config
        if clip_config.text_config.hidden_size != clip_config.projection_dim:
            raise ValueError(
                "CoDe compares text-decoder token states (CLIP text width "
                f"{clip_config.text_config.hidden_size}) with projected noun embeddings (projection_dim "
                f"{clip_config.projection_dim}); they must be equal, as in every OpenAI CLIP."
            )
        self.clip = CLIPModel._from_config(clip_config, dtype=torch.get_default_dtype())
        self.masker = CoDeMasker(config)
        self.sim2mask = CoDeSim2Mask(config)
        self.prompt_learner = CoDePromptLearner(config)
        self.text_decoder = CoDeTextDecoder(config)
        self.text_mask_head = CoDeTextMaskHead(config)
        text_width = clip_config.text_config.hidden_size
        self.text_background = nn.Parameter(torch.zeros(config.context_length, text_width))
        size = config.image_background_size
        self.image_background = nn.Parameter(torch.zeros(3, size, size))
        self.tcl_feature_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.tcl_image_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.hcl_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        use_memory_lean_layers(self)
        self.post_init()
        self.clip.requires_grad_(False)
        self.copy_clip_into_masker()

    # ---------------------------------------------------------------- construction and training phases
    @classmethod
    def from_clip(cls, clip_name_or_path: str, tokenizer=None, **config_overrides) -> CoDeModel:
        """Build CoDe on a pretrained transformers CLIP (a Hub id or a local directory).

        Copies CLIP's last vision block and its post-LN/projection into the masker and initialises the prompt
        context from the token embeddings of ``config.prompt_init_text`` (tokenised with the CLIP tokenizer
        found at the same path unless ``tokenizer`` is given). ``config_overrides`` set CoDeConfig fields.
        """
        from transformers import CLIPTokenizer

        clip = CLIPModel.from_pretrained(clip_name_or_path)
        tokenizer = tokenizer or CLIPTokenizer.from_pretrained(clip_name_or_path)
        # older Hub CLIP configs carry placeholder special ids (eos 2); CoDe finds EOS by id, so trust the tokenizer
        text_config = clip.config.text_config
        text_config.bos_token_id, text_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        text_config.pad_token_id = 0
        config = CoDeConfig(clip_config=clip.config, **config_overrides)
        model = cls(config)
        model.clip.load_state_dict(clip.state_dict())
        model.copy_clip_into_masker()
        model.init_prompt_context(tokenizer)
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> CoDeModel:
        """``PreTrainedModel.from_pretrained``, with the CLIP frozen again.

        Loading replaces every parameter by a new one that requires grad, which would make the CLIP trainable
        when training continues from a saved model (and count its gradients in the clipped norm).
        """
        model = super().from_pretrained(*args, **kwargs)
        model.clip.requires_grad_(False)
        return model

    @torch.no_grad()
    def copy_clip_into_masker(self) -> None:
        """Masker block copy <- CLIP's last vision block; masker projection <- CLIP's post-LN and projection."""
        self.masker.backbone_block.load_state_dict(self.clip.vision_model.encoder.layers[-1].state_dict())
        self.masker.projection.layer_norm.load_state_dict(self.clip.vision_model.post_layernorm.state_dict())
        self.masker.projection.proj.weight.copy_(self.clip.visual_projection.weight)

    @torch.no_grad()
    def init_prompt_context(self, tokenizer) -> None:
        """Context vectors <- token embeddings of the first n_ctx tokens after SOS of ``prompt_init_text``."""
        num_context = self.config.prompt_context_length
        ids = tokenizer(self.config.prompt_init_text, add_special_tokens=False)["input_ids"]
        if len(ids) < num_context:
            raise ValueError(
                f"prompt_init_text {self.config.prompt_init_text!r} has {len(ids)} tokens; "
                f"{num_context} are needed to initialise the prompt context"
            )
        token_embedding = self.clip.text_model.embeddings.token_embedding
        self.prompt_learner.context.copy_(token_embedding.weight[torch.tensor(ids[:num_context])])

    def set_masker_backbone_trainable(self, trainable: bool) -> None:
        """Switch the masker's CLIP block copy between frozen (phase 1) and trainable (phase 2)."""
        self.masker.backbone_block.requires_grad_(trainable)

    def trainable_parameter_names(self) -> list[str]:
        """Every parameter trained in some phase: everything except the frozen CLIP."""
        return [name for name, _ in self.named_parameters() if not name.startswith("clip.")]

    def train(self, mode: bool = True) -> CoDeModel:
        """Frozen means frozen: CLIP stays in eval mode whatever the mode of the rest."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---------------------------------------------------------------- frozen CLIP uses
    def encode_image_dense(
        self, pixel_values: torch.Tensor, checkpoint_layers: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frozen vision tower up to (not including) the last block, at any input size.

        pixel_values [B, 3, H, W] with H, W multiples of the patch size -> (hidden [B, 1 + h*w, W_v], (h, w)).
        ``checkpoint_layers``: keep only each block's input for backward and recompute the block there.
        """
        vision = self.clip.vision_model
        patch = self.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=True))
        for layer in vision.encoder.layers[:-1]:
            hidden = checkpoint(layer, hidden, None, use_reentrant=False) if checkpoint_layers else layer(hidden, None)
        return hidden, grid

    def dense_clip_features(self, hidden_before_last: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """MaskCLIP dense features: last block with self-only attention, post-LN and projection per patch.

        hidden_before_last [B, 1 + h*w, W_v] -> unit-norm features [B, C, h, w].
        """
        vision = self.clip.vision_model
        hidden = self_only_attention_block(vision.encoder.layers[-1], hidden_before_last)[:, 1:]
        features = F.normalize(self.clip.visual_projection(vision.post_layernorm(hidden)), dim=-1)
        return features.transpose(1, 2).reshape(features.shape[0], -1, *grid_size)

    def encode_image_global(self, pixel_values: torch.Tensor, checkpoint_layers: bool = False) -> torch.Tensor:
        """Ordinary CLIP image embedding (full attention), unit norm: [B, 3, H, W] -> [B, C].

        The last block runs for the class token only (``class_token_block``): CLIP's own vision model's result
        up to float rounding. ``checkpoint_layers``: see ``encode_image_dense``.
        """
        vision = self.clip.vision_model
        hidden, _ = self.encode_image_dense(pixel_values, checkpoint_layers)
        last = vision.encoder.layers[-1]
        class_token = (
            checkpoint(class_token_block, last, hidden, use_reentrant=False)
            if checkpoint_layers
            else class_token_block(last, hidden)
        )
        pooled = vision.post_layernorm(class_token[:, 0])
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def encode_text_embeddings(
        self, inputs_embeds: torch.Tensor, eos_index: torch.Tensor, cut_at_eos: bool = True
    ) -> torch.Tensor:
        """Causal CLIP text tower from word embeddings (before position embeddings), pooled at ``eos_index``.

        inputs_embeds [N, L, W_t], eos_index [N] -> unit-norm embeddings [N, C]. The tower is causal, so the EOS
        feature only depends on positions up to it: with ``cut_at_eos`` the batch runs only up to its longest
        EOS (identical result, less work).
        """
        text = self.clip.text_model
        length = int(eos_index.max()) + 1 if cut_at_eos else inputs_embeds.shape[1]
        hidden = inputs_embeds[:, :length] + text.embeddings.position_embedding.weight[:length]
        mask = causal_attention_mask(length, hidden.dtype, hidden.device)
        for layer in text.encoder.layers:
            hidden = layer(hidden, mask)
        return self._project_text(hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_index])

    def _project_text(self, eos_states: torch.Tensor) -> torch.Tensor:
        """Last text states at EOS [N, W_t] -> final LN, projection -> unit-norm embeddings [N, C]."""
        return F.normalize(self.clip.text_projection(self.clip.text_model.final_layer_norm(eos_states)), dim=-1)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the first EOS token of each row of input_ids [N, L] -> [N]."""
        return (input_ids == self.config.clip_config.text_config.eos_token_id).int().argmax(-1)

    def encode_text(self, input_ids: torch.Tensor, cut_at_eos: bool = True) -> torch.Tensor:
        """Ordinary CLIP text embedding from token ids [N, L] -> unit-norm [N, C]."""
        word_embeddings = self.clip.text_model.embeddings.token_embedding(input_ids)
        return self.encode_text_embeddings(word_embeddings, self.eos_positions(input_ids), cut_at_eos)

    def encode_text_groups(self, groups: list[tuple[torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """``encode_text_embeddings`` for several groups of rows in one packed pass of the causal tower.

        Each group is (inputs_embeds [N, L, W_t], eos_index [N], prefix_length): its rows share their first
        ``prefix_length`` word embeddings (each eos_index >= prefix_length). In the causal tower a shared prefix
        has the same states in every row, so it runs once; each row then runs only from the prefix's end to its
        own EOS. All groups' tokens go through the per-token layers as one matrix, without padding.
        Returns one unit-norm [N, C] per group, equal to ``encode_text_embeddings`` up to float rounding.
        """
        text = self.clip.text_model
        hidden, packing, eos_rows = pack_prefix_groups(groups, text.embeddings.position_embedding.weight)
        for layer in text.encoder.layers:
            hidden = causal_block_packed(layer, hidden, packing)
        embeddings = self._project_text(hidden[eos_rows])
        return list(embeddings.split([len(eos_index) for _, eos_index, _ in groups]))

    def _template_group(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows of one prompt template [N, L] as an ``encode_text_groups`` group.

        The prefix is the longest run of leading tokens common to all rows, short of the first EOS.
        """
        eos_index = self.eos_positions(input_ids)
        shared = (input_ids == input_ids[:1]).all(0).int().cumprod(0)
        prefix_length = min(int(shared.sum()), int(eos_index.min()))  # every row keeps at least its EOS
        return self.clip.text_model.embeddings.token_embedding(input_ids), eos_index, prefix_length

    def encode_caption_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state of every token after CLIP's last text block, before the final LN: [B, L] -> [B, L, W_t]."""
        text = self.clip.text_model
        hidden = text.embeddings(input_ids=input_ids)
        mask = causal_attention_mask(hidden.shape[1], hidden.dtype, hidden.device)
        for layer in text.encoder.layers:
            hidden = layer(hidden, mask)
        return hidden

    # ---------------------------------------------------------------- CoDe text pieces
    def encode_nouns(self, noun_input_ids: torch.Tensor, cut_at_eos: bool = True) -> torch.Tensor:
        """Prompted noun embeddings (docs/method.md#text-side): noun ids [N, L] -> unit-norm [N, C]."""
        embeddings, eos_index = self.prompt_learner(noun_input_ids, self.clip.text_model.embeddings.token_embedding)
        return self.encode_text_embeddings(embeddings, eos_index, cut_at_eos)

    @torch.no_grad()
    def get_class_embeddings(self, class_input_ids: torch.Tensor) -> torch.Tensor:
        """Prompted class embeddings for the masker: [N_cls, L] -> [N_cls, C] (``encode_nouns`` without gradient).

        Start token and learned context, the same for every class, run once. A name too long for the prompted
        encoder (``L - prompt_context_length`` positions) is cut, with a warning.
        """
        limit = self.config.context_length - self.config.prompt_context_length
        truncated = (self.eos_positions(class_input_ids) >= limit).nonzero().flatten().tolist()
        if truncated:
            logger.warning(
                f"Class names too long for the prompted class encoder ({limit} token positions including start and "
                f"end) are truncated: rows {truncated} of class_input_ids"
            )
        embeddings, eos_index = self.prompt_learner(class_input_ids, self.clip.text_model.embeddings.token_embedding)
        prefix_length = min(1 + self.config.prompt_context_length, int(eos_index.min()))
        return self.encode_text_groups([(embeddings, eos_index, prefix_length)])[0]

    @torch.no_grad()
    def get_template_class_embeddings(self, template_input_ids: torch.Tensor, num_templates: int) -> torch.Tensor:
        """Template-ensembled frozen CLIP class embeddings for the KP branch.

        template_input_ids [N_cls * T, L] (class-major) -> mean of unit embeddings, re-normalised: [N_cls, C].
        Each template's prompts share the words before the class name, which run once per template, and all
        templates run in one packed pass (``encode_text_groups``).
        """
        by_template = template_input_ids.view(-1, num_templates, template_input_ids.shape[-1])
        groups = [self._template_group(by_template[:, index]) for index in range(num_templates)]
        embeddings = torch.stack(self.encode_text_groups(groups), dim=1)
        return F.normalize(embeddings.mean(1), dim=-1)

    # ---------------------------------------------------------------- inference building block
    @contextlib.contextmanager
    def prepared_for_inference(self) -> Iterator[CoDeModel]:
        """Context in which passes without gradients reuse the masker decoder's kernels laid out once as tap
        matrices (``ops.tap_layout``), where every call of a decoder block would lay its kernel out again.

        ``segment_window`` enters it for its windows, ``inference.segment_images`` for all windows of a call.
        The weights must not change inside the context; an inner context reuses the outer one's matrices.
        """
        blocks = [block for block in self.masker.decoder.blocks if block.tap_weights is None]
        with torch.no_grad():
            for block in blocks:
                block.tap_weights = tap_layout(block.conv.weight)
        try:
            yield self
        finally:
            for block in blocks:
                block.tap_weights = None

    @torch.no_grad()
    def segment_window(
        self,
        pixel_values: torch.Tensor,
        class_embeddings: torch.Tensor,
        kp_class_embeddings: torch.Tensor | None = None,
        banded: bool = True,
    ) -> CoDeWindowOutput:
        """Soft masks for windows already padded to multiples of the patch size (docs/method.md#inference-protocol).

        pixel_values [B, 3, H, W]; class_embeddings [N_cls, C] (prompted); kp_class_embeddings [N_cls, C]
        (template ensembles) or None to skip the KP branch. ``banded``: the masker's last decoder block runs in
        row bands, so its large temporaries stay bounded: on the CPU window by window in small bands, on an
        accelerator all windows together (``masker.inference_band_plan``); ``banded=False`` runs the batch
        through ``CoDeMasker.forward`` (one pass, nothing prepared: the path to trace). Same masks up to float
        rounding.
        """
        hidden, grid = self.encode_image_dense(pixel_values)
        class_embeddings = class_embeddings.to(hidden.dtype)
        if not banded:
            masks = torch.sigmoid(self.sim2mask(self.masker(hidden, grid), class_embeddings))
        else:
            num_windows = hidden.shape[0]
            masks = hidden.new_empty(num_windows, class_embeddings.shape[0], *(4 * size for size in grid))
            window_by_window, max_tap_bytes = inference_band_plan(hidden.device.type)
            windows_per_pass = 1 if window_by_window else num_windows
            with self.prepared_for_inference():
                for first in range(0, num_windows, windows_per_pass):
                    windows = slice(first, first + windows_per_pass)
                    for start, embeddings in self.masker.bands(hidden[windows], grid, max_tap_bytes):
                        band = masks[windows, :, start : start + embeddings.shape[2]]
                        band.copy_(torch.sigmoid(self.sim2mask(embeddings, class_embeddings)))
        kp_masks = None
        if kp_class_embeddings is not None:
            dense = self.dense_clip_features(hidden, grid)
            cosine = torch.einsum("bchw,nc->bnhw", dense, kp_class_embeddings.to(dense.dtype))
            kp_masks = torch.sigmoid((cosine - self.config.kp_cos_offset) * self.config.kp_cos_scale)
        return CoDeWindowOutput(masks=masks, kp_masks=kp_masks)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        class_input_ids: torch.Tensor | None = None,
        kp_template_input_ids: torch.Tensor | None = None,
        background_index: int | None = None,
        original_sizes: Sequence[Sequence[int]] | None = None,
        class_embeddings: torch.Tensor | None = None,
        kp_class_embeddings: torch.Tensor | None = None,
        protocol: InferenceProtocol | None = None,
        window_batch_size: int | None = DEFAULT_WINDOW_BATCH_SIZE,
        caption_input_ids: torch.Tensor | None = None,
        noun_input_ids: torch.Tensor | None = None,
        kg_template_input_ids: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        return_loss: bool = False,
        **deprecated: torch.Tensor,
    ) -> CoDeSegmentationOutput | CoDeModelOutput:
        r"""Segment whole images into the classes of one vocabulary or, with ``return_loss=True``, compute the
        training losses of a batch of image-caption pairs.

        Inference (the processor's output goes straight in; docs/method.md#inference-protocol):

        Args:
            pixel_values: images after the processor's evaluation resize: [B, 3, H, W], or a list of [3, H_i, W_i]
                when their sizes differ. In training: [B, 3, S, S] crops.
            class_input_ids: [N_text, L] the class names' token ids (``background`` has none).
            kp_template_input_ids: [N_text, T, L] each class in the T prompt templates of the KP branch.
            background_index: position of ``background`` in the vocabulary (a constant map of the protocol's
                ``background_threshold``), or None.
            original_sizes: ``(height, width)`` of each image as given to the processor; returned for the
                post-processing.
            class_embeddings, kp_class_embeddings: [N_text, C] precomputed instead of the token ids (as returned
                in the output, or by ``inference.encode_vocabulary``): a vocabulary is then encoded once for
                any number of calls.
            protocol: windows, PAMR, KP weight and background threshold; default: ``config.inference_protocol``.
                Overrides: ``model.config.inference_protocol.replace(use_pamr=False)``.
            window_batch_size: windows per pass of the model (bounds the memory of one call).

        Training (docs/method.md#losses), with ``return_loss=True``:

        Args:
            pixel_values: [B, 3, S, S] training crops.
            caption_input_ids: [B, L] caption tokens (padded with 0).
            noun_input_ids: [N, L] the K sampled nouns of each caption, noun-major (row ``k * B + b``).
            kg_template_input_ids: [N, L] each noun in a random template of the kg loss, same layout.
            text_labels: [B, L] pseudo text labels: -1 ignore, 0 other nouns, k for the k-th sampled noun.

        Returns:
            ``CoDeSegmentationOutput`` (inference) or ``CoDeModelOutput`` (training).

        Example:

        ```python
        >>> from PIL import Image
        >>> from modeling_code import CoDeModel, CoDeProcessor

        >>> model = CoDeModel.from_pretrained("path/or/hub-id")  # or AutoModel with trust_remote_code=True
        >>> processor = CoDeProcessor.from_pretrained("path/or/hub-id")
        >>> image = Image.open("cat.jpg")
        >>> inputs = processor(images=image, text=["cat", "sofa", "background"], return_tensors="pt")
        >>> outputs = model(**inputs)
        >>> label_maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
        >>> label_maps[0].shape  # [H, W] class ids: 0 cat, 1 sofa, 2 background
        ```
        """
        if "template_input_ids" in deprecated:
            warnings.warn(
                "CoDeModel.forward(template_input_ids=...) is deprecated and goes in 0.3: the kg loss's templates "
                "are kg_template_input_ids, with return_loss=True",
                FutureWarning,
                stacklevel=2,
            )
            kg_template_input_ids = deprecated.pop("template_input_ids")
            return_loss = True
        if deprecated:
            raise TypeError(f"CoDeModel.forward got unexpected arguments {sorted(deprecated)}")
        if pixel_values is None:
            raise ValueError("CoDeModel.forward needs pixel_values (from the processor)")
        training_inputs = {
            "caption_input_ids": caption_input_ids,
            "noun_input_ids": noun_input_ids,
            "kg_template_input_ids": kg_template_input_ids,
            "text_labels": text_labels,
        }
        if return_loss:
            missing = [name for name, value in training_inputs.items() if value is None]
            if missing:
                raise ValueError(f"return_loss=True needs the training inputs {missing}")
            return self._training_losses(pixel_values, caption_input_ids, noun_input_ids, kg_template_input_ids,
                                         text_labels)
        given = [name for name, value in training_inputs.items() if value is not None]
        if given:
            raise ValueError(f"{given} are training inputs: pass return_loss=True to compute the losses")
        return segment_whole_images(
            self, pixel_values, class_input_ids, kp_template_input_ids, background_index, original_sizes,
            class_embeddings, kp_class_embeddings, protocol, window_batch_size,
        )

    def _training_losses(
        self,
        pixel_values: torch.Tensor,
        caption_input_ids: torch.Tensor,
        noun_input_ids: torch.Tensor,
        kg_template_input_ids: torch.Tensor,
        text_labels: torch.Tensor,
    ) -> CoDeModelOutput:
        """Training forward; see ``forward``. A term weighted 0 is not computed, nor is a pass that only such
        terms need (the TCL-only ablation skips word highlighting and the highlighted captions)."""
        config = self.config
        weights = {name: getattr(config, f"loss_{name}_weight") for name in LOSS_NAMES}
        batch_size = pixel_values.shape[0]
        num_words = noun_input_ids.shape[0] // batch_size

        # 1-2. frozen dense pass, masker -> E [B, C, H', W'] (noun row n reads image n % B; E is not repeated)
        with torch.no_grad():
            hidden, grid = self.encode_image_dense(pixel_values)
        image_embeddings = self.masker(hidden, grid)

        # 3. prompted noun embeddings t [N, C]; frozen template embeddings for the kg loss
        noun_embeddings = self.encode_nouns(noun_input_ids)
        with torch.no_grad():
            template_embeddings = self.encode_text(kg_template_input_ids)

        # 4. every row against every noun of the global batch -> soft/hard masks [N, N_global, H', W']
        rank, _ = _world()
        num_rows = noun_embeddings.shape[0]
        all_noun_embeddings = gather_with_grad(noun_embeddings)
        mask_logits = self.sim2mask(image_embeddings, all_noun_embeddings).repeat(num_words, 1, 1, 1)
        soft_masks = torch.sigmoid(mask_logits)
        rows = torch.arange(num_rows, device=soft_masks.device)
        positive = torch.zeros(soft_masks.shape[:2], dtype=torch.bool, device=soft_masks.device)
        positive[rows, rows + rank * num_rows] = True
        positive_logits = mask_logits[rows, rows + rank * num_rows]
        excluded = same_noun_pairs(noun_input_ids, positive) if config.exclude_same_noun_negatives else None
        hard_positive_masks = gumbel_sigmoid_straight_through(positive_logits, config.gumbel_tau, config.gumbel_noise)

        # 5. the highlighting passes, only when a weighted term needs them
        region_embeddings = None  # image side: each row's image kept under its hard mask [N, C]
        if weights["tcl_image"] or weights["hcl"]:
            region_embeddings = self._highlight_regions(pixel_values, hard_positive_masks, num_words)
        word_logits = highlighted_captions = None  # text side: word highlighting, highlighted captions
        if weights["text_segmentation"] or weights["hcl"]:
            word_logits, highlighted_captions = self._highlight_words(caption_input_ids, noun_embeddings, num_words)

        # 6. the loss terms, in LOSS_NAMES order
        terms = {}
        if weights["kg"]:
            terms["kg"] = 1 - (noun_embeddings * template_embeddings).sum(-1).mean()
        if weights["tcl_feature"]:
            terms["tcl_feature"] = symmetric_infonce(
                tcl_feature_logits(image_embeddings, soft_masks, all_noun_embeddings,
                                   self._logit_scale(self.tcl_feature_logit_scale), config.mask_pool_eps),
                excluded,
            )
        if weights["tcl_image"]:
            terms["tcl_image"] = symmetric_infonce(
                self._logit_scale(self.tcl_image_logit_scale) * region_embeddings @ all_noun_embeddings.t(), excluded
            )
        if weights["tv_image"]:
            terms["tv_image"] = total_variation(image_embeddings)
        if weights["tv_mask"]:
            terms["tv_mask"] = total_variation(soft_masks)
        if weights["area_positive"]:
            terms["area_positive"] = area_prior_loss(soft_masks[positive], config.area_positive_prior)
        if weights["area_negative"]:
            terms["area_negative"] = area_prior_loss(soft_masks[~positive], config.area_negative_prior)
        if weights["text_segmentation"]:
            terms["text_segmentation"] = text_segmentation_loss(
                word_logits, text_labels, config.text_segmentation_background_weight
            )
        if weights["hcl"]:
            terms["hcl"] = symmetric_infonce(
                self._logit_scale(self.hcl_logit_scale) * highlighted_captions @ gather_with_grad(region_embeddings).t(),
                excluded,
            )
        weighted = {
            f"loss_{name}": weights[name] * terms[name] if name in terms else soft_masks.new_zeros(())
            for name in LOSS_NAMES
        }
        return CoDeModelOutput(
            loss=sum(weighted.values()),
            **weighted,
            positive_masks=soft_masks[positive].view(num_rows, *soft_masks.shape[2:]).detach(),
            text_masks=None if word_logits is None else word_logits.softmax(1)[:, 1:].detach(),
        )

    # ---------------------------------------------------------------- training helpers
    def _logit_scale(self, log_scale: torch.Tensor) -> torch.Tensor:
        return log_scale.exp().clamp(max=self.config.logit_scale_max)

    def _highlight_regions(self, pixel_values: torch.Tensor, hard_masks: torch.Tensor, num_words: int) -> torch.Tensor:
        """Each row's image with its hard positive mask kept and the rest replaced by the learnable background.

        pixel_values [B, 3, S, S], hard_masks [N, H', W'] -> frozen CLIP image embeddings [N, C].
        """
        size = pixel_values.shape[-2:]
        masks = F.interpolate(hard_masks[:, None], size=size, mode="nearest")
        background = F.interpolate(self.image_background[None], size=size, mode="bilinear", align_corners=False)
        images = pixel_values.repeat(num_words, 1, 1, 1)
        return self.encode_image_global(
            masks * images + (1 - masks) * background, checkpoint_layers=self.config.region_activation_checkpointing
        )

    def _highlight_words(
        self, caption_input_ids: torch.Tensor, noun_embeddings: torch.Tensor, num_words: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text masks of the selected nouns and the highlighted captions' embeddings.

        Returns (logits [B, K + 1, L] for the text segmentation loss, highlighted text embeddings [N, C]).
        """
        batch_size, length = caption_input_ids.shape
        with torch.no_grad():
            token_states = self.encode_caption_tokens(caption_input_ids)
        tokens = self.text_decoder(token_states)
        nouns = noun_embeddings.view(num_words, batch_size, -1).transpose(0, 1)  # [B, K, C]
        logits = self.text_mask_head(tokens, nouns)
        masks = logits.softmax(1)[:, 1:]  # [B, K, L]
        eos_index = self.eos_positions(caption_input_ids)
        positions = torch.arange(length, device=caption_input_ids.device)
        keep = (positions[None] == 0) | (positions[None] >= eos_index[:, None])  # SOS, EOS and beyond
        masks = torch.where(keep[:, None], torch.ones_like(masks), masks)
        word_embeddings = self.clip.text_model.embeddings.token_embedding(caption_input_ids)  # [B, L, W_t]
        mixed = masks[..., None] * word_embeddings[:, None] + (1 - masks[..., None]) * self.text_background
        mixed = mixed.transpose(0, 1).reshape(num_words * batch_size, length, -1)  # noun-major rows
        highlighted = self.encode_text_embeddings(mixed, eos_index.repeat(num_words))
        return logits, highlighted


@torch.no_grad()
def segment_whole_images(
    model: CoDeModel,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    class_input_ids: torch.Tensor | None = None,
    kp_template_input_ids: torch.Tensor | None = None,
    background_index: int | None = None,
    original_sizes: Sequence[Sequence[int]] | None = None,
    class_embeddings: torch.Tensor | None = None,
    kp_class_embeddings: torch.Tensor | None = None,
    protocol: InferenceProtocol | None = None,
    window_batch_size: int | None = DEFAULT_WINDOW_BATCH_SIZE,
) -> CoDeSegmentationOutput:
    """The inference forward (see ``CoDeModel.forward``) of ``model``: a ``CoDeModel``, or any object with its
    inference surface (``config``, ``device``, ``dtype``, the text encoders, ``segment_window``), such as the
    onnxruntime model of ``predict.onnx_runtime``."""
    protocol = protocol or model.config.inference_protocol
    # 1. the vocabulary: given embeddings, else encoded from the token ids (KP templates only when weighted)
    if class_embeddings is None:
        if class_input_ids is None:
            raise ValueError("Give the vocabulary: class_input_ids (the processor's text=...) or class_embeddings")
        class_embeddings = model.get_class_embeddings(class_input_ids.to(model.device))
    if kp_class_embeddings is None and kp_template_input_ids is not None and protocol.kp_weight > 0:
        kp_class_embeddings = template_ensemble_embeddings(model, kp_template_input_ids.to(model.device))
    # 2. sliding windows: masks, PAMR, KP mix, overlaps averaged, background inserted
    scores = sliding_window_scores(
        model, pixel_values, class_embeddings, kp_class_embeddings, background_index, protocol, window_batch_size
    )
    # 3. one tensor when every image has the same processed size
    if len({tuple(maps.shape) for maps in scores}) == 1:
        scores = torch.stack(scores)
    sizes = None if original_sizes is None else [tuple(int(side) for side in size) for size in original_sizes]
    return CoDeSegmentationOutput(
        scores=scores, original_sizes=sizes, class_embeddings=class_embeddings, kp_class_embeddings=kp_class_embeddings
    )


__all__ = [
    "CoDeConfig",
    "CoDeModel",
    "CoDeModelOutput",
    "CoDePreTrainedModel",
    "CoDeSegmentationOutput",
    "CoDeWindowOutput",
    "segment_whole_images",
]
