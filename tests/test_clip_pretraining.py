"""Small-CLIP pretraining: configuration, text and image preprocessing, a miniature training run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from modeling_code.toy.clip_pretraining import (
    CONTEXT_LENGTH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_images,
    blanked_word_embeddings,
    caption_nouns,
    choose_batch_texts,
    fragment_blank_positions,
    images_to_tensor,
    learning_rate_factor,
    multi_positive_clip_loss,
    normalize_images,
    noun_prompts,
    positive_pairs,
    pretrain_clip,
    small_clip_config,
    tokenize_texts,
)
from modeling_code.toy.world import ToyWorldConfig, build_toy_world

TINY_MODEL = {
    "image_size": 32, "patch_size": 8, "vision_hidden_size": 32, "vision_layers": 2,
    "text_hidden_size": 32, "text_layers": 2, "projection_dim": 16,
}


@pytest.fixture(scope="module")
def tiny_world():
    return build_toy_world(ToyWorldConfig(seed=1, image_size=32, num_train=48, num_validation=0, num_test=0))


def test_small_clip_config(tiny_tokenizer):
    config = small_clip_config(tiny_tokenizer)
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tiny_tokenizer)
    assert text.max_position_embeddings == CONTEXT_LENGTH == 77
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, 0)
    assert text.eos_token_id < text.vocab_size and text.eos_token_id != 2
    assert text.hidden_act == vision.hidden_act == "quick_gelu"
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (112, 16, 128, 4)
    assert vision.intermediate_size == 4 * vision.hidden_size
    assert config.projection_dim == 128
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small_clip_config(tiny_tokenizer, image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        small_clip_config(tiny_tokenizer, vision_hidden_size=30)


def test_tokenize_texts_pads_with_zero_after_the_end_token(tiny_tokenizer):
    ids = tokenize_texts(tiny_tokenizer, ["a red circle on the grass.", "a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    words = tiny_tokenizer("a red circle on the grass.", add_special_tokens=False)["input_ids"]
    assert ids[0, 0] == tiny_tokenizer.bos_token_id
    assert ids[0, 1 : 1 + len(words)].tolist() == words
    assert ids[0, 1 + len(words)] == tiny_tokenizer.eos_token_id
    assert (ids[0, 2 + len(words) :] == 0).all()
    long_ids = tokenize_texts(tiny_tokenizer, [" ".join(["cat"] * 100)])
    assert long_ids[0, -1] == tiny_tokenizer.eos_token_id and (long_ids[0, 1:-1] != 0).all()


def test_zero_padding_is_compatible_with_clip_pooling(tiny_tokenizer, tiny_clip_config):
    # CLIP's text tower pools at the first end token and is causal: padding after it changes nothing.
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config).eval()
    ids = tokenize_texts(tiny_tokenizer, ["a red circle on the grass.", "two dogs"])
    with torch.no_grad():
        full = model.get_text_features(input_ids=ids).pooler_output
        cut = model.get_text_features(input_ids=ids[:, :10]).pooler_output
    torch.testing.assert_close(full, cut, atol=1e-5, rtol=1e-5)


def test_image_preprocessing(tiny_world):
    images = images_to_tensor(tiny_world["train"]["image"][:4], 32)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    normalised = normalize_images(images)
    expected = (images[0, 1, 3, 5].item() / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert normalised[0, 1, 3, 5].item() == pytest.approx(expected, abs=1e-6)
    resized = images_to_tensor(tiny_world["train"]["image"][:2], 16)
    assert resized.shape == (2, 3, 16, 16)


def test_augmentation_is_a_crop_or_a_flip(tiny_world):
    images = normalize_images(images_to_tensor(tiny_world["train"]["image"][:8], 32))
    unchanged = augment_images(images, torch.Generator().manual_seed(0), min_scale=1.0)
    for original, augmented in zip(images, unchanged):
        assert torch.allclose(augmented, original, atol=1e-4) or torch.allclose(
            augmented, original.flip(-1), atol=1e-4)
    cropped = augment_images(images, torch.Generator().manual_seed(0), min_scale=0.5)
    assert cropped.shape == images.shape and not torch.allclose(cropped, unchanged)
    again = augment_images(images, torch.Generator().manual_seed(0), min_scale=0.5)
    torch.testing.assert_close(cropped, again)


def test_noun_prompts_name_a_noun_of_the_caption():
    forms = {"circle": "circle", "circles": "circle", "grass": "grass"}
    nouns = [caption_nouns("two circles on the grass.", forms), caption_nouns("nothing here.", forms)]
    assert nouns == [{"circle", "grass"}, set()]
    prompts = noun_prompts(nouns, torch.Generator().manual_seed(0))
    assert prompts[1] is None
    prompt, noun = prompts[0]
    assert noun in {"circle", "grass"} and noun in prompt and "{}" not in prompt


def test_positive_pairs_and_multi_positive_loss(tiny_clip_config, tiny_tokenizer):
    captions = ["a red circle.", "a blue star.", "a red circle.", "two stars."]
    nouns = [{"circle"}, {"star"}, {"circle"}, {"star"}]
    texts = [("caption", captions[0]), ("noun", "star"), ("caption", captions[2]), ("caption", captions[3])]
    positives = positive_pairs(captions, nouns, texts)
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(positives, expected)
    # With only the diagonal positive, the loss is CLIP's own.
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config)
    ids = tokenize_texts(tiny_tokenizer, ["a cat", "a dog", "two cars"])
    output = model(input_ids=ids, pixel_values=torch.randn(3, 3, 32, 32), return_loss=True)
    diagonal = torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(multi_positive_clip_loss(output.logits_per_image, diagonal), output.loss)
    # Two positives with equal logits and no negatives: the loss is log(2) in both directions.
    equal = torch.zeros(2, 2)
    assert multi_positive_clip_loss(equal, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(math.log(2))


def test_fragment_blanks_every_word_but_the_noun(tiny_tokenizer):
    captions = ["two red circles on the grass and a circle.", "a star in the sky."]
    ids = tokenize_texts(tiny_tokenizer, captions)
    circle_forms = tiny_tokenizer(["circle", "circles"], add_special_tokens=False)["input_ids"]
    sky_forms = tiny_tokenizer(["sky"], add_special_tokens=False)["input_ids"]
    blank = fragment_blank_positions(ids, [circle_forms, sky_forms])
    assert blank.shape == ids.shape and blank.dtype == torch.bool
    for row, caption in enumerate(captions):
        words = tiny_tokenizer(caption, add_special_tokens=False)["input_ids"]
        kept = {token for forms in ([circle_forms, sky_forms][row]) for token in forms}
        # start token, end token and padding are never blanked; of the words, only the noun's forms stay.
        assert not blank[row, 0] and not blank[row, 1 + len(words):].any()
        assert blank[row, 1 : 1 + len(words)].tolist() == [token not in kept for token in words]
    words = tiny_tokenizer(captions[0], add_special_tokens=False)["input_ids"]
    assert (~blank[0, 1 : 1 + len(words)]).sum() == len(circle_forms[0]) + len(circle_forms[1])  # both forms kept


def test_batch_texts_are_captions_prompts_or_fragments(tiny_tokenizer):
    captions = ["two red circles on the grass.", "a star in the sky.", "nothing named here."]
    nouns = [{"circle", "grass"}, {"star", "sky"}, set()]
    ids = tokenize_texts(tiny_tokenizer, captions)
    forms = {noun: tiny_tokenizer([noun, noun + "s"], add_special_tokens=False)["input_ids"]
             for noun in ("circle", "grass", "star", "sky")}

    def choose(prompt_probability, fragment_probability):
        generator = torch.Generator().manual_seed(0)
        return choose_batch_texts(ids, captions, nouns, tiny_tokenizer, generator,
                                  prompt_probability, fragment_probability, forms)

    input_ids, texts, blank = choose(0.0, 0.0)
    assert torch.equal(input_ids, ids) and blank is None
    assert texts == [("caption", caption) for caption in captions]

    # Every caption that names a noun becomes a fragment of it: same ids, every other word blanked.
    input_ids, texts, blank = choose(0.0, 1.0)
    assert torch.equal(input_ids, ids) and texts[2] == ("caption", captions[2]) and not blank[2].any()
    for row in (0, 1):
        kind, noun = texts[row]
        assert kind == "noun" and noun in nouns[row]
        assert torch.equal(blank[row], fragment_blank_positions(ids[row : row + 1], [forms[noun]])[0])

    # Prompts replace the ids; a row already prompted is never also a fragment.
    input_ids, texts, blank = choose(1.0, 1.0)
    assert blank is None and texts[2] == ("caption", captions[2])
    for row in (0, 1):
        kind, noun = texts[row]
        assert kind == "noun" and noun in nouns[row]
        prompt = tiny_tokenizer.decode(input_ids[row][input_ids[row] > 0][1:-1])
        assert noun in prompt and prompt != captions[row]


def test_pretraining_on_fragments_learns_and_leaves_no_hook(tiny_world, tiny_tokenizer):
    torch.set_num_threads(2)
    config = small_clip_config(tiny_tokenizer, **TINY_MODEL)
    forms = {"circle": "circle", "circles": "circle", "star": "star", "stars": "star", "grass": "grass"}
    runs = {}
    for probability in (0.0, 0.6):
        losses: list[float] = []
        model = pretrain_clip(tiny_world["train"], tiny_tokenizer, config, steps=30, batch_size=16, lr=3e-3, seed=0,
                              progress=False, loss_history=losses, noun_forms=forms, fragment_probability=probability)
        runs[probability] = losses
        assert not model.text_model.embeddings.token_embedding._forward_hooks
    assert runs[0.6][0] != runs[0.0][0]  # same seed and batch: the fragments changed the texts
    assert sum(runs[0.6][-5:]) / 5 < sum(runs[0.6][:5]) / 5 - 0.3


def test_blanked_word_embeddings_zero_flagged_positions_and_always_unhook():
    embedding = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with blanked_word_embeddings(embedding) as blank:
        torch.testing.assert_close(embedding(ids), embedding.weight[ids])  # nothing flagged: untouched
        blank[0] = torch.tensor([[False, True, False], [True, False, False]])
        out = embedding(ids)
    assert (out[0, 1] == 0).all() and (out[1, 0] == 0).all()
    torch.testing.assert_close(out[0, [0, 2]], embedding.weight[ids[0, [0, 2]]])
    assert not embedding._forward_hooks
    with pytest.raises(RuntimeError, match="interrupted"), blanked_word_embeddings(embedding):
        raise RuntimeError("interrupted")
    assert not embedding._forward_hooks


def test_learning_rate_schedule():
    assert learning_rate_factor(0, 100, 10) == pytest.approx(0.1)
    assert learning_rate_factor(9, 100, 10) == pytest.approx(1.0)
    assert learning_rate_factor(55, 100, 10) == pytest.approx(0.5)
    assert learning_rate_factor(100, 100, 10) == pytest.approx(0.0)


def test_miniature_pretraining_lowers_the_loss_and_saves(tmp_path, tiny_world, tiny_tokenizer):
    torch.set_num_threads(2)
    config = small_clip_config(tiny_tokenizer, **TINY_MODEL)
    losses: list[float] = []
    model = pretrain_clip(
        tiny_world["train"], tiny_tokenizer, config, steps=40, batch_size=16, lr=3e-3, seed=0,
        progress=False, loss_history=losses, prompt_probability=0.3,
        noun_forms={"circle": "circle", "star": "star", "grass": "grass"},
    )
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert not model.training
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = CLIPModel.from_pretrained(tmp_path)
    assert reloaded.config.vision_config.patch_size == 8
    assert reloaded.config.text_config.max_position_embeddings == 77
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, msg=name)


def test_pretraining_rejects_bad_settings(tiny_world, tiny_tokenizer):
    config = small_clip_config(tiny_tokenizer, **TINY_MODEL)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        pretrain_clip(tiny_world["train"], tiny_tokenizer, config, steps=1, batch_size=64, progress=False)
    with pytest.raises(ValueError, match="needs noun_forms"):
        pretrain_clip(tiny_world["train"], tiny_tokenizer, config, steps=1, batch_size=8, progress=False,
                      prompt_probability=0.5)
    with pytest.raises(ValueError, match="needs noun_forms"):
        pretrain_clip(tiny_world["train"], tiny_tokenizer, config, steps=1, batch_size=8, progress=False,
                      fragment_probability=0.5)


def test_training_script_writes_a_loadable_clip(tmp_path):
    path = Path(__file__).resolve().parents[1] / "training" / "pretrain_clip.py"
    spec = importlib.util.spec_from_file_location("pretrain_clip_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main([
        "--out", str(tmp_path / "clip"), "--num_train", "16", "--image_size", "32", "--patch_size", "8",
        "--vision_hidden_size", "32", "--vision_layers", "1", "--text_hidden_size", "32", "--text_layers", "1",
        "--projection_dim", "16", "--steps", "2", "--batch_size", "8", "--no_progress",
        "--save_world", str(tmp_path / "world"),
    ])
    model = CLIPModel.from_pretrained(out)
    tokenizer = CLIPTokenizer.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vision_config.image_size == 32
    assert json.loads((out / "pretraining_summary.json").read_text())["steps"] == 2
    assert (tmp_path / "world" / "dataset_dict.json").exists()
