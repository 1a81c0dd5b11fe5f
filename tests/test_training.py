"""Training end to end: the command line, skip counting, kill-and-resume, and two-process equivalence."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_CODE_OVERRIDES, launch_two_processes
from PIL import Image
from safetensors.torch import load_file

from modeling_code.training.config import apply_overrides, load_training_config

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red cat sitting on a green sofa",
    "a dog running on the grass near a car",
    "a small bird flying over the water",
    "a man riding a horse on the road",
    "two chairs next to a table in the house",
    "a bus parked in the street by a building",
]


def write_jsonl_dataset(directory: Path, corrupt: int = 0, nounless: int = 0, copies: int = 2) -> Path:
    """Small RGB images with captions as JSONL, plus ``corrupt`` undecodable images and noun-less captions."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for index, caption in enumerate(CAPTIONS * copies):
        name = f"image_{index}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(directory / name)
        lines.append({"image": name, "caption": caption})
    for index in range(corrupt):
        (directory / f"corrupt_{index}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        lines.insert(2 + 3 * index, {"image": f"corrupt_{index}.jpg", "caption": CAPTIONS[0]})
    for index in range(nounless):
        lines.insert(1 + 4 * index, {"image": "image_0.png", "caption": "quickly and very happily"})
    path = directory / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def write_config(tmp_path: Path, clip_dir: Path, data_file: Path, **sections) -> Path:
    config = {
        "model": {"clip": str(clip_dir), "overrides": dict(TINY_CODE_OVERRIDES),
                  "processor_overrides": {"train_crop_size": 32}},
        "data": {"sources": [{"type": "jsonl", "path": str(data_file)}], "batch_size": 2, "num_workers": 0,
                 "shuffle_buffer": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "reference_batch_size": 2, "warmup_steps": 2, "max_steps": 4,
                  "ust_steps": 2},
        "checkpoint": {"output_dir": str(tmp_path / "run"), "save_every": 2, "keep_last": 2},
        "logging": {"log_every": 1, "tracker": "tensorboard"},
        "eval": {"every": 0},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_train(config: Path, *extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "training/train.py"), "--config", str(config), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_config_overrides_and_unknown_keys(tmp_path):
    config = load_training_config(None, ["optim.lr=0.5", "data.sources=[{type: jsonl, path: x.jsonl}]"])
    assert config.optim.lr == 0.5 and config.data.sources[0]["type"] == "jsonl"
    assert config.optim.betas == (0.9, 0.999) and config.optim.ust_steps == 30000
    with pytest.raises(KeyError, match=r"optim\.learning_rate"):
        load_training_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        apply_overrides({}, ["no-equals-sign"])
    paper = load_training_config(REPO / "training/configs/paper_cc3m_cc12m.yaml")
    assert [s["path"] for s in paper.data.sources] == ["pixparse/cc3m-wds", "pixparse/cc12m-wds"]
    assert paper.model.clip == "openai/clip-vit-base-patch16" and paper.optim.max_steps == 50000


@pytest.mark.slow
def test_command_line_run_writes_a_loadable_model_and_counts_skips(tmp_path, tiny_clip_dir):
    data = write_jsonl_dataset(tmp_path / "data", corrupt=2, nounless=2, copies=1)
    result = run_train(write_config(tmp_path, tiny_clip_dir, data, optim={"max_steps": 3}))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["steps"] == 3
    # 3 steps x 2 = the 6 good records of one pass; a sample carries the skips met before the next good record,
    # so every bad record of the first pass is counted (plus any that open the second pass), none trained on
    assert 2 <= summary["skipped"]["image"] <= 4 and 2 <= summary["skipped"]["caption"] <= 4
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert list((run / "logs" if (run / "logs").exists() else run).rglob("events.out.tfevents*"))

    from transformers import AutoModel, AutoProcessor

    import modeling_code  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(run)
    processor = AutoProcessor.from_pretrained(run)
    assert type(model).__name__ == "CoDeModel" and type(processor).__name__ == "CoDeProcessor"
    clip = load_file(str(Path(tiny_clip_dir) / "model.safetensors"))
    torch.testing.assert_close(model.clip.visual_projection.weight, clip["visual_projection.weight"])


def _final_parameters(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / "model.safetensors")).items() if not k.startswith("clip.")}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path, tiny_clip_dir):
    data = write_jsonl_dataset(tmp_path / "data", corrupt=1, nounless=1, copies=3)
    settings = {"optim": {"max_steps": 24, "warmup_steps": 4, "ust_steps": 6, "lr": 1e-3, "min_lr": 1e-4,
                          "reference_batch_size": 2}}
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = write_config(straight_dir, tiny_clip_dir, data, checkpoint={"output_dir": str(straight_dir / "run")},
                            logging={"tracker": None}, **settings)
    interrupted = write_config(killed_dir, tiny_clip_dir, data, checkpoint={"output_dir": str(killed_dir / "run"),
                               "save_every": 2, "keep_last": 2}, logging={"tracker": None}, **settings)
    assert run_train(straight).returncode == 0

    process = run_train(interrupted, wait=False)
    marker = killed_dir / "run" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), process.stderr.read()[-3000:]
    assert not (killed_dir / "run" / "model.safetensors").exists(), "the run finished before it was killed"

    resumed = run_train(interrupted, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, actual = _final_parameters(straight_dir / "run"), _final_parameters(killed_dir / "run")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((killed_dir / "run" / "training_summary.json").read_text())
    assert summary["skipped"] == json.loads((straight_dir / "run" / "training_summary.json").read_text())["skipped"]


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, random, sys
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from PIL import Image
    import numpy as np
    from transformers import CLIPTokenizer
    from modeling_code import CoDeModel
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.processing_code import CoDeProcessor
    from modeling_code.training.trainer import training_step

    clip_dir, out, captions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    model = CoDeModel.from_clip(clip_dir, tokenizer=tokenizer, gumbel_noise=False, **json.loads(sys.argv[4]))
    processor = CoDeProcessor(CoDeImageProcessor(train_crop_size=32), tokenizer)
    rng = np.random.default_rng(0)
    samples = [
        processor.prepare_training_sample(
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), caption, random.Random(i))
        for i, caption in enumerate(captions)
    ]
    per_process = len(samples) // accelerator.num_processes
    mine = samples[accelerator.process_index * per_process:(accelerator.process_index + 1) * per_process]
    batch = processor.collate_training(mine)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    terms, _ = training_step(accelerator, model, batch, optimizer, scheduler, max_grad_norm=1e9)
    terms = {k: float(accelerator.reduce(torch.tensor(v), "mean")) for k, v in terms.items()}
    if accelerator.is_main_process:
        core = accelerator.unwrap_model(model)
        trained = {n: p.detach().tolist() for n, p in core.named_parameters() if not n.startswith("clip.")}
        json.dump({"terms": terms, "parameters": trained, "processes": accelerator.num_processes}, open(out, "w"))
    accelerator.wait_for_everyone()  # no rank tears the group down while the other still uses it
    del model, optimizer  # the DDP wrapper holds the process group (see trainer.train's end)
    accelerator.free_memory()
    accelerator.end_training()
    """
)


@pytest.mark.parametrize(
    ("captions", "extra_overrides"),
    [
        (CAPTIONS[:4], {}),
        # each process holds a cat-and-sofa caption: same-noun pairs across processes are left out of the negatives
        (["a red cat sitting on a green sofa", "a dog near a car", "a cat on the sofa", "a bird over the water"],
         {"exclude_same_noun_negatives": True}),
    ],
    ids=["paper", "same_noun_pairs_excluded"],
)
@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, tiny_clip_dir, captions, extra_overrides):
    script = tmp_path / "step.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    captions = json.dumps(captions)
    overrides = json.dumps({**TINY_CODE_OVERRIDES, **extra_overrides})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tiny_clip_dir), str(tmp_path / "one.json"), captions,
                             overrides], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch_two_processes([str(script), str(tiny_clip_dir), str(tmp_path / "two.json"), captions, overrides])
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["terms"].keys() == two["terms"].keys()
    for name, value in one["terms"].items():
        assert two["terms"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, value in one["parameters"].items():
        torch.testing.assert_close(torch.tensor(two["parameters"][name]), torch.tensor(value), rtol=1e-4,
                                   atol=1e-6, msg=name)


@pytest.mark.slow
def test_periodic_evaluation_keeps_the_best_model(tmp_path, tiny_clip_dir):
    import datasets

    data = write_jsonl_dataset(tmp_path / "data", copies=1)
    rng = np.random.default_rng(2)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)],
            "label": [Image.fromarray(rng.integers(0, 3, (32, 32), dtype=np.uint8)) for _ in range(2)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "seg"))
    config = write_config(
        tmp_path, tiny_clip_dir, data, logging={"tracker": None},
        model={"clip": str(tiny_clip_dir), "overrides": {**TINY_CODE_OVERRIDES, "window_size": 32, "window_stride": 16,
                                                          "inference_short_side": 32}},
        eval={"every": 2, "dataset": {"path": str(tmp_path / "seg"), "split": "train", "raw_label_ids": False},
              "class_names": ["cat", "dog", "sky"], "overrides": {"use_pamr": False}},
    )
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    best = json.loads((tmp_path / "run" / "best" / "training_summary.json").read_text())["best"]
    assert best["metric"] == "miou" and best["step"] in (2, 4) and 0.0 <= best["value"] <= 1.0
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    final = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert final["best"] == best
    for folder in (tmp_path / "run", tmp_path / "run" / "best"):  # the classes it was evaluated on, for the demo
        assert json.loads((folder / "config.json").read_text())["class_vocabulary"] == ["cat", "dog", "sky"]


@pytest.mark.slow
def test_validation_loss_is_the_fallback_metric(tmp_path, tiny_clip_dir):
    data = write_jsonl_dataset(tmp_path / "data", copies=1)
    config = write_config(tmp_path, tiny_clip_dir, data, logging={"tracker": None},
                          data={"validation_sources": [{"type": "jsonl", "path": str(data)}]},
                          eval={"every": 2, "validation_batches": 2})
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    best = json.loads((tmp_path / "run" / "best" / "training_summary.json").read_text())["best"]
    assert best["metric"] == "validation_loss" and best["value"] > 0


def _load_train_script():
    spec = importlib.util.spec_from_file_location("code_seg_train_script", REPO / "training" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_push_to_hub_is_done_by_the_entry_script_with_the_final_folder(tmp_path, monkeypatch):
    import modeling_code.apps.publishing as publishing

    script = _load_train_script()
    trained, published = [], []

    def fake_train(config, resume_from_checkpoint=None, on_final_model=None):
        trained.append(on_final_model)
        if on_final_model is not None:
            on_final_model(tmp_path / "out")
        return tmp_path / "out"

    def fake_publish(model_dir, repo_id, private=False, **kwargs):
        published.append((model_dir, repo_id, private))
        return publishing.PublishResult([], None, "https://hub.example/commit/1")

    monkeypatch.setattr(script, "train", fake_train)
    monkeypatch.setattr(script, "retain_freed_memory", lambda device="cpu": None)
    monkeypatch.setattr(publishing, "publish", fake_publish)
    script.main(["--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/code", "hub.private=true"])
    assert published == [(tmp_path / "out", "me/code", True)]
    script.main(["--output_dir", str(tmp_path / "out")])
    assert trained[-1] is None and len(published) == 1
