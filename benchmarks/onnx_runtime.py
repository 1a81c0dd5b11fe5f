"""onnxruntime against PyTorch on this CPU, the exported graphs and the torch model in one process (prints figures;
not a test).

A randomly initialised ViT-B/16-sized CoDe (``inference.random_model``: same cost as trained weights) is exported
with ``export_onnx`` to a temporary folder in a fresh process; the export's time and the graphs' file sizes are
reported. Then, for two of benchmarks/inference.py's scenarios, (a) one 448x448 window, 21 classes and (b) a
500x375 VOC-size image, 20 classes + background, each in a fresh process: the whole request after the vocabulary
is embedded (windows, masks + KP, PAMR, KP mix, averaging, resize back, argmax) through ``CoDeModel`` and through
``CoDeOnnxModel`` (the two graphs in onnxruntime, everything else the same torch code), with and without PAMR,
and the bare CLIP vision pass over the same windows. All runs interleaved; medians after one warm-up. Torch runs
at ``--threads`` threads (``torch.set_num_threads``), onnxruntime with ``intra_op_num_threads=--threads`` and
``inter_op_num_threads=1``. Ratios are to the bare pass measured in the same process, as in compare.py.

    PYTHONPATH=. python benchmarks/onnx_runtime.py [--runs 5] [--threads 2] [--passive_wait] [--quick]

``--quick`` exports a tiny model instead: it checks the script, and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference  # sibling benchmark script

from modeling_code.apps.flags import ArgumentParser

# --quick: a CLIP with ViT-B/16's geometry (patch 16, 224-pixel position grid) and tiny widths
TINY = {
    "clip_config": {
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 224, "patch_size": 16},
        "projection_dim": 32,
    },
    "text_decoder_num_heads": 4,
    "image_background_size": 32,
}
SCENARIOS = inference.SCENARIOS[:2]  # the 448x448 window and the VOC-size image
RUNTIMES = ("PyTorch", "onnxruntime")
PAMR_SETTINGS = (("no_pamr", "no PAMR"), ("pamr", "PAMR"))


def export_random_model(output_dir: str, threads: int, overrides: dict | None) -> float:
    """Export ``inference.random_model(overrides)`` to ``output_dir``; the export's seconds. A tokenizer of single
    bytes stands in for CLIP's: the timed requests take their class embeddings ready-made."""
    import torch

    from modeling_code.apps.onnx_export import export_onnx
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.processing_code import CoDeProcessor
    from modeling_code.toy.word_tokenizer import build_clip_tokenizer

    torch.set_num_threads(threads)
    model = inference.random_model(overrides)
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = build_clip_tokenizer([], directory)
        model.config.clip_config.text_config.eos_token_id = tokenizer.eos_token_id
        model.prompt_learner.eos_token_id = tokenizer.eos_token_id
        start = time.perf_counter()
        export_onnx(model, CoDeProcessor(CoDeImageProcessor(), tokenizer), output_dir)
        return time.perf_counter() - start


def time_runtimes(scenario: inference.Scenario, export_dir: str, threads: int, runs: int, overrides: dict | None,
                  spinning: bool) -> dict:
    """Median seconds of the bare pass and of the request through each runtime, with and without PAMR; the
    onnxruntime sessions' load time and the largest difference of the two runtimes' scores."""
    import onnxruntime

    from modeling_code.predict.onnx_runtime import CoDeOnnxModel

    model, bare, image_processor, vocabulary, image = inference._setup(scenario, threads, overrides)
    options = onnxruntime.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    start = time.perf_counter()
    onnx_model = CoDeOnnxModel(export_dir, num_threads=threads, session_options=options)
    load_seconds = time.perf_counter() - start
    models = dict(zip(RUNTIMES, (model, onnx_model)))

    protocol = model.config.inference_protocol
    inputs = image_processor.preprocess(image, protocol=protocol)
    torch_scores, onnx_scores = (
        candidate(**inputs, **vocabulary.model_inputs(), protocol=protocol).scores for candidate in models.values()
    )
    bare_run, windows = inference._runner("bare", model, bare, image_processor, vocabulary, image)
    runners = {"bare": bare_run}
    for setting, _ in PAMR_SETTINGS:
        for runtime, candidate in models.items():
            run, _ = inference._runner(setting, candidate, bare, image_processor, vocabulary, image)
            runners[f"{runtime} {setting}"] = run
    return {
        "windows": windows,
        "load_seconds": load_seconds,
        "max_score_difference": float((torch_scores - onnx_scores).abs().max()),
        **inference.time_interleaved(runners, runs),
    }


def print_table(results: dict) -> None:
    header = ("scenario", "bare CLIP", *RUNTIMES, "onnxruntime / PyTorch (CPU time)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for scenario in SCENARIOS:
        wall, cpu = results[scenario.key]["wall"], results[scenario.key]["cpu"]
        bare = wall["bare"]
        for setting, name in PAMR_SETTINGS:
            cells = [f"({scenario.key}) {scenario.description}, {name}", f"{bare:.3f} s (1.00x)"]
            torch_key, onnx_key = (f"{runtime} {setting}" for runtime in RUNTIMES)
            cells += [f"{wall[key]:.3f} s ({wall[key] / bare:.2f}x)" for key in (torch_key, onnx_key)]
            ratio, cpu_ratio = wall[onnx_key] / wall[torch_key], cpu[onnx_key] / cpu[torch_key]
            cells.append(f"{ratio:.2f} ({cpu_ratio:.2f})")
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and onnxruntime intra-op threads")
    parser.add_argument(
        "--passive_wait",
        action="store_true",
        help="threads sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE for torch, "
        "session.intra_op.allow_spinning=0 for onnxruntime): on a machine shared with other busy processes",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks the script")
    args = parser.parse_args()
    if args.passive_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by the freshly spawned processes
    overrides = TINY if args.quick else None
    print(
        f"onnxruntime vs PyTorch, CPU, {args.threads} threads each (onnxruntime intra-op {args.threads}, inter-op 1), "
        f"median of {args.runs} runs, waiting threads {'sleep' if args.passive_wait else 'spin'}; "
        f"load average at start {os.getloadavg()}"
    )
    with tempfile.TemporaryDirectory() as directory:
        export_seconds = inference._in_fresh_process(export_random_model, directory, args.threads, overrides)
        sizes = {path.name: path.stat().st_size for path in sorted(Path(directory).iterdir()) if ".onnx" in path.name}
        model = "tiny random model (--quick)" if args.quick else "random ViT-B/16-sized CoDe"
        print(f"{model}: export {export_seconds:.1f} s; "
              + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items()))
        results = {}
        for scenario in SCENARIOS:
            result = inference._in_fresh_process(
                time_runtimes, scenario, directory, args.threads, args.runs, overrides, not args.passive_wait
            )
            results[scenario.key] = result
            print(f"({scenario.key}) {scenario.description}: {result['windows']} window(s); onnxruntime sessions "
                  f"loaded in {result['load_seconds']:.1f} s; scores differ by at most "
                  f"{result['max_score_difference']:.1e}")
    print_table(results)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
