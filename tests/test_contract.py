"""The transformers contract: processor -> model(**inputs) -> post-processing; training through the same forward;
one owner of the inference protocol; 0.1 directories and entry points still load and work."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import NO_PACKAGE_PRELUDE, pad_token_ids
from PIL import Image

from modeling_code import CoDeModel, CoDeProcessor, InferenceProtocol
from modeling_code.configuration_code import PROTOCOL_CONFIG_FIELDS, CoDeConfig
from modeling_code.losses import LOSS_NAMES
from modeling_code.modeling_code import CoDeModelOutput

LEGACY_DIR = os.path.join(os.path.dirname(__file__), "data", "model_v0_1")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return CoDeModel.from_pretrained(tiny_model_dir).eval(), CoDeProcessor.from_pretrained(tiny_model_dir)


def photo(width: int = 90, height: int = 70, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


# ------------------------------------------------------------------------------------------------ inference
def test_processor_output_goes_straight_into_the_model(loaded):
    model, processor = loaded
    image = photo()
    inputs = processor(images=image, text=["cat", "sofa", "background"], return_tensors="pt")
    outputs = model(**inputs)
    assert outputs.scores.shape == (1, 3, *inputs["pixel_values"].shape[-2:])
    assert outputs.scores.dtype == torch.float32 and outputs.scores.min() >= 0 and outputs.scores.max() <= 1
    torch.testing.assert_close(outputs.scores[0, 2], torch.full_like(outputs.scores[0, 2], 0.4))  # background
    label_maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
    assert label_maps[0].shape == (70, 90) and set(label_maps[0].unique().tolist()) <= {0, 1, 2}
    default_sizes = processor.post_process_semantic_segmentation(outputs)  # the sizes the processor saw
    assert torch.equal(default_sizes[0], label_maps[0])


def test_class_ids_are_positions_in_the_users_list(loaded):
    model, processor = loaded
    image = photo(seed=1)
    first = model(**processor(images=image, text=["background", "cat", "sofa"])).scores[0]
    moved = model(**processor(images=image, text=["sofa", "cat", "background"])).scores[0]
    torch.testing.assert_close(moved, first[[2, 1, 0]])


def test_a_batch_of_different_sizes_and_precomputed_embeddings(loaded):
    model, processor = loaded
    images = [photo(90, 70, 2), photo(60, 100, 3)]
    inputs = processor(images=images, text=["cat", "dog"])
    outputs = model(**inputs)
    assert isinstance(outputs.scores, list) and [s.shape[0] for s in outputs.scores] == [2, 2]
    assert outputs.class_embeddings.shape[0] == outputs.kp_class_embeddings.shape[0] == 2
    # encoded once, reused: the token ids are not needed again
    images_only = processor(images=images)
    again = model(**images_only, class_embeddings=outputs.class_embeddings,
                  kp_class_embeddings=outputs.kp_class_embeddings)
    for reused, first in zip(again.scores, outputs.scores):
        torch.testing.assert_close(reused, first)
    labels = processor.post_process_semantic_segmentation(again)
    assert [tuple(label.shape) for label in labels] == [(70, 90), (100, 60)]


def test_the_protocol_is_one_object_and_overrides_go_through_replace(loaded):
    model, processor = loaded
    protocol = model.config.inference_protocol
    assert protocol == processor.inference_protocol  # the processor read it from config.json
    assert {field.name for field in dataclasses.fields(InferenceProtocol)} == set(PROTOCOL_CONFIG_FIELDS)
    for name, field in PROTOCOL_CONFIG_FIELDS.items():
        assert CoDeConfig.__dataclass_fields__[field].default == getattr(InferenceProtocol(), name) or (
            list(CoDeConfig.__dataclass_fields__[field].default) == list(getattr(InferenceProtocol(), name))
        )
    image = photo(seed=4)
    inputs = processor(images=image, text=["cat", "background"])
    lower = protocol.replace(background_threshold=0.0)
    assert (model(**inputs, protocol=lower).scores[0, 1] == 0).all()
    without_pamr = model(**inputs, protocol=protocol.replace(use_pamr=False)).scores
    assert not torch.allclose(without_pamr, model(**inputs).scores)
    with pytest.raises(TypeError, match="Unknown inference setting"):
        protocol.replace(stride=3)
    with pytest.warns(FutureWarning, match="now called 'short_side'"):
        assert protocol.replace(inference_short_side=32).short_side == 32
    config = CoDeConfig()
    config.inference_protocol = InferenceProtocol(window_size=224, window_stride=112)
    assert (config.window_size, config.window_stride) == (224, 112)


def test_bad_forward_calls_are_named(loaded):
    model, processor = loaded
    inputs = processor(images=photo(seed=5))
    with pytest.raises(ValueError, match="Give the vocabulary"):
        model(**inputs)
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(**processor(text=["cat"]))
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(**inputs, class_names=["cat"])


# ------------------------------------------------------------------------------------------------ training
def training_batch(tokenizer, batch_size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    nouns = ["cat", "dog", "sofa", "tree"][: 2 * batch_size]
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "caption_input_ids": pad_token_ids(tokenizer, ["a cat on a sofa", "a dog near a tree"][:batch_size]),
        "noun_input_ids": pad_token_ids(tokenizer, nouns),
        "kg_template_input_ids": pad_token_ids(tokenizer, [f"a photo of a {noun}." for noun in nouns]),
        "text_labels": torch.zeros(batch_size, 77, dtype=torch.long),
    }


def test_loss_names_weights_and_output_fields_agree(loaded):
    model, processor = loaded
    weights = {name[len("loss_") : -len("_weight")] for name in CoDeConfig.__dataclass_fields__
               if name.startswith("loss_") and name.endswith("_weight")}
    fields = {field.name[len("loss_") :] for field in dataclasses.fields(CoDeModelOutput)
              if field.name.startswith("loss_")}
    assert weights == fields == set(LOSS_NAMES)
    model.config.gumbel_noise = False
    batch = training_batch(processor.tokenizer)
    try:
        output = model(**batch, return_loss=True)
        torch.testing.assert_close(output.loss, sum(output[f"loss_{name}"] for name in LOSS_NAMES))
        model.config.loss_tv_mask_weight *= 2
        doubled = model(**batch, return_loss=True)
    finally:
        model.config.loss_tv_mask_weight /= 2
        model.config.gumbel_noise = True
    torch.testing.assert_close(doubled.loss_tv_mask, 2 * output.loss_tv_mask)
    torch.testing.assert_close(doubled.loss_kg, output.loss_kg)


def test_training_inputs_need_return_loss_and_the_old_keyword_still_works(loaded):
    model, processor = loaded
    batch = training_batch(processor.tokenizer)
    with pytest.raises(ValueError, match="return_loss=True"):
        model(**batch)
    partial = {key: value for key, value in batch.items() if key != "text_labels"}
    with pytest.raises(ValueError, match="text_labels"):
        model(**partial, return_loss=True)
    model.config.gumbel_noise = False
    try:
        expected = model(**batch, return_loss=True).loss
        old = {**batch, "template_input_ids": batch.pop("kg_template_input_ids")}
        with pytest.warns(FutureWarning, match="kg_template_input_ids"):
            torch.testing.assert_close(model(**old).loss, expected)
    finally:
        model.config.gumbel_noise = True


# ------------------------------------------------------------------------------------------------ 0.1 folders
def test_a_0_1_folder_migrates_on_load(tmp_path, caplog):
    with pytest.warns(FutureWarning, match="eval_short_side"):
        processor = CoDeProcessor.from_pretrained(LEGACY_DIR)
    config = CoDeConfig.from_pretrained(LEGACY_DIR)
    assert processor.inference_protocol == config.inference_protocol
    assert processor.inference_protocol.short_side == 64
    # Old files that disagree: the model config wins, and the disagreement is logged.
    folder = tmp_path / "disagreeing"
    shutil.copytree(LEGACY_DIR, folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"]["eval_short_side"] = 32
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING), pytest.warns(FutureWarning):
        migrated = CoDeProcessor.from_pretrained(folder)
    assert migrated.inference_protocol.short_side == 64
    assert "inference_short_side 64 (processor: 32)" in caplog.text
    # A processor saved alone keeps its own old values.
    (folder / "config.json").unlink()
    with pytest.warns(FutureWarning):
        alone = CoDeProcessor.from_pretrained(folder)
    assert alone.inference_protocol.short_side == 32
    # Re-saved with 0.2, the old keys are gone.
    resaved = tmp_path / "resaved"
    processor.save_pretrained(resaved)
    assert "eval_short_side" not in (resaved / "processor_config.json").read_text()


# ------------------------------------------------------------------------------------------------ remote code
CONTRACT_SCRIPT = NO_PACKAGE_PRELUDE + """
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "modeling_code" not in sys.modules
image = Image.open("photo.jpg")
inputs = processor(images=image, text=["cat", "sofa", "background"], return_tensors="pt")
outputs = model(**inputs)
label_maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
print(type(model).__module__, tuple(outputs.scores.shape[:2]), tuple(label_maps[0].shape))
"""


@pytest.mark.slow
def test_the_contract_through_remote_code_without_the_package(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", CONTRACT_SCRIPT, str(tiny_model_dir)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("transformers_modules.") and line.endswith("(1, 3) (70, 90)")
