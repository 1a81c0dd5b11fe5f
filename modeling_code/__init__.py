"""code-seg: CoDe open-vocabulary semantic segmentation on Hugging Face transformers.

Importing the package registers ``CoDeConfig``/``CoDeModel`` (model type ``code``) with the Auto classes, and
marks them for remote code so a saved directory also loads with ``trust_remote_code=True`` without the package.
That needs transformers' configuration machinery (and so torch); the classes themselves and the segmenter stack
are imported on first access. The ``code-seg`` console script defers even the registration (``code_seg_cli``).

Layout, in layers from low to high (a module imports only from its own layer or lower ones):

- the root modules: what a Hub model repository holds as remote code (config, model, image processor,
  processor, text decomposition, templates, PAMR, inference, the ``zero-shot-image-segmentation`` pipeline);
  they import each other only relatively;
- ``predict``: ``CoDeSegmenter`` and the overlays (``from modeling_code import CoDeSegmenter`` works too);
- ``evaluation``: benchmark specs, datasets, mIoU, the evaluation loop and its command line;
- ``training``: the training config, data sources, optimisation and the trainer;
- ``toy``: the toy world and the end-to-end run on it;
- ``apps``: the ``code-seg`` command line, the demo, publishing, checkpoint conversion.

The modules' former flat names (``modeling_code.trainer``, ...) still import for one release, with a
``FutureWarning`` naming the new path (``_moved_modules``).
"""

import importlib
import sys
from typing import Any

from ._moved_modules import install as _install_moved_modules

__version__ = "0.2.0"

_install_moved_modules()

# Imported on first access: the classes (their modules need torch and transformers) and the segmenter stack.
_LAZY_ATTRIBUTES = {
    "CoDeConfig": ".configuration_code",
    "CoDeImageProcessor": ".image_processing_code",
    "CoDeModel": ".modeling_code",
    "CoDeModelOutput": ".modeling_code",
    "CoDePreTrainedModel": ".modeling_code",
    "CoDeSegmentationOutput": ".modeling_code",
    "CoDeWindowOutput": ".modeling_code",
    "InferenceProtocol": ".configuration_code",
    "CoDeProcessor": ".processing_code",
    "CoDeSegmenter": ".predict.segmenter",
    "SegmentationResult": ".predict.segmenter",
    "ZeroShotImageSegmentationPipeline": ".pipeline_code",
}
_registered = False


def register_auto_classes() -> None:
    """Register ``CoDeConfig``/``CoDeModel``/``CoDeImageProcessor``/``CoDeProcessor`` with transformers' Auto classes
    (model type ``code``) and mark them for remote code, and register the ``zero-shot-image-segmentation``
    pipeline, so that ``pipeline(task, model=<a CoDeModel in memory>, processor=...)`` finds it; idempotent.
    ``import modeling_code`` calls it."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoProcessor

    # The class from its module: some transformers 5 releases (5.17 among them) replace the top-level name by a
    # placeholder demanding torchvision when it is absent, which this package does not need.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_code import CoDeConfig
    from .image_processing_code import CoDeImageProcessor
    from .modeling_code import CoDeModel
    from .pipeline_code import PIPELINE_TASK, ZeroShotImageSegmentationPipeline
    from .processing_code import CoDeProcessor

    AutoConfig.register(CoDeConfig.model_type, CoDeConfig, exist_ok=True)
    AutoModel.register(CoDeConfig, CoDeModel, exist_ok=True)
    CoDeConfig.register_for_auto_class()
    CoDeModel.register_for_auto_class("AutoModel")
    AutoImageProcessor.register(CoDeConfig, slow_image_processor_class=CoDeImageProcessor, exist_ok=True)
    AutoProcessor.register(CoDeConfig, CoDeProcessor, exist_ok=True)
    CoDeImageProcessor.register_for_auto_class("AutoImageProcessor")
    CoDeProcessor.register_for_auto_class("AutoProcessor")
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=ZeroShotImageSegmentationPipeline, pt_model=AutoModel, type="multimodal"
    )
    _registered = True


def _deferred_by_the_launcher() -> bool:
    """The ``code-seg`` console script (``code_seg_cli``) imports the package while it is parsing its arguments:
    it registers later, once a command needs a model, so that ``--help`` does not wait for torch."""
    return bool(getattr(sys.modules.get("code_seg_cli"), "deferring_registration", False))


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
        register_auto_classes()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_ATTRIBUTES})


if not _deferred_by_the_launcher():
    register_auto_classes()


__all__ = [
    "CoDeConfig",
    "CoDeImageProcessor",
    "CoDeModel",
    "CoDeModelOutput",
    "CoDePreTrainedModel",
    "CoDeProcessor",
    "CoDeSegmentationOutput",
    "CoDeSegmenter",
    "CoDeWindowOutput",
    "InferenceProtocol",
    "SegmentationResult",
    "ZeroShotImageSegmentationPipeline",
    "register_auto_classes",
]
