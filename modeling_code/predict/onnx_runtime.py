"""CoDe's exported ONNX graphs run in onnxruntime, behind the small surface of ``CoDeModel`` that inference uses.

``code-seg export onnx`` (``modeling_code.apps.onnx_export``) writes a folder holding two graphs, the model's
``config.json``, its processor files and ``onnx_export.json``:

- the text graph (``text_encoder.onnx``): token ids ``input_ids [M, L]`` (any L up to the context length) and
  ``prompted [M]`` -> unit-norm ``text_embeddings [M, C]`` at each row's first EOS. A prompted row carries
  placeholders at positions ``1..n_ctx``, which the graph replaces by the learned prompt context
  (``prompted_token_layout`` lays class names out so); an ordinary row is CLIP's text tower as it is.
- the image graph (``image_segmenter.onnx``): ``pixel_values [B, 3, H, W]`` (H, W multiples of the patch size,
  normalised and padded), ``class_embeddings [N, C]`` and ``kp_class_embeddings [N, C]`` -> the masker's
  ``masks [B, N, 4h, 4w]`` and the KP branch's ``kp_masks [B, N, h, w]``. PAMR refines the masker's masks
  before they are mixed with the KP masks, so the mix stays outside the graph.

``CoDeOnnxModel`` offers what ``inference.encode_vocabulary`` and ``inference.segment_images`` read of a model
(``config``, ``device``, ``dtype``, ``get_class_embeddings``, ``get_template_class_embeddings``,
``segment_window``, ``prepared_for_inference``), so everything else (windows, padding, PAMR, the KP mix, the
background map, the resizes) is the torch path's own code. ``CoDeSegmenter.from_onnx`` builds a segmenter on it.

onnxruntime is imported only when a model is loaded: it is an optional package (the ``export`` extra).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..configuration_code import CoDeConfig
from ..modeling_code import CoDeSegmentationOutput, CoDeWindowOutput, segment_whole_images
from ..processing_code import CoDeProcessor

METADATA_FILE = "onnx_export.json"
EXPORT_FORMAT = "code-seg-onnx"
EXPORT_FORMAT_VERSION = 1
TEXT_GRAPH_FILE = "text_encoder.onnx"
IMAGE_GRAPH_FILE = "image_segmenter.onnx"
TEXT_INPUTS = ("input_ids", "prompted")
TEXT_OUTPUTS = ("text_embeddings",)
IMAGE_INPUTS = ("pixel_values", "class_embeddings", "kp_class_embeddings")
IMAGE_OUTPUTS = ("masks", "kp_masks")
# Padding of the prompt context's positions in a prompted row; the graph writes the context over it.
CONTEXT_PLACEHOLDER_ID = 0
INSTALL_HINT = "pip install 'code-seg[export]' (onnx, onnxscript, onnxruntime)"


def import_onnxruntime():
    """The ``onnxruntime`` module, or an ImportError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"Running an ONNX export needs onnxruntime: {INSTALL_HINT}") from error
    return onnxruntime


# --------------------------------------------------------------------------------------------------------------
# Token layouts the text graph expects
# --------------------------------------------------------------------------------------------------------------
def prompted_token_layout(class_input_ids: torch.Tensor, num_context: int, eos_token_id: int) -> torch.Tensor:
    """Class-name token ids [N, L] laid out as ``CoDePromptLearner`` lays out their word embeddings: [N, L].

    ``[SOS, n_ctx placeholders, the name's tokens, EOS, padding]``: the name keeps ``L - n_ctx - 1`` positions
    after SOS, and a name cut there keeps EOS last.
    """
    length = class_input_ids.shape[1]
    suffix = class_input_ids[:, 1 : length - num_context].clone()
    cut = ~(suffix == eos_token_id).any(1)
    suffix[cut, -1] = eos_token_id
    placeholders = class_input_ids.new_full((class_input_ids.shape[0], num_context), CONTEXT_PLACEHOLDER_ID)
    return torch.cat([class_input_ids[:, :1], placeholders, suffix], dim=1)


def trim_after_last_eos(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Token ids [N, L] without the columns after the latest first-EOS of all rows.

    The text tower is causal, so a row's EOS state never reads the positions after it: the graph does the same
    work for fewer positions.
    """
    eos_positions = (input_ids == eos_token_id).int().argmax(-1)
    return input_ids[:, : int(eos_positions.max()) + 1]


# --------------------------------------------------------------------------------------------------------------
# The export folder
# --------------------------------------------------------------------------------------------------------------
def read_export_metadata(directory: str | os.PathLike) -> dict:
    """``onnx_export.json`` of an export folder, with the folder's files checked.

    Raises:
        FileNotFoundError: no such folder, or it lacks the metadata, a graph, ``config.json``.
        ValueError: the metadata is of another format or of a version this code does not read.
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"ONNX export folder not found: {folder}")
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {METADATA_FILE}: it is not a CoDe ONNX export (make one with "
            "`code-seg export onnx --model MODEL --out FOLDER`)"
        )
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{metadata_path} is not a {EXPORT_FORMAT} file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{metadata_path} has format version {metadata.get('format_version')}; this code-seg reads version "
            f"{EXPORT_FORMAT_VERSION}: export the model again with this version"
        )
    needed = [metadata["text_graph"]["file"], metadata["image_graph"]["file"], "config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"The ONNX export {folder} lacks {', '.join(missing)}: export the model again")
    return metadata


class CoDeOnnxModel:
    """The two graphs of a CoDe ONNX export in onnxruntime sessions, used like a ``CoDeModel`` at inference.

    Runs on the CPU in float32; the outputs are torch tensors, which the shared inference code continues with.

    Args:
        directory: an export folder (``code-seg export onnx``).
        num_threads: threads of each session's operators (``intra_op_num_threads``, with ``inter_op_num_threads``
            1: operators run one after another); default onnxruntime's.
        providers: onnxruntime execution providers; default the CPU.
        session_options: ``onnxruntime.SessionOptions`` for both sessions (optimisation level, spinning,
            profiling, ...); ``num_threads``, when given, sets its thread counts.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(
        self,
        directory: str | os.PathLike,
        num_threads: int | None = None,
        providers: list[str] | None = None,
        session_options=None,
    ) -> None:
        onnxruntime = import_onnxruntime()
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer; got {num_threads}")
        self.directory = Path(directory).expanduser()
        self.metadata = read_export_metadata(self.directory)
        self.config = CoDeConfig.from_pretrained(self.directory)
        options = session_options or onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.text_session = onnxruntime.InferenceSession(
            str(self.directory / self.metadata["text_graph"]["file"]), options, providers=providers
        )
        self.image_session = onnxruntime.InferenceSession(
            str(self.directory / self.metadata["image_graph"]["file"]), options, providers=providers
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> CoDeOnnxModel:
        """``CoDeOnnxModel(directory, **kwargs)``, spelled like the torch model's loading."""
        return cls(directory, **kwargs)

    def eval(self) -> CoDeOnnxModel:
        """Already an inference graph; here so that code written for ``CoDeModel`` runs unchanged."""
        return self

    @contextlib.contextmanager
    def prepared_for_inference(self) -> Iterator[CoDeOnnxModel]:
        """Nothing to prepare: onnxruntime laid the graphs out when their sessions were created."""
        yield self

    # ---------------------------------------------------------------- text side
    def _encode_texts(self, input_ids: torch.Tensor, prompted: bool) -> torch.Tensor:
        eos_token_id = self.metadata["eos_token_id"]
        if prompted:
            input_ids = prompted_token_layout(input_ids, self.metadata["prompt_context_length"], eos_token_id)
        input_ids = trim_after_last_eos(input_ids.cpu(), eos_token_id)
        feeds = {
            "input_ids": input_ids.numpy().astype(np.int64),
            "prompted": np.full(input_ids.shape[0], prompted, dtype=bool),
        }
        (embeddings,) = self.text_session.run(list(TEXT_OUTPUTS), feeds)
        return torch.from_numpy(embeddings)

    def get_class_embeddings(self, class_input_ids: torch.Tensor) -> torch.Tensor:
        """Prompted class embeddings for the masker: [N_cls, L] -> [N_cls, C] (``CoDeModel.get_class_embeddings``)."""
        return self._encode_texts(class_input_ids, prompted=True)

    def get_template_class_embeddings(self, template_input_ids: torch.Tensor, num_templates: int) -> torch.Tensor:
        """Template-ensembled CLIP class embeddings for the KP branch: [N_cls * T, L] (class-major) -> [N_cls, C].

        The graph embeds every prompt; the mean over a class's templates, re-normalised, is taken here.
        """
        embeddings = self._encode_texts(template_input_ids, prompted=False)
        return F.normalize(embeddings.view(-1, num_templates, embeddings.shape[-1]).mean(1), dim=-1)

    # ---------------------------------------------------------------- whole images
    def __call__(self, pixel_values, **inputs) -> CoDeSegmentationOutput:
        """``CoDeModel.forward`` at inference, on the two graphs: the processor's output goes straight in."""
        return segment_whole_images(self, pixel_values, **inputs)

    # ---------------------------------------------------------------- image side
    def segment_window(
        self,
        pixel_values: torch.Tensor,
        class_embeddings: torch.Tensor,
        kp_class_embeddings: torch.Tensor | None = None,
    ) -> CoDeWindowOutput:
        """Soft masks of windows padded to multiples of the patch size (``CoDeModel.segment_window``).

        pixel_values [B, 3, H, W]; class_embeddings [N_cls, C]; kp_class_embeddings [N_cls, C] or None (no KP
        masks: the graph's KP output is not returned).
        """
        patch = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(f"Windows must be padded to multiples of the patch size {patch}; got {height}x{width}")
        with_kp = kp_class_embeddings is not None
        feeds = {
            "pixel_values": pixel_values.detach().float().cpu().numpy(),
            "class_embeddings": class_embeddings.detach().float().cpu().numpy(),
            # the graph always has a KP input; without KP embeddings the class embeddings stand in for them
            "kp_class_embeddings": (kp_class_embeddings if with_kp else class_embeddings).detach().float().cpu().numpy(),
        }
        masks, kp_masks = self.image_session.run(list(IMAGE_OUTPUTS), feeds)
        return CoDeWindowOutput(
            masks=torch.from_numpy(masks), kp_masks=torch.from_numpy(kp_masks) if with_kp else None
        )


def load_onnx_model_and_processor(
    directory: str | os.PathLike, num_threads: int | None = None
) -> tuple[CoDeOnnxModel, CoDeProcessor]:
    """The onnxruntime model and the processor of an export folder (both checked before the sessions start)."""
    read_export_metadata(directory)
    processor = CoDeProcessor.from_pretrained(Path(directory).expanduser())
    return CoDeOnnxModel(directory, num_threads=num_threads), processor


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "IMAGE_GRAPH_FILE",
    "IMAGE_INPUTS",
    "IMAGE_OUTPUTS",
    "METADATA_FILE",
    "TEXT_GRAPH_FILE",
    "TEXT_INPUTS",
    "TEXT_OUTPUTS",
    "CoDeOnnxModel",
    "import_onnxruntime",
    "load_onnx_model_and_processor",
    "prompted_token_layout",
    "read_export_metadata",
    "trim_after_last_eos",
]
