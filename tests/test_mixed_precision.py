"""Mixed precision: the autograd functions of ``ops`` under autocast, trainer steps with mixed_precision, and the
training loop in bf16.

Each test runs on the CPU (in CI) and on CUDA where the tests marked cuda are selected (benchmarks/gpu.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import DEVICES, TINY_CODE_OVERRIDES, device_under_test, training_batch
from PIL import Image

import modeling_code.ops as ops
from modeling_code import CoDeModel
from modeling_code.text_decomposition import NounDecomposer
from modeling_code.training import trainer
from modeling_code.training.config import (
    CheckpointSection,
    DataSection,
    EvalSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    TrainingConfig,
)
from modeling_code.training.data_sources import make_dataloader
from modeling_code.training.trainer import training_step

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _autocast_seen_by(monkeypatch, name: str, device: torch.device) -> list[tuple[bool, torch.dtype]]:
    """Record (autocast enabled, autocast dtype) on ``device`` whenever ``ops.<name>`` runs."""
    seen = []
    plain = getattr(ops, name)

    def recording(*args, **kwargs):
        seen.append((torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)))
        return plain(*args, **kwargs)

    monkeypatch.setattr(ops, name, recording)
    return seen


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("device_name", DEVICES)
def test_backward_runs_under_the_autocast_of_its_forward(device_name, dtype, monkeypatch):
    device = device_under_test(device_name)
    activated = torch.randn(12, 8, device=device, requires_grad=True)
    weight = torch.randn(6, 8, 3, 3, device=device, requires_grad=True)
    x = torch.randn(2, 5, 7, device=device, requires_grad=True)
    backwards = {name: _autocast_seen_by(monkeypatch, name, device)
                 for name in ("quick_gelu_bwd", "tap_products_bwd", "phase_sum_bwd", "total_variation_bwd")}
    with torch.autocast(device.type, dtype=dtype):
        taps = ops.tap_products(activated, weight)
        phases = ops.UpsampledConvPhaseSumFunction.apply(taps.view(1, 3, 4, 3, 3, 6))
        second_layer = torch.ones(3, phases.shape[-1], device=device)
        mlp = ops.QuickGELULinearFunction.apply(phases, second_layer, None)
        loss = mlp.float().sum() + ops.total_variation(x)
    loss.backward()  # outside the autocast region
    for name in ("quick_gelu_bwd", "tap_products_bwd", "phase_sum_bwd"):
        assert backwards[name] == [(True, dtype)], name
    assert backwards["total_variation_bwd"] == [(False, dtype)]  # a loss: float32, autocast off
    assert activated.grad.dtype == weight.grad.dtype == x.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("device_name", DEVICES)
def test_total_variation_runs_in_float32_under_autocast(device_name, dtype):
    device = device_under_test(device_name)
    x = torch.randn(3, 9, 11, device=device).to(dtype).requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        value = ops.total_variation(x)
    value.backward()
    reference_input = x.detach().float().requires_grad_()
    reference = ops.total_variation_fwd(reference_input)
    reference.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, reference_input.grad.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("device_name", DEVICES)
def test_tap_products_under_autocast_equal_autograds_matrix_product(device_name, dtype):
    device = device_under_test(device_name)
    generator = torch.Generator().manual_seed(0)
    activated = torch.randn(40, 16, generator=generator).to(device)
    weight = torch.randn(8, 16, 3, 3, generator=generator).to(device)
    upstream = torch.randn(40, 72, generator=generator).to(device, dtype)
    results = []
    for product in (ops.tap_products, lambda a, w: a @ ops.tap_layout(w)):
        inputs = [activated.clone().requires_grad_(), weight.clone().requires_grad_()]
        with torch.autocast(device.type, dtype=dtype):
            taps = product(*inputs)
        (taps * upstream).float().sum().backward()
        results.append((taps, *(tensor.grad for tensor in inputs)))
    (taps, *grads), (expected_taps, *expected_grads) = results
    assert taps.dtype == dtype
    torch.testing.assert_close(taps, expected_taps, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


class _PhaseSumsByDefinition(torch.autograd.Function):
    """The phase sums' forward and backward functions as they are, without autocast declarations."""

    @staticmethod
    def forward(ctx, taps):
        return ops.phase_sum_fwd(taps)

    @staticmethod
    def backward(ctx, grad_out):
        return ops.phase_sum_bwd(grad_out)


_phase_sums_by_definition = _PhaseSumsByDefinition.apply


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("device_name", DEVICES)
def test_quick_gelu_mlp_and_phase_sums_keep_their_input_dtype_under_autocast(device_name, dtype):
    device = device_under_test(device_name)
    generator = torch.Generator().manual_seed(1)
    second_layer = torch.randn(6, 10, generator=generator).to(device)
    cases = [
        (
            lambda x: ops.QuickGELULinearFunction.apply(x, second_layer, None),
            lambda x: torch.nn.functional.linear(x * torch.sigmoid(1.702 * x), second_layer),
            torch.randn(4, 10, generator=generator),
        ),
        (ops.UpsampledConvPhaseSumFunction.apply, _phase_sums_by_definition, torch.randn(2, 3, 4, 3, 3, 5, generator=generator)),
    ]
    for function, plain, values in cases:
        results = []
        for run in (function, plain):
            x = values.to(device, dtype).requires_grad_()
            with torch.autocast(device.type, dtype=dtype):
                out = run(x)
            out.backward(torch.ones_like(out))
            results.append((out, x.grad))
        (out, grad), (expected_out, expected_grad) = results
        assert out.dtype == grad.dtype == dtype
        torch.testing.assert_close(out, expected_out)
        torch.testing.assert_close(grad, expected_grad)


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change: reset before and after."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trained_copy(model: CoDeModel, device: torch.device, mixed_precision: str, batch: dict, steps: int):
    """Trainer steps (``training_step`` under an Accelerator with ``mixed_precision``) on a copy of ``model``:
    (the loss terms of each step, the trained model, whether autocast was on in the masker's forward)."""
    import copy

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    assert accelerator.device.type == device.type
    model = copy.deepcopy(model).to(accelerator.device).train()
    autocast_seen = []
    model.masker.register_forward_hook(
        lambda *_: autocast_seen.append(torch.is_autocast_enabled(accelerator.device.type)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    batch = {name: value.to(accelerator.device) for name, value in batch.items()}
    terms = [training_step(accelerator, prepared, batch, optimizer, scheduler, max_grad_norm=5.0)[0]
             for _ in range(steps)]
    return terms, accelerator.unwrap_model(prepared), autocast_seen


@pytest.mark.parametrize(
    ("device_name", "mixed_precision"),
    [("cpu", "bf16"), pytest.param("cuda", "bf16", marks=pytest.mark.cuda),
     pytest.param("cuda", "fp16", marks=pytest.mark.cuda)],
)
def test_trainer_steps_in_mixed_precision(device_name, mixed_precision, tiny_clip_dir, tiny_tokenizer,
                                          fresh_accelerate_state):
    device = device_under_test(device_name)
    torch.manual_seed(0)
    model = CoDeModel.from_clip(str(tiny_clip_dir), tokenizer=tiny_tokenizer, gumbel_noise=False,
                                **TINY_CODE_OVERRIDES)
    with torch.no_grad():  # open the decoder gates (0 at initialisation), so the convolutions get gradients
        for block in model.masker.decoder.blocks:
            block.gate.fill_(0.3)
    batch = training_batch(tiny_tokenizer, batch_size=3)
    terms, trained, autocast_seen = _trained_copy(model, device, mixed_precision, batch, steps=4)
    # accelerate has fp16 autocast on GPUs only: on the CPU (a dry run of the cuda tests) those steps run in fp32
    assert autocast_seen == [device.type != "cpu" or mixed_precision == "bf16"] * 4
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in terms)
    changed = [name for name, parameter in trained.named_parameters()
               if not torch.equal(parameter.detach().cpu().float(), model.get_parameter(name).detach())]
    assert changed and not any(name.startswith("clip.") for name in changed)
    assert "masker.decoder.blocks.1.conv.weight" in changed
    assert all(parameter.dtype == torch.float32 for parameter in trained.parameters())  # autocast, not casting

    AcceleratorState._reset_state(reset_partial_state=True)
    full_precision, *_ = _trained_copy(model, device, "no", batch, steps=1)
    # The first step's losses: same weights, no Gumbel noise. Low-precision matrix products move each term by a
    # few parts in a thousand (bf16 on the CPU: at most 0.6 %); the bound leaves room for a hard-mask pixel
    # flipping near 0.5.
    for name, value in full_precision[0].items():
        assert terms[0][name] == pytest.approx(value, rel=2e-2, abs=1e-3), name


NOUNS = ("cat", "sofa", "dog", "car", "bird", "water", "man", "horse", "table", "tree")


@pytest.mark.parametrize("device_name", DEVICES)
def test_the_training_loop_runs_in_bf16_on_the_device(device_name, tiny_clip_dir, tmp_path, monkeypatch,
                                                      fresh_accelerate_state):
    device = device_under_test(device_name)
    monkeypatch.setenv("ACCELERATE_USE_CPU", str(device.type == "cpu").lower())
    # Nouns without spaCy (absent on GPU machines): the words of a fixed list.
    monkeypatch.setattr(NounDecomposer, "extract_nouns", lambda self, caption: [w for w in caption.split() if w in NOUNS])
    loaders = []
    monkeypatch.setattr(trainer, "make_dataloader",
                        lambda *args, **kwargs: loaders.append(kwargs) or make_dataloader(*args, **kwargs))
    rng = np.random.default_rng(0)
    captions = ["a cat on a sofa", "a dog near a car", "a bird over the water", "a man on a horse"]
    records = []
    for index, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
        records.append(json.dumps({"image": f"{index}.png", "caption": caption}))
    (tmp_path / "data.jsonl").write_text("\n".join(records) + "\n")
    config = TrainingConfig(
        model=ModelSection(clip=str(tiny_clip_dir), overrides=dict(TINY_CODE_OVERRIDES),
                           processor_overrides={"train_crop_size": 32}),
        data=DataSection(sources=[{"type": "jsonl", "path": str(tmp_path / "data.jsonl")}], batch_size=2,
                         num_workers=0, shuffle_buffer=1),
        optim=OptimSection(lr=1e-3, min_lr=1e-4, reference_batch_size=2, warmup_steps=1, max_steps=3, ust_steps=1),
        checkpoint=CheckpointSection(output_dir=str(tmp_path / "run"), save_every=2, keep_last=1),
        logging=LoggingSection(log_every=1, tracker=None),
        eval=EvalSection(every=0),
        mixed_precision="bf16",
    )
    output_dir = trainer.train(config)
    assert json.loads((output_dir / "training_summary.json").read_text())["steps"] == 3
    assert loaders[0]["pin_memory"] is (device.type == "cuda")
    trained = CoDeModel.from_pretrained(output_dir)
    initial = CoDeModel.from_clip(str(tiny_clip_dir), **TINY_CODE_OVERRIDES)
    assert not torch.equal(trained.sim2mask.weight, initial.sim2mask.weight)
    assert torch.equal(trained.clip.visual_projection.weight, initial.clip.visual_projection.weight)
