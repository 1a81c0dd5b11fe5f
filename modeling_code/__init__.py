"""code-seg: CoDe open-vocabulary semantic segmentation on Hugging Face transformers.

Importing the package registers ``CoDeConfig``/``CoDeModel`` (model type ``code``) with the Auto classes, and
marks them for remote code so a saved directory also loads with ``trust_remote_code=True`` without the package.
"""

from transformers import AutoConfig, AutoModel

from .configuration_code import CoDeConfig
from .modeling_code import CoDeModel, CoDeModelOutput, CoDePreTrainedModel, CoDeWindowOutput

__version__ = "0.1.0"

AutoConfig.register(CoDeConfig.model_type, CoDeConfig, exist_ok=True)
AutoModel.register(CoDeConfig, CoDeModel, exist_ok=True)
CoDeConfig.register_for_auto_class()
CoDeModel.register_for_auto_class("AutoModel")

__all__ = ["CoDeConfig", "CoDeModel", "CoDeModelOutput", "CoDePreTrainedModel", "CoDeWindowOutput"]
