"""Where benchmark images and annotations come from: mmsegmentation folders or a `datasets` dataset.

A source is a sized, indexable sequence of ``SegmentationSample(image, label, name)``: an RGB PIL image,
the annotation as stored ([H, W] integers, before ``specs.map_labels``) and a sample name. Sources
can be cut to their first ``limit`` samples and split into contiguous shards, one per process.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .specs import BenchmarkSpec, get_benchmark


class SegmentationSample(NamedTuple):
    image: Image.Image
    """RGB image."""
    label: np.ndarray
    """[H, W] integer annotation as stored (raw ids or train ids, see ``raw_label_ids``)."""
    name: str
    """Sample name (the file stem relative to the image folder, or a dataset row name)."""


class SegmentationSource(abc.ABC):
    """A sized, indexable, shardable sequence of samples.

    Subclasses know how many items they hold and load one by position; this base class handles
    ``limit`` (keep the first ``limit`` items) and ``shard`` (contiguous, near-equal parts).

    Attributes:
        raw_label_ids: True when labels hold raw ids that still need the benchmark's label id mapping
            (e.g. Cityscapes ``*_labelIds.png``), False when they already hold train ids.
    """

    raw_label_ids: bool = True

    def __init__(self, num_items: int, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be non-negative, got {limit}")
        self._positions = range(num_items if limit is None else min(limit, num_items))

    @abc.abstractmethod
    def _load(self, position: int) -> SegmentationSample:
        """The sample at ``position`` of the full (unlimited, unsharded) source."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line naming where the samples come from (recorded in results.json)."""

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, index: int) -> SegmentationSample:
        return self._load(self._positions[index])

    def __iter__(self) -> Iterator[SegmentationSample]:
        for position in self._positions:
            yield self._load(position)

    def shard(self, num_shards: int, index: int) -> SegmentationSource:
        """Part ``index`` of ``num_shards`` contiguous parts whose sizes differ by at most one."""
        if num_shards < 1 or not 0 <= index < num_shards:
            raise ValueError(f"shard index {index} is not in [0, {num_shards})")
        total = len(self._positions)
        part = copy.copy(self)
        part._positions = self._positions[index * total // num_shards : (index + 1) * total // num_shards]
        return part


def _read_label(path: Path) -> np.ndarray:
    """An annotation image as its stored integers (palette PNGs give their indices)."""
    with Image.open(path) as label:
        return np.array(label)


def _read_rgb(path: Path) -> Image.Image:
    # The stored orientation, EXIF tag or not: benchmark label PNGs are stored as the image pixels are, so
    # turning the image upright (as load_image does for user photos) would misalign it with its labels.
    with Image.open(path) as image:
        return image.convert("RGB")


class MMSegFolderSource(SegmentationSource):
    """A benchmark split in mmsegmentation's folder layout (see ``layout`` in ``specs.yaml``).

    ``root`` is either mmseg's ``data/`` folder (holding ``VOCdevkit/VOC2012``, ``ADEChallengeData2016``,
    ``cityscapes``, ``coco_stuff164k``, ...) or the benchmark's own data root. Samples come from the
    split file when the layout has one, otherwise from every image under the image folder (sorted).
    Converted annotations (``label_suffix``, e.g. ``*_labelTrainIds.png``) are used when present; otherwise
    the raw ones (``raw_label_suffix``, e.g. ``*_labelIds.png``), which the label id mapping then converts.

    Args:
        root: mmseg's data folder or the benchmark's data root.
        benchmark: a benchmark key or spec.
        limit: keep only the first ``limit`` samples.
    """

    def __init__(self, root: str | Path, benchmark: str | BenchmarkSpec, limit: int | None = None) -> None:
        self.spec = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
        layout = self.spec.layout
        if layout is None:
            raise ValueError(
                f"benchmark {self.spec.key!r} has no folder layout; read it with HFDatasetSource"
            )
        root = Path(root)
        self.data_root = root / layout.data_root if (root / layout.data_root).is_dir() else root
        self.image_dir = self.data_root / layout.image_dir
        self.label_dir = self.data_root / layout.label_dir
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"{self.spec.key}: no image folder {self.image_dir}; expected mmsegmentation's layout "
                f"{layout.data_root}/{layout.image_dir} under {root}, or {root} being {layout.data_root} itself"
            )
        self.names = self._list_names()
        if not self.names:
            raise FileNotFoundError(
                f"{self.spec.key}: no '*{layout.image_suffix}' samples found in {self.image_dir}"
            )
        self.label_suffix, self.raw_label_ids = self._choose_label_files(self.names[0])
        super().__init__(len(self.names), limit)

    def _list_names(self) -> list[str]:
        layout = self.spec.layout
        if layout.split_file is not None:
            split_path = self.data_root / layout.split_file
            if not split_path.is_file():
                raise FileNotFoundError(f"{self.spec.key}: split file {split_path} not found")
            return [line.strip() for line in split_path.read_text().splitlines() if line.strip()]
        suffix = layout.image_suffix
        return sorted(
            path.relative_to(self.image_dir).as_posix()[: -len(suffix)]
            for path in self.image_dir.rglob(f"*{suffix}")
        )

    def _choose_label_files(self, name: str) -> tuple[str, bool]:
        """The annotation suffix in use and whether it holds raw ids, decided on the first sample."""
        layout = self.spec.layout
        candidates = [(layout.label_suffix, False)]
        if layout.raw_label_suffix is not None:
            candidates.append((layout.raw_label_suffix, True))
        for suffix, raw in candidates:
            if (self.label_dir / f"{name}{suffix}").is_file():
                return suffix, raw
        tried = " or ".join(str(self.label_dir / f"{name}{suffix}") for suffix, _ in candidates)
        raise FileNotFoundError(f"{self.spec.key}: no annotation for sample {name!r}: looked for {tried}")

    def _load(self, position: int) -> SegmentationSample:
        name = self.names[position]
        image = _read_rgb(self.image_dir / f"{name}{self.spec.layout.image_suffix}")
        label = _read_label(self.label_dir / f"{name}{self.label_suffix}")
        return SegmentationSample(image, label, name)

    def describe(self) -> str:
        return f"mmseg folder {self.data_root} ({self.spec.layout.image_dir}, {self.spec.layout.label_dir}/*{self.label_suffix})"


def _open_dataset(dataset: Any, split: str, load_kwargs: dict[str, Any]) -> Any:
    """A ``datasets.Dataset`` from a loaded dataset, a ``save_to_disk`` folder, a local folder or a Hub id."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not in {path}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(str(dataset), split=split, **load_kwargs)


def _to_rgb(value: Any, column: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        return _read_rgb(Path(value))
    if isinstance(value, np.ndarray):
        return Image.fromarray(value).convert("RGB")
    raise TypeError(f"column {column!r} must hold images (PIL, path or array), got {type(value).__name__}")


def _to_label(value: Any, column: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        label = np.array(value)
    elif isinstance(value, (str, Path)):
        label = _read_label(Path(value))
    else:
        label = np.asarray(value)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"column {column!r} must hold [H, W] integer class-id maps, got shape {label.shape} dtype {label.dtype}"
        )
    return label


class HFDatasetSource(SegmentationSource):
    """Samples from a Hugging Face ``datasets`` dataset: a Hub id, a local folder or a loaded dataset.

    Args:
        dataset: a ``datasets.Dataset``, a folder written by ``save_to_disk`` (read with
            ``load_from_disk``), or anything ``load_dataset`` opens (Hub id, parquet or imagefolder folder).
        split: the split to read (ignored for an already loaded ``Dataset``).
        image_column: column of RGB images (PIL images, paths or arrays).
        label_column: column of [H, W] integer annotations (images, paths or arrays).
        name_column: optional column naming each sample; rows are named ``{split}/{index}`` otherwise.
        raw_label_ids: whether the labels hold raw ids that still need the benchmark's label id mapping.
        limit: keep only the first ``limit`` samples.
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name``, ``data_files``, ``revision``).
    """

    def __init__(
        self,
        dataset: Any,
        split: str = "validation",
        image_column: str = "image",
        label_column: str = "label",
        name_column: str | None = None,
        raw_label_ids: bool = True,
        limit: int | None = None,
        **load_kwargs: Any,
    ) -> None:
        self.origin = dataset if isinstance(dataset, (str, Path)) else type(dataset).__name__
        self.split = split
        self.dataset = _open_dataset(dataset, split, load_kwargs)
        columns = [column for column in (image_column, label_column, name_column) if column is not None]
        missing = [column for column in columns if column not in self.dataset.column_names]
        if missing:
            raise ValueError(f"columns {missing} not in the dataset; it has {self.dataset.column_names}")
        self.image_column = image_column
        self.label_column = label_column
        self.name_column = name_column
        self.raw_label_ids = raw_label_ids
        super().__init__(len(self.dataset), limit)

    def _load(self, position: int) -> SegmentationSample:
        row = self.dataset[position]
        name = str(row[self.name_column]) if self.name_column else f"{self.split}/{position}"
        return SegmentationSample(
            _to_rgb(row[self.image_column], self.image_column),
            _to_label(row[self.label_column], self.label_column),
            name,
        )

    def describe(self) -> str:
        return f"datasets {self.origin} (split {self.split}, columns {self.image_column}/{self.label_column})"


def build_source(
    spec: BenchmarkSpec,
    *,
    data_root: str | Path | None = None,
    hf_dataset: Any = None,
    split: str = "validation",
    image_column: str = "image",
    label_column: str = "label",
    raw_label_ids: bool = True,
    limit: int | None = None,
) -> SegmentationSource:
    """The source a command line asks for: exactly one of ``data_root`` (mmseg folders) or ``hf_dataset``."""
    if (data_root is None) == (hf_dataset is None):
        raise ValueError("give exactly one data source: data_root (mmsegmentation folders) or hf_dataset")
    if data_root is not None:
        return MMSegFolderSource(data_root, spec, limit=limit)
    return HFDatasetSource(
        hf_dataset, split, image_column, label_column, raw_label_ids=raw_label_ids, limit=limit
    )
