"""COCO-Object label maps: the 80 COCO thing classes on a background, as in the TCL / GroupViT protocol.

Two ways to build them, both writing ``<stem>_instanceTrainIds.png`` (uint8: 0 background, 1..80 the
things in the benchmark's class order) where the ``coco_object`` layout expects them:

- from COCO instance annotations (``instances_val2017.json``): every annotation, crowd regions included,
  painted in annotation order (later ones cover earlier ones), the way COCO-Stuff rasterised its
  thing labels. Polygons are filled with PIL, which can differ from pycocotools on boundary pixels.
- from COCO-Stuff 164k's raw ``stuffthingmaps`` PNGs: GroupViT's exact conversion, i.e. the benchmark's
  label id mapping (things keep their order, stuff and unlabeled pixels become background).

pycocotools is not needed: polygon filling uses PIL and RLE decoding is implemented here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .specs import BenchmarkSpec, get_benchmark, map_labels

BENCHMARK_KEY = "coco_object"


def decode_rle_counts(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths.

    Each run length is written as 5-bit groups, low bits first, one character (value + 48) per group;
    bit 0x20 says another group follows and bit 0x10 of the last group is the sign. From the third run
    on, the stored value is the difference to the run two places earlier.
    """
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise ValueError(f"truncated RLE string {text!r}")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"invalid character {text[position]!r} in RLE string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``{"size": [H, W], "counts": str | list[int]}``) as an [H, W] bool mask.

    Runs alternate background / foreground starting with background, over the pixels in column-major order.
    """
    height, width = (int(side) for side in rle["size"])
    counts = rle["counts"]
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(run) for run in counts]
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs sum to {sum(runs)} (or are negative), expected {height} x {width} pixels")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Fill COCO polygons (each ``[x1, y1, x2, y2, ...]`` in pixels) into one [H, W] bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) < 6:
            continue  # fewer than 3 points encloses nothing
        points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
        draw.polygon(points, fill=1, outline=1)
    return np.array(canvas, dtype=bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An annotation's ``segmentation`` (polygons, RLE or compressed RLE) as an [H, W] bool mask."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    mask = rle_to_mask(segmentation)
    if mask.shape != (height, width):
        raise ValueError(f"RLE size {mask.shape} differs from the image size {(height, width)}")
    return mask


def category_classes(categories: Sequence[dict[str, Any]], spec: BenchmarkSpec) -> dict[int, int]:
    """COCO category id -> class index in ``spec.class_names``, matched by category name."""
    class_index = {name: index for index, name in enumerate(spec.class_names)}
    unknown = [category["name"] for category in categories if category["name"] not in class_index]
    if unknown:
        raise ValueError(f"COCO categories {unknown} are not {spec.key} classes")
    return {int(category["id"]): class_index[category["name"]] for category in categories}


def build_label_map(
    height: int, width: int, annotations: Sequence[dict[str, Any]], category_to_class: dict[int, int]
) -> np.ndarray:
    """One image's [H, W] uint8 label map: 0 background, each annotation painted in the given order."""
    label = np.zeros((height, width), dtype=np.uint8)
    for annotation in annotations:
        mask = segmentation_to_mask(annotation["segmentation"], height, width)
        label[mask] = category_to_class[int(annotation["category_id"])]
    return label


def _output_dir(output_root: str | Path, spec: BenchmarkSpec) -> Path:
    directory = Path(output_root) / spec.layout.label_dir
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def build_from_instances(
    instances_json: str | Path, output_root: str | Path, limit: int | None = None, progress: bool = True
) -> int:
    """Write a label map for every image of a COCO instances file; returns how many were written.

    Args:
        instances_json: e.g. ``annotations/instances_val2017.json``.
        output_root: the ``coco_object`` data root (e.g. ``data/coco_stuff164k``); maps go to its label folder.
        limit: only the first ``limit`` images of the file.
        progress: show a progress bar.
    """
    spec = get_benchmark(BENCHMARK_KEY)
    coco = json.loads(Path(instances_json).read_text())
    category_to_class = category_classes(coco["categories"], spec)
    annotations_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for annotation in coco["annotations"]:
        annotations_by_image[int(annotation["image_id"])].append(annotation)
    images = coco["images"][:limit]
    directory = _output_dir(output_root, spec)
    for image in tqdm(images, desc="COCO-Object labels", unit="img", disable=not progress):
        label = build_label_map(
            int(image["height"]),
            int(image["width"]),
            annotations_by_image[int(image["id"])],
            category_to_class,
        )
        stem = Path(image["file_name"]).stem
        Image.fromarray(label).save(directory / f"{stem}{spec.layout.label_suffix}")
    return len(images)


def build_from_stuffthingmaps(
    stuffthingmaps_dir: str | Path, output_root: str | Path, limit: int | None = None, progress: bool = True
) -> int:
    """Convert raw COCO-Stuff 164k ``stuffthingmaps`` PNGs exactly as GroupViT does; returns the count.

    Args:
        stuffthingmaps_dir: folder of raw maps (e.g. ``stuffthingmaps_trainval2017/val2017``); files whose
            name already contains ``TrainIds`` are skipped.
        output_root: the ``coco_object`` data root; maps go to its label folder.
        limit: only the first ``limit`` maps (sorted by name).
        progress: show a progress bar.
    """
    spec = get_benchmark(BENCHMARK_KEY)
    sources = sorted(path for path in Path(stuffthingmaps_dir).glob("*.png") if "TrainIds" not in path.name)
    sources = sources[:limit]
    directory = _output_dir(output_root, spec)
    for path in tqdm(sources, desc="COCO-Object labels", unit="img", disable=not progress):
        with Image.open(path) as raw:
            label = map_labels(np.array(raw), spec).astype(np.uint8)
        Image.fromarray(label).save(directory / f"{path.stem}{spec.layout.label_suffix}")
    return len(sources)


def link_images(images_dir: str | Path, output_root: str | Path) -> Path:
    """Make the layout's image folder (``<output_root>/images/val2017``) a symlink to ``images_dir``.

    Leaves an existing image folder alone; returns the layout's image folder.
    """
    spec = get_benchmark(BENCHMARK_KEY)
    target = Path(output_root) / spec.layout.image_dir
    if not target.exists():
        images_dir = Path(images_dir).resolve()
        if not images_dir.is_dir():
            raise FileNotFoundError(f"image folder {images_dir} not found")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(images_dir, target_is_directory=True)
    return target
