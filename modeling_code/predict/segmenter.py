"""High-level open-vocabulary segmentation: any image, any class names, at the benchmark protocol.

    >>> from modeling_code.predict.segmenter import CoDeSegmenter
    >>> segmenter = CoDeSegmenter.from_pretrained("path/or/hub-id")
    >>> result = segmenter("photo.jpg", ["cat", "sofa", "background"])
    >>> result.label_map.shape, result.pixel_fractions["cat"]
    >>> result.overlay.save("overlay.png")

The vocabulary embeddings of a class list are cached (least recently used first out), so repeated calls
with the same classes only pay for the image; ``encode_vocabulary`` returns them as an object to hold.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from ..configuration_code import InferenceProtocol
from ..image_processing_code import DEFAULT_MAX_PIXELS, ImageLike
from ..inference import DEFAULT_WINDOW_BATCH_SIZE, VocabularyEmbeddings, clean_class_names, encode_vocabulary
from ..modeling_code import CoDeModel
from ..processing_code import CoDeProcessor
from .loading import load_model_and_processor
from .visualization import draw_legend, overlay, palette

logger = logging.get_logger(__name__)

DEFAULT_OVERLAY_ALPHA = 0.5
DEFAULT_VOCABULARY_CACHE_SIZE = 8


@dataclass
class SegmentationResult:
    """The segmentation of one image.

    Attributes:
        image: the RGB image that was segmented (after any ``max_pixels`` downscale).
        label_map: [H, W] int64 class ids (indices into ``class_names``) at the size of ``image``.
        class_names: the classes in id order (the request's list, cleaned and deduplicated).
        scores: [N, h, w] float32 per-class score maps in [0, 1] at the resolution the model worked at
            (the protocol's evaluation resize); ``background`` is its constant
            threshold map. ``label_map`` is their bilinear resize to [H, W] followed by the argmax.
        pixel_fractions: fraction of the image's pixels labelled with each class (every class listed).
        overlay: the colour-coded label map blended over ``image``, with a legend of the classes present.
    """

    image: Image.Image
    label_map: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    pixel_fractions: dict[str, float]
    overlay: Image.Image

    @property
    def present_classes(self) -> list[str]:
        """Names of the classes that label at least one pixel, in id order."""
        return [name for name, fraction in self.pixel_fractions.items() if fraction > 0]

    def to_dict(self) -> dict:
        """JSON-ready summary: image size, and each class's id, name and pixel fraction."""
        return {
            "height": int(self.label_map.shape[0]),
            "width": int(self.label_map.shape[1]),
            "classes": [
                {"id": index, "name": name, "pixel_fraction": self.pixel_fractions[name]}
                for index, name in enumerate(self.class_names)
            ],
        }


class CoDeSegmenter:
    """Open-vocabulary semantic segmentation with a CoDe model: a thin layer over the processor, ``model(...)``
    and the post-processing, which caches vocabularies and draws the result.

    Args:
        model: a ``CoDeModel`` (any device and dtype), or a ``CoDeOnnxModel`` (``from_onnx``).
        processor: its ``CoDeProcessor`` (tokenizer and image processor).
        use_pamr: refine masks with PAMR; default: the protocol's.
        background_threshold: score of the ``background`` class; default: the protocol's.
        max_pixels: larger inputs are downscaled (aspect kept) with a warning; ``None``: no cap.
        window_batch_size: sliding windows per model call (bounds memory); default: as many as the device's
            memory budget holds (``inference.windows_per_call``).
        vocabulary_cache_size: class lists whose embeddings are kept.
        overlay_alpha: opacity of the colour-coded labels in ``SegmentationResult.overlay``.
        protocol: the inference protocol; default ``model.config.inference_protocol``. ``use_pamr`` and
            ``background_threshold`` override it (``InferenceProtocol.replace``).
    """

    def __init__(
        self,
        model: CoDeModel,
        processor: CoDeProcessor,
        use_pamr: bool | None = None,
        background_threshold: float | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        window_batch_size: int | None = DEFAULT_WINDOW_BATCH_SIZE,
        vocabulary_cache_size: int = DEFAULT_VOCABULARY_CACHE_SIZE,
        overlay_alpha: float = DEFAULT_OVERLAY_ALPHA,
        protocol: InferenceProtocol | None = None,
    ) -> None:
        if vocabulary_cache_size < 0:
            raise ValueError(f"vocabulary_cache_size must be >= 0; got {vocabulary_cache_size}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels; got {max_pixels}")
        if not 0.0 <= overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha must be in [0, 1]; got {overlay_alpha}")
        if window_batch_size is not None and window_batch_size < 1:
            raise ValueError(f"window_batch_size must be a positive integer; got {window_batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.protocol = (protocol or model.config.inference_protocol).replace(
            use_pamr=use_pamr, background_threshold=background_threshold
        )
        # the image processor with this segmenter's size cap (the resize itself is the protocol's)
        self.image_processor = copy.deepcopy(processor.image_processor)
        self.image_processor.max_pixels = max_pixels
        self.window_batch_size = window_batch_size
        self.vocabulary_cache_size = vocabulary_cache_size
        self.overlay_alpha = overlay_alpha
        self._vocabularies: OrderedDict[tuple, VocabularyEmbeddings] = OrderedDict()

    @property
    def use_pamr(self) -> bool:
        return self.protocol.use_pamr

    @property
    def background_threshold(self) -> float:
        return self.protocol.background_threshold

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **segmenter_kwargs,
    ) -> CoDeSegmenter:
        """Load a saved CoDe model and processor (a local directory or a Hub id).

        Args:
            dtype: weights dtype (e.g. ``torch.bfloat16``); default float32.
            device: where to run: ``"auto"`` (CUDA when present), ``"cpu"`` (the default), ``"cuda"``, ...
            segmenter_kwargs: the constructor's options (``use_pamr``, ``background_threshold``, ...).

        Raises:
            ValueError / OSError: a missing folder, an unavailable device, incomplete or damaged model files
                (``predict.loading``).
        """
        model, processor = load_model_and_processor(pretrained_model_name_or_path, dtype=dtype, device=device)
        return cls(model, processor, **segmenter_kwargs)

    @classmethod
    def from_onnx(
        cls, export_dir: str | Path, num_threads: int | None = None, **segmenter_kwargs
    ) -> CoDeSegmenter:
        """A segmenter running the graphs of an ONNX export (``code-seg export onnx``) in onnxruntime, on the CPU.

        Everything around the graphs (windows, PAMR, the KP mix, background, resizes) is the torch path's code.

        Args:
            export_dir: the export folder.
            num_threads: threads of onnxruntime's operators (``intra_op_num_threads``; inter-op 1); default onnxruntime's.
            segmenter_kwargs: the constructor's options (``use_pamr``, ``background_threshold``, ...).

        Raises:
            FileNotFoundError / ValueError: not an export folder, or an incomplete one.
            ImportError: onnxruntime is not installed (the ``export`` extra).
        """
        from .onnx_runtime import load_onnx_model_and_processor

        model, processor = load_onnx_model_and_processor(export_dir, num_threads=num_threads)
        return cls(model, processor, **segmenter_kwargs)

    # ---------------------------------------------------------------------------------------- vocabulary
    def encode_vocabulary(self, class_names: Sequence[str]) -> VocabularyEmbeddings:
        """Embeddings of a class list (``background`` = constant map), from the cache when seen before."""
        names, _ = clean_class_names(class_names)
        key = (tuple(names), self.protocol.template_set, self.protocol.kp_weight > 0, self.model.dtype, self.model.device)
        if key in self._vocabularies:
            self._vocabularies.move_to_end(key)
            return self._vocabularies[key]
        vocabulary = encode_vocabulary(self.model, self.processor, names, protocol=self.protocol)
        if self.vocabulary_cache_size:
            self._vocabularies[key] = vocabulary
            while len(self._vocabularies) > self.vocabulary_cache_size:
                self._vocabularies.popitem(last=False)
        return vocabulary

    def clear_vocabulary_cache(self) -> None:
        """Forget cached vocabularies (needed only after changing the model's weights in place)."""
        self._vocabularies.clear()

    # ---------------------------------------------------------------------------------------- inference
    def _segment(
        self,
        images: Sequence[ImageLike],
        classes: Sequence[str] | VocabularyEmbeddings,
        use_pamr: bool | None,
        background_threshold: float | None,
    ) -> tuple[list[Image.Image], list[np.ndarray], list[torch.Tensor], VocabularyEmbeddings]:
        """(loaded images, [H, W] int64 label maps, [N, h, w] score maps, vocabulary) of a list of images."""
        vocabulary = classes if isinstance(classes, VocabularyEmbeddings) else self.encode_vocabulary(classes)
        protocol = self.protocol.replace(use_pamr=use_pamr, background_threshold=background_threshold)
        loaded = [self.image_processor.load_image(image) for image in images]
        if not loaded:
            raise ValueError("No images were given")
        inputs = self.image_processor.preprocess(loaded, protocol=protocol)
        outputs = self.model(
            **inputs, **vocabulary.model_inputs(), protocol=protocol, window_batch_size=self.window_batch_size
        )
        label_maps = self.image_processor.post_process_semantic_segmentation(outputs)
        label_maps = [label_map.cpu().numpy().astype(np.int64) for label_map in label_maps]
        return loaded, label_maps, list(outputs.scores), vocabulary

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        classes: Sequence[str] | VocabularyEmbeddings,
        use_pamr: bool | None = None,
        background_threshold: float | None = None,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment one image or a list of images (any sizes) into the given classes.

        Args:
            images: a PIL image, NumPy array, path or encoded bytes (anything ``load_image`` takes), or a list.
            classes: class names (``"background"`` means the constant background map, as in the benchmarks),
                or a ``VocabularyEmbeddings`` from ``encode_vocabulary``.
            use_pamr, background_threshold: override the segmenter's settings for this call.

        Returns:
            a ``SegmentationResult`` for a single image, a list of them for a list.

        Raises:
            InvalidImageError: an image cannot be read or is empty.
            ValueError / TypeError: a bad class list (empty, not strings, only background).
        """
        single = not isinstance(images, (list, tuple))
        loaded, label_maps, scores, vocabulary = self._segment(
            [images] if single else images, classes, use_pamr, background_threshold
        )
        results = [self._result(*parts, vocabulary) for parts in zip(loaded, label_maps, scores)]
        return results[0] if single else results

    def predict(
        self, image: ImageLike | Sequence[ImageLike], classes: Sequence[str] | VocabularyEmbeddings
    ) -> np.ndarray | list[np.ndarray]:
        """Only the [H, W] int64 label map of one image (indices into the class list), or a list of them for a
        list of images (their windows share the model's passes): for evaluation loops."""
        if isinstance(image, (list, tuple)):
            return self._segment(image, classes, None, None)[1]
        return self._segment([image], classes, None, None)[1][0]

    def _result(
        self, image: Image.Image, labels: np.ndarray, scores: torch.Tensor, vocabulary: VocabularyEmbeddings
    ) -> SegmentationResult:
        names = list(vocabulary.class_names)
        fractions = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        colors = palette(len(names))
        present = [index for index in range(len(names)) if fractions[index] > 0]
        drawn = draw_legend(overlay(image, labels, colors, self.overlay_alpha), names, colors, present)
        return SegmentationResult(
            image=image,
            label_map=labels,
            class_names=names,
            scores=scores.float().cpu().numpy(),
            pixel_fractions={name: float(fraction) for name, fraction in zip(names, fractions)},
            overlay=drawn,
        )


__all__ = ["CoDeSegmenter", "SegmentationResult"]
