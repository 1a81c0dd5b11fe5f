"""Open-vocabulary whole-image inference at the benchmark protocol (docs/method.md#inference-protocol).

- ``encode_vocabulary``: class names -> ``VocabularyEmbeddings`` (prompted embeddings for the masker, template
  ensembles for the KP branch). They depend only on the names, so compute them once and reuse them.
  The name ``background`` is not a text query: it stands for a constant map of ``background_threshold``.
- ``segment_window_scores``: one window size: zero-pad to the patch size, masks, PAMR, KP mix,
  resize to the padded size, crop the padding.
- ``segment_images``: images already resized by the processor's evaluation transform, any sizes:
  sliding windows batched through the model (windows of the same size from every image share batches, as many
  as the device's memory budget holds: ``windows_per_call``), overlapping outputs averaged, background map
  inserted. Score maps stay at the processed resolution; the
  image processor's ``post_process_semantic_segmentation`` resizes them to the original sizes and takes the
  argmax.

Every optimisation has a test-side reference in ``tests/reference_implementations.py`` (windows one at a
time, PAMR and the masker decoder as defined); the tests check that both agree to float rounding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput, logging

from .masker import inference_band_plan
from .pamr import pamr
from .templates import get_templates

if TYPE_CHECKING:
    from .configuration_code import CoDeConfig
    from .modeling_code import CoDeModel
    from .processing_code import CoDeProcessor

logger = logging.get_logger(__name__)

BACKGROUND_CLASS = "background"
DEFAULT_WINDOW_BATCH_SIZE = None  # as many windows per model call as the device's memory budget holds

# Windows per model call follow a memory budget. On the CPU it holds four 448x448 windows of a ViT-B/16 model
# in float32 (what a call held when it was a fixed four): larger batches only add memory there. On CUDA it is a
# share of the memory the device has free, so that a call gives the GPU as much work as fits, with room left for
# the estimate's errors; other accelerators get a fixed budget.
CPU_WINDOW_MEMORY_BUDGET = 400 * 2**20
CUDA_FREE_MEMORY_SHARE = 0.5
ACCELERATOR_WINDOW_MEMORY_BUDGET = 4 * 2**30
# A ceiling, so that an estimate too low never makes one call hold most of a large GPU.
MAX_WINDOWS_PER_CALL = 64


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VocabularyEmbeddings:
    """Everything the model needs to know about a list of class names; reuse it for any number of images.

    Attributes:
        class_names: the output classes in id order (the user's list, cleaned and deduplicated).
        background_index: position of ``background`` in ``class_names`` (a constant score map), or None.
        class_embeddings: [N_text, C] prompted embeddings (masker), one per non-background class, in order.
        kp_class_embeddings: [N_text, C] template-ensemble CLIP embeddings (KP branch), or None when the
            vocabulary was encoded without them.
        template_set: the template set of ``kp_class_embeddings``.
    """

    class_names: tuple[str, ...]
    background_index: int | None
    class_embeddings: torch.Tensor
    kp_class_embeddings: torch.Tensor | None
    template_set: str

    @property
    def text_class_names(self) -> tuple[str, ...]:
        """The classes queried with text (every class except ``background``)."""
        return tuple(name for index, name in enumerate(self.class_names) if index != self.background_index)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Class names typed as one text are separated by commas or line breaks.
CLASS_SEPARATORS = re.compile(r"[,\r\n]")


def parse_class_list(text: str) -> list[str]:
    """Split a class list typed as one text into names: commas and line breaks both separate (``"cat, sofa"``,
    ``"cat\\nsofa"``); empty items are dropped."""
    return [name.strip() for name in CLASS_SEPARATORS.split(text) if name.strip()]


def _refuse_non_lists(class_names: object) -> None:
    """``None`` (classes forgotten) and other non-iterables get a sentence, not Python's "not iterable"."""
    example = "e.g. ['cat', 'sofa', 'background']"
    if class_names is None:
        raise TypeError(f"The classes are missing: pass a list of class names, {example}")
    if not isinstance(class_names, (str, Iterable)):
        raise TypeError(f"The classes must be a list of class names, not {type(class_names).__name__}: {example}")


def _refuse_line_breaks(class_names: Sequence[str]) -> None:
    """A name holding a line break is two names run together (a pasted multi-line list): name it."""
    for position, name in enumerate(class_names):
        if isinstance(name, str) and ("\n" in name or "\r" in name):
            raise ValueError(
                f"Class name {position} ({name!r}) holds a line break; give one name per item (split a "
                "multi-line text with modeling_code.inference.parse_class_list)"
            )


def clean_class_names(class_names: Sequence[str]) -> tuple[list[str], int | None]:
    """Validate class names; returns (names without duplicates, index of ``background`` or None).

    Whitespace is collapsed and names that differ only in case are duplicates (CLIP's tokenizer lower-cases
    and splits on whitespace, so they would get identical embeddings); the first spelling is kept, with a
    warning.

    Raises:
        TypeError: ``class_names`` is a single string or holds something other than strings.
        ValueError: no class names, an empty name, a name holding a line break, or ``background`` alone.
    """
    _refuse_non_lists(class_names)
    if isinstance(class_names, str):
        raise TypeError(
            "class_names must be a list of names, not one string; split a comma-separated list with "
            "modeling_code.inference.parse_class_list"
        )
    class_names = list(class_names)  # iterated twice below
    _refuse_line_breaks(class_names)
    names: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for position, name in enumerate(class_names):
        if not isinstance(name, str):
            raise TypeError(
                f"Class names must be strings; item {position} is {type(name).__name__}: {name!r}"
            )
        cleaned = re.sub(r"\s+", " ", name).strip()
        if not cleaned:
            raise ValueError(f"Class name {position} is empty; every class needs a name")
        key = cleaned.lower()
        if key in seen:
            duplicates.append(cleaned)
            continue
        seen.add(key)
        names.append(cleaned)
    if not names:
        raise ValueError("No class names were given; pass at least one, e.g. ['cat', 'sofa', 'background']")
    if duplicates:
        logger.warning(f"Duplicate class names ignored (the first spelling is kept): {duplicates}")
    lowered = [name.lower() for name in names]
    background_index = lowered.index(BACKGROUND_CLASS) if BACKGROUND_CLASS in lowered else None
    if background_index is not None and len(names) == 1:
        raise ValueError("'background' alone is no vocabulary: name at least one class to segment")
    return names, background_index


def _warn_truncated(names: Sequence[str], truncated: Sequence[bool], limit: int, where: str) -> None:
    too_long = [name for name, cut in zip(names, truncated) if cut]
    if too_long:
        logger.warning(
            f"Class names too long for the {where} ({limit} token positions including start and end) are "
            f"truncated: {too_long}"
        )


@torch.no_grad()
def encode_vocabulary(
    model: CoDeModel,
    processor: CoDeProcessor,
    class_names: Sequence[str],
    with_kp_embeddings: bool | None = None,
) -> VocabularyEmbeddings:
    """Embed a vocabulary once.

    Args:
        model: the CoDe model.
        processor: its processor (only the tokenizer is used).
        class_names: class names in output order; ``background`` (any case) is the constant background map.
        with_kp_embeddings: also compute the KP branch's template ensembles (template set
            ``model.config.inference_template_set``); default: when ``model.config.kp_weight > 0``.

    Long names are truncated with a warning: a prompted name keeps ``context_length - prompt_context_length``
    positions, a templated one ``context_length``.
    """
    config = model.config
    names, background_index = clean_class_names(class_names)
    text_names = [name for index, name in enumerate(names) if index != background_index]
    with_kp_embeddings = config.kp_weight > 0 if with_kp_embeddings is None else with_kp_embeddings
    device = model.device

    class_input_ids, _ = processor.tokenize_with_truncation_flags(text_names, config.context_length)
    prompt_limit = config.context_length - config.prompt_context_length
    _, prompt_truncated = processor.tokenize_with_truncation_flags(text_names, prompt_limit)
    _warn_truncated(text_names, prompt_truncated, prompt_limit, "prompted class encoder")
    class_embeddings = model.get_class_embeddings(class_input_ids.to(device))

    kp_class_embeddings = None
    if with_kp_embeddings:
        templates = get_templates(config.inference_template_set)
        prompts = [template.format(name) for name in text_names for template in templates]
        template_input_ids, template_truncated = processor.tokenize_with_truncation_flags(
            prompts, config.context_length
        )
        per_class_truncated = [
            any(template_truncated[i : i + len(templates)]) for i in range(0, len(prompts), len(templates))
        ]
        _warn_truncated(text_names, per_class_truncated, config.context_length, "template prompts")
        kp_class_embeddings = model.get_template_class_embeddings(
            template_input_ids.to(device), len(templates)
        )
    return VocabularyEmbeddings(
        class_names=tuple(names),
        background_index=background_index,
        class_embeddings=class_embeddings,
        kp_class_embeddings=kp_class_embeddings,
        template_set=config.inference_template_set,
    )


# --------------------------------------------------------------------------------------------------------------
# Windows and padding
# --------------------------------------------------------------------------------------------------------------
class Window(NamedTuple):
    """A crop of an image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def window_starts(size: int, window_size: int, stride: int) -> list[int]:
    """Start of every window along one axis: the last window is flush with the border.

    ``n = max(size - window_size + stride - 1, 0) // stride + 1`` windows; window i ends at
    ``min(i * stride + window_size, size)`` and starts ``window_size`` before that, clamped at 0.
    """
    count = max(size - window_size + stride - 1, 0) // stride + 1
    return [max(min(index * stride + window_size, size) - window_size, 0) for index in range(count)]


def sliding_windows(height: int, width: int, window_size: int, stride: int) -> list[Window]:
    """Windows covering a ``height`` x ``width`` image, row-major; an axis shorter than the window is one window."""
    return [
        Window(top, left, min(window_size, height), min(window_size, width))
        for top in window_starts(height, window_size, stride)
        for left in window_starts(width, window_size, stride)
    ]


def pad_to_multiple(
    pixel_values: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad the last two dims up to multiples of ``multiple``, split evenly with the extra on bottom/right.

    Returns (padded [..., H', W'], (top, bottom, left, right)).
    """
    height, width = pixel_values.shape[-2:]
    pad_height, pad_width = -height % multiple, -width % multiple
    top, left = pad_height // 2, pad_width // 2
    pads = (top, pad_height - top, left, pad_width - left)
    if pad_height or pad_width:
        pixel_values = F.pad(pixel_values, (left, pads[3], top, pads[1]))
    return pixel_values, pads


def _crop_padding(maps: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = pads
    height, width = maps.shape[-2:]
    return maps[..., top : height - bottom, left : width - right]


# --------------------------------------------------------------------------------------------------------------
# One window size
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _WindowSettings:
    use_pamr: bool
    kp_weight: float


def _refined_masks(
    model: CoDeModel, padded: torch.Tensor, vocabulary: VocabularyEmbeddings, settings: _WindowSettings
) -> torch.Tensor:
    """Masks, PAMR and KP mix of padded windows [B, 3, H, W] (fp32) -> fp32 masks [B, N_text, 4h, 4w] (h x w patches)."""
    config = model.config
    kp_embeddings = vocabulary.kp_class_embeddings if settings.kp_weight > 0 else None
    outputs = model.segment_window(padded.to(model.dtype), vocabulary.class_embeddings, kp_embeddings)
    masks = outputs.masks.float()
    if settings.use_pamr:
        masks = pamr(padded, masks, config.pamr_iterations, config.pamr_dilations)
    if kp_embeddings is not None:
        kp_masks = F.interpolate(
            outputs.kp_masks.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        masks = settings.kp_weight * kp_masks + (1 - settings.kp_weight) * masks
    return masks


def _to_window_size(
    masks: torch.Tensor, padded_size: Sequence[int], pads: tuple[int, int, int, int]
) -> torch.Tensor:
    """Step 5: masks [B, N, h, w] -> bilinear to the padded size -> padding cropped: [B, N, H, W]."""
    resized = F.interpolate(masks, size=tuple(padded_size), mode="bilinear", align_corners=False)
    return _crop_padding(resized, pads)


def _settings(
    model: CoDeModel,
    vocabulary: VocabularyEmbeddings,
    use_pamr: bool | None,
    kp_weight: float | None,
) -> _WindowSettings:
    config = model.config
    kp_weight = config.kp_weight if kp_weight is None else float(kp_weight)
    if not 0.0 <= kp_weight <= 1.0:
        raise ValueError(f"kp_weight must be in [0, 1]; got {kp_weight}")
    if kp_weight > 0 and vocabulary.kp_class_embeddings is None:
        raise ValueError(
            f"kp_weight={kp_weight} needs the KP branch's template embeddings; encode the vocabulary with "
            "with_kp_embeddings=True"
        )
    return _WindowSettings(use_pamr=config.use_pamr if use_pamr is None else bool(use_pamr), kp_weight=kp_weight)


@torch.no_grad()
def segment_window_scores(
    model: CoDeModel,
    pixel_values: torch.Tensor,
    vocabulary: VocabularyEmbeddings,
    use_pamr: bool | None = None,
    kp_weight: float | None = None,
) -> torch.Tensor:
    """Class scores of windows of one size: padding, masks, PAMR, KP mix, resize, padding cropped.

    pixel_values [B, 3, H, W] normalised, any H, W -> fp32 scores [B, N_text, H, W] in [0, 1].
    ``use_pamr`` / ``kp_weight`` default to the model config.
    """
    settings = _settings(model, vocabulary, use_pamr, kp_weight)
    padded, pads = pad_to_multiple(pixel_values.to(model.device, torch.float32), model.config.patch_size)
    return _to_window_size(_refined_masks(model, padded, vocabulary, settings), padded.shape[-2:], pads)


# --------------------------------------------------------------------------------------------------------------
# Whole images
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CoDeSegmentationOutput(ModelOutput):
    """Whole-image inference output.

    Args:
        logits: class scores in [0, 1] (probabilities, named ``logits`` for the transformers post-processing
            convention), one map per class of the vocabulary in its order, background included as a constant
            map: a tensor [B, N, H, W] when every image has the same processed size, else a list of B tensors
            [N, H_i, W_i]. Sizes are those of ``pixel_values``; ``post_process_semantic_segmentation`` resizes
            to the original sizes.
    """

    logits: torch.Tensor | list[torch.Tensor] | None = None


def _image_list(pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[B, 3, H, W] or a list of [3, H_i, W_i] -> a checked list of [3, H_i, W_i]."""
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be [B, 3, H, W] or a list of [3, H, W]; got {tuple(pixel_values.shape)}"
            )
        pixel_values = pixel_values.unbind(0)
    images = list(pixel_values)
    if not images:
        raise ValueError("No images were given")
    for index, image in enumerate(images):
        is_image = isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3
        if not is_image or image.numel() == 0:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"Image {index} must be a non-empty [3, H, W] tensor; got {shape}")
    return images


def window_memory_bytes(
    config: CoDeConfig, height: int, width: int, num_classes: int, dtype: torch.dtype, device_type: str
) -> int:
    """An estimate of the bytes one ``height`` x ``width`` window adds to a batched inference call at its peak.

    Counted: a CLIP block in flight (hidden states, their norm, queries, keys, values and attention output,
    the 4x-wide MLP activation, attention weights where the kernel forms them); on an accelerator, where all
    windows pass the masker's last block together (``masker.inference_band_plan``), its input, tap products,
    full-resolution output, norm and projection; the float32 masks with PAMR's neighbour affinities. Not
    counted: what one window at a time holds (the CPU's masker bands, the resize to the window size).
    """
    vision = config.clip_config.vision_config
    element = torch.empty((), dtype=dtype).element_size()
    grid = math.ceil(height / config.patch_size) * math.ceil(width / config.patch_size)
    tokens = 1 + grid
    clip = (10 * tokens * vision.hidden_size + 2 * vision.num_attention_heads * tokens**2) * element
    mask_pixels = 16 * grid
    masker = 0
    if not inference_band_plan(device_type)[0]:
        width_maps = 1 + 9 / 4 + 1 + 1  # input (upsampled), tap products, output, norm: W_v-wide full-size maps
        masker = int(mask_pixels * (width_maps * vision.hidden_size + 2 * config.clip_config.projection_dim) * element)
    affinity_maps = 3 * 2 * 9 * len(config.pamr_dilations)  # neighbours and their differences, per colour
    masks = mask_pixels * (3 * num_classes + affinity_maps) * 4
    return clip + masker + masks


def window_memory_budget(device: torch.device) -> int:
    """Bytes of windows one ``segment_images`` call may hold on ``device`` (see ``CPU_WINDOW_MEMORY_BUDGET``).

    On CUDA: ``CUDA_FREE_MEMORY_SHARE`` of the device's free memory, blocks its caching allocator holds unused
    counted as free.
    """
    if device.type == "cpu":
        return CPU_WINDOW_MEMORY_BUDGET
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FREE_MEMORY_SHARE * (free + cached))
    return ACCELERATOR_WINDOW_MEMORY_BUDGET


def windows_per_call(
    config: CoDeConfig,
    dtype: torch.dtype,
    device: torch.device,
    height: int,
    width: int,
    num_classes: int,
    budget: int | None = None,
) -> int:
    """How many ``height`` x ``width`` windows one model call takes: as many as ``budget`` bytes hold (default
    the device's, ``window_memory_budget``), at least one and at most ``MAX_WINDOWS_PER_CALL``."""
    budget = window_memory_budget(device) if budget is None else budget
    per_window = window_memory_bytes(config, height, width, num_classes, dtype, device.type)
    return max(1, min(MAX_WINDOWS_PER_CALL, budget // per_window))


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")


@torch.no_grad()
def segment_images(
    model: CoDeModel,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    vocabulary: VocabularyEmbeddings,
    use_pamr: bool | None = None,
    kp_weight: float | None = None,
    background_threshold: float | None = None,
    window_size: int | None = None,
    window_stride: int | None = None,
    window_batch_size: int | None = DEFAULT_WINDOW_BATCH_SIZE,
) -> CoDeSegmentationOutput:
    """Sliding-window class scores of whole images (the protocol up to, not including, the final resize).

    Args:
        model: the CoDe model (any device and dtype; scores are accumulated in fp32).
        pixel_values: images after the processor's evaluation transform: [B, 3, H, W] or a list of [3, H_i, W_i].
        vocabulary: from ``encode_vocabulary``.
        use_pamr, kp_weight, background_threshold, window_size, window_stride: default to the model config.
        window_batch_size: windows per model call (windows of equal size from all images are batched); bounds
            the memory of one call. Default: as many as the device's memory budget holds (``windows_per_call``).

    Returns:
        ``CoDeSegmentationOutput`` with scores [N, H_i, W_i] per image, N = ``vocabulary.num_classes``.
    """
    config = model.config
    settings = _settings(model, vocabulary, use_pamr, kp_weight)
    threshold = config.background_threshold if background_threshold is None else float(background_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"background_threshold must be in [0, 1] (scores are probabilities); got {threshold}"
        )
    window_size = config.window_size if window_size is None else int(window_size)
    window_stride = config.window_stride if window_stride is None else int(window_stride)
    _check_positive(window_size=window_size, window_stride=window_stride)
    if window_batch_size is not None:
        _check_positive(window_batch_size=window_batch_size)
    if window_stride > window_size:
        raise ValueError(
            f"window_stride ({window_stride}) larger than window_size ({window_size}) leaves gaps"
        )
    images = [image.to(model.device, torch.float32) for image in _image_list(pixel_values)]

    num_text_classes = vocabulary.class_embeddings.shape[0]
    sums = [image.new_zeros(num_text_classes, *image.shape[-2:]) for image in images]
    counts = [image.new_zeros(image.shape[-2:]) for image in images]
    # Windows of the same size, from every image, share model calls.
    groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for index, image in enumerate(images):
        for window in sliding_windows(*image.shape[-2:], window_size, window_stride):
            groups.setdefault((window.height, window.width), []).append((index, window))
    budget = None if window_batch_size is not None else window_memory_budget(model.device)
    with model.prepared_for_inference():
        for (height, width), jobs in groups.items():
            batch_size = window_batch_size or windows_per_call(
                config, model.dtype, model.device, height, width, num_text_classes, budget
            )
            for batch in _batches(jobs, batch_size):
                crops = torch.stack(
                    [images[i][:, w.top : w.top + w.height, w.left : w.left + w.width] for i, w in batch]
                )
                padded, pads = pad_to_multiple(crops, config.patch_size)
                masks = _refined_masks(model, padded, vocabulary, settings)
                for row, (index, window) in enumerate(batch):
                    # One full-size window map at a time: accumulators are the only [N, H, W] tensors kept.
                    scores = _to_window_size(masks[row : row + 1], padded.shape[-2:], pads)[0]
                    rows = slice(window.top, window.top + window.height)
                    columns = slice(window.left, window.left + window.width)
                    sums[index][:, rows, columns] += scores
                    counts[index][rows, columns] += 1

    logits = []
    for summed, count in zip(sums, counts):
        scores = summed.div_(count)
        if vocabulary.background_index is not None:
            at = vocabulary.background_index
            background = scores.new_full((1, *scores.shape[1:]), threshold)
            scores = torch.cat([scores[:at], background, scores[at:]])
        logits.append(scores)
    if len({tuple(scores.shape) for scores in logits}) == 1:
        return CoDeSegmentationOutput(logits=torch.stack(logits))
    return CoDeSegmentationOutput(logits=logits)


__all__ = [
    "BACKGROUND_CLASS",
    "CoDeSegmentationOutput",
    "VocabularyEmbeddings",
    "Window",
    "clean_class_names",
    "encode_vocabulary",
    "pad_to_multiple",
    "parse_class_list",
    "segment_images",
    "segment_window_scores",
    "sliding_windows",
    "window_memory_budget",
    "window_memory_bytes",
    "window_starts",
    "windows_per_call",
]
