"""Highlighting diagnostics on the miniature toy run: bookkeeping of rows, word masks and cosines; the script."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from modeling_code import CoDeModel, CoDeProcessor
from modeling_code.highlighting_diagnostics import diagnose_highlighting
from modeling_code.toy_world import TOY_CLASSES, TOY_THINGS, toy_noun_forms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_model_and_samples(quick_toy_run):
    output_dir, _ = quick_toy_run
    model_dir = output_dir / "code_model"
    samples = datasets.load_from_disk(str(output_dir / "world"))["train"]
    return CoDeModel.from_pretrained(model_dir), CoDeProcessor.from_pretrained(model_dir), samples


def test_rows_are_the_sampled_nouns_of_usable_captions(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    decomposer = processor.noun_decomposer
    for caption in samples["caption"]:  # every toy caption names a thing and the stuff
        assert len(decomposer.sample_nouns(decomposer.extract_nouns(caption), random.Random(0))) == model.config.num_words
    one_noun = {"image": samples[0]["image"], "caption": "a circle.", "label": samples[0]["label"]}
    diagnosis = diagnose_highlighting(model, processor, [*samples, one_noun], TOY_CLASSES, toy_noun_forms(), TOY_THINGS)
    assert diagnosis.rows == model.config.num_words * len(samples)  # the one-noun caption is left out
    assert set(diagnosis.word_mask) == {"noun", "other_nouns", "other_words"}
    assert all(0.0 <= value <= 1.0 for value in diagnosis.word_mask.values())
    for texts in (diagnosis.highlighted_caption, diagnosis.prompted_noun):
        assert set(texts) == {"things", "stuff"}
        assert all(set(views) == {"region", "whole_image"} for views in texts.values())
        assert all(-1.0 <= cosine <= 1.0 for views in texts.values() for cosine in views.values())


def test_word_masks_follow_the_text_mask_head(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    with torch.no_grad():
        model.text_mask_head.weight.fill_(0.0)  # every word scores b for every noun
        model.text_mask_head.bias.fill_(20.0)
    diagnosis = diagnose_highlighting(model, processor, samples, TOY_CLASSES, toy_noun_forms(), TOY_THINGS)
    share = 1.0 / model.config.num_words  # softmax over [0, 20, ..., 20]: the nouns split each word
    assert diagnosis.word_mask == pytest.approx({"noun": share, "other_nouns": share, "other_words": share}, abs=1e-6)
    with torch.no_grad():
        model.text_mask_head.bias.fill_(-20.0)  # every word goes to the background
    diagnosis = diagnose_highlighting(model, processor, samples, TOY_CLASSES, toy_noun_forms(), TOY_THINGS)
    assert max(diagnosis.word_mask.values()) < 1e-6


def test_no_usable_caption_is_an_error(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    one_noun = [{"image": samples[0]["image"], "caption": "a circle.", "label": samples[0]["label"]}]
    with pytest.raises(ValueError, match="enough nouns"):
        diagnose_highlighting(model, processor, one_noun, TOY_CLASSES, toy_noun_forms(), TOY_THINGS)


def test_script_prints_the_diagnosis(quick_toy_run):
    output_dir, _ = quick_toy_run
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "diagnose_highlighting.py"), "--model", str(output_dir / "code_model"),
         "--world", str(output_dir / "world"), "--num_samples", "16"],
        capture_output=True, text=True, check=True,
    )
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    assert printed["rows"] > 0 and set(printed) == {"rows", "word_mask", "highlighted_caption", "prompted_noun"}
