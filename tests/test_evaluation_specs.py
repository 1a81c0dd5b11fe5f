"""Benchmark data (class lists, flags, layouts) and the label mapping of each benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from modeling_code.evaluation.specs import (
    custom_benchmark,
    expand_benchmarks,
    get_benchmark,
    list_benchmarks,
    map_labels,
)

IGNORED = 255
EXPECTED_CLASS_COUNTS = {
    "voc": 21,
    "context": 60,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
    "voc20": 20,
    "context59": 59,
}


def test_every_benchmark_is_listed_with_its_class_count():
    assert list_benchmarks() == list(EXPECTED_CLASS_COUNTS)
    for key, count in EXPECTED_CLASS_COUNTS.items():
        spec = get_benchmark(key)
        assert spec.key == key
        assert spec.num_classes == count
        assert len(set(spec.class_names)) == count, f"{key} has repeated class names"


def test_background_flags_and_class_zero():
    for key in list_benchmarks():
        spec = get_benchmark(key)
        assert spec.background == (key in {"voc", "context", "coco_object"})
        assert (spec.class_names[0] == "background") == spec.background


def test_class_names_are_mmseg_verbatim():
    voc = get_benchmark("voc").class_names
    assert (voc[1], voc[11], voc[16], voc[20]) == ("aeroplane", "diningtable", "pottedplant", "tvmonitor")
    assert get_benchmark("ade20k").class_names[7] == "bed "  # mmseg's trailing space is kept
    assert get_benchmark("ade20k").class_names[-1] == "flag"
    context = get_benchmark("context").class_names
    assert context[:4] == ("background", "aeroplane", "bag", "bed") and context[-1] == "wood"
    coco_object = get_benchmark("coco_object").class_names
    assert coco_object[10:12] == ("traffic light", "fire hydrant")
    assert coco_object[-2:] == ("hair drier", "toothbrush")
    coco_stuff = get_benchmark("coco_stuff").class_names
    assert (coco_stuff[80], coco_stuff[-1]) == ("banner", "wood")
    cityscapes = get_benchmark("cityscapes").class_names
    assert (cityscapes[0], cityscapes[6], cityscapes[-1]) == ("road", "traffic light", "bicycle")


def test_related_benchmarks_share_their_lists():
    assert get_benchmark("voc20").class_names == get_benchmark("voc").class_names[1:]
    assert get_benchmark("context59").class_names == get_benchmark("context").class_names[1:]
    assert get_benchmark("coco_object").class_names[1:] == get_benchmark("coco_stuff").class_names[:80]
    assert get_benchmark("voc20").layout == get_benchmark("voc").layout
    assert get_benchmark("context59").layout == get_benchmark("context").layout


def test_layouts_follow_mmsegmentation():
    voc, context = get_benchmark("voc").layout, get_benchmark("context").layout
    assert (voc.data_root, voc.label_dir, voc.split_file) == (
        "VOCdevkit/VOC2012",
        "SegmentationClass",
        "ImageSets/Segmentation/val.txt",
    )
    assert (context.data_root, context.label_dir, context.split_file) == (
        "VOCdevkit/VOC2010",
        "SegmentationClassContext",
        "ImageSets/SegmentationContext/val.txt",
    )
    cityscapes = get_benchmark("cityscapes").layout
    assert (cityscapes.image_suffix, cityscapes.label_suffix, cityscapes.raw_label_suffix) == (
        "_leftImg8bit.png",
        "_gtFine_labelTrainIds.png",
        "_gtFine_labelIds.png",
    )
    assert get_benchmark("ade20k").layout.image_dir == "images/validation"
    assert get_benchmark("coco_stuff").layout.label_suffix == "_labelTrainIds.png"
    assert get_benchmark("coco_object").layout.label_suffix == "_instanceTrainIds.png"


def test_expand_benchmarks():
    assert [spec.key for spec in expand_benchmarks("all")] == list(EXPECTED_CLASS_COUNTS)
    assert [spec.key for spec in expand_benchmarks("voc, ade20k,voc")] == ["voc", "ade20k"]
    assert [spec.key for spec in expand_benchmarks(["cityscapes"])] == ["cityscapes"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'pascal'.*voc, context"):
        expand_benchmarks("pascal")
    with pytest.raises(ValueError, match="no benchmark selected"):
        expand_benchmarks(" , ")


def test_voc_labels_pass_through():
    raw = np.array([[0, 1, 20], [IGNORED, 15, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(map_labels(raw, get_benchmark("voc")), raw)
    with pytest.raises(ValueError, match=r"voc: label values \[21\]"):
        map_labels(np.array([[21]]), get_benchmark("voc"))


@pytest.mark.parametrize("key", ["voc20", "context59"])
def test_background_is_dropped_without_background_class(key):
    raw = np.array([[0, 1, 2], [IGNORED, 20, 0]], dtype=np.uint8)
    expected = np.array([[IGNORED, 0, 1], [IGNORED, 19, IGNORED]])
    np.testing.assert_array_equal(map_labels(raw, get_benchmark(key)), expected)


def test_ade20k_reduces_zero_label():
    raw = np.array([[0, 1, 150], [IGNORED, 8, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(
        map_labels(raw, get_benchmark("ade20k")), [[IGNORED, 0, 149], [IGNORED, 7, IGNORED]]
    )


def test_cityscapes_label_ids_become_train_ids():
    label_ids = np.array([[7, 8, 0, 1], [33, 26, 24, 4]], dtype=np.uint8)
    spec = get_benchmark("cityscapes")
    np.testing.assert_array_equal(
        map_labels(label_ids, spec), [[0, 1, IGNORED, IGNORED], [18, 13, 11, IGNORED]]
    )
    train_ids = np.array([[0, 18], [IGNORED, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(map_labels(train_ids, spec, apply_id_mapping=False), train_ids)


def test_coco_stuff_raw_ids_become_train_ids():
    raw = np.array([[0, 12, 91], [181, IGNORED, 11]], dtype=np.uint8)  # 11 is an unused COCO id
    np.testing.assert_array_equal(
        map_labels(raw, get_benchmark("coco_stuff")), [[0, 11, 80], [170, IGNORED, IGNORED]]
    )


def test_coco_object_from_raw_coco_stuff_maps_things_only():
    raw = np.array([[0, 12, 89], [91, 181, IGNORED]], dtype=np.uint8)
    spec = get_benchmark("coco_object")
    mapped = map_labels(raw, spec)
    np.testing.assert_array_equal(mapped, [[1, 12, 80], [0, 0, 0]])  # stuff and unlabeled -> background
    assert [spec.class_names[index] for index in mapped[0]] == ["person", "stop sign", "toothbrush"]


@pytest.mark.parametrize(
    ("label", "message"),
    [(np.zeros((2, 2, 3), np.uint8), "2-D integer"), (np.zeros((2, 2), np.float32), "2-D integer")],
)
def test_map_labels_rejects_non_label_maps(label, message):
    with pytest.raises(ValueError, match=message):
        map_labels(label, get_benchmark("voc"))


def test_custom_benchmark_for_any_vocabulary():
    spec = custom_benchmark(["background", "cat", "dog"], background=True, key="pets")
    assert (spec.key, spec.num_classes, spec.background, spec.layout, spec.num_images) == (
        "pets",
        3,
        True,
        None,
        None,
    )
    np.testing.assert_array_equal(map_labels(np.array([[0, 2, IGNORED]]), spec), [[0, 2, IGNORED]])
    reduced = custom_benchmark(["cat", "dog"], reduce_zero_label=True)
    np.testing.assert_array_equal(map_labels(np.array([[0, 1, 2]]), reduced), [[IGNORED, 0, 1]])
    with pytest.raises(ValueError, match="first class must be 'background'"):
        custom_benchmark(["cat", "dog"], background=True)
    with pytest.raises(ValueError, match="at least one class"):
        custom_benchmark([])
