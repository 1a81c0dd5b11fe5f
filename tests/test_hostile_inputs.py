"""Hostile inputs, walked through every door a newcomer uses: the ``code-seg`` command line (in-process through
``main(argv)``, and a few real subprocesses), the Python API and the demo's handler.

Each row says what goes in and what must come out: the exit status or exception type, a message naming the
problem, no traceback, and nothing written or lost on failure (the output folder holds a file from an earlier run,
which must survive untouched). What every command-line row got is written to ``test-artifacts/hostile_inputs.md``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from helpers import (
    BAD_IMAGE_FILES,
    REPO_ROOT,
    code_seg_command,
    code_seg_environment,
    save_exif_photo,
    upright_test_picture,
    write_bad_image,
)
from PIL import Image

from modeling_code.apps.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, main
from modeling_code.apps.demo import MAX_CLASSES, load_demo_model, predict
from modeling_code.image_processing_code import InvalidImageError
from modeling_code.predict.segmenter import CoDeSegmenter

REPORT = REPO_ROOT / "test-artifacts" / "hostile_inputs.md"
EARLIER_RUN = "previous.json"  # in the output folder before every run: must survive every failure untouched
OUTCOMES: dict[str, tuple[int, str]] = {}


# --------------------------------------------------------------------------------------------------------------
# building the inputs
# --------------------------------------------------------------------------------------------------------------
def good_photo(folder: Path, name: str = "photo.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    upright_test_picture(48, 32).save(folder / name)
    return folder / name


def damaged_model(tiny_model_dir: Path, folder: Path, damage: str) -> Path:
    """A copy of the tiny model with one thing wrong."""
    shutil.copytree(tiny_model_dir, folder)
    if damage == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
    elif damage == "no tokenizer_config.json":
        (folder / "tokenizer_config.json").unlink()
    elif damage == "no config.json":
        (folder / "config.json").unlink()
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "empty weights":
        (folder / "model.safetensors").write_bytes(b"")
    elif damage == "config not JSON":
        (folder / "config.json").write_text("{not json")
    else:
        raise ValueError(damage)
    return folder


@dataclass
class Run:
    """A ``code-seg segment`` call being set up: the pieces a row changes."""

    root: Path
    model: str
    images: list[str] = field(default_factory=list)
    classes: str | None = "cat, dog"
    out: Path | None = None
    extra: list[str] = field(default_factory=list)

    def argv(self) -> list[str]:
        argv = ["segment", *self.images, "--model", self.model, *self.extra]
        if self.classes is not None:
            argv += ["--classes", self.classes]
        if self.out is not None:
            argv += ["--output_dir", str(self.out)]
        return argv


@dataclass(frozen=True)
class CliCase:
    """``change(run, tiny_model_dir, monkeypatch)`` spoils a working run; the run must then end with ``code`` and a
    message matching ``message`` (a regex)."""

    name: str
    change: Callable[[Run, Path, pytest.MonkeyPatch], None]
    code: int
    message: str


def image(name: str) -> Callable[[Run, Path, pytest.MonkeyPatch], None]:
    def change(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        run.images = [str(write_bad_image(run.root / "in", name))]
    return change


def model(damage: str) -> Callable[[Run, Path, pytest.MonkeyPatch], None]:
    def change(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        run.model = str(damaged_model(model_dir, run.root / "model", damage))
    return change


def setting(**values) -> Callable[[Run, Path, pytest.MonkeyPatch], None]:
    def change(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in values.items():
            setattr(run, name, value(run) if callable(value) else value)
    return change


def extra(*arguments: str) -> Callable[[Run, Path, pytest.MonkeyPatch], None]:
    return setting(extra=list(arguments))


def no_cuda(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run.extra = ["--device", "cuda"]


def out_is_a_file(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run.out = run.root / "a-file"
    run.out.write_text("not a folder")


def out_below_a_file(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run.root / "a-file").write_text("not a folder")
    run.out = run.root / "a-file" / "out"


def output_name_taken(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run.out / "photo_overlay.png").mkdir()


def missing_images(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run.images = [str(run.root / "in" / "gone.png")]


def folder_as_image(run: Run, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (run.root / "in" / "folder.png").mkdir(parents=True)
    run.images = [str(run.root / "in" / "folder.png")]


CLI_CASES = [
    # images
    *(CliCase(f"image: {name}", image(name), EXIT_SOME_FAILED, re.escape(message))
      for name, message in BAD_IMAGE_FILES.items()),
    CliCase("image: missing file", missing_images, EXIT_USAGE, r"gone\.png: image file not found"),
    CliCase("image: a folder", folder_as_image, EXIT_USAGE, r"folder\.png: image file is not a file"),
    # class lists
    CliCase("classes: empty", setting(classes=""), EXIT_USAGE, "No class names"),
    CliCase("classes: only separators", setting(classes=" , ,\n,"), EXIT_USAGE, "No class names"),
    CliCase("classes: background alone", setting(classes="background"), EXIT_USAGE, "'background' alone"),
    CliCase("classes: missing", setting(classes=None), EXIT_USAGE, "the following arguments are required: --classes"),
    # model folders
    CliCase("model: missing absolute path", setting(model=lambda run: str(run.root / "nowhere")), EXIT_USAGE,
            "Model folder not found"),
    CliCase("model: missing ./path", setting(model="./no-such-model-folder"), EXIT_USAGE, "Model folder not found"),
    CliCase("model: missing ~/path", setting(model="~/no-such-model-folder"), EXIT_USAGE, "Model folder not found"),
    CliCase("model: inside an existing folder", setting(model=lambda run: f"{run.root.name}/nope"), EXIT_USAGE,
            "Model folder not found"),
    CliCase("model: empty folder", setting(model=lambda run: str(run.out)), EXIT_USAGE, r"has no config\.json"),
    CliCase("model: a file", setting(model=lambda run: run.images[0]), EXIT_USAGE, "is a file, not a model folder"),
    CliCase("model: no tokenizer.json", model("no tokenizer.json"), EXIT_USAGE,
            r"lacks processor files: tokenizer\.json"),
    CliCase("model: no tokenizer_config.json", model("no tokenizer_config.json"), EXIT_USAGE,
            r"lacks processor files: tokenizer_config\.json"),
    CliCase("model: no config.json", model("no config.json"), EXIT_USAGE, r"has no config\.json"),
    CliCase("model: truncated model.safetensors", model("truncated weights"), EXIT_USAGE,
            r"model\.safetensors .* is corrupt or truncated"),
    CliCase("model: empty model.safetensors", model("empty weights"), EXIT_USAGE, "is corrupt or truncated"),
    CliCase("model: config.json not JSON", model("config not JSON"), EXIT_USAGE, "not a valid JSON file"),
    CliCase("model: unknown Hub id, offline", setting(model="nobody-here/no-such-model"), EXIT_USAGE,
            "cannot load the model 'nobody-here/no-such-model': .*not a local folder, and as a Hub id it cannot "
            "be loaded: .*(couldn't connect|not a valid model identifier)"),
    # output paths
    CliCase("output: a file", out_is_a_file, EXIT_USAGE, "--output_dir is a file, not a folder"),
    CliCase("output: below a file", out_below_a_file, EXIT_USAGE, "above --output_dir is a file"),
    CliCase("output: file name taken by a folder", output_name_taken, EXIT_USAGE,
            r"taken by folders .*photo_overlay\.png"),
    # options
    CliCase("option: --bg_thresh 1.5", extra("--bg_thresh", "1.5"), EXIT_USAGE, r"--bg_thresh must be in \[0, 1\]"),
    CliCase("option: --alpha -1", extra("--alpha", "-1"), EXIT_USAGE, r"--alpha must be in \[0, 1\]"),
    CliCase("option: --max_pixels 0", extra("--max_pixels", "0"), EXIT_USAGE, "--max_pixels must be positive"),
    CliCase("option: --device cuda without CUDA", no_cuda, EXIT_USAGE, "CUDA is not available"),
    CliCase("option: --device gpu", extra("--device", "gpu"), EXIT_USAGE, "Unknown device 'gpu'"),
    CliCase("option: --dtype int3", extra("--dtype", "int3"), EXIT_USAGE, "invalid choice: 'int3'"),
    CliCase("option: --bg_thresh abc", extra("--bg_thresh", "abc"), EXIT_USAGE, "invalid float value: 'abc'"),
]


def folder_state(folder: Path) -> dict[str, bytes | None]:
    if not folder.is_dir():
        return {}
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if OUTCOMES:
        REPORT.parent.mkdir(exist_ok=True)
        rows = [f"| {name} | {code} | {message.replace('|', '/')} |" for name, (code, message) in OUTCOMES.items()]
        REPORT.write_text("| input | exit | message |\n|---|---|---|\n" + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.name for case in CLI_CASES])
def test_the_command_line_names_each_hostile_input(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    run = Run(tmp_path, str(tiny_model_dir), images=[str(good_photo(tmp_path / "in"))], out=tmp_path / "out")
    run.out.mkdir()
    (run.out / EARLIER_RUN).write_text("an earlier run's result")
    monkeypatch.chdir(tmp_path.parent)  # relative model paths resolve from here
    case.change(run, tiny_model_dir, monkeypatch)
    before = folder_state(tmp_path / "out")

    code = run_main(run.argv())

    captured = capsys.readouterr()
    messages = [line for line in captured.err.splitlines() if "error" in line]
    OUTCOMES[case.name] = (code, messages[0] if messages else captured.err.strip()[:200])
    assert code == case.code, captured.err
    assert re.search(case.message, captured.err), captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert folder_state(tmp_path / "out") == before  # nothing written, nothing lost


@pytest.mark.parametrize(
    ("classes", "names"),
    [
        ("cat\nsofa\ndog", ["cat", "sofa", "dog"]),
        ("cat, Cat ,  cat", ["cat"]),
        ("café, 猫, 🐱", ["café", "猫", "🐱"]),
        (", ".join(f"class{i}" for i in range(300)), [f"class{i}" for i in range(300)]),
    ],
    ids=["line breaks", "duplicates", "non-ASCII", "300 classes"],
)
def test_unusual_but_valid_class_lists_segment(classes, names, tiny_model_dir, tmp_path, capsys):
    import json

    photo = good_photo(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / EARLIER_RUN).write_text("kept")
    code = run_main(["segment", str(photo), "--classes", classes, "--model", str(tiny_model_dir),
                     "--output_dir", str(out), "--no_pamr"])
    captured = capsys.readouterr()
    assert code == EXIT_OK and "Traceback" not in captured.err
    summary = json.loads((out / "photo.json").read_text(encoding="utf-8"))
    assert [entry["name"] for entry in summary["classes"]] == names
    assert (out / EARLIER_RUN).read_text() == "kept"
    assert str(out / "photo_overlay.png") in captured.out
    labels = np.asarray(Image.open(out / "photo_labels.png"))
    assert labels.shape == (32, 48) and labels.max() < len(names)


def test_a_bad_image_among_good_ones_is_skipped_and_the_others_written(tiny_model_dir, tmp_path, capsys):
    good = good_photo(tmp_path / "in")
    bad = write_bad_image(tmp_path / "in", "truncated.jpg")
    code = run_main(["segment", str(bad), str(good), "--classes", "cat", "--model", str(tiny_model_dir),
                     "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == EXIT_SOME_FAILED and "1 of 2 images could not be read" in captured.err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "photo.json", "photo_labels.png", "photo_overlay.png"]


# --------------------------------------------------------------------------------------------------------------
# the Python API
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return CoDeSegmenter.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (None, FileNotFoundError, "Model folder not found"),
        ("no tokenizer.json", OSError, r"lacks processor files: tokenizer\.json"),
        ("no config.json", FileNotFoundError, r"has no config\.json"),
        ("truncated weights", OSError, "is corrupt or truncated"),
        ("config not JSON", OSError, "not a valid JSON file"),
    ],
    ids=["missing folder", "no tokenizer.json", "no config.json", "truncated weights", "config not JSON"],
)
def test_loading_a_hostile_model_folder_raises_a_named_error(damage, error, message, tiny_model_dir, tmp_path):
    folder = tmp_path / "nowhere" if damage is None else damaged_model(tiny_model_dir, tmp_path / "model", damage)
    with pytest.raises(error, match=message):
        CoDeSegmenter.from_pretrained(folder)


def test_an_unavailable_device_raises_a_named_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        CoDeSegmenter.from_pretrained(tiny_model_dir, device="cuda")


@pytest.mark.parametrize(
    ("images", "classes", "error", "message"),
    [
        ("photo", None, TypeError, "The classes are missing"),
        ("photo", "cat, dog", TypeError, "not one string"),
        ("photo", 7, TypeError, "a list of class names, not int"),
        ("photo", [], ValueError, "No class names"),
        ("photo", ["cat\ndog"], ValueError, "holds a line break"),
        ("photo", ["cat", None], TypeError, "item 1 is NoneType"),
        ("photo", ["background"], ValueError, "'background' alone"),
        (None, ["cat"], InvalidImageError, "Unsupported image input of type NoneType"),
        ([], ["cat"], ValueError, "No images"),
        (np.zeros((0, 5, 3), dtype=np.uint8), ["cat"], InvalidImageError, "is empty"),
        (np.zeros((4, 4, 7), dtype=np.uint8), ["cat"], InvalidImageError, "HxWx4"),
        (np.full((4, 4), 2.0), ["cat"], InvalidImageError, r"values in \[0, 1\]"),
        ("missing.png", ["cat"], InvalidImageError, "not found"),
        *((name, ["cat"], InvalidImageError, re.escape(message)) for name, message in BAD_IMAGE_FILES.items()),
    ],
    ids=["classes None", "classes one string", "classes int", "classes empty", "class with line break",
         "class None", "background alone", "image None", "no images", "empty array", "7 channels", "float > 1",
         "missing file", *BAD_IMAGE_FILES],
)
def test_the_python_api_names_each_hostile_input(images, classes, error, message, segmenter, tmp_path):
    if isinstance(images, str):  # a file to make
        if images == "photo":
            images = good_photo(tmp_path)
        elif images in BAD_IMAGE_FILES:
            images = write_bad_image(tmp_path, images)
        else:
            images = tmp_path / images  # missing
    with pytest.raises(error, match=message):
        segmenter(images, classes)


def test_the_python_api_segments_phone_photos_upright(segmenter, tmp_path):
    upright = upright_test_picture(40, 64)
    result = segmenter(save_exif_photo(tmp_path / "phone.jpg", upright, 6), ["cat", "dog"])
    assert result.label_map.shape == (64, 40)


# --------------------------------------------------------------------------------------------------------------
# the demo's handler
# --------------------------------------------------------------------------------------------------------------
DEMO_CASES = [
    ("no image", {"image": None}, "Upload an image first"),
    ("classes empty", {"class_text": ""}, "Enter at least one class name"),
    ("classes only separators", {"class_text": " ,\n, "}, "Enter at least one class name"),
    ("background alone", {"class_text": "background"}, "Enter at least one class name"),
    ("too many classes", {"class_text": ", ".join(f"c{i}" for i in range(MAX_CLASSES + 1))}, "Too many classes"),
    ("class name too long", {"class_text": "x" * 101}, "limited to 100 characters"),
    ("threshold 1.5", {"background_threshold": 1.5}, "between 0 and 1"),
    ("no model", {"segmenter": None}, "No model is loaded"),
    *((f"upload {name}", {"image": name}, f"This image cannot be read: .*{re.escape(message)}")
      for name, message in BAD_IMAGE_FILES.items()),
]


@pytest.mark.parametrize(("name", "change", "message"), DEMO_CASES, ids=[case[0] for case in DEMO_CASES])
def test_the_demo_names_each_hostile_input(name, change, message, segmenter, tmp_path, capsys):
    arguments = {"segmenter": segmenter, "image": upright_test_picture(), "class_text": "cat, dog", "use_background": True,
                     "background_threshold": 0.4, "use_pamr": False}
    arguments.update(change)
    if isinstance(arguments["image"], str):  # a bad file to make
        arguments["image"] = str(write_bad_image(tmp_path, arguments["image"]))
    with pytest.raises(gr.Error, match=message) as caught:
        predict(**arguments, output_dir=tmp_path)
    assert caught.value.print_exception is False  # one log line, no traceback in the server log
    assert str(tmp_path) not in str(caught.value)  # an upload is named by its file name, not the server's path
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no tokenizer.json", "truncated weights"])
def test_the_demo_reports_a_hostile_model_folder_on_its_page(damage, tiny_model_dir, tmp_path):
    loaded = load_demo_model(str(damaged_model(tiny_model_dir, tmp_path / "model", damage)))
    assert loaded.segmenter is None
    assert loaded.status.startswith("**No model is loaded:**") and loaded.status.count("No model is loaded") == 1


# --------------------------------------------------------------------------------------------------------------
# real processes
# --------------------------------------------------------------------------------------------------------------
def code_seg(*arguments: str, drop_root_override: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(code_seg_command(*arguments, drop_root_override=drop_root_override), capture_output=True,
                          text=True, env=code_seg_environment(), timeout=180, cwd=REPO_ROOT)


@pytest.mark.slow
def test_real_processes(tiny_model_dir, tmp_path):
    photo = good_photo(tmp_path / "in")
    out = tmp_path / "out"
    common = ["--classes", "cat\ndog", "--model", str(tiny_model_dir)]

    done = code_seg("segment", str(photo), *common, "--output_dir", str(out))
    assert done.returncode == EXIT_OK, done.stderr
    assert [line for line in done.stdout.splitlines() if "wrote" in line] == [
        f"{photo}: wrote {out / 'photo_overlay.png'}, {out / 'photo_labels.png'}, {out / 'photo.json'}"]
    assert done.stderr.strip() == "", done.stderr  # no progress bars, no warnings for a plain run

    bad = code_seg("segment", str(write_bad_image(tmp_path / "in", "notes.png")), *common, "--output_dir",
                   str(tmp_path / "out2"))
    assert bad.returncode == EXIT_SOME_FAILED and "cannot identify image file" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "out2").exists()

    missing = code_seg("segment", str(photo), "--classes", "cat", "--model", str(tmp_path / "nowhere"),
                       "--output_dir", str(tmp_path / "out3"))
    assert missing.returncode == EXIT_USAGE and "Model folder not found" in missing.stderr
    assert "Repo id" not in missing.stderr and "Traceback" not in missing.stderr

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused = code_seg("segment", str(photo), *common, "--output_dir", str(locked), drop_root_override=True)
    finally:
        locked.chmod(0o755)
    assert refused.returncode == EXIT_USAGE and "cannot write to the output folder" in refused.stderr
    assert "Traceback" not in refused.stderr and list(locked.iterdir()) == []

    unknown = code_seg("evaluate", "--model", str(tiny_model_dir), "--benchmark", "nope", "--data_root",
                       str(tmp_path))
    assert unknown.returncode == EXIT_USAGE and "nope" in unknown.stderr and "Traceback" not in unknown.stderr
