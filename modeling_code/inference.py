"""Open-vocabulary whole-image inference at the benchmark protocol (docs/method.md#inference-protocol).

``CoDeModel.forward`` runs it at inference; the protocol's settings come from one ``InferenceProtocol``
(the model config's unless the caller passes another).

- ``encode_vocabulary``: class names -> ``VocabularyEmbeddings`` (prompted embeddings for the masker, template
  ensembles for the KP branch). They depend only on the names, so compute them once and pass them to the
  model for any number of images (``vocabulary.model_inputs()``). The name ``background`` is not a text
  query: it stands for a constant map of ``background_threshold``, inserted by ``insert_background`` only.
- ``segment_window_scores``: one window size: zero-pad to the patch size, masks, PAMR, KP mix,
  resize to the padded size, crop the padding.
- ``sliding_window_scores``: images already resized by the processor's evaluation transform, any sizes:
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
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .configuration_code import InferenceProtocol
from .masker import inference_band_plan
from .pamr import pamr

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

    def model_inputs(self) -> dict[str, torch.Tensor | int | None]:
        """The ``CoDeModel.forward`` arguments that stand for this vocabulary: ``model(pixel_values=...,
        **vocabulary.model_inputs())``."""
        return {
            "class_embeddings": self.class_embeddings,
            "kp_class_embeddings": self.kp_class_embeddings,
            "background_index": self.background_index,
        }


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


def clean_class_names(
    class_names: Sequence[str], drop_duplicates: bool = True
) -> tuple[list[str], int | None]:
    """Validate class names; returns (names without duplicates, index of ``background`` or None).

    Whitespace is collapsed and names that differ only in case are duplicates (CLIP's tokenizer lower-cases
    and splits on whitespace, so they would get identical embeddings); the first spelling is kept, with a
    warning. With ``drop_duplicates=False`` a duplicate is an error instead, for callers whose class ids must
    stay positions in the list as given (the processor).

    Raises:
        TypeError: ``class_names`` is a single string or holds something other than strings.
        ValueError: no class names, an empty name, a name holding a line break, ``background`` alone, or a
            duplicate with ``drop_duplicates=False``.
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
    if duplicates and not drop_duplicates:
        raise ValueError(
            f"Class names repeat (ignoring case): {duplicates}; class ids are positions in the list, so give "
            "each class once"
        )
    if duplicates:
        logger.warning(f"Duplicate class names ignored (the first spelling is kept): {duplicates}")
    lowered = [name.lower() for name in names]
    background_index = lowered.index(BACKGROUND_CLASS) if BACKGROUND_CLASS in lowered else None
    if background_index is not None and len(names) == 1:
        raise ValueError("'background' alone is no vocabulary: name at least one class to segment")
    return names, background_index


def class_list(text: str | Sequence[str]) -> tuple[list[str], int | None]:
    """A class list as users type it, for a call whose class ids are positions in it (the processor, the
    pipeline): one string is split at commas and line breaks (``parse_class_list``); validated by
    ``clean_class_names`` with repeats refused. Returns (names, index of ``background`` or None)."""
    names = parse_class_list(text) if isinstance(text, str) else text
    return clean_class_names(names, drop_duplicates=False)


def template_ensemble_embeddings(model: CoDeModel, kp_template_input_ids: torch.Tensor) -> torch.Tensor:
    """The KP branch's class embeddings from the processor's ``kp_template_input_ids`` [N_text, T, L] (each class
    in T templates) -> [N_text, C], through ``model.get_template_class_embeddings``."""
    if kp_template_input_ids.dim() != 3:
        raise ValueError(
            f"kp_template_input_ids must be [N_text, T, L] (classes, templates, positions); got "
            f"{tuple(kp_template_input_ids.shape)}"
        )
    num_classes, num_templates, length = kp_template_input_ids.shape
    return model.get_template_class_embeddings(
        kp_template_input_ids.reshape(num_classes * num_templates, length), num_templates
    )


@torch.no_grad()
def encode_vocabulary(
    model: CoDeModel,
    processor: CoDeProcessor,
    class_names: Sequence[str],
    with_kp_embeddings: bool | None = None,
    protocol: InferenceProtocol | None = None,
) -> VocabularyEmbeddings:
    """Embed a vocabulary once: ``processor.encode_text``, then the model's text encoders.

    Args:
        model: the CoDe model.
        processor: its processor.
        class_names: class names in output order; ``background`` (any case) is the constant background map.
            Duplicates (ignoring case) are dropped with a warning.
        with_kp_embeddings: also compute the KP branch's template ensembles; default: when the protocol's
            ``kp_weight > 0``.
        protocol: its ``template_set`` picks the KP templates; default: the model's protocol.
    """
    protocol = protocol or model.config.inference_protocol
    with_kp_embeddings = protocol.kp_weight > 0 if with_kp_embeddings is None else with_kp_embeddings
    names, background_index = clean_class_names(class_names)
    text = processor.encode_text(names, protocol, with_kp_templates=with_kp_embeddings)
    class_embeddings = model.get_class_embeddings(text["class_input_ids"].to(model.device))
    kp_class_embeddings = None
    if with_kp_embeddings:
        kp_class_embeddings = template_ensemble_embeddings(model, text["kp_template_input_ids"].to(model.device))
    return VocabularyEmbeddings(
        class_names=tuple(names),
        background_index=background_index,
        class_embeddings=class_embeddings,
        kp_class_embeddings=kp_class_embeddings,
        template_set=protocol.template_set,
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
def _check_kp_embeddings(protocol: InferenceProtocol, kp_class_embeddings: torch.Tensor | None) -> None:
    if protocol.kp_weight > 0 and kp_class_embeddings is None:
        raise ValueError(
            f"kp_weight={protocol.kp_weight} needs the KP branch's template embeddings: pass kp_template_input_ids "
            "or kp_class_embeddings (encode_vocabulary(..., with_kp_embeddings=True)), or set kp_weight=0"
        )


def _refined_masks(
    model: CoDeModel,
    padded: torch.Tensor,
    class_embeddings: torch.Tensor,
    kp_class_embeddings: torch.Tensor | None,
    protocol: InferenceProtocol,
) -> torch.Tensor:
    """Masks, PAMR and KP mix of padded windows [B, 3, H, W] (fp32) -> fp32 masks [B, N_text, 4h, 4w] (h x w patches)."""
    kp_embeddings = kp_class_embeddings if protocol.kp_weight > 0 else None
    outputs = model.segment_window(padded.to(model.dtype), class_embeddings, kp_embeddings)
    masks = outputs.masks.float()
    if protocol.use_pamr:
        masks = pamr(padded, masks, protocol.pamr_iterations, protocol.pamr_dilations)
    if kp_embeddings is not None:
        kp_masks = F.interpolate(
            outputs.kp_masks.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        masks = protocol.kp_weight * kp_masks + (1 - protocol.kp_weight) * masks
    return masks


def _to_window_size(
    masks: torch.Tensor, padded_size: Sequence[int], pads: tuple[int, int, int, int]
) -> torch.Tensor:
    """Step 5: masks [B, N, h, w] -> bilinear to the padded size -> padding cropped: [B, N, H, W]."""
    resized = F.interpolate(masks, size=tuple(padded_size), mode="bilinear", align_corners=False)
    return _crop_padding(resized, pads)


def _protocol(model: CoDeModel, protocol: InferenceProtocol | None, overrides: dict, where: str) -> InferenceProtocol:
    """``protocol`` (default: the model's) with the keyword overrides of 0.1's signatures, which are deprecated."""
    protocol = protocol or model.config.inference_protocol
    given = {name: value for name, value in overrides.items() if value is not None}
    if given:
        warnings.warn(
            f"{where}({', '.join(f'{name}=...' for name in given)}) is deprecated and goes in 0.3: pass "
            f"protocol=model.config.inference_protocol.replace({', '.join(f'{name}=...' for name in given)})",
            FutureWarning,
            stacklevel=3,
        )
    return protocol.replace(**given)


@torch.no_grad()
def segment_window_scores(
    model: CoDeModel,
    pixel_values: torch.Tensor,
    vocabulary: VocabularyEmbeddings,
    protocol: InferenceProtocol | None = None,
    use_pamr: bool | None = None,
    kp_weight: float | None = None,
) -> torch.Tensor:
    """Class scores of windows of one size: padding, masks, PAMR, KP mix, resize, padding cropped.

    pixel_values [B, 3, H, W] normalised, any H, W -> fp32 scores [B, N_text, H, W] in [0, 1]. ``protocol``
    defaults to the model's (``use_pamr`` / ``kp_weight`` are deprecated overrides).
    """
    protocol = _protocol(model, protocol, {"use_pamr": use_pamr, "kp_weight": kp_weight}, "segment_window_scores")
    _check_kp_embeddings(protocol, vocabulary.kp_class_embeddings)
    padded, pads = pad_to_multiple(pixel_values.to(model.device, torch.float32), model.config.patch_size)
    masks = _refined_masks(model, padded, vocabulary.class_embeddings, vocabulary.kp_class_embeddings, protocol)
    return _to_window_size(masks, padded.shape[-2:], pads)


# --------------------------------------------------------------------------------------------------------------
# Whole images
# --------------------------------------------------------------------------------------------------------------
def image_list(pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


def insert_background(scores: torch.Tensor, background_index: int | None, threshold: float) -> torch.Tensor:
    """The one place where ``background`` becomes a class: scores [N_text, H, W] -> [N_text + 1, H, W] with a
    constant map of ``threshold`` at ``background_index`` (unchanged when it is None)."""
    if background_index is None:
        return scores
    if not 0 <= background_index <= scores.shape[0]:
        raise ValueError(f"background_index {background_index} is outside the {scores.shape[0] + 1} classes")
    background = scores.new_full((1, *scores.shape[1:]), threshold)
    return torch.cat([scores[:background_index], background, scores[background_index:]])


@torch.no_grad()
def sliding_window_scores(
    model: CoDeModel,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    class_embeddings: torch.Tensor,
    kp_class_embeddings: torch.Tensor | None = None,
    background_index: int | None = None,
    protocol: InferenceProtocol | None = None,
    window_batch_size: int | None = DEFAULT_WINDOW_BATCH_SIZE,
) -> list[torch.Tensor]:
    """Sliding-window class scores of whole images (the protocol up to, not including, the final resize).

    What ``CoDeModel.forward`` runs at inference; see there for the arguments. Windows of the same size from
    every image share model calls of at most ``window_batch_size`` windows (default: as many as the device's
    memory budget holds, ``windows_per_call``); overlapping windows are averaged. Returns one fp32 tensor [N, H_i, W_i] per image, in [0, 1], with the
    ``background`` map inserted at ``background_index``.
    """
    protocol = protocol or model.config.inference_protocol
    _check_kp_embeddings(protocol, kp_class_embeddings)
    if window_batch_size is not None and window_batch_size < 1:
        raise ValueError(f"window_batch_size must be a positive integer; got {window_batch_size}")
    images = [image.to(model.device, torch.float32) for image in image_list(pixel_values)]
    class_embeddings = class_embeddings.to(model.device)
    if kp_class_embeddings is not None:
        kp_class_embeddings = kp_class_embeddings.to(model.device)

    num_text_classes = class_embeddings.shape[0]
    sums = [image.new_zeros(num_text_classes, *image.shape[-2:]) for image in images]
    counts = [image.new_zeros(image.shape[-2:]) for image in images]
    # Windows of the same size, from every image, share model calls.
    groups: dict[tuple[int, int], list[tuple[int, Window]]] = {}
    for index, image in enumerate(images):
        for window in sliding_windows(*image.shape[-2:], protocol.window_size, protocol.window_stride):
            groups.setdefault((window.height, window.width), []).append((index, window))
    budget = None if window_batch_size is not None else window_memory_budget(model.device)
    with model.prepared_for_inference():
        for (height, width), jobs in groups.items():
            batch_size = window_batch_size or windows_per_call(
                model.config, model.dtype, model.device, height, width, num_text_classes, budget
            )
            for batch in _batches(jobs, batch_size):
                crops = torch.stack(
                    [images[i][:, w.top : w.top + w.height, w.left : w.left + w.width] for i, w in batch]
                )
                padded, pads = pad_to_multiple(crops, model.config.patch_size)
                masks = _refined_masks(model, padded, class_embeddings, kp_class_embeddings, protocol)
                for row, (index, window) in enumerate(batch):
                    # One full-size window map at a time: accumulators are the only [N, H, W] tensors kept.
                    scores = _to_window_size(masks[row : row + 1], padded.shape[-2:], pads)[0]
                    rows = slice(window.top, window.top + window.height)
                    columns = slice(window.left, window.left + window.width)
                    sums[index][:, rows, columns] += scores
                    counts[index][rows, columns] += 1
    return [
        insert_background(summed.div_(count), background_index, protocol.background_threshold)
        for summed, count in zip(sums, counts)
    ]


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
):
    """Deprecated (goes in 0.3): ``model(pixel_values=..., **vocabulary.model_inputs(), protocol=...)``."""
    overrides = {
        "use_pamr": use_pamr,
        "kp_weight": kp_weight,
        "background_threshold": background_threshold,
        "window_size": window_size,
        "window_stride": window_stride,
    }
    warnings.warn(
        "segment_images is deprecated and goes in 0.3: call the model, "
        "model(pixel_values=..., **vocabulary.model_inputs(), protocol=...)",
        FutureWarning,
        stacklevel=2,
    )
    protocol = model.config.inference_protocol.replace(**overrides)
    return model(
        pixel_values=pixel_values, **vocabulary.model_inputs(), protocol=protocol, window_batch_size=window_batch_size
    )


__all__ = [
    "BACKGROUND_CLASS",
    "VocabularyEmbeddings",
    "Window",
    "class_list",
    "clean_class_names",
    "encode_vocabulary",
    "image_list",
    "insert_background",
    "pad_to_multiple",
    "parse_class_list",
    "segment_images",
    "segment_window_scores",
    "sliding_window_scores",
    "sliding_windows",
    "template_ensemble_embeddings",
    "window_starts",
    "windows_per_call",
]
