"""``code-seg evaluate`` and ``training/evaluate.py``: one implementation, every output written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from modeling_code.apps.cli import EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]


def write_voc(root: Path, num_images: int = 3) -> Path:
    """A VOCdevkit/VOC2012 folder with a val split of small images and palette-index labels."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"2007_{index:06d}" for index in range(num_images)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, 21, (48, 64), dtype=np.uint8)
        label[:4] = 255
        Image.fromarray(label).save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.mark.slow
def test_evaluate_command_writes_every_output_and_matches_the_script(tiny_model_dir, tmp_path):
    data = write_voc(tmp_path / "data")
    out = tmp_path / "cli"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--benchmark", "voc,voc20", "--data_root", str(data),
                 "--output_dir", str(out), "--num_visualize", "2", "--no_pamr"])
    assert code == EXIT_OK
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["voc", "voc20"]
    voc = results["benchmarks"]["voc"]
    assert voc["num_images"] == 3 and voc["num_classes"] == 21 and len(voc["per_class"]) == 21
    assert voc["counted_pixels"] == 3 * 44 * 64  # the 255 rows are ignored
    assert results["settings"]["use_pamr"] is False and results["settings"]["window_size"] == 64
    table = (out / "results.md").read_text()
    assert "voc" in table.lower() and "mIoU" in table
    index = yaml.safe_load((out / "model_index.yaml").read_text())["model-index"][0]["results"]
    assert [entry["task"]["type"] for entry in index] == ["image-segmentation"] * 2
    assert index[0]["metrics"][0]["value"] == pytest.approx(voc["mIoU"], abs=0.01)
    for key in ("voc", "voc20"):
        grid = Image.open(out / "overlays" / f"{key}.png")
        assert grid.width > 3 * 32 and grid.height > 2 * 16  # image / ground truth / prediction, 2 rows

    script_out = tmp_path / "script"
    result = subprocess.run(
        [sys.executable, str(REPO / "training/evaluate.py"), "--model", str(tiny_model_dir), "--benchmark", "voc,voc20",
         "--data_root", str(data), "--output_dir", str(script_out), "--num_visualize", "2", "--no_pamr"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((script_out / "results.json").read_text())["benchmarks"] == results["benchmarks"]


def test_evaluate_a_custom_datasets_dataset(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)],
            "label": [Image.fromarray(rng.integers(0, 3, (40, 40), dtype=np.uint8)) for _ in range(2)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "set"))
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "set"), "--split", "train",
                 "--class_names", "cat, dog, sky", "--labels_are_mapped", "--output_dir", str(out)])
    assert code == EXIT_OK
    (entry,) = json.loads((out / "results.json").read_text())["benchmarks"].values()
    assert entry["num_images"] == 2 and list(entry["per_class"]) == ["cat", "dog", "sky"]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--benchmark", "nope", "--data_root", "x"], "nope"),
    (["--benchmark", "voc", "--data_root", "/does/not/exist"], "/does/not/exist"),
])
def test_evaluate_errors_name_the_problem(tiny_model_dir, tmp_path, capsys, arguments, message):
    code = main(["evaluate", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path), *arguments])
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_an_unknown_benchmark_is_rejected_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import modeling_code.predict.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module.CoDeSegmenter, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    code = main(["evaluate", "--model", str(tmp_path), "--benchmark", "voc,nope", "--data_root", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == EXIT_USAGE and "nope" in error and "voc" in error and "Traceback" not in error


@pytest.mark.parametrize(
    ("damage", "message"),
    [("tokenizer.json", "lacks processor files: tokenizer.json"), ("model.safetensors", "corrupt or truncated")],
)
def test_a_damaged_model_folder_is_named_without_a_traceback(tiny_model_dir, tmp_path, capsys, damage, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if damage == "model.safetensors":
        (folder / damage).write_bytes(b"")
    else:
        (folder / damage).unlink()
    data = write_voc(tmp_path / "data", num_images=1)
    code = main(["evaluate", "--model", str(folder), "--benchmark", "voc", "--data_root", str(data),
                 "--output_dir", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == EXIT_USAGE and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
