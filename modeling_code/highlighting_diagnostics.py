"""What a trained CoDe model's highlighting matches, measured on captioned images with known class maps.

The toy world's README explains why full CoDe trails the TCL-only ablation there with two measurements, both
made by :func:`diagnose_highlighting`:

- **word masks**: the mean word-mask value on the noun's own tokens, on the other nouns' tokens and on the
  remaining words, i.e. how much of the caption a highlighted caption still carries;
- **what the frozen CLIP matches**: the mean cosine of a highlighted caption (HCL's text side) and of a prompted
  noun (``tcl_image``'s text side) with the noun's true region highlighted on the learnable background, and with
  the whole image; separately for thing and stuff nouns.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .modeling_code import CoDeModel
from .processing_code import CoDeProcessor
from .text_decomposition import NotEnoughNounsError


@dataclass
class HighlightingDiagnosis:
    """Means over every sampled noun of the measured images.

    ``word_mask``: keys ``noun``, ``other_nouns``, ``other_words``. ``highlighted_caption`` and
    ``prompted_noun``: ``{"things" | "stuff": {"region": cosine, "whole_image": cosine}}``.
    """

    rows: int
    word_mask: dict[str, float]
    highlighted_caption: dict[str, dict[str, float]]
    prompted_noun: dict[str, dict[str, float]]


def _unaugmented(processor: CoDeProcessor, image: Image.Image, label: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Image at the training crop size, normalised as in training [3, S, S], and its class map resized alike [S, S].

    No crop and no flip, so that the class map stays aligned with the pixels.
    """
    image_processor = processor.image_processor
    size = (image_processor.train_crop_size, image_processor.train_crop_size)
    rgb = image_processor.load_image(image).resize(size, resample=image_processor.resample)
    pixel_values = image_processor._normalise(image_processor._levels(rgb) / 255.0)
    classes = torch.from_numpy(np.asarray(label.resize(size, Image.NEAREST), dtype=np.int64))
    return pixel_values, classes


def _prepare_batch(
    processor: CoDeProcessor, samples: Iterable[Mapping], seed: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Training batch of the usable samples (unaugmented) and each usable sample's class map [S, S]."""
    rng = random.Random(seed)
    prepared, class_maps = [], []
    for sample in samples:
        try:
            example = processor.prepare_training_sample(sample["image"], sample["caption"], rng)
        except NotEnoughNounsError:
            continue
        example["pixel_values"], classes = _unaugmented(processor, sample["image"], sample["label"])
        prepared.append(example)
        class_maps.append(classes)
    if not prepared:
        raise ValueError("no sample's caption names enough nouns to measure")
    return processor.collate_training(prepared), class_maps


def _word_mask_shares(word_masks: torch.Tensor, text_labels: torch.Tensor, eos_index: torch.Tensor) -> dict[str, float]:
    """Mean word mask on the noun's tokens, the other nouns' and the other words' (start, end, padding left out).

    word_masks [B, K, L]; text_labels [B, L] (-1 no noun, 0 an unsampled noun, k the k-th sampled one); eos_index [B].
    """
    positions = torch.arange(text_labels.shape[1])[None]
    inside = (positions > 0) & (positions < eos_index[:, None])
    kinds: dict[str, list[torch.Tensor]] = {"noun": [], "other_nouns": [], "other_words": []}
    for word in range(word_masks.shape[1]):
        masks = word_masks[:, word]
        kinds["noun"].append(masks[inside & (text_labels == word + 1)])
        kinds["other_nouns"].append(masks[inside & (text_labels >= 0) & (text_labels != word + 1)])
        kinds["other_words"].append(masks[inside & (text_labels < 0)])
    values = {kind: torch.cat(parts) for kind, parts in kinds.items()}
    return {kind: float(value.mean()) for kind, value in values.items() if value.numel()}


def _mean_cosines(
    texts: torch.Tensor, views: Mapping[str, torch.Tensor], is_thing: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Mean cosine of row-aligned text and image embeddings [N, C], per noun group and image view."""
    groups = {"things": is_thing, "stuff": ~is_thing}
    return {group: {view: float((texts * images).sum(-1)[rows].mean()) for view, images in views.items()}
            for group, rows in groups.items() if rows.any()}


@torch.no_grad()
def diagnose_highlighting(
    model: CoDeModel,
    processor: CoDeProcessor,
    samples: Iterable[Mapping],
    class_names: Sequence[str],
    noun_classes: Mapping[str, str],
    thing_classes: Iterable[str],
    seed: int = 0,
) -> HighlightingDiagnosis:
    """Measure word masks and what the frozen CLIP matches highlighted captions and nouns with.

    Args:
        samples: mappings with ``image`` (PIL), ``caption`` and ``label`` (PIL class map, pixel value = index
            into ``class_names``); captions with fewer than K nouns are left out.
        noun_classes: caption noun -> class name ("circles" -> "circle").
        thing_classes: the class names counted as things; every other class is stuff.
        seed: seeds the nouns sampled per caption.
    """
    batch, class_maps = _prepare_batch(processor, samples, seed)
    noun_ids = batch["noun_input_ids"]  # [N, L], noun-major: row n is a noun of image n % B
    num_images = len(class_maps)
    num_words = len(noun_ids) // num_images
    row_classes = [noun_classes[processor.tokenizer.decode(ids[1:end]).strip()]
                   for ids, end in zip(noun_ids, model.eos_positions(noun_ids).tolist())]
    regions = torch.stack([(class_maps[row % num_images] == class_names.index(name)).float()
                           for row, name in enumerate(row_classes)])  # [N, S, S]
    things = set(thing_classes)
    is_thing = torch.tensor([name in things for name in row_classes])

    model.eval()
    noun_embeddings = model.encode_nouns(noun_ids)
    text_logits, highlighted = model._highlight_words(batch["caption_input_ids"], noun_embeddings, num_words)
    pixel_values = batch["pixel_values"]
    views = {
        "region": model._highlight_regions(pixel_values, regions, num_words),
        "whole_image": model._highlight_regions(pixel_values, torch.ones_like(regions), num_words),
    }
    eos_index = model.eos_positions(batch["caption_input_ids"])
    return HighlightingDiagnosis(
        rows=len(row_classes),
        word_mask=_word_mask_shares(text_logits.softmax(1)[:, 1:], batch["text_labels"], eos_index),
        highlighted_caption=_mean_cosines(highlighted, views, is_thing),
        prompted_noun=_mean_cosines(noun_embeddings, views, is_thing),
    )
