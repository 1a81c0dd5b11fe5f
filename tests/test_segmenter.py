"""CoDeSegmenter on a saved tiny model: results, batches, vocabulary cache, dtypes and every bad input."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_exif_photo, upright_test_picture
from PIL import Image

from modeling_code.image_processing_code import CoDeImageProcessor, InvalidImageError
from modeling_code.inference import VocabularyEmbeddings, encode_vocabulary
from modeling_code.predict.segmenter import CoDeSegmenter, SegmentationResult
from modeling_code.processing_code import CoDeProcessor


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def segmenter(model_dir):
    return CoDeSegmenter.from_pretrained(model_dir)


def random_photo(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_result_of_one_image(segmenter):
    result = segmenter(random_photo(90, 120, seed=0), ["cat", "sofa", "background"])
    assert isinstance(result, SegmentationResult)
    assert result.class_names == ["cat", "sofa", "background"]
    assert result.label_map.shape == (90, 120) and result.label_map.dtype == np.int64
    assert result.label_map.min() >= 0 and result.label_map.max() < 3
    assert result.scores.shape == (3, 64, 85) and result.scores.dtype == np.float32  # 90x120 -> 64x85
    np.testing.assert_allclose(result.scores[2], 0.4)  # background: the config's constant threshold
    counts = np.bincount(result.label_map.ravel(), minlength=3)
    assert result.pixel_fractions == {
        name: count / (90 * 120) for name, count in zip(result.class_names, counts)
    }
    assert result.present_classes == [name for name, count in zip(result.class_names, counts) if count]
    assert result.overlay.mode == "RGB" and result.overlay.width == 160  # the legend is at least 160 wide
    assert result.overlay.height > 90  # legend below the image
    summary = result.to_dict()
    assert summary["height"] == 90 and summary["width"] == 120
    assert [entry["name"] for entry in summary["classes"]] == result.class_names


def test_label_map_is_the_argmax_of_the_scores_resized_to_the_image(segmenter):
    result = segmenter(random_photo(50, 70, seed=1), ["cat", "sofa", "dog"])
    resized = F.interpolate(
        torch.from_numpy(result.scores)[None], size=(50, 70), mode="bilinear", align_corners=False
    )
    np.testing.assert_array_equal(result.label_map, resized[0].argmax(0).numpy())
    assert np.array_equal(
        segmenter.predict(random_photo(50, 70, seed=1), ["cat", "sofa", "dog"]), result.label_map
    )


def test_a_batch_of_different_sizes_equals_single_calls(segmenter):
    images = [
        random_photo(90, 120, seed=2),
        np.asarray(random_photo(70, 40, seed=3)),
        random_photo(64, 64, seed=4),
    ]
    results = segmenter(images, ["cat", "background", "dog"])
    assert [r.label_map.shape for r in results] == [(90, 120), (70, 40), (64, 64)]
    for image, batched in zip(images, results):
        single = segmenter(image, ["cat", "background", "dog"])
        np.testing.assert_allclose(batched.scores, single.scores, atol=1e-5)
        np.testing.assert_array_equal(batched.label_map, single.label_map)


def test_cached_and_uncached_vocabularies_give_identical_outputs(segmenter, model_dir):
    names = ["cat", "sofa", "background"]
    image = random_photo(80, 100, seed=5)
    segmenter.clear_vocabulary_cache()
    first = segmenter.encode_vocabulary(names)
    assert (
        segmenter.encode_vocabulary([" cat", "sofa ", "background"]) is first
    )  # cleaned names share an entry
    uncached = encode_vocabulary(segmenter.model, segmenter.processor, names)
    assert uncached is not first
    no_cache = CoDeSegmenter.from_pretrained(model_dir, vocabulary_cache_size=0)
    assert no_cache.encode_vocabulary(names) is not no_cache.encode_vocabulary(names)
    outputs = [
        segmenter(image, names),
        segmenter(image, names),
        segmenter(image, uncached),
        no_cache(image, names),
    ]
    for other in outputs[1:]:
        np.testing.assert_array_equal(other.scores, outputs[0].scores)
        np.testing.assert_array_equal(other.label_map, outputs[0].label_map)


def test_the_cache_keeps_the_most_recent_vocabularies(model_dir):
    segmenter = CoDeSegmenter.from_pretrained(model_dir, vocabulary_cache_size=2)
    cat, dog = segmenter.encode_vocabulary(["cat"]), segmenter.encode_vocabulary(["dog"])
    assert segmenter.encode_vocabulary(["cat"]) is cat  # cat is now the most recent
    segmenter.encode_vocabulary(["sofa"])  # evicts dog
    assert segmenter.encode_vocabulary(["cat"]) is cat
    assert segmenter.encode_vocabulary(["dog"]) is not dog


def test_bfloat16_segmenter(model_dir, segmenter):
    bf16 = CoDeSegmenter.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    image = random_photo(70, 90, seed=6)
    result = bf16(image, ["cat", "sofa"])
    assert result.scores.dtype == np.float32 and np.isfinite(result.scores).all()
    np.testing.assert_allclose(result.scores, segmenter(image, ["cat", "sofa"]).scores, atol=0.05)


def test_background_threshold_and_pamr_options(segmenter):
    image = random_photo(60, 60, seed=7)
    assert (
        segmenter(image, ["cat", "background"], background_threshold=1.0).pixel_fractions["background"] == 1.0
    )
    assert (
        segmenter(image, ["cat", "background"], background_threshold=0.0).pixel_fractions["background"] == 0.0
    )
    with_pamr = segmenter(image, ["cat", "sofa"], use_pamr=True).scores
    without = segmenter(image, ["cat", "sofa"], use_pamr=False).scores
    assert not np.allclose(with_pamr, without)


def test_an_explicit_vocabulary_object(segmenter):
    vocabulary = segmenter.encode_vocabulary(["background", "cat"])
    assert isinstance(vocabulary, VocabularyEmbeddings) and vocabulary.background_index == 0
    result = segmenter(random_photo(40, 40, seed=8), vocabulary)
    assert result.class_names == ["background", "cat"]


def test_the_model_config_sets_the_evaluation_resize(segmenter):
    processor = CoDeProcessor(CoDeImageProcessor(), segmenter.processor.tokenizer)  # the paper's 448 on its own
    other = CoDeSegmenter(segmenter.model, processor)
    assert other.protocol == segmenter.model.config.inference_protocol
    assert other(random_photo(90, 120, seed=11), ["cat"]).scores.shape == (1, 64, 85)
    smaller = CoDeSegmenter(segmenter.model, processor, protocol=other.protocol.replace(short_side=32))
    assert smaller(random_photo(90, 120, seed=11), ["cat"]).scores.shape == (1, 32, 43)


def test_the_segmenter_is_the_model_forward(segmenter):
    """The segmenter adds caching and drawing, not a second implementation: its scores are the forward's."""
    image = random_photo(50, 70, seed=12)
    result = segmenter(image, ["cat", "background", "dog"])
    inputs = segmenter.processor(images=image, text=["cat", "background", "dog"], return_tensors="pt")
    outputs = segmenter.model(**inputs)
    torch.testing.assert_close(torch.from_numpy(result.scores), outputs.scores[0])
    labels = segmenter.processor.post_process_semantic_segmentation(outputs)[0]
    assert np.array_equal(result.label_map, labels.numpy())


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), "empty"),
        (Image.new("RGB", (0, 5)), "empty"),
        (b"not an image at all", "Cannot decode"),
        (b"", "empty"),
        ("/nonexistent/photo.jpg", "not found"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "HxWx3"),
        (12, "Unsupported image input"),
    ],
)
def test_unreadable_or_empty_images_are_named(segmenter, image, message):
    with pytest.raises(InvalidImageError, match=message):
        segmenter(image, ["cat"])


def test_an_unreadable_file_is_named(segmenter, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(InvalidImageError, match=r"corrupt\.png"):
        segmenter(str(corrupt), ["cat"])


@pytest.mark.parametrize(
    ("classes", "error", "message"),
    [
        ([], ValueError, "No class names"),
        ("cat", TypeError, "not one string"),
        (["background"], ValueError, "alone"),
        (None, TypeError, r"classes are missing: pass a list of class names, e\.g\. \['cat'"),
        (3, TypeError, "a list of class names, not int"),
        (["cat", "sofa\ndog"], ValueError, "holds a line break"),
    ],
)
def test_bad_class_lists_are_named(segmenter, classes, error, message):
    with pytest.raises(error, match=message):
        segmenter(random_photo(20, 20, seed=0), classes)


def test_duplicate_and_overlong_names_warn_and_still_segment(segmenter, caplog):
    long_name = " ".join(["green"] * 80)
    with caplog.at_level(logging.WARNING):
        result = segmenter(random_photo(40, 50, seed=9), ["cat", "CAT", long_name, "background", "cat "])
    assert result.class_names == ["cat", long_name, "background"]
    assert "Duplicate class names ignored" in caplog.text and "truncated" in caplog.text


def test_images_above_the_pixel_cap_are_downscaled_with_a_warning(model_dir, caplog):
    capped = CoDeSegmenter.from_pretrained(model_dir, max_pixels=3000)
    image = random_photo(90, 120, seed=10)  # 10,800 pixels
    with caplog.at_level(logging.WARNING):
        result = capped(_png_bytes(image), ["cat"])
    assert "exceeds max_pixels=3000" in caplog.text
    height, width = result.label_map.shape
    assert height * width <= 3000 and abs(width / height - 120 / 90) < 0.05
    assert result.image.size == (width, height)


def test_bad_constructor_options_are_named(segmenter):
    for option, message in (
        ({"max_pixels": 0}, "max_pixels"),
        ({"vocabulary_cache_size": -1}, "vocabulary_cache_size"),
        ({"overlay_alpha": 2.0}, "overlay_alpha"),
    ):
        with pytest.raises(ValueError, match=message):
            CoDeSegmenter(segmenter.model, segmenter.processor, **option)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_phone_photos_are_segmented_upright(segmenter, tmp_path, orientation):
    """The label map of a file with an EXIF orientation lines up with the picture as viewers show it."""
    upright = upright_test_picture(72, 40, seed=orientation)
    photo = save_exif_photo(tmp_path / "photo.png", upright, orientation)
    expected = segmenter(upright, ["cat", "sofa", "background"], use_pamr=False)
    for source in (photo, photo.read_bytes()):
        result = segmenter(source, ["cat", "sofa", "background"], use_pamr=False)
        assert result.label_map.shape == (40, 72) and result.image.size == upright.size
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(upright))
        np.testing.assert_array_equal(result.label_map, expected.label_map)
