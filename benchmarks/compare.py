"""Every row of shared/reference/PERFORMANCE.md for code-seg on this CPU, side by side with the targets.

    python benchmarks/compare.py [--threads 2] [--runs 3] [--passive-wait] [--stages]

A randomly initialised ViT-B/16-sized CoDe (same cost as trained weights). Each row: our median time, our ratio
to a bare ``CLIPVisionModel`` pass over the same windows measured in the same process, and the target. The
training-step peak RSS is measured in a fresh subprocess. ``--stages`` adds, for the window and the VOC-size
image, where the time goes: each stage's time, multiply-accumulates and their rate against the bare pass's
(benchmarks/stages.py). Reuses benchmarks/inference.py, train_step.py and stages.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference  # sibling benchmark scripts
import stages
import train_step

from modeling_code.evaluation.specs import get_benchmark

VOC_NAMES = get_benchmark("voc20").class_names

ORIGINAL = {  # PERFORMANCE.md: (original release, ratio to bare, code-seg target)
    "bare": ("0.80 s", "1.00", "(the floor)"),
    "window": ("1.25 s", "1.55", "<= 1.25x"),
    "window_pamr": ("1.59 s", "1.97", "<= 1.30x"),
    "voc": ("3.30 s", "2.05", "<= 1.40x"),
    "vocabulary": ("6.07 s", "-", "<= 0.6 s"),
    "demo": ("9.4 s", "-", "<= 3 s"),
    "train": ("3.59 s", "-", "<= 2.5 s"),
    "rss": ("3.0 GB", "-", "<= 1.8 GB"),
    "frozen": ("299 M", "-", "~150 M"),
}


def _median_seconds(run, runs: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vit_b16_model_and_processor(threads: int):
    """A random ViT-B/16-sized CoDe model and a processor whose tokenizer knows the VOC names and templates, set
    up as the code-seg command and the demo run (freed memory retained, ``threads`` threads)."""
    import tempfile

    import torch

    from modeling_code import CoDeConfig, CoDeModel
    from modeling_code.apps.allocator import retain_freed_memory
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.processing_code import CoDeProcessor
    from modeling_code.templates import get_templates
    from modeling_code.toy.word_tokenizer import build_clip_tokenizer

    retain_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = CoDeModel(CoDeConfig()).eval()
    words = {w.strip(".,{}") for t in get_templates("custom") for w in t.split()} | set(VOC_NAMES)
    with tempfile.TemporaryDirectory() as directory:  # ids index into the 49,408-row embedding like CLIP's
        tokenizer = build_clip_tokenizer(sorted(words), directory)
    model.config.clip_config.text_config.eos_token_id = tokenizer.eos_token_id
    model.prompt_learner.eos_token_id = tokenizer.eos_token_id
    return model, CoDeProcessor(CoDeImageProcessor(), tokenizer)


def voc_size_image():
    """A 500x375 RGB image of random pixels (a VOC image's size: 2 windows after the resize)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))


def vocabulary_and_demo(threads: int, runs: int) -> tuple[float, float]:
    """(20-class vocabulary seconds, demo request with a new vocabulary seconds)."""
    from modeling_code.inference import encode_vocabulary
    from modeling_code.predict.segmenter import CoDeSegmenter

    model, processor = vit_b16_model_and_processor(threads)
    vocabulary_seconds = _median_seconds(lambda: encode_vocabulary(model, processor, list(VOC_NAMES)), runs)

    image = voc_size_image()
    counter = iter(range(10**6))

    def demo_request():  # a fresh vocabulary every time: the cache cannot help
        segmenter = CoDeSegmenter(model, processor, vocabulary_cache_size=0)
        names = ["background", *VOC_NAMES[:-1], f"{VOC_NAMES[-1]} {next(counter)}"]
        segmenter(image, names)

    demo_seconds = _median_seconds(demo_request, runs)
    return vocabulary_seconds, demo_seconds


def training_step(threads: int, runs: int) -> tuple[dict[bool, tuple[float, float]], dict]:
    """({region checkpointing off/on: (median step seconds, peak RSS MB)}, parameter report)."""
    import torch

    torch.set_num_threads(threads)
    results = {}
    for checkpointing in (False, True):
        times, model = train_step.run_steps("vit-b16", batch_size=2, steps=runs, region_checkpointing=checkpointing)
        params = train_step.parameter_report(model)
        del model
        rss = train_step.peak_rss_mb("vit-b16", threads, 2, region_checkpointing=checkpointing)
        results[checkpointing] = (statistics.median(times), rss)
    return results, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--passive-wait", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (shared machines)")
    parser.add_argument("--stages", action="store_true", help="also profile the window and VOC image by stage")
    args = parser.parse_args()
    if args.passive_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    print(f"code-seg vs the original release: CPU, {args.threads} threads, medians of {args.runs} runs, "
          f"load average {os.getloadavg()[0]:.1f}")

    window = inference._in_fresh_process(inference.time_scenario, inference.SCENARIOS[0], args.threads, args.runs)
    voc = inference._in_fresh_process(inference.time_scenario, inference.SCENARIOS[1], args.threads, args.runs)
    vocabulary_seconds, demo_seconds = inference._in_fresh_process(vocabulary_and_demo, args.threads, args.runs)
    training, params = inference._in_fresh_process(training_step, args.threads, args.runs)
    (train_seconds, train_rss), (lean_seconds, lean_rss) = training[False], training[True]

    bare = window["wall"]["bare"]
    rows = [
        ("bare CLIP vision pass, one 448x448 window", "bare", f"{bare:.2f} s", "1.00"),
        ("one 448 window, masks + KP, no PAMR", "window", f"{window['wall']['no_pamr']:.2f} s",
         f"{window['wall']['no_pamr'] / bare:.2f}"),
        ("one 448 window, masks + KP + PAMR", "window_pamr", f"{window['wall']['pamr']:.2f} s",
         f"{window['wall']['pamr'] / bare:.2f}"),
        ("VOC-size image (500x375 -> 2 windows), PAMR", "voc", f"{voc['wall']['pamr']:.2f} s",
         f"{voc['wall']['pamr'] / voc['wall']['bare']:.2f} (vs 2 passes)"),
        ("vocabulary embeddings: 20 classes, prompted + 9 templates", "vocabulary", f"{vocabulary_seconds:.2f} s", "-"),
        ("demo request with a new vocabulary (vocabulary + VOC image)", "demo", f"{demo_seconds:.2f} s", "-"),
        ("training step, batch 2, K = 2 nouns, 224 px", "train",
         f"{train_seconds:.2f} s ({2 / train_seconds:.2f} samples/s)", "-"),
        ("training peak memory (process RSS)", "rss", f"{train_rss / 1024:.2f} GB", "-"),
        ("  the same with region activation checkpointing", "rss",
         f"{lean_rss / 1024:.2f} GB, step {lean_seconds:.2f} s", "-"),
        ("frozen parameters held", "frozen", f"{params['frozen_params_M']:.0f} M (CLIP once)", "-"),
    ]
    header = f"| {'work':60s} | {'original':9s} | {'orig. ratio':11s} | {'code-seg':26s} | {'ratio':20s} | target |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 2) for cell in header.strip("|").split("|")) + "|")
    for title, key, ours, ratio in rows:
        original, original_ratio, target = ORIGINAL[key]
        print(f"| {title:60s} | {original:9s} | {original_ratio:11s} | {ours:26s} | {ratio:20s} | {target} |")
    if args.stages:
        for scenario in inference.SCENARIOS[:2]:
            print()
            stages.print_profile(scenario.key, args.threads, args.runs)


if __name__ == "__main__":
    main()
