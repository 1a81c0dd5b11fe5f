"""Evaluate a CoDe model on benchmarks: the one implementation behind ``code-seg evaluate`` and
``training/evaluate.py``, and the trainer's periodic evaluation.

Inference follows the model config's protocol (PAMR, KP mix, background threshold, 448/224 windows); every
setting can be overridden per run (``INFERENCE_SETTINGS``, names of ``InferenceProtocol`` fields).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

from ..inference import parse_class_list
from .arguments import add_evaluate_arguments  # noqa: F401  (its home before 0.2; training/evaluate.py)
from .evaluator import BenchmarkResult, evaluate_benchmark, write_outputs
from .segmentation_datasets import build_source
from .specs import custom_benchmark, expand_benchmarks, get_benchmark

# The evaluation command's overrides (--no_pamr, --kp_weight, ...): InferenceProtocol fields.
INFERENCE_SETTINGS = (
    "use_pamr",
    "pamr_iterations",
    "kp_weight",
    "background_threshold",
    "window_size",
    "window_stride",
    "short_side",
)

# How samples reach the model, by device. On the CPU the model is the bottleneck and data workers would take its
# cores: one image per call, read in the process. On an accelerator several images per call let the windows of
# different images share the model's passes (``inference.segment_images`` batches them under its memory
# budget), and workers decode the next images meanwhile.
CPU_IMAGES_PER_CALL, CPU_DATA_WORKERS = 1, 0
ACCELERATOR_IMAGES_PER_CALL, ACCELERATOR_DATA_WORKERS = 16, 4


def sample_loading(device: Any, images_per_call: int | None = None, num_workers: int | None = None) -> tuple[int, int]:
    """(images per predictor call, data workers) of an evaluation on ``device``; given values are kept."""
    on_cpu = str(device).split(":")[0] == "cpu"
    if images_per_call is None:
        images_per_call = CPU_IMAGES_PER_CALL if on_cpu else ACCELERATOR_IMAGES_PER_CALL
    if num_workers is None:
        num_workers = CPU_DATA_WORKERS if on_cpu else min(ACCELERATOR_DATA_WORKERS, os.cpu_count() or 1)
    return images_per_call, num_workers


def with_inference_settings(model, **settings: Any):
    """Deprecated (goes in 0.3): pass ``protocol=model.config.inference_protocol.replace(**settings)``."""
    warnings.warn(
        "with_inference_settings is deprecated and goes in 0.3: give the segmenter "
        "protocol=model.config.inference_protocol.replace(...)",
        FutureWarning,
        stacklevel=2,
    )
    model.config = copy.deepcopy(model.config)
    model.config.inference_protocol = model.config.inference_protocol.replace(**settings)
    return model


def evaluation_spec(benchmark: str | None = None, class_names: list[str] | None = None, background: bool = False):
    """The ``BenchmarkSpec`` of a benchmark key, or of a custom class list (``background`` prepends it)."""
    if benchmark:
        return get_benchmark(benchmark)
    if class_names:
        return custom_benchmark(["background", *class_names] if background else list(class_names), background)
    raise ValueError("evaluation needs a benchmark key or a class_names list")


def evaluate_dataset(
    model,
    processor,
    dataset: dict[str, Any],
    benchmark: str | None = None,
    class_names: list[str] | None = None,
    background: bool = False,
    limit: int | None = None,
    accelerator: Any = None,
    progress: bool = True,
    num_visualize: int = 0,
    images_per_call: int | None = None,
    num_workers: int | None = None,
    **settings: Any,
) -> BenchmarkResult:
    """mIoU of ``model`` on one segmentation set (used by the trainer's periodic evaluation).

    Args:
        dataset: ``{"root": mmseg data root}`` or ``{"path": datasets id/dir, "split", "image_column",
            "label_column", "raw_label_ids"}``.
        benchmark: a benchmark key giving class names and label mapping; otherwise ``class_names`` (with
            ``background`` prepending the background class) describe the labels as stored.
        images_per_call, num_workers: how samples reach the model; default by its device (``sample_loading``).
        settings: inference overrides: ``InferenceProtocol`` fields (``use_pamr=False``, ``kp_weight=1.0``, ...).
    """
    from ..predict.segmenter import CoDeSegmenter

    spec = evaluation_spec(benchmark, class_names, background)
    segmenter = CoDeSegmenter(model, processor, protocol=model.config.inference_protocol.replace(**settings))
    images_per_call, num_workers = sample_loading(model.device, images_per_call, num_workers)
    return evaluate_benchmark(segmenter.predict, spec, _source(spec, dataset, limit), accelerator=accelerator,
                              num_visualize=num_visualize, progress=progress,
                              images_per_call=images_per_call, num_workers=num_workers)


def _source(spec, dataset: dict[str, Any], limit: int | None):
    dataset = dict(dataset)
    if "root" in dataset:
        return build_source(spec, data_root=dataset.pop("root"), limit=limit)
    return build_source(
        spec,
        hf_dataset=dataset.pop("path"),
        split=dataset.pop("split", "validation"),
        image_column=dataset.pop("image_column", "image"),
        label_column=dataset.pop("label_column", "label"),
        raw_label_ids=dataset.pop("raw_label_ids", True),
        limit=limit,
    )


# ------------------------------------------------------------------------------------------------ command line
def run_evaluate(args: argparse.Namespace) -> dict[str, Path]:
    """Evaluate every requested benchmark (each process its shard) and write the outputs on the main process."""
    # Names and folders first: a typo is reported before the model is loaded.
    if args.class_names:
        names = parse_class_list(args.class_names)
        specs = [custom_benchmark(["background", *names] if args.background else names, args.background)]
    else:
        specs = expand_benchmarks(args.benchmark)
    if args.data_root and not Path(args.data_root).is_dir():
        raise FileNotFoundError(f"--data_root {args.data_root} is not a folder")

    import torch
    from accelerate import Accelerator

    from ..predict.segmenter import CoDeSegmenter

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    settings = {name: getattr(args, name) for name in INFERENCE_SETTINGS if getattr(args, name, None) is not None}
    segmenter = CoDeSegmenter.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=accelerator.device)
    segmenter.protocol = segmenter.protocol.replace(**settings)
    images_per_call, num_workers = sample_loading(accelerator.device, args.batch_size, args.num_workers)
    results = []
    for spec in specs:
        with accelerator.main_process_first():
            if args.data_root:
                source = build_source(spec, data_root=args.data_root, limit=args.limit)
            else:
                source = build_source(spec, hf_dataset=args.dataset, split=args.split, image_column=args.image_column,
                                      label_column=args.label_column, raw_label_ids=not args.labels_are_mapped,
                                      limit=args.limit)
        results.append(evaluate_benchmark(segmenter.predict, spec, source, accelerator=accelerator,
                                          num_visualize=args.num_visualize,
                                          progress=accelerator.is_local_main_process,
                                          images_per_call=images_per_call, num_workers=num_workers))
    outputs: dict[str, Path] = {}
    if accelerator.is_main_process:
        run_settings = {
            "model": str(args.model),
            "dtype": args.dtype,
            "processes": accelerator.num_processes,
            "images_per_call": images_per_call,
            "data_workers": num_workers,
            **dataclasses.asdict(segmenter.protocol),
        }
        outputs = write_outputs(results, args.output_dir, run_settings, model_name=Path(str(args.model)).name)
        print((Path(args.output_dir) / "results.md").read_text())
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears the process group down before exit (gloo threads otherwise abort it)
    return outputs
