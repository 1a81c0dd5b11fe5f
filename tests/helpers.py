"""Helpers shared by the tests (plain functions and constants; the fixtures built on them live in conftest.py).

Tests import them with ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path``, as for ``golden``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
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


# Small windows and resize so a whole image is a handful of tiny-CLIP windows.
TINY_INFERENCE = {"window_size": 64, "window_stride": 32, "inference_short_side": 64, "inference_max_long_side": 128}


def save_tiny_model(directory, clip_dir, tokenizer):
    """A random-weight tiny CoDe model and its processor saved as ``from_pretrained`` expects them."""
    from modeling_code import CoDeImageProcessor, CoDeModel, CoDeProcessor

    torch.manual_seed(0)
    model = CoDeModel.from_clip(str(clip_dir), tokenizer=tokenizer, **TINY_CODE_OVERRIDES, **TINY_INFERENCE)
    model.save_pretrained(directory)
    image_processor = CoDeImageProcessor(eval_short_side=64, eval_max_long_side=128, train_crop_size=32)
    CoDeProcessor(image_processor, tokenizer).save_pretrained(directory)
    return directory


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
