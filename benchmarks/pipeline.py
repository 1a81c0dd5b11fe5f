"""A VOC-size image through the zero-shot-image-segmentation pipeline vs through CoDeSegmenter (prints figures).

    python benchmarks/pipeline.py [--threads 2] [--runs 5]

A randomly initialised ViT-B/16-sized CoDe model (same cost as trained weights), a 500x375 image and the 20 VOC
classes + background, in one process. Each round times, in turn: the pipeline (it encodes the vocabulary once per
call), the segmenter with a new vocabulary (no cache, as the pipeline), and the segmenter with its vocabulary
cached (the image alone). Medians over the rounds; every call gets a vocabulary of its own, so no cache helps
where none is meant to.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # sibling benchmark script

from modeling_code.pipeline_code import ZeroShotImageSegmentationPipeline
from modeling_code.predict.segmenter import CoDeSegmenter


def _seconds(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def measure(model, processor, image, names: list[str], runs: int) -> dict[str, float]:
    """Median seconds per request: ``pipeline``, ``segmenter`` (new vocabulary) and ``segmenter_cached``."""
    segment = ZeroShotImageSegmentationPipeline(model=model, processor=processor, device="cpu")
    uncached = CoDeSegmenter(model, processor, vocabulary_cache_size=0)
    cached = CoDeSegmenter(model, processor)
    cached(image, names)  # warm-up, and the cached vocabulary
    segment(image, candidate_labels=names)
    times: dict[str, list[float]] = {"pipeline": [], "segmenter": [], "segmenter_cached": []}
    for round_index in range(runs):
        new_names = [*names[:-1], f"{names[-1]} {round_index}"]  # the text encoders run, as for a new request
        times["pipeline"].append(_seconds(segment, image, candidate_labels=new_names))
        times["segmenter"].append(_seconds(uncached, image, new_names))
        times["segmenter_cached"].append(_seconds(cached, image, names))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model, processor = compare.vit_b16_model_and_processor(args.threads)
    names = ["background", *compare.VOC_NAMES]
    figures = measure(model, processor, compare.voc_size_image(), names, args.runs)
    print(f"VOC-size image (500x375), 20 classes + background, {args.threads} threads, median of {args.runs}:")
    print("| path | seconds | x segmenter (new vocabulary) |")
    print("|---|---|---|")
    rows = (
        ("pipeline (vocabulary encoded in the call)", "pipeline"),
        ("CoDeSegmenter, new vocabulary", "segmenter"),
        ("CoDeSegmenter, cached vocabulary (image only)", "segmenter_cached"),
    )
    for label, key in rows:
        print(f"| {label} | {figures[key]:.3f} | {figures[key] / figures['segmenter']:.3f} |")


if __name__ == "__main__":
    main()
