"""What inference and evaluation choose per device, tested on the CPU: the CUDA choices (the masker's whole batch
in large bands, window batches under a memory budget, several images per call read by data workers) give the
CPU's results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference_implementations import segment_window_reference

import modeling_code.inference as inference
import modeling_code.modeling_code
from modeling_code import CoDeConfig
from modeling_code.evaluation.evaluator import evaluate_benchmark
from modeling_code.evaluation.runner import (
    ACCELERATOR_DATA_WORKERS,
    ACCELERATOR_IMAGES_PER_CALL,
    CPU_DATA_WORKERS,
    CPU_IMAGES_PER_CALL,
    sample_loading,
)
from modeling_code.evaluation.segmentation_datasets import SegmentationSample, SegmentationSource
from modeling_code.evaluation.specs import custom_benchmark
from modeling_code.image_processing_code import CoDeImageProcessor
from modeling_code.inference import (
    MAX_WINDOWS_PER_CALL,
    encode_vocabulary,
    window_memory_bytes,
    windows_per_call,
)
from modeling_code.masker import ACCELERATOR_BAND_TAP_BYTES, BAND_TAP_BYTES, inference_band_plan
from modeling_code.predict.segmenter import CoDeSegmenter
from modeling_code.processing_code import CoDeProcessor


@pytest.fixture
def open_gates_model(tiny_code_model):
    """The tiny model with its decoder gates open (0 at initialisation, where the decoder only upsamples)."""
    with torch.no_grad():
        for block in tiny_code_model.masker.decoder.blocks:
            block.gate.fill_(0.6)
    return tiny_code_model.eval()


def test_the_cpu_bands_window_by_window_and_accelerators_take_the_whole_batch():
    assert inference_band_plan("cpu") == (True, BAND_TAP_BYTES)
    assert inference_band_plan("cuda") == inference_band_plan("mps") == (False, ACCELERATOR_BAND_TAP_BYTES)


@pytest.mark.parametrize("max_tap_bytes", [ACCELERATOR_BAND_TAP_BYTES, 3 * 9 * 48 * 4 * 6])  # one band; 1-row bands
def test_window_masks_of_the_whole_batch_in_bands_equal_the_reference(open_gates_model, max_tap_bytes, monkeypatch):
    model = open_gates_model
    monkeypatch.setattr(modeling_code.modeling_code, "inference_band_plan", lambda device_type: (False, max_tap_bytes))
    seen = []
    bands = model.masker.bands
    monkeypatch.setattr(model.masker, "bands", lambda hidden, *args: seen.append(hidden.shape[0]) or bands(hidden, *args))
    pixels = torch.randn(3, 3, 40, 24)
    prompted = F.normalize(torch.randn(4, 32), dim=-1)
    masks = model.segment_window(pixels, prompted).masks
    assert seen == [3]  # one pass over all windows
    torch.testing.assert_close(masks, segment_window_reference(model, pixels, prompted).masks, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ window batches
def test_the_cpu_budget_holds_four_float32_vit_b16_windows():
    config = CoDeConfig()
    cpu = torch.device("cpu")
    assert windows_per_call(config, torch.float32, cpu, 448, 448, 20) == 4
    assert windows_per_call(config, torch.bfloat16, cpu, 448, 448, 20) > 4
    assert windows_per_call(config, torch.float32, cpu, 224, 448, 20) > 4
    # where the masker takes all windows at once, its full-resolution maps count per window
    cpu_bytes, cuda_bytes = (window_memory_bytes(config, 448, 448, 20, torch.float32, device) for device in ("cpu", "cuda"))
    assert cuda_bytes > 2 * cpu_bytes
    assert windows_per_call(config, torch.float32, cpu, 448, 448, 20, budget=1) == 1
    assert windows_per_call(config, torch.float32, cpu, 448, 448, 20, budget=2**50) == MAX_WINDOWS_PER_CALL


def test_window_batches_follow_the_memory_budget_and_keep_the_scores(open_gates_model, tiny_tokenizer, monkeypatch):
    model = open_gates_model
    processor = CoDeProcessor(CoDeImageProcessor(), tiny_tokenizer)
    vocabulary = encode_vocabulary(model, processor, ["cat", "background", "sofa"])
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 45, 70, generator=generator), torch.randn(3, 40, 40, generator=generator),
              torch.randn(3, 20, 50, generator=generator)]
    protocol = model.config.inference_protocol.replace(window_size=32, window_stride=16)

    def segment(**options):
        return model(pixel_values=images, **vocabulary.model_inputs(), protocol=protocol, **options).scores

    one_at_a_time = segment(window_batch_size=1)

    batch_sizes = []
    refined = inference._refined_masks
    monkeypatch.setattr(inference, "_refined_masks",
                        lambda model, padded, *args: batch_sizes.append(len(padded)) or refined(model, padded, *args))
    per_window = window_memory_bytes(model.config, 32, 32, 2, model.dtype, "cpu")
    monkeypatch.setattr(inference, "window_memory_budget", lambda device: 3 * per_window)
    budgeted = segment()
    # 12 windows of 32x32 (8 of the first image, 4 of the second) in threes, then the third image's 3 of 20x32
    assert batch_sizes == [3, 3, 3, 3, 3]
    batch_sizes.clear()
    monkeypatch.undo()  # the CPU's own budget: every window of a size in one call
    monkeypatch.setattr(inference, "_refined_masks",
                        lambda model, padded, *args: batch_sizes.append(len(padded)) or refined(model, padded, *args))
    by_default = segment()
    assert batch_sizes == [12, 3]
    for single, *batched in zip(one_at_a_time, budgeted, by_default):
        for scores in batched:
            torch.testing.assert_close(scores, single, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ evaluation
class InMemorySource(SegmentationSource):
    """Random images of varied sizes, each labelled by its own colour-independent stripe pattern."""

    raw_label_ids = False

    def __init__(self, num_items: int) -> None:
        super().__init__(num_items)

    def _load(self, position: int) -> SegmentationSample:
        rng = np.random.default_rng(position)
        height, width = 20 + 3 * position, 30 - position
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        label = rng.integers(0, 3, (height, width))
        return SegmentationSample(image, label, f"sample_{position}")

    def describe(self) -> str:
        return "in memory"


def thresholds_of_red(images, class_names):
    """A deterministic stand-in model: the class of each pixel from its red value."""
    return [np.asarray(image)[..., 0].astype(np.int64) * len(class_names) // 256 for image in images]


def test_evaluation_by_several_images_and_workers_counts_the_same():
    spec = custom_benchmark(["a", "b", "c"])
    calls = []

    def one_image(image, class_names):
        calls.append(1)
        return thresholds_of_red([image], class_names)[0]

    def several_images(images, class_names):
        calls.append(len(images))
        return thresholds_of_red(images, class_names)

    plain = evaluate_benchmark(one_image, spec, InMemorySource(7), progress=False, num_visualize=3)
    assert calls == [1] * 7
    calls.clear()
    batched = evaluate_benchmark(several_images, spec, InMemorySource(7), progress=False, num_visualize=3,
                                 images_per_call=3, num_workers=2)
    assert calls == [3, 3, 1]
    np.testing.assert_array_equal(batched.confusion.matrix, plain.confusion.matrix)
    assert batched.num_images == 7 and [row.name for row in batched.overlays] == ["sample_0", "sample_1", "sample_2"]
    with pytest.raises(ValueError, match="returned 2 label maps for 3 images"):
        evaluate_benchmark(lambda images, names: thresholds_of_red(images, names)[:2], spec, InMemorySource(3),
                           progress=False, images_per_call=3)


def test_sample_loading_follows_the_device():
    assert sample_loading("cpu") == (CPU_IMAGES_PER_CALL, CPU_DATA_WORKERS) == (1, 0)
    assert sample_loading(torch.device("cuda", 1))[0] == ACCELERATOR_IMAGES_PER_CALL
    assert 1 <= sample_loading("cuda")[1] <= ACCELERATOR_DATA_WORKERS
    assert sample_loading("cuda", images_per_call=2, num_workers=0) == (2, 0)


def test_the_segmenter_predicts_a_list_of_images_as_it_predicts_each(tiny_model_dir):
    segmenter = CoDeSegmenter.from_pretrained(tiny_model_dir)
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40 + 9 * seed, 70, 3), dtype=np.uint8))
              for seed in range(3)]
    together = segmenter.predict(images, ["cat", "sofa", "background"])
    assert isinstance(together, list) and len(together) == 3
    for image, labels in zip(images, together):
        np.testing.assert_array_equal(labels, segmenter.predict(image, ["cat", "sofa", "background"]))
