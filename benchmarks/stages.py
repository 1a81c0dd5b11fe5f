"""Where a window's time goes: each stage of code-seg's inference against the bare CLIP pass's efficiency.

    python benchmarks/stages.py [--threads 2] [--runs 5] [--scenario a] [--passive-wait]

A randomly initialised ViT-B/16-sized CoDe (same cost as trained weights) runs the whole request of
benchmarks/inference.py (evaluation resize, windows, masks, KP branch, PAMR, resize back, argmax) with
timers around each stage: forward hooks on the modules and wrappers around the module-level functions that
the pipeline calls, so the code timed is the library's own. Each stage's multiply-accumulates (MACs) are
counted from the shapes; GMAC/s is MACs per second, to compare with the bare ``CLIPVisionModel`` pass's.
Stages and bare passes alternate in one process; medians over ``--runs``. Time outside every stage (tensor
glue, copies, interpolation to the window size) is the ``rest`` row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference  # sibling benchmark script


def vit_block_macs(tokens: int, width: int, mlp_width: int) -> int:
    """A full-attention ViT block: q, k, v, out projections, QK^T and AV, the two MLP matrices."""
    return 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp_width


def self_only_block_macs(tokens: int, width: int, mlp_width: int) -> int:
    """A self-only attention block: v and out projections and the MLP (no q, k, nor attention products)."""
    return 2 * tokens * width * width + 2 * tokens * width * mlp_width


def stage_macs(model, windows: int, grid: tuple[int, int], classes: int) -> dict[str, int]:
    """Multiply-accumulates of each stage for ``windows`` windows of ``grid`` patches (the 1e9-scale work)."""
    vision = model.config.clip_config.vision_config
    width, mlp_width, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    embed = model.config.clip_config.projection_dim
    patches = grid[0] * grid[1]
    tokens = patches + 1
    low, middle, full = patches, 4 * patches, 16 * patches  # decoder input, block-1 output, block-2 output
    block = vit_block_macs(tokens, width, mlp_width)
    return {
        "patch embedding": windows * patches * 3 * patch * patch * width,
        "frozen blocks": windows * (vision.num_hidden_layers - 1) * block,
        "masker block": windows * self_only_block_macs(tokens, width, mlp_width),
        "decoder block 1": windows * low * width * 9 * width,
        "decoder block 2": windows * middle * width * 9 * width,
        "projection": windows * full * width * embed,
        "sim2mask": windows * full * embed * classes,
        "KP branch": windows * (self_only_block_macs(tokens, width, mlp_width) + patches * (width * embed
                                                                                             + embed * classes)),
        "PAMR": windows * full * classes * 8 * len(model.config.pamr_dilations) * model.config.pamr_iterations,
        "bare pass": windows * (patches * 3 * patch * patch * width + vision.num_hidden_layers * block),
        "bare blocks": windows * vision.num_hidden_layers * block,
    }


class StageTimer:
    """Wall-clock seconds per stage name, summed over the calls inside one ``run`` (nesting: inner excluded)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, start, seconds spent in inner stages]

    def start(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def stop(self) -> None:
        name, start, inner = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[name] += elapsed - inner
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextmanager
    def stage(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)

        return timed

    def wrap_generator(self, name: str, function):
        """A generator function timed while it computes each item (not while its consumer works)."""

        def timed(*args, **kwargs):
            items = function(*args, **kwargs)
            while True:
                with self.stage(name):
                    item = next(items, None)
                if item is None:
                    return
                yield item

        return timed

    def hook(self, name: str, module) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop())


def instrument(model, image_processor, bare, timer: StageTimer) -> None:
    """Timers around every stage of a request (hooks and wrappers; nothing computes differently), and around
    the bare pass's blocks."""
    import modeling_code.inference as inference_module
    import modeling_code.pamr as pamr_module

    vision = model.clip.vision_model
    timer.hook("patch embedding", vision.embeddings)
    for layer in vision.encoder.layers[:-1]:
        timer.hook("frozen blocks", layer)
    masker = model.masker
    masker._feature_map = timer.wrap("masker block", masker._feature_map)
    for index, block in enumerate(masker.decoder.blocks):
        timer.hook(f"decoder block {index + 1}", block)
        block.bands = timer.wrap_generator(f"decoder block {index + 1}", block.bands)  # inference's last block
    masker._embed = timer.wrap("projection", masker._embed)
    timer.hook("sim2mask", model.sim2mask)
    model.dense_clip_features = timer.wrap("KP branch", model.dense_clip_features)
    pamr_module.pamr_affinity = timer.wrap("PAMR affinity", pamr_module.pamr_affinity)
    inference_module.pamr = timer.wrap("PAMR", inference_module.pamr)
    inference_module._to_window_size = timer.wrap("to window size", inference_module._to_window_size)
    image_processor.preprocess = timer.wrap("preprocess", image_processor.preprocess)
    image_processor.post_process_semantic_segmentation = timer.wrap(
        "post-process", image_processor.post_process_semantic_segmentation
    )
    for layer in bare.encoder.layers:
        timer.hook("bare blocks", layer)


def profile(scenario_key: str, threads: int, runs: int, overrides: dict | None = None) -> tuple[dict, dict, int]:
    """(median seconds per stage, MACs per stage, windows) for one scenario, bare passes interleaved; the model
    is ``CoDeConfig(**overrides)``, by default ViT-B/16-sized."""
    scenario = next(s for s in inference.SCENARIOS if s.key == scenario_key)
    model, bare, image_processor, vocabulary, image = inference._setup(scenario, threads, overrides)
    timer = StageTimer()
    instrument(model, image_processor, bare, timer)
    bare_run, windows = inference._runner("bare", model, bare, image_processor, vocabulary, image)
    pamr_run, _ = inference._runner("pamr", model, bare, image_processor, vocabulary, image)
    pamr_run(), bare_run()  # warm-up
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        timer.seconds.clear()
        start = time.perf_counter()
        bare_run()
        samples["bare pass"].append(time.perf_counter() - start)
        samples["bare blocks"].append(timer.seconds.pop("bare blocks"))
        start = time.perf_counter()
        pamr_run()
        total = time.perf_counter() - start
        samples["whole request"].append(total)
        samples["rest"].append(total - sum(timer.seconds.values()))
        for name, seconds in timer.seconds.items():
            samples[name].append(seconds)
    height, width = image_processor.eval_size(image.height, image.width)
    window = model.config.window_size
    patch = model.config.patch_size
    grid = (-(-min(window, height) // patch), -(-min(window, width) // patch))
    macs = stage_macs(model, windows, grid, scenario.num_text_classes)
    return {name: statistics.median(values) for name, values in samples.items()}, macs, windows


def print_profile(scenario_key: str, threads: int, runs: int) -> None:
    """Measure ``scenario_key`` in a fresh process and print its stage table."""
    seconds, macs, windows = inference._in_fresh_process(profile, scenario_key, threads, runs)
    bare = seconds["bare pass"]
    bare_rate = macs["bare pass"] / bare / 1e9
    print(f"scenario ({scenario_key}), {windows} window(s), {threads} threads, medians of {runs}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"| {'stage':18s} | {'GMAC':>6s} | {'ms':>7s} | {'x bare':>6s} | {'GMAC/s':>6s} | {'vs bare':>7s} |")
    print(f"|{'-' * 20}|{'-' * 8}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    order = ["bare pass", "bare blocks", *[name for name in macs if not name.startswith("bare")], "PAMR affinity",
             "to window size", "preprocess", "post-process", "rest", "whole request"]
    for name in order:
        if name not in seconds:
            continue
        work = macs.get(name)
        rate = work / seconds[name] / 1e9 if work and seconds[name] else None
        print(f"| {name:18s} | {work / 1e9 if work else 0:6.2f} | {seconds[name] * 1e3:7.1f} | "
              f"{seconds[name] / bare:6.3f} | {rate or 0:6.1f} | {(rate or 0) / bare_rate:7.2f} |")
    counted = sum(work for name, work in macs.items() if name not in ("bare pass", "bare blocks", "PAMR"))
    print(f"counted MACs before PAMR / bare pass: {counted / macs['bare pass']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenario", default="a", choices=[s.key for s in inference.SCENARIOS])
    parser.add_argument("--passive-wait", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (shared machines)")
    args = parser.parse_args()
    if args.passive_wait:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    print_profile(args.scenario, args.threads, args.runs)


if __name__ == "__main__":
    main()
