"""Export of a CoDe model to ONNX: a text graph and an image graph with dynamic batch, sizes and class counts.

    code-seg export onnx --model DIR --out DIR

``export_onnx`` writes the folder that ``predict.onnx_runtime.CoDeOnnxModel`` runs (the graphs' contract is
described there), with torch's exporter (``torch.onnx.export(..., dynamo=True)``, i.e. ``torch.export``).
The graphs are traced from modules that reach the model's own code by its traceable paths:

- ``OnnxTextEncoder``: CLIP's causal text tower over all given positions (``CoDeModel.encode_text_embeddings``
  with ``cut_at_eos=False``), the prompt context written over the placeholders of prompted rows by masks, not
  by the packing and boolean writes of the torch path, whose shapes depend on the data;
- ``OnnxImageSegmenter``: ``CoDeModel.segment_window(..., banded=False)``, the masker in one batched pass
  (row bands and the per-window loop would fix the window size), with CLIP's position embeddings always
  interpolated (``AlwaysInterpolatedPositions``).

After writing, each graph is run in onnxruntime on the example inputs and compared with the torch path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from ..modeling_code import CoDeModel
from ..predict.onnx_runtime import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    IMAGE_GRAPH_FILE,
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    INSTALL_HINT,
    METADATA_FILE,
    TEXT_GRAPH_FILE,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    import_onnxruntime,
    prompted_token_layout,
    trim_after_last_eos,
)
from ..processing_code import CoDeProcessor
from ..templates import get_templates

# Largest difference between onnxruntime and torch on the example inputs that the export accepts (float32).
EXPORT_CHECK_TOLERANCE = 1e-4
# Example window of 3 x 4 patches: every dynamic dimension of an example must be >= 2, or torch.export fixes it
# to its value, and a side of 2 patches would fix the masker's phase sums, which shift maps by one row.
EXAMPLE_GRID = (3, 4)
EXAMPLE_CLASS_NAMES = ("cat", "red sofa", "dog")


# --------------------------------------------------------------------------------------------------------------
# Traceable modules
# --------------------------------------------------------------------------------------------------------------
class AlwaysInterpolatedPositions(nn.Module):
    """CLIP's vision embeddings with the position grid always resized (bicubic) to the input's patch grid.

    transformers resizes it only when the grid differs from the pretrained one; ``torch.export`` turns that test
    into a guard that ties the graph to one side of it. Bicubic resizing to the same size is the identity, so
    always resizing gives the same values at every size. Shares the parameters of ``embeddings``.
    """

    def __init__(self, embeddings: CLIPVisionEmbeddings):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = True) -> torch.Tensor:
        embeddings = self.embeddings
        batch, _, height, width = pixel_values.shape
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        tokens = torch.cat(
            [embeddings.class_embedding.expand(batch, 1, -1), patches.flatten(2).transpose(1, 2)], dim=1
        )
        positions = embeddings.position_embedding.weight
        side = round((positions.shape[0] - 1) ** 0.5)
        grid = positions[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        size = (height // embeddings.patch_size, width // embeddings.patch_size)
        grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
        return tokens + torch.cat([positions[:1], grid.flatten(2).transpose(1, 2)[0]])[None]


@contextlib.contextmanager
def interpolated_positions(model: CoDeModel) -> Iterator[CoDeModel]:
    """Context in which the model's CLIP vision tower uses ``AlwaysInterpolatedPositions``."""
    vision = model.clip.vision_model
    original = vision.embeddings
    vision.embeddings = AlwaysInterpolatedPositions(original)
    try:
        yield model
    finally:
        vision.embeddings = original


class OnnxTextEncoder(nn.Module):
    """input_ids [M, L], prompted [M] (bool) -> unit-norm text embeddings [M, C] at each row's first EOS.

    In a prompted row (``prompted_token_layout``), positions ``1..n_ctx`` take the learned prompt context
    instead of their token embeddings: ``CoDeModel.get_class_embeddings``. Any other row is CLIP's own text
    embedding: ``CoDeModel.encode_text``.
    """

    def __init__(self, model: CoDeModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, prompted: torch.Tensor) -> torch.Tensor:
        model = self.model
        word_embeddings = model.clip.text_model.embeddings.token_embedding(input_ids)
        context = model.prompt_learner.context.to(word_embeddings.dtype)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        in_context = (positions >= 1) & (positions <= context.shape[0])
        # row p of the table holds context vector p - 1 (row 0: unused), read by position without slicing
        context_table = torch.cat([context.new_zeros(1, context.shape[1]), context])
        context_rows = context_table[torch.where(in_context, positions, 0)]
        use_context = (prompted[:, None] & in_context[None])[..., None]
        embeddings = torch.where(use_context, context_rows, word_embeddings)
        return model.encode_text_embeddings(embeddings, model.eos_positions(input_ids), cut_at_eos=False)


class OnnxImageSegmenter(nn.Module):
    """pixel_values, class_embeddings, kp_class_embeddings -> (masks [B, N, 4h, 4w], kp_masks [B, N, h, w])."""

    def __init__(self, model: CoDeModel):
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor, kp_class_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model.segment_window(pixel_values, class_embeddings, kp_class_embeddings, banded=False)
        return outputs.masks, outputs.kp_masks


# --------------------------------------------------------------------------------------------------------------
# Example inputs and dynamic shapes
# --------------------------------------------------------------------------------------------------------------
def _text_examples(model: CoDeModel, processor: CoDeProcessor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the graph's input_ids: prompted and ordinary rows mixed, trimmed after the last EOS; their ``prompted``
    flags; the names' token ids as the torch model takes them)."""
    config = model.config
    eos_token_id = config.clip_config.text_config.eos_token_id
    token_ids = processor.tokenize(list(EXAMPLE_CLASS_NAMES), config.context_length)
    prompted = torch.tensor([True, False, True])
    laid_out = prompted_token_layout(token_ids, config.prompt_context_length, eos_token_id)
    input_ids = trim_after_last_eos(torch.where(prompted[:, None], laid_out, token_ids), eos_token_id)
    return input_ids, prompted, token_ids


def _image_examples(model: CoDeModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two windows and three classes; distinct class and KP embeddings (the exporter merges an input passed
    twice into one graph input)."""
    generator = torch.Generator().manual_seed(0)
    patch = model.config.patch_size
    width = model.config.clip_config.projection_dim
    pixel_values = torch.randn(2, 3, EXAMPLE_GRID[0] * patch, EXAMPLE_GRID[1] * patch, generator=generator)
    class_embeddings = F.normalize(torch.randn(3, width, generator=generator), dim=-1)
    kp_class_embeddings = F.normalize(torch.randn(3, width, generator=generator), dim=-1)
    return pixel_values, class_embeddings, kp_class_embeddings


def _text_dynamic_shapes(model: CoDeModel) -> dict:
    from torch.export import Dim

    rows = Dim("num_texts")
    positions = Dim("num_positions", max=model.config.context_length)
    return {"input_ids": {0: rows, 1: positions}, "prompted": {0: rows}}


def _image_dynamic_shapes(model: CoDeModel) -> dict:
    from torch.export import Dim

    patch = model.config.patch_size
    classes = Dim("num_classes")
    return {
        "pixel_values": {0: Dim("batch"), 2: patch * Dim("height_patches"), 3: patch * Dim("width_patches")},
        "class_embeddings": {0: classes},
        "kp_class_embeddings": {0: classes},
    }


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------
def _export_graph(module: nn.Module, examples: tuple, dynamic_shapes: dict, input_names, output_names, path: Path):
    try:
        program = torch.onnx.export(
            module.eval(),  # a new wrapper is in training mode, which the exporter warns of
            examples,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=list(input_names),
            output_names=list(output_names),
            verbose=False,
        )
    except ImportError as error:
        raise ImportError(f"Exporting to ONNX needs onnx and onnxscript: {INSTALL_HINT}") from error
    program.save(str(path))
    return program


class ExportCheckError(RuntimeError):
    """A written graph does not reproduce the torch model on the example inputs."""


def _check_graph(path: Path, feeds: dict, expected: dict[str, torch.Tensor]) -> float:
    """Run a written graph in onnxruntime; its largest difference from ``expected`` (refused above the tolerance)."""
    onnxruntime = import_onnxruntime()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(expected), {name: value.numpy() for name, value in feeds.items()})
    difference = max(
        float((torch.from_numpy(output) - reference).abs().max()) for output, reference in zip(outputs, expected.values())
    )
    if not difference <= EXPORT_CHECK_TOLERANCE:
        raise ExportCheckError(
            f"{path.name} differs from the torch model by {difference:.3g} on the example inputs "
            f"(tolerated: {EXPORT_CHECK_TOLERANCE}); the export is not usable"
        )
    return difference


def _protocol(config) -> dict:
    """The inference protocol settings another runtime needs to reproduce the whole-image protocol."""
    names = (
        "inference_short_side", "inference_max_long_side", "window_size", "window_stride", "use_pamr",
        "pamr_iterations", "pamr_dilations", "kp_weight", "background_threshold",
    )
    return {name: getattr(config, name) for name in names}


@torch.no_grad()
def export_onnx(model: CoDeModel, processor: CoDeProcessor, output_dir: str | os.PathLike) -> dict:
    """Write the ONNX export of ``model`` (float32, on the CPU) to ``output_dir`` (created if missing); returns
    its metadata.

    The folder holds ``text_encoder.onnx``, ``image_segmenter.onnx``, the model's ``config.json``, the processor
    files and ``onnx_export.json`` (graph files and names, token ids, template set and templates, patch size,
    the inference protocol, the check's differences).

    Raises:
        ValueError: the model is not float32 on the CPU.
        ImportError: onnx, onnxscript or onnxruntime is missing.
        ExportCheckError: a written graph does not reproduce the torch model on the example inputs.
    """
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError(
            f"Export a float32 model on the CPU (model.float().cpu()); got {model.dtype} on {model.device}"
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    config = model.config
    eos_token_id = config.clip_config.text_config.eos_token_id

    input_ids, prompted, token_ids = _text_examples(model, processor)
    text_examples = (input_ids, prompted)
    _export_graph(OnnxTextEncoder(model), text_examples, _text_dynamic_shapes(model), TEXT_INPUTS, TEXT_OUTPUTS,
                  output_dir / TEXT_GRAPH_FILE)
    expected_text = torch.where(
        prompted[:, None], model.get_class_embeddings(token_ids), model.encode_text(token_ids)
    )
    text_difference = _check_graph(output_dir / TEXT_GRAPH_FILE, dict(zip(TEXT_INPUTS, text_examples)),
                                   {TEXT_OUTPUTS[0]: expected_text})

    image_examples = _image_examples(model)
    with interpolated_positions(model):
        _export_graph(OnnxImageSegmenter(model), image_examples, _image_dynamic_shapes(model), IMAGE_INPUTS,
                      IMAGE_OUTPUTS, output_dir / IMAGE_GRAPH_FILE)
    reference = model.segment_window(*image_examples)
    image_difference = _check_graph(output_dir / IMAGE_GRAPH_FILE, dict(zip(IMAGE_INPUTS, image_examples)),
                                    dict(zip(IMAGE_OUTPUTS, (reference.masks, reference.kp_masks))))

    config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    templates = get_templates(config.inference_template_set)
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "exported_with": {"torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)"},
        "text_graph": {"file": TEXT_GRAPH_FILE, "inputs": list(TEXT_INPUTS), "outputs": list(TEXT_OUTPUTS)},
        "image_graph": {"file": IMAGE_GRAPH_FILE, "inputs": list(IMAGE_INPUTS), "outputs": list(IMAGE_OUTPUTS)},
        "patch_size": config.patch_size,
        "embedding_size": config.clip_config.projection_dim,
        "context_length": config.context_length,
        "prompt_context_length": config.prompt_context_length,
        "eos_token_id": eos_token_id,
        "template_set": config.inference_template_set,
        "num_templates": len(templates),
        "templates": list(templates),
        "protocol": _protocol(config),
        "export_check": {"text_max_abs_difference": text_difference, "image_max_abs_difference": image_difference},
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def export_onnx_from_pretrained(source: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """``export_onnx`` of a saved model (a folder or a Hub id), loaded in float32 on the CPU."""
    from ..predict.loading import load_model_and_processor

    model, processor = load_model_and_processor(source, dtype=torch.float32, device="cpu")
    return export_onnx(model, processor, output_dir)


__all__ = [
    "EXPORT_CHECK_TOLERANCE",
    "AlwaysInterpolatedPositions",
    "OnnxImageSegmenter",
    "OnnxTextEncoder",
    "export_onnx",
    "export_onnx_from_pretrained",
    "interpolated_positions",
]
