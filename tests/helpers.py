"""Helpers shared by the tests (plain functions and constants; the fixtures built on them live in conftest.py).

Tests import them with ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path``, as for ``golden``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACE_DIR = REPO_ROOT / "space"
EXAMPLE_IMAGE = SPACE_DIR / "examples" / "toy_world_1.png"
STARTUP_TIMEOUT_S = 120

TINY_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "image", "there", "is", "are", "some", "two", "three", "red", "green", "blue", "yellow", "cat", "cats", "dog", "dogs", "sofa", "table", "car", "cars", "bus", "tree", "trees", "sky", "grass", "road", "person", "people", "man", "woman", "horse", "bird", "boat", "water", "field", "house", "wall", "chair", "bottle", "plate", "food", "street", "building", "red", "white", "black", "small", "big", "sitting", "standing", "next", "near", "under", "over", "large", "shape", "circle", "square", "triangle", "star", "heart", "background", "origami", "video", "game", "art", "bad", "itap", "many"]


def make_tiny_clip_config(tokenizer, image_size: int = 32, patch_size: int = 8) -> CLIPConfig:
    """A CLIP config small enough for unit tests, with special ids inside the tokenizer's vocabulary."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": 0,
    }
    text_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, **ids,
    )
    vision_config = {
        "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": image_size, "patch_size": patch_size, "projection_dim": 32,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)


TINY_CODE_OVERRIDES = {"text_decoder_num_heads": 4, "image_background_size": 32}

def pad_token_ids(tokenizer, texts: list[str], length: int = 77) -> torch.Tensor:
    """CLIP token ids padded with 0 to ``length`` (EOS kept last when cut): [len(texts), length]."""
    from modeling_code.processing_code import clip_token_ids

    return clip_token_ids(tokenizer, texts, length)[0]


def training_batch(tokenizer, batch_size: int = 2, image_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch for the tiny model: ``batch_size`` (at most 3) captions with K = 2 nouns each, their
    rows noun-major, the nouns in templates, and the pseudo word labels of the nouns in the captions."""
    generator = torch.Generator().manual_seed(seed)
    captions = ["a red cat on the sofa near a table", "a dog and a car on the road", "a bird over the water"]
    nouns = [["cat", "dog", "bird"], ["sofa", "car", "water"]]
    caption_ids = pad_token_ids(tokenizer, captions[:batch_size])
    labels = torch.full((batch_size, 77), -1)
    for row in range(batch_size):
        for k, noun in enumerate((nouns[0][row], nouns[1][row]), start=1):
            labels[row][caption_ids[row] == tokenizer(noun, add_special_tokens=False)["input_ids"][0]] = k
    noun_rows = nouns[0][:batch_size] + nouns[1][:batch_size]
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "caption_input_ids": caption_ids,
        "noun_input_ids": pad_token_ids(tokenizer, noun_rows),
        "template_input_ids": pad_token_ids(tokenizer, [f"a bad photo of a {noun}." for noun in noun_rows]),
        "text_labels": labels,
    }


# The tests marked ``cuda`` run on this device (default ``cuda``); ``CODE_SEG_TEST_DEVICE=cpu`` runs their code on
# a machine without a GPU, a check of the tests themselves (each comparison then holds trivially).
TEST_DEVICE_VARIABLE = "CODE_SEG_TEST_DEVICE"
# Device parameters of tests that run on the CPU in CI and on CUDA where selected with -m cuda.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def device_under_test(name: str = "cuda") -> torch.device:
    """The device of a test parametrised with ``DEVICES``: the CPU, or for ``cuda`` the accelerator under test.

    A cuda test on a machine without CUDA fails here, saying why: CI deselects them (-m "not cuda").
    """
    if name == "cpu":
        return torch.device("cpu")
    device = torch.device(os.environ.get(TEST_DEVICE_VARIABLE, "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"this test needs a CUDA device (none is visible): deselect it with -m 'not cuda', or set "
                    f"{TEST_DEVICE_VARIABLE}=cpu to run its code on the CPU")
    return device


# Small windows and resize so a whole image is a handful of tiny-CLIP windows.
TINY_INFERENCE = {"window_size": 64, "window_stride": 32, "inference_short_side": 64, "inference_max_long_side": 128}


def save_tiny_model(directory, clip_dir, tokenizer):
    """A random-weight tiny CoDe model and its processor saved as ``from_pretrained`` expects them."""
    from modeling_code import CoDeImageProcessor, CoDeModel, CoDeProcessor

    torch.manual_seed(0)
    model = CoDeModel.from_clip(str(clip_dir), tokenizer=tokenizer, **TINY_CODE_OVERRIDES, **TINY_INFERENCE)
    model.save_pretrained(directory)
    image_processor = CoDeImageProcessor(train_crop_size=32)
    CoDeProcessor(image_processor, tokenizer).save_pretrained(directory)
    return directory


# Run in a fresh interpreter where importing the package (or spaCy) fails: only the folder's own code can load it.
NO_PACKAGE_PRELUDE = """
import importlib.abc, sys
class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        # spaCy too: only training decomposes captions; loading and segmenting must not need it
        if name.split(".")[0] in ("modeling_code", "spacy"):
            raise ImportError(f"No module named {name!r} (hidden in this test)")
sys.meta_path.insert(0, HidePackage())
from PIL import Image
Image.new("RGB", (90, 70), (40, 160, 60)).save("photo.jpg")
"""


# EXIF orientation -> the transposition that turns the upright picture into the stored pixels (the inverse of
# what a viewer applies): 3 is upside down, 6 a phone held upright (rotate 90° clockwise to view), 8 the other way.
EXIF_ORIENTATION_TAG = 0x0112
STORED_FROM_UPRIGHT = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def upright_test_picture(width: int = 48, height: int = 30, seed: int = 0) -> Image.Image:
    """An RGB picture without any symmetry: random pixels plus a red block in the top-left corner."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 3, : width // 4] = (255, 0, 0)
    return Image.fromarray(pixels)


def save_exif_photo(path: Path, upright: Image.Image, orientation: int) -> Path:
    """Store ``upright`` as a camera does: pixels turned by ``orientation``, the EXIF tag saying how to view them.

    The format follows the suffix (PNG keeps the pixels exact; JPEG is what phones write).
    """
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    stored = upright.transpose(STORED_FROM_UPRIGHT[orientation]) if orientation in STORED_FROM_UPRIGHT else upright
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, exif=exif.tobytes())
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A black 1-bit PNG of ``width`` x ``height`` pixels: a few kilobytes that decode to ``width * height`` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# Files that are not usable images, and what names the problem in the message that refuses them.
BAD_IMAGE_FILES = {
    "truncated.jpg": "Cannot decode",
    "empty.png": "Cannot decode",
    "notes.png": "cannot identify image file",
    "bomb.png": "more pixels than the limit of 89,478,485",
}


def write_bad_image(folder: Path, name: str) -> Path:
    """One of ``BAD_IMAGE_FILES`` in ``folder``: a JPEG cut after 300 bytes, a zero-byte file, a text file named
    .png, or a PNG of 90 million pixels (PIL's limit is 89.5 million)."""
    if name == "truncated.jpg":
        buffer = io.BytesIO()
        upright_test_picture(64, 48).save(buffer, format="JPEG")
        content = buffer.getvalue()[:300]
    else:
        content = {"empty.png": b"", "notes.png": b"these are my notes, not a picture\n",
                   "bomb.png": png_bomb(10_000, 9_000)}[name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return folder / name


def code_seg_command(*arguments: str, drop_root_override: bool = False) -> list[str]:
    """The ``code-seg`` command line run in a subprocess from this checkout (the console script's entry point).

    ``drop_root_override``: run without root's power to write anywhere (``setpriv`` drops CAP_DAC_OVERRIDE), so
    a folder's permission bits count as they do for any user.
    """
    command = [sys.executable, "-c", "import sys, code_seg_cli; sys.exit(code_seg_cli.main())", *arguments]
    if drop_root_override and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise RuntimeError("running as root needs setpriv (util-linux) to test folder permissions")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", *command]
    return command


def code_seg_environment() -> dict[str, str]:
    """The environment of a ``code-seg`` subprocess: offline, this checkout first on the import path."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def launch_two_processes(script_and_arguments: list[str], attempts: int = 3) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes (gloo) on a free port; another attempt if that port was taken.

    The port is free when probed but released before the launcher binds it, so a parallel job can take it.
    """
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # --multi_gpu selects the distributed launcher; with no GPU the processes run on CPU with gloo.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), *script_and_arguments]
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
        if completed.returncode == 0 or "address already in use" not in completed.stderr.lower():
            return completed
    return completed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(model_dir: Path, log_path: Path) -> Iterator[str]:
    """Run ``python space/app.py`` serving ``model_dir`` on a free local port; yields its URL, then stops it."""
    port = free_port()
    env = {
        **os.environ,
        "CODE_SEG_MODEL": str(model_dir),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(SPACE_DIR / "app.py")], env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "config", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if time.monotonic() > deadline:
                    log = log_path.read_text()[-3000:]
                    raise RuntimeError(f"the app did not start in {STARTUP_TIMEOUT_S} s:\n{log}") from error
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def grid_cell(figure, row: int, column: int, cell_size: int, band: int, spacing: int, margin: int):
    """The [cell_size, cell_size, 3] pixels of one square cell of an ``image_grid`` with column and row titles
    (``band``: ``title_band_height`` of its font size), from the layout its docstring gives."""
    left = margin + column * (cell_size + spacing)
    top = margin + band + row * (cell_size + spacing + band) + band
    return figure[top:top + cell_size, left:left + cell_size]
