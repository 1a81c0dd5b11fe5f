"""Inference cost of code-seg against the bare CLIP vision pass it is built on (prints figures; not a test).

A randomly initialised ViT-B/16-sized CoDe model (``CoDeModel(CoDeConfig())``: same cost as trained weights)
on CPU, medians of several runs, each scenario in a fresh process:

    (a) one 448x448 window, 21 classes
    (b) a 500x375 image (VOC-sized: 448x597 after the resize, 2 windows), 20 classes + background
    (c) a 2048x1024 image (Cityscapes-sized: 448x896, 3 windows), 19 classes

each with and without PAMR, against (d) a bare ``CLIPVisionModel`` forward over the same windows (one batch).
(a)-(c) time the whole request after the vocabulary is embedded: evaluation resize, windows, PAMR, KP mix,
averaging, resize back to the original size and argmax. Bare and CoDe runs alternate inside one process, so
both see the same machine load. Peak memory is the growth of the process's peak RSS over one run, measured
in a separate fresh process per configuration.

    python benchmarks/inference.py [--runs 5] [--threads 2] [--passive-wait] [--no-memory]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

TARGETS = {"a": 1.30, "b": 1.40}  # PAMR runs / bare passes (PERFORMANCE.md)


@dataclass(frozen=True)
class Scenario:
    key: str
    description: str
    height: int  # original image size
    width: int
    num_text_classes: int
    background: bool


SCENARIOS = (
    Scenario("a", "one 448x448 window, 21 classes", 448, 448, 21, False),
    Scenario("b", "500x375 (VOC), 20 classes + background", 375, 500, 20, True),
    Scenario("c", "2048x1024 (Cityscapes), 19 classes", 1024, 2048, 19, False),
)
CONFIGURATIONS = ("bare", "no_pamr", "pamr")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_model(overrides: dict | None = None):
    """The benchmarks' randomly initialised CoDe, seed 0: ``CoDeConfig(**overrides)``, by default ViT-B/16-sized."""
    import torch

    from modeling_code import CoDeConfig, CoDeModel

    torch.manual_seed(0)
    return CoDeModel(CoDeConfig(**(overrides or {}))).eval()


def _setup(scenario: Scenario, threads: int, overrides: dict | None = None):
    """Everything a run needs, built once: (model, bare vision model, image processor, vocabulary, image)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import CLIPVisionModel

    from modeling_code.apps.allocator import retain_freed_memory
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.inference import VocabularyEmbeddings

    retain_freed_memory()  # as the code-seg command does
    torch.set_num_threads(threads)
    model = random_model(overrides)
    bare = CLIPVisionModel(model.config.clip_config.vision_config).eval()
    width = model.config.clip_config.projection_dim
    names = [f"class {index}" for index in range(scenario.num_text_classes)]
    vocabulary = VocabularyEmbeddings(
        class_names=tuple((["background"] if scenario.background else []) + names),
        background_index=0 if scenario.background else None,
        class_embeddings=F.normalize(torch.randn(scenario.num_text_classes, width), dim=-1),
        kp_class_embeddings=F.normalize(torch.randn(scenario.num_text_classes, width), dim=-1),
        template_set=model.config.inference_template_set,
    )
    pixels = np.random.default_rng(0).integers(0, 256, (scenario.height, scenario.width, 3), dtype=np.uint8)
    return model, bare, CoDeImageProcessor(), vocabulary, Image.fromarray(pixels)


def _runner(configuration: str, model, bare, image_processor, vocabulary, image):
    """A no-argument callable doing one run of ``configuration``, and the number of windows it covers."""
    import torch

    from modeling_code.inference import sliding_windows

    config = model.config
    height, width = image_processor.eval_size(image.height, image.width, config.inference_protocol)
    windows = sliding_windows(height, width, config.window_size, config.window_stride)
    if configuration == "bare":
        batch = torch.randn(len(windows), 3, windows[0].height, windows[0].width)

        def run():
            with torch.no_grad():
                bare(pixel_values=batch, interpolate_pos_encoding=True)

        return run, len(windows)

    def run():
        protocol = config.inference_protocol.replace(use_pamr=configuration == "pamr")
        inputs = image_processor.preprocess(image, protocol=protocol)
        outputs = model(**inputs, **vocabulary.model_inputs(), protocol=protocol)
        image_processor.post_process_semantic_segmentation(outputs)

    return run, len(windows)


def time_interleaved(runners: dict, runs: int) -> dict:
    """{"wall": {name: median seconds}, "cpu": {name: median process CPU seconds}} of each runner: one warm-up
    run each, then ``runs`` rounds that run every runner once, in order."""
    for run in runners.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        "wall": {name: statistics.median(values) for name, values in wall.items()},
        "cpu": {name: statistics.median(values) for name, values in cpu.items()},
    }


def time_scenario(scenario: Scenario, threads: int, runs: int) -> dict:
    """Median wall-clock and process CPU seconds of each configuration, runs interleaved after one warm-up."""
    parts = _setup(scenario, threads)
    runners = {name: _runner(name, *parts)[0] for name in CONFIGURATIONS}
    return {"windows": _runner("bare", *parts)[1], **time_interleaved(runners, runs)}


def peak_memory(scenario: Scenario, threads: int, configuration: str) -> int:
    """Growth of the peak RSS (bytes) over one run of ``configuration``, models and inputs already built."""
    parts = _setup(scenario, threads)
    run, _ = _runner(configuration, *parts)
    baseline = max(_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--scenarios", default="abc", help="subset of a, b, c")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--passive-wait",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE in the measuring processes: on a machine shared with other busy "
        "processes, OpenMP's default spinning makes each parallel region wait for a descheduled thread "
        "(milliseconds per operation), which swamps the work being measured",
    )
    args = parser.parse_args()
    if args.passive_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by the freshly spawned measuring processes
    print(
        f"CPU, {args.threads} threads, median of {args.runs} runs, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'default')}; load average at start {os.getloadavg()}"
    )
    print("wall = elapsed seconds; CPU = process CPU seconds (all threads; steadier on a shared machine)")
    for scenario in SCENARIOS:
        if scenario.key not in args.scenarios:
            continue
        result = _in_fresh_process(time_scenario, scenario, args.threads, args.runs)
        print(f"({scenario.key}) {scenario.description}: {result['windows']} window(s)")
        for clock in ("wall", "cpu"):
            times = result[clock]
            bare = times["bare"]
            print(
                f"    {clock:4s}  bare CLIP (d) {bare:6.2f} s | no PAMR {times['no_pamr']:6.2f} s "
                f"({times['no_pamr'] / bare:4.2f}x) | PAMR {times['pamr']:6.2f} s ({times['pamr'] / bare:4.2f}x)"
            )
            if scenario.key in TARGETS:
                ratio, target = times["pamr"] / bare, TARGETS[scenario.key]
                verdict = "met" if ratio <= target else "NOT met"
                print(
                    f"          ({scenario.key})/(d) with PAMR = {ratio:.2f}, target <= {target:.2f}: {verdict}"
                )
        if not args.no_memory:
            memory = {
                name: _in_fresh_process(peak_memory, scenario, args.threads, name) for name in CONFIGURATIONS
            }
            print(
                "    peak RSS growth over one run: "
                + " | ".join(f"{name} {memory[name] / 2**20:.0f} MiB" for name in CONFIGURATIONS)
            )


if __name__ == "__main__":
    main()
