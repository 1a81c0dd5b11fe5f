"""Whole-image inference: windows, padding, averaging, PAMR and KP mix, background, vocabularies, fast vs reference."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CODE_OVERRIDES
from reference_implementations import pamr_reference, segment_images_reference, segment_window_reference

from modeling_code import CoDeModel
from modeling_code import inference as inference_module
from modeling_code.configuration_code import InferenceProtocol
from modeling_code.image_processing_code import CoDeImageProcessor
from modeling_code.inference import (
    DEFAULT_WINDOW_BATCH_SIZE,
    VocabularyEmbeddings,
    clean_class_names,
    encode_vocabulary,
    pad_to_multiple,
    parse_class_list,
    segment_images,
    segment_window_scores,
    sliding_windows,
    window_starts,
)
from modeling_code.processing_code import CoDeProcessor

WINDOW, STRIDE = 32, 16  # the tiny CLIP has 8-pixel patches: 32-pixel windows are 4x4 patches


@pytest.fixture(scope="module")
def model(tiny_clip_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = CoDeModel.from_clip(
        str(tiny_clip_dir),
        tokenizer=tiny_tokenizer,
        window_size=WINDOW,
        window_stride=STRIDE,
        **TINY_CODE_OVERRIDES,
    ).eval()
    with (
        torch.no_grad()
    ):  # open the decoder gates (0 at initialisation) so the fast and reference decoders differ
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.7)
    return model


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return CoDeProcessor(CoDeImageProcessor(), tiny_tokenizer, protocol=InferenceProtocol(short_side=32, max_long_side=96))


@pytest.fixture(scope="module")
def vocabulary(model, processor):
    return encode_vocabulary(model, processor, ["cat", "sofa", "dog"])


def scores_of(model, pixel_values, vocabulary, window_batch_size=DEFAULT_WINDOW_BATCH_SIZE, **overrides):
    """Whole-image scores through the model's forward, with protocol overrides (``use_pamr=False``, ...)."""
    protocol = model.config.inference_protocol.replace(**overrides)
    outputs = model(
        pixel_values=pixel_values, **vocabulary.model_inputs(), protocol=protocol, window_batch_size=window_batch_size
    )
    return outputs.scores


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- windows, padding
@pytest.mark.parametrize(
    ("size", "window", "stride", "expected"),
    [
        (448, 448, 224, [0]),
        (300, 448, 224, [0]),
        (449, 448, 224, [0, 1]),
        (597, 448, 224, [0, 149]),
        (896, 448, 224, [0, 224, 448]),
        (1000, 448, 224, [0, 224, 448, 552]),
    ],
)
def test_window_starts_follow_the_protocol(size, window, stride, expected):
    starts = window_starts(size, window, stride)
    assert starts == expected
    covered = np.zeros(size, dtype=bool)
    for start in starts:
        covered[start : min(start + window, size)] = True
    assert covered.all()
    assert min(starts[-1] + window, size) == size


def test_sliding_windows_of_an_image_smaller_than_the_window():
    assert sliding_windows(20, 50, 32, 16) == [(0, 0, 20, 32), (0, 16, 20, 32), (0, 18, 20, 32)]
    assert sliding_windows(10, 12, 32, 16) == [(0, 0, 10, 12)]


def test_pad_to_multiple_splits_the_padding_with_the_extra_on_bottom_right():
    image = random_image(61, 45, seed=0)
    padded, pads = pad_to_multiple(image, 8)
    assert pads == (1, 2, 1, 2) and padded.shape == (3, 64, 48)
    torch.testing.assert_close(padded[:, 1:62, 1:46], image)
    outside = torch.ones(64, 48, dtype=torch.bool)
    outside[1:62, 1:46] = False
    assert (padded[:, outside] == 0).all()
    unpadded, no_pads = pad_to_multiple(image[:, :56, :40], 8)
    assert no_pads == (0, 0, 0, 0) and unpadded.shape == (3, 56, 40)


# ---------------------------------------------------------------------------------------- one window, exactly
def reference_window(model, image: torch.Tensor, vocabulary, pads, padded_size) -> torch.Tensor:
    """docs/method.md#inference-protocol written out with the reference masker and PAMR: [N, H, W]."""
    config = model.config
    top, bottom, left, right = pads
    padded = F.pad(image[None], (left, right, top, bottom))
    assert padded.shape[-2:] == padded_size
    out = segment_window_reference(model, padded, vocabulary.class_embeddings, vocabulary.kp_class_embeddings)
    masks = pamr_reference(padded, out.masks, config.pamr_iterations, config.pamr_dilations)
    kp = F.interpolate(out.kp_masks, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    mixed = config.kp_weight * kp + (1 - config.kp_weight) * masks
    full = F.interpolate(mixed, size=padded_size, mode="bilinear", align_corners=False)[0]
    return full[:, top : padded_size[0] - bottom, left : padded_size[1] - right]


@pytest.mark.parametrize(
    ("size", "pads", "padded_size"), [((32, 32), (0, 0, 0, 0), (32, 32)), ((29, 21), (1, 2, 1, 2), (32, 24))]
)
def test_an_image_that_fits_one_window_is_one_pass_with_padding_cropped(
    model, vocabulary, size, pads, padded_size
):
    image = random_image(*size, seed=1)
    expected = reference_window(model, image, vocabulary, pads, padded_size)
    whole = scores_of(model, image[None], vocabulary)[0]
    assert whole.shape == (3, *size)
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        segment_window_scores(model, image[None], vocabulary)[0], expected, atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------------------- averaging of overlaps
def test_overlapping_windows_are_averaged(model, vocabulary, monkeypatch):
    calls = []

    def window_index_as_score(model, padded, *embeddings_and_protocol):
        calls.append(padded.shape)
        return torch.full((1, 3, 2, 2), float(len(calls) - 1))  # window k scores k everywhere

    monkeypatch.setattr(inference_module, "_refined_masks", window_index_as_score)
    height, width = 45, 70
    image = random_image(height, width, seed=2)[None]
    scores = scores_of(model, image, vocabulary, window_batch_size=1)[0]
    windows = sliding_windows(height, width, WINDOW, STRIDE)
    assert len(calls) == len(windows) == 2 * 4
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for index, (top, left, window_height, window_width) in enumerate(windows):
        total[top : top + window_height, left : left + window_width] += index
        count[top : top + window_height, left : left + window_width] += 1
    for channel in range(3):
        np.testing.assert_allclose(scores[channel].numpy(), total / count, atol=1e-5)


def test_windows_are_placed_and_cropped_exactly(model, vocabulary, monkeypatch):
    def padded_image_as_score(model, padded, *embeddings_and_protocol):
        return padded[:, :1].expand(-1, 3, -1, -1)  # already at the padded size: the resize is the identity

    monkeypatch.setattr(inference_module, "_refined_masks", padded_image_as_score)
    images = [random_image(45, 70, seed=3), random_image(21, 37, seed=4)]
    for window_batch_size in (1, 3):
        maps = scores_of(model, images, vocabulary, window_batch_size=window_batch_size)
        for image, scores in zip(images, maps):
            torch.testing.assert_close(scores, image[:1].expand(3, -1, -1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- fast vs reference
def test_fast_path_equals_the_reference_on_odd_sizes(model, processor):
    vocabulary = encode_vocabulary(model, processor, ["cat", "background", "sofa"])
    images = [random_image(45, 70, seed=5), random_image(33, 33, seed=6), random_image(20, 50, seed=7)]
    fast = scores_of(model, images, vocabulary, window_batch_size=3)
    reference = segment_images_reference(model, images, vocabulary)
    assert isinstance(fast, list) and [tuple(s.shape) for s in fast] == [
        (3, 45, 70),
        (3, 33, 33),
        (3, 20, 50),
    ]
    for fast_scores, reference_scores in zip(fast, reference):
        torch.testing.assert_close(fast_scores, reference_scores, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- KP mix, PAMR order
def test_kp_weight_mixes_linearly_and_only_the_masker_masks_are_refined(model, vocabulary):
    image = random_image(40, 52, seed=8)[None]

    def run(kp_weight, use_pamr):
        return scores_of(model, image, vocabulary, kp_weight=kp_weight, use_pamr=use_pamr)[0]

    for use_pamr in (False, True):
        masker_only, kp_only, mixed = run(0.0, use_pamr), run(1.0, use_pamr), run(0.3, use_pamr)
        torch.testing.assert_close(mixed, 0.3 * kp_only + 0.7 * masker_only, atol=1e-6, rtol=0)
    # PAMR refines the masker's masks before the mix, never the KP scores.
    torch.testing.assert_close(run(1.0, True), run(1.0, False))
    assert not torch.allclose(run(0.0, True), run(0.0, False))


def test_kp_only_scores_are_the_upsampled_kp_branch(model, vocabulary):
    image = random_image(32, 32, seed=9)[None]
    out = model.segment_window(image, vocabulary.class_embeddings, vocabulary.kp_class_embeddings)
    kp = F.interpolate(out.kp_masks, size=out.masks.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.interpolate(kp, size=(32, 32), mode="bilinear", align_corners=False)
    kp_only = model.config.inference_protocol.replace(kp_weight=1.0)
    torch.testing.assert_close(segment_window_scores(model, image, vocabulary, kp_only), expected)


# ---------------------------------------------------------------------------------------- background
def test_background_is_a_constant_map_at_its_position(model, processor, vocabulary):
    with_background = encode_vocabulary(model, processor, ["cat", "Background", "sofa", "dog"])
    assert with_background.background_index == 1
    assert with_background.text_class_names == ("cat", "sofa", "dog")
    torch.testing.assert_close(with_background.class_embeddings, vocabulary.class_embeddings)
    image = random_image(40, 40, seed=10)[None]
    plain_scores = scores_of(model, image, vocabulary)[0]
    scores = scores_of(model, image, with_background, background_threshold=0.55)[0]
    assert scores.shape == (4, 40, 40)
    torch.testing.assert_close(scores[1], torch.full((40, 40), 0.55))
    torch.testing.assert_close(scores[[0, 2, 3]], plain_scores)
    labels = scores.argmax(0)
    assert torch.equal(labels == 1, plain_scores.max(0).values < 0.55)


def test_background_threshold_extremes(model, processor):
    vocabulary = encode_vocabulary(model, processor, ["background", "cat", "sofa"])
    image = random_image(24, 30, seed=11)[None]
    image_processor = CoDeImageProcessor()
    for threshold, all_background in ((1.0, True), (0.0, False)):
        protocol = model.config.inference_protocol.replace(background_threshold=threshold)
        outputs = model(pixel_values=image, **vocabulary.model_inputs(), protocol=protocol)
        labels = image_processor.post_process_semantic_segmentation(outputs)[0]
        assert bool((labels == 0).all()) is all_background
        assert bool((labels == 0).any()) is all_background


# ---------------------------------------------------------------------------------------- post-processing, dtypes
def test_post_processing_returns_label_maps_at_the_original_sizes(model, processor, vocabulary):
    from PIL import Image

    images = [Image.new("RGB", (50, 30), (200, 10, 10)), Image.new("RGB", (41, 77), (10, 200, 10))]
    inputs = processor(images=images)
    outputs = model(**inputs, **vocabulary.model_inputs())
    assert [tuple(s.shape) for s in outputs.scores] == [(3, 32, 53), (3, 60, 32)]
    assert outputs.original_sizes == [(30, 50), (77, 41)]
    labels = processor.post_process_semantic_segmentation(outputs)  # default: the sizes the processor saw
    assert [tuple(label.shape) for label in labels] == [(30, 50), (77, 41)]
    assert all(label.dtype == torch.long and label.min() >= 0 and label.max() < 3 for label in labels)
    same_size = scores_of(model, torch.stack([random_image(32, 40, 0), random_image(32, 40, 1)]), vocabulary)
    assert isinstance(same_size, torch.Tensor) and same_size.shape == (2, 3, 32, 40)


def test_bfloat16_model_gives_float32_scores_close_to_float32(model, processor, vocabulary):
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_vocabulary = encode_vocabulary(bf16_model, processor, ["cat", "sofa", "dog"])
    assert bf16_vocabulary.class_embeddings.dtype == torch.bfloat16
    image = random_image(40, 52, seed=12)[None]
    scores = scores_of(bf16_model, image, bf16_vocabulary)[0]
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, scores_of(model, image, vocabulary)[0], atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------- vocabulary and errors
def test_vocabulary_without_kp_embeddings(model, processor):
    vocabulary = encode_vocabulary(model, processor, ["cat"], with_kp_embeddings=False)
    assert vocabulary.kp_class_embeddings is None
    assert scores_of(model, random_image(16, 16, 0)[None], vocabulary, kp_weight=0.0).shape == (
        1,
        1,
        16,
        16,
    )
    with pytest.raises(ValueError, match="with_kp_embeddings=True"):
        model(pixel_values=random_image(16, 16, 0)[None], **vocabulary.model_inputs())


def test_class_list_parsing_and_cleaning(caplog):
    assert parse_class_list(" cat,  sofa ,, background ") == ["cat", "sofa", "background"]
    with caplog.at_level(logging.WARNING):
        names, background_index = clean_class_names(["cat", "  big   dog ", "Cat", "big dog", "background"])
    assert names == ["cat", "big dog", "background"] and background_index == 2
    assert "Duplicate class names" in caplog.text and "'Cat'" in caplog.text


def test_class_lists_split_at_commas_and_line_breaks():
    assert parse_class_list("cat\nsofa\ndog") == ["cat", "sofa", "dog"]
    assert parse_class_list("cat,\r\nsofa\n\n big dog ,\rtree") == ["cat", "sofa", "big dog", "tree"]


def test_a_class_name_holding_a_line_break_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"Class name 1 \('cat\\nsofa'\) holds a line break"):
        clean_class_names(["dog", "cat\nsofa"])
    with pytest.raises(ValueError, match="line break"):
        clean_class_names(["cat\r"])


@pytest.mark.parametrize(
    ("class_names", "error", "message"),
    [
        ([], ValueError, "No class names"),
        ("cat, sofa", TypeError, "not one string"),
        (["cat", 3], TypeError, "must be strings"),
        (["cat", "  "], ValueError, "is empty"),
        (["background"], ValueError, "background' alone"),
    ],
)
def test_bad_class_lists_are_named(model, processor, class_names, error, message):
    with pytest.raises(error, match=message):
        encode_vocabulary(model, processor, class_names)


def test_names_longer_than_the_text_context_are_truncated_with_a_warning(model, processor, caplog):
    long_name = " ".join(["red"] * 70)  # fits 77 positions alone, not 77 - 16 prompt positions nor a template
    with caplog.at_level(logging.WARNING):
        vocabulary = encode_vocabulary(model, processor, ["cat", long_name])
    assert "prompted class encoder (61 token positions" in caplog.text
    assert "template prompts (77 token positions" in caplog.text
    assert torch.isfinite(vocabulary.class_embeddings).all() and vocabulary.class_embeddings.shape[0] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encode_vocabulary(model, processor, ["cat", "sofa"])
    assert caplog.text == ""


def test_bad_inference_arguments_are_named(model, vocabulary):
    image = random_image(16, 16, 0)[None]
    with pytest.raises(ValueError, match="leaves gaps"):
        scores_of(model, image, vocabulary, window_size=16, window_stride=32)
    with pytest.raises(ValueError, match="background_threshold"):
        scores_of(model, image, vocabulary, background_threshold=1.5)
    with pytest.raises(ValueError, match="kp_weight"):
        scores_of(model, image, vocabulary, kp_weight=-0.1)
    with pytest.raises(TypeError, match="Unknown inference setting"):
        scores_of(model, image, vocabulary, windows=3)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        scores_of(model, [torch.zeros(1, 16, 16)], vocabulary)
    with pytest.raises(ValueError, match="No images"):
        scores_of(model, [], vocabulary)
    with pytest.raises(ValueError, match="window_batch_size"):
        scores_of(model, image, vocabulary, window_batch_size=0)


def test_vocabulary_embeddings_are_plain_data(vocabulary):
    assert isinstance(vocabulary, VocabularyEmbeddings)
    assert vocabulary.class_names == ("cat", "sofa", "dog") and vocabulary.background_index is None
    assert vocabulary.num_classes == 3 and vocabulary.template_set == "custom"
    assert vocabulary.class_embeddings.shape == vocabulary.kp_class_embeddings.shape == (3, 32)
    torch.testing.assert_close(vocabulary.class_embeddings.norm(dim=-1), torch.ones(3))


def test_the_0_1_entry_points_still_work_with_a_warning(model, vocabulary):
    image = random_image(40, 52, seed=13)[None]
    expected = scores_of(model, image, vocabulary, use_pamr=False, kp_weight=0.5)
    with pytest.warns(FutureWarning, match="segment_images is deprecated"):
        outputs = segment_images(model, image, vocabulary, use_pamr=False, kp_weight=0.5)
    with pytest.warns(FutureWarning, match=r"\.logits is deprecated"):
        torch.testing.assert_close(outputs.logits, expected)
    with pytest.warns(FutureWarning, match=r"segment_window_scores\(kp_weight=...\) is deprecated"):
        window = segment_window_scores(model, image[..., :32, :32], vocabulary, kp_weight=1.0)
    kp_only = model.config.inference_protocol.replace(kp_weight=1.0)
    torch.testing.assert_close(window, segment_window_scores(model, image[..., :32, :32], vocabulary, kp_only))
