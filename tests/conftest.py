"""Shared fixtures: a tiny CLIP tokenizer and tiny random-weight CLIP models built on the fly.

No test downloads anything: every model here is made by the fixtures themselves.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP threads stall every small op when the other core is busy (CI machines share cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from modeling_code.word_tokenizer import build_clip_tokenizer

TINY_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "image", "there", "is", "are", "some", "two", "three", "red", "green", "blue", "yellow", "cat", "cats", "dog", "dogs", "sofa", "table", "car", "cars", "bus", "tree", "trees", "sky", "grass", "road", "person", "people", "man", "woman", "horse", "bird", "boat", "water", "field", "house", "wall", "chair", "bottle", "plate", "food", "street", "building", "red", "white", "black", "small", "big", "sitting", "standing", "next", "near", "under", "over", "large", "shape", "circle", "square", "triangle", "star", "heart", "background", "origami", "video", "game", "art", "bad", "itap", "many"]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A CLIP BPE tokenizer over ``TINY_WORDS`` (every byte is also a token)."""
    return build_clip_tokenizer(TINY_WORDS, tmp_path_factory.mktemp("tiny_tokenizer"))


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


@pytest.fixture(scope="session")
def tiny_clip_config(tiny_tokenizer):
    return make_tiny_clip_config(tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_tokenizer, tiny_clip_config):
    """A saved random-weight tiny ``CLIPModel`` with its tokenizer: a stand-in for a Hub CLIP id."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(tiny_clip_config).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


TINY_CODE_OVERRIDES = {"text_decoder_num_heads": 4, "image_background_size": 32}


@pytest.fixture
def tiny_code_model(tiny_clip_dir, tiny_tokenizer):
    """A fresh CoDe model on the tiny CLIP, initialised from it as ``CoDeModel.from_clip`` does."""
    from modeling_code import CoDeModel

    torch.manual_seed(0)
    return CoDeModel.from_clip(str(tiny_clip_dir), tokenizer=tiny_tokenizer, **TINY_CODE_OVERRIDES)


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_clip_dir, tiny_tokenizer):
    """A saved tiny CoDe model + processor directory (read-only for tests: copy it before changing it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_code_model"), tiny_clip_dir, tiny_tokenizer)


@pytest.fixture(scope="session")
def quick_toy_run(tmp_path_factory):
    """The toy pipeline run in miniature once per session: (output directory, its summary). Read-only for tests."""
    from modeling_code.toy_pipeline import ToyPipelineSettings, run_toy_world

    output_dir = tmp_path_factory.mktemp("quick_toy_run")
    return output_dir, run_toy_world(ToyPipelineSettings.quick(str(output_dir)))


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
