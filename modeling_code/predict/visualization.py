"""Colour palettes, label-map colouring, overlays, legends and comparison grids (PIL only).

Shared by the benchmark overlays, the inference CLI, the demo and the toy world's comparison figure. Label values outside the palette
(255 = ignored, in particular) are drawn in ``IGNORE_COLOR``; palette colours are never that dark.
"""

from __future__ import annotations

import colorsys
import functools
import math
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (0, 0, 0)
WHITE = (255, 255, 255)
# Candidate colours: 40 hues x 3 saturations x 3 values, none dark (the ignore colour) or near white.
_HUES = np.arange(40) / 40
_SATURATIONS = (0.45, 0.7, 0.95)
_VALUES = (0.65, 0.82, 1.0)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) coordinates of [N, 3] sRGB colours in [0, 1]: distances there follow perceived difference."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz /= np.array([0.9505, 1.0, 1.089])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


@functools.cache
def _ordered_candidates() -> np.ndarray:
    """All candidate colours, each next one the farthest (in CIELAB) from those before it: [360, 3] uint8."""
    rgb = np.array(
        [colorsys.hsv_to_rgb(h, s, v) for h in _HUES for s in _SATURATIONS for v in _VALUES], dtype=np.float64
    )
    lab = _srgb_to_lab(rgb)
    order = [0]
    nearest = np.linalg.norm(lab - lab[0], axis=1)
    for _ in range(len(rgb) - 1):
        order.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[order[-1]], axis=1))
    return np.round(rgb[order] * 255).astype(np.uint8)


def palette(num_colors: int) -> np.ndarray:
    """``num_colors`` deterministic, visually distinct RGB colours: [num_colors, 3] uint8.

    Greedy farthest-point order over a fixed set of 360 colours, so ``palette(n)`` is the start of
    ``palette(m)`` for ``m > n`` (a class keeps its colour whatever the vocabulary size); beyond 360 the
    colours repeat. No colour is close to black (``IGNORE_COLOR``) or white.
    """
    if num_colors < 0:
        raise ValueError(f"num_colors must be non-negative, got {num_colors}")
    candidates = _ordered_candidates()
    return candidates[np.arange(num_colors) % len(candidates)]


def colorize(label_map: np.ndarray, colors: np.ndarray) -> Image.Image:
    """Paint a [H, W] class-index map with ``colors`` ([N, 3] uint8); values outside [0, N) get IGNORE_COLOR."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"a label map must be a 2-D integer array, got {label_map.shape} {label_map.dtype}")
    table = np.vstack([np.asarray(colors, dtype=np.uint8).reshape(-1, 3), np.uint8(IGNORE_COLOR)])
    indices = np.where((label_map >= 0) & (label_map < len(table) - 1), label_map, len(table) - 1)
    return Image.fromarray(table[indices], mode="RGB")


def overlay(image: Image.Image, label_map: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the colourised ``label_map`` ([H, W], the image's size) over ``image`` with opacity ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    painted = colorize(label_map, colors)
    if painted.size != image.size:
        raise ValueError(f"label map size {painted.size} (W, H) differs from the image size {image.size}")
    return Image.blend(image.convert("RGB"), painted, alpha)


LEGEND_FONT_SIZE = 12
# Fonts tried in turn for legend text (found by file name in the system's font folders): DejaVu Sans (Debian's
# fonts-dejavu-core, which scripts/setup.sh installs) and Liberation Sans draw Latin with accents, Greek and
# Cyrillic. Pillow's bundled font, the last resort, draws ASCII only.
LEGEND_FONT_FILES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")
# Shown, once per run, for characters the font cannot draw (instead of its empty "missing glyph" box).
MISSING_GLYPH = "?"
# A noncharacter: no font has a glyph for it, so it renders as the font's missing-glyph box.
_NONCHARACTER = "\uffff"


@functools.cache
def legend_font(size: int = LEGEND_FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The first of ``LEGEND_FONT_FILES`` installed, else Pillow's bundled font, at ``size`` pixels."""
    for name in LEGEND_FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


@functools.cache
def _glyph(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def _drawable(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> bool:
    """Whether ``font`` has a glyph for ``char`` (one that is not its missing-glyph box)."""
    return char.isspace() or _glyph(font, char) != _glyph(font, _NONCHARACTER)


def drawable_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None) -> str:
    """``text`` with what ``font`` (default ``legend_font()``) cannot draw replaced, so no empty box is drawn.

    An accented letter whose accent the font lacks becomes its base letter (é -> e); any other run of
    characters the font lacks (CJK, emoji) becomes one ``MISSING_GLYPH``; combining marks it lacks are dropped.
    """
    font = legend_font() if font is None else font
    pieces: list[str] = []
    missing_run = False
    for char in text:
        if _drawable(font, char):
            pieces.append(char)
            missing_run = False
            continue
        if unicodedata.combining(char):
            continue
        base = "".join(part for part in unicodedata.normalize("NFKD", char) if not unicodedata.combining(part))
        if base and base != char and all(_drawable(font, part) for part in base):
            pieces.append(base)
            missing_run = False
        elif not missing_run:
            pieces.append(MISSING_GLYPH)
            missing_run = True
    return "".join(pieces)


def legend_label(index: int, name: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None) -> str:
    """A legend entry's text: the class id (the label maps' pixel value) and the name as ``font`` can draw it."""
    return f"{index}: {drawable_text(name, font)}"


def draw_legend(
    image: Image.Image,
    class_names: Sequence[str],
    colors: np.ndarray,
    class_indices: Sequence[int] | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """``image`` with a legend bar below it: a colour swatch, the class id and the name of each class.

    Names are drawn with ``legend_font()``; characters it lacks stand in as ``drawable_text`` says, so each
    entry is still known by its swatch and id.

    Args:
        image: typically an ``overlay`` result.
        class_names: the names, indexed like ``colors``.
        colors: [N, 3] uint8 palette.
        class_indices: the classes to list (e.g. those present in a prediction); all when None.
        font_size: text height in pixels (swatches and gaps grow with it); None: ``LEGEND_FONT_SIZE``.
    """
    indices = range(len(class_names)) if class_indices is None else class_indices
    font = legend_font(LEGEND_FONT_SIZE if font_size is None else font_size)
    labels = {index: legend_label(index, class_names[index], font) for index in indices}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if font_size is None:
        swatch, gap, padding, text_offset = 12, 8, 6, 16
    else:
        swatch, gap, padding = font_size, 2 * font_size, font_size // 2
        text_offset = swatch + font_size // 3
    line_height = max([swatch, *(measure.textbbox((0, 0), label, font=font)[3] for label in labels.values())]) + 4
    width = max(image.width, 160)
    # Flow the entries left to right, wrapping at the image width.
    placements, x, y = [], padding, padding
    for index in indices:
        entry_width = text_offset + int(measure.textlength(labels[index], font=font))
        if x > padding and x + entry_width > width - padding:
            x, y = padding, y + line_height
        placements.append((index, x, y))
        x += entry_width + gap
    legend_height = y + line_height + padding if placements else 0
    canvas = Image.new("RGB", (width, image.height + legend_height), WHITE)
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, x, y in placements:
        top = image.height + y
        color = tuple(int(channel) for channel in colors[index])
        draw.rectangle((x, top, x + swatch - 1, top + swatch - 1), fill=color, outline=(0, 0, 0))
        draw.text((x + text_offset, top), labels[index], fill=(0, 0, 0), font=font)
    return canvas


def image_grid(
    cells: Sequence[Sequence[Image.Image]],
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    font_size: int = 20,
    spacing: int = 6,
    margin: int | None = None,
) -> Image.Image:
    """Lay out images in rows and columns on white, with optional titles.

    Every cell sits at the top left of its slot: a column is as wide as its widest cell, a row as tall as its
    tallest. The column titles take a band of ``title_band_height(font_size)`` pixels above the first row (centred
    over their columns); each row title takes a band of that height above its row (left-aligned). Slots are
    ``spacing`` pixels apart and ``margin`` (default ``spacing``) from the edges, so the layout follows from the
    cell sizes alone: column ``c`` starts at ``margin + sum(widths[:c]) + c * spacing``.
    """
    margin = spacing if margin is None else margin
    if not cells or not all(cells):
        raise ValueError("an image grid needs at least one row, and a cell in every row")
    num_columns = max(len(row) for row in cells)
    if column_titles is not None and len(column_titles) != num_columns:
        raise ValueError(f"{len(column_titles)} column titles for {num_columns} columns")
    if row_titles is not None and len(row_titles) != len(cells):
        raise ValueError(f"{len(row_titles)} row titles for {len(cells)} rows")
    widths = [max(row[column].width for row in cells if column < len(row)) for column in range(num_columns)]
    heights = [max(cell.height for cell in row) for row in cells]
    band = title_band_height(font_size)
    lefts = [margin + sum(widths[:column]) + column * spacing for column in range(num_columns)]
    header = margin + (band if column_titles is not None else 0)
    row_band = band if row_titles is not None else 0
    tops = [header + sum(heights[:row]) + row * (spacing + row_band) + row_band for row in range(len(cells))]
    grid = Image.new("RGB", (lefts[-1] + widths[-1] + margin, tops[-1] + heights[-1] + margin), WHITE)
    draw = ImageDraw.Draw(grid)
    font = legend_font(font_size)
    for column, title in enumerate(column_titles or ()):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = lefts[column] + (widths[column] - (right - left)) // 2 - left
        draw.text((x, margin + (band - (bottom - top)) // 2 - top), title, fill=(0, 0, 0), font=font)
    for row, row_cells in enumerate(cells):
        for column, cell in enumerate(row_cells):
            grid.paste(cell.convert("RGB"), (lefts[column], tops[row]))
        if row_titles is not None:
            top, bottom = draw.textbbox((0, 0), row_titles[row], font=font)[1::2]
            y = tops[row] - band + (band - (bottom - top)) // 2 - top
            draw.text((lefts[0], y), row_titles[row], fill=(60, 60, 60), font=font)
    return grid


def title_band_height(font_size: int) -> int:
    """Height in pixels of the band that ``image_grid`` gives a line of titles."""
    return math.ceil(1.6 * font_size)


def upscale(image: Image.Image, min_size: int) -> Image.Image:
    """``image`` enlarged by the smallest whole factor that makes both sides at least ``min_size`` (nearest
    neighbour: every pixel becomes a square block, nothing is blurred); returned as it is when large enough."""
    factor = max(1, math.ceil(min_size / min(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def comparison_grid(
    images: Sequence[Image.Image],
    labels: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    colors: np.ndarray | None = None,
    row_titles: Sequence[str] | None = None,
    min_cell_size: int = 256,
    font_size: int | None = None,
    spacing: int = 6,
    margin: int | None = None,
) -> Image.Image:
    """A figure comparing models' label maps: one row per image, columns input | ground truth | each model.

    Label maps are drawn in flat palette colours (ignored pixels in ``IGNORE_COLOR``); every cell is enlarged
    by a whole factor (nearest neighbour) to at least ``min_cell_size`` pixels a side. Column titles above,
    ``row_titles`` (e.g. captions) above each row, and below the grid a legend of the classes that occur in the
    shown labels and predictions.

    Args:
        images: the input images.
        labels: their [H, W] ground-truth class-index maps, indexed like ``class_names``.
        predictions: column title (e.g. a model's name and score) -> one [H, W] label map per image.
        colors: [N, 3] uint8 palette; default ``palette(len(class_names))``.
        font_size: of titles and legend; default about a fourteenth of a cell.
        spacing, margin: between cells and around the grid (``image_grid``); the margin defaults to a third of
            the font size.
    """
    if not images:
        raise ValueError("no images to draw")
    columns = {"ground truth": labels, **predictions}
    for title, maps in columns.items():
        if len(maps) != len(images):
            raise ValueError(f"{title!r}: {len(maps)} label maps for {len(images)} images")
    colors = palette(len(class_names)) if colors is None else colors
    cells = [
        [upscale(image.convert("RGB"), min_cell_size)]
        + [upscale(colorize(np.asarray(maps[row]), colors), min_cell_size) for maps in columns.values()]
        for row, image in enumerate(images)
    ]
    font_size = font_size or max(12, cells[0][0].width // 14)
    margin = font_size // 3 if margin is None else margin
    grid = image_grid(cells, ["input", *columns], row_titles, font_size=font_size, spacing=spacing, margin=margin)
    present = sorted(
        {int(value) for maps in columns.values() for label_map in maps for value in np.unique(label_map)}
        & set(range(len(class_names)))
    )
    return draw_legend(grid, class_names, colors, present, font_size=font_size)
