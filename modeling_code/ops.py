"""Operations of CoDe written for less memory or less work, each computing the values of a direct computation.

- Memory-lean autograd functions, shaped like timm's ``layers/activations_me.py``: for each op plain
  ``*_fwd``/``*_bwd`` functions, an autograd ``Function`` calling them that saves only its inputs for backward,
  and the thin module or functional wrapper the model uses. QuickGELU (``MemoryLeanQuickGELU``) and total
  variation (``total_variation``).
- ``PatchEmbeddingConv2d``: a ViT patch embedding as one matrix product.
- ``use_memory_lean_layers``: swaps CLIP's layers inside a module for the memory-lean ones, in place.
- CLIP blocks evaluated for less: self-only attention, the class token alone, and causal text sequences
  packed back to back (``PackedSequences``, ``causal_block_packed``).

Only torch and transformers are imported: the package also runs as Hub remote code from a flat folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import QuickGELUActivation
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPEncoderLayer, CLIPVisionEmbeddings


# --------------------------------------------------------------------------------------------------------------
# QuickGELU
# --------------------------------------------------------------------------------------------------------------
def quick_gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_bwd(x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Gradient of ``quick_gelu_fwd`` w.r.t. x, with the sigmoid recomputed from x."""
    gate = torch.sigmoid(1.702 * x)
    # the products autograd forms for x * sigmoid(1.702 x): d/dx through x, then through the sigmoid
    return grad_output * gate + 1.702 * torch.ops.aten.sigmoid_backward(grad_output * x, gate)


class QuickGELUFunction(torch.autograd.Function):
    """QuickGELU keeping only x for backward, where autograd keeps x and the sigmoid."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return quick_gelu_fwd(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return quick_gelu_bwd(x, grad_output)


class MemoryLeanQuickGELU(nn.Module):
    """CLIP's QuickGELU with the same values, saving one tensor for backward instead of two.

    Gradients flow through the frozen towers (region highlighting, highlighted captions), where the MLP
    activations are the largest tensors kept for backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuickGELUFunction.apply(x)


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
    """Total variation keeping only x for backward (alive anyway), where autograd keeps both differences."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return total_variation_fwd(x)

    @staticmethod
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

    - the QuickGELU of every CLIP-style MLP, frozen or not -> ``MemoryLeanQuickGELU``;
    - the patch convolution of every CLIP vision embedding -> ``PatchEmbeddingConv2d``, sharing its parameters.

    Configs and saved weights do not change: the activation holds no parameters and the configs keep
    ``hidden_act="quick_gelu"``; the patch convolution keeps its parameters under the same names. Call it
    once the layers are built and before weights are loaded or initialised (it shares, never copies, them).
    """
    for submodule in list(module.modules()):
        if isinstance(submodule, CLIPMLP) and isinstance(submodule.activation_fn, QuickGELUActivation):
            submodule.activation_fn = MemoryLeanQuickGELU()
        elif isinstance(submodule, CLIPVisionEmbeddings):
            submodule.patch_embedding = PatchEmbeddingConv2d.replacing(submodule.patch_embedding)
    return module


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


__all__ = [
    "MemoryLeanQuickGELU",
    "PackedSequences",
    "PatchEmbeddingConv2d",
    "QuickGELUFunction",
    "TotalVariationFunction",
    "causal_attention_mask",
    "causal_block_packed",
    "class_token_block",
    "quick_gelu_bwd",
    "quick_gelu_fwd",
    "self_only_attention_block",
    "total_variation",
    "total_variation_bwd",
    "total_variation_fwd",
    "use_memory_lean_layers",
]
