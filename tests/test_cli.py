"""``code-seg segment`` end to end on a saved tiny model: the three files per image, options and error messages."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from helpers import code_seg_command, code_seg_environment, save_exif_photo, upright_test_picture
from PIL import Image

from modeling_code.apps.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, build_parser, main


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def write_photo(path, height: int, width: int, seed: int):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_segment_writes_overlay_label_map_and_json(model_dir, tmp_path):
    first = write_photo(tmp_path / "in" / "kitchen.png", 90, 120, seed=0)
    second = write_photo(tmp_path / "in" / "street.jpg", 70, 50, seed=1)
    out = tmp_path / "out"
    code = main(
        [
            "segment",
            str(first),
            str(second),
            "--classes",
            "cat, sofa, background",
            "--model",
            str(model_dir),
            "--out",
            str(out),
        ]
    )
    assert code == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == [
        "kitchen.json",
        "kitchen_labels.png",
        "kitchen_overlay.png",
        "street.json",
        "street_labels.png",
        "street_overlay.png",
    ]
    for stem, (height, width) in (("kitchen", (90, 120)), ("street", (70, 50))):
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (height, width) and labels.max() < 3
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width == max(width, 160) and overlay.height > height
        summary = json.loads((out / f"{stem}.json").read_text())
        assert (summary["height"], summary["width"]) == (height, width)
        assert summary["pamr"] is True and summary["background_threshold"] == 0.4
        assert [(c["id"], c["name"]) for c in summary["classes"]] == [
            (0, "cat"),
            (1, "sofa"),
            (2, "background"),
        ]
        fractions = np.bincount(labels.ravel(), minlength=3) / labels.size
        np.testing.assert_allclose([c["pixel_fraction"] for c in summary["classes"]], fractions)


def test_no_pamr_and_background_threshold_options(model_dir, tmp_path):
    image = write_photo(tmp_path / "a.png", 40, 40, seed=2)
    code = main(
        [
            "segment",
            str(image),
            "--classes",
            "background, cat",
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
            "--no-pamr",
            "--bg-thresh",
            "1.0",
        ]
    )
    assert code == EXIT_OK
    summary = json.loads((tmp_path / "out" / "a.json").read_text())
    assert summary["pamr"] is False and summary["background_threshold"] == 1.0
    assert summary["classes"][0] == {"id": 0, "name": "background", "pixel_fraction": 1.0}


def test_same_file_names_in_different_folders_do_not_overwrite(model_dir, tmp_path):
    images = [write_photo(tmp_path / folder / "photo.png", 30, 30, seed=3) for folder in ("x", "y")]
    code = main(
        [
            "segment",
            *map(str, images),
            "--classes",
            "cat",
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == EXIT_OK
    assert {p.name for p in (tmp_path / "o").glob("*.json")} == {"photo.json", "photo-2.json"}


def test_unreadable_images_are_reported_and_the_others_processed(model_dir, tmp_path, capsys):
    good = write_photo(tmp_path / "good.png", 30, 30, seed=4)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not a png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    code = main(
        [
            "segment",
            str(corrupt),
            str(good),
            str(empty),
            str(tmp_path / "missing.png"),
            "--classes",
            "cat, dog",
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == EXIT_SOME_FAILED
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good.json",
        "good_labels.png",
        "good_overlay.png",
    ]
    errors = capsys.readouterr().err
    assert "skipping" in errors and "corrupt.png" in errors and "Cannot decode" in errors
    assert "empty.png" in errors and "missing.png" in errors and "not found" in errors
    assert "3 of 4 images could not be read" in errors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", " , ,"], "No class names"),
        (["--classes", "background"], "alone"),
        (["--classes", "cat", "--bg-thresh", "1.5"], "--bg_thresh must be in"),
        (["--classes", "cat", "--alpha", "-1"], "--alpha must be in"),
        (["--classes", "cat", "--max-pixels", "0"], "--max_pixels must be positive"),
    ],
)
def test_unusable_arguments_are_named_before_loading_anything(tmp_path, capsys, extra, message):
    code = main(
        ["segment", "x.png", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *extra]
    )
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_a_missing_model_is_named(tmp_path, capsys):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=5)
    code = main(
        [
            "segment",
            str(image),
            "--classes",
            "cat",
            "--model",
            str(tmp_path / "no-model"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == EXIT_USAGE
    assert "cannot load the model" in capsys.readouterr().err


def test_an_unavailable_device_is_named_and_auto_is_the_default(model_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = write_photo(tmp_path / "a.png", 20, 20, seed=5)
    arguments = ["segment", str(image), "--classes", "cat", "--model", str(model_dir), "--out", str(tmp_path / "o")]
    assert main([*arguments, "--device", "cuda"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "CUDA is not available" in error and "Traceback" not in error
    assert not (tmp_path / "o").exists()
    assert build_parser().parse_args(arguments).device == "auto"
    assert main(arguments) == EXIT_OK


@pytest.mark.parametrize("damage", [b"", b"\x13" * 5000])
def test_a_damaged_weights_file_is_named(model_dir, tmp_path, capsys, damage):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").write_bytes(damage)
    image = write_photo(tmp_path / "a.png", 20, 20, seed=5)
    code = main(["segment", str(image), "--classes", "cat", "--model", str(folder), "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == EXIT_USAGE and "model.safetensors" in error and "corrupt or truncated" in error


def segment_arguments(model_dir, out, *images) -> list[str]:
    return ["segment", *map(str, images), "--classes", "cat, dog", "--model", str(model_dir), "--out", str(out)]


def test_a_successful_run_prints_where_it_wrote_each_file(model_dir, tmp_path, capsys):
    images = [write_photo(tmp_path / name, 20, 20, seed=1) for name in ("a.png", "b.png")]
    assert main(segment_arguments(model_dir, tmp_path / "out", *images)) == EXIT_OK
    printed = capsys.readouterr()
    for stem in ("a", "b"):
        for name in (f"{stem}_overlay.png", f"{stem}_labels.png", f"{stem}.json"):
            assert str(tmp_path / "out" / name) in printed.out
    assert "Loading weights" not in printed.err and "Traceback" not in printed.err


def test_output_names_taken_by_folders_are_named_before_loading(model_dir, tmp_path, capsys, monkeypatch):
    import modeling_code.predict.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module.CoDeSegmenter, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    image = write_photo(tmp_path / "a.png", 20, 20, seed=1)
    out = tmp_path / "out"
    (out / "a_labels.png").mkdir(parents=True)
    (out / "a.json").write_text("kept")
    assert main(segment_arguments(model_dir, out, image)) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "taken by folders" in error and str(out / "a_labels.png") in error
    assert sorted(path.name for path in out.iterdir()) == ["a.json", "a_labels.png"]
    assert (out / "a.json").read_text() == "kept"


def test_an_output_path_that_is_a_file_is_named(model_dir, tmp_path, capsys):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=1)
    (tmp_path / "out").write_text("a file")
    assert main(segment_arguments(model_dir, tmp_path / "out", image)) == EXIT_USAGE
    assert "--output_dir is a file, not a folder" in capsys.readouterr().err
    assert main(segment_arguments(model_dir, tmp_path / "out" / "deeper", image)) == EXIT_USAGE
    assert "above --output_dir is a file" in capsys.readouterr().err


def test_nothing_is_written_when_the_model_cannot_be_loaded(tmp_path, capsys):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=1)
    assert main(segment_arguments(tmp_path / "no-model", tmp_path / "out", image)) == EXIT_USAGE
    assert not (tmp_path / "out").exists()


def test_missing_images_are_named_before_loading_the_model(tmp_path, capsys):
    assert main(segment_arguments(tmp_path / "no-model", tmp_path / "out", tmp_path / "gone.png")) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "gone.png: image file not found" in error and "none of the images exists" in error
    assert "cannot load the model" not in error


@pytest.mark.slow
def test_an_unwritable_output_folder_is_named_before_loading_the_model(model_dir, tmp_path):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=1)
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        completed = subprocess.run(
            code_seg_command(*segment_arguments(tmp_path / "no-model", out, image), drop_root_override=True),
            capture_output=True, text=True, env=code_seg_environment(), timeout=120,
        )
    finally:
        out.chmod(0o755)
    assert completed.returncode == EXIT_USAGE, completed.stderr
    assert f"cannot write to the output folder {out}" in completed.stderr and "Permission denied" in completed.stderr
    assert "cannot load the model" not in completed.stderr and "Traceback" not in completed.stderr
    assert list(out.iterdir()) == []


def test_duplicate_and_overlong_class_names_warn(model_dir, tmp_path, caplog):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=6)
    long_name = " ".join(["blue"] * 80)
    code = main(
        [
            "segment",
            str(image),
            "--classes",
            f"cat, Cat, {long_name}",
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == EXIT_OK
    assert "Duplicate class names ignored" in caplog.text and "truncated" in caplog.text
    summary = json.loads((tmp_path / "out" / "a.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["cat", long_name]


def test_classes_separated_by_line_breaks_are_separate_classes(model_dir, tmp_path):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=7)
    out = tmp_path / "out"
    assert main(["segment", str(image), "--classes", "cat\nsofa\ndog", "--model", str(model_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "a.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["cat", "sofa", "dog"]


def test_a_phone_photo_is_segmented_and_saved_upright(model_dir, tmp_path):
    upright = upright_test_picture(64, 36, seed=8)
    Image.Image.save(upright, tmp_path / "upright.png")
    save_exif_photo(tmp_path / "phone.png", upright, 6)
    out = tmp_path / "out"
    arguments = ["--classes", "cat, sofa, background", "--model", str(model_dir), "--out", str(out), "--no-pamr"]
    assert main(["segment", str(tmp_path / "upright.png"), str(tmp_path / "phone.png"), *arguments]) == EXIT_OK
    labels = np.asarray(Image.open(out / "phone_labels.png"))
    assert labels.shape == (36, 64)
    np.testing.assert_array_equal(labels, np.asarray(Image.open(out / "upright_labels.png")))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "phone_overlay.png")),
                                  np.asarray(Image.open(out / "upright_overlay.png")))


def test_json_is_utf8_text(model_dir, tmp_path):
    image = write_photo(tmp_path / "a.png", 20, 20, seed=9)
    out = tmp_path / "out"
    assert main(["segment", str(image), "--classes", "café, 猫", "--model", str(model_dir), "--out", str(out)]) == 0
    raw = (out / "a.json").read_bytes()
    assert "café".encode() in raw and "猫".encode() in raw and b"\\u" not in raw
    assert [c["name"] for c in json.loads(raw.decode("utf-8"))["classes"]] == ["café", "猫"]


def test_help_lists_the_segment_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "segment" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])


def test_label_maps_of_more_than_256_classes_are_16_bit(tmp_path):
    from modeling_code.apps.cli import _label_image

    labels = np.array([[0, 255], [256, 300]])
    _label_image(labels, num_classes=301).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "labels.png")), labels)
    _label_image(labels % 256, num_classes=256).save(tmp_path / "small.png")
    reread = Image.open(tmp_path / "small.png")
    assert reread.mode == "L"
    np.testing.assert_array_equal(np.asarray(reread), labels % 256)


def test_toy_world_command_sets_the_threads_and_runs_the_pipeline(tmp_path, monkeypatch):
    import torch

    import modeling_code.toy.end_to_end as end_to_end

    runs, threads = [], []
    monkeypatch.setattr(end_to_end, "run_toy_world", runs.append)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["toy-world", "--quick", "--output_dir", str(tmp_path), "--seed", "3", "--threads", "1"]) == EXIT_OK
    assert threads == [1]
    (settings,) = runs
    assert settings.seed == 3 and settings.output_dir == str(tmp_path) and settings.clip_steps == 3
