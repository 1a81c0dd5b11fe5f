"""Loading a saved model for prediction, with every unusable source named before anything heavy runs.

``resolve_model_source`` tells a local folder from a Hub id: a name that looks like a path (absolute, ``./``,
``../``, ``~``, or inside an existing folder) and does not exist is a missing folder, not a malformed repo id; a
folder must hold ``config.json``. ``resolve_device`` turns ``auto``/``cpu``/``cuda[:N]``/``mps`` into a device
that exists. ``load_model_and_processor`` loads the processor first (it refuses incomplete folders at once), then
the weights, and names a damaged weights file instead of raising safetensors' own error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..configuration_code import CoDeConfig
from ..modeling_code import CoDeModel
from ..processing_code import CoDeProcessor

AUTO_DEVICE = "auto"
WEIGHTS_FILE = "model.safetensors"


def _looks_like_a_path(source: str) -> bool:
    """Absolute, explicitly relative, home-relative, or inside an existing folder (``outputs/model``)."""
    if os.path.isabs(source) or source.startswith(("./", "../", ".\\", "..\\", "~")) or source in (".", ".."):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def resolve_model_source(source: str | os.PathLike) -> str:
    """A model source as ``from_pretrained`` takes it: an existing model folder (``~`` expanded) or a Hub id.

    Raises:
        ValueError: an empty source.
        FileNotFoundError: a path that does not exist, or a folder without ``config.json``.
        NotADirectoryError: a path to a file.
    """
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else None
    if text is None:
        raise ValueError(f"A model is a folder path or a Hub id (a string), not {type(source).__name__}")
    if not text:
        raise ValueError("No model given: pass a saved CoDe model folder or a Hub id such as 'user/code-seg-model'")
    local = os.path.expanduser(text)
    if os.path.exists(local):
        if not os.path.isdir(local):
            raise NotADirectoryError(f"{text} is a file, not a model folder: pass the folder that holds it")
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(
                f"The folder {text} has no config.json: it is not a saved CoDe model (a model folder holds "
                f"config.json, {WEIGHTS_FILE} and the processor files)"
            )
        return local
    if _looks_like_a_path(text):
        absolute = str(Path(local).absolute())
        raise FileNotFoundError(f"Model folder not found: {text}" + (f" ({absolute})" if absolute != text else ""))
    return text


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to exist.

    Raises:
        ValueError: an unknown device name, or one this machine or this build of torch does not have.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == AUTO_DEVICE:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"CUDA is not available ({built}, torch {torch.__version__}): use cpu or auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"There is no {resolved}: this machine has {count} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("The mps device (Apple GPUs) is not available here: use cpu or auto")
    return resolved


def load_model_and_processor(
    source: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[CoDeModel, CoDeProcessor]:
    """The model (``dtype``, default float32, on ``device``) and processor saved at ``source`` (folder or Hub id).

    Raises:
        ValueError / OSError: an unusable source or device (see ``resolve_model_source`` and ``resolve_device``),
            incomplete processor files, or a damaged weights file.
    """
    resolved = resolve_model_source(source)
    target = resolve_device(device)
    if not os.path.isdir(resolved):  # a Hub id: its config first, whose error says whether the id or the network failed
        try:
            CoDeConfig.get_config_dict(resolved)
        except OSError as error:
            raise OSError(f"{source} is not a local folder, and as a Hub id it cannot be loaded: {error}") from error
    processor = CoDeProcessor.from_pretrained(resolved)
    try:
        model = CoDeModel.from_pretrained(resolved, dtype=dtype or torch.float32)
    except SafetensorError as error:
        raise OSError(
            f"The weights file {WEIGHTS_FILE} of {source} is corrupt or truncated ({error}): download or save the "
            "model again"
        ) from error
    return model.to(target), processor


__all__ = ["AUTO_DEVICE", "load_model_and_processor", "resolve_device", "resolve_model_source"]
