"""CoDeImageProcessor: image loading and conversion, training/evaluation transforms, post-processing."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import png_bomb, save_exif_photo, upright_test_picture
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from modeling_code.configuration_code import InferenceProtocol
from modeling_code.image_processing_code import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CoDeImageProcessor,
    InvalidImageError,
    keep_ratio_size,
    load_image,
    random_resized_crop_box,
)


@pytest.fixture(scope="module")
def processor() -> CoDeImageProcessor:
    return CoDeImageProcessor(train_crop_size=32)


# The evaluation resize of these tests: short side 24, long side at most 64.
SMALL = InferenceProtocol(short_side=24, max_long_side=64)


def rgb_at(image: Image.Image, x: int = 0, y: int = 0) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel((x, y))


def normalised(levels: tuple[float, float, float]) -> torch.Tensor:
    """Expected normalised value per channel of 8-bit ``levels``."""
    return (torch.tensor(levels) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- loading


def palette_image(transparent_index: int | None = None) -> Image.Image:
    image = Image.new("P", (3, 2), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGB", (3, 2), (10, 20, 30)), (10, 20, 30)),
        (Image.new("L", (3, 2), 100), (100, 100, 100)),
        (Image.new("1", (3, 2), 1), (255, 255, 255)),
        (Image.new("LA", (3, 2), (100, 255)), (100, 100, 100)),
        (Image.new("LA", (3, 2), (100, 0)), (255, 255, 255)),
        (Image.new("RGBA", (3, 2), (200, 0, 0, 255)), (200, 0, 0)),
        (Image.new("RGBA", (3, 2), (200, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (3, 2), (0, 0, 0, 128)), (127, 127, 127)),
        (palette_image(), (10, 200, 30)),
        (palette_image(transparent_index=1), (255, 255, 255)),
        (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (3, 2), (255, 0, 0, 0)), (0, 255, 255)),
        (Image.new("I;16", (3, 2), 65535), (255, 255, 255)),
        (Image.new("I;16", (3, 2), 25700), (100, 100, 100)),
        (Image.new("I", (3, 2), 25700), (100, 100, 100)),
        (Image.new("I", (3, 2), 70000), (255, 255, 255)),
        (Image.new("F", (3, 2), 0.25), (64, 64, 64)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else str(value),
)
def test_pil_modes_become_rgb(image, expected):
    rgb = load_image(image)
    assert rgb.size == (3, 2)
    for channel, value in zip(rgb_at(rgb, 2, 1), expected):
        assert abs(channel - value) <= 1


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 100, np.uint8), (100, 100, 100)),
        (np.full((2, 3, 1), 100, np.uint8), (100, 100, 100)),
        (np.tile(np.array([10, 20, 30], np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 255], np.uint8), (2, 3, 1)), (10, 20, 30)),
        (np.tile(np.array([10, 20, 30, 0], np.uint8), (2, 3, 1)), (255, 255, 255)),
        (np.full((2, 3, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((2, 3), 1.0, np.float64), (255, 255, 255)),
        (np.full((2, 3, 3), 25700, np.uint16), (100, 100, 100)),
    ],
    ids=["HxW", "HxWx1", "HxWx3", "HxWx4-opaque", "HxWx4-transparent", "float32", "float64-HxW", "uint16"],
)
def test_numpy_arrays_become_rgb(array, expected):
    rgb = load_image(array)
    assert rgb.size == (3, 2)
    assert rgb_at(rgb, 1, 1) == expected


def test_paths_bytes_and_mappings_are_decoded(tmp_path):
    source = Image.new("RGBA", (5, 4), (10, 20, 30, 255))
    source.putpixel((4, 3), (10, 20, 30, 0))
    path = tmp_path / "image.png"
    source.save(path)
    encoded = png_bytes(source)
    for image in (str(path), path, encoded, bytearray(encoded), {"bytes": encoded, "path": None}, {"path": str(path)}):
        rgb = load_image(image)
        assert rgb.size == (5, 4)
        assert rgb_at(rgb, 0, 0) == (10, 20, 30)
        assert rgb_at(rgb, 4, 3) == (255, 255, 255)


def test_jpeg_bytes_are_decoded():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 100, 50)).save(buffer, format="JPEG", quality=95)
    rgb = load_image(buffer.getvalue())
    assert rgb.size == (16, 8)
    assert all(abs(a - b) <= 3 for a, b in zip(rgb_at(rgb, 8, 4), (200, 100, 50)))


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (Image.new("RGB", (0, 0)), "empty"),
        (Image.new("L", (5, 0)), "empty"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros(7, np.uint8), "shape"),
        (np.full((2, 2), 255.0), r"\[0, 1\]"),
        (np.full((2, 2), -0.5, np.float32), r"\[0, 1\]"),
        (np.full((2, 2), np.nan), "NaN"),
        (np.zeros((2, 2), np.int64), "dtype"),
        (b"", "empty"),
        (b"definitely not an image", "Cannot decode image bytes"),
        (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "Cannot decode image bytes"),
        ("/no/such/image.png", "not found"),
        (42, "Unsupported image input of type int"),
        ({"bytes": None, "path": None}, "Unsupported image input of type dict"),
    ],
    ids=[
        "pil-0x0", "pil-5x0", "array-empty", "array-2-channels", "array-4d", "array-1d", "float-0-255",
        "float-negative", "float-nan", "int64", "bytes-empty", "bytes-garbage", "bytes-truncated",
        "missing-path", "int", "empty-mapping",
    ],
)
def test_invalid_inputs_raise_invalid_image_error(bad_input, message):
    with pytest.raises(InvalidImageError, match=message):
        load_image(bad_input)


def test_directory_and_corrupt_file_paths_raise(tmp_path):
    with pytest.raises(InvalidImageError, match="not a file"):
        load_image(tmp_path)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 broken")
    with pytest.raises(InvalidImageError, match=r"corrupt\.jpg"):
        load_image(corrupt)
    assert issubclass(InvalidImageError, ValueError)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_of_files_and_bytes_is_applied(tmp_path, orientation):
    upright = upright_test_picture()
    png = save_exif_photo(tmp_path / f"photo_{orientation}.png", upright, orientation)
    assert Image.open(png).size != upright.size or orientation == 3  # stored turned
    for source in (png, str(png), png.read_bytes(), {"bytes": png.read_bytes()}, {"path": str(png)}):
        loaded = load_image(source)
        assert loaded.size == upright.size
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))
    jpeg = save_exif_photo(tmp_path / f"photo_{orientation}.jpg", upright, orientation)
    with Image.open(jpeg) as opened:
        expected = ImageOps.exif_transpose(opened).convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_image(jpeg)), np.asarray(expected))
    assert load_image(jpeg).size == upright.size


@pytest.mark.parametrize("scale", [1.01, 2.5])
def test_images_above_pils_pixel_limit_are_refused_without_a_raw_warning(scale, recwarn):
    side = int((Image.MAX_IMAGE_PIXELS * scale) ** 0.5) + 1
    bomb = png_bomb(side, side)
    assert len(bomb) < 200_000
    with pytest.raises(InvalidImageError, match=r"more pixels than the limit of 89,478,485 .*decompression bomb"):
        load_image(bomb)
    assert not [warning for warning in recwarn if issubclass(warning.category, Image.DecompressionBombWarning)]


def test_images_between_the_cap_and_pils_limit_are_downscaled_with_one_log_line(caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_image(png_bomb(5000, 4000), max_pixels=1_000_000)
    assert loaded.size == (1118, 894)
    (record,) = caplog.records
    assert "5000x4000" in record.getMessage() and "1118x894" in record.getMessage()


def test_decoded_pil_images_keep_their_pixels(tmp_path):
    """A PIL image is already decoded by its owner (Gradio, datasets, benchmark loaders): left as it is."""
    with Image.open(save_exif_photo(tmp_path / "photo.png", upright_test_picture(), 6)) as stored:
        stored.load()
        assert load_image(stored).size == stored.size


def test_training_crops_of_a_phone_photo_are_upright(processor, tmp_path):
    upright = upright_test_picture(64, 40)
    photo = save_exif_photo(tmp_path / "photo.png", upright, 6)
    expected = processor.preprocess_train(upright, np.random.default_rng(3))
    torch.testing.assert_close(processor.preprocess_train(photo.read_bytes(), np.random.default_rng(3)), expected)


def test_images_above_max_pixels_are_downscaled_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        rgb = load_image(Image.new("RGB", (100, 50), (9, 9, 9)), max_pixels=1000)
    assert rgb.width * rgb.height <= 1000
    assert rgb.size == (44, 22)
    assert "max_pixels=1000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert load_image(Image.new("RGB", (100, 50)), max_pixels=None).size == (100, 50)
        assert load_image(Image.new("RGB", (100, 50)), max_pixels=5000).size == (100, 50)
    assert caplog.records == []


def test_huge_encoded_images_are_capped_on_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (50, 60, 70)).save(buffer, format="JPEG")
    rgb = CoDeImageProcessor(max_pixels=5000).load_image(buffer.getvalue())
    assert rgb.width * rgb.height <= 5000
    assert abs(rgb.width / rgb.height - 2) < 0.1


# ------------------------------------------------------------------------------------ training


def test_training_transform_shape_and_normalisation(processor):
    pixels = processor.preprocess_train(Image.new("RGB", (50, 40), (100, 150, 200)), np.random.default_rng(0))
    assert pixels.shape == (3, 32, 32)
    assert pixels.dtype == torch.float32
    expected = normalised((100, 150, 200)).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


def test_training_transform_is_deterministic_for_a_seeded_rng(processor):
    image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    first = processor.preprocess_train(image, np.random.default_rng(7))
    again = processor.preprocess_train(image, np.random.default_rng(7))
    other = processor.preprocess_train(image, np.random.default_rng(8))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)


def test_training_flip_follows_flip_probability():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 20:] = 255  # dark left half, bright right half
    settings_kwargs = {"train_crop_size": 40, "train_crop_scale": (1.0, 1.0), "train_crop_ratio": (1.0, 1.0)}
    never = CoDeImageProcessor(flip_probability=0.0, **settings_kwargs).preprocess_train(image, np.random.default_rng(0))
    always = CoDeImageProcessor(flip_probability=1.0, **settings_kwargs).preprocess_train(image, np.random.default_rng(0))
    assert never[:, :, :20].mean() < 0 < never[:, :, 20:].mean()
    torch.testing.assert_close(always, never.flip(-1), atol=0, rtol=0)


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    scale_low=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_resized_crop_box_stays_inside_the_image(height, width, scale_low, seed):
    ratio = (3 / 4, 4 / 3)
    top, left, crop_height, crop_width = random_resized_crop_box(
        height, width, (scale_low, 1.0), ratio, np.random.default_rng(seed)
    )
    assert top >= 0 and left >= 0
    assert crop_height >= 1 and top + crop_height <= height
    assert crop_width >= 1 and left + crop_width <= width


def test_random_resized_crop_box_samples_area_and_ratio_like_torchvision():
    rng = np.random.default_rng(3)
    for _ in range(200):
        _, _, crop_height, crop_width = random_resized_crop_box(300, 400, (0.5, 0.8), (0.8, 1.25), rng)
        area_fraction = crop_height * crop_width / (300 * 400)
        assert 0.5 - 0.01 <= area_fraction <= 0.8 + 0.01
        assert 0.8 - 0.02 <= crop_width / crop_height <= 1.25 + 0.02


def test_random_resized_crop_box_falls_back_to_a_centre_crop():
    # A 100 (high) x 10 (wide) image cannot hold a box of aspect ratio >= 4 with this area: centre crop.
    box = random_resized_crop_box(100, 10, (0.5, 1.0), (4.0, 5.0), np.random.default_rng(0))
    assert box == (49, 0, 2, 10)
    # An aspect ratio inside the range gives the whole image.
    assert random_resized_crop_box(10, 10, (5.0, 6.0), (0.5, 2.0), np.random.default_rng(0)) == (0, 0, 10, 10)


# ---------------------------------------------------------------------------------- evaluation


def test_keep_ratio_size_examples():
    assert keep_ratio_size(375, 500, 448, 2048) == (448, 597)
    assert keep_ratio_size(500, 375, 448, 2048) == (597, 448)
    assert keep_ratio_size(448, 448, 448, 2048) == (448, 448)
    assert keep_ratio_size(500, 4000, 448, 2048) == (256, 2048)  # long side capped
    assert keep_ratio_size(1, 5000, 448, 2048) == (1, 2048)
    with pytest.raises(ValueError, match="positive"):
        keep_ratio_size(0, 10, 448, 2048)


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 6000), width=st.integers(1, 6000))
def test_keep_ratio_size_properties(height, width):
    new_height, new_width = keep_ratio_size(height, width, 448, 2048)
    short, long = min(new_height, new_width), max(new_height, new_width)
    assert short <= 448 and long <= 2048
    assert short == 448 or long == 2048
    scale = min(448 / min(height, width), 2048 / max(height, width))
    for old, new in ((height, new_height), (width, new_width)):
        assert new == 1 or abs(new - old * scale) <= 0.5
    if height >= width:
        assert new_height >= new_width


def test_eval_transform_sizes_and_cap(processor):
    assert processor.eval_size(30, 40, SMALL) == (24, 32)
    assert processor.preprocess_eval(Image.new("RGB", (40, 30)), SMALL).shape == (3, 24, 32)
    assert processor.preprocess_eval(np.zeros((10, 100, 3), np.uint8), SMALL).shape == (3, 6, 64)


def test_eval_transform_normalises_a_constant_image(processor):
    pixels = processor.preprocess_eval(Image.new("RGB", (50, 70), (100, 150, 200)), SMALL)
    expected = normalised((100, 150, 200)).view(3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


def test_eval_resize_is_bilinear_without_antialiasing():
    # Downscaling 6 -> 2 samples source columns 1 and 4 exactly (half-pixel centres): both are 90.
    # An antialiased (PIL) resize would average their zero neighbours in and give much less.
    image = np.zeros((6, 6, 3), np.uint8)
    image[:, [1, 4]] = 90
    pixels = CoDeImageProcessor().preprocess_eval(image, InferenceProtocol(short_side=2))
    assert pixels.shape == (3, 2, 2)
    expected = normalised((90, 90, 90)).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)


def test_the_paper_protocol_is_the_default_resize():
    assert CoDeImageProcessor().eval_size(300, 500) == (448, 747)
    assert CoDeImageProcessor().eval_size(100, 5000) == (41, 2048)


def test_the_resize_of_0_1_is_deprecated_but_still_applied():
    with pytest.warns(FutureWarning, match="eval_short_side"):
        legacy = CoDeImageProcessor(eval_short_side=24, eval_max_long_side=64)
    assert legacy.eval_size(30, 40) == (24, 32)  # a processor used on its own keeps what it was built with
    assert legacy.eval_size(30, 40, InferenceProtocol()) == (448, 597)  # a given protocol wins
    assert "eval_short_side" not in legacy.to_dict()


def test_preprocess_batches_equal_sizes_and_lists_others(processor):
    same = processor([Image.new("RGB", (40, 30)), np.zeros((60, 80, 3), np.uint8)], protocol=SMALL)
    assert isinstance(same["pixel_values"], torch.Tensor)
    assert same["pixel_values"].shape == (2, 3, 24, 32)
    assert same["original_sizes"] == [(30, 40), (60, 80)]
    mixed = processor.preprocess([Image.new("RGB", (40, 30)), Image.new("RGB", (30, 40))], protocol=SMALL)
    assert isinstance(mixed["pixel_values"], list)
    assert [tuple(p.shape) for p in mixed["pixel_values"]] == [(3, 24, 32), (3, 32, 24)]
    single = processor(Image.new("RGB", (40, 30)), protocol=SMALL)
    assert single["pixel_values"].shape == (1, 3, 24, 32)
    with pytest.raises(ValueError, match="return_tensors"):
        processor.preprocess(Image.new("RGB", (4, 4)), return_tensors="np")


# ----------------------------------------------------------------------------- post-processing


def test_post_process_resizes_and_takes_the_argmax(processor):
    scores = torch.zeros(2, 3, 4, 4)
    scores[0, 1] = 0.9  # image 0: class 1 everywhere
    scores[1, 2, :, :2] = 0.8  # image 1: class 2 on the left half, class 0 (all zero: first) elsewhere
    labels = processor.post_process_semantic_segmentation(
        SimpleNamespace(scores=scores), target_sizes=[(8, 6), (4, 4)]
    )
    assert [tuple(label.shape) for label in labels] == [(8, 6), (4, 4)]
    assert all(label.dtype == torch.long for label in labels)
    assert (labels[0] == 1).all()
    assert (labels[1][:, :2] == 2).all() and (labels[1][:, 2:] == 0).all()
    unresized = processor.post_process_semantic_segmentation(SimpleNamespace(scores=scores))
    assert [tuple(label.shape) for label in unresized] == [(4, 4), (4, 4)]
    # without target sizes: the sizes the processor saw, passed through the model's output
    seen = processor.post_process_semantic_segmentation(SimpleNamespace(scores=scores, original_sizes=[(8, 6), (2, 2)]))
    assert [tuple(label.shape) for label in seen] == [(8, 6), (2, 2)]
    assert (seen[0] == 1).all()


def test_the_deprecated_post_process_background_threshold_still_shifts_class_ids(processor):
    scores = torch.full((2, 3, 5), 0.2)
    scores[1, :, 3:] = 0.7  # class 1 above the threshold on the right
    with pytest.warns(FutureWarning, match="background_threshold"):
        labels = processor.post_process_semantic_segmentation(
            SimpleNamespace(scores=[scores]), target_sizes=torch.tensor([[3, 5]]), background_threshold=0.4
        )
    assert labels[0].tolist() == [[0, 0, 0, 2, 2]] * 3


def test_post_process_rejects_mismatched_target_sizes(processor):
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_semantic_segmentation(SimpleNamespace(scores=torch.zeros(2, 3, 4, 4)), [(4, 4)])
    with pytest.raises(ValueError, match="num_classes"):
        processor.post_process_semantic_segmentation(SimpleNamespace(scores=[torch.zeros(4, 4)]))


# ----------------------------------------------------------------------------- configuration


def test_save_and_load_round_trip(tmp_path):
    original = CoDeImageProcessor(
        image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), train_crop_size=48,
        train_crop_scale=(0.5, 0.9), max_pixels=None,
    )
    original.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = CoDeImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == original.to_dict()
    assert loaded.image_mean == (0.5, 0.5, 0.5)
    assert loaded.train_crop_scale == (0.5, 0.9)
    assert loaded.max_pixels is None
    assert CoDeImageProcessor.from_pretrained(tmp_path, train_crop_size=64).train_crop_size == 64


def test_defaults_match_the_spec():
    defaults = CoDeImageProcessor()
    assert defaults.image_mean == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert defaults.image_std == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert (defaults.train_crop_size, defaults.train_crop_scale) == (224, (0.9, 1.0))
    assert defaults.train_crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert defaults.flip_probability == 0.5
    assert defaults.resample == Image.Resampling.BILINEAR


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_std": (0.2, 0.0, 0.2)}, "image_std"),
        ({"image_mean": (0.5, 0.5)}, "3 values"),
        ({"train_crop_scale": (0.9, 0.5)}, "low <= high"),
        ({"flip_probability": 1.5}, "flip_probability"),
        ({"train_crop_size": 0}, "train_crop_size"),
        ({"resample": Image.Resampling.LANCZOS}, "resample"),
    ],
)
def test_invalid_configuration_is_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        CoDeImageProcessor(**options)
