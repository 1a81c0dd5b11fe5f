"""Data sources on tiny synthetic datasets written in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import save_exif_photo, upright_test_picture
from PIL import Image

from modeling_code.evaluation.segmentation_datasets import HFDatasetSource, MMSegFolderSource, build_source
from modeling_code.evaluation.specs import custom_benchmark, get_benchmark, map_labels

SIZE = (16, 16)

# mmsegmentation's paths, spelled out independently of specs.yaml: image, label, split file.
MMSEG_PATHS = {
    "voc": (
        "VOCdevkit/VOC2012/JPEGImages/{name}.jpg",
        "VOCdevkit/VOC2012/SegmentationClass/{name}.png",
        "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
    ),
    "context": (
        "VOCdevkit/VOC2010/JPEGImages/{name}.jpg",
        "VOCdevkit/VOC2010/SegmentationClassContext/{name}.png",
        "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt",
    ),
    "ade20k": (
        "ADEChallengeData2016/images/validation/{name}.jpg",
        "ADEChallengeData2016/annotations/validation/{name}.png",
        None,
    ),
    "cityscapes": (
        "cityscapes/leftImg8bit/val/{name}_leftImg8bit.png",
        "cityscapes/gtFine/val/{name}_gtFine_labelTrainIds.png",
        None,
    ),
    "coco_stuff": (
        "coco_stuff164k/images/val2017/{name}.jpg",
        "coco_stuff164k/annotations/val2017/{name}_labelTrainIds.png",
        None,
    ),
    "coco_object": (
        "coco_stuff164k/images/val2017/{name}.jpg",
        "coco_stuff164k/annotations/val2017/{name}_instanceTrainIds.png",
        None,
    ),
}
SAMPLE_NAMES = {
    "voc": ["2007_000033", "2007_000042", "2007_000061"],
    "context": ["2008_000002", "2008_000008", "2008_000019"],
    "ade20k": ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"],
    "cityscapes": [
        "frankfurt/frankfurt_000000_000294",
        "frankfurt/frankfurt_000000_000576",
        "lindau/lindau_000000_000019",
    ],
    "coco_stuff": ["000000000139", "000000000285", "000000000632"],
    "coco_object": ["000000000139", "000000000285", "000000000632"],
}


def save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_layout(root: Path, key: str, palette_png: bool = False) -> dict[str, np.ndarray]:
    """Write three 16x16 samples of ``key`` in mmseg's layout under ``root``; returns {name: label}."""
    image_pattern, label_pattern, split_pattern = MMSEG_PATHS[key]
    rng = np.random.default_rng(len(key))
    labels = {}
    for index, name in enumerate(SAMPLE_NAMES[key]):
        save(root / image_pattern.format(name=name), Image.new("RGB", SIZE, (10 * index, 80, 160)))
        label = rng.integers(0, 19, size=SIZE, dtype=np.uint8)
        label[0, :3] = 255
        label_image = Image.fromarray(label)
        if palette_png:
            label_image = label_image.convert("P")
            label_image.putpalette([value for index in range(256) for value in (index, 0, 255 - index)])
        save(root / label_pattern.format(name=name), label_image)
        labels[name] = label
    if split_pattern is not None:
        split_path = root / split_pattern
        split_path.parent.mkdir(parents=True, exist_ok=True)
        split_path.write_text("\n".join(reversed(SAMPLE_NAMES[key])) + "\n")
        # An image outside the split must not be read.
        save(root / image_pattern.format(name="not_in_split"), Image.new("RGB", SIZE))
    return labels


@pytest.mark.parametrize("key", [*MMSEG_PATHS, "voc20", "context59"])
def test_folder_source_reads_mmseg_layout(tmp_path, key):
    layout_key = {"voc20": "voc", "context59": "context"}.get(key, key)
    labels = write_layout(tmp_path, layout_key, palette_png=layout_key == "voc")
    source = MMSegFolderSource(tmp_path, key)
    split_order = MMSEG_PATHS[layout_key][2] is not None
    expected_names = (
        list(reversed(SAMPLE_NAMES[layout_key])) if split_order else sorted(SAMPLE_NAMES[layout_key])
    )
    assert len(source) == 3
    assert [sample.name for sample in source] == expected_names
    assert source.raw_label_ids is False
    for image, label, name in source:
        assert image.mode == "RGB" and image.size == SIZE
        np.testing.assert_array_equal(label, labels[name])  # palette PNGs give their indices
    assert "mmseg folder" in source.describe()


def test_benchmark_images_keep_their_stored_orientation(tmp_path):
    """Label PNGs are stored as the images' pixels are: an EXIF orientation tag must not turn the image alone."""
    write_layout(tmp_path, "voc")
    name = SAMPLE_NAMES["voc"][0]
    image_pattern, label_pattern, _ = MMSEG_PATHS["voc"]
    save(tmp_path / label_pattern.format(name=name), Image.fromarray(np.zeros((16, 24), dtype=np.uint8)))
    # stored 24 wide and 16 high like its label; the tag asks viewers to show it 16 wide and 24 high
    save_exif_photo(tmp_path / image_pattern.format(name=name), upright_test_picture(16, 24), 6)
    assert Image.open(tmp_path / image_pattern.format(name=name)).size == (24, 16)
    image, label, _ = next(sample for sample in MMSegFolderSource(tmp_path, "voc") if sample.name == name)
    assert image.size == (24, 16) and label.shape == (16, 24)


def test_folder_source_accepts_the_benchmark_data_root_itself(tmp_path):
    write_layout(tmp_path, "voc")
    source = MMSegFolderSource(tmp_path / "VOCdevkit" / "VOC2012", get_benchmark("voc"))
    assert len(source) == 3


@pytest.mark.parametrize(
    ("key", "raw_suffix", "raw_ids", "expected"),
    [
        ("cityscapes", "_gtFine_labelIds.png", [7, 33, 0], [0, 18, 255]),
        ("coco_stuff", ".png", [0, 91, 255], [0, 80, 255]),
        ("coco_object", ".png", [0, 91, 255], [1, 0, 0]),
    ],
)
def test_folder_source_falls_back_to_raw_label_ids(tmp_path, key, raw_suffix, raw_ids, expected):
    image_pattern, label_pattern, _ = MMSEG_PATHS[key]
    name = SAMPLE_NAMES[key][0]
    save(tmp_path / image_pattern.format(name=name), Image.new("RGB", (3, 1)))
    raw_pattern = label_pattern.replace(label_pattern.rsplit("}", 1)[1], raw_suffix)
    save(tmp_path / raw_pattern.format(name=name), Image.fromarray(np.array([raw_ids], dtype=np.uint8)))
    source = MMSegFolderSource(tmp_path, key)
    assert source.raw_label_ids is True
    label = map_labels(source[0].label, source.spec, apply_id_mapping=source.raw_label_ids)
    np.testing.assert_array_equal(label, [expected])


def test_limit_and_shards(tmp_path):
    write_layout(tmp_path, "ade20k")
    source = MMSegFolderSource(tmp_path, "ade20k")
    assert len(MMSegFolderSource(tmp_path, "ade20k", limit=2)) == 2
    shards = [source.shard(2, index) for index in range(2)]
    assert [len(shard) for shard in shards] == [1, 2]
    assert [sample.name for shard in shards for sample in shard] == [sample.name for sample in source]
    assert [source.shard(3, index)[0].name for index in range(3)] == [sample.name for sample in source]
    assert len(source.shard(4, 0)) == 0
    with pytest.raises(ValueError, match="shard index 2"):
        source.shard(2, 2)
    with pytest.raises(ValueError, match="limit"):
        MMSegFolderSource(tmp_path, "ade20k", limit=-1)


def test_folder_source_explains_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images/validation"):
        MMSegFolderSource(tmp_path, "ade20k")
    save(tmp_path / "VOCdevkit/VOC2012/JPEGImages/a.jpg", Image.new("RGB", SIZE))
    with pytest.raises(FileNotFoundError, match="split file"):
        MMSegFolderSource(tmp_path, "voc")
    save(
        tmp_path / "cityscapes/leftImg8bit/val/ulm/ulm_000000_000001_leftImg8bit.png", Image.new("RGB", SIZE)
    )
    with pytest.raises(FileNotFoundError, match=r"labelTrainIds.png or .*labelIds.png"):
        MMSegFolderSource(tmp_path, "cityscapes")
    with pytest.raises(ValueError, match="no folder layout"):
        MMSegFolderSource(tmp_path, custom_benchmark(["cat"]))


def tiny_hf_dataset(num_rows: int = 4) -> datasets.Dataset:
    rng = np.random.default_rng(3)
    rows = {
        "pixels": [Image.new("RGB", (5, 4), (40 * index, 0, 0)) for index in range(num_rows)],
        "mask": [Image.fromarray(rng.integers(0, 21, size=(4, 5), dtype=np.uint8)) for _ in range(num_rows)],
        "id": [f"row{index}" for index in range(num_rows)],
    }
    features = datasets.Features(
        {"pixels": datasets.Image(), "mask": datasets.Image(), "id": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(rows, features=features)


def assert_same_rows(source, dataset):
    assert len(source) == len(dataset)
    for sample, row in zip(source, dataset):
        assert sample.image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(sample.image), np.asarray(row["pixels"].convert("RGB")))
        np.testing.assert_array_equal(sample.label, np.asarray(row["mask"]))


def test_hf_source_from_a_loaded_dataset():
    dataset = tiny_hf_dataset()
    source = HFDatasetSource(dataset, image_column="pixels", label_column="mask", name_column="id")
    assert_same_rows(source, dataset)
    assert [sample.name for sample in source] == ["row0", "row1", "row2", "row3"]
    assert [sample.name for sample in source.shard(2, 1)] == ["row2", "row3"]
    unnamed = HFDatasetSource(dataset, split="test", image_column="pixels", label_column="mask", limit=1)
    assert [sample.name for sample in unnamed] == ["test/0"]


def test_hf_source_from_save_to_disk(tmp_path):
    dataset = tiny_hf_dataset()
    datasets.DatasetDict({"validation": dataset}).save_to_disk(tmp_path / "dict")
    source = HFDatasetSource(
        tmp_path / "dict", image_column="pixels", label_column="mask", raw_label_ids=False
    )
    assert_same_rows(source, dataset)
    assert source.raw_label_ids is False
    dataset.save_to_disk(tmp_path / "single")
    assert_same_rows(
        HFDatasetSource(str(tmp_path / "single"), image_column="pixels", label_column="mask"), dataset
    )
    with pytest.raises(ValueError, match=r"split 'val' not in .*validation"):
        HFDatasetSource(tmp_path / "dict", split="val", image_column="pixels", label_column="mask")


def test_hf_source_from_parquet_folder(tmp_path):
    dataset = tiny_hf_dataset()
    (tmp_path / "parquet").mkdir()
    dataset.to_parquet(tmp_path / "parquet" / "validation.parquet")
    source = HFDatasetSource(
        tmp_path / "parquet", image_column="pixels", label_column="mask", cache_dir=str(tmp_path / "cache")
    )
    assert_same_rows(source, dataset)


def test_hf_source_from_imagefolder_with_label_files(tmp_path):
    dataset = tiny_hf_dataset(3)
    folder = tmp_path / "imagefolder"
    records = []
    for index, row in enumerate(dataset):
        save(folder / "images" / f"{index}.png", row["pixels"])
        save(folder / "labels" / f"{index}.png", row["mask"])
        records.append({"file_name": f"images/{index}.png", "label_file_name": f"labels/{index}.png"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    source = HFDatasetSource(folder, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(source) == 3
    for sample, row in zip(source, dataset):
        np.testing.assert_array_equal(sample.label, np.asarray(row["mask"]))


def test_hf_source_rejects_bad_columns():
    dataset = tiny_hf_dataset()
    with pytest.raises(ValueError, match=r"columns \['image'\] not in the dataset"):
        HFDatasetSource(dataset, label_column="mask")
    rgb_labels = HFDatasetSource(dataset, image_column="pixels", label_column="pixels")
    with pytest.raises(ValueError, match=r"\[H, W\] integer class-id maps"):
        rgb_labels[0]


def test_build_source_picks_exactly_one(tmp_path):
    write_layout(tmp_path, "ade20k")
    spec = get_benchmark("ade20k")
    assert isinstance(build_source(spec, data_root=tmp_path, limit=1), MMSegFolderSource)
    hf = build_source(spec, hf_dataset=tiny_hf_dataset(), image_column="pixels", label_column="mask")
    assert isinstance(hf, HFDatasetSource) and len(hf) == 4
    with pytest.raises(ValueError, match="exactly one data source"):
        build_source(spec)
    with pytest.raises(ValueError, match="exactly one data source"):
        build_source(spec, data_root=tmp_path, hf_dataset=tiny_hf_dataset())
