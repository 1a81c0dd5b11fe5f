"""The embedded default end to end, in miniature: world, CLIP pretraining, CoDe training, evaluation, overlay."""

from __future__ import annotations

import json

import datasets
from PIL import Image

from modeling_code.demo import load_demo_model, predict, resolve_model_source
from modeling_code.toy_pipeline import ToyPipelineSettings, run_toy_world


def test_miniature_pipeline_runs_every_stage(tmp_path):
    summary = run_toy_world(ToyPipelineSettings.quick(str(tmp_path)))

    world = datasets.load_from_disk(str(tmp_path / "world"))
    assert {split: len(world[split]) for split in world} == {"train": 48, "validation": 8, "test": 8}
    assert (tmp_path / "clip" / "model.safetensors").exists() and (tmp_path / "clip" / "vocab.json").exists()
    for run in ("code_model", "tcl_only_model"):
        assert (tmp_path / run / "model.safetensors").exists()
        assert json.loads((tmp_path / run / "training_summary.json").read_text())["steps"] == 2
    tcl_config = json.loads((tmp_path / "tcl_only_model" / "config.json").read_text())
    assert tcl_config["loss_hcl_weight"] == 0.0 and tcl_config["loss_text_segmentation_weight"] == 0.0

    assert list(summary["miou"]) == ["MaskCLIP baseline (KP branch only)", "TCL-only ablation", "CoDe (full)"]
    assert all(0.0 <= value <= 100.0 for value in summary["miou"].values())
    table = (tmp_path / "results.md").read_text()
    assert all(name in table for name in summary["miou"])
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.width >= 112 and overlay.height > 112  # the image plus its legend
    assert json.loads((tmp_path / "summary.json").read_text())["miou"] == summary["miou"]

    # the Space's default: a repository holding outputs/toy_world/code_model serves it
    repo = tmp_path / "repo"
    (repo / "outputs").mkdir(parents=True)
    (repo / "outputs" / "toy_world").symlink_to(tmp_path)
    source = resolve_model_source({}, repo)
    assert source == str(repo / "outputs" / "toy_world" / "code_model")
    demo_model = load_demo_model(source)
    assert demo_model.segmenter is not None and "code_model" in demo_model.status
    prediction = predict(demo_model.segmenter, overlay.convert("RGB"), "circle, grass", False, 0.4, True)
    assert prediction.annotated[0].size == overlay.size
