"""Image-caption training data: sources, mixing, sharding, skipping of bad samples and resumable position.

Sources (one ``DataSourceConfig`` each, see ``build_source``) yield raw ``RawRecord(image, caption)``
records and never decode an image: ``image`` is encoded bytes, a file path, a ``{"bytes", "path"}``
mapping (``datasets.Image(decode=False)``) or ``None`` when the sample has no image. Decoding happens in
the training transform, inside the DataLoader worker, where a corrupt image costs one skipped sample.

``TrainingStream`` is the ``torch.utils.data.IterableDataset`` the trainer iterates. Inside each
DataLoader worker of each process it

1. takes its share of every source: the records are partitioned over ``world_size * num_workers`` splits
   (split index ``rank * num_workers + worker slot``), by whole shards when their number divides evenly and
   by every n-th record otherwise (``datasets.distributed.split_dataset_by_node`` for Hub sources);
2. mixes the sources by weighted random choice and shuffles the records through a seeded buffer;
3. runs ``transform(image, caption, rng) -> dict`` on every record with a ``random.Random``
   seeded from (seed, split, record index), and skips records whose image or caption is unusable,
   counting them by reason (``"image"``: missing image, ``InvalidImageError``, PIL/OS errors;
   ``"caption"``: missing caption, ``NotEnoughNounsError``). Any other exception stops training: it is a bug.

Every yielded sample carries a ``StreamProgress`` under ``STREAM_PROGRESS_KEY``: the skips seen since the
previous sample of the same worker (up to the next usable record, so trailing skips are not lost) and the
number of raw records that worker has consumed. ``make_dataloader`` batches samples with the processor's
collate and merges these into one ``StreamProgress`` per batch; the training loop pops it from the batch and
hands it to ``TrainingStream.record_progress``, which keeps the skip totals and the data position.

Resuming: ``state_dict()`` holds, per worker slot, the raw records consumed by the batches the loop has
received, and which slot delivers the next batch (DataLoader workers deliver batches in turn). A stream
given that state by ``load_state_dict`` skips those records (without transforming them) and rotates the
slots, so it continues with exactly the batches an uninterrupted run would have produced. Resuming needs
the same sources, seed, world size, number of DataLoader workers and batch size.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import posixpath
import random
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

logger = logging.getLogger(__name__)

SourceType = Literal["hub", "webdataset", "jsonl", "folder"]
SOURCE_TYPES: tuple[str, ...] = ("hub", "webdataset", "jsonl", "folder")
# (image column, caption column) when the config leaves them unset. For webdataset tars the "columns" are
# member extensions; folder sources pair images with same-stem .txt files and have no columns.
DEFAULT_COLUMNS: dict[str, tuple[str | None, str | None]] = {
    "hub": ("jpg", "txt"),
    "webdataset": ("jpg", "txt"),
    "jsonl": ("image", "caption"),
    "folder": (None, None),
}
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
SKIP_REASONS: tuple[str, ...] = ("image", "caption")
# Second part of every derived seed: what the random numbers are for.
SEED_SHARD_ORDER, SEED_MIXING, SEED_SHUFFLE_BUFFER, SEED_TRANSFORM = range(4)
STREAM_PROGRESS_KEY = "stream_progress"
# Rows read from a Hub dataset per ``IterableDataset.iter`` call: amortises the per-batch overhead.
HUB_READ_BATCH = 64


class RawRecord(NamedTuple):
    """One undecoded sample: ``image`` is bytes, a path, a ``{"bytes", "path"}`` mapping or None."""

    image: Any
    caption: str | None


@dataclass
class DataSourceConfig:
    """Where one set of image-caption pairs lives and how to read it.

    Args:
        type: ``"hub"`` (anything ``datasets.load_dataset`` opens: a Hub id, a local folder of
            parquet/tar/json files, or a ``save_to_disk`` folder), ``"webdataset"`` (local ``.tar``
            shards), ``"jsonl"`` (lines with an image path and a caption) or ``"folder"`` (images
            with same-stem ``.txt`` captions, searched recursively).
        path: Hub id or folder (hub); a tar file, directory of tars, glob or brace pattern such as
            ``shards/cc3m-{0000..0575}.tar`` (webdataset); the ``.jsonl`` file (image paths are relative
            to its folder); the image folder (folder).
        name: dataset configuration name (hub only).
        split: split to read (hub only).
        data_files: ``data_files`` for ``datasets.load_dataset`` (hub only).
        image_column: image column (hub), preferred image extension (webdataset; ``jpg``, ``jpeg``,
            ``png`` and ``webp`` members are used when it is absent) or JSON key (jsonl). Unset: ``jpg``,
            ``jpg`` and ``image`` respectively.
        caption_column: caption column, extension or key; unset: ``txt``, ``txt``, ``caption``.
        weight: relative sampling weight when several sources are mixed.
        streaming: stream a Hub dataset instead of downloading and preparing it first (hub only).
    """

    type: SourceType
    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | dict[str, Any] | None = None
    image_column: str | None = None
    caption_column: str | None = None
    weight: float = 1.0
    streaming: bool = True

    def __post_init__(self) -> None:
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"Unknown data source type {self.type!r}; expected one of {SOURCE_TYPES}.")
        if not self.path:
            raise ValueError(f"A {self.type} data source needs a path.")
        if not self.weight > 0:
            raise ValueError(f"Data source weights must be positive, got {self.weight} for {self.path!r}.")
        default_image, default_caption = DEFAULT_COLUMNS[self.type]
        self.image_column = self.image_column or default_image
        self.caption_column = self.caption_column or default_caption


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixing several integers (``numpy.random.SeedSequence``): independent streams per use."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0])


def caption_text(value: Any) -> str | None:
    """A caption as stripped text; ``None`` when missing. Bytes are UTF-8 (undecodable bytes replaced)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"Captions must be text, got {type(value).__name__}: {value!r:.80}")
    return value.strip()


def split_order(num_items: int, split_index: int, num_splits: int, seed: int) -> list[int]:
    """Indices of split ``split_index`` of ``num_splits`` after a seeded permutation of ``range(num_items)``.

    Every split permutes with the same seed, so the splits partition the items.
    """
    order = np.random.default_rng(seed).permutation(num_items)
    return [int(index) for index in order[split_index::num_splits]]


class ImageCaptionSource(ABC):
    """A set of image-caption records that can be read split by split, in a seeded order."""

    def __init__(self, config: DataSourceConfig) -> None:
        self.config = config

    @abstractmethod
    def iter_records(self, split_index: int, num_splits: int, seed: int) -> Iterator[RawRecord]:
        """One pass over split ``split_index`` of ``num_splits``; the splits partition the records."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.path!r})"


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``a-{000..002}.tar`` (zero-padded ranges) and ``{x,y}`` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first)
        alternatives = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        alternatives = body.split(",")
    return [expanded for alternative in alternatives for expanded in expand_braces(head + alternative + tail)]


def resolve_shards(pattern: str) -> list[str]:
    """The tar files named by a file, a directory (its ``*.tar``), a glob or a brace pattern."""
    shards: list[str] = []
    for candidate in expand_braces(pattern):
        if os.path.isdir(candidate):
            shards.extend(sorted(glob.glob(os.path.join(candidate, "*.tar"))))
        elif glob.has_magic(candidate):
            shards.extend(sorted(glob.glob(candidate)))
        elif os.path.isfile(candidate):
            shards.append(candidate)
        else:
            raise FileNotFoundError(f"Webdataset shard not found: {candidate!r} (from {pattern!r}).")
    if not shards:
        raise FileNotFoundError(f"No webdataset .tar shard matches {pattern!r}.")
    return shards


def _member_key_and_extension(name: str) -> tuple[str, str]:
    """webdataset naming: ``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``)."""
    directory, basename = posixpath.split(name)
    stem, _, extension = basename.partition(".")
    return posixpath.join(directory, stem), extension.lower()


class WebDatasetSource(ImageCaptionSource):
    """Local webdataset tar shards read with ``tarfile``; a sample is a run of members sharing a key."""

    def __init__(self, config: DataSourceConfig) -> None:
        super().__init__(config)
        self.shards = resolve_shards(config.path)
        preferred = config.image_column.lower()
        self.image_extensions = (preferred, *(ext for ext in IMAGE_EXTENSIONS if ext != preferred))

    @staticmethod
    def _samples(archive: tarfile.TarFile) -> Iterator[list[tarfile.TarInfo]]:
        """Groups of consecutive file members with one key (member data is not read here)."""
        group: list[tarfile.TarInfo] = []
        group_key = None
        for member in archive:
            if not member.isfile() or posixpath.basename(member.name).startswith("."):
                continue
            key, _ = _member_key_and_extension(member.name)
            if group and key != group_key:
                yield group
                group = []
            group_key = key
            group.append(member)
        if group:
            yield group

    def _record(self, archive: tarfile.TarFile, group: list[tarfile.TarInfo]) -> RawRecord:
        by_extension = {_member_key_and_extension(member.name)[1]: member for member in group}
        image_member = next((by_extension[ext] for ext in self.image_extensions if ext in by_extension), None)
        caption_member = by_extension.get(self.config.caption_column)
        image = archive.extractfile(image_member).read() if image_member is not None else None
        caption = archive.extractfile(caption_member).read() if caption_member is not None else None
        return RawRecord(image, caption_text(caption))

    def _read_shards(self, shards: Iterable[str], keep: Callable[[int], bool]) -> Iterator[RawRecord]:
        position = 0
        for shard in shards:
            try:
                with tarfile.open(shard, mode="r:*") as archive:
                    for group in self._samples(archive):
                        if keep(position):
                            yield self._record(archive, group)
                        position += 1
            except (tarfile.TarError, EOFError, OSError) as error:
                # A damaged shard loses its remaining samples, not the training run.
                logger.warning("Stopped reading webdataset shard %s: %s", shard, error)

    def iter_records(self, split_index: int, num_splits: int, seed: int) -> Iterator[RawRecord]:
        order = [self.shards[index] for index in np.random.default_rng(seed).permutation(len(self.shards))]
        if len(order) % num_splits == 0:
            return self._read_shards(order[split_index::num_splits], lambda position: True)
        return self._read_shards(order, lambda position: position % num_splits == split_index)


class JsonlSource(ImageCaptionSource):
    """A JSON-lines file, one ``{image_column: path, caption_column: text}`` object per line.

    The file is checked in full when the source is built (so a wrong key fails at once); only the byte
    offsets of its lines are kept, and lines are re-read while iterating.
    """

    def __init__(self, config: DataSourceConfig) -> None:
        super().__init__(config)
        self.path = Path(config.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL file not found: {config.path!r}.")
        offsets: list[int] = []
        with self.path.open("rb") as handle:
            for line_number, line in enumerate(iter(handle.readline, b""), start=1):
                if line.strip():
                    self._parse(line, line_number)
                    offsets.append(handle.tell() - len(line))
        self.line_offsets = np.asarray(offsets, dtype=np.int64)

    def _parse(self, line: bytes, line_number: int) -> RawRecord:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}:{line_number} is not valid JSON: {error}") from error
        image_key, caption_key = self.config.image_column, self.config.caption_column
        if not isinstance(entry, dict) or image_key not in entry or caption_key not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(
                f"{self.path}:{line_number} needs the keys {image_key!r} and {caption_key!r} "
                f"(set image_column / caption_column); found {found}."
            )
        image = entry[image_key]
        if isinstance(image, str):
            image = str(self.path.parent / image)  # absolute paths stay as they are
        return RawRecord(image, caption_text(entry[caption_key]))

    def iter_records(self, split_index: int, num_splits: int, seed: int) -> Iterator[RawRecord]:
        with self.path.open("rb") as handle:
            for index in split_order(len(self.line_offsets), split_index, num_splits, seed):
                handle.seek(int(self.line_offsets[index]))
                yield self._parse(handle.readline(), index + 1)


class FolderSource(ImageCaptionSource):
    """Image files under a folder (recursively), each captioned by the ``.txt`` file with the same stem."""

    def __init__(self, config: DataSourceConfig) -> None:
        super().__init__(config)
        root = Path(config.path)
        if not root.is_dir():
            raise NotADirectoryError(f"Image folder not found: {config.path!r}.")
        self.images = sorted(
            path
            for path in root.rglob("*")
            if path.suffix.lower() in FOLDER_IMAGE_SUFFIXES and path.is_file()
        )
        if not self.images:
            raise FileNotFoundError(
                f"No image ({', '.join(sorted(FOLDER_IMAGE_SUFFIXES))}) under {config.path!r}."
            )

    def iter_records(self, split_index: int, num_splits: int, seed: int) -> Iterator[RawRecord]:
        for index in split_order(len(self.images), split_index, num_splits, seed):
            image = self.images[index]
            caption_file = image.with_suffix(".txt")
            caption = caption_file.read_bytes() if caption_file.is_file() else None
            yield RawRecord(str(image), caption_text(caption))


def _is_saved_to_disk(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


class HubSource(ImageCaptionSource):
    """A ``datasets`` dataset (Hub id, local data folder or ``save_to_disk`` folder) as an iterable dataset.

    An ``Image`` feature is cast to ``Image(decode=False)``: the iterator hands out encoded bytes, so a
    corrupt image is caught by the transform instead of breaking the iteration.
    """

    def __init__(self, config: DataSourceConfig) -> None:
        super().__init__(config)
        import datasets  # the training extra: only Hub sources need it

        if os.path.isdir(config.path) and _is_saved_to_disk(config.path):
            loaded = datasets.load_from_disk(config.path)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[config.split]
            dataset = loaded.to_iterable_dataset()
        else:
            dataset = datasets.load_dataset(
                config.path,
                config.name,
                split=config.split,
                data_files=config.data_files,
                streaming=config.streaming,
            )
            if not config.streaming:
                dataset = dataset.to_iterable_dataset()
        columns = (config.image_column, config.caption_column)
        if dataset.features is not None:
            missing = [column for column in columns if column not in dataset.features]
            if missing:
                raise ValueError(
                    f"Dataset {config.path!r} has no column {missing}; its columns are "
                    f"{sorted(dataset.features)}. Set image_column / caption_column."
                )
            if isinstance(dataset.features[config.image_column], datasets.Image):
                dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns(list(columns))
        self._warned_uneven_split = False

    def iter_records(self, split_index: int, num_splits: int, seed: int) -> Iterator[RawRecord]:
        from datasets.distributed import split_dataset_by_node

        if self.dataset.num_shards % num_splits and not self._warned_uneven_split:
            self._warned_uneven_split = True
            logger.warning(
                "%s has %d shards, not a multiple of the %d splits (world size x DataLoader workers): every "
                "split reads all the data and keeps one record in %d.",
                self,
                self.dataset.num_shards,
                num_splits,
                num_splits,
            )
        # A one-record buffer shuffles the shard order only; records are shuffled by the stream's buffer.
        dataset = self.dataset.shuffle(seed=seed, buffer_size=1)
        dataset = split_dataset_by_node(dataset, rank=split_index, world_size=num_splits)
        # ``iter`` reads exactly this split: plain iteration inside a DataLoader worker would split the
        # shards among the workers a second time.
        for batch in dataset.iter(batch_size=HUB_READ_BATCH):
            images, captions = batch[self.config.image_column], batch[self.config.caption_column]
            for image, caption in zip(images, captions):
                yield RawRecord(image, caption_text(caption))


SOURCE_CLASSES: dict[str, type[ImageCaptionSource]] = {
    "hub": HubSource,
    "webdataset": WebDatasetSource,
    "jsonl": JsonlSource,
    "folder": FolderSource,
}


def build_source(config: DataSourceConfig | Mapping[str, Any]) -> ImageCaptionSource:
    """The source for a config (or a plain mapping of ``DataSourceConfig`` fields)."""
    if not isinstance(config, DataSourceConfig):
        config = DataSourceConfig(**config)
    return SOURCE_CLASSES[config.type](config)


def default_skip_exceptions() -> dict[str, tuple[type[BaseException], ...]]:
    """Exceptions of the training transform that skip a sample, by skip reason."""
    from ..image_processing_code import InvalidImageError
    from ..text_decomposition import NotEnoughNounsError

    return {
        "image": (InvalidImageError, UnidentifiedImageError, OSError),
        "caption": (NotEnoughNounsError,),
    }


@dataclass(frozen=True)
class StreamProgress:
    """Bookkeeping that travels with samples and batches from a worker to the training loop.

    Attributes:
        slot: the worker slot (0..num_workers-1) that produced it; slots, not worker ids, own the data.
        num_workers: DataLoader workers of the stream (1 without workers).
        records_consumed: raw records that slot has consumed, skipped ones included, up to the next usable
            record: where a resumed slot starts.
        skipped_image: records skipped for their image since the slot's previous sample.
        skipped_caption: records skipped for their caption since the slot's previous sample.
    """

    slot: int
    num_workers: int
    records_consumed: int
    skipped_image: int = 0
    skipped_caption: int = 0

    @classmethod
    def merge(cls, progresses: Sequence[StreamProgress]) -> StreamProgress:
        """One progress for a batch of consecutive samples from one worker: the last position, summed skips."""
        if not progresses:
            raise ValueError("Cannot merge an empty list of stream progresses.")
        last = progresses[-1]
        if any((item.slot, item.num_workers) != (last.slot, last.num_workers) for item in progresses):
            raise ValueError("A batch mixes samples from different DataLoader workers.")
        return cls(
            slot=last.slot,
            num_workers=last.num_workers,
            records_consumed=last.records_consumed,
            skipped_image=sum(item.skipped_image for item in progresses),
            skipped_caption=sum(item.skipped_caption for item in progresses),
        )


@dataclass
class StreamState:
    """Where the stream of one process stands (see ``TrainingStream.state_dict``)."""

    num_workers: int | None = None
    next_slot: int = 0
    records_consumed: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


def shuffle_buffer(records: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffling with a buffer of ``buffer_size`` records (no shuffling for sizes <= 1)."""
    if buffer_size <= 1:
        yield from records
        return
    buffer: list[Any] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


def weighted_interleave(
    streams: Sequence[Iterator[Any]], weights: Sequence[float], rng: random.Random
) -> Iterator[Any]:
    """Draw each record from a stream chosen with probability proportional to its weight; exhausted
    streams drop out and the others keep their relative weights."""
    active = list(zip(streams, weights))
    while active:
        position = 0 if len(active) == 1 else rng.choices(range(len(active)), [w for _, w in active])[0]
        try:
            yield next(active[position][0])
        except StopIteration:
            del active[position]


class TrainingStream(IterableDataset):
    """Infinite (or ``epochs``-long) stream of transformed training samples for one process.

    Args:
        sources: data sources (configs are built with ``build_source``); mixed by their ``weight``.
        transform: ``transform(image, caption, rng) -> dict`` with ``image`` undecoded (see ``RawRecord``),
            ``caption`` a non-empty string and ``rng`` a ``random.Random`` private to the record.
            It raises one of ``skip_exceptions`` for an unusable sample.
        seed: seed of the shard orders, the mixing, the shuffle buffer and every record's ``rng``.
        rank: index of this process; world_size: number of processes.
        shuffle_buffer_size: records held by the shuffle buffer of each worker (<= 1: no buffer).
        epochs: passes over every source; ``None`` repeats the sources forever (each pass in a new order).
        skip_exceptions: ``{"image": (...), "caption": (...)}``: exception classes of ``transform`` that
            skip a sample, by reason; by default ``default_skip_exceptions()``.

    Every process must read its stream with the same number of DataLoader workers: the data is split over
    ``world_size * num_workers`` slots. Resuming re-reads (without transforming) the records it skips.
    """

    def __init__(
        self,
        sources: Sequence[ImageCaptionSource | DataSourceConfig],
        transform: Callable[[Any, str, random.Random], dict[str, Any]],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_size: int = 1000,
        epochs: int | None = None,
        skip_exceptions: Mapping[str, tuple[type[BaseException], ...]] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("TrainingStream needs at least one data source.")
        if not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be at least 1 (or None for an endless stream), got {epochs}.")
        skip_exceptions = default_skip_exceptions() if skip_exceptions is None else dict(skip_exceptions)
        unknown = set(skip_exceptions) - set(SKIP_REASONS)
        if unknown:
            raise ValueError(f"Unknown skip reasons {sorted(unknown)}; the reasons are {SKIP_REASONS}.")
        self.sources = [s if isinstance(s, ImageCaptionSource) else build_source(s) for s in sources]
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epochs = epochs
        self.skip_exceptions = {reason: tuple(skip_exceptions.get(reason, ())) for reason in SKIP_REASONS}
        # Where iteration starts (set by load_state_dict) and where the training loop has got to.
        self._start = StreamState()
        self._progress = StreamState()

    # ----------------------------------------------------------------------------------------- worker side
    def _source_records(self, source_index: int, split_index: int, num_splits: int) -> Iterator[RawRecord]:
        source = self.sources[source_index]
        passes = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in passes:
            records = source.iter_records(
                split_index, num_splits, derive_seed(self.seed, SEED_SHARD_ORDER, source_index, epoch)
            )
            empty = True
            for record in records:
                empty = False
                yield record
            if empty and self.epochs is None:
                raise ValueError(
                    f"{source} gave no record to split {split_index} of {num_splits} (world size x DataLoader "
                    "workers); an endless stream needs records in every split."
                )

    def _records(self, split_index: int, num_splits: int) -> Iterator[RawRecord]:
        streams = [self._source_records(i, split_index, num_splits) for i in range(len(self.sources))]
        mixed = weighted_interleave(
            streams,
            [source.config.weight for source in self.sources],
            random.Random(derive_seed(self.seed, SEED_MIXING, num_splits, split_index)),
        )
        return shuffle_buffer(
            mixed,
            self.shuffle_buffer_size,
            random.Random(derive_seed(self.seed, SEED_SHUFFLE_BUFFER, num_splits, split_index)),
        )

    def _prepare(self, record: RawRecord, split_index: int, index: int) -> tuple[dict[str, Any] | None, str]:
        """(sample, "") or (None, skip reason) for one raw record."""
        if record.image is None:
            return None, "image"
        if not record.caption:
            return None, "caption"
        rng = random.Random(derive_seed(self.seed, SEED_TRANSFORM, split_index, index))
        try:
            return self.transform(record.image, record.caption, rng), ""
        except self.skip_exceptions["image"] + self.skip_exceptions["caption"] as error:
            reason = "image" if isinstance(error, self.skip_exceptions["image"]) else "caption"
            logger.debug("Skipping record %d of split %d (%s): %s", index, split_index, reason, error)
            return None, reason

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        start = self._start
        if start.num_workers is not None and start.num_workers != num_workers:
            raise ValueError(
                f"The stream state was saved with {start.num_workers} DataLoader worker(s) but is read with "
                f"{num_workers}; resume with the same number of workers."
            )
        slot = (worker_id + start.next_slot) % num_workers
        split_index = self.rank * num_workers + slot
        to_skip = start.records_consumed[slot] if start.records_consumed else 0

        records = self._records(split_index, self.world_size * num_workers)
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        pending: dict[str, Any] | None = None
        consumed = to_skip
        for index, record in enumerate(itertools.islice(records, to_skip, None), start=to_skip):
            consumed = index + 1
            sample, reason = self._prepare(record, split_index, index)
            if sample is None:
                skipped[reason] += 1
                continue
            # A sample leaves once the next usable record is found, carrying every skip before that record.
            if pending is not None:
                yield self._with_progress(pending, slot, num_workers, index, skipped)
                skipped = dict.fromkeys(SKIP_REASONS, 0)
            pending = sample
        if pending is not None:
            yield self._with_progress(pending, slot, num_workers, consumed, skipped)

    @staticmethod
    def _with_progress(
        sample: dict[str, Any], slot: int, num_workers: int, consumed: int, skipped: dict[str, int]
    ) -> dict[str, Any]:
        progress = StreamProgress(slot, num_workers, consumed, skipped["image"], skipped["caption"])
        return {**sample, STREAM_PROGRESS_KEY: progress}

    # ------------------------------------------------------------------------------------ main process side
    def record_progress(self, progress: StreamProgress) -> None:
        """Account for one batch the training loop received (its ``batch[STREAM_PROGRESS_KEY]``)."""
        state = self._progress
        if state.num_workers is None:
            state.num_workers = progress.num_workers
            state.records_consumed = [0] * progress.num_workers
        elif state.num_workers != progress.num_workers:
            raise ValueError(
                f"Progress from {progress.num_workers} worker(s) recorded into a stream read with {state.num_workers}."
            )
        state.records_consumed[progress.slot] = progress.records_consumed
        state.next_slot = (progress.slot + 1) % progress.num_workers
        state.skipped["image"] += progress.skipped_image
        state.skipped["caption"] += progress.skipped_caption

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far by reason (``{"image": n, "caption": m}``), over the recorded batches."""
        return dict(self._progress.skipped)

    def state_dict(self) -> dict[str, Any]:
        """The data position after the recorded batches (plain Python values, safe for ``torch.save``/JSON)."""
        state = self._progress
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": state.num_workers,
            "next_slot": state.next_slot,
            "records_consumed": list(state.records_consumed),
            "skipped": dict(state.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue from a ``state_dict()``; a list of them (one per rank, e.g. gathered for a checkpoint)
        is accepted and this rank's entry is used. Call before the DataLoader starts iterating."""
        if not isinstance(state, Mapping):
            matching = [entry for entry in state if entry.get("rank") == self.rank]
            if len(matching) != 1:
                raise ValueError(f"Expected one stream state for rank {self.rank}, found {len(matching)}.")
            state = matching[0]
        for key in ("seed", "world_size", "rank"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"The stream state was saved with {key}={state[key]} but this stream has "
                    f"{key}={getattr(self, key)}; the data position cannot be restored."
                )
        restored = StreamState(
            num_workers=state["num_workers"],
            next_slot=int(state["next_slot"]),
            records_consumed=[int(count) for count in state["records_consumed"]],
            skipped={reason: int(state["skipped"].get(reason, 0)) for reason in SKIP_REASONS},
        )
        self._start = restored
        self._progress = StreamState(
            restored.num_workers, restored.next_slot, list(restored.records_consumed), dict(restored.skipped)
        )


class StreamCollator:
    """Collates samples with ``collate_fn`` and puts their merged ``StreamProgress`` into the batch."""

    def __init__(self, collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        progress = StreamProgress.merge([sample[STREAM_PROGRESS_KEY] for sample in samples])
        batch = self.collate_fn(
            [
                {key: value for key, value in sample.items() if key != STREAM_PROGRESS_KEY}
                for sample in samples
            ]
        )
        batch[STREAM_PROGRESS_KEY] = progress
        return batch


def make_dataloader(
    stream: TrainingStream,
    batch_size: int,
    num_workers: int = 0,
    collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader over ``stream`` whose batches hold ``collate_fn``'s output plus
    ``batch[STREAM_PROGRESS_KEY]`` (a ``StreamProgress``): pop it and pass it to ``stream.record_progress``.

    Every batch comes from a single worker, and workers deliver batches in turn; the last batch of a
    finite stream may be smaller. Do not hand this DataLoader to ``accelerate``'s ``prepare``: the stream
    already splits the data per process, and accelerate would split or dispatch it again.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"Need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}.")
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=StreamCollator(collate_fn),
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
