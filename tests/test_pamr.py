"""PAMR: the fast path against the literal reference, and its defining properties against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_implementations import pamr_reference

from modeling_code.pamr import (
    NEIGHBOUR_STEPS,
    _refine_with_sparse_matrix,
    _refine_with_views,
    affinity_matrix,
    pamr,
    pamr_affinity,
)

DILATIONS = (1, 2, 4, 8, 12, 24)


def neighbour_offsets(dilations=DILATIONS) -> list[tuple[int, int]]:
    """(row, column) offset of neighbour k, in the order of ``pamr_affinity``'s dim 1."""
    return [(row * d, column * d) for d in dilations for row, column in NEIGHBOUR_STEPS]


def clamped(array: np.ndarray, y: int, x: int) -> np.ndarray:
    """array[..., y, x] with coordinates clamped to the border (replicate padding)."""
    return array[..., min(max(y, 0), array.shape[-2] - 1), min(max(x, 0), array.shape[-1] - 1)]


@pytest.mark.parametrize(
    ("image_size", "mask_size"),
    [((37, 53), (13, 29)), ((5, 7), (3, 2)), ((64, 48), (16, 12))],
)
def test_fast_path_equals_reference(image_size, mask_size):
    generator = torch.Generator().manual_seed(sum(image_size) + sum(mask_size))
    image = torch.randn(2, 3, *image_size, generator=generator)
    masks = torch.rand(2, 4, *mask_size, generator=generator)
    fast = pamr(image, masks, iterations=10, dilations=DILATIONS)
    reference = pamr_reference(image, masks, iterations=10, dilations=DILATIONS)
    assert fast.shape == masks.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_both_refinement_paths_equal_the_reference():
    """The CPU refines with sparse matrix products, other devices with multiply-adds of views: both on the CPU."""
    generator = torch.Generator().manual_seed(6)
    image = torch.randn(2, 3, 19, 26, generator=generator)
    masks = torch.rand(2, 5, 19, 26, generator=generator)
    reference = pamr_reference(image, masks, iterations=10, dilations=DILATIONS)
    affinity = pamr_affinity(image, DILATIONS)
    for refine in (_refine_with_sparse_matrix, _refine_with_views):
        torch.testing.assert_close(refine(masks, affinity, DILATIONS, 10), reference, atol=1e-5, rtol=0)


def test_affinity_matrix_is_a_valid_block_diagonal_csr_matrix_of_the_weights():
    generator = torch.Generator().manual_seed(7)
    image = torch.randn(2, 3, 9, 13, generator=generator)  # dilations beyond the map: many clamped neighbours
    affinity = pamr_affinity(image, DILATIONS)
    matrix = affinity_matrix(affinity, DILATIONS)
    # sorted, distinct columns in every row (raises otherwise)
    torch.sparse_csr_tensor(
        matrix.crow_indices(), matrix.col_indices(), matrix.values(), matrix.shape, check_invariants=True
    )
    dense = matrix.to_dense().view(2, 9 * 13, 2, 9 * 13)
    torch.testing.assert_close(dense[0, :, 1], torch.zeros(9 * 13, 9 * 13))
    torch.testing.assert_close(dense[1, :, 0], torch.zeros(9 * 13, 9 * 13))
    offsets = neighbour_offsets()
    for window in range(2):
        expected = torch.zeros(9 * 13, 9 * 13)
        for y in range(9):
            for x in range(13):
                for k, (dy, dx) in enumerate(offsets):
                    column = min(max(y + dy, 0), 8) * 13 + min(max(x + dx, 0), 12)
                    expected[y * 13 + x, column] += affinity[window, k, y, x]
        torch.testing.assert_close(dense[window, :, window], expected)


def test_constant_masks_stay_constant():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 20, 24, generator=generator)
    levels = torch.tensor([0.0, 0.3, 1.0])[None, :, None, None]
    masks = levels.expand(2, 3, 20, 24).clone()
    for refine in (pamr, pamr_reference):
        torch.testing.assert_close(refine(image, masks), masks, atol=1e-5, rtol=0)


def test_affinity_is_a_distribution_over_48_neighbours():
    image = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    affinity = pamr_affinity(image, DILATIONS)
    assert affinity.shape == (2, 48, 11, 9)
    assert (affinity >= 0).all()
    torch.testing.assert_close(affinity.sum(1), torch.ones(2, 11, 9))


def test_affinity_matches_the_spec_formula_at_single_pixels():
    image = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    affinity = pamr_affinity(image, DILATIONS)[0].numpy()
    pixels = image[0].double().numpy()
    for y, x in [(0, 0), (15, 15), (29, 3), (7, 28)]:
        centre = pixels[:, y, x]
        neighbours = np.stack(
            [clamped(pixels, y + dy, x + dx) for dy, dx in neighbour_offsets()], 1
        )  # [3, 48]
        # 54 values: every dilation's 3x3 neighbourhood, centre included once per dilation.
        pooled = np.concatenate([neighbours, np.repeat(centre[:, None], len(DILATIONS), 1)], 1)
        std = pooled.std(axis=1, ddof=1)
        logits = (-np.abs(centre[:, None] - neighbours) / (1e-8 + 0.1 * std[:, None])).mean(0)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(affinity[:, y, x], expected, atol=1e-6)


def test_uniform_image_weights_every_neighbour_equally():
    affinity = pamr_affinity(torch.full((1, 3, 6, 6), 0.7), DILATIONS)
    torch.testing.assert_close(affinity, torch.full_like(affinity, 1 / 48))


def test_one_iteration_is_a_convex_combination_of_the_48_neighbours():
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 14, 10, generator=generator)
    masks = torch.rand(1, 2, 14, 10, generator=generator)
    refined = pamr(image, masks, iterations=1)[0].numpy()
    weights = pamr_affinity(image, DILATIONS)[0].numpy()
    values = masks[0].numpy()
    for y in range(14):
        for x in range(10):
            neighbours = np.stack(
                [clamped(values, y + dy, x + dx) for dy, dx in neighbour_offsets()], 1
            )  # [2, 48]
            np.testing.assert_allclose(refined[:, y, x], neighbours @ weights[:, y, x], atol=1e-6)
            assert (refined[:, y, x] >= neighbours.min(1) - 1e-6).all()
            assert (refined[:, y, x] <= neighbours.max(1) + 1e-6).all()


def test_image_is_resized_to_the_mask_size_with_aligned_corners():
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 40, 36, generator=generator)
    masks = torch.rand(1, 3, 10, 9, generator=generator)
    resized = F.interpolate(image, size=(10, 9), mode="bilinear", align_corners=True)
    torch.testing.assert_close(pamr(image, masks), pamr(resized, masks))
    torch.testing.assert_close(pamr_reference(image, masks), pamr(resized, masks), atol=1e-5, rtol=0)


def test_low_precision_masks_are_refined_in_float32():
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 8, 8, generator=generator)
    masks = torch.rand(1, 2, 8, 8, generator=generator)
    refined = pamr(image.bfloat16(), masks.bfloat16())
    assert refined.dtype == torch.float32
    torch.testing.assert_close(refined, pamr(image.bfloat16().float(), masks.bfloat16().float()))
    torch.testing.assert_close(pamr(image, masks, iterations=0), masks)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same B"):
        pamr(torch.zeros(2, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="image"):
        pamr(torch.zeros(3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="dilations"):
        pamr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), dilations=())
