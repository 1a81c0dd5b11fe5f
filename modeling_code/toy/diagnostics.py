"""What a trained CoDe model's highlighting matches and how selective its masks are, on labelled images.

The toy world's README explains with these figures why, with the paper's loss, full CoDe trailed the TCL-only
ablation there, and what leaving same-noun rows out of the contrastive negatives changes. Two measurements of the
training signals, both made by :func:`diagnose_highlighting`:

- **word masks**: the mean word-mask value on the noun's own tokens, on the other nouns' tokens and on the
  remaining words, i.e. how much of the caption a highlighted caption still carries;
- **what the frozen CLIP matches**: the mean cosine of a highlighted caption (HCL's text side) and of a prompted
  noun (``tcl_image``'s text side) with the noun's true region highlighted on the learnable background, and with
  the whole image; separately for thing and stuff nouns.

A third, :func:`measure_mask_selectivity`, looks at the result rather than the training signals: on each true
region, how high the masker scores the region's own class and how high its best rival classes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..inference import encode_vocabulary, segment_window_scores
from ..modeling_code import CoDeModel
from ..processing_code import CoDeProcessor
from ..text_decomposition import NotEnoughNounsError


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


@dataclass
class MaskSelectivity:
    """Masker scores on true regions, averaged over every region of the measured images.

    ``scores``: ``{"things" | "stuff": {"own": ..., "best_other_thing": ..., "best_stuff": ...}}``, the region's
    pixels' score for the region's own class and the highest score of any other thing class and of any other
    stuff class (per pixel, then averaged); a key is left out when its group has no region or no rival class.
    """

    regions: int
    scores: dict[str, dict[str, float]]


@torch.no_grad()
def measure_mask_selectivity(
    model: CoDeModel,
    processor: CoDeProcessor,
    samples: Iterable[Mapping],
    class_names: Sequence[str],
    thing_classes: Iterable[str],
) -> MaskSelectivity:
    """How selective the masker's class masks are on images with known class maps.

    The masker alone is measured (no PAMR, no KP branch): a trained model segments well where its own class's
    score is high and every rival's low.

    Args:
        samples: mappings with ``image`` (PIL) and ``label`` (PIL class map, pixel value = index into
            ``class_names``; other values are ignored).
        thing_classes: the class names counted as things; every other class is stuff.
    """
    vocabulary = encode_vocabulary(model, processor, class_names, with_kp_embeddings=False)
    if vocabulary.class_names != tuple(class_names) or vocabulary.background_index is not None:
        raise ValueError(f"class_names must be distinct, trimmed names without 'background', got {list(class_names)}")
    things = set(thing_classes)
    is_thing = torch.tensor([name in things for name in class_names])
    values: dict[str, dict[str, list[float]]] = {"things": {}, "stuff": {}}
    model.eval()
    for sample in samples:
        pixel_values, classes = _unaugmented(processor, sample["image"], sample["label"])
        scores = segment_window_scores(model, pixel_values[None], vocabulary, use_pamr=False, kp_weight=0.0)[0]
        for group, name, value in _region_scores(scores, classes, is_thing):
            values[group].setdefault(name, []).append(value)
    regions = len(values["things"].get("own", [])) + len(values["stuff"].get("own", []))
    if not regions:
        raise ValueError("no labelled pixel of any class in the samples")
    return MaskSelectivity(
        regions=regions,
        scores={group: {name: float(np.mean(found)) for name, found in kinds.items()}
                for group, kinds in values.items() if kinds},
    )


def _region_scores(
    scores: torch.Tensor, classes: torch.Tensor, is_thing: torch.Tensor
) -> Iterator[tuple[str, str, float]]:
    """(group, measure, value) for each true region of one image: its own class's mean score and its best rivals'.

    scores [N_cls, H, W]; classes [H, W] class ids (values outside [0, N_cls) ignored); is_thing [N_cls] bool.
    """
    for class_id in classes.unique().tolist():
        if not 0 <= class_id < len(is_thing):
            continue
        region = scores[:, classes == class_id]  # [N_cls, pixels]
        others = torch.arange(len(is_thing)) != class_id
        group = "things" if is_thing[class_id] else "stuff"
        yield group, "own", float(region[class_id].mean())
        for name, rivals in (("best_other_thing", others & is_thing), ("best_stuff", others & ~is_thing)):
            if rivals.any():
                yield group, name, float(region[rivals].max(0).values.mean())
