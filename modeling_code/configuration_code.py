"""CoDe model configuration."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from transformers import CLIPConfig, PreTrainedConfig

from .templates import TEMPLATE_SETS

# CoDeConfig field behind each InferenceProtocol field (the config is where a model stores its protocol).
PROTOCOL_CONFIG_FIELDS = {
    "short_side": "inference_short_side",
    "max_long_side": "inference_max_long_side",
    "window_size": "window_size",
    "window_stride": "window_stride",
    "use_pamr": "use_pamr",
    "pamr_iterations": "pamr_iterations",
    "pamr_dilations": "pamr_dilations",
    "kp_weight": "kp_weight",
    "background_threshold": "background_threshold",
    "template_set": "inference_template_set",
}


@dataclass(frozen=True)
class InferenceProtocol:
    """How a whole image is segmented (docs/method.md#inference-protocol); the defaults are the paper's.

    A model's protocol is stored in its config (``CoDeConfig.inference_protocol``); the processor, the
    sliding-window inference and ``CoDeSegmenter`` all read it from there, and every override goes through
    ``replace``.

    Args:
        short_side: the image's short side after the resize (pixels).
        max_long_side: cap on the long side after the resize (the short side shrinks to keep the aspect).
        window_size, window_stride: the sliding windows (pixels); the stride must not exceed the window.
        use_pamr: refine each window's masks with PAMR; ``pamr_iterations``, ``pamr_dilations`` are its settings.
        kp_weight: weight of the KP branch's scores in the window's mix, in [0, 1] (0 skips the branch).
        background_threshold: the score of the constant ``background`` map, in [0, 1].
        template_set: prompt templates averaged per class for the KP branch (``templates.TEMPLATE_SETS``).
    """

    short_side: int = 448
    max_long_side: int = 2048
    window_size: int = 448
    window_stride: int = 224
    use_pamr: bool = True
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    kp_weight: float = 0.3
    background_threshold: float = 0.4
    template_set: str = "custom"

    def __post_init__(self) -> None:
        for name in ("short_side", "max_long_side", "window_size", "window_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.window_stride > self.window_size:
            raise ValueError(f"window_stride ({self.window_stride}) larger than window_size ({self.window_size}) "
                             "leaves gaps between windows")
        if int(self.pamr_iterations) != self.pamr_iterations or self.pamr_iterations < 0:
            raise ValueError(f"pamr_iterations must be a non-negative integer; got {self.pamr_iterations!r}")
        for name in ("kp_weight", "background_threshold"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (scores are probabilities); got {value}")
            object.__setattr__(self, name, value)
        if self.template_set not in TEMPLATE_SETS:
            raise ValueError(f"template_set must be one of {sorted(TEMPLATE_SETS)}; got {self.template_set!r}")
        object.__setattr__(self, "use_pamr", bool(self.use_pamr))
        object.__setattr__(self, "pamr_iterations", int(self.pamr_iterations))
        object.__setattr__(self, "pamr_dilations", tuple(int(step) for step in self.pamr_dilations))

    def replace(self, **overrides: Any) -> InferenceProtocol:
        """A copy with ``overrides`` applied; ``None`` values leave a setting as it is. Unknown names raise.

        The config's names of the three fields named differently there (``inference_short_side``,
        ``inference_max_long_side``, ``inference_template_set``) are accepted with a deprecation warning.
        """
        for name, field in PROTOCOL_CONFIG_FIELDS.items():
            if field != name and field in overrides:
                warnings.warn(
                    f"The inference setting {field!r} is now called {name!r}; the old name goes in 0.3",
                    FutureWarning,
                    stacklevel=2,
                )
                overrides[name] = overrides.pop(field)
        unknown = sorted(set(overrides) - set(PROTOCOL_CONFIG_FIELDS))
        if unknown:
            raise TypeError(f"Unknown inference setting(s) {unknown}; known: {list(PROTOCOL_CONFIG_FIELDS)}")
        given = {name: value for name, value in overrides.items() if value is not None}
        return dataclasses.replace(self, **given) if given else self


def _class_vocabulary(names: object) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"class_vocabulary must be a list of class names (strings) or None; got {names!r}")
    return list(names)


class CoDeConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CoDeModel`]: the frozen CLIP it is built on (``clip_config``) plus every CoDe
    hyper-parameter, with the defaults of the authors' final ViT-B/16 recipe (CVPR 2024). Widths are never
    stored here: they are read from ``clip_config`` so any CLIP size works.

    Args:
        clip_config (`dict` or [`CLIPConfig`], *optional*):
            The frozen CLIP (text + vision towers). Defaults to CLIP ViT-B/16 sizes.
        decoder_num_blocks (`int`, defaults to 2):
            Masker decoder blocks; each upsamples ×2 (nearest) then adds ``tanh(gate) * conv3x3(GELU(LN(x)))``.
        decoder_gate_init (`float`, defaults to 0.0):
            Initial gate logit: 0 makes the decoder a plain nearest ×2^blocks upsampling at initialisation.
        sim2mask_init_weight / sim2mask_init_bias (`float`, defaults to 10.0 / -2.5):
            Sim2Mask ``logits = w * cos + b`` initial scalars.
        gumbel_tau (`float`, defaults to 1.0):
            Temperature of the Gumbel-sigmoid used for hard masks in training.
        gumbel_noise (`bool`, defaults to True):
            Sample the hard masks with logistic noise; False thresholds the logits at 0 (deterministic runs).
        prompt_context_length (`int`, defaults to 16):
            Learnable context vectors of the prompted noun encoder.
        prompt_init_text (`str`):
            Text whose first ``prompt_context_length`` tokens after SOS initialise the context vectors.
        text_decoder_num_layers / text_decoder_num_heads (`int`, defaults to 2 / 8):
            Bidirectional transformer blocks on top of CLIP's caption token states (width = CLIP text width).
        text_mask_init_weight / text_mask_init_bias (`float`, defaults to 10.0 / 0.0):
            Word-highlighting scores ``w_t * cos(token, noun) + b_t``.
        text_mask_background_logit (`float`, defaults to 0.0):
            The fixed logit of the "no noun" entry in the K+1-way token softmax.
        num_words (`int`, defaults to 2):
            Nouns sampled per caption (K).
        image_background_size (`int`, defaults to 224):
            Side of the learnable background image used for region highlighting.
        region_activation_checkpointing (`bool`, defaults to False):
            In training, recompute the region-highlighting pass's vision activations block by block during
            backward instead of keeping them: a lower peak memory for one more forward pass of that tower.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)):
            Initial value of the three learnable contrastive logit scales, stored as logarithms.
        logit_scale_max (`float`, defaults to 100.0):
            Clamp of the exponentiated logit scales.
        loss_*_weight (`float`):
            Weights of the training loss terms, one per name of ``losses.LOSS_NAMES`` (docs/method.md#losses).
        exclude_same_noun_negatives (`bool`, defaults to False):
            In the three contrastive terms (``tcl_feature``, ``tcl_image``, ``hcl``), leave out of each row's
            negatives the other rows that name the same noun. The paper counts them as negatives, which is harmless
            on web captions, whose nouns seldom repeat within a batch; in a world of a few classes nearly every
            row has such false negatives.
        area_positive_prior / area_negative_prior (`float`, defaults to 0.25 / 0.0):
            Target mean area of positive and negative soft masks.
        text_segmentation_background_weight (`float`, defaults to 0.5):
            Class weight of the "not the selected noun" class in the text segmentation loss.
        mask_pool_eps (`float`, defaults to 1e-6):
            Added to the soft-mask sum when pooling features with a mask.
        kp_cos_offset / kp_cos_scale (`float`, defaults to 0.25 / 10.0):
            KP branch scores ``sigmoid((cos - offset) * scale)``.
        kg_template_set (`str`):
            Name of the prompt template set (see `modeling_code.templates`) of the kg loss.
        background_threshold, kp_weight, use_pamr, pamr_iterations, pamr_dilations, inference_short_side,
        inference_max_long_side, window_size, window_stride, inference_template_set:
            The model's inference protocol, stored flat; read it as ``config.inference_protocol`` (an
            [`InferenceProtocol`], whose fields ``PROTOCOL_CONFIG_FIELDS`` maps to these; defaults and
            checks are its own).
        class_vocabulary (`list[str]`, *optional*):
            The class names the model was trained or evaluated on, in id order (``"background"`` included when it
            is a class): the toy world's classes, or the benchmark of the training run's evaluation. Written by the
            trainer and the toy pipeline; the demo offers them as its first class list. ``None``: unknown (models
            saved before 0.2), the demo then offers PASCAL VOC's.
    """

    model_type = "code"
    sub_configs_defaults = {"clip_config": CLIPConfig}  # noqa: RUF012  (transformers reads this class attribute)

    clip_config: dict | CLIPConfig | None = None
    # masker and Sim2Mask
    decoder_num_blocks: int = 2
    decoder_gate_init: float = 0.0
    sim2mask_init_weight: float = 10.0
    sim2mask_init_bias: float = -2.5
    gumbel_tau: float = 1.0
    gumbel_noise: bool = True
    # prompted noun encoder
    prompt_context_length: int = 16
    prompt_init_text: str = "A photo of x x x x x x x x x x x x x x x x"
    # text decoder and word highlighting
    text_decoder_num_layers: int = 2
    text_decoder_num_heads: int = 8
    text_mask_init_weight: float = 10.0
    text_mask_init_bias: float = 0.0
    text_mask_background_logit: float = 0.0
    num_words: int = 2
    # region highlighting and contrastive scales
    image_background_size: int = 224
    region_activation_checkpointing: bool = False
    logit_scale_init_value: float = 2.659260036932778  # ln(1 / 0.07)
    logit_scale_max: float = 100.0
    # loss weights and priors (authors' final configuration)
    loss_kg_weight: float = 8.0
    loss_tcl_feature_weight: float = 0.1
    loss_tcl_image_weight: float = 0.1
    loss_tv_image_weight: float = 1.0
    loss_tv_mask_weight: float = 1.0
    loss_area_positive_weight: float = 0.5
    loss_area_negative_weight: float = 0.05
    loss_text_segmentation_weight: float = 1.0
    loss_hcl_weight: float = 0.5
    exclude_same_noun_negatives: bool = False
    area_positive_prior: float = 0.25
    area_negative_prior: float = 0.0
    text_segmentation_background_weight: float = 0.5
    mask_pool_eps: float = 1e-6
    # the inference protocol, stored flat (config.json keys of 0.1); its defaults and checks are InferenceProtocol's
    background_threshold: float = InferenceProtocol.background_threshold
    kp_weight: float = InferenceProtocol.kp_weight
    kp_cos_offset: float = 0.25
    kp_cos_scale: float = 10.0
    use_pamr: bool = InferenceProtocol.use_pamr
    pamr_iterations: int = InferenceProtocol.pamr_iterations
    pamr_dilations: list[int] | tuple[int, ...] = InferenceProtocol.pamr_dilations
    inference_short_side: int = InferenceProtocol.short_side
    inference_max_long_side: int = InferenceProtocol.max_long_side
    window_size: int = InferenceProtocol.window_size
    window_stride: int = InferenceProtocol.window_stride
    kg_template_set: str = "imagenet"
    inference_template_set: str = InferenceProtocol.template_set
    # what the model has seen (for applications); not read by the model itself
    class_vocabulary: list[str] | None = None

    def __post_init__(self, **kwargs):
        if self.clip_config is None:
            self.clip_config = CLIPConfig(
                text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8},
                vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                               "patch_size": 16, "image_size": 224},
                projection_dim=512,
            )
        if isinstance(self.clip_config, dict):  # transformers before sub_configs_defaults (5.17) leaves it a dict
            self.clip_config = CLIPConfig(**self.clip_config)
        self.pamr_dilations = list(self.pamr_dilations)
        self.class_vocabulary = _class_vocabulary(self.class_vocabulary)
        super().__post_init__(**kwargs)
        text_width = self.clip_config.text_config.hidden_size
        if text_width % self.text_decoder_num_heads:
            raise ValueError(
                f"text_decoder_num_heads={self.text_decoder_num_heads} must divide the CLIP text width {text_width}"
            )
        if self.prompt_context_length + 2 > self.clip_config.text_config.max_position_embeddings:
            raise ValueError("prompt_context_length leaves no room for a noun in the text context")

    @property
    def context_length(self) -> int:
        """Token positions of every text (77 for CLIP)."""
        return self.clip_config.text_config.max_position_embeddings

    @property
    def patch_size(self) -> int:
        return self.clip_config.vision_config.patch_size

    @property
    def inference_protocol(self) -> InferenceProtocol:
        """The model's inference protocol, read from its fields (``PROTOCOL_CONFIG_FIELDS``)."""
        return InferenceProtocol(
            **{name: getattr(self, field) for name, field in PROTOCOL_CONFIG_FIELDS.items()}
        )

    @inference_protocol.setter
    def inference_protocol(self, protocol: InferenceProtocol) -> None:
        for name, field in PROTOCOL_CONFIG_FIELDS.items():
            value = getattr(protocol, name)
            setattr(self, field, list(value) if isinstance(value, tuple) else value)


__all__ = ["PROTOCOL_CONFIG_FIELDS", "CoDeConfig", "InferenceProtocol"]
