"""CoDeModel: construction from CLIP, every building block against a direct computation, losses, training."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CODE_OVERRIDES, pad_token_ids
from reference_implementations import (
    class_embeddings_reference,
    decoder_reference,
    encode_image_global_reference,
    masker_reference,
    segment_window_reference,
    template_class_embeddings_reference,
    upsample_block_reference,
)
from transformers import AutoConfig, AutoModel

import modeling_code.masker
import modeling_code.modeling_code
from modeling_code import CoDeConfig, CoDeModel
from modeling_code.losses import symmetric_infonce, tcl_feature_logits
from modeling_code.masker import CoDeUpsampleBlock
from modeling_code.ops import (
    MemoryLeanCLIPMLP,
    PatchEmbeddingConv2d,
    gumbel_sigmoid_straight_through,
    kernel_layout,
    quick_gelu_bwd,
    self_only_attention_block,
    tap_layout,
    tap_products,
    total_variation,
    transposed_in_tiles,
)


def make_batch(tokenizer, batch_size: int = 2, image_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    captions = ["a red cat on the sofa near a table", "a dog and a car on the road", "a bird over the water"]
    nouns = [["cat", "dog", "bird"], ["sofa", "car", "water"]]
    labels = torch.full((batch_size, 77), -1)
    caption_ids = pad_token_ids(tokenizer, captions[:batch_size])
    for row, (first, second) in enumerate(zip(nouns[0][:batch_size], nouns[1][:batch_size])):
        for k, noun in enumerate((first, second), start=1):
            noun_id = tokenizer(noun, add_special_tokens=False)["input_ids"][0]
            labels[row][caption_ids[row] == noun_id] = k
    noun_rows = nouns[0][:batch_size] + nouns[1][:batch_size]  # noun-major
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "caption_input_ids": caption_ids,
        "noun_input_ids": pad_token_ids(tokenizer, noun_rows),
        "kg_template_input_ids": pad_token_ids(tokenizer, [f"a bad photo of a {n}." for n in noun_rows]),
        "text_labels": labels,
    }


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_follow_the_spec():
    config = CoDeConfig()
    assert config.model_type == "code"
    assert config.clip_config.vision_config.hidden_size == 768
    assert config.clip_config.projection_dim == 512
    assert (config.sim2mask_init_weight, config.sim2mask_init_bias) == (10.0, -2.5)
    assert config.prompt_context_length == 16 and config.num_words == 2
    assert config.loss_kg_weight == 8.0 and config.loss_hcl_weight == 0.5 and config.area_positive_prior == 0.25
    assert config.pamr_dilations == [1, 2, 4, 8, 12, 24] and config.pamr_iterations == 10
    assert (config.window_size, config.window_stride, config.background_threshold, config.kp_weight) == (448, 224, 0.4, 0.3)


def test_config_round_trip_and_validation(tmp_path, tiny_clip_config):
    config = CoDeConfig(clip_config=tiny_clip_config, num_words=3, **TINY_CODE_OVERRIDES)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CoDeConfig)
    assert loaded.num_words == 3 and loaded.clip_config.vision_config.hidden_size == 48
    with pytest.raises(ValueError, match="text_decoder_num_heads"):
        CoDeConfig(clip_config=tiny_clip_config, text_decoder_num_heads=5)


def test_config_keeps_the_class_vocabulary_of_the_model(tmp_path, tiny_clip_config):
    assert CoDeConfig().class_vocabulary is None  # models saved before it: unknown (the demo falls back to VOC)
    config = CoDeConfig(clip_config=tiny_clip_config, class_vocabulary=("circle", "café"), **TINY_CODE_OVERRIDES)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).class_vocabulary == ["circle", "café"]
    with pytest.raises(TypeError, match="class_vocabulary must be a list of class names"):
        CoDeConfig(clip_config=tiny_clip_config, class_vocabulary="circle, café", **TINY_CODE_OVERRIDES)


# ------------------------------------------------------------------------------------------------ init
def test_single_frozen_clip_and_initialisation_from_clip(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model
    clip_modules = [name for name, module in model.named_modules() if type(module).__name__ == "CLIPModel"]
    assert clip_modules == ["clip"]
    assert all(not p.requires_grad for p in model.clip.parameters())
    last = model.clip.vision_model.encoder.layers[-1].state_dict()
    copy = model.masker.backbone_block.state_dict()
    assert all(torch.equal(last[key], copy[key]) for key in last)
    assert torch.equal(model.masker.projection.proj.weight, model.clip.visual_projection.weight)
    assert torch.equal(model.masker.projection.layer_norm.weight, model.clip.vision_model.post_layernorm.weight)
    ids = tiny_tokenizer(model.config.prompt_init_text, add_special_tokens=False)["input_ids"][:16]
    expected = model.clip.text_model.embeddings.token_embedding.weight[torch.tensor(ids)]
    assert torch.equal(model.prompt_learner.context, expected)
    assert all(float(block.gate.detach()) == 0.0 for block in model.masker.decoder.blocks)


@pytest.mark.parametrize("reference", [False, True])
def test_decoder_is_nearest_upsampling_at_init(tiny_code_model, reference):
    x = torch.randn(2, 3, 5, 48)  # channels last
    decoder = tiny_code_model.masker.decoder
    out = decoder_reference(decoder, x) if reference else decoder(x)
    assert out.shape == (2, 12, 20, 48)
    expected = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=4, mode="nearest").permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 3), (1000, 1700), (768, 6912)])  # one tile, partial tiles, whole tiles
def test_tiled_transpose_is_the_transpose(shape):
    matrix = torch.randn(shape)
    assert torch.equal(transposed_in_tiles(matrix), matrix.t().contiguous())


def test_tap_layout_and_kernel_layout_are_inverse_permutations():
    weight = torch.randn(40, 24, 3, 3)
    taps = tap_layout(weight)
    assert torch.equal(taps, weight.permute(1, 2, 3, 0).reshape(24, 9 * 40))
    assert torch.equal(kernel_layout(taps), weight) and kernel_layout(taps).is_contiguous()


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 4)])
def test_tap_product_convolution_equals_plain_block(tiny_clip_config, size):
    torch.manual_seed(1)
    block = CoDeUpsampleBlock(CoDeConfig(clip_config=tiny_clip_config, **TINY_CODE_OVERRIDES))
    with torch.no_grad():
        block.gate.fill_(0.7)
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    x = torch.randn(2, 48, *size)
    fast = block(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
    torch.testing.assert_close(fast, upsample_block_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(3, 5), (1, 1), (1, 4), (6, 2)])
def test_tap_product_convolution_has_the_plain_gradients(tiny_clip_config, size):
    torch.manual_seed(2)
    block = CoDeUpsampleBlock(CoDeConfig(clip_config=tiny_clip_config, **TINY_CODE_OVERRIDES))
    with torch.no_grad():
        block.gate.fill_(0.5)
    x = torch.randn(2, 48, *size, requires_grad=True)
    upstream = torch.randn(2, 48, 2 * size[0], 2 * size[1])
    gradients = []
    for fast in (True, False):
        out = block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if fast else upsample_block_reference(block, x)
        gradients.append(torch.autograd.grad((out * upstream).sum(), [x, block.conv.weight, block.conv.bias,
                                                                     block.gate, block.norm.weight]))
    for fast_grad, plain_grad in zip(*gradients):
        torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(1, 3), (5, 4), (6, 5)])
@pytest.mark.parametrize("band_rows", [1, 2, 4])
def test_row_bands_of_the_upsampling_block_equal_the_whole_map(tiny_clip_config, size, band_rows):
    torch.manual_seed(3)
    block = CoDeUpsampleBlock(CoDeConfig(clip_config=tiny_clip_config, **TINY_CODE_OVERRIDES))
    with torch.no_grad():
        block.gate.fill_(0.8)
        block.conv.bias.normal_()
    x = torch.randn(2, 48, *size)
    channels_last = x.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        bands = list(block.bands(channels_last, band_rows))
    starts = list(range(0, size[0], band_rows))
    assert [start for start, _ in bands] == [2 * start for start in starts]
    assert [band.shape[1] for _, band in bands] == [2 * (min(start + band_rows, size[0]) - start) for start in starts]
    banded = torch.cat([band for _, band in bands], dim=1)
    torch.testing.assert_close(banded.permute(0, 3, 1, 2), upsample_block_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_tap_bytes", [1, 3 * 9 * 48 * 4 * 6, 1 << 30])  # one row, three rows, one band
def test_masker_bands_tile_the_embeddings(tiny_code_model, max_tap_bytes, monkeypatch):
    monkeypatch.setattr(modeling_code.masker, "BAND_TAP_BYTES", max_tap_bytes)
    model = tiny_code_model
    with torch.no_grad():
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.6)
        hidden, grid = model.encode_image_dense(torch.randn(1, 3, 40, 24))  # 5 x 3 patches -> 20 x 12
        whole = masker_reference(model.masker, hidden, grid)
        bands = list(model.masker.bands(hidden, grid))
    starts = [start for start, _ in bands]
    expected_bands = {1: 10, 3 * 9 * 48 * 4 * 6: 4, 1 << 30: 1}[max_tap_bytes]  # last block: 10 x 6 input rows
    assert len(bands) == expected_bands and starts == sorted(starts) and starts[0] == 0
    torch.testing.assert_close(torch.cat([band for _, band in bands], dim=2), whole, rtol=1e-5, atol=1e-5)
    prompted = F.normalize(torch.randn(3, 32), dim=-1)
    pixels = torch.randn(2, 3, 40, 24)
    torch.testing.assert_close(model.segment_window(pixels, prompted).masks,
                               segment_window_reference(model, pixels, prompted).masks, rtol=1e-5, atol=1e-5)


def test_upsampling_block_follows_in_place_weight_updates(tiny_clip_config):
    block = CoDeUpsampleBlock(CoDeConfig(clip_config=tiny_clip_config, **TINY_CODE_OVERRIDES))
    x = torch.randn(1, 48, 3, 4)
    with torch.no_grad():
        block.gate.fill_(1.0)
        first = block(x.permute(0, 2, 3, 1).contiguous())
        block.conv.weight.mul_(2.0)  # an optimiser-style in-place update
        second = block(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
        torch.testing.assert_close(second, upsample_block_reference(block, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first.permute(0, 3, 1, 2), second)


def test_kernels_laid_out_for_inference_give_the_same_masks_and_are_dropped_after(tiny_code_model):
    model = tiny_code_model
    with torch.no_grad():
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.6)
        hidden, grid = model.encode_image_dense(torch.randn(2, 3, 40, 24))
        expected = model.masker(hidden, grid)
    blocks = model.masker.decoder.blocks
    with model.prepared_for_inference():
        prepared = [block.tap_weights for block in blocks]
        assert all(weights is not None and not weights.requires_grad for weights in prepared)
        with model.prepared_for_inference():  # an inner context keeps the outer one's matrices
            assert all(block.tap_weights is weights for block, weights in zip(blocks, prepared))
        assert all(block.tap_weights is weights for block, weights in zip(blocks, prepared))
        with torch.no_grad():
            torch.testing.assert_close(model.masker(hidden, grid), expected, rtol=0, atol=0)
            bands = [band for _, band in model.masker.bands(hidden[:1], grid)]
        torch.testing.assert_close(torch.cat(bands, dim=2), expected[:1], rtol=1e-5, atol=1e-5)
    assert all(block.tap_weights is None for block in blocks)


def test_dense_path_matches_direct_computation(tiny_code_model):
    model = tiny_code_model
    pixels = torch.randn(1, 3, 40, 24)  # not the pretraining size: position embeddings are interpolated
    hidden, grid = model.encode_image_dense(pixels)
    assert grid == (5, 3) and hidden.shape == (1, 16, 48)
    reference = model.clip.vision_model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(hidden, reference.hidden_states[-2])
    # self-only attention == full attention block with every off-diagonal score masked out
    last = model.clip.vision_model.encoder.layers[-1]
    diagonal = torch.full((16, 16), torch.finfo(torch.float32).min).fill_diagonal_(0)[None, None]
    torch.testing.assert_close(self_only_attention_block(last, hidden), last(hidden, diagonal), rtol=1e-5, atol=1e-5)
    features = model.dense_clip_features(hidden, grid)
    direct = model.clip.visual_projection(model.clip.vision_model.post_layernorm(last(hidden, diagonal)[:, 1:]))
    direct = F.normalize(direct, dim=-1).transpose(1, 2).reshape(1, 32, 5, 3)
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-5)


def test_text_embeddings_match_clip_and_cut_at_eos_is_exact(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model
    ids = pad_token_ids(tiny_tokenizer, ["a cat", "a photo of a big red dog on the grass", "sky"])
    ours = model.encode_text(ids)
    plain = model.encode_text(ids, cut_at_eos=False)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    clip = model.clip.get_text_features(input_ids=ids)
    clip = clip.pooler_output if hasattr(clip, "pooler_output") else clip
    torch.testing.assert_close(ours, F.normalize(clip, dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("names", [["cat", "traffic light", "dog"], ["big red dog"]])
def test_vocabulary_embeddings_with_shared_prefixes_equal_the_plain_ones(tiny_code_model, tiny_tokenizer, names):
    templates = ["a photo of a {}.", "a {} on the grass in the sky.", "{}", "itap of the {}s."]
    ids = pad_token_ids(tiny_tokenizer, [template.format(name) for name in names for template in templates])
    model = tiny_code_model
    fast = model.get_template_class_embeddings(ids, len(templates))
    torch.testing.assert_close(fast, template_class_embeddings_reference(model, ids, len(templates)),
                               rtol=1e-5, atol=1e-6)
    class_ids = pad_token_ids(tiny_tokenizer, names)  # prompted: start token and learned context shared
    with torch.no_grad():
        model.prompt_learner.context.normal_()
    torch.testing.assert_close(model.get_class_embeddings(class_ids),
                               class_embeddings_reference(model, class_ids), rtol=1e-5, atol=1e-6)
    by_template = ids.view(len(names), len(templates), -1)
    per_prompt = model.encode_text_groups([model._template_group(by_template[:, index]) for index in range(len(templates))])
    for index, embeddings in enumerate(per_prompt):  # per prompt, not only the ensemble
        torch.testing.assert_close(embeddings, model.encode_text(by_template[:, index]), rtol=1e-5, atol=1e-6)


def test_packed_text_groups_equal_separate_passes(tiny_code_model, tiny_tokenizer):
    """Groups with and without a shared prefix, rows of unequal length, one packed pass."""
    model = tiny_code_model
    token_embedding = model.clip.text_model.embeddings.token_embedding
    first = pad_token_ids(tiny_tokenizer, ["a photo of a cat.", "a photo of a big red dog on the grass.", "a photo of"])
    second = pad_token_ids(tiny_tokenizer, ["sky", "the grass in the sky"])
    groups = [(token_embedding(first), model.eos_positions(first), 4), (token_embedding(second), model.eos_positions(second), 0)]
    with torch.no_grad():
        packed = model.encode_text_groups(groups)
    assert [tuple(x.shape) for x in packed] == [(3, model.config.clip_config.projection_dim), (2, model.config.clip_config.projection_dim)]
    torch.testing.assert_close(packed[0], model.encode_text(first), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], model.encode_text(second), rtol=1e-5, atol=1e-6)


def test_prompted_nouns_layout(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model
    ids = pad_token_ids(tiny_tokenizer, ["cat", "traffic light"])
    embeddings, eos = model.prompt_learner(ids, model.clip.text_model.embeddings.token_embedding)
    assert embeddings.shape == (2, 77, 32)
    noun_length = (ids != 0).sum(1) - 1  # tokens + EOS, SOS dropped
    assert eos.tolist() == (16 + noun_length).tolist()
    torch.testing.assert_close(embeddings[:, 1:17], model.prompt_learner.context.expand(2, -1, -1))
    token_embedding = model.clip.text_model.embeddings.token_embedding
    torch.testing.assert_close(embeddings[0, 17], token_embedding.weight[ids[0, 1]])
    # a noun longer than the room left after the context is cut with EOS kept last
    long_ids = pad_token_ids(tiny_tokenizer, [" ".join(["cat"] * 70)])
    _, eos_long = model.prompt_learner(long_ids, token_embedding)
    assert int(eos_long) == 76


# ------------------------------------------------------------------------------------------------ pieces
def test_sim2mask_formula(tiny_code_model):
    embeddings = F.normalize(torch.randn(2, 32, 4, 4), dim=1)
    text = F.normalize(torch.randn(3, 32), dim=1)
    logits = tiny_code_model.sim2mask(embeddings, text)
    expected = 10.0 * torch.einsum("bchw,mc->bmhw", embeddings, text) - 2.5
    torch.testing.assert_close(logits, expected)


def test_gumbel_straight_through():
    torch.manual_seed(0)
    logits = torch.tensor([-30.0, 30.0, 0.0, 1.0], requires_grad=True)
    hard = gumbel_sigmoid_straight_through(logits.expand(4000, 4))
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert hard[:, 0].sum() == 0 and hard[:, 1].sum() == 4000
    frequency = hard.detach().mean(0)
    torch.testing.assert_close(frequency[2:], torch.sigmoid(logits[2:].detach()), atol=0.03, rtol=0)
    hard.sum().backward()
    assert logits.grad[2] > 0 and logits.grad[0] < 1e-6  # the soft path's gradient reaches the logits


def test_symmetric_infonce_and_total_variation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.0, 0.3], [0.0, -0.2, 3.0]])
    rows = F.cross_entropy(logits, torch.arange(3))
    columns = F.cross_entropy(logits.t(), torch.arange(3))
    torch.testing.assert_close(symmetric_infonce(logits), (rows + columns) / 2)
    ramp = torch.arange(5.0).expand(5, 5)
    assert float(total_variation(ramp)) == pytest.approx(1.0)
    assert float(total_variation(torch.ones(3, 4, 4))) == 0.0


def test_symmetric_infonce_leaves_excluded_pairs_out_of_both_directions():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.0, 0.3], [0.0, -0.2, 3.0]], requires_grad=True)
    excluded = torch.zeros(3, 3, dtype=torch.bool)
    excluded[0, 2] = excluded[2, 0] = True
    loss = symmetric_infonce(logits, excluded)

    def cross_entropy(values: torch.Tensor, target: int) -> torch.Tensor:
        return F.cross_entropy(values[None], torch.tensor([target]))

    rows = [cross_entropy(logits[0, :2], 0), cross_entropy(logits[1], 1), cross_entropy(logits[2, 1:], 1)]
    columns = [cross_entropy(logits[:2, 0], 0), cross_entropy(logits[:, 1], 1), cross_entropy(logits[1:, 2], 1)]
    torch.testing.assert_close(loss, (sum(rows) / 3 + sum(columns) / 3) / 2)
    loss.backward()
    assert logits.grad[0, 2] == logits.grad[2, 0] == 0 and (logits.grad.abs() > 0).sum() == 7


def _storages_saved_for_backward(function, *inputs: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = function(*inputs)
    return out, set(saved)


def test_total_variation_gradient_keeps_only_its_input():
    x = torch.randn(2, 3, 5, 6).round().requires_grad_()  # rounded: equal neighbours, where |d|' = 0
    upstream = torch.tensor(1.7)
    value, saved = _storages_saved_for_backward(total_variation, x)
    assert saved == {x.untyped_storage().data_ptr()}
    (grad,) = torch.autograd.grad(value, x, upstream)
    plain = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    (plain_grad,) = torch.autograd.grad(plain, x, upstream)
    torch.testing.assert_close(value, plain)
    torch.testing.assert_close(grad, plain_grad)


def test_tap_products_keep_the_weight_itself_for_backward(tiny_clip_config):
    block = CoDeUpsampleBlock(CoDeConfig(clip_config=tiny_clip_config, **TINY_CODE_OVERRIDES))
    activated = torch.randn(10, 48, requires_grad=True)
    taps, saved = _storages_saved_for_backward(lambda x: tap_products(x, block.conv.weight), activated)
    assert saved == {activated.untyped_storage().data_ptr(), block.conv.weight.untyped_storage().data_ptr()}
    upstream = torch.randn_like(taps)
    grads = torch.autograd.grad(taps, [activated, block.conv.weight], upstream)
    laid_out = block.conv.weight.permute(1, 2, 3, 0).reshape(48, -1)
    torch.testing.assert_close(taps, activated @ laid_out)
    plain_grads = torch.autograd.grad(activated @ laid_out, [activated, block.conv.weight], upstream)
    for grad, plain_grad in zip(grads, plain_grads):
        torch.testing.assert_close(grad, plain_grad)


def test_feature_pooling_reads_each_image_once_for_all_its_noun_rows(tiny_code_model):
    batch_size, num_words, num_nouns = 2, 3, 6
    image_embeddings = F.normalize(torch.randn(batch_size, 32, 5, 4), dim=1)
    soft_masks = torch.rand(batch_size * num_words, num_nouns, 5, 4)
    nouns = F.normalize(torch.randn(num_nouns, 32), dim=-1)
    scale = tiny_code_model.tcl_feature_logit_scale.exp().clamp(max=tiny_code_model.config.logit_scale_max)
    logits = tcl_feature_logits(image_embeddings, soft_masks, nouns, scale, tiny_code_model.config.mask_pool_eps)
    rows = image_embeddings.repeat(num_words, 1, 1, 1)  # noun-major rows: row i is image i % B
    pooled = torch.einsum("nchw,nmhw->nmc", rows, soft_masks) / (soft_masks.sum((-2, -1))[..., None]
                                                                 + tiny_code_model.config.mask_pool_eps)
    cosine = (F.normalize(pooled, dim=-1) * nouns[None]).sum(-1)
    expected = scale * cosine
    torch.testing.assert_close(logits, expected)


# ------------------------------------------------------------------------------------------------ forward
def test_training_forward_shapes_and_losses(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model.train()
    assert not model.clip.training and model.masker.training
    out = model(**make_batch(tiny_tokenizer), return_loss=True)
    names = ["kg", "tcl_feature", "tcl_image", "tv_image", "tv_mask", "area_positive", "area_negative",
             "text_segmentation", "hcl"]
    assert next(iter(out.keys())) == "loss"
    terms = [out[f"loss_{name}"] for name in names]
    assert all(term.dim() == 0 and torch.isfinite(term) for term in terms)
    for name in ("kg", "tcl_feature", "tcl_image", "text_segmentation", "hcl"):
        assert out[f"loss_{name}"] > 0, name
    torch.testing.assert_close(out.loss, sum(terms))
    assert out.positive_masks.shape == (4, 16, 16) and out.text_masks.shape == (2, 2, 77)


def test_terms_weighted_zero_are_skipped_with_the_passes_only_they_need(tiny_code_model, tiny_tokenizer, monkeypatch):
    model = tiny_code_model.train()
    batch = make_batch(tiny_tokenizer)
    torch.manual_seed(0)
    full = model(**batch, return_loss=True)
    monkeypatch.setattr(model.config, "loss_text_segmentation_weight", 0.0)
    monkeypatch.setattr(model.config, "loss_hcl_weight", 0.0)

    def no_word_highlighting(*args, **kwargs):
        raise AssertionError("word highlighting ran for terms weighted 0")

    monkeypatch.setattr(model, "_highlight_words", no_word_highlighting)
    torch.manual_seed(0)  # the same Gumbel noise: the same hard masks
    ablated = model(**batch, return_loss=True)
    assert float(ablated.loss_text_segmentation) == float(ablated.loss_hcl) == 0.0 and ablated.text_masks is None
    kept = [name for name in full if name.startswith("loss_") and name not in ("loss_text_segmentation", "loss_hcl")]
    for name in kept:
        torch.testing.assert_close(ablated[name], full[name])
    torch.testing.assert_close(ablated.loss, sum(ablated[name] for name in kept))
    ablated.loss.backward()
    assert all(p.grad is None for p in model.text_decoder.parameters())
    assert model.text_background.grad is None and model.image_background.grad is not None  # tcl_image still runs


def test_same_noun_rows_are_left_out_of_the_contrastive_negatives(tiny_code_model, tiny_tokenizer, monkeypatch):
    model = tiny_code_model.train()
    batch = make_batch(tiny_tokenizer, batch_size=3)  # six distinct nouns: nothing to leave out
    torch.manual_seed(0)
    faithful = model(**batch, return_loss=True)
    monkeypatch.setattr(model.config, "exclude_same_noun_negatives", True)
    torch.manual_seed(0)
    excluding = model(**batch, return_loss=True)
    for name, value in faithful.items():
        if name.startswith("loss"):
            torch.testing.assert_close(excluding[name], value, msg=name)

    batch["noun_input_ids"] = pad_token_ids(tiny_tokenizer, ["cat", "dog", "cat", "sofa", "car", "sofa"])
    seen = []
    plain = modeling_code.modeling_code.symmetric_infonce
    monkeypatch.setattr(modeling_code.modeling_code, "symmetric_infonce",
                        lambda logits, excluded=None: seen.append(excluded) or plain(logits, excluded))
    model(**batch, return_loss=True)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for first, second in ((0, 2), (3, 5)):
        expected[first, second] = expected[second, first] = True
    assert len(seen) == 3  # tcl_feature, tcl_image, hcl
    assert all(torch.equal(excluded, expected) for excluded in seen)


def test_area_and_tv_losses_at_constant_masks(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model
    with torch.no_grad():
        model.sim2mask.weight.zero_()
        model.sim2mask.bias.fill_(torch.logit(torch.tensor(0.25)))
    out = model(**make_batch(tiny_tokenizer), return_loss=True)
    assert float(out.loss_area_positive) == pytest.approx(0.0, abs=1e-6)  # exactly at the prior
    assert float(out.loss_area_negative) == pytest.approx(0.05 * 0.25, abs=1e-6)  # one-sided: only negatives
    assert float(out.loss_tv_mask) == 0.0


def test_gradients_reach_trainable_parameters_only(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model.train()
    with torch.no_grad():  # zero gates (the initial state) would block the convolutions' gradients
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.1)
    model(**make_batch(tiny_tokenizer), return_loss=True).loss.backward()
    # the block copy runs with self-only attention: its query/key projections are unused by design
    unused = {f"masker.backbone_block.self_attn.{p}_proj.{t}" for p in ("q", "k") for t in ("weight", "bias")}
    for name, parameter in model.named_parameters():
        if name.startswith("clip."):
            assert parameter.grad is None, name
        elif name not in unused:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_phase_switch_freezes_only_the_block_copy(tiny_code_model):
    model = tiny_code_model
    model.set_masker_backbone_trainable(False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if not n.startswith("clip.")} == {
        n for n, _ in model.named_parameters() if n.startswith("masker.backbone_block.")
    }
    model.set_masker_backbone_trainable(True)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("clip."))
    assert "clip.logit_scale" not in model.trainable_parameter_names()


def test_loss_falls_and_clip_stays_unchanged(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model.train()
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    batch = make_batch(tiny_tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # same Gumbel noise pattern per step keeps the comparison about learning
        loss = model(**batch, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(torch.equal(clip_before[k], v) for k, v in model.clip.state_dict().items())


def test_bf16_autocast_on_cpu(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(tiny_tokenizer), return_loss=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.masker.decoder.blocks[0].conv.weight.grad is not None


def test_segment_window_shapes(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model
    classes = pad_token_ids(tiny_tokenizer, ["cat", "dog", "sky"])
    prompted = model.get_class_embeddings(classes)
    templates = pad_token_ids(tiny_tokenizer, [f"a photo of a {c}." for c in ("cat", "dog", "sky") for _ in range(2)])
    kp = model.get_template_class_embeddings(templates, num_templates=2)
    assert prompted.shape == kp.shape == (3, 32)
    torch.testing.assert_close(kp.norm(dim=-1), torch.ones(3))
    out = model.segment_window(torch.randn(2, 3, 24, 40), prompted, kp)
    assert out.masks.shape == (2, 3, 12, 20) and out.kp_masks.shape == (2, 3, 3, 5)
    assert float(out.masks.min()) >= 0 and float(out.masks.max()) <= 1
    with torch.no_grad():
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.5)
    pixels = torch.randn(2, 3, 24, 40)
    reference = segment_window_reference(model, pixels, prompted, None)
    fast = model.segment_window(pixels, prompted, None)
    torch.testing.assert_close(reference.masks, fast.masks, rtol=1e-5, atol=1e-5)
    kp_banded = model.segment_window(pixels, prompted, kp)
    kp_whole = model.segment_window(pixels, prompted, kp, banded=False)  # the batched, traceable masker path
    torch.testing.assert_close(kp_whole.masks, kp_banded.masks, rtol=1e-5, atol=1e-6)
    assert torch.equal(kp_whole.kp_masks, kp_banded.kp_masks)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_and_auto_load_are_bit_identical(tiny_code_model, tiny_tokenizer, tmp_path):
    model = tiny_code_model.eval()
    with torch.no_grad():
        model.masker.decoder.blocks[0].gate.fill_(0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_code.CoDeModel"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CoDeModel)
    classes = pad_token_ids(tiny_tokenizer, ["cat", "dog"])
    pixels = torch.randn(1, 3, 32, 32)
    a = model.segment_window(pixels, model.get_class_embeddings(classes))
    b = loaded.segment_window(pixels, loaded.get_class_embeddings(classes))
    assert torch.equal(a.masks, b.masks)


def test_memory_lean_layers_keep_the_saved_keys_and_config_of_0_1_0(tmp_path):
    """The swap of CLIP's layers changes no saved name: the state-dict keys are those of the 0.1.0 model."""
    from safetensors import safe_open

    saved_by_0_1_0 = Path(__file__).resolve().parent / "data" / "model_v0_1"
    with safe_open(str(saved_by_0_1_0 / "model.safetensors"), "pt") as weights:
        keys_of_0_1_0 = sorted(weights.keys())
    model = CoDeModel(CoDeConfig.from_pretrained(saved_by_0_1_0))
    assert isinstance(model.clip.vision_model.embeddings.patch_embedding, PatchEmbeddingConv2d)
    assert sorted(model.state_dict()) == keys_of_0_1_0
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        assert sorted(weights.keys()) == keys_of_0_1_0
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.clip_config.vision_config.hidden_act == "quick_gelu"
    assert config.clip_config.text_config.hidden_act == "quick_gelu"


def test_loaded_model_keeps_the_clip_frozen(tiny_code_model, tmp_path):
    tiny_code_model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    trainable = {name for name, parameter in loaded.named_parameters() if parameter.requires_grad}
    assert trainable == set(loaded.trainable_parameter_names())
    assert not any(name.startswith("clip.") for name in trainable)


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tiny_code_model, tmp_path):
    tiny_code_model.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                # the package, and spaCy: only training decomposes captions, loading a model never needs it
                if name.split(".")[0] in ("modeling_code", "spacy"):
                    raise ImportError(f"No module named {{name!r}} (hidden for this test)")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print(type(model).__name__, sum(p.numel() for p in model.parameters()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sum(p.numel() for p in tiny_code_model.parameters())
    assert result.stdout.split()[-2:] == ["CoDeModel", str(expected)]


@pytest.mark.parametrize("bias", [False, True])
def test_patch_embedding_as_a_matrix_product_equals_the_convolution(bias):
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=bias)
    patch_conv = PatchEmbeddingConv2d.replacing(conv)
    assert isinstance(patch_conv, PatchEmbeddingConv2d) and patch_conv.weight is conv.weight
    assert list(patch_conv.state_dict()) == list(conv.state_dict())
    image = torch.randn(2, 3, 18, 17, requires_grad=True)  # trailing rows and columns are dropped, as by the conv
    upstream = torch.randn(2, 8, 4, 4)
    values = [layer(image) for layer in (patch_conv, conv)]
    torch.testing.assert_close(values[0], values[1])
    grads = [torch.autograd.grad(value, [image, conv.weight], upstream) for value in values]
    for grad, plain_grad in zip(*grads):
        torch.testing.assert_close(grad, plain_grad)
    overlapping = torch.nn.Conv2d(3, 8, kernel_size=4, stride=2)
    assert PatchEmbeddingConv2d.replacing(overlapping) is overlapping


def test_the_frozen_clip_embeds_patches_with_a_matrix_product(tiny_code_model):
    assert isinstance(tiny_code_model.clip.vision_model.embeddings.patch_embedding, PatchEmbeddingConv2d)


def test_memory_lean_mlp_matches_clip_and_saves_one_hidden_sized_tensor(tiny_code_model):
    from transformers.models.clip.modeling_clip import CLIPMLP

    assert isinstance(tiny_code_model.clip.vision_model.encoder.layers[0].mlp, MemoryLeanCLIPMLP)
    assert isinstance(tiny_code_model.text_decoder.layers[0].mlp, MemoryLeanCLIPMLP)
    torch.manual_seed(0)
    mlp = CLIPMLP(tiny_code_model.config.clip_config.vision_config)
    lean = MemoryLeanCLIPMLP.replacing(mlp)
    assert lean.fc1 is mlp.fc1 and lean.fc2 is mlp.fc2 and list(lean.state_dict()) == list(mlp.state_dict())
    x = (torch.randn(3, 7, 48) * 4).requires_grad_()
    upstream = torch.randn(3, 7, 48)
    results = []
    for module in (lean, mlp):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = module(x)
        hidden_sized = {t.data_ptr() for t in saved if t.numel() == 3 * 7 * mlp.fc1.out_features}  # distinct
        grads = torch.autograd.grad(y, [x, *mlp.parameters()], upstream)
        results.append((y, grads, len(hidden_sized)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for grad, reference_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-5)
    assert (results[0][2], results[1][2]) == (1, 3)
    with torch.no_grad():  # the activation in one temporary: the same bits
        torch.testing.assert_close(lean(x), mlp(x), rtol=0, atol=0)
    hidden, hidden_upstream = (torch.randn(3, 7, 96) * 4).requires_grad_(), torch.randn(3, 7, 96)
    (autograd_grad,) = torch.autograd.grad(hidden * torch.sigmoid(1.702 * hidden), hidden, hidden_upstream)
    lean_grad = quick_gelu_bwd(hidden.detach(), hidden_upstream)  # in place, in two temporaries: autograd's bits
    torch.testing.assert_close(lean_grad, autograd_grad, rtol=0, atol=0)


def test_global_image_embedding_with_class_token_last_block_equals_clip(tiny_code_model):
    model = tiny_code_model
    image_size = model.config.clip_config.vision_config.image_size
    pixels = torch.randn(3, 3, image_size, image_size + 8, requires_grad=True)  # an interpolated grid as well
    upstream = torch.randn(3, model.config.clip_config.projection_dim)
    results = []
    for encode in (model.encode_image_global, lambda pixels: encode_image_global_reference(model, pixels)):
        embeddings = encode(pixels)
        results.append((embeddings, *torch.autograd.grad((embeddings * upstream).sum(), pixels)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    reference = model.clip.get_image_features(pixel_values=pixels.detach()[:, :, :, :image_size])
    reference = reference.pooler_output if hasattr(reference, "pooler_output") else reference
    torch.testing.assert_close(model.encode_image_global(pixels.detach()[:, :, :, :image_size]),
                               F.normalize(reference, dim=-1), rtol=1e-5, atol=1e-6)


def test_region_activation_checkpointing_keeps_losses_and_gradients(tiny_code_model, tiny_tokenizer):
    model = tiny_code_model.train()
    model.config.gumbel_noise = False  # the same hard masks in both runs
    with torch.no_grad():
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.1)
    batch = make_batch(tiny_tokenizer)
    runs = []
    for checkpointing in (False, True):
        model.config.region_activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        output = model(**batch, return_loss=True)
        output.loss.backward()
        runs.append((output.loss_hcl.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    assert runs[1][1].keys() == runs[0][1].keys()
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
