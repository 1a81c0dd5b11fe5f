"""Loading a saved model for prediction: every unusable source is named before (or instead of) a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from modeling_code.predict.loading import resolve_device, resolve_model_source
from modeling_code.predict.segmenter import CoDeSegmenter


def copy_model(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_weights_are_named(tiny_model_dir, tmp_path, damage):
    folder = copy_model(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes({"truncate": content[:1000], "garbage": b"\x13" * 5000, "empty": b""}[damage])
    with pytest.raises(OSError, match=r"model\.safetensors .*is corrupt or truncated"):
        CoDeSegmenter.from_pretrained(folder)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "nowhere", "Model folder not found"),
        (lambda root: f"./{root.name}-nowhere", "Model folder not found"),
        (lambda root: "../no-such-model-folder", "Model folder not found"),
        (lambda root: "~/no-such-model-folder", "Model folder not found"),
        (lambda root: str(root / "missing" / "model"), "Model folder not found"),
        (lambda root: "", "No model given"),
    ],
)
def test_a_missing_local_path_is_reported_as_a_missing_path(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(OSError if source else ValueError, match=message) as caught:
        resolve_model_source(source)
    assert "Repo id" not in str(caught.value)
    with pytest.raises(OSError if source else ValueError, match=message):
        CoDeSegmenter.from_pretrained(source)


def test_paths_resolve_and_hub_ids_pass_through(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model_source(tiny_model_dir) == str(tiny_model_dir)
    assert resolve_model_source("someone/some-model") == "someone/some-model"
    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
    assert resolve_model_source(f"~/{tiny_model_dir.name}") == str(tiny_model_dir)


def test_folders_that_are_not_models_are_named(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=r"has no config\.json"):
        resolve_model_source(empty)
    no_config = copy_model(tiny_model_dir, tmp_path)
    (no_config / "config.json").unlink()
    with pytest.raises(OSError, match=r"has no config\.json"):
        CoDeSegmenter.from_pretrained(no_config)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(OSError, match="is a file, not a model folder"):
        resolve_model_source(a_file)


def test_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"cuda:3.*1 CUDA device"):
        resolve_device("cuda:3")


def test_an_unavailable_device_is_named_before_loading(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(CoDeSegmenter, "__init__", lambda *args, **kwargs: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="CUDA is not available"):
        CoDeSegmenter.from_pretrained(tiny_model_dir, device="cuda")
