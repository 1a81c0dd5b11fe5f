"""The zero-shot segmentation benchmarks as data: class names, background flag, label mapping, folder layout.

Everything comes from ``specs.yaml`` beside this module; this module only types it and applies the
label mapping that turns an annotation file's raw ids into the class indices the metric counts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .metrics import IGNORE_INDEX

BENCHMARKS_FILE = Path(__file__).with_name("specs.yaml")
ALL_BENCHMARKS = "all"


@dataclass(frozen=True)
class LabelIdMapping:
    """How raw annotation ids become class indices (e.g. Cityscapes labelIds -> train ids).

    Attributes:
        class_raw_ids: the raw id of each class, in class order; ``None`` for a class without a raw id.
        unmapped: the class index every raw id not in ``class_raw_ids`` becomes (255: ignored).
    """

    class_raw_ids: tuple[int | None, ...]
    unmapped: int

    def apply(self, raw_label: np.ndarray) -> np.ndarray:
        """Map raw ids to class indices. ``raw_label``: [H, W] non-negative ints -> [H, W] int64."""
        raw_label = np.asarray(raw_label)
        if raw_label.size and raw_label.min() < 0:
            raise ValueError(f"raw label ids must be non-negative, got minimum {raw_label.min()}")
        listed = [raw_id for raw_id in self.class_raw_ids if raw_id is not None]
        table_size = max([int(raw_label.max(initial=0)), *listed]) + 1
        lookup = np.full(table_size, self.unmapped, dtype=np.int64)
        for class_index, raw_id in enumerate(self.class_raw_ids):
            if raw_id is not None:
                lookup[raw_id] = class_index
        return lookup[raw_label]


@dataclass(frozen=True)
class FolderLayout:
    """Where a benchmark's split lives in mmsegmentation's ``data/`` folder (paths relative to ``data_root``)."""

    data_root: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split_file: str | None = None
    raw_label_suffix: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark of the TCL / GroupViT protocol.

    Attributes:
        key: short name used on the command line (``voc``, ``context59``, ...).
        display_name, dataset_type, split: how results name the dataset (model-index name / type / split).
        num_images: size of the evaluation split (None when unknown).
        class_names: the class names the model is prompted with; a class's index is its position.
        background: whether class 0 is the literal ``"background"`` class.
        reduce_zero_label: mmseg's reduction (label 0 ignored, every other label minus 1).
        label_id_mapping: raw annotation ids -> class indices, if the raw ids are not class indices.
        layout: the mmsegmentation folder layout (None for a custom vocabulary).
        paper_miou: CoDe's reported mIoU in %, if any.
    """

    key: str
    display_name: str
    dataset_type: str
    split: str
    num_images: int | None
    class_names: tuple[str, ...]
    background: bool
    reduce_zero_label: bool
    layout: FolderLayout | None = None
    label_id_mapping: LabelIdMapping | None = None
    paper_miou: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _spec_from_entry(key: str, entry: dict[str, Any]) -> BenchmarkSpec:
    entry = dict(entry)
    mapping = entry.pop("label_id_mapping", None)
    spec = BenchmarkSpec(
        key=key,
        class_names=tuple(entry.pop("class_names")),
        layout=FolderLayout(**entry.pop("layout")),
        label_id_mapping=None
        if mapping is None
        else LabelIdMapping(class_raw_ids=tuple(mapping["class_raw_ids"]), unmapped=mapping["unmapped"]),
        **entry,
    )
    if spec.background and spec.class_names[0] != "background":
        raise ValueError(f"benchmark {key!r} has a background class but class 0 is {spec.class_names[0]!r}")
    if spec.label_id_mapping is not None and len(spec.label_id_mapping.class_raw_ids) != spec.num_classes:
        raise ValueError(
            f"benchmark {key!r}: label_id_mapping lists {len(spec.label_id_mapping.class_raw_ids)} raw ids "
            f"for {spec.num_classes} classes"
        )
    return spec


@functools.cache
def _load_benchmarks() -> dict[str, BenchmarkSpec]:
    entries = yaml.safe_load(BENCHMARKS_FILE.read_text())
    return {key: _spec_from_entry(key, entry) for key, entry in entries.items()}


def list_benchmarks() -> list[str]:
    """The benchmark keys, in the order of ``specs.yaml``."""
    return list(_load_benchmarks())


def get_benchmark(key: str) -> BenchmarkSpec:
    """The benchmark called ``key``; a ``ValueError`` lists the known keys otherwise."""
    benchmarks = _load_benchmarks()
    if key not in benchmarks:
        raise ValueError(
            f"unknown benchmark {key!r}; choose from {', '.join(benchmarks)} or {ALL_BENCHMARKS!r}"
        )
    return benchmarks[key]


def expand_benchmarks(selection: str | Sequence[str]) -> list[BenchmarkSpec]:
    """Resolve ``"all"``, one key, a comma-separated string of keys or a list of keys to specs (no repeats)."""
    keys = selection.split(",") if isinstance(selection, str) else list(selection)
    keys = [key.strip() for key in keys if key.strip()]
    if not keys:
        raise ValueError(
            f"no benchmark selected; choose from {', '.join(list_benchmarks())} or {ALL_BENCHMARKS!r}"
        )
    if ALL_BENCHMARKS in keys:
        keys = list_benchmarks()
    return [get_benchmark(key) for key in dict.fromkeys(keys)]


def custom_benchmark(
    class_names: Sequence[str],
    background: bool = False,
    reduce_zero_label: bool = False,
    key: str = "custom",
    split: str = "validation",
) -> BenchmarkSpec:
    """A benchmark for any labelled dataset: labels index ``class_names``, 255 is ignored.

    With ``background``, ``class_names[0]`` must be ``"background"``. There is no folder layout: read the
    data with ``HFDatasetSource``.
    """
    names = tuple(class_names)
    if not names:
        raise ValueError("a custom benchmark needs at least one class name")
    if background and names[0] != "background":
        raise ValueError(f"with background=True the first class must be 'background', got {names[0]!r}")
    return BenchmarkSpec(
        key=key,
        display_name=key,
        dataset_type=key,
        split=split,
        num_images=None,
        class_names=names,
        background=background,
        reduce_zero_label=reduce_zero_label,
    )


def map_labels(raw_label: np.ndarray, spec: BenchmarkSpec, *, apply_id_mapping: bool = True) -> np.ndarray:
    """Turn an annotation as stored into the class indices the metric counts (255 = ignored).

    Applies the benchmark's raw-id mapping (unless ``apply_id_mapping`` is False because the file already
    holds train ids, e.g. Cityscapes ``*_labelTrainIds.png``), then mmseg's ``reduce_zero_label``.

    Args:
        raw_label: [H, W] integer annotation.
        spec: the benchmark.
        apply_id_mapping: whether ``raw_label`` holds raw ids that still need ``spec.label_id_mapping``.

    Returns:
        [H, W] int64 labels in ``[0, spec.num_classes)`` or 255.
    """
    label = np.asarray(raw_label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"{spec.key}: a label must be a 2-D integer class-id map, got shape {label.shape} dtype {label.dtype}"
        )
    label = label.astype(np.int64)
    if apply_id_mapping and spec.label_id_mapping is not None:
        label = spec.label_id_mapping.apply(label)
    if spec.reduce_zero_label:
        ignored = (label == 0) | (label == IGNORE_INDEX)
        label = np.where(ignored, IGNORE_INDEX, label - 1)
    invalid = (label != IGNORE_INDEX) & ((label < 0) | (label >= spec.num_classes))
    if invalid.any():
        raise ValueError(
            f"{spec.key}: label values {np.unique(label[invalid]).tolist()[:10]} are outside the "
            f"{spec.num_classes} classes and the ignore label {IGNORE_INDEX}; wrong dataset or label mapping?"
        )
    return label
