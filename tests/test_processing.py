"""CoDeProcessor: tokenisation, training samples and batches, inference inputs, save/load; template sets."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from modeling_code.configuration_code import InferenceProtocol
from modeling_code.image_processing_code import CoDeImageProcessor, InvalidImageError
from modeling_code.processing_code import CoDeProcessor
from modeling_code.templates import TEMPLATE_SETS, get_templates
from modeling_code.text_decomposition import NotEnoughNounsError


def small_image_processor() -> CoDeImageProcessor:
    return CoDeImageProcessor(train_crop_size=32)


# The inference protocol of these tests: short side 24, long side at most 64.
SMALL = InferenceProtocol(short_side=24, max_long_side=64)


@pytest.fixture(scope="module")
def processor(tiny_tokenizer) -> CoDeProcessor:
    return CoDeProcessor(small_image_processor(), tiny_tokenizer, protocol=SMALL)


@pytest.fixture(scope="module")
def processor_k3(tiny_tokenizer) -> CoDeProcessor:
    """K = 3: every noun of a three-noun caption is sampled, so each gets its own label."""
    return CoDeProcessor(small_image_processor(), tiny_tokenizer, num_words=3, protocol=SMALL)


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def tokens_of(tokenizer, ids: torch.Tensor) -> list[str]:
    """Token strings of a [L] id row up to and including its EOS."""
    ids = ids.tolist()
    return tokenizer.convert_ids_to_tokens(ids[: ids.index(tokenizer.eos_token_id) + 1])


def sampled_nouns(processor: CoDeProcessor, sample: dict, candidates: list[str]) -> list[str]:
    """Which candidate noun each row of ``noun_input_ids`` holds."""
    by_ids = {tuple(processor.tokenize([noun])[0].tolist()): noun for noun in candidates}
    return [by_ids[tuple(row.tolist())] for row in sample["noun_input_ids"]]


# ------------------------------------------------------------------------------------- templates


def test_template_sets():
    imagenet, custom = get_templates("imagenet"), get_templates("custom")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert imagenet[:2] == ("a bad photo of a {}.", "a photo of many {}.")
    assert custom == (
        "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of many {}.",
        "a photo of {}s.",
    )
    assert set(custom[:8]) <= set(imagenet)
    for templates in TEMPLATE_SETS.values():
        assert all(template.count("{}") == 1 for template in templates)
    with pytest.raises(ValueError, match="Unknown template set 'simple'"):
        get_templates("simple")


# ------------------------------------------------------------------------------------ tokenising


def test_tokenize_pads_with_zero(processor, tiny_tokenizer):
    ids = processor.tokenize(["a dog", "sofa"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert ids[0, :4].tolist() == [bos, token_id(tiny_tokenizer, "a</w>"), token_id(tiny_tokenizer, "dog</w>"), eos]
    assert ids[1, :3].tolist() == [bos, token_id(tiny_tokenizer, "sofa</w>"), eos]
    assert (ids[0, 4:] == 0).all() and (ids[1, 3:] == 0).all()
    assert tiny_tokenizer.pad_token_id != 0  # the tokenizer's own padding would have been wrong
    assert processor.tokenize("a dog").tolist() == ids[:1].tolist()
    assert processor.tokenize([]).shape == (0, 77)


def test_tokenize_truncates_keeping_eos(processor, tiny_tokenizer):
    ids, truncated = processor.tokenize_with_truncation_flags(["dog " * 100, "a dog"])
    dog, eos = token_id(tiny_tokenizer, "dog</w>"), tiny_tokenizer.eos_token_id
    assert truncated == [True, False]
    assert ids[0, 0] == tiny_tokenizer.bos_token_id and ids[0, 76] == eos
    assert (ids[0, 1:76] == dog).all()
    short = processor.tokenize(["a dog on the sofa"], context_length=5)
    assert short.shape == (1, 5)
    assert short[0].tolist()[-1] == eos
    # exactly L positions fit without truncation
    assert processor.tokenize_with_truncation_flags(["dog dog dog"], context_length=5)[1] == [False]
    with pytest.raises(ValueError, match="context_length"):
        processor.tokenize(["dog"], context_length=1)


class CapturedTransformersWarnings(logging.Handler):
    """Collects records logged under ``transformers`` (that logger does not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_truncation_is_reported_without_logging(tiny_tokenizer):
    # A fresh tokenizer with CLIP's 77-token limit (it warns once per instance about long texts).
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.model_max_length = 77
    processor = CoDeProcessor(small_image_processor(), tokenizer)
    handler = CapturedTransformersWarnings()
    logging.getLogger("transformers").addHandler(handler)
    try:
        _, truncated = processor.tokenize_with_truncation_flags(["dog " * 100])
        tokenizer(["dog " * 100])  # the tokenizer's own call does warn: the check above can fail
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert truncated == [True]
    assert len(handler.messages) == 1 and "longer than the specified maximum" in handler.messages[0]


# ------------------------------------------------------------------------------------- training


def test_training_sample_layout(processor, tiny_tokenizer):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    sample = processor.prepare_training_sample(image, "a dog on the sofa near a tree", random.Random(0))
    assert set(sample) == {"pixel_values", "caption_input_ids", "noun_input_ids", "kg_template_input_ids", "text_labels"}
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].dtype == torch.float32
    assert sample["caption_input_ids"].shape == (77,)
    assert sample["noun_input_ids"].shape == (2, 77) and sample["kg_template_input_ids"].shape == (2, 77)
    assert sample["text_labels"].shape == (77,)
    for key in ("caption_input_ids", "noun_input_ids", "kg_template_input_ids", "text_labels"):
        assert sample[key].dtype == torch.long
    torch.testing.assert_close(sample["caption_input_ids"], processor.tokenize(["a dog on the sofa near a tree"])[0])
    nouns = sampled_nouns(processor, sample, ["dog", "sofa", "tree"])
    assert len(set(nouns)) == 2
    for noun, template_ids in zip(nouns, sample["kg_template_input_ids"]):
        filled = processor.tokenize([template.format(noun) for template in get_templates("imagenet")])
        assert (filled == template_ids).all(dim=1).any()


def test_training_sample_is_deterministic_for_a_seeded_rng(processor):
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    caption = "a dog and a cat on the sofa near a tree under the sky"
    first = processor.prepare_training_sample(image, caption, random.Random(5))
    again = processor.prepare_training_sample(image, caption, random.Random(5))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    others = [processor.prepare_training_sample(image, caption, random.Random(seed)) for seed in range(6, 10)]
    assert any(not torch.equal(first["pixel_values"], other["pixel_values"]) for other in others)
    assert any(not torch.equal(first["noun_input_ids"], other["noun_input_ids"]) for other in others)


def test_pseudo_labels_multi_token_and_repeated_nouns(processor, tiny_tokenizer):
    caption = "a zebra on the sofa and a dog and a zebra"
    sample = processor.prepare_training_sample(Image.new("RGB", (40, 40)), caption, random.Random(1))
    # Hand check of the tokenisation: "zebra" is not in the tiny vocabulary and splits into 5 tokens.
    assert tokens_of(tiny_tokenizer, sample["caption_input_ids"]) == [
        "<|startoftext|>", "a</w>", "z", "e", "b", "r", "a</w>", "on</w>", "the</w>", "sofa</w>", "and</w>",
        "a</w>", "dog</w>", "and</w>", "a</w>", "z", "e", "b", "r", "a</w>", "<|endoftext|>",
    ]
    positions = {"zebra": [2, 3, 4, 5, 6, 15, 16, 17, 18, 19], "sofa": [9], "dog": [12]}
    selected = sampled_nouns(processor, sample, list(positions))
    expected = [-1] * 77
    for noun, noun_positions in positions.items():
        for position in noun_positions:
            expected[position] = selected.index(noun) + 1 if noun in selected else 0
    assert sample["text_labels"].tolist() == expected
    assert sorted(set(expected)) == [-1, 0, 1, 2]


def test_pseudo_labels_beyond_the_context_window(processor_k3, tiny_tokenizer):
    caption = "the sofa" + " the" * 70 + " a zebra and a dog"
    sample = processor_k3.prepare_training_sample(Image.new("RGB", (40, 40)), caption, random.Random(2))
    tokens = tokens_of(tiny_tokenizer, sample["caption_input_ids"])
    # 77 positions: SOS, "the sofa", 70 x "the", "a", then only "z", "e" of zebra before the kept EOS.
    assert len(tokens) == 77 and tokens[72:] == ["the</w>", "a</w>", "z", "e", "<|endoftext|>"]
    selected = sampled_nouns(processor_k3, sample, ["sofa", "zebra", "dog"])
    expected = [-1] * 77
    expected[2] = selected.index("sofa") + 1  # the cut zebra and the dropped dog get no label at all
    assert sample["text_labels"].tolist() == expected


def test_noun_check_comes_before_image_decoding(processor):
    with pytest.raises(NotEnoughNounsError) as raised:
        processor.prepare_training_sample(b"not an image", "a dog running fast", random.Random(0))
    assert raised.value.nouns == ["dog"]
    with pytest.raises(InvalidImageError):
        processor.prepare_training_sample(b"not an image", "a dog on the sofa", random.Random(0))


def test_collate_stacks_nouns_noun_major(processor):
    batch_size, num_words, length = 3, 2, 77
    samples = []
    for b in range(batch_size):
        samples.append({
            "pixel_values": torch.full((3, 32, 32), float(b)),
            "caption_input_ids": torch.full((length,), b),
            "noun_input_ids": torch.stack([torch.full((length,), 10 * b + k) for k in range(num_words)]),
            "kg_template_input_ids": torch.stack([torch.full((length,), 100 + 10 * b + k) for k in range(num_words)]),
            "text_labels": torch.full((length,), -b),
        })
    batch = processor.collate_training(samples)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["caption_input_ids"][:, 0].tolist() == [0, 1, 2]
    assert batch["text_labels"].shape == (3, 77)
    assert batch["noun_input_ids"].shape == (num_words * batch_size, length)
    for k in range(num_words):
        for b in range(batch_size):
            assert (batch["noun_input_ids"][k * batch_size + b] == 10 * b + k).all()
            assert (batch["kg_template_input_ids"][k * batch_size + b] == 100 + 10 * b + k).all()
    with pytest.raises(ValueError, match="empty"):
        processor.collate_training([])


def test_collate_real_samples(processor):
    image = Image.new("RGB", (40, 40), (10, 20, 30))
    captions = ["a dog on the sofa", "a cat under the tree", "a car on the road"]
    samples = [processor.prepare_training_sample(image, c, random.Random(i)) for i, c in enumerate(captions)]
    batch = processor.collate_training(samples)
    assert batch["noun_input_ids"].shape == (6, 77)
    torch.testing.assert_close(batch["noun_input_ids"][4], samples[1]["noun_input_ids"][1])  # k=1, b=1
    torch.testing.assert_close(batch["noun_input_ids"][2], samples[2]["noun_input_ids"][0])  # k=0, b=2


# ------------------------------------------------------------------------------------ inference


def test_inference_inputs_are_the_forward_arguments(processor):
    outputs = processor(images=[Image.new("RGB", (40, 30))], text=["dog", "background", "zebra"], return_tensors="pt")
    assert set(outputs) == {
        "pixel_values", "original_sizes", "class_input_ids", "kp_template_input_ids", "background_index"
    }
    assert outputs["pixel_values"].shape == (1, 3, 24, 32)
    assert outputs["original_sizes"] == [(30, 40)]
    assert outputs["background_index"] == 1
    torch.testing.assert_close(outputs["class_input_ids"], processor.tokenize(["dog", "zebra"]))
    templates = get_templates("custom")
    assert outputs["kp_template_input_ids"].shape == (2, len(templates), 77)
    for n, name in enumerate(["dog", "zebra"]):
        for t, template in enumerate(templates):
            expected = processor.tokenize([template.format(name)])[0]
            torch.testing.assert_close(outputs["kp_template_input_ids"][n, t], expected)
    assert set(processor(text=["dog"])) == {"class_input_ids", "kp_template_input_ids", "background_index"}
    assert processor(text=["dog"])["background_index"] is None
    assert set(processor(images=Image.new("RGB", (8, 8)))) == {"pixel_values", "original_sizes"}


def test_text_may_be_one_string_of_names(processor):
    from_string = processor(text="dog, background\nzebra")
    from_list = processor(text=["dog", "background", "zebra"])
    torch.testing.assert_close(from_string["class_input_ids"], from_list["class_input_ids"])
    assert from_string["background_index"] == 1


def test_images_of_different_sizes_come_as_a_list(processor):
    outputs = processor(images=[Image.new("RGB", (40, 30)), Image.new("RGB", (30, 40))], text=["dog"])
    assert [tuple(pixels.shape) for pixels in outputs["pixel_values"]] == [(3, 24, 32), (3, 32, 24)]
    assert outputs["original_sizes"] == [(30, 40), (40, 30)]


def test_the_protocol_sets_the_resize_and_the_templates(processor):
    other = SMALL.replace(short_side=12, template_set="imagenet")
    outputs = processor(images=Image.new("RGB", (40, 30)), text=["dog"], protocol=other)
    assert outputs["pixel_values"].shape == (1, 3, 12, 16)
    assert outputs["kp_template_input_ids"].shape[1] == len(get_templates("imagenet"))


def test_bad_inference_inputs_are_named(processor):
    with pytest.raises(ValueError, match="Give images"):
        processor()
    with pytest.raises(ValueError, match="repeat"):
        processor(text=["dog", "Dog"])  # class ids are positions: a repeated name would shift them
    with pytest.raises(ValueError, match="No class names"):
        processor(text=" , ")
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text=["dog"], return_tensors="np")
    with pytest.raises(TypeError, match="unexpected"):
        processor(text=["dog"], colour="red")


def test_deprecated_keywords_still_work(processor, tiny_tokenizer):
    with pytest.warns(FutureWarning, match="class_names"):
        outputs = processor(class_names=["dog", "zebra"])
    torch.testing.assert_close(outputs["class_input_ids"], processor.tokenize(["dog", "zebra"]))
    with pytest.warns(FutureWarning, match="inference_template_set"):
        legacy = CoDeProcessor(small_image_processor(), tiny_tokenizer, inference_template_set="imagenet")
    assert legacy.inference_protocol.template_set == "imagenet"


# ---------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path, tiny_tokenizer):
    original = CoDeProcessor(
        small_image_processor(), tiny_tokenizer, num_words=3, context_length=40, kg_template_set="custom"
    )
    original.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert (config["num_words"], config["context_length"], config["kg_template_set"]) == (3, 40, "custom")
    assert config["image_processor"]["train_crop_size"] == 32
    loaded = CoDeProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, CoDeImageProcessor)
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert (loaded.num_words, loaded.context_length, loaded.spacy_model) == (3, 40, "en_core_web_sm")
    assert loaded.kg_template_set == "custom"
    assert loaded.inference_protocol == InferenceProtocol()  # a processor saved alone: the paper's protocol
    assert loaded.noun_decomposer.num_words == 3
    texts = ["a zebra on the sofa", "dog " * 50]
    torch.testing.assert_close(loaded.tokenize(texts), original.tokenize(texts))
    assert CoDeProcessor.from_pretrained(tmp_path, num_words=4).num_words == 4
    assert CoDeImageProcessor.from_pretrained(tmp_path).train_crop_size == 32


REMOTE_LOAD_SCRIPT = """
import importlib.abc, sys
class HideSpacy(importlib.abc.MetaPathFinder):  # only training decomposes captions: loading needs no spaCy
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "spacy":
            raise ImportError(f"No module named {name!r} (hidden for this test)")
sys.meta_path.insert(0, HideSpacy())
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "modeling_code" not in sys.modules, "the installed package must not be needed"
# Loading from the Hub (not a local folder) also checks the imports of every relatively imported module.
import pathlib
from transformers.dynamic_module_utils import check_imports
for module in sorted(pathlib.Path(sys.argv[1]).glob("*.py")):
    check_imports(module)
print(type(processor).__module__, processor.num_words, processor.image_processor.train_crop_size)
print(processor.tokenize(["a dog"])[0, :4].tolist())
"""


@pytest.mark.slow
def test_loads_as_hub_remote_code(tmp_path, tiny_tokenizer, processor, monkeypatch):
    monkeypatch.setattr(CoDeProcessor, "_auto_class", None)
    CoDeProcessor.register_for_auto_class()
    saved = tmp_path / "saved"
    CoDeProcessor(small_image_processor(), tiny_tokenizer, num_words=3).save_pretrained(saved)
    for module in ("processing_code.py", "image_processing_code.py", "text_decomposition.py", "templates.py"):
        assert (saved / module).is_file()
    config = json.loads((saved / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_code.CoDeProcessor"
    # A fresh interpreter that never imports the package: only the copied files define the classes.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD_SCRIPT, str(saved)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    module_line, ids_line = result.stdout.strip().splitlines()[-2:]
    assert module_line.startswith("transformers_modules.") and module_line.endswith("processing_code 3 32")
    assert ids_line == str(processor.tokenize(["a dog"])[0, :4].tolist())


def test_invalid_arguments_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="Unknown template set"):
        CoDeProcessor(small_image_processor(), tiny_tokenizer, kg_template_set="nope")
    with pytest.raises(ValueError, match="CLIP tokenizer"):
        CoDeProcessor(small_image_processor())
    with pytest.raises(TypeError, match="CoDeImageProcessor"):
        CoDeProcessor(object(), tiny_tokenizer)
    assert isinstance(CoDeProcessor(tokenizer=tiny_tokenizer).image_processor, CoDeImageProcessor)


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (["tokenizer.json"], "tokenizer.json"),
        (["tokenizer_config.json"], "tokenizer_config.json"),
        (["tokenizer.json", "tokenizer_config.json"], "tokenizer.json, tokenizer_config.json"),
        (["processor_config.json"], "processor_config.json"),
    ],
)
def test_a_folder_with_incomplete_processor_files_is_refused_naming_them(tiny_model_dir, tmp_path, removed, named):
    from modeling_code import CoDeModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in removed:
        (folder / name).unlink()
    with pytest.raises(OSError, match=f"lacks processor files: {named}") as caught:
        CoDeProcessor.from_pretrained(folder)
    assert str(folder) in str(caught.value)
    CoDeModel.from_pretrained(folder)  # the weights alone still load (training resumes, conversions)


def test_a_tokenizer_without_a_vocabulary_is_refused(tiny_model_dir, monkeypatch):
    """A Hub repository lacking the tokenizer files gives transformers' placeholder tokenizer: refused too."""
    from tokenizers import Tokenizer, models

    empty = CLIPTokenizer(tokenizer_object=Tokenizer(models.BPE()), unk_token="<|endoftext|>",
                          bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *args, **kwargs: empty))
    with pytest.raises(OSError, match=r"tokenizer loaded from .* has no vocabulary"):
        CoDeProcessor.from_pretrained(tiny_model_dir)
