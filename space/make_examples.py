"""Regenerate the example images of the Space (``python space/make_examples.py``); released under CC0.

Two held-out toy-world test scenes (the world the embedded default model is trained on) and one simple
procedurally drawn scene. Everything is drawn here, deterministically: no third-party images.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from modeling_code.toy.world import ToyWorldConfig, generate_sample, sample_rng

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TOY_WORLD_TEST_INDICES = {"toy_world_1.png": 10, "toy_world_2.png": 11}


def draw_shapes(width: int = 320, height: int = 240) -> Image.Image:
    """Sky over grass with a sun-like circle, a triangle and a square."""
    image = Image.new("RGB", (width, height), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.6)
    draw.rectangle((0, horizon, width, height), fill=(70, 160, 60))
    draw.ellipse((int(width * 0.08), int(height * 0.08), int(width * 0.28), int(height * 0.35)), fill=(250, 210, 40))
    draw.polygon(
        [(int(width * 0.45), horizon - 70), (int(width * 0.33), horizon + 20), (int(width * 0.57), horizon + 20)],
        fill=(220, 40, 40),
    )
    draw.rectangle((int(width * 0.66), horizon - 40, int(width * 0.86), horizon + 30), fill=(40, 60, 210))
    return image


def main() -> None:
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    config = ToyWorldConfig()
    for name, index in TOY_WORLD_TEST_INDICES.items():
        sample = generate_sample(sample_rng(config.seed, "test", index), config)
        sample["image"].save(EXAMPLES_DIR / name, optimize=True)
        print(f"{name}: {sample['caption']}")
    draw_shapes().save(EXAMPLES_DIR / "shapes.png", optimize=True)


if __name__ == "__main__":
    main()
