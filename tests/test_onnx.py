"""ONNX export (``code-seg export onnx``) and the onnxruntime segmenter against the torch model, on a tiny CoDe
whose CLIP has ViT-B/16's geometry (patch 16, 224-pixel position grid) and small widths.

One export per module, made through the command line; parity in float32 within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CODE_OVERRIDES, make_tiny_clip_config
from PIL import Image
from transformers import CLIPModel

from modeling_code import CoDeImageProcessor, CoDeModel, CoDeProcessor, ops
from modeling_code.apps.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, build_parser, main
from modeling_code.apps.onnx_export import AlwaysInterpolatedPositions, export_onnx
from modeling_code.inference import encode_vocabulary
from modeling_code.predict.onnx_runtime import (
    CoDeOnnxModel,
    import_onnxruntime,
    prompted_token_layout,
    read_export_metadata,
)
from modeling_code.predict.segmenter import CoDeSegmenter
from modeling_code.templates import get_templates

TOLERANCE = 1e-4
PATCH = 16
FIFTY_NAMES = [f"{color} {noun}" for color in ("red", "green", "blue", "white", "black")
               for noun in ("cat", "dog", "sofa", "table", "car", "bus", "tree", "horse", "bird", "boat")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny CoDe on a patch-16, 224-pixel CLIP, its decoder's convolutions switched on (gate 0 at
    initialisation leaves them out of the masks)."""
    clip_dir = tmp_path_factory.mktemp("clip_patch16")
    torch.manual_seed(0)
    CLIPModel(make_tiny_clip_config(tiny_tokenizer, image_size=224, patch_size=PATCH)).save_pretrained(clip_dir)
    tiny_tokenizer.save_pretrained(clip_dir)
    model = CoDeModel.from_clip(str(clip_dir), tokenizer=tiny_tokenizer, **TINY_CODE_OVERRIDES)
    with torch.no_grad():
        for gate, block in zip((0.8, -0.6), model.masker.decoder.blocks):
            block.gate.fill_(gate)
    directory = tmp_path_factory.mktemp("code_patch16")
    model.save_pretrained(directory)
    CoDeProcessor(CoDeImageProcessor(), tiny_tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def export_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_export") / "export"
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(out)]) == EXIT_OK
    return out


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return CoDeModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def onnx_model(export_dir):
    return CoDeOnnxModel.from_pretrained(export_dir, num_threads=2)


@pytest.fixture(scope="module")
def processor(model_dir):
    return CoDeProcessor.from_pretrained(model_dir)


def unit_rows(count: int, width: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, width, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------------------ the folder
def test_export_folder_holds_both_graphs_config_processor_and_metadata(export_dir, torch_model):
    config = torch_model.config
    for name in ("text_encoder.onnx", "image_segmenter.onnx", "config.json", "onnx_export.json", "tokenizer.json",
                 "processor_config.json"):
        assert (export_dir / name).is_file(), name
    metadata = json.loads((export_dir / "onnx_export.json").read_text())
    assert metadata == read_export_metadata(export_dir)
    templates = get_templates(config.inference_template_set)
    assert metadata["template_set"] == config.inference_template_set == "custom"
    assert metadata["num_templates"] == len(templates) and metadata["templates"] == list(templates)
    assert metadata["patch_size"] == PATCH and metadata["embedding_size"] == 32
    assert metadata["context_length"] == 77 and metadata["prompt_context_length"] == 16
    assert metadata["eos_token_id"] == config.clip_config.text_config.eos_token_id
    assert metadata["protocol"]["window_size"] == config.window_size == 448
    assert metadata["protocol"]["pamr_dilations"] == list(config.pamr_dilations)
    assert metadata["protocol"]["kp_weight"] == config.kp_weight
    assert 0 <= metadata["export_check"]["image_max_abs_difference"] <= TOLERANCE
    assert 0 <= metadata["export_check"]["text_max_abs_difference"] <= TOLERANCE


def test_graphs_have_dynamic_batch_sizes_and_class_counts(export_dir):
    onnxruntime = import_onnxruntime()
    image = onnxruntime.InferenceSession(str(export_dir / "image_segmenter.onnx"))
    text = onnxruntime.InferenceSession(str(export_dir / "text_encoder.onnx"))
    inputs = {node.name: node.shape for node in [*image.get_inputs(), *text.get_inputs()]}
    batch, channels, height, width = inputs["pixel_values"]
    assert channels == 3 and all(isinstance(size, str) for size in (batch, height, width))
    assert height != width and height.startswith(f"{PATCH}*") and width.startswith(f"{PATCH}*")
    assert isinstance(inputs["class_embeddings"][0], str) and inputs["class_embeddings"][1] == 32
    assert inputs["class_embeddings"][0] == inputs["kp_class_embeddings"][0]
    assert all(isinstance(size, str) for size in inputs["input_ids"])
    assert [node.name for node in image.get_outputs()] == ["masks", "kp_masks"]


# ------------------------------------------------------------------------------------------------ image graph
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("num_classes", [1, 3, 50])
@pytest.mark.parametrize("size", [(224, 224), (448, 448), (448, 224), (208, 144)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_window_masks_equal_torch(torch_model, onnx_model, size, num_classes, batch):
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(num_classes))
    class_embeddings, kp_class_embeddings = unit_rows(num_classes, 32, 1), unit_rows(num_classes, 32, 2)
    expected = torch_model.segment_window(pixels, class_embeddings, kp_class_embeddings)
    got = onnx_model.segment_window(pixels, class_embeddings, kp_class_embeddings)
    grid = (size[0] // PATCH, size[1] // PATCH)
    assert got.masks.shape == (batch, num_classes, 4 * grid[0], 4 * grid[1]) and got.masks.dtype == torch.float32
    assert got.kp_masks.shape == (batch, num_classes, *grid)
    torch.testing.assert_close(got.masks, expected.masks, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got.kp_masks, expected.kp_masks, rtol=0, atol=TOLERANCE)
    assert float(got.masks.std()) > 0.01  # not a flat map that would equal anything


@pytest.mark.parametrize("shape", [(2, 3, 4, 3, 3, 5), (1, 1, 1, 3, 3, 4), (1, 2, 1, 3, 3, 3), (1, 28, 13, 3, 3, 8)])
def test_the_phase_sums_traced_for_export_equal_the_eager_ones(shape, monkeypatch):
    taps = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    eager = ops.phase_sum_fwd(taps)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(ops.phase_sum_fwd(taps), eager)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (16, 48), (32, 80)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_windows_of_one_and_two_patches_equal_torch(torch_model, onnx_model, size):
    # torch.export guards the traced program to sides of 3 patches or more; the ONNX graph has no such guard
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    class_embeddings, kp_class_embeddings = unit_rows(3, 32, 3), unit_rows(3, 32, 4)
    expected = torch_model.segment_window(pixels, class_embeddings, kp_class_embeddings)
    got = onnx_model.segment_window(pixels, class_embeddings, kp_class_embeddings)
    torch.testing.assert_close(got.masks, expected.masks, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got.kp_masks, expected.kp_masks, rtol=0, atol=TOLERANCE)


def test_a_window_without_kp_embeddings_has_no_kp_masks(torch_model, onnx_model):
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    class_embeddings = unit_rows(3, 32, 5)
    got = onnx_model.segment_window(pixels, class_embeddings)
    assert got.kp_masks is None
    torch.testing.assert_close(got.masks, torch_model.segment_window(pixels, class_embeddings).masks,
                               rtol=0, atol=TOLERANCE)


def test_a_window_not_padded_to_the_patch_size_is_refused(onnx_model):
    with pytest.raises(ValueError, match="multiples of the patch size 16; got 224x200"):
        onnx_model.segment_window(torch.zeros(1, 3, 224, 200), unit_rows(2, 32, 0))


def test_always_interpolated_positions_equal_clip_at_every_size(torch_model):
    embeddings = torch_model.clip.vision_model.embeddings
    interpolated = AlwaysInterpolatedPositions(embeddings)
    for size in [(224, 224), (448, 448), (448, 224), (32, 16)]:
        pixels = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = embeddings(pixels, interpolate_pos_encoding=True)
            torch.testing.assert_close(interpolated(pixels), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ text graph
def test_prompted_token_layout_is_the_prompt_learners(torch_model, processor):
    eos = torch_model.config.clip_config.text_config.eos_token_id
    names = ["cat", "red sofa", "red dog " * 40]  # the last is cut, keeping EOS last
    token_ids = processor.tokenize(names, 77)
    laid_out = prompted_token_layout(token_ids, 16, eos)
    token_embedding = torch_model.clip.text_model.embeddings.token_embedding
    with torch.no_grad():
        embeddings, eos_index = torch_model.prompt_learner(token_ids, token_embedding)
        words = token_embedding(laid_out)
    assert laid_out.shape == token_ids.shape and (laid_out[:, 1:17] == 0).all()
    assert torch.equal((laid_out == eos).int().argmax(1), eos_index)
    assert int(laid_out[2, -1]) == eos
    torch.testing.assert_close(words[:, 17:], embeddings[:, 17:], rtol=0, atol=0)
    torch.testing.assert_close(words[:, :1], embeddings[:, :1], rtol=0, atol=0)


@pytest.mark.parametrize("names", [["cat"], ["cat", "sofa", "background", "red dog " * 40], FIFTY_NAMES],
                         ids=["1", "3+background+long", "50"])
def test_vocabulary_embeddings_equal_torch(torch_model, onnx_model, processor, names):
    expected = encode_vocabulary(torch_model, processor, names, with_kp_embeddings=True)
    got = encode_vocabulary(onnx_model, processor, names, with_kp_embeddings=True)
    assert got.class_names == expected.class_names and got.background_index == expected.background_index
    assert got.class_embeddings.shape == expected.class_embeddings.shape
    torch.testing.assert_close(got.class_embeddings, expected.class_embeddings, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(got.kp_class_embeddings, expected.kp_class_embeddings, rtol=0, atol=TOLERANCE)


# ------------------------------------------------------------------------------------------------ whole images
def test_whole_image_label_maps_equal_torch_except_at_near_ties(model_dir, export_dir):
    torch_segmenter = CoDeSegmenter.from_pretrained(model_dir)
    onnx_segmenter = CoDeSegmenter.from_onnx(export_dir, num_threads=2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for height, width in [(375, 500), (120, 90)]]
    classes = ["cat", "sofa", "background", "dog"]
    for image, expected, got in zip(images, torch_segmenter(images, classes), onnx_segmenter(images, classes)):
        assert got.scores.shape == expected.scores.shape
        np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=TOLERANCE)
        resized = F.interpolate(torch.from_numpy(expected.scores)[None], size=(image.height, image.width),
                                mode="bilinear", align_corners=False)[0]
        top_two = resized.topk(2, dim=0).values
        near_tie = (top_two[0] - top_two[1] < TOLERANCE).numpy()
        differs = got.label_map != expected.label_map
        assert not (differs & ~near_tie).any()
        assert len(expected.present_classes) > 1  # a map of one class would agree trivially


# ------------------------------------------------------------------------------------------------ refusals
def test_the_runtime_names_what_is_wrong_with_a_folder(export_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX export folder not found"):
        CoDeOnnxModel(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"has no onnx_export\.json: it is not a CoDe ONNX export"):
        CoDeOnnxModel(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / "image_segmenter.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks image_segmenter\.onnx"):
        CoDeOnnxModel(copy)
    metadata = json.loads((copy / "onnx_export.json").read_text())
    (copy / "onnx_export.json").write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99; this code-seg reads version 1"):
        CoDeSegmenter.from_onnx(copy)


def test_export_refuses_a_model_that_is_not_float32(torch_model, processor, tmp_path):
    half = CoDeModel(torch_model.config).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"float32 model on the CPU \(model.float\(\).cpu\(\)\); got torch.bfloat16"):
        export_onnx(half, processor, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_export_command_names_a_missing_model_and_missing_packages(tmp_path, capsys, monkeypatch):
    assert main(["export", "onnx", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert "code-seg export: error: cannot export the model" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxscript" else find_spec(name))
    assert main(["export", "onnx", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert "needs onnxscript: pip install 'code-seg[export]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "tflite", "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2


def test_the_export_command_reports_a_graph_that_fails_its_check(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modeling_code.apps.onnx_export.EXPORT_CHECK_TOLERANCE", -1.0)  # nothing passes
    out = tmp_path / "export"
    assert main(["export", "onnx", "--model", str(model_dir), "--out", str(out)]) == EXIT_SOME_FAILED
    error = capsys.readouterr().err
    assert "code-seg export: error: text_encoder.onnx differs from the torch model by" in error
    assert f"left in {out} for inspection" in error and (out / "text_encoder.onnx").is_file()


def test_the_export_command_takes_out_and_output_dir_alike():
    parser = build_parser()
    for spelling in ("--out", "--output_dir", "--output-dir"):
        args = parser.parse_args(["export", "onnx", "--model", "m", spelling, "exported"])
        assert args.out == Path("exported") and args.model == "m" and args.format == "onnx"


def test_num_threads_sets_both_sessions_thread_counts_in_the_given_options(export_dir):
    options = import_onnxruntime().SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = CoDeOnnxModel(export_dir, num_threads=3, session_options=options)
    for session in (model.text_session, model.image_session):
        used = session.get_session_options()
        assert used.intra_op_num_threads == 3 and used.inter_op_num_threads == 1
        assert used.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_onnx_model_takes_the_processors_output_as_the_torch_model_does(torch_model, onnx_model, processor):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    inputs = processor(images=image, text=["cat", "background", "dog"], return_tensors="pt")
    expected = torch_model(**inputs)
    outputs = onnx_model(**inputs)
    torch.testing.assert_close(outputs.scores, expected.scores, atol=1e-4, rtol=0)
    assert outputs.original_sizes == expected.original_sizes == [(70, 90)]
