"""COCO-Object label maps from a tiny synthetic COCO annotation file (polygons, RLE, compressed RLE)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from modeling_code.evaluation.coco_object import (
    build_from_instances,
    build_from_stuffthingmaps,
    decode_rle_counts,
    link_images,
    polygons_to_mask,
    rle_to_mask,
)
from modeling_code.evaluation.segmentation_datasets import MMSegFolderSource

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "build_coco_object.py"
PERSON, DOG, TOOTHBRUSH = 1, 17, 80  # coco_object class indices


def encode_rle_counts(runs: list[int]) -> str:
    """COCO's ``rleToString``, written from its C reference, to produce test strings."""
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            characters.append(chr((group | 0x20 if more else group) + 48))
    return "".join(characters)


@pytest.mark.parametrize(
    ("text", "runs"),
    [
        ("324", [3, 2, 4]),
        ("1233", [1, 2, 3, 5]),
        ("T3", [100]),
        ("555M", [5, 5, 5, 2]),
        ("1220;", [1, 2, 2, 2, 13]),
    ],
)
def test_decode_hand_encoded_strings(text, runs):
    assert decode_rle_counts(text) == runs
    assert decode_rle_counts(text.encode()) == runs
    assert encode_rle_counts(runs) == text


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=30))
def test_decode_inverts_the_reference_encoder(runs):
    assert decode_rle_counts(encode_rle_counts(runs)) == runs


def test_bad_rle_is_rejected():
    with pytest.raises(ValueError, match="truncated"):
        decode_rle_counts("T")
    with pytest.raises(ValueError, match="invalid character"):
        decode_rle_counts("1 2")
    with pytest.raises(ValueError, match="expected 2 x 3 pixels"):
        rle_to_mask({"size": [2, 3], "counts": [1, 2]})


def test_rle_runs_are_column_major():
    expected = np.array([[False, True, False], [True, False, False]])
    np.testing.assert_array_equal(rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]}), expected)
    np.testing.assert_array_equal(rle_to_mask({"size": [2, 3], "counts": "123"}), expected)


def test_polygon_fill_includes_its_outline():
    mask = polygons_to_mask([[1, 1, 4, 1, 4, 3, 1, 3], [0, 0, 1, 1]], height=6, width=8)
    expected = np.zeros((6, 8), dtype=bool)
    expected[1:4, 1:5] = True  # the two-point "polygon" encloses nothing
    np.testing.assert_array_equal(mask, expected)


@pytest.fixture
def coco_files(tmp_path):
    """A two-image instances file: a person polygon covered in part by a crowd dog RLE; a toothbrush RLE."""
    instances = {
        "images": [
            {"id": 7, "file_name": "000000000007.jpg", "height": 6, "width": 8},
            {"id": 9, "file_name": "000000000009.jpg", "height": 4, "width": 5},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]},
            {"id": 2, "image_id": 9, "category_id": 90, "iscrowd": 0, "segmentation": {"size": [4, 5], "counts": "1220;"}},
            {"id": 3, "image_id": 7, "category_id": 18, "iscrowd": 1, "segmentation": {"size": [6, 8], "counts": [24, 12, 12]}},
        ],
    }  # fmt: skip
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(instances))
    images_dir = tmp_path / "val2017"
    images_dir.mkdir()
    for image in instances["images"]:
        Image.new("RGB", (image["width"], image["height"]), (50, 60, 70)).save(
            images_dir / image["file_name"]
        )
    first = np.zeros((6, 8), dtype=np.uint8)
    first[1:4, 1:5] = PERSON
    first[:, 4:6] = DOG  # painted later, covers the person's right column
    second = np.zeros((4, 5), dtype=np.uint8)
    second[1:3, 0:2] = TOOTHBRUSH
    return path, images_dir, {"000000000007": first, "000000000009": second}


def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as label:
        return np.array(label)


def test_build_from_instances(tmp_path, coco_files):
    instances, images_dir, expected = coco_files
    root = tmp_path / "coco_stuff164k"
    assert build_from_instances(instances, root, progress=False) == 2
    for stem, label in expected.items():
        written = read_label(root / "annotations" / "val2017" / f"{stem}_instanceTrainIds.png")
        assert written.dtype == np.uint8
        np.testing.assert_array_equal(written, label)
    link_images(images_dir, root)
    source = MMSegFolderSource(tmp_path, "coco_object")
    assert [sample.name for sample in source] == list(expected)
    for sample in source:
        np.testing.assert_array_equal(sample.label, expected[sample.name])


def test_unknown_categories_are_rejected(tmp_path, coco_files):
    instances, _, _ = coco_files
    content = json.loads(instances.read_text())
    content["categories"].append({"id": 91, "name": "unicorn"})
    instances.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"\['unicorn'\] are not coco_object classes"):
        build_from_instances(instances, tmp_path / "out", progress=False)


def test_build_from_stuffthingmaps(tmp_path):
    raw_dir = tmp_path / "stuffthingmaps" / "val2017"
    raw_dir.mkdir(parents=True)
    Image.fromarray(np.array([[0, 12, 89], [91, 181, 255]], dtype=np.uint8)).save(
        raw_dir / "000000000139.png"
    )
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(raw_dir / "000000000139_labelTrainIds.png")  # skipped
    root = tmp_path / "coco_stuff164k"
    assert build_from_stuffthingmaps(raw_dir, root, progress=False) == 1
    written = read_label(root / "annotations" / "val2017" / "000000000139_instanceTrainIds.png")
    np.testing.assert_array_equal(written, [[PERSON, 12, TOOTHBRUSH], [0, 0, 0]])


def test_script_builds_labels_and_links_images(tmp_path, coco_files, capsys):
    instances, images_dir, expected = coco_files
    root = tmp_path / "coco_stuff164k"
    main = runpy.run_path(str(SCRIPT))["main"]
    main(
        [
            "--instances",
            str(instances),
            "--output-root",
            str(root),
            "--images-dir",
            str(images_dir),
            "--limit",
            "1",
        ]
    )
    assert "wrote 1 COCO-Object label maps" in capsys.readouterr().out
    assert (root / "images" / "val2017" / "000000000007.jpg").is_file()
    written = read_label(root / "annotations" / "val2017" / "000000000007_instanceTrainIds.png")
    np.testing.assert_array_equal(written, expected["000000000007"])
    assert not (root / "annotations" / "val2017" / "000000000009_instanceTrainIds.png").exists()
