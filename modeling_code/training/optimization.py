"""Optimiser and learning-rate schedule of CoDe training (docs/method.md#schedule).

* AdamW with two parameter groups: weight decay for matrices / tensors, none for 1-D (and 0-D)
  parameters and biases.
* Learning rate and its floor scaled linearly with the global batch size (reference batch 4096).
* Linear warmup from ``warmup_start_factor * lr`` to ``lr``, then a cosine from ``lr`` down to
  ``min_lr`` at ``total_steps`` (held at ``min_lr`` afterwards).

Two-phase training: the masker's backbone block copy is frozen for the first ``ust_steps`` and trained
afterwards. Every parameter that is trainable in *some* phase goes into the optimiser from the start, so
the optimiser's parameter groups (and therefore its checkpoints) have the same structure in both phases;
a parameter frozen in the current phase has no gradient, and ``torch.optim.AdamW`` leaves parameters with
``grad is None`` untouched (no update, no weight decay, no moment state). That is why the functions here
take the trainable parameter *names* explicitly instead of reading ``requires_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

REFERENCE_BATCH_SIZE = 4096
# Device types on which AdamW runs torch's fused kernel (build_optimizer); elsewhere torch's default.
FUSED_ADAMW_DEVICE_TYPES = ("cpu", "cuda")


def scaled_learning_rates(
    base_lr: float, min_lr: float, global_batch_size: int, reference_batch: int = REFERENCE_BATCH_SIZE
) -> tuple[float, float]:
    """Scale the peak and the minimum learning rate linearly by ``global_batch_size / reference_batch``.

    Example: base 3.2e-4 and min 4e-5 at a global batch of 64 give (5e-6, 6.25e-7).
    """
    if global_batch_size <= 0 or reference_batch <= 0:
        raise ValueError(
            f"Batch sizes must be positive, got global_batch_size={global_batch_size} and "
            f"reference_batch={reference_batch}."
        )
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) is larger than base_lr ({base_lr}).")
    scale = global_batch_size / reference_batch
    return base_lr * scale, min_lr * scale


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Whether a parameter is decayed: not for 0-D/1-D tensors (norm scales, logit scales, scalars) nor biases."""
    return parameter.ndim > 1 and not name.endswith("bias")


def parameter_groups(model: nn.Module, trainable_names: Collection[str], weight_decay: float) -> list[dict]:
    """AdamW parameter groups over the parameters named in ``trainable_names``.

    Args:
        model: the module whose ``named_parameters()`` the names refer to.
        trainable_names: every parameter trained in at least one training phase, by its full name in
            ``model.named_parameters()``. ``requires_grad`` is deliberately ignored (see the module docstring).
        weight_decay: decay of the first group.

    Returns:
        Up to two groups, each ``{"params": [...], "param_names": [...], "weight_decay": float}``: first the
        decayed parameters, then the undecayed ones; a group with no parameter is left out. Parameters keep
        the order of ``model.named_parameters()``, so the layout is the same on every run.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(trainable_names)
    unknown = sorted(wanted - named.keys())
    if unknown:
        raise ValueError(f"Trainable parameter names not found in the model: {unknown[:10]}")
    if not wanted:
        raise ValueError("No trainable parameter was given: the optimiser would have nothing to train.")

    decay: dict[str, list] = {"params": [], "param_names": []}
    no_decay: dict[str, list] = {"params": [], "param_names": []}
    seen: set[int] = set()
    for name, parameter in named.items():
        # Shared (tied) parameters appear under several names; the optimiser must see each tensor once.
        if name not in wanted or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        group = decay if uses_weight_decay(name, parameter) else no_decay
        group["params"].append(parameter)
        group["param_names"].append(name)
    decay["weight_decay"] = weight_decay
    no_decay["weight_decay"] = 0.0
    return [group for group in (decay, no_decay) if group["params"]]


def build_optimizer(
    model: nn.Module,
    trainable_names: Collection[str],
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (spec: betas (0.9, 0.999), eps 1e-6, weight decay 0.05).

    ``device_type``: where the parameters will be trained. On the CPU and CUDA (``FUSED_ADAMW_DEVICE_TYPES``)
    the fused kernel updates each parameter in one pass over its tensors, where torch's default on the CPU
    makes several; the update is the same up to float rounding.
    """
    return torch.optim.AdamW(
        parameter_groups(model, trainable_names, weight_decay), lr=lr, betas=betas, eps=eps,
        fused=device_type in FUSED_ADAMW_DEVICE_TYPES or None,
    )


def warmup_cosine_learning_rate(
    step: int,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup_start_factor: float = 1e-4,
) -> float:
    """The learning rate after ``step`` optimiser steps.

    ``step < warmup_steps``: linear from ``warmup_start_factor * lr`` (step 0) towards ``lr``;
    ``warmup_steps <= step <= total_steps``: ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2`` with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``; after ``total_steps``: ``min_lr``.
    """
    if step < warmup_steps:
        start = warmup_start_factor * lr
        return start + (lr - start) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float,
    warmup_start_factor: float = 1e-4,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_learning_rate`; call ``scheduler.step()`` once per
    optimiser step. Every parameter group must start at ``lr`` (the schedule is a factor on it).

    The factor is a plain function of the step (``LambdaLR`` does not pickle it), so the scheduler's
    ``state_dict()`` is its step count and base learning rates: a rebuilt scheduler resumes exactly after
    ``load_state_dict``.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}."
        )
    if not 0 <= min_lr <= lr or lr <= 0:
        raise ValueError(f"Need 0 <= min_lr <= lr and lr > 0, got min_lr={min_lr}, lr={lr}.")
    group_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    if any(not math.isclose(group_lr, lr, rel_tol=1e-9) for group_lr in group_lrs):
        raise ValueError(f"Every parameter group must start at lr={lr} for this schedule; found {group_lrs}.")

    def factor(step: int) -> float:
        return (
            warmup_cosine_learning_rate(step, warmup_steps, total_steps, lr, min_lr, warmup_start_factor) / lr
        )

    return LambdaLR(optimizer, factor)
