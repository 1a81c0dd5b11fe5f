"""Publishing: the staged upload set, the dry-run folder loading without the package, the Hub calls."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import NO_PACKAGE_PRELUDE, save_tiny_model
from huggingface_hub import ModelCard

from modeling_code.apps.publishing import publish, remote_code_files, upload_file_list
from modeling_code.training.config import TrainingConfig, save_training_config

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FILES = [
    "README.md", "config.json", "configuration_code.py", "image_processing_code.py", "inference.py", "losses.py",
    "masker.py", "model.safetensors", "modeling_code.py", "ops.py", "pamr.py", "pipeline_code.py", "processing_code.py",
    "processor_config.json", "templates.py", "text_decomposition.py", "tokenizer.json", "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_clip_dir, tiny_tokenizer):
    """A trainer-like output folder: model, processor, training config, and files that must not be uploaded."""
    directory = save_tiny_model(tmp_path_factory.mktemp("trained"), tiny_clip_dir, tiny_tokenizer)
    save_training_config(TrainingConfig(), directory / "training_config.yaml")
    (directory / "training_summary.json").write_text("{}")
    (directory / "checkpoint-10").mkdir()
    (directory / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (directory / "notes.py").write_text("print('not remote code')\n")
    return directory


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_dry_run_stages_exactly_the_upload_set(trained_dir, tmp_path):
    result = publish(trained_dir, "me/code-tiny", dry_run_dir=tmp_path / "staged")
    assert result.files == EXPECTED_FILES and result.commit_url is None
    staged = tmp_path / "staged"
    assert sorted(p.name for p in staged.iterdir()) == EXPECTED_FILES
    for name in EXPECTED_FILES[1:]:
        assert (staged / name).read_bytes() == (trained_dir / name).read_bytes()
    card = ModelCard.load(staged / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and "me/code-tiny" in card.text
    assert json.loads((staged / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_code.CoDeModel"


@pytest.mark.slow
def test_dry_run_folder_loads_and_runs_the_cards_snippet_without_the_package(trained_dir, tmp_path):
    staged = tmp_path / "staged"
    publish(trained_dir, "me/code-tiny", dry_run_dir=staged)
    card = (staged / "README.md").read_text()
    pipeline_snippet, steps_snippet = [
        block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "trust_remote_code" in block
    ]
    script = NO_PACKAGE_PRELUDE + (pipeline_snippet + steps_snippet).replace('"me/code-tiny"', repr(str(staged))) + (
        "print([(s['label'], s['mask'].size) for s in segments if s['label'] == 'background'])\n"
        "print(type(model).__module__, type(processor).__name__, 'x'.join(map(str, outputs.scores.shape[:2])), "
        "'x'.join(map(str, label_map.shape)), sum(p.numel() for p in model.parameters()), sep='|')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    segments_line, steps_line = completed.stdout.strip().splitlines()[-2:]
    assert segments_line == "[('background', (90, 70))]"  # the pipeline: random weights score below 0.4
    module, processor_class, shape, label_shape, parameters = steps_line.split("|")
    assert module.startswith("transformers_modules.") and processor_class == "CoDeProcessor"
    from modeling_code import CoDeModel

    model = CoDeModel.from_pretrained(trained_dir)
    assert int(parameters) == sum(p.numel() for p in model.parameters())
    assert shape == "1x4" and label_shape == "70x90"  # 4 classes; the label map at the photo's size


class RecordingHub:
    """Stands in for ``HfApi``: records each call and, at upload, the folder's files and their digests."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs.pop("folder_path"))
        self.calls.append(("upload_folder", digests(folder), kwargs))
        return type("Commit", (), {"commit_url": "https://hub.example/commit/1"})()


def test_upload_sends_the_dry_run_files_to_the_requested_branch(trained_dir, tmp_path):
    dry = publish(trained_dir, "me/code-tiny", dry_run_dir=tmp_path / "staged")
    hub = RecordingHub()
    result = publish(trained_dir, "me/code-tiny", private=True, revision="v1", api=hub)
    assert result.files == dry.files and result.folder is None
    assert result.commit_url == "https://hub.example/commit/1"
    (create, repo, create_kwargs), (branch, _, branch_kwargs), (upload, uploaded, upload_kwargs) = hub.calls
    assert upload == "upload_folder"
    assert (create, repo) == ("create_repo", "me/code-tiny")
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert (branch, branch_kwargs["branch"]) == ("create_branch", "v1")
    assert uploaded == digests(tmp_path / "staged")
    assert upload_kwargs["repo_id"] == "me/code-tiny" and upload_kwargs["revision"] == "v1"
    assert "*.safetensors" in upload_kwargs["delete_patterns"]

    main_only = RecordingHub()
    publish(trained_dir, "me/code-tiny", api=main_only)
    assert [call[0] for call in main_only.calls] == ["create_repo", "upload_folder"]
    assert main_only.calls[0][2]["private"] is False and main_only.calls[1][2]["revision"] is None


def test_results_file_fills_the_published_card(trained_dir, tmp_path):
    results = {"settings": {}, "benchmarks": {"voc": {"display_name": "PASCAL VOC 2012", "dataset_type": "pascal_voc",
                                                      "split": "val", "mIoU": 41.236, "mAcc": 50.0, "aAcc": 80.0}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    publish(trained_dir, "me/code-tiny", dry_run_dir=tmp_path / "staged", results_json=tmp_path / "results.json")
    [entry] = ModelCard.load(tmp_path / "staged" / "README.md").data.eval_results
    assert (entry.dataset_name, entry.metric_type, entry.metric_value) == ("PASCAL VOC 2012", "mean_iou", 41.24)


def test_incomplete_folders_are_refused_with_the_reason(trained_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in upload_file_list(trained_dir):
        (broken / name).write_bytes((trained_dir / name).read_bytes())
    assert remote_code_files(broken) == [name for name in EXPECTED_FILES if name.endswith(".py")]

    (broken / "templates.py").unlink()
    with pytest.raises(ValueError, match=r"lacks templates\.py, which (configuration|processing|text_decomposition|image_processing)"):
        publish(broken, "me/x", dry_run_dir=tmp_path / "a")
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"auto_map lacks \['AutoModel'\]"):
        upload_file_list(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \.safetensors weights"):
        upload_file_list(broken)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "stale.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        publish(trained_dir, "me/x", dry_run_dir=occupied)
    assert not (tmp_path / "a").exists()


def test_command_line_dry_run_and_example_card(trained_dir, tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "training"))
    try:
        from publish import main
    finally:
        sys.path.pop(0)
    assert main([str(trained_dir), "me/code-tiny", "--dry-run", str(tmp_path / "staged")]) == 0
    output = capsys.readouterr().out
    assert f"staged {len(EXPECTED_FILES)} files" in output and "  model.safetensors" in output
    assert main([str(tmp_path / "missing"), "me/code-tiny", "--dry-run", str(tmp_path / "other")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--example-card", str(tmp_path / "card.md")]) == 0
    assert (tmp_path / "card.md").read_text() == (REPO_ROOT / "model_card.md").read_text()
