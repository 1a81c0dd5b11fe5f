"""code-seg: CoDe open-vocabulary semantic segmentation on Hugging Face transformers.

Importing the package registers ``CoDeConfig``/``CoDeModel`` (model type ``code``) with the Auto classes, and
marks them for remote code so a saved directory also loads with ``trust_remote_code=True`` without the package.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_code import CoDeConfig
from .image_processing_code import CoDeImageProcessor
from .modeling_code import CoDeModel, CoDeModelOutput, CoDePreTrainedModel, CoDeWindowOutput
from .processing_code import CoDeProcessor

__version__ = "0.1.0"

AutoConfig.register(CoDeConfig.model_type, CoDeConfig, exist_ok=True)
AutoModel.register(CoDeConfig, CoDeModel, exist_ok=True)
CoDeConfig.register_for_auto_class()
CoDeModel.register_for_auto_class("AutoModel")
AutoImageProcessor.register(CoDeConfig, slow_image_processor_class=CoDeImageProcessor, exist_ok=True)
AutoProcessor.register(CoDeConfig, CoDeProcessor, exist_ok=True)
CoDeImageProcessor.register_for_auto_class("AutoImageProcessor")
CoDeProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CoDeConfig",
    "CoDeImageProcessor",
    "CoDeModel",
    "CoDeModelOutput",
    "CoDePreTrainedModel",
    "CoDeProcessor",
    "CoDeWindowOutput",
]
