"""A procedurally generated image-caption world with known per-pixel ground truth ("toy world").

Real CLIP weights and real datasets cannot be fetched everywhere, yet the whole CoDe pipeline
(CLIP pretraining, CoDe training, open-vocabulary evaluation) should run end to end on a CPU in
minutes. This module draws small scenes: 1-4 coloured shapes ("things": circle, star, ...; by
default each category in its own colour), each category with its own surface pattern in a darker
shade of the object's colour, over a textured background ("stuff": grass, water, ...), a caption
that names exactly the things and the stuff present, and the per-pixel class map.

Caption convention: each thing category present is named once. A category drawn several times is
named with a count and its plural ("two red circles"); the class name stays the singular
(``TOY_PLURALS`` maps one to the other). All copies of one category share one colour, so the
colour adjective is never ambiguous. Captions contain no nouns other than the things and the
stuff, so a noun extractor (spaCy tags NN/NNS) finds exactly the classes present.

Every sample is seeded from ``(seed, split, index)``: generation is deterministic byte for byte
and the splits never share a sample. Later-drawn shapes occlude earlier ones; the class map is
computed from what is visible, and a shape left mostly hidden is dropped from the scene.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TOY_THINGS: tuple[str, ...] = ("circle", "tile", "triangle", "star", "arrow", "heart", "hoop", "moon")
TOY_STUFF: tuple[str, ...] = ("grass", "water", "sand", "sky", "wall")
# Class id of a pixel = index in this tuple (things first, then stuff); every pixel has a class.
TOY_CLASSES: tuple[str, ...] = TOY_THINGS + TOY_STUFF
TOY_PLURALS: dict[str, str] = {
    "circle": "circles", "tile": "tiles", "triangle": "triangles", "star": "stars",
    "arrow": "arrows", "heart": "hearts", "hoop": "hoops", "moon": "moons",
}
TOY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "brown": (120, 70, 25),
    "yellow": (245, 220, 40),
    "purple": (150, 50, 190),
    "pink": (245, 120, 200),
    "white": (248, 248, 248),
    "black": (25, 25, 25),
    "golden": (225, 155, 20),
}
# With ``ToyWorldConfig.colour_per_category`` every thing of a category has its own colour, as many real
# categories do: a CLIP trained from scratch for a few CPU minutes learns colour at once, but not shape or
# surface pattern (with random colours its zero-shot accuracy on things stays at chance). No thing is grey:
# region highlighting starts its learnable background at 0 in normalised pixels, i.e. the ImageNet mean grey,
# so a grey thing would look present in every highlighted region (a grey moon scored 0 IoU in every model).
THING_COLOURS: dict[str, str] = {
    "circle": "red", "tile": "brown", "triangle": "yellow", "star": "purple",
    "arrow": "pink", "heart": "white", "hoop": "black", "moon": "golden",
}
# Each thing category has its own surface pattern (like a zebra's stripes), painted in a darker shade
# of the object's colour: a small CLIP learns categories from local appearance within minutes,
# whereas shape alone takes a ViT trained from scratch far longer.
THING_PATTERNS: dict[str, str] = {
    "circle": "plain", "tile": "checks", "triangle": "rows", "star": "dots",
    "arrow": "columns", "heart": "diagonals", "hoop": "antidiagonals", "moon": "grid",
}
SHADE_FACTOR = 0.55
SPLITS: tuple[str, ...] = ("train", "validation", "test")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

# How each kind of stuff is talked about. Every word here is a preposition, determiner, adjective
# or participle, never a noun, so captions name no class other than the ones drawn.
STUFF_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "grass": {
        "prepositions": ("on", "in", "over", "above"),
        "determiners": ("the", "", "some"),
        "adjectives": ("green", "fresh", "tall"),
        "verbs": ("lying", "sitting", "hidden", "placed"),
    },
    "water": {
        "prepositions": ("on", "in", "over", "above"),
        "determiners": ("the", "", "some"),
        "adjectives": ("blue", "calm", "deep"),
        "verbs": ("floating", "drifting", "bobbing", "placed"),
    },
    "sand": {
        "prepositions": ("on", "in", "over", "above"),
        "determiners": ("the", "", "some"),
        "adjectives": ("dry", "warm", "soft"),
        "verbs": ("lying", "sitting", "buried", "placed"),
    },
    "sky": {
        "prepositions": ("in", "against", "across", "up in"),
        "determiners": ("the", "a"),
        "adjectives": ("blue", "clear", "cloudy"),
        "verbs": ("floating", "flying", "drifting", "hanging"),
    },
    "wall": {
        "prepositions": ("on", "against", "along", "over"),
        "determiners": ("the", "a"),
        "adjectives": ("old", "red", "rough"),
        "verbs": ("painted", "hanging", "drawn", "stuck"),
    },
}
SIZE_ADJECTIVES: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("big", "large", "huge")}
# Sentence forms. {objects}: "a red circle and two blue stars"; {place}: "on the grass";
# {scene}: "the green grass"; {verb}: a participle fitting the stuff; {be}: "is"/"are".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} {place}.",
    "{objects} {verb} {place}.",
    "there {be} {objects} {place}.",
    "{place}, {objects}.",
    "{scene} with {objects}.",
    "we see {objects} {place}.",
    "here {be} {objects} {place}.",
    "{objects} {be} {verb} {place}.",
    "{scene} behind {objects}.",
    "{objects}, {verb} {place}.",
)
# Words of CLIP's 80 ImageNet prompt templates, of the 9 evaluation templates and of "A photo of x":
# in the vocabulary so that prompts tokenise into whole words.
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "my", "one", "many", "photo", "bad", "sculpture", "hard", "to", "see",
    "low", "resolution", "rendering", "graffiti", "cropped", "tattoo", "embroidered", "bright", "clean",
    "dirty", "dark", "drawing", "plastic", "cool", "close", "up", "black", "and", "white", "painting",
    "pixelated", "jpeg", "corrupted", "blurry", "good", "video", "game", "doodle", "origami", "sketch",
    "toy", "rendition", "large", "nice", "weird", "cartoon", "art", "itap", "plushie", "small", "x",
)

_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}


@dataclass
class ToyWorldConfig:
    """How the toy world is drawn and how many samples each split holds.

    Sizes are fractions of the image side: an object's radius (centre to farthest point) is drawn
    uniformly in ``[min_object_radius, max_object_radius] * image_size``.
    """

    seed: int = 0
    image_size: int = 112
    num_train: int = 4000
    num_validation: int = 200
    num_test: int = 500
    min_objects: int = 1
    max_objects: int = 4
    min_object_radius: float = 0.1
    max_object_radius: float = 0.21
    # Shapes are turned by an angle drawn uniformly in [-max_rotation, max_rotation] (radians).
    max_rotation: float = math.pi
    # Probability that a new thing category is drawn several times (2 or 3 copies, one colour).
    multiple_probability: float = 0.25
    # Objects are placed so that centre distance >= this fraction of the sum of their radii ...
    min_center_distance: float = 0.8
    # ... and any object with less than this fraction of its pixels visible is removed.
    min_visible_fraction: float = 0.6
    # Every thing of a category in its category's colour (THING_COLOURS), or else in a random colour.
    colour_per_category: bool = True
    # Probabilities that a caption leaves out an object's colour / adds a size adjective.
    omit_colour_probability: float = 0.1
    size_adjective_probability: float = 0.2

    def __post_init__(self) -> None:
        if self.image_size % 16 != 0 or self.image_size < 32:
            raise ValueError(f"image_size must be a multiple of 16 and at least 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= max(COUNT_WORDS):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {max(COUNT_WORDS)}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0 < self.min_object_radius <= self.max_object_radius < 0.5:
            raise ValueError(
                f"need 0 < min_object_radius <= max_object_radius < 0.5, got "
                f"{self.min_object_radius} and {self.max_object_radius}"
            )
        for name in ("num_train", "num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def _rotated(points: np.ndarray, center: tuple[float, float], radius: float, angle: float) -> list[tuple]:
    """Scale unit-shape vertices [V, 2] by ``radius``, rotate by ``angle`` and move to ``center``."""
    cos, sin = math.cos(angle), math.sin(angle)
    x = points[:, 0] * cos - points[:, 1] * sin
    y = points[:, 0] * sin + points[:, 1] * cos
    return [(center[0] + radius * xi, center[1] + radius * yi) for xi, yi in zip(x, y)]


def _unit_polygon(category: str) -> np.ndarray:
    """Vertices [V, 2] of a polygonal thing inside the unit disc (y pointing down)."""
    if category == "tile":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if category == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if category == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if category == "arrow":
        return np.array([(-1.0, -0.28), (0.15, -0.28), (0.15, -0.7), (1.0, 0.0), (0.15, 0.7), (0.15, 0.28),
                         (-1.0, 0.28)])
    if category == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 17.0
    raise ValueError(f"{category!r} is not a polygonal thing")


def object_mask(obj: dict, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] map of the pixels one object covers (before occlusion).

    ``obj`` holds ``category``, ``center`` (x, y in pixels), ``radius`` (pixels) and ``angle``
    (radians), as in the ``objects`` list of :func:`generate_sample`.
    """
    category, (cx, cy), radius, angle = obj["category"], obj["center"], obj["radius"], obj["angle"]
    if category in ("circle", "hoop", "moon"):
        coords = np.arange(image_size, dtype=np.float64) + 0.5
        dx = coords[None, :] - cx
        dy = coords[:, None] - cy
        inside = dx**2 + dy**2 <= radius**2
        if category == "hoop":
            return inside & (dx**2 + dy**2 > (0.55 * radius) ** 2)
        if category == "moon":
            ox, oy = 0.45 * radius * math.cos(angle), 0.45 * radius * math.sin(angle)
            return inside & ((dx - ox) ** 2 + (dy - oy) ** 2 > (0.85 * radius) ** 2)
        return inside
    if category not in TOY_THINGS:
        raise ValueError(f"unknown thing category {category!r}; expected one of {TOY_THINGS}")
    canvas = Image.new("L", (image_size, image_size), 0)
    ImageDraw.Draw(canvas).polygon(_rotated(_unit_polygon(category), (cx, cy), radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def thing_pattern(category: str, image_size: int) -> np.ndarray:
    """Boolean [image_size, image_size] map of where a thing of ``category`` shows its darker shade."""
    if category not in THING_PATTERNS:
        raise ValueError(f"unknown thing category {category!r}; expected one of {TOY_THINGS}")
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    pattern = THING_PATTERNS[category]
    if pattern == "plain":
        return np.zeros((image_size, image_size), dtype=bool)
    if pattern == "checks":
        return (xs // 4 + ys // 4) % 2 == 1
    if pattern == "rows":
        return ys % 4 < 2
    if pattern == "columns":
        return xs % 4 < 2
    if pattern == "diagonals":
        return (xs + ys) % 6 < 2
    if pattern == "antidiagonals":
        return (xs - ys) % 6 < 2
    if pattern == "dots":
        return (xs % 5 < 2) & (ys % 5 < 2)
    return (xs % 6 == 0) | (ys % 6 == 0)  # grid


def shade_of(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The darker shade a thing's pattern is painted in."""
    return tuple(round(SHADE_FACTOR * channel) for channel in rgb)


# ----------------------------------------------------------------------------------------------
# Stuff textures
# ----------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0, 1]: a (rows, cols) grid of uniform values upsampled bilinearly to size²."""
    low = rng.random(cells, dtype=np.float32)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _blend(dark: tuple, light: tuple, weight: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two RGB colours: [H, W] weights in [0, 1] -> [H, W, 3] float."""
    dark_arr, light_arr = np.asarray(dark, np.float32), np.asarray(light, np.float32)
    return dark_arr + (light_arr - dark_arr) * weight[..., None]


def stuff_texture(stuff: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw a textured background of one stuff class: uint8 [image_size, image_size, 3]."""
    size = image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    grain = rng.random((size, size), dtype=np.float32)
    if stuff == "grass":
        blades = _smooth_noise(rng, size, (3, size // 2))  # stretched vertically: blades
        patches = _smooth_noise(rng, size, (4, 4))
        rgb = _blend((28, 90, 22), (110, 175, 60), 0.55 * blades + 0.3 * patches + 0.15 * grain)
    elif stuff == "water":
        period = rng.uniform(9, 15)
        warp = _smooth_noise(rng, size, (4, 4)) * 6.0
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * (ys + 2.0 * np.sin(xs / 7.0 + warp)) / period)
        rgb = _blend((20, 60, 140), (95, 160, 220), 0.8 * waves + 0.2 * grain)
    elif stuff == "sand":
        dunes = _smooth_noise(rng, size, (5, 5))
        rgb = _blend((190, 160, 105), (235, 210, 160), 0.6 * dunes + 0.4 * grain)
        dots = rng.random((size, size)) < 0.06
        rgb[dots] *= 0.7
    elif stuff == "sky":
        gradient = ys / (size - 1)
        rgb = _blend((95, 145, 225), (185, 210, 245), gradient)
        clouds = np.clip((_smooth_noise(rng, size, (4, 6)) - 0.55) * 4.0, 0.0, 1.0)
        rgb = rgb + (np.float32(235) - rgb) * clouds[..., None]
    elif stuff == "wall":
        brick_height = int(rng.integers(10, 16))
        brick_width = 2 * brick_height
        row = (ys // brick_height).astype(np.int64)
        shifted = xs + (row % 2) * (brick_width // 2) + int(rng.integers(0, brick_width))
        column = (shifted // brick_width).astype(np.int64)
        brick_tone = rng.random((size // brick_height + 2, size // brick_width + 3), dtype=np.float32)
        tone = brick_tone[row, column]
        rgb = _blend((120, 45, 30), (185, 85, 55), 0.7 * tone + 0.3 * grain)
        mortar = (ys % brick_height < 2) | (shifted % brick_width < 2)
        rgb[mortar] = _blend((165, 160, 150), (205, 200, 190), grain)[mortar]
    else:
        raise ValueError(f"unknown stuff {stuff!r}; expected one of {TOY_STUFF}")
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Scenes and captions
# ----------------------------------------------------------------------------------------------


def _place_objects(rng: np.random.Generator, config: ToyWorldConfig) -> list[dict]:
    """Choose categories, colours and non-crowding positions for up to ``max_objects`` things."""
    size = config.image_size
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    plan: list[tuple[str, str]] = []  # (category, colour) per object, copies of a category together
    categories = list(rng.permutation(TOY_THINGS))
    while len(plan) < target and categories:
        category = str(categories.pop())
        colour = THING_COLOURS[category] if config.colour_per_category else str(rng.choice(list(TOY_COLOURS)))
        copies = 1
        if target - len(plan) >= 2 and rng.random() < config.multiple_probability:
            copies = int(rng.integers(2, min(3, target - len(plan)) + 1))
        plan.extend([(category, colour)] * copies)
    objects: list[dict] = []
    for category, colour in plan:
        for _ in range(30):
            radius = rng.uniform(config.min_object_radius, config.max_object_radius) * size
            center = (float(rng.uniform(radius, size - radius)), float(rng.uniform(radius, size - radius)))
            crowded = any(
                math.dist(center, other["center"]) < config.min_center_distance * (radius + other["radius"])
                for other in objects
            )
            if not crowded:
                angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
                objects.append(
                    {"category": category, "colour": colour, "center": center, "radius": float(radius),
                     "angle": angle}
                )
                break
    return objects


def _compose(objects: list[dict], image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Painter's algorithm: int [H, W] index of the visible object per pixel (-1: stuff)."""
    shapes = [object_mask(obj, image_size) for obj in objects]
    visible = np.full((image_size, image_size), -1, dtype=np.int16)
    for index, shape in enumerate(shapes):
        visible[shape] = index
    return visible, shapes


def _object_phrase(rng: np.random.Generator, config: ToyWorldConfig, group: list[dict]) -> str:
    """Noun phrase for all copies of one category: "a red circle", "two small blue stars"."""
    first = group[0]
    words = [COUNT_WORDS[len(group)] if len(group) > 1 else "a"]
    if rng.random() < config.size_adjective_probability:
        mean_radius = np.mean([obj["radius"] for obj in group]) / config.image_size
        middle = 0.5 * (config.min_object_radius + config.max_object_radius)
        words.append(str(rng.choice(SIZE_ADJECTIVES["small" if mean_radius < middle else "large"])))
    if rng.random() >= config.omit_colour_probability:
        words.append(first["colour"])
    words.append(TOY_PLURALS[first["category"]] if len(group) > 1 else first["category"])
    return _with_article(words)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _with_article(words: list[str]) -> str:
    """Join words, turning a leading "a" into "an" before a vowel."""
    words = [w for w in words if w]
    if len(words) > 1 and words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def make_caption(rng: np.random.Generator, config: ToyWorldConfig, objects: list[dict], stuff: str) -> str:
    """A varied sentence naming every thing category in ``objects`` once, and the stuff."""
    groups: dict[str, list[dict]] = {}
    for obj in objects:
        groups.setdefault(obj["category"], []).append(obj)
    ordered = [groups[category] for category in rng.permutation(list(groups))]
    phrases = [_object_phrase(rng, config, group) for group in ordered]
    words = STUFF_WORDS[stuff]
    determiner = str(rng.choice(words["determiners"]))
    adjective = str(rng.choice(words["adjectives"])) if rng.random() < 0.3 else ""
    scene = _with_article([determiner, adjective, stuff]) or stuff
    caption = str(rng.choice(CAPTION_TEMPLATES)).format(
        objects=_join(phrases),
        place=f"{rng.choice(words['prepositions'])} {scene}",
        scene=scene,
        verb=str(rng.choice(words["verbs"])),
        be="are" if len(ordered[0]) > 1 else "is",
    )
    return caption


def generate_sample(rng: np.random.Generator, config: ToyWorldConfig | None = None) -> dict:
    """Draw one scene.

    Args:
        rng: the generator that decides everything about the sample.
        config: drawing parameters (defaults to ``ToyWorldConfig()``).

    Returns:
        dict with ``image`` (PIL RGB, image_size²), ``caption`` (str), ``mask`` (uint8 [H, W] class
        ids into ``TOY_CLASSES``), ``background`` (the stuff name) and ``objects``: the visible
        things in drawing order, each a dict with ``category``, ``colour``, ``rgb``, ``center``
        (x, y pixels), ``radius`` (pixels), ``angle`` (radians) and ``visible_pixels``.
    """
    config = config or ToyWorldConfig()
    size = config.image_size
    stuff = str(rng.choice(TOY_STUFF))
    texture = stuff_texture(stuff, rng, size)
    objects = _place_objects(rng, config)
    while True:
        visible, shapes = _compose(objects, size)
        fractions = [
            (visible == index).sum() / max(shape.sum(), 1) for index, shape in enumerate(shapes)
        ]
        worst = int(np.argmin(fractions)) if fractions else -1
        if worst < 0 or fractions[worst] >= config.min_visible_fraction:
            break
        del objects[worst]  # mostly hidden: leave it out of the scene and the caption
    image = texture
    mask = np.full((size, size), TOY_CLASSES.index(stuff), dtype=np.uint8)
    for index, obj in enumerate(objects):
        pixels = visible == index
        obj["rgb"] = TOY_COLOURS[obj["colour"]]
        obj["shade_rgb"] = shade_of(obj["rgb"])
        obj["visible_pixels"] = int(pixels.sum())
        shaded = pixels & thing_pattern(obj["category"], size)
        image[pixels] = obj["rgb"]
        image[shaded] = obj["shade_rgb"]
        mask[pixels] = TOY_CLASSES.index(obj["category"])
    caption = make_caption(rng, config, objects, stuff)
    return {
        "image": Image.fromarray(image),
        "caption": caption,
        "mask": mask,
        "background": stuff,
        "objects": objects,
    }


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of every other sample."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def build_toy_world(config: ToyWorldConfig | None = None):
    """Generate the world as a ``datasets.DatasetDict`` with splits train/validation/test.

    Columns: ``image`` (``datasets.Image``, RGB), ``caption`` (string) and ``label``
    (``datasets.Image`` holding the uint8 class-id mask as a grey PNG, ids into ``TOY_CLASSES``).
    """
    import datasets

    config = config or ToyWorldConfig()
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Image()}
    )
    description = json.dumps({"classes": list(TOY_CLASSES), "config": asdict(config)})
    splits = {}
    for split, count in zip(SPLITS, (config.num_train, config.num_validation, config.num_test)):
        columns: dict[str, list] = {"image": [], "caption": [], "label": []}
        for index in range(count):
            sample = generate_sample(sample_rng(config.seed, split, index), config)
            columns["image"].append(_png(sample["image"]))
            columns["caption"].append(sample["caption"])
            columns["label"].append(_png(Image.fromarray(sample["mask"])))
        info = datasets.DatasetInfo(description=description, features=features)
        splits[split] = datasets.Dataset.from_dict(columns, features=features, info=info, split=split)
    return datasets.DatasetDict(splits)


def save_toy_world(config: ToyWorldConfig | None, path: str | Path):
    """Generate the world and save it with ``save_to_disk``; reload with ``datasets.load_from_disk``.

    Returns the generated ``DatasetDict``.
    """
    world = build_toy_world(config)
    world.save_to_disk(str(path))
    return world


def toy_world_config_of(dataset) -> ToyWorldConfig:
    """The ``ToyWorldConfig`` a split (or ``DatasetDict``) of the toy world was generated with."""
    split = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    try:
        return ToyWorldConfig(**json.loads(split.info.description)["config"])
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError("this dataset was not made by build_toy_world (no toy-world description)") from error


def toy_noun_forms() -> dict[str, str]:
    """Every caption word that names a class, mapped to the class: singulars and plurals ("circles" -> "circle")."""
    return {name: name for name in TOY_CLASSES} | {plural: name for name, plural in TOY_PLURALS.items()}


def toy_world_vocabulary() -> list[str]:
    """Every word a toy-world caption can use, plus the words of the standard prompt templates."""
    words = set(TOY_CLASSES) | set(TOY_PLURALS.values()) | set(TOY_COLOURS) | set(PROMPT_WORDS)
    words |= set(COUNT_WORDS.values()) | {w for options in SIZE_ADJECTIVES.values() for w in options}
    for stuff_words in STUFF_WORDS.values():
        for options in stuff_words.values():
            words |= {w for option in options for w in option.split()}
    for template in CAPTION_TEMPLATES:
        for word in template.replace(",", " ").replace(".", " ").split():
            if not word.startswith("{"):
                words.add(word)
    words |= {"a", "an", "and", "is", "are"}
    return sorted(words)
