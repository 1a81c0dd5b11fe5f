"""The masker, CoDe's trainable image side (docs/method.md#masker).

CLIP's last vision block copied and run with self-only attention, two nearest-x2 upsampling residual blocks and a
projection to the joint embedding: hidden states entering CLIP's last block -> unit-norm pixel embeddings
``E [B, C, 4h, 4w]``. At inference the last decoder block and the projection can run in row bands
(``CoDeMasker.bands``), so their large temporaries stay small.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .configuration_code import CoDeConfig
from .ops import self_only_attention_block, upsampled_conv3x3, upsampled_conv3x3_bands

# Inference computes the decoder's last block in row bands whose tap products stay this small. On the CPU,
# window by window: temporaries of this size are reused by the C allocator; tens of MB would be fresh pages
# (page faults and zeroing) on every window.
BAND_TAP_BYTES = 24 * 2**20
# On an accelerator its caching allocator reuses blocks of any size, and every band and window is a round of
# kernel launches: the whole batch of windows goes through together, in bands only past this size (a 448x448
# ViT-B/16 window's last block takes about 87 MB of float32 tap products).
ACCELERATOR_BAND_TAP_BYTES = 2**30


def inference_band_plan(device_type: str) -> tuple[bool, int]:
    """How inference runs the masker's last block on a device type: (window by window, tap bytes per band)."""
    if device_type == "cpu":
        return True, BAND_TAP_BYTES
    return False, ACCELERATOR_BAND_TAP_BYTES


class CoDeLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CoDeUpsampleBlock(nn.Module):
    """Pre-activation residual block: ``up(x) + tanh(gate) * conv3x3(GELU(LN(up(x))))`` with ``up`` nearest ×2.

    Computed on channels-last [B, H, W, C] maps with less work than the definition (docs/method.md#masker):
    LayerNorm and GELU act per pixel, so they commute with nearest upsampling and run at low resolution; the
    convolution of the upsampled map is computed from low-resolution tap products (``ops.upsampled_conv3x3``).
    """

    def __init__(self, config: CoDeConfig):
        super().__init__()
        width = config.clip_config.vision_config.hidden_size
        self.norm = CoDeLayerNorm2d(width, eps=config.clip_config.vision_config.layer_norm_eps)
        self.conv = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.gate = nn.Parameter(torch.tensor(float(config.decoder_gate_init)))
        self.tap_weights: torch.Tensor | None = None  # the kernel laid out, inside CoDeModel.prepared_for_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, 2H, 2W, C] (channels last)."""
        batch, height, width, channels = x.shape
        out = upsampled_conv3x3(self._activated(x), self.conv.weight, self.tap_weights)
        return self._gated_residual(out, x).view(batch, 2 * height, 2 * width, channels)

    def bands(self, x: torch.Tensor, band_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The same output in bands of ``band_rows`` input rows (inference, no gradients): yields (first output
        row, band [B, 2 n, 2W, C]) in order; each band's kernel products are computed once
        (``ops.upsampled_conv3x3_bands``)."""
        batch, height, width, channels = x.shape
        starts = range(0, height, band_rows)
        activated = (self._activated(x[:, start : start + band_rows]) for start in starts)
        for start, out in zip(starts, upsampled_conv3x3_bands(activated, self.conv.weight, self.tap_weights)):
            rows = out.shape[1]
            band = self._gated_residual(out, x[:, start : start + rows])
            yield 2 * start, band.view(batch, 2 * rows, 2 * width, channels)

    def _activated(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(LN(x)) per pixel, at low resolution."""
        return F.gelu(F.layer_norm(x, (x.shape[-1],), self.norm.weight, self.norm.bias, self.norm.eps))

    def _gated_residual(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Convolution phases [B, n, 2, W, 2, C] -> bias, ``tanh(gate)`` and the upsampled input x [B, n, W, C]
        added, in place."""
        return out.add_(self.conv.bias).mul_(torch.tanh(self.gate)).add_(x[:, :, None, :, None])


class CoDeMaskerDecoder(nn.Module):
    """Stack of upsampling blocks, ×2 each: [B, h, w, C] -> [B, h * 2^n, w * 2^n, C] (channels last)."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        self.blocks = nn.ModuleList([CoDeUpsampleBlock(config) for _ in range(config.decoder_num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def bands(self, x: torch.Tensor, max_tap_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The same output, the last block in bands of input rows whose tap products fit ``max_tap_bytes``:
        yields (first output row, band [B, rows, W', C]). The full-resolution map never exists at once."""
        for block in self.blocks[:-1]:
            x = block(x)
        batch, _, width, channels = x.shape
        band_rows = max(1, max_tap_bytes // (batch * width * 9 * channels * x.element_size()))
        yield from self.blocks[-1].bands(x, band_rows)


class CoDeMaskerProjection(nn.Module):
    """Per-pixel LayerNorm + linear W_v -> C (no bias), initialised from CLIP's post-LN and visual projection."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        vision = config.clip_config.vision_config
        self.layer_norm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.proj = nn.Linear(vision.hidden_size, config.clip_config.projection_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, W_v] (channels last) -> [B, H, W, C]."""
        return self.proj(self.layer_norm(x))


class CoDeMasker(nn.Module):
    """Trainable image side: CLIP last-block copy (self-only attention), decoder, projection, L2 norm."""

    def __init__(self, config: CoDeConfig):
        super().__init__()
        self.backbone_block = CLIPEncoderLayer(config.clip_config.vision_config)
        self.decoder = CoDeMaskerDecoder(config)
        self.projection = CoDeMaskerProjection(config)

    def forward(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """hidden_states: [B, 1 + h*w, W_v] entering CLIP's last block -> spatial embeddings E [B, C, 4h, 4w].

        E is unit-norm over C; it is computed channels last, and returned as a (channels-last strided) view.
        The whole batch in one pass, without row bands: the training path, and the one to trace
        (``torch.export``, ONNX).
        """
        feature_map = self._feature_map(hidden_states, grid_size)
        return self._embed(self.decoder(feature_map))

    def bands(
        self, hidden_states: torch.Tensor, grid_size: tuple[int, int], max_tap_bytes: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The same E in bands of rows: yields (first row, E band [B, C, rows, 4w]).

        For inference: the decoder's last block and the projection run band by band, so their large
        temporaries (the tap products, the W_v-wide map at full resolution) stay bounded: by ``max_tap_bytes``
        of tap products per band, by default the device's (``inference_band_plan``).
        """
        if max_tap_bytes is None:
            max_tap_bytes = inference_band_plan(hidden_states.device.type)[1]
        feature_map = self._feature_map(hidden_states, grid_size)
        for start, band in self.decoder.bands(feature_map, max_tap_bytes):
            yield start, self._embed(band)

    def _feature_map(self, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Backbone block (self-only attention), class token dropped: [B, 1 + h*w, W_v] -> [B, h, w, W_v]."""
        hidden_states = self_only_attention_block(self.backbone_block, hidden_states)
        return hidden_states[:, 1:].reshape(hidden_states.shape[0], *grid_size, -1)

    def _embed(self, decoded: torch.Tensor) -> torch.Tensor:
        """Projection and L2 norm: decoded [B, H, W, W_v] -> E [B, C, H, W] (a channels-last strided view)."""
        return F.normalize(self.projection(decoded), dim=-1).permute(0, 3, 1, 2)


__all__ = [
    "ACCELERATOR_BAND_TAP_BYTES",
    "BAND_TAP_BYTES",
    "CoDeLayerNorm2d",
    "CoDeMasker",
    "CoDeMaskerDecoder",
    "CoDeMaskerProjection",
    "CoDeUpsampleBlock",
    "inference_band_plan",
]
