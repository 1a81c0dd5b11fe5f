"""Tensor operations of CoDe, outside its modules. Most compute the values of a direct computation (tested
against it) with less memory or less work:

- Memory-lean autograd functions, shaped like timm's ``layers/activations_me.py``: for each op plain
  ``*_fwd``/``*_bwd`` functions, an autograd ``Function`` calling them that saves only its inputs for backward,
  and the thin module or functional wrapper the model uses. A CLIP MLP's QuickGELU and second layer
  (``MemoryLeanCLIPMLP``), total variation (``total_variation``), and the masker decoder's 3×3 convolution of
  a nearest-×2 upsampled map (``upsampled_conv3x3``: tap products and their phase sums).
- ``PatchEmbeddingConv2d``: a ViT patch embedding as one matrix product.
- ``use_memory_lean_layers``: swaps CLIP's layers inside a module for the memory-lean ones, in place.
- CLIP blocks evaluated for less: self-only attention, the class token alone, and causal text sequences
  packed back to back with shared prefixes stored once (``pack_prefix_groups``, ``causal_block_packed``).

Besides, ``gumbel_sigmoid_straight_through``: the masker's hard masks, with the gradients of the soft ones.

Every autograd ``Function`` here declares its autocast behaviour with ``torch.amp.custom_fwd``/``custom_bwd`` for
the device type of its tensors (``autocast_forward``, ``autocast_backward``): backward runs under the autocast
state of its forward, wherever ``backward()`` is called, and the total variation (a loss) runs in float32.

Only torch and transformers are imported: the package also runs as Hub remote code from a flat folder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPEncoderLayer, CLIPVisionEmbeddings


# --------------------------------------------------------------------------------------------------------------
# Autocast declarations
# --------------------------------------------------------------------------------------------------------------
def _device_type(tensors: tuple) -> str:
    return next(tensor.device.type for tensor in tensors if isinstance(tensor, torch.Tensor))


def autocast_forward(cast_inputs: torch.dtype | None = None) -> Callable:
    """``torch.amp.custom_fwd`` for the device type of the forward's tensors.

    ``custom_fwd`` declares one device type, and these functions run on CPUs and GPUs alike: the declaration
    is made per device type at the call. ``cast_inputs``: under autocast, floating inputs are cast to this dtype
    and the forward (and backward) run with autocast off; None: they run in the current autocast state.
    """

    def decorate(forward: Callable) -> Callable:
        declared: dict[str, Callable] = {}

        @functools.wraps(forward)
        def forward_on_device(ctx, *inputs):
            device_type = _device_type(inputs)
            if device_type not in declared:
                declared[device_type] = torch.amp.custom_fwd(forward, device_type=device_type, cast_inputs=cast_inputs)
            return declared[device_type](ctx, *inputs)

        return forward_on_device

    return decorate


def autocast_backward(backward: Callable) -> Callable:
    """``torch.amp.custom_bwd`` for the device type of the incoming gradients: backward runs under the autocast
    state (and dtype) its forward ran under, even when ``backward()`` is called outside the autocast region."""
    declared: dict[str, Callable] = {}

    @functools.wraps(backward)
    def backward_on_device(ctx, *grad_outputs):
        device_type = _device_type(grad_outputs)
        if device_type not in declared:
            declared[device_type] = torch.amp.custom_bwd(backward, device_type=device_type)
        return declared[device_type](ctx, *grad_outputs)

    return backward_on_device


# --------------------------------------------------------------------------------------------------------------
# QuickGELU and a CLIP MLP's second layer
# --------------------------------------------------------------------------------------------------------------
def quick_gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` with the same operations in one temporary, where the expression allocates
    three (no autograd through it)."""
    return x.mul(1.702).sigmoid_().mul_(x)


def quick_gelu_bwd(x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Gradient of ``quick_gelu_fwd`` w.r.t. x, with the sigmoid recomputed from x: the operations autograd
    forms for ``x * sigmoid(1.702 x)`` (the same bits), in two temporaries where the expression allocates six."""
    gate = x.mul(1.702).sigmoid_()
    through_sigmoid = grad_output.mul(x)
    torch.ops.aten.sigmoid_backward(through_sigmoid, gate, grad_input=through_sigmoid).mul_(1.702)
    return gate.mul_(grad_output).add_(through_sigmoid)


def quick_gelu_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(quick_gelu(x), weight, bias)``: a CLIP MLP after its first layer (x: the first layer's output)."""
    return F.linear(quick_gelu_fwd(x), weight, bias)


def quick_gelu_linear_bwd(
    x: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor, needs_input_grad: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``quick_gelu_linear_fwd`` w.r.t. (x, weight, bias), each None where not needed; the
    activation is recomputed from x."""
    grad_x = quick_gelu_bwd(x, grad_output @ weight) if needs_input_grad[0] else None
    grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
    grad_weight = None
    if needs_input_grad[1]:
        grad_weight = grad_rows.t() @ quick_gelu_fwd(x).reshape(-1, x.shape[-1])
    grad_bias = grad_rows.sum(0) if needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


class QuickGELULinearFunction(torch.autograd.Function):
    """QuickGELU and a linear layer keeping only the activation's input (and the weight) for backward, where
    autograd keeps the input and the activation, both as large as the MLP's hidden layer. Backward computes
    in the forward product's dtype (autocast may have lowered it); autograd casts the gradients back to the
    inputs' dtypes."""

    @staticmethod
    @autocast_forward()
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = quick_gelu_linear_fwd(x, weight, bias)
        ctx.compute_dtype = out.dtype
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = (tensor.to(ctx.compute_dtype) for tensor in ctx.saved_tensors)
        return quick_gelu_linear_bwd(x, weight, grad_output.to(ctx.compute_dtype), ctx.needs_input_grad)


class MemoryLeanCLIPMLP(CLIPMLP):
    """CLIP's MLP with the same parameters and values, keeping one hidden-layer-sized tensor for backward
    instead of three (the first layer's output, the activation's sigmoid and its output).

    Gradients flow through the frozen towers (region highlighting, highlighted captions), where the MLP
    activations are the largest tensors kept for backward. Without gradients, the activation takes one
    temporary instead of three.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        return QuickGELULinearFunction.apply(hidden_states, self.fc2.weight, self.fc2.bias)

    @classmethod
    def replacing(cls, mlp: CLIPMLP) -> MemoryLeanCLIPMLP:
        """The same MLP (its layers shared) as a ``MemoryLeanCLIPMLP``."""
        with torch.device("meta"):
            lean = cls(mlp.config)
        lean.fc1, lean.fc2 = mlp.fc1, mlp.fc2
        return lean


# --------------------------------------------------------------------------------------------------------------
# Total variation
# --------------------------------------------------------------------------------------------------------------
def _neighbour_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and horizontal neighbour differences over the last two dims of x."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def total_variation_fwd(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertical plus horizontal neighbours over the last two dims of x."""
    vertical, horizontal = _neighbour_differences(x)
    return vertical.abs().mean() + horizontal.abs().mean()


def total_variation_bwd(x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Gradient of ``total_variation_fwd`` w.r.t. x: each difference's sign, spread to its two pixels."""
    grad = torch.zeros_like(x)
    vertical, horizontal = _neighbour_differences(x)
    for difference, dim in ((vertical, -2), (horizontal, -1)):
        step = difference.sign_().mul_(grad_output / difference.numel())
        size = x.shape[dim] - 1
        grad.narrow(dim, 1, size).add_(step)
        grad.narrow(dim, 0, size).sub_(step)
    return grad


class TotalVariationFunction(torch.autograd.Function):
    """Total variation keeping only x for backward (alive anyway), where autograd keeps both differences.

    A loss: under autocast it runs in float32, as autocast runs ``l1_loss``, and keeps the float32 copy of x.
    """

    @staticmethod
    @autocast_forward(cast_inputs=torch.float32)
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return total_variation_fwd(x)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return total_variation_bwd(x, grad_output)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertical plus horizontal neighbours over the last two dims of x."""
    return TotalVariationFunction.apply(x)


# --------------------------------------------------------------------------------------------------------------
# Patch embedding, and the swap of CLIP's layers
# --------------------------------------------------------------------------------------------------------------
class PatchEmbeddingConv2d(nn.Conv2d):
    """A convolution whose stride equals its kernel (a ViT patch embedding), computed as one matrix product of
    the non-overlapping patches: the values of ``nn.Conv2d`` up to float rounding, with the same parameters.

    Region highlighting backpropagates into the image through the frozen patch embedding, where the strided
    convolution's input gradient is far slower on a CPU than the matrix product's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, H, W] -> [B, C_out, H // k, W // k] (k the kernel size; trailing pixels dropped, as the
        convolution does), a channels-last strided view."""
        batch, channels = x.shape[:2]
        kernel_height, kernel_width = self.kernel_size
        height, width = x.shape[2] // kernel_height, x.shape[3] // kernel_width
        patches = x[:, :, : height * kernel_height, : width * kernel_width]
        patches = patches.reshape(batch, channels, height, kernel_height, width, kernel_width)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, height * width, -1)
        out = F.linear(patches, self.weight.view(self.out_channels, -1), self.bias)
        return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> PatchEmbeddingConv2d | nn.Conv2d:
        """The same layer (its parameters shared) as a ``PatchEmbeddingConv2d``; any other convolution as it is."""
        plain_patches = (
            conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
        )
        if not plain_patches or isinstance(conv, cls):
            return conv
        patch_conv = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         bias=conv.bias is not None, device="meta")
        patch_conv.weight, patch_conv.bias = conv.weight, conv.bias
        return patch_conv


def use_memory_lean_layers(module: nn.Module) -> nn.Module:
    """Swap CLIP's layers inside ``module`` (in place) for ones with the same values and parameters that keep
    less for backward or compute their gradients faster; returns ``module``.

    - every QuickGELU CLIP MLP, frozen or not -> ``MemoryLeanCLIPMLP``, sharing its layers;
    - the patch convolution of every CLIP vision embedding -> ``PatchEmbeddingConv2d``, sharing its parameters.

    Configs and saved weights do not change: the configs keep ``hidden_act="quick_gelu"`` and both keep their
    parameters under the same names. Call it
    once the layers are built and before weights are loaded or initialised (it shares, never copies, them).
    """
    for submodule in list(module.modules()):
        for name, child in list(submodule.named_children()):
            if type(child) is CLIPMLP and isinstance(child.activation_fn, QuickGELUActivation):
                setattr(submodule, name, MemoryLeanCLIPMLP.replacing(child))
        if isinstance(submodule, CLIPVisionEmbeddings):
            submodule.patch_embedding = PatchEmbeddingConv2d.replacing(submodule.patch_embedding)
    return module


# --------------------------------------------------------------------------------------------------------------
# The masker decoder's 3×3 convolution of a nearest-×2 upsampled map, from tap products (docs/method.md#masker)
# --------------------------------------------------------------------------------------------------------------
# Side of the tiles in which matrices are transposed: transposed in one go, one of the two matrices is walked
# with a stride of a whole row, and every element read or written misses the cache.
TRANSPOSE_TILE = 768


def transposed_in_tiles(matrix: torch.Tensor) -> torch.Tensor:
    """A 2-D matrix's transpose as a contiguous copy, made tile by tile: ``matrix.t().contiguous()``."""
    rows, columns = matrix.shape
    out = matrix.new_empty(columns, rows)
    for row in range(0, rows, TRANSPOSE_TILE):
        for column in range(0, columns, TRANSPOSE_TILE):
            tile = matrix[row : row + TRANSPOSE_TILE, column : column + TRANSPOSE_TILE]
            out[column : column + TRANSPOSE_TILE, row : row + TRANSPOSE_TILE].copy_(tile.t())
    return out


def tap_layout(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution weight [C_out, C_in, 3, 3] as one matrix [C_in, 3 * 3 * C_out] (row tap, column tap,
    output channel): a copy, since no view of the weight has that layout. It is the transpose of the weight
    seen as [C_out, C_in * 3 * 3]."""
    return transposed_in_tiles(weight.reshape(weight.shape[0], -1)).view(weight.shape[1], -1)


def kernel_layout(taps: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tap_layout``: [C_in, 3 * 3 * C_out] -> a contiguous [C_out, C_in, 3, 3]."""
    in_channels = taps.shape[0]
    return transposed_in_tiles(taps.reshape(in_channels * 9, -1)).view(-1, in_channels, 3, 3)


def tap_products_fwd(activated: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """activated [M, C_in] -> its products with every kernel tap [M, 9 * C_out] (tap-major)."""
    return activated @ tap_layout(weight)


def tap_products_bwd(
    activated: torch.Tensor, weight: torch.Tensor, grad_taps: torch.Tensor, needs_input_grad: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``tap_products_fwd`` w.r.t. (activated, weight), each None where not needed."""
    grad_activated = grad_taps @ tap_layout(weight).t() if needs_input_grad[0] else None
    grad_weight = kernel_layout(activated.t() @ grad_taps) if needs_input_grad[1] else None
    return grad_activated, grad_weight


class TapProductsFunction(torch.autograd.Function):
    """Tap products keeping the weight itself for backward and laying it out again there, where autograd would
    keep the laid-out copy from forward to backward. Under autocast, backward's matrix products run in the
    forward product's lowered dtype, as autograd's own would; autograd casts the gradients back to the inputs'
    dtypes."""

    @staticmethod
    @autocast_forward()
    def forward(ctx, activated: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(activated, weight)
        return tap_products_fwd(activated, weight)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_taps: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        activated, weight = ctx.saved_tensors
        return tap_products_bwd(activated, weight, grad_taps, ctx.needs_input_grad)


def tap_products(activated: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """activated [M, C_in], 3×3 weight [C_out, C_in, 3, 3] -> [M, 9 * C_out] (tap-major), lean for backward."""
    return TapProductsFunction.apply(activated, weight)


def _sum_phase_taps(taps: torch.Tensor, axis: int, phase: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the three 3×3-kernel taps along one spatial axis for one output phase of a nearest-×2 upsampled map.

    ``taps`` holds, per low-resolution position along ``axis``, the products of the three kernel offsets
    (0, 1, 2) on dimension ``axis + 2``. Output row ``2i + phase`` reads the upsampled rows ``2i + phase - 1``,
    ``2i + phase``, ``2i + phase + 1``, i.e. low-resolution rows (i-1, i, i) for phase 0 and (i, i, i+1) for
    phase 1; a neighbour outside the map is the convolution's zero padding. Returns ``taps`` without the
    offset dimension, written to ``out`` when given.
    """
    size = taps.shape[axis]
    offset = [taps.select(axis + 2, k) for k in range(3)]
    if phase == 0:
        total = torch.add(offset[1], offset[2], out=out)
        total.narrow(axis, 1, size - 1).add_(offset[0].narrow(axis, 0, size - 1))
    else:
        total = torch.add(offset[0], offset[1], out=out)
        total.narrow(axis, 0, size - 1).add_(offset[2].narrow(axis, 1, size - 1))
    return total


def _spread_phase_grads(phase0: torch.Tensor, phase1: torch.Tensor, axis: int, taps: torch.Tensor, dim: int) -> None:
    """Adjoint of ``_sum_phase_taps``: gradients of both output phases -> gradients of the 3 taps (written to
    ``taps.select(dim, k)``). Tap 0 feeds phase 0 one row down and phase 1 in place; tap 1 both in place; tap 2
    phase 0 in place and phase 1 one row up."""
    size = phase0.shape[axis]
    first, middle, last = (taps.select(dim, k) for k in range(3))
    first.copy_(phase1).narrow(axis, 0, size - 1).add_(phase0.narrow(axis, 1, size - 1))
    torch.add(phase0, phase1, out=middle)
    last.copy_(phase0).narrow(axis, 1, size - 1).add_(phase1.narrow(axis, 0, size - 1))


def _shifted_phase_taps(taps: torch.Tensor, axis: int, phase: int) -> torch.Tensor:
    """``_sum_phase_taps`` without writes into slices: the neighbour's taps shifted by concatenating a zero row.
    Same additions in the same order, so the same values."""
    size = taps.shape[axis]
    offset = [taps.select(axis + 2, k) for k in range(3)]
    border = torch.zeros_like(offset[0].narrow(axis, 0, 1))
    if phase == 0:
        return offset[1] + offset[2] + torch.cat([border, offset[0].narrow(axis, 0, size - 1)], dim=axis)
    return offset[0] + offset[1] + torch.cat([offset[2].narrow(axis, 1, size - 1), border], dim=axis)


def phase_sum_fwd(taps: torch.Tensor) -> torch.Tensor:
    """Tap products [B, H, W, 3, 3, C] -> the 3×3 convolution of the nearest-×2 upsampled map as its four
    phases [B, H, 2, W, 2, C] (row phase, column phase; no bias).

    Under ``torch.export`` (the ONNX export) the phases are stacked instead of written into slices of the
    output, which the exporter turns into scatters over the whole output (slow in onnxruntime).
    """
    if torch.compiler.is_exporting():
        column_sums = [_shifted_phase_taps(taps, 2, column_phase) for column_phase in range(2)]
        return torch.stack(
            [torch.stack([_shifted_phase_taps(sums, 1, row_phase) for sums in column_sums], dim=3)
             for row_phase in range(2)],
            dim=2,
        )
    batch, height, width, _, _, channels = taps.shape
    out = taps.new_empty(batch, height, 2, width, 2, channels)
    for column_phase in range(2):
        column_sums = _sum_phase_taps(taps, 2, column_phase)  # [B, H, W, row tap, C]
        for row_phase in range(2):
            _sum_phase_taps(column_sums, 1, row_phase, out=out[:, :, row_phase, :, column_phase])
    return out


def phase_sum_bwd(grad_out: torch.Tensor) -> torch.Tensor:
    """Gradient of ``phase_sum_fwd`` w.r.t. the tap products: [B, H, 2, W, 2, C] -> [B, H, W, 3, 3, C]."""
    batch, height, _, width, _, channels = grad_out.shape
    column_sums = grad_out.new_empty(batch, height, width, 3, 2, channels)  # [.., row tap, column phase, C]
    for column_phase in range(2):
        _spread_phase_grads(grad_out[:, :, 0, :, column_phase], grad_out[:, :, 1, :, column_phase], 1,
                            column_sums[..., column_phase, :], 3)
    taps = grad_out.new_empty(batch, height, width, 3, 3, channels)
    _spread_phase_grads(column_sums[..., 0, :], column_sums[..., 1, :], 2, taps, 4)
    return taps


class UpsampledConvPhaseSumFunction(torch.autograd.Function):
    """The phase sums with a hand-written backward: autograd's would allocate and fill a zero tensor of the
    full tap size for every slice the forward reads. Sums in the taps' dtype, as autocast leaves additions."""

    @staticmethod
    @autocast_forward()
    def forward(ctx, taps: torch.Tensor) -> torch.Tensor:
        return phase_sum_fwd(taps)

    @staticmethod
    @autocast_backward
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        return phase_sum_bwd(grad_out)


def _add_row_taps(out: torch.Tensor, row_taps: torch.Tensor) -> None:
    """out [B, W, column phase, C] += one neighbouring row's products with one row of kernel taps, column-summed.

    row_taps [B, W, 3, C] (the row's three column taps)."""
    batch, width, _, channels = row_taps.shape
    taps = row_taps.view(batch, 1, width, 1, 3, channels)
    for column_phase in range(2):
        out[:, :, column_phase] += _sum_phase_taps(taps, 2, column_phase)[:, 0, :, 0]


def upsampled_conv3x3(
    activated: torch.Tensor, weight: torch.Tensor, tap_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The 3×3 convolution (zero padding 1, no bias) of the nearest-×2 upsampled map.

    activated: [B, H, W, C_in] channels last; weight: [C_out, C_in, 3, 3]. Returns the output as phases
    [B, H, 2, W, 2, C_out] (row phase, column phase), i.e. [B, 2H, 2W, C_out] once viewed so.
    ``tap_weights``: ``tap_layout(weight)`` computed beforehand, used where no gradient is needed; by default
    the weight is laid out in the call.

    Every output pixel of the convolution of the upsampled map sums 9 taps read at low-resolution positions,
    so each tap's product is computed once per low-resolution pixel (one [C_in, 9 C_out] matrix product) and
    the four output phases add shifted slices of it: 9 products per low-resolution pixel, where four 2×2 phase
    convolutions need 16 and the convolution of the upsampled map 36.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or activated.requires_grad):
        batch, height, width, channels = activated.shape
        taps = tap_products(activated.reshape(-1, channels), weight).view(batch, height, width, 3, 3, -1)
    else:
        taps = _laid_out_taps(activated, tap_layout(weight) if tap_weights is None else tap_weights)
    return UpsampledConvPhaseSumFunction.apply(taps)


def _laid_out_taps(activated: torch.Tensor, tap_weights: torch.Tensor) -> torch.Tensor:
    """activated [B, H, W, C_in] times the laid-out kernel, as one 2-D matrix product -> [B, H, W, 3, 3, C_out]."""
    batch, height, width, channels = activated.shape
    return (activated.reshape(-1, channels) @ tap_weights).view(batch, height, width, 3, 3, -1)


@torch.no_grad()
def upsampled_conv3x3_bands(
    activated_bands: Iterable[torch.Tensor], weight: torch.Tensor, tap_weights: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """``upsampled_conv3x3`` of a map given as consecutive bands of rows (no gradients): yields each band's
    output phases [B, n, 2, W, 2, C_out], in order, for bands [B, n, W, C_in] of the activated map.
    ``tap_weights`` as there.

    Each band's tap products are computed once, in one matrix product. The rows next to a band reach into it
    through one row of taps each, and those come from the neighbouring bands' products: the row above from
    the band before (its last row, kept), the row below from the band after, so that a band is yielded once
    the next band's products exist. At the map's top and bottom the convolution reads its zero padding.
    """
    tap_weights = tap_layout(weight) if tap_weights is None else tap_weights
    pending = None  # the band waiting for the row below
    above = None  # the previous band's last row of taps, first kernel row: [B, W, 3, C_out]
    for activated in activated_bands:
        taps = _laid_out_taps(activated, tap_weights)
        out = phase_sum_fwd(taps)
        if above is not None:  # the row above feeds the band's first row (row phase 0), first taps row
            _add_row_taps(out[:, 0, 0], above)
        if pending is not None:  # this band's first row feeds the band before's last row (phase 1), last taps row
            _add_row_taps(pending[:, -1, 1], taps[:, 0, :, 2])
        above = taps[:, -1, :, 0].clone()
        del taps  # not held while the band before is consumed
        if pending is not None:
            yield pending
        pending = out
    if pending is not None:
        yield pending


# --------------------------------------------------------------------------------------------------------------
# CLIP blocks evaluated for less
# --------------------------------------------------------------------------------------------------------------
def causal_attention_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, length, length] mask hiding future positions."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu_(1)
    return mask[None, None]


def self_only_attention_block(layer: CLIPEncoderLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder block where every token attends only to itself (the MaskCLIP trick).

    With a single key the softmax is 1, so attention reduces to ``out_proj(v_proj(ln_1(x)))`` per token.
    hidden_states: [B, T, W] -> [B, T, W].
    """
    attention = layer.self_attn
    hidden_states = hidden_states + attention.out_proj(attention.v_proj(layer.layer_norm1(hidden_states)))
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def class_token_block(layer: CLIPEncoderLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """A CLIP vision block evaluated at the class token only: [B, T, W] -> [B, 1, W].

    Keys and values come from every token; the query, output projection and MLP run for the class token
    alone, which is all a global embedding reads from the last block.
    """
    attention = layer.self_attn
    batch = hidden_states.shape[0]
    normed = layer.layer_norm1(hidden_states)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attention.num_heads, attention.head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        heads(attention.q_proj(normed[:, :1])), heads(attention.k_proj(normed)), heads(attention.v_proj(normed)),
        scale=attention.scale,
    )
    class_token = hidden_states[:, :1] + attention.out_proj(context.transpose(1, 2).reshape(batch, 1, -1))
    return class_token + layer.mlp(layer.layer_norm2(class_token))


@dataclass
class PackedSequences:
    """Index plan for running variable-length causal sequences stored back to back as one [T, W] token matrix.

    Sequence r holds ``lengths[r]`` consecutive tokens; with a parent it continues that sequence, i.e. its
    tokens attend to all of the parent's tokens, then causally to its own. Rows that share a prefix thus store
    and compute it once, and the per-token layers run on one matrix with no padding.

    Fields (R sequences, S = longest sequence, P = longest parent):
        query_index: [R, S] packed position of each sequence's tokens (padding repeats its last token).
        key_index: [R, P + S] packed positions of the keys each sequence sees: its parent's, then its own.
        attention_mask: [R, 1, S, P + S] which keys each query may see.
        is_token: [R, S] which query slots are real tokens; ``x[is_token]`` is back in packed order.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    attention_mask: torch.Tensor
    is_token: torch.Tensor

    @classmethod
    def build(cls, lengths: list[int], parents: list[int], device: torch.device) -> PackedSequences:
        """lengths: tokens per sequence (each >= 1); parents: index of an earlier sequence, or -1 for none."""
        lengths_ = torch.tensor(lengths, device=device)
        parents_ = torch.tensor(parents, device=device)
        offsets = lengths_.cumsum(0) - lengths_
        has_parent = parents_ >= 0
        parent = parents_.clamp(min=0)
        parent_lengths = torch.where(has_parent, lengths_[parent], 0)

        def slots(starts: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            steps = torch.arange(width, device=device)
            index = starts[:, None] + torch.minimum(steps[None], (counts[:, None] - 1).clamp(min=0))
            return index, steps[None] < counts[:, None]

        query_index, is_token = slots(offsets, lengths_, max(lengths))
        parent_index, is_parent_token = slots(offsets[parent], parent_lengths, int(parent_lengths.max()))
        span = query_index.shape[1]
        causal = torch.ones(span, span, dtype=torch.bool, device=device).tril_()
        attention_mask = torch.cat(
            [is_parent_token[:, None].expand(-1, span, -1), causal[None] & is_token[:, None]], dim=2
        )
        return cls(query_index, torch.cat([parent_index, query_index], 1), attention_mask[:, None], is_token)


def pack_prefix_groups(
    groups: list[tuple[torch.Tensor, torch.Tensor, int]], position_embeddings: torch.Tensor
) -> tuple[torch.Tensor, PackedSequences, torch.Tensor]:
    """Groups of causal sequences packed back to back, each group's shared prefix stored once.

    Each group is (inputs_embeds [N, L, W], eos_index [N], prefix_length): its rows share their first
    ``prefix_length`` word embeddings (each eos_index >= prefix_length). The prefix becomes a parent sequence
    and each row continues it up to its own EOS; position_embeddings [>= L, W] are added to every token.
    Returns (tokens [T, W], their plan, eos_rows: the packed position of every row's EOS, groups in order).
    """
    pieces, lengths, parents, eos_rows = [], [], [], []
    for inputs_embeds, eos_index, prefix_length in groups:
        parent = -1
        if prefix_length:
            parent = len(lengths)
            pieces.append(inputs_embeds[0, :prefix_length] + position_embeddings[:prefix_length])
            lengths.append(prefix_length)
            parents.append(-1)
        row_lengths = eos_index - prefix_length + 1
        end = int(eos_index.max()) + 1
        is_token = torch.arange(end - prefix_length, device=eos_index.device)[None] < row_lengths[:, None]
        pieces.append((inputs_embeds[:, prefix_length:end] + position_embeddings[prefix_length:end])[is_token])
        eos_rows.append(sum(lengths) + row_lengths.cumsum(0) - 1)
        lengths.extend(row_lengths.tolist())
        parents.extend([parent] * len(eos_index))
    packing = PackedSequences.build(lengths, parents, position_embeddings.device)
    return torch.cat(pieces), packing, torch.cat(eos_rows)


def causal_block_packed(layer: CLIPEncoderLayer, hidden_states: torch.Tensor, packing: PackedSequences) -> torch.Tensor:
    """A causal CLIP text block over packed sequences: hidden_states [T, W] -> [T, W] (plan: ``packing``)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden_states)
    rows = packing.query_index.shape[0]

    def heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x[index].view(rows, index.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        heads(attention.q_proj(normed), packing.query_index),
        heads(attention.k_proj(normed), packing.key_index),
        heads(attention.v_proj(normed), packing.key_index),
        attn_mask=packing.attention_mask,
        scale=attention.scale,
    )
    context = context.transpose(1, 2).reshape(rows, packing.query_index.shape[1], -1)[packing.is_token]
    hidden_states = hidden_states + attention.out_proj(context)
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


# --------------------------------------------------------------------------------------------------------------
# Hard masks with straight-through gradients
# --------------------------------------------------------------------------------------------------------------
def gumbel_sigmoid_straight_through(logits: torch.Tensor, tau: float = 1.0, noise: bool = True) -> torch.Tensor:
    """Hard {0, 1} masks sampled with logistic (Gumbel-difference) noise, with straight-through gradients.

    ``y = sigmoid((logits + log(u / (1 - u))) / tau)``, ``u ~ U(0, 1)``; returns ``(y > 0.5) - y.detach() + y``.
    Without ``noise`` the logits are thresholded at 0 (same gradients, deterministic).
    """
    if noise:
        uniform = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + torch.log(uniform) - torch.log1p(-uniform)
    soft = torch.sigmoid(logits / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


__all__ = [
    "MemoryLeanCLIPMLP",
    "PackedSequences",
    "PatchEmbeddingConv2d",
    "QuickGELULinearFunction",
    "TapProductsFunction",
    "TotalVariationFunction",
    "UpsampledConvPhaseSumFunction",
    "autocast_backward",
    "autocast_forward",
    "causal_attention_mask",
    "causal_block_packed",
    "class_token_block",
    "gumbel_sigmoid_straight_through",
    "kernel_layout",
    "pack_prefix_groups",
    "phase_sum_bwd",
    "phase_sum_fwd",
    "quick_gelu_bwd",
    "quick_gelu_fwd",
    "quick_gelu_linear_bwd",
    "quick_gelu_linear_fwd",
    "self_only_attention_block",
    "tap_layout",
    "tap_products",
    "tap_products_bwd",
    "tap_products_fwd",
    "total_variation",
    "total_variation_bwd",
    "total_variation_fwd",
    "transposed_in_tiles",
    "upsampled_conv3x3",
    "upsampled_conv3x3_bands",
    "use_memory_lean_layers",
]
