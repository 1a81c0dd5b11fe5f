"""Legends of the overlays: every class name is drawn or stands in for itself readably, never as empty boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from modeling_code.predict.visualization import draw_legend, drawable_text, legend_font, palette


def legend_pixels(names: list[str], width: int = 240) -> np.ndarray:
    image = Image.new("RGB", (width, 20), (40, 40, 40))
    return np.asarray(draw_legend(image, names, palette(len(names))))


def test_latin_accents_are_drawn():
    assert drawable_text("café Ærøskøbing") == "café Ærøskøbing", (
        f"{legend_font().getname()} lacks Latin accents: scripts/setup.sh installs DejaVu Sans (fonts-dejavu-core)"
    )
    accented = legend_pixels(["café"])
    assert not np.array_equal(accented, legend_pixels(["cafe"])), "the accent is not drawn"
    assert not np.array_equal(accented, legend_pixels(["caf\uffff"])), "é is drawn as the missing-glyph box"
    assert not np.array_equal(accented, legend_pixels(["caf?"]))
    assert not np.array_equal(legend_pixels(["Ærøskøbing"]), legend_pixels(["?r?sk?bing"]))


@pytest.mark.parametrize(
    ("name", "shown"),
    [("猫", "?"), ("고양이", "?"), ("猫猫 🦜", "? ?"), ("\uffff", "?"), ("black 猫", "black ?"), ("🦜", "?")],
)
def test_characters_the_font_lacks_draw_no_empty_box(name, shown):
    """What the font cannot draw shows as one question mark per run, never as the font's empty box."""
    if "🦜" in name and drawable_text("🦜") == "🦜":
        pytest.skip(f"{legend_font().getname()} draws the parrot emoji")
    np.testing.assert_array_equal(legend_pixels([name]), legend_pixels([shown]))


def test_each_entry_shows_its_class_id_beside_its_swatch():
    image = Image.new("RGB", (240, 20), (40, 40, 40))
    colors = palette(2)
    second = np.asarray(draw_legend(image, ["a", "猫"], colors, class_indices=[1]))
    first = np.asarray(draw_legend(image, ["猫", "a"], colors[::-1], class_indices=[0]))  # same swatch and name
    assert not np.array_equal(first, second)
    assert tuple(colors[1]) in {tuple(pixel) for pixel in second[20:].reshape(-1, 3)}


def test_with_pillows_ascii_font_accents_fall_back_to_their_letters():
    bundled = ImageFont.load_default(size=12)
    assert drawable_text("café crème", bundled) == "cafe creme"
    assert drawable_text("猫 and ø", bundled) == "? and ?"
