"""The embedded default end to end, in miniature: world, CLIP pretraining, CoDe training, evaluation, overlay."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from modeling_code.apps.demo import load_demo_model, predict, resolve_model_source

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
