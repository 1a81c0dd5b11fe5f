"""Optimiser and learning-rate schedule (docs/method.md#schedule)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modeling_code.training.optimization import (
    build_optimizer,
    parameter_groups,
    scaled_learning_rates,
    warmup_cosine_learning_rate,
    warmup_cosine_schedule,
)

LR, MIN_LR = 3.2e-4, 4e-5


class ToyModel(nn.Module):
    """Decayed and undecayed parameters of every kind the CoDe model has, plus a tied and a frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(4, 3)  # weight decayed, bias not
        self.norm = nn.LayerNorm(3)  # 1-D: not decayed
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07))  # 0-D
        self.prompt_context = nn.Parameter(torch.randn(2, 3))  # decayed
        self.text_mask_bias = nn.Parameter(torch.zeros(1, 3))  # a bias by name, though 2-D
        self.backbone_copy = nn.Linear(3, 3)  # frozen in phase 1, trained in phase 2
        self.frozen_clip = nn.Linear(3, 3)  # never trained
        self.tied = self.decoder  # the same parameters under a second name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.decoder(inputs)) * self.logit_scale + self.prompt_context.sum(0)
        return self.frozen_clip(self.backbone_copy(hidden) + self.text_mask_bias)


TRAINABLE = [
    "decoder.weight",
    "decoder.bias",
    "norm.weight",
    "norm.bias",
    "logit_scale",
    "prompt_context",
    "text_mask_bias",
    "backbone_copy.weight",
    "backbone_copy.bias",
]


def test_learning_rates_scale_with_the_global_batch():
    assert scaled_learning_rates(LR, MIN_LR, 64) == pytest.approx((5e-6, 6.25e-7))
    assert scaled_learning_rates(LR, MIN_LR, 4096) == pytest.approx((LR, MIN_LR))
    assert scaled_learning_rates(1.0, 0.5, 8, reference_batch=16) == pytest.approx((0.5, 0.25))
    with pytest.raises(ValueError, match="positive"):
        scaled_learning_rates(LR, MIN_LR, 0)
    with pytest.raises(ValueError, match="larger than base_lr"):
        scaled_learning_rates(MIN_LR, LR, 64)


def test_parameter_groups_split_decay_by_shape_and_name():
    model = ToyModel()
    model.backbone_copy.requires_grad_(False)  # phase 1: still in the optimiser
    decay, no_decay = parameter_groups(model, TRAINABLE, weight_decay=0.05)
    # In named_parameters() order: a module's own parameters come before its submodules'.
    assert decay["param_names"] == ["prompt_context", "decoder.weight", "backbone_copy.weight"]
    assert no_decay["param_names"] == [
        "logit_scale",
        "text_mask_bias",
        "decoder.bias",
        "norm.weight",
        "norm.bias",
        "backbone_copy.bias",
    ]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert decay["params"][1] is model.decoder.weight
    # A tied alias names a parameter already included: it is not added twice.
    groups = parameter_groups(model, [*TRAINABLE, "tied.weight"], weight_decay=0.05)
    assert sum(len(group["params"]) for group in groups) == len(TRAINABLE)
    only_matrices = parameter_groups(model, ["decoder.weight"], weight_decay=0.1)
    assert len(only_matrices) == 1 and only_matrices[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match=r"not found in the model: \['decoder\.scale'\]"):
        parameter_groups(model, ["decoder.scale"], weight_decay=0.05)
    with pytest.raises(ValueError, match="No trainable parameter"):
        parameter_groups(model, [], weight_decay=0.05)


def test_adamw_leaves_phase_one_frozen_parameters_untouched_then_trains_them():
    torch.manual_seed(0)
    model = ToyModel()
    optimizer = build_optimizer(model, TRAINABLE, lr=0.1)
    assert optimizer.defaults["eps"] == 1e-6 and optimizer.defaults["betas"] == (0.9, 0.999)
    model.backbone_copy.requires_grad_(False)
    model.frozen_clip.requires_grad_(False)
    frozen_before = model.backbone_copy.weight.detach().clone()
    context_before = model.prompt_context.detach().clone()

    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(model.backbone_copy.weight, frozen_before)
    assert model.backbone_copy.weight not in optimizer.state
    assert not torch.equal(model.prompt_context, context_before)

    model.backbone_copy.requires_grad_(True)  # phase 2
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.backbone_copy.weight, frozen_before)
    assert optimizer.state[model.backbone_copy.weight]["step"] == 1
    assert optimizer.state[model.prompt_context]["step"] == 2


def test_adamw_is_fused_on_the_cpu_and_cuda_and_updates_as_the_default_implementation():
    torch.manual_seed(0)
    fused_model, plain_model = ToyModel(), ToyModel()
    plain_model.load_state_dict(fused_model.state_dict())
    start = fused_model.decoder.weight.detach().clone()
    fused = build_optimizer(fused_model, TRAINABLE, lr=0.1)
    assert fused.defaults["fused"] is True
    assert build_optimizer(fused_model, TRAINABLE, lr=0.1, device_type="cuda").defaults["fused"] is True
    assert not build_optimizer(fused_model, TRAINABLE, lr=0.1, device_type="mps").defaults["fused"]
    plain = torch.optim.AdamW(parameter_groups(plain_model, TRAINABLE, 0.05), lr=0.1, eps=1e-6, foreach=False)
    for _ in range(5):
        inputs = torch.randn(5, 4)
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            model(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, fused_value), plain_value in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(fused_value, plain_value, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.allclose(fused_model.decoder.weight, start, atol=1e-2)  # five steps of lr 0.1 moved it


def test_schedule_values_at_chosen_steps():
    warmup, total = 10, 110
    start = 1e-4 * LR
    expected = {
        0: start,
        5: start + (LR - start) / 2,  # half-way through warmup
        10: LR,  # end of warmup
        35: MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi / 4)) / 2,
        60: (LR + MIN_LR) / 2,  # half-way through the cosine
        110: MIN_LR,
        150: MIN_LR,  # held after the last step
    }
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, ["weight", "bias"], lr=LR)
    scheduler = warmup_cosine_schedule(optimizer, warmup, total, LR, MIN_LR)
    observed = {}
    for step in range(151):
        observed[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for step, value in expected.items():
        assert observed[step] == pytest.approx([value, value], rel=1e-9), step
        assert warmup_cosine_learning_rate(step, warmup, total, LR, MIN_LR) == pytest.approx(value, rel=1e-9)


def test_schedule_resumes_from_its_state_dict():
    def fresh():
        optimizer = build_optimizer(nn.Linear(2, 2), ["weight", "bias"], lr=1.0)
        return optimizer, warmup_cosine_schedule(optimizer, 5, 50, 1.0, 0.1)

    optimizer, scheduler = fresh()
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed_scheduler = fresh()
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        resumed_optimizer.step()
        resumed_scheduler.step()
        assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert scheduler.get_last_lr()[0] == pytest.approx(warmup_cosine_learning_rate(27, 5, 50, 1.0, 0.1))


def test_schedule_rejects_inconsistent_settings():
    optimizer = build_optimizer(nn.Linear(2, 2), ["weight", "bias"], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        warmup_cosine_schedule(optimizer, 10, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match="min_lr <= lr"):
        warmup_cosine_schedule(optimizer, 1, 10, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"must start at lr=0\.5"):
        warmup_cosine_schedule(optimizer, 1, 10, 0.5, 0.1)
