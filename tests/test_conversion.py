"""Conversion of the authors' original checkpoint: the key table, both directions, checks, loading and the CLI.

The original-format state dicts are built here from ``reference_state_dict_keys.tsv`` (the 814 keys of the
released ViT-B/16 checkpoint), its shapes scaled to the tiny CLIP, independently of the conversion table.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CODE_OVERRIDES, pad_token_ids
from reference_implementations import class_embeddings_reference, template_class_embeddings_reference
from transformers import AutoModel, AutoProcessor

from modeling_code import CoDeConfig, CoDeModel
from modeling_code.apps.conversion import (
    UnsafeCheckpointError,
    check_clip_copies_agree,
    config_from_original,
    convert_original_state_dict,
    load_original_checkpoint,
    model_from_original,
    to_original_state_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = REPO_ROOT / "tests/data/reference_state_dict_keys.tsv"  # the released checkpoint's keys and shapes
CONVERTER = REPO_ROOT / "training/convert_original_checkpoint.py"
REFERENCE_LAYERS = 12  # ViT-B/16: 12 vision and 12 text blocks


def read_reference() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in REFERENCE_KEYS.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


# ------------------------------------------------------------------------------------------------ test data
def tiny_sizes(clip_config) -> dict[str, int]:
    vision, text = clip_config.vision_config, clip_config.text_config
    return {
        "vision_layers": vision.num_hidden_layers,
        "text_layers": text.num_hidden_layers,
        # ViT-B/16 dimension -> tiny dimension (ViT-B/16 has text width = projection = 512, as the tiny CLIP)
        768: vision.hidden_size, 2304: 3 * vision.hidden_size, 3072: vision.intermediate_size,
        512: text.hidden_size, 1536: 3 * text.hidden_size, 2048: text.intermediate_size,
        49408: text.vocab_size, 197: (vision.image_size // vision.patch_size) ** 2 + 1,
        "patch": vision.patch_size, "image_background": TINY_CODE_OVERRIDES["image_background_size"],
    }


def tiny_key(key: str, sizes: dict) -> str | None:
    """The ViT-B/16 key for the tiny CLIP: blocks beyond the tiny depth dropped, the masker's copy renumbered."""
    match = re.search(r"resblocks\.(\d+)\.", key)
    if match is None or key.startswith("text_decoder."):
        return key
    index = int(match.group(1))
    if key.startswith("masker."):  # the copy of CLIP's last vision block
        return key.replace(f"resblocks.{index}.", f"resblocks.{sizes['vision_layers'] - 1}.")
    depth = sizes["vision_layers"] if "visual" in key else sizes["text_layers"]
    return key if index < depth else None


def tiny_shape(key: str, shape: tuple[int, ...], sizes: dict) -> tuple[int, ...]:
    if key.endswith("conv1.weight"):
        return (sizes[768], 3, sizes["patch"], sizes["patch"])
    if key == "learnable_image_bg":
        return (1, 3, sizes["image_background"], sizes["image_background"])
    if key.startswith("text_decoder.") and 2048 in shape:  # the text decoder's MLP is 4x its width
        return tuple(4 * sizes[512] if size == 2048 else sizes.get(size, size) for size in shape)
    return tuple(sizes.get(size, size) for size in shape)


def frozen_source(key: str) -> str | None:
    """The ``frozen_clip`` key a duplicated CLIP entry of the original copies (None for other keys)."""
    copies = {
        "clip_image_encoder.clip_visual.": "frozen_clip.visual.",
        "clip_image_encoder.clip_proj.ln.": "frozen_clip.visual.ln_post.",
        "clip_image_encoder.clip_proj.proj": "frozen_clip.visual.proj",
        "clip_text_encoder.prompt_learner.clip_model.": "frozen_clip.",
        "clip_text_encoder.text_encoder.": "frozen_clip.",
    }
    for prefix, source in copies.items():
        if key.startswith(prefix):
            return source + key[len(prefix) :]
    return None


def pamr_kernels() -> dict[str, torch.Tensor]:
    positions = [(row, col) for row in range(3) for col in range(3)]
    neighbours = [position for position in positions if position != (1, 1)]
    difference, pick, window = torch.zeros(8, 1, 3, 3), torch.zeros(8, 1, 3, 3), torch.zeros(9, 1, 3, 3)
    for index, (row, col) in enumerate(neighbours):
        difference[index, 0, 1, 1], difference[index, 0, row, col] = 1.0, -1.0
        pick[index, 0, row, col] = 1.0
    for index, (row, col) in enumerate(positions):
        window[index, 0, row, col] = 1.0
    return {"pamr.aff_x.kernel": difference, "pamr.aff_m.kernel": pick, "pamr.aff_std.kernel": window}


def make_original_state_dict(clip_config, seed: int = 0) -> dict[str, torch.Tensor]:
    """An original-format state dict for the tiny CLIP: random weights, consistent copies, true PAMR kernels."""
    sizes = tiny_sizes(clip_config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in read_reference():
        new_key = tiny_key(key, sizes)
        if new_key is not None:
            state[new_key] = torch.randn(tiny_shape(key, shape, sizes), generator=generator)
    for key in state:
        if (source := frozen_source(key)) is not None:
            state[key] = state[source].clone()
    sos = clip_config.text_config.bos_token_id
    state["clip_text_encoder.prompt_learner.token_prefix"] = state["frozen_clip.token_embedding.weight"][sos][None, None].clone()
    state.update(pamr_kernels())
    return state


@pytest.fixture(scope="module")
def original(tiny_clip_config):
    return make_original_state_dict(tiny_clip_config)


@pytest.fixture(scope="module")
def tiny_config(original, tiny_clip_config, tiny_tokenizer):
    return config_from_original(original, tiny_clip_config, tiny_tokenizer, text_decoder_num_heads=4)


@pytest.fixture(scope="module")
def converted(original, tiny_config):
    return convert_original_state_dict(original, tiny_config)


def save_checkpoint(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


# ------------------------------------------------------------------------------------------------ table
def test_table_regenerates_the_reference_keys_and_shapes_at_full_size():
    """A ViT-B/16 CoDe (on the meta device) converts back to exactly the 814 reference keys, order and shapes."""
    config = CoDeConfig()
    with torch.device("meta"):
        model = CoDeModel(config)
    regenerated = to_original_state_dict(model.state_dict(), config)
    assert [(key, tuple(tensor.shape)) for key, tensor in regenerated.items()] == read_reference()


def test_test_dict_follows_the_reference_key_patterns(original, tiny_clip_config):
    sizes = tiny_sizes(tiny_clip_config)
    expected = [tiny_key(key, sizes) for key, _ in read_reference()]
    assert list(original) == [key for key in expected if key is not None]
    assert len(original) == 814 - 5 * 10 * 12  # 10 of 12 blocks (12 tensors each) dropped from 5 CLIP towers
    assert "masker.image_encoder.backbone.transformer.resblocks.1.ln_2.bias" in original


# ------------------------------------------------------------------------------------------------ config
def test_config_from_original_infers_sizes_and_fixes_the_clip(original, tiny_config, tiny_tokenizer):
    assert tiny_config.prompt_context_length == 16
    assert tiny_config.decoder_num_blocks == 2 and tiny_config.text_decoder_num_layers == 2
    assert tiny_config.text_decoder_num_heads == 4
    assert tiny_config.image_background_size == TINY_CODE_OVERRIDES["image_background_size"]
    text = tiny_config.clip_config.text_config
    assert text.hidden_act == tiny_config.clip_config.vision_config.hidden_act == "quick_gelu"
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, 0
    )


def test_config_from_original_reads_the_depths_of_the_checkpoint(original, tiny_clip_config):
    shallow = {key: value for key, value in original.items()
               if not key.startswith(("text_decoder.transformer.resblocks.1.", "masker.image_encoder.decoder.decoder.net.1."))}
    config = config_from_original(shallow, tiny_clip_config, text_decoder_num_heads=4)
    assert (config.text_decoder_num_layers, config.decoder_num_blocks) == (1, 1)
    state = convert_original_state_dict(shallow, config)
    assert "text_decoder.layers.1.layer_norm1.weight" not in state and "masker.decoder.blocks.1.gate" not in state


def test_config_from_original_rejects_a_clip_of_another_size(original, tiny_clip_config):
    other = tiny_clip_config.to_dict()
    other["vision_config"]["hidden_size"] = 64
    with pytest.raises(ValueError, match=r"vision hidden_size: checkpoint 48, CLIP config 64"):
        config_from_original(original, type(tiny_clip_config).from_dict(other))
    with pytest.raises(ValueError, match="prompt_context_length=8"):
        config_from_original(original, tiny_clip_config, prompt_context_length=8)


# ------------------------------------------------------------------------------------------------ forward
def test_tensors_land_where_they_belong(original, converted, tiny_clip_config):
    width = tiny_clip_config.vision_config.hidden_size
    packed = original["frozen_clip.visual.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "clip.vision_model.encoder.layers.1.self_attn"
    for index, name in enumerate("qkv"):
        assert torch.equal(converted[f"{layer}.{name}_proj.weight"], packed[index * width : (index + 1) * width])
    text_width = tiny_clip_config.text_config.hidden_size
    packed_bias = original["text_decoder.transformer.resblocks.0.attn.in_proj_bias"]
    assert torch.equal(converted["text_decoder.layers.0.self_attn.v_proj.bias"], packed_bias[2 * text_width :])
    assert torch.equal(converted["clip.text_model.encoder.layers.0.mlp.fc2.weight"],
                       original["frozen_clip.transformer.resblocks.0.mlp.c_proj.weight"])
    # right-multiplied projections, transposed
    assert torch.equal(converted["clip.visual_projection.weight"], original["frozen_clip.visual.proj"].t())
    assert torch.equal(converted["clip.text_projection.weight"], original["frozen_clip.text_projection"].t())
    assert torch.equal(converted["masker.projection.proj.weight"],
                       original["masker.image_encoder.decoder.image_proj.proj"].t())
    assert torch.equal(converted["masker.projection.layer_norm.bias"],
                       original["masker.image_encoder.decoder.image_proj.ln.bias"])
    # the masker's own block copy (not CLIP's last block)
    masker_block = "masker.image_encoder.backbone.transformer.resblocks.1"
    assert torch.equal(converted["masker.backbone_block.mlp.fc1.weight"], original[f"{masker_block}.mlp.c_fc.weight"])
    assert torch.equal(converted["masker.backbone_block.self_attn.k_proj.bias"],
                       original[f"{masker_block}.attn.in_proj_bias"][width : 2 * width])
    assert not torch.equal(converted["masker.backbone_block.mlp.fc1.weight"],
                           converted["clip.vision_model.encoder.layers.1.mlp.fc1.weight"])
    # decoder convolutions and gates
    net = "masker.image_encoder.decoder.decoder.net"
    for i in range(2):
        assert torch.equal(converted[f"masker.decoder.blocks.{i}.conv.weight"], original[f"{net}.{i}.conv.conv.weight"])
        assert torch.equal(converted[f"masker.decoder.blocks.{i}.norm.weight"], original[f"{net}.{i}.conv.norm.weight"])
        assert torch.equal(converted[f"masker.decoder.blocks.{i}.gate"], original[f"{net}.{i}.conv.gate.gate"])
    # prompts, scalars and scales
    assert torch.equal(converted["prompt_learner.context"], original["clip_text_encoder.prompt_learner.ctx"])
    assert converted["text_background"].shape == (77, text_width)
    assert torch.equal(converted["text_background"], original["bg_text"][:, 0])
    assert torch.equal(converted["image_background"], original["learnable_image_bg"][0])
    pairs = {"sim2mask.weight": "masker.sim2mask.w", "sim2mask.bias": "masker.sim2mask.b",
             "text_mask_head.weight": "text_mask_w", "text_mask_head.bias": "text_mask_b",
             "tcl_image_logit_scale": "tcli_loss.logit_scale", "tcl_feature_logit_scale": "tclf_loss.logit_scale",
             "hcl_logit_scale": "hcl_loss.logit_scale", "clip.logit_scale": "frozen_clip.logit_scale"}
    for code_key, original_key in pairs.items():
        assert converted[code_key].item() == original[original_key].item()


def openai_block(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str, heads: int, causal: bool):
    """An OpenAI CLIP residual block computed from its packed weights with torch's own MHA: x [B, T, W]."""
    width = x.shape[-1]

    def norm(name, y):
        return F.layer_norm(y, (width,), weights[f"{prefix}.{name}.weight"], weights[f"{prefix}.{name}.bias"])

    mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1) if causal else None
    h = norm("ln_1", x).transpose(0, 1)
    attention, _ = F.multi_head_attention_forward(
        h, h, h, width, heads, weights[f"{prefix}.attn.in_proj_weight"], weights[f"{prefix}.attn.in_proj_bias"],
        None, None, False, 0.0, weights[f"{prefix}.attn.out_proj.weight"], weights[f"{prefix}.attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask,
    )
    x = x + attention.transpose(0, 1)
    hidden = F.linear(norm("ln_2", x), weights[f"{prefix}.mlp.c_fc.weight"], weights[f"{prefix}.mlp.c_fc.bias"])
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    return x + F.linear(hidden, weights[f"{prefix}.mlp.c_proj.weight"], weights[f"{prefix}.mlp.c_proj.bias"])


@torch.no_grad()
def test_converted_blocks_compute_what_the_original_blocks_compute(original, tiny_config, converted):
    # float64, so the comparison is not drowned by rounding of the large random activations
    model = CoDeModel(tiny_config)
    model.load_state_dict(converted, strict=True)
    model, original = model.double(), {key: tensor.double() for key, tensor in original.items()}
    generator = torch.Generator().manual_seed(1)
    vision_x = torch.randn(2, 5, 48, generator=generator, dtype=torch.float64)
    expected = openai_block(vision_x, original, "frozen_clip.visual.transformer.resblocks.0", 4, causal=False)
    torch.testing.assert_close(model.clip.vision_model.encoder.layers[0](vision_x, None), expected)
    text_x = torch.randn(2, 7, 32, generator=generator, dtype=torch.float64)
    expected = openai_block(text_x, original, "text_decoder.transformer.resblocks.1", 4, causal=False)
    torch.testing.assert_close(model.text_decoder.layers[1](text_x, None), expected)
    # the frozen text tower is causal: the converted CLIP text embedding equals the OpenAI computation
    ids = torch.tensor([[tiny_config.clip_config.text_config.bos_token_id, 20, 30,
                         tiny_config.clip_config.text_config.eos_token_id, 0]])
    hidden = original["frozen_clip.token_embedding.weight"][ids] + original["frozen_clip.positional_embedding"][:5]
    for i in range(2):
        hidden = openai_block(hidden, original, f"frozen_clip.transformer.resblocks.{i}", 4, causal=True)
    pooled = F.layer_norm(hidden[:, 3], (32,), original["frozen_clip.ln_final.weight"], original["frozen_clip.ln_final.bias"])
    expected = F.normalize(pooled @ original["frozen_clip.text_projection"], dim=-1)
    torch.testing.assert_close(model.encode_text(ids), expected)


# ------------------------------------------------------------------------------------------------ inverse
def test_inverse_reproduces_the_original_exactly(original, converted, tiny_config):
    regenerated = to_original_state_dict(converted, tiny_config)
    assert list(regenerated) == list(original)
    for key, tensor in original.items():
        assert torch.equal(regenerated[key], tensor), key
    with pytest.raises(ValueError, match=r"missing: hcl_logit_scale"):
        to_original_state_dict({k: v for k, v in converted.items() if k != "hcl_logit_scale"}, tiny_config)


# ------------------------------------------------------------------------------------------------ failures
def test_missing_and_extra_keys_fail_naming_them(original, tiny_config):
    gate = "masker.image_encoder.decoder.decoder.net.1.conv.gate.gate"
    without_gate = {key: value for key, value in original.items() if key != gate}
    with pytest.raises(ValueError, match=r"1 missing: " + re.escape(gate)):
        convert_original_state_dict(without_gate, tiny_config)
    extra = {**original, "masker.image_encoder.decoder.extra_head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"1 unmapped: masker\.image_encoder\.decoder\.extra_head\.weight"):
        convert_original_state_dict(extra, tiny_config)


def test_wrong_shapes_fail_naming_the_tensor(original, tiny_config):
    wrong = {**original, "clip_text_encoder.prompt_learner.ctx": torch.zeros(16, 31)}
    with pytest.raises(ValueError, match=r"prompt_learner\.context: \(16, 31\) \(expected \(16, 32\)\)"):
        convert_original_state_dict(wrong, tiny_config)


def test_disagreeing_clip_copies_warn_and_frozen_clip_is_kept(original, tiny_config):
    copy_key = "clip_image_encoder.clip_visual.transformer.resblocks.0.attn.in_proj_weight"
    altered = dict(original)
    altered[copy_key] = original[copy_key].clone()
    altered[copy_key][5, 3] += 0.5
    with pytest.warns(UserWarning, match=r"duplicated CLIP copies disagree.*max \|difference\| 0\.5 at " + re.escape(copy_key)):
        state = convert_original_state_dict(altered, tiny_config)
    assert torch.equal(state["clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                       original["frozen_clip.visual.transformer.resblocks.0.attn.in_proj_weight"][:48])
    assert check_clip_copies_agree(altered, tiny_config, tolerance=1.0) == {}  # within tolerance: silent
    prefix = dict(original)
    prefix["clip_text_encoder.prompt_learner.token_prefix"] = original["frozen_clip.token_embedding.weight"][3][None, None]
    with pytest.warns(UserWarning, match=r"token_prefix"):
        check_clip_copies_agree(prefix, tiny_config)


def test_consistent_checkpoint_converts_silently_and_altered_pamr_kernels_warn(original, tiny_config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_original_state_dict(original, tiny_config)
    altered = {**original, "pamr.aff_std.kernel": torch.zeros(9, 1, 3, 3)}
    with pytest.warns(UserWarning, match=r"PAMR kernels differ.*pamr\.aff_std\.kernel"):
        convert_original_state_dict(altered, tiny_config)


# ------------------------------------------------------------------------------------------------ loading
def test_load_accepts_model_entry_bare_dict_and_module_prefix(tmp_path, original):
    small = {key: original[key] for key in ("bg_text", "text_mask_w")}
    entry = save_checkpoint(tmp_path / "entry.pth", {"model": small, "step": 5, "metrics": {"miou": 0.5}})
    bare = save_checkpoint(tmp_path / "bare.pth", small)
    parallel = save_checkpoint(tmp_path / "ddp.pth", {"model": {f"module.{k}": v for k, v in small.items()}})
    for path in (entry, bare, parallel):
        loaded = load_original_checkpoint(path)
        assert list(loaded) == list(small) and torch.equal(loaded["bg_text"], small["bg_text"])
    with pytest.raises(ValueError, match=r"not tensors: step"):
        load_original_checkpoint(save_checkpoint(tmp_path / "odd.pth", {"bg_text": small["bg_text"], "step": 3}))
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        load_original_checkpoint(tmp_path / "absent.pth")


def test_pickled_objects_are_refused_unless_allowed(tmp_path, original):
    path = save_checkpoint(tmp_path / "pickled.pth", {"model": {"bg_text": original["bg_text"]},
                                                      "config": argparse.Namespace(lr=0.1)})
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*allow_pickle=True \(--allow_pickle"):
        load_original_checkpoint(path)
    with pytest.warns(UserWarning, match="full unpickling"):
        loaded = load_original_checkpoint(path, allow_pickle=True)
    assert torch.equal(loaded["bg_text"], original["bg_text"])


# ------------------------------------------------------------------------------------------------ saved model
@torch.no_grad()
def test_converted_model_saves_loads_with_auto_model_and_segments(tmp_path, original, tiny_clip_config, tiny_tokenizer):
    model = model_from_original(original, tiny_clip_config, tiny_tokenizer, text_decoder_num_heads=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, CoDeModel) and not loaded.training
    assert torch.equal(loaded.image_background, original["learnable_image_bg"][0])
    assert torch.equal(loaded.clip.text_model.embeddings.token_embedding.weight, original["frozen_clip.token_embedding.weight"])
    classes = pad_token_ids(tiny_tokenizer, ["cat", "dog", "sky"])
    pixels = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    outputs = [
        # reference text path: bit-reproducible across two copies of the weights (the shared-prefix path rounds
        # differently between copies; its agreement with the reference is tested in test_modeling)
        m.segment_window(pixels, class_embeddings_reference(m, classes),
                         template_class_embeddings_reference(m, classes, 1))
        for m in (model, loaded)
    ]
    assert outputs[1].masks.shape == (1, 3, 16, 24) and outputs[1].kp_masks.shape == (1, 3, 4, 6)
    assert torch.isfinite(outputs[1].masks).all()
    torch.testing.assert_close(outputs[1].masks, outputs[0].masks, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1].kp_masks, outputs[0].kp_masks, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ CLI
def load_converter_script():
    spec = importlib.util.spec_from_file_location("convert_original_checkpoint", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, original, tiny_clip_dir):
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pth", {"model": {f"module.{k}": v for k, v in original.items()}})
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, str(CONVERTER), "--checkpoint", str(checkpoint), "--clip", str(tiny_clip_dir),
         "--out", str(out), "--text_decoder_num_heads", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Converted 214 original tensors into 149 CoDe tensors" in result.stdout
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model = AutoModel.from_pretrained(out)
    regenerated = to_original_state_dict(model.state_dict(), model.config)
    assert list(regenerated) == list(original)
    assert all(torch.equal(regenerated[key], original[key]) for key in original)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "CoDeProcessor"
    ids = processor(class_names=["cat"])["class_input_ids"]
    assert ids[0, 0].item() == model.config.clip_config.text_config.bos_token_id and ids[0, -1].item() == 0


def test_cli_refuses_pickles_and_checks_arguments(tmp_path, original, tiny_clip_dir, capsys):
    script = load_converter_script()
    path = save_checkpoint(tmp_path / "pickled.pth", {"model": original, "config": argparse.Namespace(lr=0.1)})
    with pytest.raises(SystemExit, match=r"error: .*--allow_pickle"):
        script.main(["--checkpoint", str(path), "--clip", str(tiny_clip_dir), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        script.parse_args(["--checkpoint", "c.pth", "--out", "o", "--push_to_hub"])
    assert "--push_to_hub needs --hub_model_id" in capsys.readouterr().err
    args = script.parse_args(["--checkpoint", "c.pth", "--out", "o", "--allow-pickle", "--push_to_hub",
                              "--hub_model_id", "user/code-vit-b16"])
    assert args.allow_pickle and args.push_to_hub and args.clip == "openai/clip-vit-base-patch16"
