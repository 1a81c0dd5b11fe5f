"""Data sources and the training stream: records, skipping and counting bad samples, splitting, resuming."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from modeling_code.image_processing_code import CoDeImageProcessor, InvalidImageError
from modeling_code.processing_code import CoDeProcessor
from modeling_code.text_decomposition import NotEnoughNounsError
from modeling_code.training.data_sources import (
    STREAM_PROGRESS_KEY,
    DataSourceConfig,
    HubSource,
    JsonlSource,
    StreamProgress,
    TrainingStream,
    build_source,
    expand_braces,
    make_dataloader,
    resolve_shards,
)

datasets.disable_progress_bars()

NOUNS = frozenset({"cat", "dog", "car", "tree", "bird", "boat", "house", "horse"})


def encoded_image(
    color: tuple[int, int, int], image_format: str = "PNG", size: tuple[int, int] = (6, 4)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, image_format)
    return buffer.getvalue()


def open_raw_image(raw) -> Image.Image:
    """Decode what a source yields (bytes, path or datasets' {"bytes", "path"} mapping)."""
    if isinstance(raw, dict):
        raw = raw["bytes"] if raw.get("bytes") is not None else raw["path"]
    with Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw) as image:
        image.load()
        return image.convert("RGB")


def toy_transform(image, caption: str, rng: random.Random) -> dict:
    """Stand-in for the processor's training transform: raises the real skip exceptions."""
    nouns = [word for word in caption.split() if word in NOUNS]
    if not nouns:
        raise NotEnoughNounsError(caption, nouns, 1)
    rgb = open_raw_image(image)  # PIL errors (UnidentifiedImageError, OSError) propagate
    if rgb.width < 2:
        raise InvalidImageError("too narrow")
    return {"caption": caption, "pixel": torch.tensor(rgb.getpixel((0, 0))), "draw": rng.random()}


def collate_captions(samples: list[dict]) -> dict:
    return {"captions": [s["caption"] for s in samples], "draws": [s["draw"] for s in samples]}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str | None, image: bytes | None, extension: str = "jpg") -> list:
    members = []
    if image is not None:
        members.append((f"{key}.{extension}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    return members


def good_caption(tag: str) -> str:
    return f"a cat {tag}"


def write_shards(
    folder: Path, num_shards: int, per_shard: int, prefix: str = "s"
) -> tuple[list[str], Counter]:
    """Shards of good samples with one corrupt image and one noun-less caption per shard.

    Returns the good captions and the expected skip counts.
    """
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for shard in range(num_shards):
        members = []
        for index in range(per_shard):
            tag = f"{prefix}{shard}-{index}"
            captions.append(good_caption(tag))
            color = (index * 20 % 256, shard * 50 % 256, 7)
            members += sample_members(f"{tag}", good_caption(tag), encoded_image(color, "JPEG"))
        members += sample_members(
            f"{prefix}{shard}-corrupt", "a dog on a broken file", b"\xff\xd8 not a jpeg"
        )
        members += sample_members(f"{prefix}{shard}-nounless", "very very nice", encoded_image((1, 2, 3)))
        write_tar(folder / f"{prefix}-{shard:03d}.tar", members)
    return captions, Counter(image=num_shards, caption=num_shards)


def collect(
    stream: TrainingStream, batch_size: int = 2, num_workers: int = 0, max_batches: int | None = None
):
    """Captions, draws and the stream's skip totals after iterating (recording progress like the loop)."""
    captions, draws = [], []
    loader = make_dataloader(stream, batch_size, num_workers, collate_captions)
    for number, batch in enumerate(loader):
        if max_batches is not None and number == max_batches:
            break
        stream.record_progress(batch.pop(STREAM_PROGRESS_KEY))
        captions += batch["captions"]
        draws += batch["draws"]
    return captions, draws


# ------------------------------------------------------------------------------------------------ sources


def test_config_defaults_per_type_and_validation():
    assert (DataSourceConfig("hub", "pixparse/cc3m-wds").image_column, "txt") == ("jpg", "txt")
    jsonl = DataSourceConfig("jsonl", "data.jsonl")
    assert (jsonl.image_column, jsonl.caption_column) == ("image", "caption")
    assert DataSourceConfig("jsonl", "d.jsonl", image_column="file").image_column == "file"
    with pytest.raises(ValueError, match="Unknown data source type"):
        DataSourceConfig("csv", "x.csv")
    with pytest.raises(ValueError, match="weights must be positive"):
        DataSourceConfig("folder", "images", weight=0)


def test_brace_expansion_and_shard_resolution(tmp_path):
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}/{0..1}.tar") == ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]
    for name in ("p-0.tar", "p-1.tar", "p-2.tar"):
        write_tar(tmp_path / name, [])
    assert resolve_shards(str(tmp_path / "p-{0..1}.tar")) == [
        str(tmp_path / "p-0.tar"),
        str(tmp_path / "p-1.tar"),
    ]
    assert len(resolve_shards(str(tmp_path / "p-*.tar"))) == 3
    assert len(resolve_shards(str(tmp_path))) == 3
    with pytest.raises(FileNotFoundError, match=r"p-3\.tar"):
        resolve_shards(str(tmp_path / "p-{2..3}.tar"))


def test_webdataset_source_groups_members_by_key(tmp_path):
    jpeg, png = encoded_image((10, 0, 0), "JPEG"), encoded_image((0, 10, 0))
    members = [
        ("part/000.jpg", jpeg),
        ("part/000.txt", b"a cat"),
        ("part/001.png", png),
        ("part/001.json", b"{}"),
        ("part/001.txt", b"two dogs \xff"),
        ("part/002.txt", b"a caption without image"),
        ("part/003.webp", b"corrupt bytes are passed through"),
        ("part/004.seg.png", png),
        ("part/004.txt", b"  a bird  "),
    ]
    source = build_source(DataSourceConfig("webdataset", str(write_tar(tmp_path / "shard.tar", members))))
    records = list(source.iter_records(0, 1, seed=0))
    assert [(r.image, r.caption) for r in records] == [
        (jpeg, "a cat"),
        (png, "two dogs \ufffd"),
        (None, "a caption without image"),
        (b"corrupt bytes are passed through", None),
        (None, "a bird"),  # "seg.png" is not an image extension of the sample
    ]


def test_jsonl_source_resolves_paths_and_reports_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encoded_image((1, 1, 1)))
    lines = [
        {"image": "images/a.png", "caption": "a dog"},
        {"image": "/abs/b.png", "caption": "a car"},
        {"image": "images/c.png", "caption": None},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = list(JsonlSource(DataSourceConfig("jsonl", str(data))).iter_records(0, 1, seed=3))
    assert sorted(records, key=lambda r: r.image) == [
        ("/abs/b.png", "a car"),
        (str(tmp_path / "images" / "a.png"), "a dog"),
        (str(tmp_path / "images" / "c.png"), None),
    ]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"file": "a.png", "text": "a cat"}) + "\n")
    source = build_source(
        {"type": "jsonl", "path": str(renamed), "image_column": "file", "caption_column": "text"}
    )
    assert list(source.iter_records(0, 1, seed=0)) == [(str(tmp_path / "a.png"), "a cat")]
    with pytest.raises(ValueError, match=r"renamed.jsonl:1 needs the keys 'image' and 'caption'"):
        JsonlSource(DataSourceConfig("jsonl", str(renamed)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        JsonlSource(DataSourceConfig("jsonl", str(broken)))


def test_folder_source_pairs_images_with_same_stem_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(encoded_image((1, 1, 1), "JPEG"))
    (tmp_path / "a.txt").write_text("a house\n")
    (tmp_path / "sub" / "b.PNG").write_bytes(encoded_image((2, 2, 2)))
    (tmp_path / "sub" / "b.txt").write_text("a tree")
    (tmp_path / "c.png").write_bytes(encoded_image((3, 3, 3)))
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    records = build_source(DataSourceConfig("folder", str(tmp_path))).iter_records(0, 1, seed=0)
    assert sorted(records) == [
        (str(tmp_path / "a.jpg"), "a house"),
        (str(tmp_path / "c.png"), None),
        (str(tmp_path / "sub" / "b.PNG"), "a tree"),
    ]
    with pytest.raises(NotADirectoryError):
        build_source(DataSourceConfig("folder", str(tmp_path / "missing")))


def image_caption_dataset() -> datasets.Dataset:
    rows = {
        "image": [{"bytes": encoded_image((5, 5, 5)), "path": None}, {"bytes": b"corrupt", "path": None}],
        "caption": ["a boat", "a horse"],
        "extra": [1, 2],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "extra": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.mark.parametrize("storage", ["parquet", "save_to_disk"])
def test_hub_source_yields_undecoded_images(tmp_path, monkeypatch, storage):
    # datasets pauses 5 s after a streamed parquet pass (a guard for interpreter shutdown); not needed here.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    dataset = image_caption_dataset()
    if storage == "parquet":
        (tmp_path / "data").mkdir()
        dataset.to_parquet(str(tmp_path / "data" / "train.parquet"))
    else:
        dataset.save_to_disk(str(tmp_path / "data"))
    config = DataSourceConfig("hub", str(tmp_path / "data"), image_column="image", caption_column="caption")
    records = list(build_source(config).iter_records(0, 1, seed=0))
    assert [record.caption for record in records] == ["a boat", "a horse"]
    assert [record.image["bytes"] for record in records] == [encoded_image((5, 5, 5)), b"corrupt"]
    with pytest.raises(ValueError, match=r"no column \['jpg'\]"):
        HubSource(DataSourceConfig("hub", str(tmp_path / "data"), caption_column="caption"))


# ----------------------------------------------------------------------------------- skipping, workers


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, num_workers):
    captions, expected_skips = write_shards(tmp_path / "wds", num_shards=2, per_shard=5)
    extra = tmp_path / "extra.tar"
    write_tar(
        extra,
        sample_members("no-caption", None, encoded_image((1, 1, 1)))
        + sample_members("no-image", "a cat without picture", None)
        + sample_members("narrow", "a narrow dog", encoded_image((1, 1, 1), size=(1, 5)))
        + sample_members("ok", "a fine horse", encoded_image((9, 9, 9), "PNG"), extension="png"),
    )
    sources = [
        DataSourceConfig("webdataset", str(tmp_path / "wds" / "s-{000..001}.tar")),
        DataSourceConfig("webdataset", str(extra)),
    ]
    stream = TrainingStream(sources, toy_transform, seed=1, shuffle_buffer_size=4, epochs=1)
    seen, _ = collect(stream, batch_size=3, num_workers=num_workers)
    assert sorted(seen) == sorted([*captions, "a fine horse"])
    # Per shard: a corrupt JPEG and a noun-less caption; extra: missing caption, missing image, narrow image.
    assert stream.skipped == {"image": expected_skips["image"] + 2, "caption": expected_skips["caption"] + 1}
    state = stream.state_dict()
    assert state["num_workers"] == max(num_workers, 1)
    assert sum(state["records_consumed"]) == len(captions) + 1 + 7


def test_skip_exceptions_are_configurable_and_other_errors_propagate(tmp_path):
    class TooDark(ValueError):
        pass

    def picky_transform(image, caption, rng):
        if "dark" in caption:
            raise TooDark(caption)
        if "boom" in caption:
            raise RuntimeError("a bug in the transform")
        return {"caption": caption, "draw": rng.random()}

    members = sample_members("a", "a dark cat", b"x") + sample_members("b", "a cat", b"x")
    source = DataSourceConfig("webdataset", str(write_tar(tmp_path / "a.tar", members)))
    stream = TrainingStream([source], picky_transform, epochs=1, skip_exceptions={"image": (TooDark,)})
    assert collect(stream)[0] == ["a cat"]
    assert stream.skipped == {"image": 1, "caption": 0}

    write_tar(tmp_path / "a.tar", members + sample_members("c", "boom", b"x"))
    with pytest.raises(RuntimeError, match="a bug in the transform"):
        collect(TrainingStream([source], picky_transform, epochs=1, skip_exceptions={"image": (TooDark,)}))
    with pytest.raises(ValueError, match="Unknown skip reasons"):
        TrainingStream([source], picky_transform, skip_exceptions={"colour": (TooDark,)})


def test_stream_feeds_the_processor(tmp_path, tiny_tokenizer):
    processor = CoDeProcessor(CoDeImageProcessor(train_crop_size=16), tiny_tokenizer, num_words=2)
    members = (
        sample_members("0", "a cat and a dog on the grass", encoded_image((200, 0, 0), "JPEG", (20, 24)))
        + sample_members("1", "a cat", encoded_image((0, 200, 0)))
        + sample_members("2", "a dog on a broken chair", b"not an image")
        + sample_members("3", "two birds near a boat", encoded_image((0, 0, 200), "PNG", (30, 18)))
    )
    source = DataSourceConfig("webdataset", str(write_tar(tmp_path / "shard.tar", members)))
    stream = TrainingStream([source], processor.prepare_training_sample, seed=3, epochs=1)
    batches = list(make_dataloader(stream, batch_size=4, collate_fn=processor.collate_training))
    assert len(batches) == 1
    batch = batches[0]
    stream.record_progress(batch.pop(STREAM_PROGRESS_KEY))
    assert stream.skipped == {"image": 1, "caption": 1}
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["noun_input_ids"].shape == (4, 77)  # K*B rows
    assert stream.state_dict()["records_consumed"] == [4]


def test_progress_of_a_batch_merges_its_samples():
    merged = StreamProgress.merge([StreamProgress(1, 2, 10, 1, 0), StreamProgress(1, 2, 14, 2, 3)])
    assert merged == StreamProgress(
        slot=1, num_workers=2, records_consumed=14, skipped_image=3, skipped_caption=3
    )
    with pytest.raises(ValueError, match="different DataLoader workers"):
        StreamProgress.merge([StreamProgress(0, 2, 1), StreamProgress(1, 2, 1)])


# ----------------------------------------------------------------------------------------------- splits


def jsonl_source(tmp_path: Path, count: int) -> tuple[DataSourceConfig, list[str]]:
    (tmp_path / "img.png").write_bytes(encoded_image((4, 4, 4)))
    captions = [f"a dog number {index}" for index in range(count)]
    lines = [json.dumps({"image": "img.png", "caption": caption}) for caption in captions]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    return DataSourceConfig("jsonl", str(tmp_path / "data.jsonl")), captions


@pytest.mark.parametrize("kind", ["webdataset-2-shards", "webdataset-3-shards", "jsonl", "hub-webdataset"])
def test_ranks_and_workers_partition_the_data(tmp_path, kind):
    if kind == "jsonl":
        config, captions = jsonl_source(tmp_path, 11)
    else:
        num_shards = 3 if kind == "webdataset-3-shards" else 2
        captions, _ = write_shards(tmp_path / "wds", num_shards=num_shards, per_shard=4)
        source_type = "hub" if kind == "hub-webdataset" else "webdataset"
        config = DataSourceConfig(source_type, str(tmp_path / "wds"))
    source = build_source(config)
    per_rank = []
    for rank in range(2):
        stream = TrainingStream([source], toy_transform, seed=5, rank=rank, world_size=2, epochs=1)
        per_rank.append(collect(stream, num_workers=2)[0])  # every rank must use the same number of workers
    assert all(per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(captions)


def test_endless_stream_repeats_in_new_orders_and_mixes_by_weight(tmp_path):
    frequent, frequent_captions = jsonl_source(tmp_path, 5)
    rare = DataSourceConfig("jsonl", str(tmp_path / "rare.jsonl"), weight=1 / 3)
    (tmp_path / "rare.jsonl").write_text(json.dumps({"image": "img.png", "caption": "a rare bird"}))
    stream = TrainingStream([frequent, rare], toy_transform, seed=0, shuffle_buffer_size=1)
    captions, _ = collect(stream, batch_size=20, max_batches=20)
    share = captions.count("a rare bird") / len(captions)
    assert 0.2 < share < 0.3  # 1/4 expected
    frequent_only = [caption for caption in captions if caption != "a rare bird"]
    epochs = [frequent_only[start : start + 5] for start in range(0, 25, 5)]
    assert all(sorted(epoch) == sorted(frequent_captions) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_endless_stream_with_an_empty_split_fails_clearly(tmp_path):
    config, _ = jsonl_source(tmp_path, 1)
    stream = TrainingStream([config], toy_transform, rank=1, world_size=2)
    with pytest.raises(ValueError, match="gave no record to split 1 of 2"):
        collect(stream, max_batches=1)


# ---------------------------------------------------------------------------------------------- resume


def resumable_stream(tmp_path: Path) -> TrainingStream:
    sources = [
        DataSourceConfig("webdataset", str(tmp_path / "wds" / "s-*.tar"), weight=2.0),
        DataSourceConfig("jsonl", str(tmp_path / "data.jsonl")),
    ]
    return TrainingStream(sources, toy_transform, seed=7, shuffle_buffer_size=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_the_uninterrupted_one(tmp_path, num_workers):
    write_shards(tmp_path / "wds", num_shards=2, per_shard=3)  # small: the run wraps several epochs
    jsonl_source(tmp_path, 4)
    uninterrupted = resumable_stream(tmp_path)
    expected = collect(uninterrupted, batch_size=3, num_workers=num_workers, max_batches=12)

    first = resumable_stream(tmp_path)
    head = collect(first, batch_size=3, num_workers=num_workers, max_batches=5)  # odd: slot rotation matters
    checkpoint = io.BytesIO()
    torch.save(first.state_dict(), checkpoint)
    checkpoint.seek(0)

    resumed = resumable_stream(tmp_path)
    resumed.load_state_dict([torch.load(checkpoint)])  # the gathered per-rank list form
    tail = collect(resumed, batch_size=3, num_workers=num_workers, max_batches=7)
    assert head[0] + tail[0] == expected[0]
    assert head[1] + tail[1] == expected[1]  # the transform's random numbers too
    assert resumed.skipped == uninterrupted.skipped
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_needs_the_same_layout(tmp_path):
    config, _ = jsonl_source(tmp_path, 6)
    stream = TrainingStream([config], toy_transform, seed=2)
    collect(stream, num_workers=2, max_batches=3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="world_size=1 but this stream has world_size=2"):
        TrainingStream([config], toy_transform, seed=2, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=2 but this stream has seed=3"):
        TrainingStream([config], toy_transform, seed=3).load_state_dict(state)
    fewer_workers = TrainingStream([config], toy_transform, seed=2)
    fewer_workers.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with 2 DataLoader worker"):
        collect(fewer_workers, num_workers=0, max_batches=1)
