"""code-seg on a CUDA GPU: the checks and the figures, in one run of a few minutes (prints figures; not a test).

    PYTHONPATH=. python benchmarks/gpu.py --out DIR        # from the repository root, on the GPU machine

1. the tests marked ``cuda`` (tests/test_cuda.py, tests/test_mixed_precision.py: CUDA against the CPU, the
   autograd functions under bf16 and fp16 autocast, trainer steps and the training loop in mixed precision,
   inference, PAMR, the evaluation loop), through pytest in a subprocess;
2. whole-image inference at VOC size (500x375 images, 2 windows of 448x448 each after the resize; 20 classes and
   background, PAMR and the KP branch on) with a random ViT-B/16-sized CoDe: images/s and peak GPU memory, in
   float32 with the CPU's choices of before (one image per call, four windows per call, window by window in
   24 MiB bands), in float32 and bf16 with the accelerator's (16 images per call, windows under the memory
   budget, the masker's whole batch at once), and one image per call;
3. training steps of the same model (``training_step`` under accelerate, 224x224 crops, K = 2): samples/s and
   peak GPU memory, bf16 mixed precision at batch 64 and float32 at batch 16.

Each measurement runs in a fresh process (its own peak-memory statistics and accelerate state; an out-of-memory
error is recorded, not fatal). Written to DIR: gpu_figures.json, gpu_figures.md, cuda_tests.log, cuda_tests.xml.
Exits non-zero when a test or a measurement failed.

Needs only what the GPU image holds (torch, transformers, accelerate, numpy, pillow, pytest) and this checkout:
no spaCy, no datasets, no download, nothing installed. Random weights cost exactly what trained ones do. CPU
threads stay torch's default (the CPU only prepares inputs here), and the glibc allocator setting is left off
(``retain_freed_memory`` skips processes that compute on an accelerator).

``--device cpu --quick`` is a dry run for a machine without a GPU: a tiny model and a few images, and the cuda
tests' code run on the CPU (CODE_SEG_TEST_DEVICE=cpu), to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_cuda.py", "tests/test_mixed_precision.py")
RESULT_PREFIX = "RESULT "
MEASUREMENT_TIMEOUT_S = 300

VOC_SIZE = (375, 500)  # (height, width) of a typical PASCAL VOC image
NUM_TEXT_CLASSES = 20  # and background
TINY = {
    "clip_config": {
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 0},
        "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 32, "patch_size": 8},
        "projection_dim": 32,
    },
    "text_decoder_num_heads": 4,
    "image_background_size": 32,
    "window_size": 64,
    "window_stride": 32,
}
# (name, dtype, images per call, images timed, the CPU's choices of before)
INFERENCE_RUNS = (
    ("float32, CPU choices (1 image, 4 windows a call; window by window, 24 MiB bands)", "float32", 1, 8, True),
    ("float32, 1 image a call", "float32", 1, 8, False),
    ("float32, 16 images a call", "float32", 16, 32, False),
    ("bf16, 16 images a call", "bfloat16", 16, 32, False),
)
# (name, accelerate mixed_precision, batch size, warm-up steps, timed steps)
TRAINING_RUNS = (
    ("bf16 mixed precision, batch 64", "bf16", 64, 2, 5),
    ("float32, batch 16", "no", 16, 2, 5),
)


# ------------------------------------------------------------------------------------------------ environment
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module blocked by None in sys.modules
        return False


def environment(device: str) -> dict:
    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "numpy", "pillow", "pytest"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    report = {
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "device": device,
        "absent_optional_packages": [name for name in ("spacy", "datasets") if not _importable(name)],
    }
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(device)
        report.update(gpu=properties.name, gpu_memory_GiB=round(properties.total_memory / 2**30, 1))
    return report


# ------------------------------------------------------------------------------------------------ 1. tests
def run_cuda_tests(out: Path, device: str) -> dict:
    """The cuda-marked tests through pytest in a subprocess: counts, failed test ids, log and JUnit XML in out."""
    if not _importable("pytest"):
        return {"status": "not run: pytest is not installed (carry its wheels and those of pluggy and iniconfig, "
                          "and put them on PYTHONPATH)"}
    log, junit = out / "cuda_tests.log", out / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", *TEST_FILES,
               f"--junitxml={junit}"]
    environment_variables = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                             "CODE_SEG_TEST_DEVICE": device,
                             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(log, "w") as stream:
        completed = subprocess.run(command, cwd=REPO, env=environment_variables, stdout=stream,
                                   stderr=subprocess.STDOUT)
    report = {"exit_code": completed.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if not junit.exists():
        return {**report, "status": "pytest wrote no report: see cuda_tests.log"}
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "passed" if completed.returncode == 0 and counts["tests"] else "FAILED"
    return {**report, **counts, "passed": passed, "failed": failed, "status": status}


# ------------------------------------------------------------------------------------------------ 2. inference
def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_GiB(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}


def measure_inference(device_name: str, quick: bool) -> list[dict]:
    """Images/s of the whole-image pipeline: evaluation resize, windows, masks, PAMR, KP mix, label maps."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    import modeling_code.modeling_code
    from modeling_code import CoDeConfig, CoDeModel
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.inference import (
        VocabularyEmbeddings,
        segment_images,
        sliding_windows,
        windows_per_call,
    )
    from modeling_code.masker import BAND_TAP_BYTES

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = CoDeModel(CoDeConfig(**(TINY if quick else {}))).eval().to(device)
    config = model.config
    image_processor = CoDeImageProcessor(**({"eval_short_side": 64, "eval_max_long_side": 128} if quick else {}))
    rng = np.random.default_rng(0)
    height, width = (48, 64) if quick else VOC_SIZE
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(32)]
    eval_size = image_processor.eval_size(height, width)
    windows = sliding_windows(*eval_size, config.window_size, config.window_stride)
    width_c = config.clip_config.projection_dim

    def vocabulary(dtype):
        embeddings = [F.normalize(torch.randn(NUM_TEXT_CLASSES, width_c), dim=-1).to(device, dtype) for _ in range(2)]
        return VocabularyEmbeddings(class_names=("background", *(f"class {i}" for i in range(NUM_TEXT_CLASSES))),
                                    background_index=0, class_embeddings=embeddings[0],
                                    kp_class_embeddings=embeddings[1], template_set=config.inference_template_set)

    plain_band_plan = modeling_code.modeling_code.inference_band_plan
    results = []
    for name, dtype_name, images_per_call, num_images, cpu_choices in INFERENCE_RUNS:
        dtype = getattr(torch, dtype_name)
        model.to(dtype)
        classes = vocabulary(dtype)
        images_per_call, num_images = (min(images_per_call, 2), 4) if quick else (images_per_call, num_images)
        window_batch_size = 4 if cpu_choices else None
        modeling_code.modeling_code.inference_band_plan = (
            (lambda device_type: (True, BAND_TAP_BYTES)) if cpu_choices else plain_band_plan
        )

        def run(batch, classes=classes, window_batch_size=window_batch_size):
            inputs = image_processor.preprocess(batch)
            outputs = segment_images(model, inputs["pixel_values"], classes, window_batch_size=window_batch_size)
            labels = image_processor.post_process_semantic_segmentation(outputs, target_sizes=inputs["original_sizes"])
            return [label.cpu() for label in labels]

        run(images[:images_per_call])  # warm-up: kernels chosen, allocator filled
        _synchronize(device)
        _reset_peak(device)
        call_seconds = []
        start = time.perf_counter()
        for first in range(0, num_images, images_per_call):
            call_start = time.perf_counter()
            run(images[first : first + images_per_call])
            call_seconds.append(time.perf_counter() - call_start)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        per_call = window_batch_size or windows_per_call(config, dtype, device, windows[0].height,
                                                         windows[0].width, NUM_TEXT_CLASSES)
        results.append({
            "run": name, "dtype": dtype_name, "images_per_call": images_per_call, "images": num_images,
            "windows_per_image": len(windows), "window_batch_size": per_call,
            "images_per_second": round(num_images / elapsed, 2),
            "median_call_seconds": round(statistics.median(call_seconds), 4), **_peak_memory_GiB(device),
        })
    modeling_code.modeling_code.inference_band_plan = plain_band_plan
    return results


# ------------------------------------------------------------------------------------------------ 3. training
def _token_rows(num_rows: int, lengths: list[int], vocab_size: int, eos: int, generator):
    """[num_rows, 77] ids: SOS, random tokens, EOS, then 0-padding; row i has lengths[i % len] tokens."""
    import torch

    rows = torch.zeros(num_rows, 77, dtype=torch.long)
    for row in range(num_rows):
        length = lengths[row % len(lengths)]
        rows[row, 0] = eos - 1
        rows[row, 1 : 1 + length] = torch.randint(1, vocab_size - 2, (length,), generator=generator)
        rows[row, 1 + length] = eos
    return rows


def _training_batch(config, batch_size: int) -> dict:
    """A batch shaped like real data: ~15-token captions, 1-2 token nouns, ~8-token templates, 3 labelled words."""
    import torch

    generator = torch.Generator().manual_seed(0)
    text = config.clip_config.text_config
    num_rows = config.num_words * batch_size
    size = config.clip_config.vision_config.image_size
    labels = torch.full((batch_size, 77), -1)
    labels[:, 2:4], labels[:, 6], labels[:, 9] = 1, 2, 0
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "caption_input_ids": _token_rows(batch_size, [14, 17], text.vocab_size, text.eos_token_id, generator),
        "noun_input_ids": _token_rows(num_rows, [1, 2], text.vocab_size, text.eos_token_id, generator),
        "template_input_ids": _token_rows(num_rows, [7, 9], text.vocab_size, text.eos_token_id, generator),
        "text_labels": labels,
    }


def measure_training(device_name: str, quick: bool, run_index: int) -> dict:
    """Samples/s of ``training_step`` (forward, backward, clipping, the trainer's AdamW, zeroing) and the run's
    peak memory."""
    import torch
    from accelerate import Accelerator

    from modeling_code import CoDeConfig, CoDeModel
    from modeling_code.training.optimization import build_optimizer
    from modeling_code.training.trainer import training_step

    name, mixed_precision, batch_size, warm_up, timed = TRAINING_RUNS[run_index]
    if quick:
        batch_size, warm_up, timed = 2, 1, 2
    device = torch.device(device_name)
    _reset_peak(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    torch.manual_seed(0)
    model = CoDeModel(CoDeConfig(**(TINY if quick else {}))).train()
    model.set_masker_backbone_trainable(True)
    optimizer = build_optimizer(model, model.trainable_parameter_names(), lr=1e-5, device_type=device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {key: value.to(accelerator.device) for key, value in _training_batch(model.config, batch_size).items()}
    seconds = []
    for step in range(warm_up + timed):
        start = time.perf_counter()
        training_step(accelerator, model, batch, optimizer, scheduler, max_grad_norm=5.0)
        _synchronize(device)
        if step >= warm_up:
            seconds.append(time.perf_counter() - start)
    step_seconds = statistics.median(seconds)
    return {"run": name, "mixed_precision": mixed_precision, "batch_size": batch_size, "timed_steps": timed,
            "median_step_seconds": round(step_seconds, 4), "samples_per_second": round(batch_size / step_seconds, 2),
            **_peak_memory_GiB(device)}


# ------------------------------------------------------------------------------------------------ driver
def measure_in_fresh_process(arguments: list[str]) -> dict | list | None:
    """Run one measurement of this script in a new process; its result, or {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", *arguments]
    environment_variables = {**os.environ, "HF_HUB_OFFLINE": "1",
                             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        completed = subprocess.run(command, cwd=REPO, env=environment_variables, capture_output=True, text=True,
                                   timeout=MEASUREMENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {MEASUREMENT_TIMEOUT_S} s"}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"error": (completed.stderr or completed.stdout)[-3000:]}


def markdown(figures: dict) -> str:
    environment_report, tests = figures["environment"], figures["tests"]
    lines = [
        f"# code-seg on {environment_report.get('gpu', environment_report['device'])}",
        "",
        f"torch {environment_report['versions']['torch']} (CUDA {environment_report['cuda']}), transformers "
        f"{environment_report['versions']['transformers']}, accelerate {environment_report['versions']['accelerate']}, "
        f"Python {environment_report['python']}; {figures['model']}.",
        "",
        f"Tests marked cuda: {tests.get('status')}" + (
            f" ({tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped, {tests['seconds']} s)" if "passed" in tests else ""),
        *(f"- failed: `{name}`" for name in tests.get("failed", [])),
        "",
        "| whole-image inference, VOC size | images/s | windows a call | median call (s) | peak allocated (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in figures["inference"]:
        if "error" in row:
            lines.append(f"| {row.get('run', 'inference')} | error | | | |")
            continue
        lines.append(f"| {row['run']} | {row['images_per_second']} | {row['window_batch_size']} | "
                     f"{row['median_call_seconds']} | {row.get('peak_allocated_GiB', '-')} |")
    lines += ["", "| training step, 224x224 crops, K = 2 | samples/s | median step (s) | peak allocated (GiB) |",
              "|---|---:|---:|---:|"]
    for row in figures["training"]:
        if "error" in row:
            lines.append(f"| {row.get('run', 'training')} | error | | |")
            continue
        lines.append(f"| {row['run']} | {row['samples_per_second']} | {row['median_step_seconds']} | "
                     f"{row.get('peak_allocated_GiB', '-')} |")
    errors = [row for row in [*figures["inference"], *figures["training"]] if "error" in row]
    lines += [f"\nerror: {row['error']}" for row in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu"), help="folder for the figures and test logs")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few images: checks the script")
    parser.add_argument("--skip_tests", action="store_true", help="only the measurements")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = parser.parse_args()

    if args.measure:
        kind, *rest = args.measure
        from modeling_code.apps.allocator import retain_freed_memory

        retain_freed_memory(args.device)  # as the entry points do: nothing changes on an accelerator
        result = (measure_inference(args.device, args.quick) if kind == "inference"
                  else measure_training(args.device, args.quick, int(rest[0])))
        print(RESULT_PREFIX + json.dumps(result))
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --device cpu --quick checks the script without one")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    figures = {"environment": environment(args.device),
               "model": "tiny random model (dry run)" if args.quick else "random ViT-B/16-sized CoDe (CoDeConfig())"}
    print(json.dumps(figures["environment"]), flush=True)
    figures["tests"] = {"status": "skipped (--skip_tests)"} if args.skip_tests else run_cuda_tests(args.out, args.device)
    print("tests:", json.dumps(figures["tests"]), flush=True)
    flags = ["--device", args.device, *(["--quick"] if args.quick else [])]
    inference = measure_in_fresh_process(["inference", *flags])
    figures["inference"] = inference if isinstance(inference, list) else [inference]
    figures["training"] = [measure_in_fresh_process(["training", str(index), *flags])
                           for index in range(len(TRAINING_RUNS))]
    figures["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "gpu_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    table = markdown(figures)
    (args.out / "gpu_figures.md").write_text(table)
    print(table)
    failed = [row for row in [*figures["inference"], *figures["training"]] if "error" in row]
    tests_failed = not args.skip_tests and figures["tests"].get("status") != "passed"
    return 1 if failed or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
