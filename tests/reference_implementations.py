"""Reference implementations: what the library computes with less work, written out as defined.

Each function takes the model (or module) as an argument and computes directly what a library path computes
faster; the tests compare the two. Nothing here is optimised, and the library never calls it.

- masker: the upsampling block, the decoder and the masker on [B, C, H, W] maps, with the plain convolution
  of the nearest-×2 upsampled map (library: tap products, channels last, row bands);
- image and text embeddings: CLIP's own vision model for the global embedding (library: the last block at the
  class token only) and every prompt run in full (library: shared prefixes run once, packed);
- inference: one window, PAMR as per-dilation convolutions with one-hot 3×3 kernels (library: views into
  one padded copy), and whole images window by window (library: windows batched).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modeling_code.inference import VocabularyEmbeddings, pad_to_multiple, sliding_windows
from modeling_code.masker import CoDeMasker, CoDeMaskerDecoder, CoDeUpsampleBlock
from modeling_code.modeling_code import CoDeModel, CoDeWindowOutput
from modeling_code.ops import self_only_attention_block
from modeling_code.pamr import NEIGHBOUR_STEPS, STD_EPS, STD_SCALE


# --------------------------------------------------------------------------------------------------------------
# Masker (docs/method.md#masker)
# --------------------------------------------------------------------------------------------------------------
def upsample_block_reference(block: CoDeUpsampleBlock, x: torch.Tensor) -> torch.Tensor:
    """``up(x) + tanh(gate) * conv3x3(GELU(LN(up(x))))``, ``up`` nearest ×2: x [B, C, H, W] -> [B, C, 2H, 2W]."""
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    return x + torch.tanh(block.gate) * block.conv(F.gelu(block.norm(x)))


def decoder_reference(decoder: CoDeMaskerDecoder, x: torch.Tensor) -> torch.Tensor:
    """The decoder's blocks in turn: channels-last [B, h, w, C] -> [B, h * 2^n, w * 2^n, C]."""
    x = x.permute(0, 3, 1, 2)
    for block in decoder.blocks:
        x = upsample_block_reference(block, x)
    return x.permute(0, 2, 3, 1)


def masker_reference(masker: CoDeMasker, hidden_states: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """hidden_states [B, 1 + h*w, W_v] entering CLIP's last block -> unit-norm embeddings E [B, C, 4h, 4w]."""
    hidden_states = self_only_attention_block(masker.backbone_block, hidden_states)
    feature_map = hidden_states[:, 1:].reshape(hidden_states.shape[0], *grid_size, -1)
    decoded = decoder_reference(masker.decoder, feature_map)
    return F.normalize(masker.projection(decoded), dim=-1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# Image and text embeddings (docs/method.md#text-side)
# --------------------------------------------------------------------------------------------------------------
def encode_image_global_reference(model: CoDeModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's own vision model, projected and unit-normalised: [B, 3, H, W] -> [B, C]."""
    pooled = model.clip.vision_model(pixel_values, interpolate_pos_encoding=True).pooler_output
    return F.normalize(model.clip.visual_projection(pooled), dim=-1)


@torch.no_grad()
def class_embeddings_reference(model: CoDeModel, class_input_ids: torch.Tensor) -> torch.Tensor:
    """Prompted class embeddings, every row run in full: [N_cls, L] -> [N_cls, C]."""
    return model.encode_nouns(class_input_ids)


@torch.no_grad()
def template_class_embeddings_reference(
    model: CoDeModel, template_input_ids: torch.Tensor, num_templates: int
) -> torch.Tensor:
    """Template ensembles, every prompt run in full: [N_cls * T, L] (class-major) -> [N_cls, C]."""
    embeddings = model.encode_text(template_input_ids)
    return F.normalize(embeddings.view(-1, num_templates, embeddings.shape[-1]).mean(1), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# Inference (docs/method.md#inference-protocol, docs/method.md#pamr)
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def segment_window_reference(
    model: CoDeModel,
    pixel_values: torch.Tensor,
    class_embeddings: torch.Tensor,
    kp_class_embeddings: torch.Tensor | None = None,
) -> CoDeWindowOutput:
    """``CoDeModel.segment_window`` with the reference masker: every window's whole map at once."""
    config = model.config
    hidden, grid = model.encode_image_dense(pixel_values)
    embeddings = masker_reference(model.masker, hidden, grid)
    masks = torch.sigmoid(model.sim2mask(embeddings, class_embeddings.to(hidden.dtype)))
    kp_masks = None
    if kp_class_embeddings is not None:
        dense = model.dense_clip_features(hidden, grid)
        cosine = torch.einsum("bchw,nc->bnhw", dense, kp_class_embeddings.to(dense.dtype))
        kp_masks = torch.sigmoid((cosine - config.kp_cos_offset) * config.kp_cos_scale)
    return CoDeWindowOutput(masks=masks, kp_masks=kp_masks)


def _one_hot_kernels(with_centre: bool) -> torch.Tensor:
    """3×3 kernels [K, 1, 3, 3] each picking one neighbour (K = 8), or one position of the 3×3 (K = 9)."""
    positions = [(row + 1, column + 1) for row, column in NEIGHBOUR_STEPS]
    if with_centre:
        positions.append((1, 1))
    kernels = torch.zeros(len(positions), 1, 3, 3)
    for index, (row, column) in enumerate(positions):
        kernels[index, 0, row, column] = 1.0
    return kernels


def _dilated_neighbours(x: torch.Tensor, kernels: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Each channel of x [B, C, H, W] convolved with every kernel at every dilation -> [B, C, K * D, H, W]."""
    batch, channels, height, width = x.shape
    flat = x.reshape(batch * channels, 1, height, width)
    kernels = kernels.to(x.dtype)
    per_dilation = [
        F.conv2d(F.pad(flat, (dilation,) * 4, mode="replicate"), kernels, dilation=dilation)
        for dilation in dilations
    ]
    return torch.cat(per_dilation, dim=1).view(batch, channels, -1, height, width)


def pamr_reference(
    image: torch.Tensor,
    masks: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> torch.Tensor:
    """PAMR as defined, with one-hot 3×3 convolutions per dilation. Same contract as ``pamr.pamr``."""
    masks = masks.float()
    image = image.float()
    if image.shape[-2:] != masks.shape[-2:]:
        image = F.interpolate(image, size=masks.shape[-2:], mode="bilinear", align_corners=True)
    neighbour_kernels = _one_hot_kernels(with_centre=False)
    centre = image[:, :, None]
    differences = (centre - _dilated_neighbours(image, neighbour_kernels, dilations)).abs()
    std = _dilated_neighbours(image, _one_hot_kernels(with_centre=True), dilations).std(dim=2, keepdim=True)
    affinity = (-differences / (STD_EPS + STD_SCALE * std)).mean(dim=1, keepdim=True).softmax(dim=2)
    for _ in range(iterations):
        masks = (_dilated_neighbours(masks, neighbour_kernels, dilations) * affinity).sum(dim=2)
    return masks


@torch.no_grad()
def window_scores_reference(
    model: CoDeModel,
    window: torch.Tensor,
    vocabulary: VocabularyEmbeddings,
    use_pamr: bool | None = None,
    kp_weight: float | None = None,
) -> torch.Tensor:
    """One window [3, h, w] -> fp32 scores [N_text, h, w]: zero padding to the patch size, masks, PAMR, KP mix,
    bilinear resize to the padded size, padding cropped. ``use_pamr`` / ``kp_weight`` default to the config."""
    config = model.config
    use_pamr = config.use_pamr if use_pamr is None else use_pamr
    kp_weight = config.kp_weight if kp_weight is None else kp_weight
    padded, (top, bottom, left, right) = pad_to_multiple(window[None].float(), config.patch_size)
    kp_embeddings = vocabulary.kp_class_embeddings if kp_weight > 0 else None
    outputs = segment_window_reference(model, padded.to(model.dtype), vocabulary.class_embeddings, kp_embeddings)
    masks = outputs.masks.float()
    if use_pamr:
        masks = pamr_reference(padded, masks, config.pamr_iterations, config.pamr_dilations)
    if kp_embeddings is not None:
        kp_masks = F.interpolate(outputs.kp_masks.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        masks = kp_weight * kp_masks + (1 - kp_weight) * masks
    scores = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)[0]
    return scores[:, top : scores.shape[1] - bottom, left : scores.shape[2] - right]


@torch.no_grad()
def segment_images_reference(
    model: CoDeModel,
    images: Sequence[torch.Tensor],
    vocabulary: VocabularyEmbeddings,
    use_pamr: bool | None = None,
    kp_weight: float | None = None,
    background_threshold: float | None = None,
) -> list[torch.Tensor]:
    """``inference.segment_images`` one window at a time: images [3, H_i, W_i] -> scores [N, H_i, W_i] each,
    overlapping windows averaged, ``background`` a constant map at its position."""
    config = model.config
    threshold = config.background_threshold if background_threshold is None else background_threshold
    results = []
    for image in images:
        height, width = image.shape[-2:]
        total = image.new_zeros(vocabulary.class_embeddings.shape[0], height, width, dtype=torch.float32)
        count = image.new_zeros(height, width, dtype=torch.float32)
        for top, left, window_height, window_width in sliding_windows(
            height, width, config.window_size, config.window_stride
        ):
            rows, columns = slice(top, top + window_height), slice(left, left + window_width)
            total[:, rows, columns] += window_scores_reference(
                model, image[:, rows, columns], vocabulary, use_pamr, kp_weight
            )
            count[rows, columns] += 1
        scores = total / count
        if vocabulary.background_index is not None:
            at = vocabulary.background_index
            scores = torch.cat([scores[:at], scores.new_full((1, height, width), threshold), scores[at:]])
        results.append(scores)
    return results
