"""code-seg: CoDe open-vocabulary semantic segmentation on Hugging Face transformers."""

__version__ = "0.1.0"
