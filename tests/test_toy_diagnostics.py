"""Highlighting diagnostics on the miniature toy run: rows, word masks, cosines, mask selectivity; the script."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modeling_code import CoDeModel, CoDeProcessor
from modeling_code.toy.diagnostics import (
    _region_scores,
    diagnose_highlighting,
    measure_mask_selectivity,
)
from modeling_code.toy.world import TOY_CLASSES, TOY_THINGS, toy_noun_forms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_model_and_samples(quick_toy_run):
    output_dir, _ = quick_toy_run
    model_dir = output_dir / "code_model"
    samples = datasets.load_from_disk(str(output_dir / "world"))["train"]
    return CoDeModel.from_pretrained(model_dir), CoDeProcessor.from_pretrained(model_dir), samples


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_no_usable_caption_is_an_error(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    one_noun = [{"image": samples[0]["image"], "caption": "a circle.", "label": samples[0]["label"]}]
    with pytest.raises(ValueError, match="enough nouns"):
        diagnose_highlighting(model, processor, one_noun, TOY_CLASSES, toy_noun_forms(), TOY_THINGS)


def assert_scores(found, expected):
    found, expected = sorted(found), sorted(expected)
    assert [entry[:2] for entry in found] == [entry[:2] for entry in expected]
    assert [entry[2] for entry in found] == pytest.approx([entry[2] for entry in expected])


def test_region_scores_of_a_perfect_and_a_confused_masker():
    classes = torch.tensor([[0, 0, 2], [1, 2, 2], [255, 2, 2]])  # things 0, 1 and stuff 2 present; 255 unlabelled
    is_thing = torch.tensor([True, True, False, False])
    perfect = torch.zeros(4, 3, 3)
    for class_id in range(3):
        perfect[class_id][classes == class_id] = 1.0
    assert_scores(_region_scores(perfect, classes, is_thing), [
        (group, name, value) for group in ("things", "things", "stuff")
        for name, value in (("own", 1.0), ("best_other_thing", 0.0), ("best_stuff", 0.0))
    ])
    confused = torch.zeros(4, 3, 3)
    confused[0][classes == 0] = 0.25
    confused[1][classes == 0] = 0.75  # thing 1 claims thing 0's pixels
    confused[1][classes == 1] = 0.5
    confused[3][classes == 1] = 1.0  # stuff 3, absent, claims thing 1
    confused[2][classes == 2] = 0.5
    confused[0][classes == 2] = 0.25  # on the stuff the best rival thing is thing 0 (0.25) ...
    confused[1][(classes == 2) & (torch.arange(3)[:, None] == 2)] = 0.5  # ... or, on the bottom row, thing 1
    assert_scores(_region_scores(confused, classes, is_thing), [
        ("things", "own", 0.25), ("things", "best_other_thing", 0.75), ("things", "best_stuff", 0.0),
        ("things", "own", 0.5), ("things", "best_other_thing", 0.0), ("things", "best_stuff", 1.0),
        ("stuff", "own", 0.5), ("stuff", "best_other_thing", (0.25 * 3 + 0.5 * 2) / 5), ("stuff", "best_stuff", 0.0),
    ])


@pytest.mark.slow
def test_mask_selectivity_of_a_constant_masker(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    with torch.no_grad():
        model.sim2mask.weight.fill_(0.0)  # every class scores sigmoid(bias) everywhere
        model.sim2mask.bias.fill_(0.5)
    selectivity = measure_mask_selectivity(model, processor, samples, TOY_CLASSES, TOY_THINGS)
    assert selectivity.regions == sum(len(np.unique(np.asarray(label))) for label in samples["label"])
    assert set(selectivity.scores) == {"things", "stuff"}
    expected = torch.sigmoid(torch.tensor(0.5)).item()
    for measures in selectivity.scores.values():
        assert measures == pytest.approx({"own": expected, "best_other_thing": expected, "best_stuff": expected})


@pytest.mark.slow
def test_mask_selectivity_needs_plain_class_names_and_labels(toy_model_and_samples):
    model, processor, samples = toy_model_and_samples
    with pytest.raises(ValueError, match="without 'background'"):
        measure_mask_selectivity(model, processor, samples, [*TOY_CLASSES, "background"], TOY_THINGS)
    unlabelled = [{"image": samples[0]["image"], "label": Image.new("L", samples[0]["label"].size, 255)}]
    with pytest.raises(ValueError, match="no labelled pixel"):
        measure_mask_selectivity(model, processor, unlabelled, TOY_CLASSES, TOY_THINGS)


@pytest.mark.slow
def test_script_prints_the_diagnosis(quick_toy_run):
    output_dir, _ = quick_toy_run
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "diagnose_highlighting.py"), "--model", str(output_dir / "code_model"),
         "--world", str(output_dir / "world"), "--num_samples", "16"],
        capture_output=True, text=True, check=True,
    )
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    assert printed["rows"] > 0
    assert set(printed) == {"rows", "word_mask", "highlighted_caption", "prompted_noun", "mask_selectivity"}
    assert printed["mask_selectivity"]["regions"] > 0
