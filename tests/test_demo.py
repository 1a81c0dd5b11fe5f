"""The demo's library side: input validation, the prediction function and model loading (no server)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio.data_classes import ImageData
from helpers import BAD_IMAGE_FILES, png_bomb, save_exif_photo, upright_test_picture, write_bad_image
from PIL import Image

from modeling_code.apps.demo import (
    CUSTOM_PRESET,
    MAX_CLASSES,
    MODEL_ENV_VAR,
    MODEL_PRESET,
    TOY_WORLD_MODEL_DIR,
    build_demo,
    class_presets,
    color_map,
    load_demo_model,
    matching_preset,
    parse_class_request,
    predict,
    prepare_image,
    preset_values,
    resolve_model_source,
    save_label_map,
)
from modeling_code.predict.segmenter import CoDeSegmenter
from modeling_code.predict.visualization import palette
from modeling_code.toy.world import TOY_CLASSES


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return CoDeSegmenter.from_pretrained(tiny_model_dir)


def random_image(width: int = 90, height: int = 70, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ prediction
def test_predict_returns_overlay_label_map_and_fractions_of_the_segmentation(segmenter, tmp_path):
    image = random_image()
    prediction = predict(segmenter, image, "cat, dog , tree", True, 0.45, False, output_dir=tmp_path)
    expected = segmenter(image, ["background", "cat", "dog", "tree"], use_pamr=False, background_threshold=0.45)

    shown, masks = prediction.annotated
    assert shown.size == image.size
    assert [label for _, label in masks] == expected.present_classes
    coverage = np.zeros(expected.label_map.shape, dtype=np.float32)
    for mask, label in masks:
        assert mask.dtype == np.float32 and mask.shape == (70, 90)
        np.testing.assert_array_equal(mask, expected.label_map == expected.class_names.index(label))
        coverage += mask
    np.testing.assert_array_equal(coverage, 1.0)  # every pixel in exactly one mask

    path = Path(prediction.label_map_path)
    assert path.name == "label_map.png" and path.parent.parent == tmp_path
    with Image.open(path) as saved:
        assert saved.mode == "P"
        np.testing.assert_array_equal(np.array(saved), expected.label_map)
        np.testing.assert_array_equal(np.array(saved.getpalette()[:12]).reshape(4, 3), palette(4))

    table = prediction.fractions
    assert list(table.columns) == ["class", "id", "pixels (%)"]
    assert table["class"].tolist() == sorted(expected.present_classes, key=lambda n: -expected.pixel_fractions[n])
    for name, index, percent in table.itertuples(index=False):
        assert index == expected.class_names.index(name)
        assert percent == pytest.approx(100 * expected.pixel_fractions[name], abs=0.006)
    assert table["pixels (%)"].sum() == pytest.approx(100, abs=0.05)
    assert prediction.color_map == color_map(["background", "cat", "dog", "tree"])
    assert prediction.color_map["background"] == "#{:02x}{:02x}{:02x}".format(*palette(1)[0])


def test_predict_with_background_off_and_pamr_matches_the_segmenter(segmenter, tmp_path):
    image = random_image(seed=1)
    with pytest.warns(UserWarning, match="'background' was ignored"):
        prediction = predict(segmenter, image, "background, cat, dog", False, 0.4, True, output_dir=tmp_path)
    expected = segmenter(image, ["cat", "dog"], use_pamr=True)
    assert list(prediction.color_map) == ["cat", "dog"]
    with Image.open(prediction.label_map_path) as saved:
        np.testing.assert_array_equal(np.array(saved), expected.label_map)


def test_predict_downscales_large_images_with_a_warning(segmenter, tmp_path):
    with pytest.warns(UserWarning, match=r"\(200x100\) was downscaled to 141x70"):
        prediction = predict(segmenter, random_image(200, 100), "cat", True, 0.4, False, max_pixels=10_000,
                             output_dir=tmp_path)
    assert prediction.annotated[0].size == (141, 70)
    with Image.open(prediction.label_map_path) as saved:
        assert saved.size == (141, 70)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((None, "cat", True, 0.4, False), "Upload an image first"),
        ((random_image(), "  , ,", True, 0.4, False), "Enter at least one class name"),
        ((random_image(), "background", True, 0.4, False), "Enter at least one class name"),
        ((random_image(), "cat", True, 1.5, False), "between 0 and 1"),
        ((np.zeros((4, 4, 7), dtype=np.uint8), "cat", True, 0.4, False), "cannot be read"),
    ],
)
def test_bad_inputs_raise_friendly_errors(segmenter, arguments, message):
    with pytest.raises(gr.Error, match=message):
        predict(segmenter, *arguments)


def test_predict_without_a_model_says_how_to_get_one():
    with pytest.raises(gr.Error, match=r"CODE_SEG_MODEL.*bash scripts/toy_world\.sh"):
        predict(None, random_image(), "cat", True, 0.4, False)


# ------------------------------------------------------------------------------------------------ validation
def test_class_request_repairs_empty_and_repeated_entries():
    request = parse_class_request("cat,, Dog ,cat , big   dog,DOG,", use_background=True)
    assert request.class_names == ["background", "cat", "Dog", "big dog"]
    assert request.notes == ["Empty entries in the class list were ignored.",
                             "Repeated class names were ignored: cat, DOG."]
    assert parse_class_request("sky, Background", use_background=True) == parse_class_request("sky", True)
    off = parse_class_request("sky, Background", use_background=False)
    assert off.class_names == ["sky"] and "'background' was ignored" in off.notes[0]


def test_class_request_splits_lines_like_commas():
    request = parse_class_request("cat\nsofa\ndog", use_background=False)
    assert request.class_names == ["cat", "sofa", "dog"] and request.notes == []
    request = parse_class_request("cat,\n sofa,\n\ndog\n", use_background=True)
    assert request.class_names == ["background", "cat", "sofa", "dog"] and request.notes == []
    assert parse_class_request("cat,,\nsofa", use_background=False).notes == [
        "Empty entries in the class list were ignored."
    ]


def test_class_request_limits():
    names = ", ".join(f"class{i}" for i in range(MAX_CLASSES))
    assert len(parse_class_request(names, use_background=False).class_names) == MAX_CLASSES
    with pytest.raises(gr.Error, match=f"Too many classes: {MAX_CLASSES + 1} \\(at most {MAX_CLASSES}\\)"):
        parse_class_request(names, use_background=True)
    with pytest.raises(gr.Error, match="limited to 100 characters"):
        parse_class_request("cat, " + "x" * 101, use_background=False)
    with pytest.raises(gr.Error, match="Enter at least one class name"):
        parse_class_request(None, use_background=True)


def test_prepare_image_keeps_small_images_and_caps_large_ones():
    small = random_image(30, 20)
    kept, note = prepare_image(small, max_pixels=600)
    assert note is None and kept.size == (30, 20)
    shrunk, note = prepare_image(np.asarray(random_image(400, 100)), max_pixels=10_000)
    assert shrunk.size == (200, 50) and "400x100" in note and "200x50" in note
    rgba, _ = prepare_image(Image.new("RGBA", (5, 5)))
    assert rgba.mode == "RGB"


def test_label_map_png_holds_at_most_256_classes(tmp_path):
    with pytest.raises(ValueError, match="at most 256"):
        save_label_map(np.zeros((2, 2), dtype=np.int64), 257, tmp_path)


# ------------------------------------------------------------------------------------------------ presets
def test_presets_are_the_benchmark_and_toy_world_class_lists():
    presets = class_presets()
    assert list(presets) == ["PASCAL VOC", "COCO-Object", "ADE20K", "Cityscapes", "Toy world"]
    assert len(presets["PASCAL VOC"].class_names) == 20 and presets["PASCAL VOC"].background
    assert len(presets["COCO-Object"].class_names) == 80 and presets["COCO-Object"].background
    assert len(presets["ADE20K"].class_names) == 150 and not presets["ADE20K"].background
    assert presets["Cityscapes"].class_names[:2] == ("road", "sidewalk")
    assert presets["Toy world"].class_names == TOY_CLASSES
    for name in presets:
        text, background = preset_values(name)
        request = parse_class_request(text, background)
        assert request.notes == [] and len(request.class_names) <= MAX_CLASSES
    with pytest.raises(gr.Error, match="Unknown class preset"):
        preset_values("Pascal")


# ------------------------------------------------------------------------------------------------ model loading
def test_model_source_is_the_env_variable_then_the_toy_world_model(tmp_path):
    assert resolve_model_source({MODEL_ENV_VAR: " user/model "}, tmp_path) == "user/model"
    assert resolve_model_source({}, tmp_path) is None
    toy_world = tmp_path / TOY_WORLD_MODEL_DIR
    toy_world.mkdir(parents=True)
    assert resolve_model_source({MODEL_ENV_VAR: ""}, tmp_path) is None  # a folder without a saved model
    (toy_world / "config.json").write_text("{}")
    assert resolve_model_source({MODEL_ENV_VAR: ""}, tmp_path) == str(toy_world)


def test_load_demo_model_reports_what_is_loaded(tiny_model_dir, tmp_path):
    loaded = load_demo_model(str(tiny_model_dir))
    assert isinstance(loaded.segmenter, CoDeSegmenter)
    assert loaded.status.startswith(f"**Model:** `{tiny_model_dir}`") and "patch 8" in loaded.status

    missing = load_demo_model(None)
    assert missing.segmenter is None
    assert "No model is loaded" in missing.status and "bash scripts/toy_world.sh" in missing.status

    broken = load_demo_model(str(tmp_path / "nowhere"))
    assert broken.segmenter is None and f"loading `{tmp_path / 'nowhere'}` failed" in broken.status


def test_page_without_a_model_shows_the_status_and_builds(tmp_path):
    demo = build_demo(load_demo_model(None), default_preset="Toy world")
    values = {block.elem_id: getattr(block, "value", None) for block in demo.blocks.values() if block.elem_id}
    assert "No model is loaded" in values["model-status"]
    assert values["class-text"] == ", ".join(TOY_CLASSES)


# ------------------------------------------------------------------------------------------------ hostile uploads
def page_component(demo, elem_id: str):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


@pytest.mark.parametrize("name", list(BAD_IMAGE_FILES))
def test_unreadable_uploads_reach_the_handler_and_get_the_cli_message(segmenter, tmp_path, name):
    """Gradio's image component decoded uploads before our code ran: a bad file gave a bare "Error" badge."""
    path, message = write_bad_image(tmp_path, name), BAD_IMAGE_FILES[name]
    demo = build_demo(load_demo_model_from(segmenter))
    uploaded = page_component(demo, "input-image").preprocess(ImageData(path=str(path), orig_name=name))
    assert uploaded == str(path)
    with pytest.raises(gr.Error, match=f"This image cannot be read: .*{message}"):
        predict(segmenter, uploaded, "cat", True, 0.4, False)


def test_uploaded_phone_photos_are_segmented_upright(segmenter, tmp_path):
    upright = upright_test_picture(40, 64)
    photo = save_exif_photo(tmp_path / "portrait.jpg", upright, 6)
    demo = build_demo(load_demo_model_from(segmenter))
    uploaded = page_component(demo, "input-image").preprocess(ImageData(path=str(photo), orig_name="portrait.jpg"))
    prediction = predict(segmenter, uploaded, "cat, sofa", True, 0.4, False, output_dir=tmp_path)
    assert prediction.annotated[0].size == (40, 64)
    with Image.open(prediction.label_map_path) as saved:
        assert saved.size == (40, 64)


def load_demo_model_from(segmenter):
    from modeling_code.apps.demo import DemoModel

    return DemoModel(segmenter, "tiny", "**Model:** `tiny`.")


# ------------------------------------------------------------------------------------------------ the server log
def test_a_user_mistake_is_one_log_line_and_no_traceback(segmenter, caplog):
    with caplog.at_level(logging.INFO, logger="modeling_code.apps.demo"), pytest.raises(gr.Error) as caught:
        predict(segmenter, random_image(), " , ", True, 0.4, False)
    assert caught.value.print_exception is False  # gradio prints the traceback of errors that ask for it
    (record,) = caplog.records
    assert "Enter at least one class name" in record.getMessage() and record.exc_info is None
    assert "\n" not in record.getMessage()


def test_a_bad_model_folder_is_one_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="modeling_code.apps.demo"):
        loaded = load_demo_model(str(tmp_path / "nowhere"))
    assert loaded.segmenter is None
    (record,) = caplog.records
    assert "Model folder not found" in record.getMessage() and record.exc_info is None


def test_images_between_the_demo_cap_and_pils_limit_are_downscaled_with_one_log_line(segmenter, tmp_path, caplog):
    path = tmp_path / "big.png"
    path.write_bytes(png_bomb(3000, 2000))
    with caplog.at_level(logging.INFO, logger="modeling_code"):
        rgb, note = prepare_image(str(path))
    assert rgb.size == (1254, 836) and "3000x2000" in note
    assert len(caplog.records) == 1 and "3000x2000" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------------------------ no model
def test_without_a_model_the_page_says_so_once_and_disables_its_controls():
    demo = build_demo(load_demo_model(None))
    status = page_component(demo, "model-status").value
    assert status.count("No model is loaded") == 1 and "bash scripts/toy_world.sh" in status
    for elem_id in ("input-image", "class-text", "segment-button", "class-preset"):
        assert page_component(demo, elem_id).interactive is False, elem_id
    with pytest.raises(gr.Error) as caught:
        predict(None, random_image(), "cat", True, 0.4, False)
    assert str(caught.value).count("No model is loaded") == 1


# ------------------------------------------------------------------------------------------------ vocabulary
def with_vocabulary(segmenter, vocabulary):
    model = dataclasses.replace(load_demo_model_from(segmenter))
    config = segmenter.model.config
    original = config.class_vocabulary
    config.class_vocabulary = vocabulary
    try:
        return build_demo(model)
    finally:
        config.class_vocabulary = original


@pytest.mark.parametrize(
    ("vocabulary", "preset", "text"),
    [
        (None, "PASCAL VOC", None),
        (list(TOY_CLASSES), "Toy world", ", ".join(TOY_CLASSES)),
        (["background", "circle", "café"], MODEL_PRESET, "circle, café"),
    ],
)
def test_the_first_preset_is_the_vocabulary_saved_with_the_model(segmenter, vocabulary, preset, text):
    demo = with_vocabulary(segmenter, vocabulary)
    dropdown = page_component(demo, "class-preset")
    assert dropdown.value == preset and CUSTOM_PRESET in [choice[0] for choice in dropdown.choices]
    if text is not None:
        assert page_component(demo, "class-text").value == text


def test_the_preset_follows_the_class_text():
    presets = class_presets()
    assert matching_preset(", ".join(TOY_CLASSES), presets) == "Toy world"
    assert matching_preset("\n".join(TOY_CLASSES), presets) == "Toy world"
    voc = preset_values("PASCAL VOC")[0]
    assert matching_preset(voc.upper(), presets) == "PASCAL VOC"
    assert matching_preset("background, " + voc, presets) == "PASCAL VOC"
    assert matching_preset("circle, triangle, square, grass, sky", presets) == CUSTOM_PRESET
    assert matching_preset("", presets) == CUSTOM_PRESET
