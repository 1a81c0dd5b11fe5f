"""Pixel-adaptive mask refinement (PAMR, docs/method.md#pamr): soft masks diffused along image colour affinities.

For every pixel and every dilation ``d`` the 8 neighbours at distance ``d`` (replicate padding) form, over all
dilations, a set of 48 neighbours. Their affinity to the pixel is ``-|I_p - I_q| / (1e-8 + 0.1 * std_p)`` per
colour channel, where ``std_p`` is the unbiased standard deviation of the 54 values of the pixel's 3×3
neighbourhoods at all dilations (centre included once per dilation); affinities are averaged over the channels
and soft-maxed over the 48 neighbours. Each iteration then replaces every mask value by the affinity-weighted
sum of its 48 neighbours' values: a convex combination, so constant masks stay constant.

``pamr`` is the fast path: the 48 neighbours are views into one padded copy of the image or mask, the affinity
is built in one vectorised pass, and each iteration is 48 in-place multiply-adds over all windows and classes
at once (materialising the [B, N, 48, H, W] neighbour stack instead would take 48 times the memory). The
definition written out (per-dilation convolutions with one-hot 3×3 kernels) is the test-side reference
``pamr_reference`` in ``tests/reference_implementations.py``.
"""

from __future__ import annotations

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
    centres = image[:, :, None].expand(-1, -1, len(dilations), -1, -1)
    pooled = torch.cat([neighbours, centres], dim=2)
    std = pooled.std(dim=2, keepdim=True)
    affinity = -(neighbours - image[:, :, None]).abs() / (STD_EPS + STD_SCALE * std)
    return affinity.mean(dim=1).softmax(dim=1)


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


__all__ = ["NEIGHBOUR_STEPS", "pamr", "pamr_affinity"]
