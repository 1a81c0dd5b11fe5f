"""Pixel-adaptive mask refinement (PAMR, docs/method.md#pamr): soft masks diffused along image colour affinities.

For every pixel and every dilation ``d`` the 8 neighbours at distance ``d`` (replicate padding) form, over all
dilations, a set of 48 neighbours. Their affinity to the pixel is ``-|I_p - I_q| / (1e-8 + 0.1 * std_p)`` per
colour channel, where ``std_p`` is the unbiased standard deviation of the 54 values of the pixel's 3×3
neighbourhoods at all dilations (centre included once per dilation); affinities are averaged over the channels
and soft-maxed over the 48 neighbours. Each iteration then replaces every mask value by the affinity-weighted
sum of its 48 neighbours' values: a convex combination, so constant masks stay constant.

``pamr`` is the fast path. The affinity is built from views into one padded copy of the image, in one
vectorised pass. An iteration is a linear map of the masks with the same weights for every class: on the CPU
it runs as one sparse matrix product (each pixel's row holds its weights at its neighbours' columns; replicate
padding clamps the coordinates), which reads every class value of a neighbour once; elsewhere as 48 in-place
multiply-adds of views into a padded copy of the masks (materialising the [B, N, 48, H, W] neighbour stack
instead would take 48 times the memory). The definition written out (per-dilation convolutions with one-hot
3×3 kernels) is the test-side reference ``pamr_reference`` in ``tests/reference_implementations.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

STD_EPS = 1e-8
STD_SCALE = 0.1
# (row, column) steps of the 8 neighbours of a 3×3 neighbourhood, row-major without the centre.
NEIGHBOUR_STEPS: tuple[tuple[int, int], ...] = tuple(
    (row, column) for row in (-1, 0, 1) for column in (-1, 0, 1) if (row, column) != (0, 0)
)


def _check_inputs(image: torch.Tensor, masks: torch.Tensor, dilations: Sequence[int]) -> None:
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(
            f"PAMR needs image [B, 3, H, W] and masks [B, N, H', W'] with the same B; got {tuple(image.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if not dilations or min(dilations) < 1:
        raise ValueError(
            f"PAMR dilations must be a non-empty list of positive integers; got {list(dilations)}"
        )


def _image_at_mask_size(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The image in fp32, resized bilinearly (``align_corners=True``) to the masks' spatial size."""
    image = image.float()
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    return image


def _neighbour_views(
    padded: torch.Tensor, pad: int, size: tuple[int, int], dilation: int
) -> list[torch.Tensor]:
    """The 8 neighbours at ``dilation`` as views [..., H, W] into a map replicate-padded by ``pad`` >= dilation.

    Replicate padding by the largest dilation, then reading at offset ``d``, equals replicate padding by ``d``.
    """
    height, width = size
    return [
        padded[
            ...,
            pad + row * dilation : pad + row * dilation + height,
            pad + column * dilation : pad + column * dilation + width,
        ]
        for row, column in NEIGHBOUR_STEPS
    ]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Softmax affinities of every pixel to its 8 * len(dilations) neighbours.

    image: [B, 3, H, W] -> [B, 8 * len(dilations), H, W] fp32, non-negative and summing to 1 over dim 1.
    Neighbour ``k`` is step ``NEIGHBOUR_STEPS[k % 8]`` times dilation ``dilations[k // 8]``.
    """
    image = image.float()
    height, width = image.shape[-2:]
    pad = max(dilations)
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    neighbours = torch.stack(
        [view for dilation in dilations for view in _neighbour_views(padded, pad, (height, width), dilation)],
        dim=2,
    )  # [B, 3, 8 * D, H, W]
    # The std pools each dilation's full 3×3 neighbourhood: its 8 neighbours plus the centre once per dilation.
    # Two passes (the mean, then the squared deviations) over the stack: torch.std's reduction over a middle
    # dimension is several times slower.
    centre_count = len(dilations)
    count = neighbours.shape[2] + centre_count
    mean = (neighbours.sum(2) + centre_count * image) / count
    squares = (neighbours - mean[:, :, None]).square_().sum(2) + centre_count * (image - mean).square_()
    scale = squares.div_(count - 1).sqrt_().mul_(STD_SCALE).add_(STD_EPS)
    affinity = (neighbours - image[:, :, None]).abs_().div_(scale[:, :, None])
    return affinity.mean(dim=1).neg_().softmax(dim=1)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> torch.Tensor:
    """Refine soft masks with PAMR (fast path).

    Args:
        image: [B, 3, H, W] the (normalised) image of each window; resized to the mask size inside.
        masks: [B, N, H', W'] soft masks.
        iterations: refinement steps.
        dilations: neighbourhood dilations.

    Returns:
        [B, N, H', W'] refined masks in fp32.
    """
    _check_inputs(image, masks, dilations)
    masks = masks.float()
    if iterations == 0:
        return masks
    affinity = pamr_affinity(_image_at_mask_size(image, masks), dilations)  # [B, K, H', W']
    if masks.device.type == "cpu":
        return _refine_with_sparse_matrix(masks, affinity, dilations, iterations)
    return _refine_with_views(masks, affinity, dilations, iterations)


def _refine_with_views(
    masks: torch.Tensor, affinity: torch.Tensor, dilations: Sequence[int], iterations: int
) -> torch.Tensor:
    """``iterations`` refinement steps as 48 multiply-adds each, of views into a replicate-padded copy."""
    size = tuple(masks.shape[-2:])
    pad = max(dilations)
    for _ in range(iterations):
        padded = F.pad(masks, (pad, pad, pad, pad), mode="replicate")
        refined = torch.zeros_like(masks)
        neighbour = 0
        for dilation in dilations:
            for view in _neighbour_views(padded, pad, size, dilation):
                refined.addcmul_(view, affinity[:, neighbour : neighbour + 1])
                neighbour += 1
        masks = refined
    return masks


def _neighbour_pixels(size: tuple[int, int], dilations: Sequence[int]) -> torch.Tensor:
    """Flat index of every pixel's neighbour k (the order of ``pamr_affinity``), coordinates clamped to the
    map (replicate padding): [H * W, 8 * len(dilations)]."""
    height, width = size
    rows = torch.arange(height)[:, None]
    columns = torch.arange(width)[None]
    return torch.stack(
        [
            (
                (rows + row * dilation).clamp_(0, height - 1) * width
                + (columns + column * dilation).clamp_(0, width - 1)
            ).flatten()
            for dilation in dilations
            for row, column in NEIGHBOUR_STEPS
        ],
        dim=1,
    )


@functools.lru_cache(maxsize=8)
def _window_matrix_layout(height: int, width: int, dilations: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Where one window's weights go in its CSR refinement matrix, which depends only on the sizes:
    (crow_indices [P + 1], column_indices [E], entry of each pixel's neighbour k [P, K]), int32.

    Near the border several clamped neighbours are one pixel; a CSR row lists each column once and in order,
    so such neighbours share an entry.
    """
    columns, order = _neighbour_pixels((height, width), dilations).sort(dim=1, stable=True)
    is_entry = torch.ones_like(columns, dtype=torch.bool)
    is_entry[:, 1:] = columns[:, 1:] != columns[:, :-1]
    entry_of_sorted = is_entry.flatten().cumsum(0).view_as(columns) - 1
    entry_of_neighbour = torch.empty_like(entry_of_sorted).scatter_(1, order, entry_of_sorted)
    crow_indices = torch.cat([torch.zeros(1, dtype=torch.long), is_entry.sum(1).cumsum(0)])
    return tuple(indices.int() for indices in (crow_indices, columns[is_entry], entry_of_neighbour))


def affinity_matrix(affinity: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """One refinement step as a sparse matrix: affinity [B, K, H, W] -> CSR [B * H * W, B * H * W].

    Row ``b * H * W + p`` holds pixel p's weights at its neighbours' columns (block diagonal: every window on
    its own); clamped neighbours that are one pixel have their weights summed, in neighbour order.
    """
    batch, _, height, width = affinity.shape
    pixels = height * width
    crow_indices, column_indices, entry_of_neighbour = (
        indices.to(affinity.device) for indices in _window_matrix_layout(height, width, tuple(dilations))
    )
    entries = len(column_indices)
    values = affinity.new_zeros(batch, entries)
    weights = affinity.permute(0, 2, 3, 1)
    for window in range(batch):
        values[window].index_add_(0, entry_of_neighbour.flatten(), weights[window].flatten())
    windows = torch.arange(batch, dtype=torch.int32, device=affinity.device)[:, None]
    row_starts = (crow_indices[:-1] + windows * entries).flatten()
    crow_indices = torch.cat([row_starts, row_starts.new_full((1,), batch * entries)])
    column_indices = (column_indices + windows * pixels).flatten()
    with warnings.catch_warnings():  # sparse CSR tensors are "beta" in torch; this use is plain
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow_indices, column_indices, values.flatten(), size=(batch * pixels,) * 2, check_invariants=False
        )


def _refine_with_sparse_matrix(
    masks: torch.Tensor, affinity: torch.Tensor, dilations: Sequence[int], iterations: int
) -> torch.Tensor:
    """``iterations`` refinement steps as sparse matrix products of the masks laid out [B * H * W, N]: each
    neighbour's class values are read together, where 48 multiply-adds of class-major maps each read and write
    the whole output."""
    batch, classes, height, width = masks.shape
    matrix = affinity_matrix(affinity, dilations)
    flat = masks.permute(0, 2, 3, 1).reshape(batch * height * width, classes)
    for _ in range(iterations):
        flat = matrix @ flat
    return flat.view(batch, height, width, classes).permute(0, 3, 1, 2).contiguous()

__all__ = ["NEIGHBOUR_STEPS", "affinity_matrix", "pamr", "pamr_affinity"]
