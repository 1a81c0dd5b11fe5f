"""Shared fixtures: a tiny CLIP tokenizer and tiny random-weight CLIP models built on the fly.

No test downloads anything: every model here is made by the fixtures themselves. Plain helper functions and
constants live in ``helpers.py``; this file holds only the fixtures and the test environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP threads stall every small op when the other core is busy (CI machines share cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import TINY_CODE_OVERRIDES, TINY_WORDS, make_tiny_clip_config, save_tiny_model
from transformers import CLIPModel

from modeling_code.toy.word_tokenizer import build_clip_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A CLIP BPE tokenizer over ``TINY_WORDS`` (every byte is also a token)."""
    return build_clip_tokenizer(TINY_WORDS, tmp_path_factory.mktemp("tiny_tokenizer"))


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


@pytest.fixture
def tiny_code_model(tiny_clip_dir, tiny_tokenizer):
    """A fresh CoDe model on the tiny CLIP, initialised from it as ``CoDeModel.from_clip`` does."""
    from modeling_code import CoDeModel

    torch.manual_seed(0)
    return CoDeModel.from_clip(str(tiny_clip_dir), tokenizer=tiny_tokenizer, **TINY_CODE_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_clip_dir, tiny_tokenizer):
    """A saved tiny CoDe model + processor directory (read-only for tests: copy it before changing it)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_code_model"), tiny_clip_dir, tiny_tokenizer)


@pytest.fixture(scope="session")
def quick_toy_run(tmp_path_factory):
    """The toy pipeline run in miniature once per session: (output directory, its summary). Read-only for tests."""
    from modeling_code.toy.end_to_end import ToyPipelineSettings, run_toy_world

    output_dir = tmp_path_factory.mktemp("quick_toy_run")
    return output_dir, run_toy_world(ToyPipelineSettings.quick(str(output_dir)))
