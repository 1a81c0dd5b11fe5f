"""The embedded default end to end, in miniature: world, CLIP pretraining, CoDe training, evaluation, overlay."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
from helpers import grid_cell
from PIL import Image

from modeling_code.apps.demo import load_demo_model, predict, resolve_model_source
from modeling_code.evaluation.runner import with_inference_settings
from modeling_code.predict.segmenter import CoDeSegmenter
from modeling_code.predict.visualization import colorize, palette, title_band_height, upscale
from modeling_code.toy.end_to_end import COMPARISON_CELL_SIZE, COMPARISON_FILE, COMPARISON_ROWS
from modeling_code.toy.world import TOY_CLASSES

pytestmark = pytest.mark.slow


def test_miniature_pipeline_runs_every_stage(quick_toy_run, tmp_path_factory):
    output_dir, summary = quick_toy_run

    world = datasets.load_from_disk(str(output_dir / "world"))
    assert {split: len(world[split]) for split in world} == {"train": 48, "validation": 8, "test": 8}
    assert (output_dir / "clip" / "model.safetensors").exists() and (output_dir / "clip" / "vocab.json").exists()
    for run in ("code_model", "tcl_only_model"):
        assert (output_dir / run / "model.safetensors").exists()
        assert json.loads((output_dir / run / "training_summary.json").read_text())["steps"] == 2
    tcl_config = json.loads((output_dir / "tcl_only_model" / "config.json").read_text())
    assert tcl_config["loss_hcl_weight"] == 0.0 and tcl_config["loss_text_segmentation_weight"] == 0.0
    code_config = json.loads((output_dir / "code_model" / "config.json").read_text())
    assert code_config["loss_hcl_weight"] == 0.5
    # the toy recipe leaves same-noun rows out of the contrastive negatives of both models
    assert code_config["exclude_same_noun_negatives"] and tcl_config["exclude_same_noun_negatives"]
    # the classes of its world, for the demo's preset wherever the model is loaded from
    assert code_config["class_vocabulary"] == tcl_config["class_vocabulary"] == list(TOY_CLASSES)

    assert list(summary["miou"]) == ["MaskCLIP baseline (KP branch only)", "TCL-only ablation", "CoDe (full)"]
    assert all(0.0 <= value <= 100.0 for value in summary["miou"].values())
    table = (output_dir / "results.md").read_text()
    assert all(name in table for name in summary["miou"])
    assert json.loads((output_dir / "summary.json").read_text())["miou"] == summary["miou"]

    # the Space's default: a repository holding outputs/toy_world/code_model serves it
    repo = tmp_path_factory.mktemp("repo")
    (repo / "outputs").mkdir(parents=True)
    (repo / "outputs" / "toy_world").symlink_to(output_dir)
    source = resolve_model_source({}, repo)
    assert source == str(repo / "outputs" / "toy_world" / "code_model")
    demo_model = load_demo_model(source)
    assert demo_model.segmenter is not None and "code_model" in demo_model.status
    image = world["test"][0]["image"].convert("RGB")
    prediction = predict(demo_model.segmenter, image, "circle, grass", False, 0.4, True)
    assert prediction.annotated[0].size == image.size


def test_comparison_figure_shows_the_evaluated_label_maps(quick_toy_run):
    output_dir, summary = quick_toy_run
    path = output_dir / COMPARISON_FILE
    assert summary["figures"] == {"comparison": str(path)}
    test = datasets.load_from_disk(str(output_dir / "world"))["test"]
    image_size = test[0]["image"].width
    cell = math.ceil(COMPARISON_CELL_SIZE / image_size) * image_size  # 112 px, three times: 336
    font_size, spacing = cell // 14, 6  # comparison_grid's defaults; the margin is a third of the font size
    margin, band = font_size // 3, title_band_height(font_size)
    with Image.open(path) as figure:
        pixels = np.asarray(figure.convert("RGB"))
    assert pixels.shape[1] == 2 * margin + 5 * cell + 4 * spacing  # input | truth | MaskCLIP | TCL-only | CoDe
    grid_height = margin + band + COMPARISON_ROWS * (band + cell) + (COMPARISON_ROWS - 1) * spacing + margin
    assert pixels.shape[0] > grid_height  # the legend below

    colors = palette(len(TOY_CLASSES))
    code = CoDeSegmenter.from_pretrained(output_dir / "code_model")
    models = [  # the columns' models, as the evaluation ran them
        CoDeSegmenter(with_inference_settings(CoDeSegmenter.from_pretrained(output_dir / "code_model").model,
                                              kp_weight=1.0), code.processor),
        CoDeSegmenter.from_pretrained(output_dir / "tcl_only_model"),
        code,
    ]

    def painted(label_map):
        return np.asarray(upscale(colorize(np.asarray(label_map).astype(np.int64), colors), COMPARISON_CELL_SIZE))

    shown = set()
    for row in range(COMPARISON_ROWS):
        image, label = test[row]["image"].convert("RGB"), np.asarray(test[row]["label"])
        np.testing.assert_array_equal(grid_cell(pixels, row, 0, cell, band, spacing, margin),
                                      np.asarray(upscale(image, COMPARISON_CELL_SIZE)))
        # the ground-truth cell: the palette colours of the true labels, pixel for pixel
        np.testing.assert_array_equal(grid_cell(pixels, row, 1, cell, band, spacing, margin), painted(label))
        shown |= set(np.unique(label).tolist())
        for column, model in enumerate(models, start=2):
            prediction = model.predict(image, list(TOY_CLASSES))
            np.testing.assert_array_equal(grid_cell(pixels, row, column, cell, band, spacing, margin),
                                          painted(prediction))
            shown |= set(np.unique(prediction).tolist())
    legend = {tuple(pixel) for pixel in pixels[grid_height:].reshape(-1, 3)}
    assert {tuple(colors[index]) for index in shown} <= legend
