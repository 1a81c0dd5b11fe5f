"""The ``zero-shot-image-segmentation`` pipeline: a semantic segmentation into class names typed at call time.

    >>> from transformers import pipeline
    >>> segment = pipeline("zero-shot-image-segmentation", model="path/or/hub-id", trust_remote_code=True)
    >>> segment("photo.jpg", candidate_labels=["cat", "sofa"])
    [{'label': 'cat', 'score': 0.41, 'mask': <PIL.Image.Image image mode=L size=500x375>}, ...]

Every saved model carries this module: ``CoDeModel.save_pretrained`` writes it beside the model's code and names
it under ``custom_pipelines`` in ``config.json``, so the call above needs no code-seg package. transformers asks for
``trust_remote_code=True`` for any ``custom_pipelines`` entry, installed package or not; the pipeline, model and
processor come from the folder's code, or the model and processor from the package where it is imported (the
pipeline relies on no class identity across the two). Importing the package also registers the task, so a model
in memory needs no remote code: ``pipeline("zero-shot-image-segmentation", model=model, processor=processor)``.

It adds no inference of its own: the processor prepares each image, ``model(...)`` segments it with the
vocabulary's embeddings (encoded once per call) and the processor's ``post_process_semantic_segmentation`` gives
the label map and its scores at the image's size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

from .configuration_code import InferenceProtocol
from .inference import BACKGROUND_CLASS, VocabularyEmbeddings, class_list, encode_vocabulary
from .modeling_code import CoDeSegmentationOutput

PIPELINE_TASK = "zero-shot-image-segmentation"


def _labels(candidate_labels: str | Sequence[str], background: bool | None) -> tuple[str, ...]:
    """The vocabulary of a call: ``candidate_labels`` as a list (one string is split at commas and line breaks),
    with ``background`` appended when asked for; validated as the processor does (no repeats)."""
    names, background_index = class_list(candidate_labels)
    if background and background_index is None:
        names.append(BACKGROUND_CLASS)
    elif background is False and background_index is not None:
        raise ValueError(
            f"candidate_labels name {names[background_index]!r} but background=False; drop one of the two"
        )
    return tuple(names)


class ZeroShotImageSegmentationPipeline(Pipeline):
    """Segment images into any class names with a CoDe model: one entry per label that labels a pixel.

    Call options (also accepted by ``pipeline(...)`` as defaults for every call):
        candidate_labels: class names, a list or one string separated by commas or newlines; required.
        background: ``True`` adds a ``background`` class (a constant score of ``background_threshold``: pixels no
            label beats go to it); ``False`` refuses a ``background`` among the labels; default: as listed.
        background_threshold: the background's score; default: the model's protocol's.
        use_pamr: refine the masks with PAMR; default: the model's protocol's.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _BATCH_SIZE_MESSAGE = (
        "batch_size must be 1: the windows of each image already share the model's calls; pass a list of images"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "The zero-shot-image-segmentation pipeline needs the model's CoDeProcessor: "
                "processor=CoDeProcessor.from_pretrained(<the model's folder or id>)"
            )
        if self._batch_size not in (None, 1):
            raise ValueError(self._BATCH_SIZE_MESSAGE)
        self.model.eval()
        self._vocabulary: tuple[tuple, VocabularyEmbeddings] | None = None

    def __call__(self, inputs: Any, candidate_labels: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Segment one image or a list of images.

        Args:
            inputs: a path, URL, PIL image, NumPy array or encoded bytes, or a list of them (any sizes); paths,
                URLs and bytes get their EXIF orientation applied.
            candidate_labels, background, background_threshold, use_pamr: see the class.

        Returns:
            for one image, a list of ``{"label", "score", "mask"}`` dicts in vocabulary order, one per label that
            labels at least one pixel: ``mask`` is a PIL "L" image (255 where the label wins, else 0) at the
            image's size, ``score`` the label's mean score over its mask. For a list of images, a list of those.
        """
        if kwargs.get("batch_size") not in (None, 1):
            raise ValueError(self._BATCH_SIZE_MESSAGE)
        if candidate_labels is None and "candidate_labels" not in self._forward_params:
            raise ValueError("Give candidate_labels: the class names to segment, e.g. ['cat', 'sofa']")
        self._vocabulary = None  # encoded at the first image of this call, shared by the others
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        return super().__call__(inputs, candidate_labels=candidate_labels, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The model (with this module and its ``custom_pipelines`` entry) and the whole processor, which
        ``Pipeline.save_pretrained`` would save only in parts."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)

    def _sanitize_parameters(
        self,
        candidate_labels: str | Sequence[str] | None = None,
        background: bool | None = None,
        background_threshold: float | None = None,
        use_pamr: bool | None = None,
        **unknown: Any,
    ) -> tuple[dict, dict, dict]:
        if unknown:
            raise TypeError(f"zero-shot-image-segmentation got unexpected options {sorted(unknown)}")
        forward_params: dict[str, Any] = {}
        if candidate_labels is not None:
            forward_params["candidate_labels"] = _labels(candidate_labels, background)
        elif background is not None:
            raise ValueError("background applies to candidate_labels: give them in the same call")
        if background_threshold is not None or use_pamr is not None:
            # validated now, before any image is read
            InferenceProtocol().replace(background_threshold=background_threshold, use_pamr=use_pamr)
        if background_threshold is not None:
            forward_params["background_threshold"] = background_threshold
        if use_pamr is not None:
            forward_params["use_pamr"] = use_pamr
        return {}, forward_params, {}

    def preprocess(self, image: Any) -> Any:
        return self.processor(images=image, protocol=self.model.config.inference_protocol)

    def _encode_vocabulary(self, labels: tuple[str, ...], protocol: InferenceProtocol) -> VocabularyEmbeddings:
        key = (labels, protocol.template_set, protocol.kp_weight > 0)
        if self._vocabulary is None or self._vocabulary[0] != key:
            self._vocabulary = (key, encode_vocabulary(self.model, self.processor, labels, protocol=protocol))
        return self._vocabulary[1]

    def _forward(
        self,
        model_inputs: Any,
        candidate_labels: tuple[str, ...],
        background_threshold: float | None = None,
        use_pamr: bool | None = None,
    ) -> dict[str, Any]:
        protocol = self.model.config.inference_protocol.replace(
            background_threshold=background_threshold, use_pamr=use_pamr
        )
        vocabulary = self._encode_vocabulary(candidate_labels, protocol)
        outputs = self.model(**model_inputs, **vocabulary.model_inputs(), protocol=protocol)
        return {
            "scores": outputs.scores,
            "original_sizes": outputs.original_sizes,
            "class_names": vocabulary.class_names,
        }

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        outputs = CoDeSegmentationOutput(
            scores=model_outputs["scores"], original_sizes=model_outputs["original_sizes"]
        )
        segmentation = self.processor.post_process_semantic_segmentation(outputs, return_scores=True)[0]
        labels = segmentation["segmentation"].flatten()
        num_classes = len(model_outputs["class_names"])
        pixels = torch.bincount(labels, minlength=num_classes)
        score_sums = torch.bincount(labels, weights=segmentation["scores"].flatten().double(), minlength=num_classes)
        label_map = segmentation["segmentation"].numpy()
        return [
            {
                "label": name,
                "score": float(score_sums[index] / pixels[index]),
                "mask": Image.fromarray(np.where(label_map == index, 255, 0).astype(np.uint8)),
            }
            for index, name in enumerate(model_outputs["class_names"])
            if pixels[index] > 0
        ]


CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": f"{__name__.rsplit('.', 1)[-1]}.{ZeroShotImageSegmentationPipeline.__name__}",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}
"""The ``custom_pipelines`` entry of a saved model's ``config.json``."""

__all__ = ["CUSTOM_PIPELINES", "PIPELINE_TASK", "ZeroShotImageSegmentationPipeline"]
