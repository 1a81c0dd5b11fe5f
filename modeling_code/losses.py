"""Loss terms of CoDe training and the collectives they use (docs/method.md#losses).

Shaped like open_clip's ``loss.py``: the collectives first, the one place where contrastive terms see the other
processes' rows, then the loss computations as functions of tensors. ``CoDeModel.forward`` calls them; the
memory-lean total variation is ``ops.total_variation``.

Rows are noun-major (row ``k * B + b`` is the k-th noun of image b); a logit block [N, N_global] holds this
process's N rows against the nouns of every process, row i positive with column ``rank * N + i``.
Every loss gives, under DDP's gradient averaging, exactly the gradient of one process holding the whole batch.

Only torch is imported: the package also runs as Hub remote code from a flat folder.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# The training loss terms, in the order they are summed. Each has a weight ``loss_{name}_weight`` in
# ``CoDeConfig`` and a field ``loss_{name}`` in ``CoDeModelOutput`` (docs/method.md#losses).
LOSS_NAMES = (
    "kg",
    "tcl_feature",
    "tcl_image",
    "tv_image",
    "tv_mask",
    "area_positive",
    "area_negative",
    "text_segmentation",
    "hcl",
)


# --------------------------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n, ...] from every process along dim 0 -> [n * world, ...], keeping gradients.

    The backward pass sums each process's gradient for its slice, so with DDP's gradient averaging the update
    equals a single process holding the whole global batch. Identity when not distributed.
    """
    _, world_size = _world()
    if world_size == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n, ...] from every process along dim 0 -> [n * world, ...], without gradient."""
    _, world_size = _world()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (gradient-free) tensor over all processes; itself when not distributed."""
    _, world_size = _world()
    if world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def global_mean(local_values: torch.Tensor) -> torch.Tensor:
    """Mean over the elements of every process, differentiable w.r.t. this process's elements.

    The value is the global mean on every rank; the gradient is scaled by the world size so that DDP's
    gradient averaging gives exactly the single-process gradient (needed where the mean enters a non-linear
    term, e.g. ``|mean - prior|``).
    """
    _, world_size = _world()
    if world_size == 1:
        return local_values.mean()
    local_sum = local_values.sum()
    totals = global_sum(torch.stack([local_sum.detach(), local_sum.new_tensor(local_values.numel())]))
    mean = (local_sum + (totals[0] - local_sum.detach())) / totals[1]
    return world_size * mean - (world_size - 1) * mean.detach()


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------
def symmetric_infonce(local_logits: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy of a [n, n * world] logit block whose positives lie on the global diagonal.

    Row i of this process is positive with column ``rank * n + i``. The column direction needs every process's
    rows, so the block is gathered (with gradient) to the full [n * world, n * world] matrix. ``excluded``
    (bool, the block's shape, never true on the diagonal) removes pairs from both directions' negatives.
    """
    rank, _ = _world()
    num_rows = local_logits.shape[0]
    if excluded is not None:
        local_logits = local_logits.masked_fill(excluded, float("-inf"))
    targets = torch.arange(num_rows, device=local_logits.device) + rank * num_rows
    row_loss = F.cross_entropy(local_logits, targets)
    full_logits = gather_with_grad(local_logits)
    column_logits = full_logits[:, rank * num_rows : (rank + 1) * num_rows].t()
    column_loss = F.cross_entropy(column_logits, targets)
    return (row_loss + column_loss) / 2


def same_noun_pairs(noun_input_ids: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Pairs of rows that name the same noun, positives left out: bool [N, N_global].

    noun_input_ids [N, L] (this process's rows); positive [N, N_global] marks each row's own column. Such
    pairs are no negatives of each other: ``symmetric_infonce(..., excluded=same_noun_pairs(...))``.
    """
    all_noun_ids = gather(noun_input_ids)
    return (noun_input_ids[:, None] == all_noun_ids[None]).all(-1) & ~positive


def tcl_feature_logits(
    image_embeddings: torch.Tensor,
    soft_masks: torch.Tensor,
    noun_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Row i's embeddings pooled with its soft mask for noun j, cosine with noun j, scaled: [N, N_global].

    image_embeddings [B, C, H', W']; soft_masks [N, N_global, H', W'] with rows noun-major (row i is image
    i % B), so the rows' embeddings are never materialised; noun_embeddings [N_global, C] (unit norm);
    logit_scale: the factor of the cosines; eps: added to each mask's area before dividing by it.
    """
    batch_size = image_embeddings.shape[0]
    per_image = soft_masks.unflatten(0, (-1, batch_size)).flatten(-2)  # [K, B, N_global, H' W']
    pooled = torch.einsum("bcp,kbmp->kbmc", image_embeddings.flatten(2), per_image).flatten(0, 1)
    pooled = pooled / (soft_masks.sum((-2, -1))[..., None] + eps)
    cosine = (F.normalize(pooled, dim=-1) * noun_embeddings[None]).sum(-1)
    return logit_scale * cosine


def area_prior_loss(mask_values: torch.Tensor, prior: float) -> torch.Tensor:
    """``|global mean of mask_values - prior|``; 0 when this process has no values."""
    if not mask_values.numel():
        return mask_values.new_zeros(())
    return (global_mean(mask_values) - prior).abs()


def text_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, background_weight: float) -> torch.Tensor:
    """Class-weighted cross-entropy of word-highlighting logits [B, K + 1, L] vs labels [B, L] (-1 ignored).

    Class 0 (no selected noun) weighs ``background_weight``, the nouns 1. Normalised by the weight total of
    the GLOBAL batch (times the world size, undone by gradient averaging), so several processes give exactly
    the single-process weighted mean.
    """
    weights = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
    weights[0] = background_weight
    per_token = F.cross_entropy(logits, labels, weight=weights, ignore_index=-1, reduction="none")
    weight_total = weights[labels.clamp(min=0)][labels >= 0].sum()
    _, world_size = _world()
    return world_size * per_token.sum() / global_sum(weight_total).clamp(min=1e-12)


__all__ = [
    "LOSS_NAMES",
    "area_prior_loss",
    "gather",
    "gather_with_grad",
    "global_mean",
    "global_sum",
    "same_noun_pairs",
    "symmetric_infonce",
    "tcl_feature_logits",
    "text_segmentation_loss",
]
