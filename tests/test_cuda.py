"""CUDA against the CPU: the training forward and backward, window masks, whole-image scores, PAMR, the segmenter
and the evaluation loop give the CPU's results within float32 rounding (Gumbel noise off), bf16 within a stated
tolerance. Deselected in CI (-m "not cuda"); benchmarks/gpu.py runs them on a GPU machine.

Tolerances (float32, TF32 off): masks and scores 1e-4 absolute, losses 1e-4 relative, each gradient 1e-4 of its
largest magnitude. A bf16 model's scores: 0.05 absolute of the float32 CPU's, as on the CPU (test_inference).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_CODE_OVERRIDES, device_under_test, training_batch
from PIL import Image

from modeling_code import CoDeModel
from modeling_code.evaluation.evaluator import evaluate_benchmark
from modeling_code.evaluation.segmentation_datasets import SegmentationSample, SegmentationSource
from modeling_code.evaluation.specs import custom_benchmark
from modeling_code.image_processing_code import CoDeImageProcessor
from modeling_code.inference import encode_vocabulary, segment_images, window_memory_budget
from modeling_code.pamr import pamr
from modeling_code.predict.segmenter import CoDeSegmenter
from modeling_code.processing_code import CoDeProcessor

pytestmark = pytest.mark.cuda

MASKS = 1e-4
LOSSES = 1e-4
GRADIENTS = 1e-4
BF16_SCORES = 0.05


@pytest.fixture(scope="module")
def device():
    return device_under_test()


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Compare in true float32: TF32 matrix products (10-bit mantissas) move results by about 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_model(tiny_clip_dir, tiny_tokenizer):
    """The tiny model with its decoder gates open and 32-pixel windows (4x4 patches), Gumbel noise off."""
    torch.manual_seed(0)
    model = CoDeModel.from_clip(str(tiny_clip_dir), tokenizer=tiny_tokenizer, gumbel_noise=False, window_size=32,
                                window_stride=16, **TINY_CODE_OVERRIDES)
    with torch.no_grad():
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    return CoDeProcessor(CoDeImageProcessor(eval_short_side=32, eval_max_long_side=96), tiny_tokenizer)


def random_images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, *size, generator=generator) for size in ((45, 70), (32, 32), (29, 50), (45, 70))]


# ------------------------------------------------------------------------------------------------ training
def _losses_and_gradients(model: CoDeModel, batch: dict[str, torch.Tensor], device: torch.device):
    model = copy.deepcopy(model).to(device).train()
    output = model(**{name: value.to(device) for name, value in batch.items()})
    output.loss.backward()
    losses = {name: value.detach().cpu() for name, value in output.items() if name.startswith("loss")}
    gradients = {name: parameter.grad.cpu() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    return losses, gradients


def test_training_forward_and_backward_match_the_cpu(cpu_model, tiny_tokenizer, device):
    batch = training_batch(tiny_tokenizer, batch_size=3)
    cpu_losses, cpu_gradients = _losses_and_gradients(cpu_model, batch, torch.device("cpu"))
    losses, gradients = _losses_and_gradients(cpu_model, batch, device)
    for name, expected in cpu_losses.items():
        torch.testing.assert_close(losses[name], expected, rtol=LOSSES, atol=1e-7, msg=name)
    assert gradients.keys() == cpu_gradients.keys() and len(gradients) > 20
    for name, expected in cpu_gradients.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(gradients[name], expected, rtol=0, atol=GRADIENTS * max(scale, 1e-12), msg=name)


# ------------------------------------------------------------------------------------------------ inference
def test_window_masks_match_the_cpu(cpu_model, processor, device):
    vocabulary = encode_vocabulary(cpu_model, processor, ["cat", "sofa", "dog"], with_kp_embeddings=True)
    pixels = torch.randn(5, 3, 40, 24, generator=torch.Generator().manual_seed(1))
    expected = cpu_model.segment_window(pixels, vocabulary.class_embeddings, vocabulary.kp_class_embeddings)
    model = copy.deepcopy(cpu_model).to(device)
    outputs = model.segment_window(pixels.to(device), vocabulary.class_embeddings.to(device),
                                   vocabulary.kp_class_embeddings.to(device))
    torch.testing.assert_close(outputs.masks.cpu(), expected.masks, rtol=0, atol=MASKS)
    torch.testing.assert_close(outputs.kp_masks.cpu(), expected.kp_masks, rtol=0, atol=MASKS)


def test_vocabulary_and_whole_image_scores_match_the_cpu(cpu_model, processor, device):
    names = ["cat", "background", "sofa", "dog"]
    expected = segment_images(cpu_model, random_images(), encode_vocabulary(cpu_model, processor, names)).logits
    model = copy.deepcopy(cpu_model).to(device)
    vocabulary = encode_vocabulary(model, processor, names)
    scores = segment_images(model, [image.to(device) for image in random_images()], vocabulary).logits
    for actual, reference in zip(scores, expected):
        assert actual.device.type == device.type
        torch.testing.assert_close(actual.cpu(), reference, rtol=0, atol=MASKS)

    bf16_model = copy.deepcopy(cpu_model).to(device, torch.bfloat16)
    bf16_scores = segment_images(bf16_model, random_images(), encode_vocabulary(bf16_model, processor, names)).logits
    for actual, reference in zip(bf16_scores, expected):
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual.cpu(), reference, rtol=0, atol=BF16_SCORES)


def test_pamr_matches_the_cpu(device):
    generator = torch.Generator().manual_seed(2)
    image = torch.randn(3, 3, 64, 80, generator=generator)
    masks = torch.rand(3, 5, 32, 40, generator=generator)
    expected = pamr(image, masks)
    refined = pamr(image.to(device), masks.to(device))
    torch.testing.assert_close(refined.cpu(), expected, rtol=0, atol=1e-5)
    bf16_refined = pamr(image.to(device, torch.bfloat16), masks.to(device, torch.bfloat16))
    assert bf16_refined.dtype == torch.float32  # refined in float32 whatever the masks' dtype
    torch.testing.assert_close(bf16_refined.cpu(), expected, rtol=0, atol=2e-2)


def test_the_memory_budget_is_a_share_of_the_free_device_memory(device):
    if device.type != "cuda":
        assert window_memory_budget(device) > 0
        return
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert 0 < window_memory_budget(device) <= free + cached <= total


# ------------------------------------------------------------------------------------------------ segmenter, evaluation
class RandomImages(SegmentationSource):
    """Random pictures of varied sizes with random labels of three classes."""

    raw_label_ids = False

    def __init__(self, num_items: int) -> None:
        super().__init__(num_items)

    def _load(self, position: int) -> SegmentationSample:
        rng = np.random.default_rng(position)
        height, width = 40 + 5 * position, 70 - 4 * position
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        return SegmentationSample(image, rng.integers(0, 3, (height, width)), f"random_{position}")

    def describe(self) -> str:
        return "random images"


def test_segmenter_and_evaluation_on_the_device_match_the_cpu(tiny_model_dir, device):
    names = ["cat", "sofa", "background"]
    cpu_segmenter = CoDeSegmenter.from_pretrained(tiny_model_dir)
    segmenter = CoDeSegmenter.from_pretrained(tiny_model_dir, device=device)
    images = [RandomImages(6)[index].image for index in range(6)]
    for result, expected in zip(segmenter(images, names), cpu_segmenter(images, names)):
        np.testing.assert_allclose(result.scores, expected.scores, rtol=0, atol=MASKS)

    spec = custom_benchmark(names)
    expected = evaluate_benchmark(cpu_segmenter.predict, spec, RandomImages(6), progress=False)
    result = evaluate_benchmark(segmenter.predict, spec, RandomImages(6), progress=False, images_per_call=4,
                                num_workers=2)
    assert result.num_images == expected.num_images == 6
    # label maps may differ only where two classes score within float rounding of each other
    difference = np.abs(result.confusion.matrix - expected.confusion.matrix).sum()
    assert difference <= 1e-3 * expected.confusion.matrix.sum()


def test_a_bf16_segmenter_on_the_device_is_close_to_float32(tiny_model_dir, device):
    names = ["cat", "sofa", "background"]
    images = [RandomImages(3)[index].image for index in range(3)]
    expected = CoDeSegmenter.from_pretrained(tiny_model_dir)(images, names)
    results = CoDeSegmenter.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, device=device)(images, names)
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result.scores, reference.scores, rtol=0, atol=BF16_SCORES)
        assert F.mse_loss(torch.from_numpy(result.scores), torch.from_numpy(reference.scores)) < 1e-3
