"""The benchmark runner and its outputs, written against a model-independent predictor.

A predictor maps an RGB image and the benchmark's class names (``"background"`` first for background
benchmarks) to an [H, W] integer map of indices into those names, at the image's own size; asked for several
images per call, it maps a list of images to a list of maps. The runner feeds it every sample (read by a
DataLoader, in worker processes if asked), counts predictions against the mapped labels in a confusion matrix
(one shard per process, matrices summed across processes) and keeps the first few samples for an overlay grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..predict.visualization import draw_legend, drawable_text, legend_font, overlay, palette
from .metrics import ConfusionMatrix
from .segmentation_datasets import SegmentationSource
from .specs import BenchmarkSpec, map_labels

Predictor = Callable[[Image.Image, Sequence[str]], np.ndarray]
BatchPredictor = Callable[[list[Image.Image], Sequence[str]], Sequence[np.ndarray]]

RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
MODEL_INDEX_FILE = "model_index.yaml"
OVERLAY_DIR = "overlays"
MODEL_INDEX_TASK = {"type": "image-segmentation", "name": "Zero-shot semantic segmentation"}


@dataclass
class OverlayRow:
    """One sample kept for the overlay grid: the image, its mapped label and the prediction ([H, W])."""

    name: str
    image: Image.Image
    label: np.ndarray
    prediction: np.ndarray


@dataclass
class BenchmarkResult:
    """The outcome of one benchmark: the summed confusion matrix and what produced it.

    Attributes:
        spec: the benchmark.
        confusion: counts over every evaluated image (all processes).
        num_images: number of evaluated images (all processes).
        source: description of the data source.
        overlays: the first samples with their predictions (main process only).
    """

    spec: BenchmarkSpec
    confusion: ConfusionMatrix
    num_images: int
    source: str
    overlays: list[OverlayRow] = field(default_factory=list)

    @property
    def miou(self) -> float:
        """Mean IoU as a fraction in [0, 1] (NaN if nothing was counted)."""
        return self.metrics()["mIoU"]

    def metrics(self) -> dict[str, Any]:
        """``ConfusionMatrix.compute()``: aAcc, mIoU, mAcc as fractions, per-class IoU / Acc arrays."""
        return self.confusion.compute()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: metrics in %, per-class IoU / accuracy / pixel counts, NaN written as null."""
        metrics = self.metrics()
        per_class = {
            name: {
                "IoU": _percent(metrics["IoU"][index]),
                "Acc": _percent(metrics["Acc"][index]),
                "label_pixels": int(self.confusion.label_area[index]),
                "predicted_pixels": int(self.confusion.prediction_area[index]),
                "intersection_pixels": int(self.confusion.intersection[index]),
            }
            for index, name in enumerate(self.spec.class_names)
        }
        return {
            "display_name": self.spec.display_name,
            "dataset_type": self.spec.dataset_type,
            "split": self.spec.split,
            "source": self.source,
            "num_images": self.num_images,
            "expected_num_images": self.spec.num_images,
            "num_classes": self.spec.num_classes,
            "background": self.spec.background,
            "counted_pixels": int(self.confusion.matrix.sum()),
            "mIoU": _percent(metrics["mIoU"]),
            "mAcc": _percent(metrics["mAcc"]),
            "aAcc": _percent(metrics["aAcc"]),
            "paper_mIoU": self.spec.paper_miou,
            "per_class": per_class,
        }


def _percent(fraction: float) -> float | None:
    return None if math.isnan(fraction) else round(100.0 * float(fraction), 4)


def _sum_across_processes(
    accelerator: Any, confusion: ConfusionMatrix, num_images: int
) -> tuple[ConfusionMatrix, int]:
    """Sum the confusion matrices and image counts of all processes (every process gets the totals)."""
    import torch

    counts = torch.from_numpy(np.append(confusion.matrix.ravel(), num_images)).to(accelerator.device)
    totals = accelerator.reduce(counts, reduction="sum").cpu().numpy()
    matrix = totals[:-1].reshape(confusion.matrix.shape)
    return ConfusionMatrix.from_matrix(matrix, confusion.ignore_index), int(totals[-1])


def _sample_batches(source: SegmentationSource, images_per_call: int, num_workers: int):
    """The source's samples in lists of ``images_per_call``, read by ``num_workers`` processes (0: this one)."""
    from torch.utils.data import DataLoader

    return DataLoader(source, batch_size=images_per_call, num_workers=num_workers, collate_fn=list)


def evaluate_benchmark(
    predictor: Predictor | BatchPredictor,
    spec: BenchmarkSpec,
    source: SegmentationSource,
    accelerator: Any = None,
    num_visualize: int = 8,
    progress: bool = True,
    images_per_call: int = 1,
    num_workers: int = 0,
) -> BenchmarkResult:
    """Run ``predictor`` over ``source`` and count it against the benchmark's labels.

    Args:
        predictor: ``(image, class_names) -> [H, W]`` integer class indices at the image's size; with
            ``images_per_call`` > 1, ``(list of images, class_names) -> list of [H_i, W_i]`` (as
            ``CoDeSegmenter.predict`` takes either).
        spec: the benchmark (class names, label mapping).
        source: the samples (the whole split; each process takes its own shard).
        accelerator: an ``accelerate.Accelerator``; with several processes each evaluates one contiguous
            shard and the confusion matrices are summed, so every process returns the full result.
        num_visualize: how many of the first samples to keep for the overlay grid (main process).
        progress: show a progress bar (main process).
        images_per_call: images given to the predictor at once (windows of several images then share the
            model's passes).
        num_workers: processes that read and decode the samples ahead of the predictor (0: this process).
    """
    if images_per_call < 1 or num_workers < 0:
        raise ValueError(f"Need images_per_call >= 1 and num_workers >= 0, got {images_per_call} and {num_workers}")
    description = source.describe()
    num_processes = 1 if accelerator is None else accelerator.num_processes
    is_main = accelerator is None or accelerator.is_main_process
    if num_processes > 1:
        source = source.shard(num_processes, accelerator.process_index)
    confusion = ConfusionMatrix(spec.num_classes)
    overlays: list[OverlayRow] = []
    num_images = 0
    bar = tqdm(total=len(source), desc=spec.key, unit="img", disable=not (progress and is_main))
    for samples in _sample_batches(source, images_per_call, num_workers):
        labels = []
        for image, raw_label, name in samples:
            label = map_labels(raw_label, spec, apply_id_mapping=source.raw_label_ids)
            if label.shape != (image.height, image.width):
                raise ValueError(
                    f"{spec.key}/{name}: annotation shape {label.shape} differs from the image's "
                    f"(H, W) = {(image.height, image.width)}"
                )
            labels.append(label)
        images = [sample.image for sample in samples]
        if images_per_call == 1:
            predictions = [predictor(images[0], spec.class_names)]
        else:
            predictions = list(predictor(images, spec.class_names))
            if len(predictions) != len(images):
                raise ValueError(f"{spec.key}: the predictor returned {len(predictions)} label maps for "
                                 f"{len(images)} images")
        for (image, _, name), label, prediction in zip(samples, labels, predictions):
            prediction = np.asarray(prediction)
            if prediction.shape != label.shape:
                raise ValueError(
                    f"{spec.key}/{name}: the predictor returned shape {prediction.shape}, expected the "
                    f"image's (H, W) = {label.shape}"
                )
            confusion.update(prediction, label)
            num_images += 1
            if is_main and len(overlays) < num_visualize:
                overlays.append(OverlayRow(name, image, label, prediction))
        bar.update(len(samples))
        if not bar.disable:
            bar.set_postfix(mIoU=f"{100 * confusion.compute()['mIoU']:.1f}")
    bar.close()
    if num_processes > 1:
        confusion, num_images = _sum_across_processes(accelerator, confusion, num_images)
    return BenchmarkResult(spec, confusion, num_images, description, overlays)


def write_results_json(
    results: Sequence[BenchmarkResult], out_dir: str | Path, settings: dict[str, Any]
) -> Path:
    """Write ``results.json``: the run's ``settings`` and, per benchmark key, ``BenchmarkResult.to_dict()``."""
    path = Path(out_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"settings": settings, "benchmarks": {result.spec.key: result.to_dict() for result in results}}
    path.write_text(json.dumps(content, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _format_percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.2f}"


def markdown_table(results: Sequence[BenchmarkResult]) -> str:
    """A markdown table with one row per benchmark: images, mIoU, mAcc, aAcc (in %) and the paper's mIoU."""
    lines = [
        "| Benchmark | Split | Images | mIoU | mAcc | aAcc | Paper mIoU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        metrics = result.metrics()
        paper = "-" if result.spec.paper_miou is None else f"{result.spec.paper_miou:.1f}"
        lines.append(
            f"| {result.spec.display_name} (`{result.spec.key}`) | {result.spec.split} | {result.num_images} | "
            f"{_format_percent(metrics['mIoU'])} | {_format_percent(metrics['mAcc'])} | "
            f"{_format_percent(metrics['aAcc'])} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def model_index_entries(results: Sequence[BenchmarkResult], model_name: str) -> list[dict[str, Any]]:
    """The model card's ``model-index``: one result per benchmark, metric ``mean_iou`` in %."""
    entries = []
    for result in results:
        miou = _percent(result.metrics()["mIoU"])
        entries.append(
            {
                "task": dict(MODEL_INDEX_TASK),
                "dataset": {
                    "name": result.spec.display_name,
                    "type": result.spec.dataset_type,
                    "split": result.spec.split,
                },
                "metrics": [
                    {"type": "mean_iou", "value": None if miou is None else round(miou, 2), "name": "mIoU"}
                ],
            }
        )
    return [{"name": model_name, "results": entries}]


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.BILINEAR)


def save_overlay_grid(
    rows: Sequence[OverlayRow],
    path: str | Path,
    class_names: Sequence[str],
    colors: np.ndarray | None = None,
    cell_height: int = 192,
    alpha: float = 0.6,
) -> Path:
    """Save a PNG grid, one row per sample: image | ground truth overlay | prediction overlay.

    Cells are scaled to ``cell_height``; ignored label pixels are black; a legend lists every class
    that occurs in the shown labels or predictions.
    """
    if not rows:
        raise ValueError("no rows to draw")
    colors = palette(len(class_names)) if colors is None else colors
    cells = [
        [
            _fit_height(cell, cell_height)
            for cell in (
                row.image.convert("RGB"),
                overlay(row.image, row.label, colors, alpha),
                overlay(row.image, row.prediction, colors, alpha),
            )
        ]
        for row in rows
    ]
    column_width = max(cell.width for row_cells in cells for cell in row_cells)
    font = legend_font()
    header, spacing = 18, 4
    grid = Image.new(
        "RGB", (3 * column_width + 2 * spacing, header + len(rows) * (cell_height + spacing)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((column * (column_width + spacing) + 4, 3), title, fill=(0, 0, 0), font=font)
    for row_index, (row, row_cells) in enumerate(zip(rows, cells)):
        top = header + row_index * (cell_height + spacing)
        for column, cell in enumerate(row_cells):
            grid.paste(cell, (column * (column_width + spacing), top))
        draw.text(
            (4, top + 2), drawable_text(row.name, font), fill=(255, 255, 255), font=font, stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
    present = sorted(
        {int(value) for row in rows for values in (row.label, row.prediction) for value in np.unique(values)}
        & set(range(len(class_names)))
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_legend(grid, class_names, colors, present).save(path)
    return path


def write_outputs(
    results: Sequence[BenchmarkResult],
    out_dir: str | Path,
    settings: dict[str, Any],
    model_name: str,
) -> dict[str, Path]:
    """Write every output of a run (call on the main process): results.json, results.md, model_index.yaml
    and ``overlays/<benchmark>.png`` for the benchmarks with kept samples. Returns the written paths by name.
    """
    out_dir = Path(out_dir)
    written = {"results": write_results_json(results, out_dir, settings)}
    written["markdown"] = out_dir / MARKDOWN_FILE
    written["markdown"].write_text(markdown_table(results), encoding="utf-8")
    written["model_index"] = out_dir / MODEL_INDEX_FILE
    written["model_index"].write_text(
        yaml.safe_dump({"model-index": model_index_entries(results, model_name)}, sort_keys=False), encoding="utf-8"
    )
    for result in results:
        if result.overlays:
            written[f"overlays/{result.spec.key}"] = save_overlay_grid(
                result.overlays, out_dir / OVERLAY_DIR / f"{result.spec.key}.png", result.spec.class_names
            )
    return written


__all__ = [
    "MARKDOWN_FILE",
    "MODEL_INDEX_FILE",
    "MODEL_INDEX_TASK",
    "OVERLAY_DIR",
    "RESULTS_FILE",
    "BenchmarkResult",
    "OverlayRow",
    "evaluate_benchmark",
    "markdown_table",
    "model_index_entries",
    "save_overlay_grid",
    "write_outputs",
    "write_results_json",
]
