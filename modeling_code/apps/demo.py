"""The Gradio demo: model loading, input validation, the prediction function and the page (``space/app.py``).

Everything here is a plain function of its arguments: the one ``CoDeSegmenter`` of the process is passed in,
no request writes to module state, and each result file goes to a fresh temporary folder. Bad input never
reaches the page as a traceback: problems the user can fix raise ``gr.Error`` with a sentence saying what to
change (and one line in the server log, no traceback), and inputs that can be repaired (an oversized image,
duplicate or empty class entries) are repaired with a ``gr.Warning``. Uploads reach the handler as file paths,
undecoded (``uploaded_image``), so an unreadable file gets the same message as on the command line. The class list
offered first is the one saved with the model (``CoDeConfig.class_vocabulary``). Needs the ``demo`` extra (gradio).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from ..evaluation.specs import get_benchmark
from ..image_processing_code import InvalidImageError, load_image
from ..inference import BACKGROUND_CLASS, parse_class_list
from ..predict.segmenter import CoDeSegmenter
from ..predict.visualization import palette
from ..toy.world import TOY_CLASSES

logger = logging.getLogger(__name__)

MODEL_ENV_VAR = "CODE_SEG_MODEL"
# Where ``bash scripts/toy_world.sh`` leaves its final model, relative to the repository root.
TOY_WORLD_MODEL_DIR = Path("outputs/toy_world/code_model")
TOY_WORLD_COMMAND = "bash scripts/toy_world.sh"
# Larger uploads are downscaled: the score maps are resized to the image, one float per pixel and class.
DEMO_MAX_PIXELS = 1024 * 1024
# ADE20K's 150 classes fit; the palette PNG of the label map holds at most 256 ids.
MAX_CLASSES = 200
MAX_CLASS_NAME_LENGTH = 100
LABEL_MAP_FILE = "label_map.png"
FRACTION_COLUMNS = ("class", "id", "pixels (%)")
HOW_TO_LOAD_A_MODEL = (
    f"Set {MODEL_ENV_VAR} to a saved CoDe model (a folder or a Hub id), or train the toy-world model with "
    f"`{TOY_WORLD_COMMAND}`, then restart the app."
)
NO_MODEL_ERROR = f"No model is loaded. {HOW_TO_LOAD_A_MODEL}"
# The preset made of a model's saved class vocabulary when it is none of the others; "Custom" is any other text.
MODEL_PRESET = "This model's classes"
CUSTOM_PRESET = "Custom"
DEFAULT_PRESET = "PASCAL VOC"


def user_error(message: str) -> gr.Error:
    """A mistake the user can fix: shown on the page, one line in the server log (no traceback)."""
    logger.warning("request refused: %s", message)
    return gr.Error(message, print_exception=False)


# --------------------------------------------------------------------------------------------------------------
# Class presets
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassPreset:
    """A class list offered on the page: the names (without ``background``) and whether to add background."""

    class_names: tuple[str, ...]
    background: bool


def _benchmark_preset(key: str) -> ClassPreset:
    spec = get_benchmark(key)
    names = tuple(name.strip() for name in spec.class_names if name != BACKGROUND_CLASS)
    return ClassPreset(names, spec.background)


def _vocabulary_preset(vocabulary: Sequence[str]) -> ClassPreset:
    background = any(name.strip().lower() == BACKGROUND_CLASS for name in vocabulary)
    return ClassPreset(tuple(name for name in vocabulary if name.strip().lower() != BACKGROUND_CLASS), background)


def _preset_key(names: Sequence[str]) -> tuple[str, ...]:
    """What makes two class lists the same preset: the names, in order, without case, spacing or background."""
    cleaned = (" ".join(name.split()).lower() for name in names)
    return tuple(name for name in cleaned if name and name != BACKGROUND_CLASS)


def class_presets(vocabulary: Sequence[str] | None = None) -> dict[str, ClassPreset]:
    """The presets by display name: four benchmarks' class lists (verbatim) and the toy world's classes.

    ``vocabulary`` (a model's ``class_vocabulary``) that matches none of them comes first, as ``MODEL_PRESET``.
    """
    presets = {
        "PASCAL VOC": _benchmark_preset("voc"),
        "COCO-Object": _benchmark_preset("coco_object"),
        "ADE20K": _benchmark_preset("ade20k"),
        "Cityscapes": _benchmark_preset("cityscapes"),
        "Toy world": ClassPreset(TOY_CLASSES, background=False),
    }
    if vocabulary and _preset_key(vocabulary) and matching_preset(", ".join(vocabulary), presets) == CUSTOM_PRESET:
        presets = {MODEL_PRESET: _vocabulary_preset(vocabulary), **presets}
    return presets


def preset_for_vocabulary(vocabulary: Sequence[str] | None, presets: Mapping[str, ClassPreset]) -> str:
    """The preset to show first for a model's saved vocabulary: the matching one; ``DEFAULT_PRESET`` when unknown."""
    if not vocabulary:
        return DEFAULT_PRESET
    if MODEL_PRESET in presets:
        return MODEL_PRESET
    match = matching_preset(", ".join(vocabulary), presets)
    return DEFAULT_PRESET if match == CUSTOM_PRESET else match


def matching_preset(class_text: str | None, presets: Mapping[str, ClassPreset]) -> str:
    """The preset whose classes the text names (in order, ignoring case, spacing and background), else Custom."""
    key = _preset_key(parse_class_list(class_text or ""))
    for name, preset in presets.items():
        if key and _preset_key(preset.class_names) == key:
            return name
    return CUSTOM_PRESET


def preset_values(name: str, presets: Mapping[str, ClassPreset] | None = None) -> tuple[str, bool]:
    """(comma-separated class text, background switch) of a preset."""
    presets = class_presets() if presets is None else presets
    if name not in presets:
        raise user_error(f"Unknown class preset {name!r}; choose one of {', '.join(presets)}.")
    preset = presets[name]
    return ", ".join(preset.class_names), preset.background


# --------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassRequest:
    """The class list to segment with (``background`` first when switched on) and notes about repairs."""

    class_names: list[str]
    notes: list[str]


def _has_empty_entries(text: str) -> bool:
    """Whether a line of the class text has an empty entry between commas (``"cat,, dog"``, ``", cat"``).

    Blank lines and a comma ending a line (``"cat,\\ndog"``) are layout, not empty entries.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return any(not entry.strip() for line in lines for entry in line.removesuffix(",").split(","))


def parse_class_request(
    class_text: str | None, use_background: bool, max_classes: int = MAX_CLASSES
) -> ClassRequest:
    """Validate the class text of the page: names separated by commas or line breaks.

    Empty entries between commas and repeated names (case-insensitive, first spelling kept) are dropped with a
    note (blank lines and a comma at the end of a line are just layout); ``background`` typed in the text is
    dropped too, since the background switch decides about it.

    Raises:
        gr.Error: no class names, a name longer than ``MAX_CLASS_NAME_LENGTH``, or more than ``max_classes``.
    """
    text = class_text or ""
    names = parse_class_list(text)
    notes = []
    if _has_empty_entries(text):
        notes.append("Empty entries in the class list were ignored.")
    if any(name.lower() == BACKGROUND_CLASS for name in names):
        names = [name for name in names if name.lower() != BACKGROUND_CLASS]
        if not use_background:
            notes.append(f"'{BACKGROUND_CLASS}' was ignored: the background class is set with its switch (off).")
    unique: dict[str, str] = {}
    duplicates = []
    for name in (" ".join(name.split()) for name in names):
        if name.lower() in unique:
            duplicates.append(name)
        else:
            unique[name.lower()] = name
    if duplicates:
        notes.append(f"Repeated class names were ignored: {', '.join(duplicates)}.")
    names = list(unique.values())
    if not names:
        raise user_error(
            "Enter at least one class name, e.g. 'cat, sofa, plant' (separated by commas or line breaks)."
        )
    too_long = [name for name in names if len(name) > MAX_CLASS_NAME_LENGTH]
    if too_long:
        raise user_error(
            f"Class names are limited to {MAX_CLASS_NAME_LENGTH} characters; shorten '{too_long[0][:40]}…'."
        )
    total = len(names) + bool(use_background)
    if total > max_classes:
        raise user_error(f"Too many classes: {total} (at most {max_classes}). Remove some names.")
    return ClassRequest([BACKGROUND_CLASS, *names] if use_background else names, notes)


def prepare_image(image: Any, max_pixels: int = DEMO_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """The upload as an RGB image of at most ``max_pixels`` pixels (aspect kept), and a note if downscaled.

    Raises:
        gr.Error: no image, or one that cannot be read.
    """
    if image is None:
        raise user_error("Upload an image first (or pick one of the examples).")
    try:
        rgb = load_image(image, max_pixels=None)  # files: upright by their EXIF orientation, PIL's pixel limit
    except InvalidImageError as error:
        message = str(error)
        if isinstance(image, (str, Path)):  # the server's temporary copy of an upload: its file name says enough
            message = message.replace(str(image), Path(image).name)
        raise user_error(f"This image cannot be read: {message}") from error
    if rgb.width * rgb.height <= max_pixels:
        return rgb, None
    scale = (max_pixels / (rgb.width * rgb.height)) ** 0.5
    size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
    note = f"The image ({rgb.width}x{rgb.height}) was downscaled to {size[0]}x{size[1]} to keep the demo fast."
    logger.info(note)
    return rgb.resize(size, Image.Resampling.BILINEAR), note


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------
class DemoPrediction(NamedTuple):
    """What the page shows for one image.

    Attributes:
        annotated: ``(image, [(mask, class name), ...])`` for ``gr.AnnotatedImage``: one [H, W] float32 0/1
            mask per class present, in class-id order.
        label_map_path: a palette PNG whose pixel values are class ids (colours as in ``color_map``).
        fractions: one row per class present, most pixels first: class, id, percentage of the pixels.
        color_map: class name -> ``#rrggbb`` for every class of the request.
    """

    annotated: tuple[Image.Image, list[tuple[np.ndarray, str]]]
    label_map_path: str
    fractions: pd.DataFrame
    color_map: dict[str, str]


def save_label_map(label_map: np.ndarray, num_classes: int, directory: str | Path) -> Path:
    """Write ``label_map`` ([H, W] ids < 256) as a palette PNG coloured with ``visualization.palette``."""
    if num_classes > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes; got {num_classes}")
    image = Image.fromarray(label_map.astype(np.uint8), mode="P")
    image.putpalette(palette(num_classes).ravel().tolist())
    path = Path(directory) / LABEL_MAP_FILE
    image.save(path)
    return path


def fractions_table(pixel_fractions: Mapping[str, float]) -> pd.DataFrame:
    """The classes present (fraction > 0), most pixels first, with their ids and percentages (2 decimals)."""
    rows = [
        (name, index, round(100.0 * fraction, 2))
        for index, (name, fraction) in enumerate(pixel_fractions.items())
        if fraction > 0
    ]
    rows.sort(key=lambda row: -row[2])
    return pd.DataFrame(rows, columns=list(FRACTION_COLUMNS))


def color_map(class_names: Sequence[str]) -> dict[str, str]:
    """Each class's palette colour as ``#rrggbb`` (the colours of the label-map PNG)."""
    return {name: "#{:02x}{:02x}{:02x}".format(*color) for name, color in zip(class_names, palette(len(class_names)))}


def predict(
    segmenter: CoDeSegmenter | None,
    image: Any,
    class_text: str | None,
    use_background: bool,
    background_threshold: float,
    use_pamr: bool,
    max_pixels: int = DEMO_MAX_PIXELS,
    output_dir: str | Path | None = None,
) -> DemoPrediction:
    """Segment one upload into the classes of the page.

    Args:
        segmenter: the process's segmenter, or None when no model could be loaded.
        image: a PIL image, NumPy array or file path.
        class_text: class names separated by commas or line breaks.
        use_background: add the ``background`` class (a constant score of ``background_threshold``).
        background_threshold: in [0, 1].
        use_pamr: refine the masks with PAMR.
        max_pixels: larger images are downscaled (with a warning).
        output_dir: where the label-map PNG goes (a fresh temporary folder inside it); default: the system's.

    Raises:
        gr.Error: with a message for the user, for every problem (the traceback goes to the log only).
    """
    if segmenter is None:
        raise user_error(NO_MODEL_ERROR)
    request = parse_class_request(class_text, use_background)
    if use_background and not 0.0 <= background_threshold <= 1.0:
        raise user_error(f"The background threshold must lie between 0 and 1; got {background_threshold}.")
    rgb, image_note = prepare_image(image, max_pixels)
    for note in [*request.notes, image_note]:
        if note:
            gr.Warning(note)
    try:
        result = segmenter(
            rgb, request.class_names, use_pamr=bool(use_pamr), background_threshold=float(background_threshold)
        )
    except (ValueError, TypeError) as error:
        raise user_error(f"Segmentation failed: {error}") from error
    except Exception as error:
        logger.exception("segmentation failed")  # a bug, not a user mistake: the traceback, once
        raise gr.Error(
            f"Segmentation failed unexpectedly ({type(error).__name__}); see the server log.", print_exception=False
        ) from error
    masks = [
        ((result.label_map == index).astype(np.float32), name)
        for index, name in enumerate(result.class_names)
        if result.pixel_fractions[name] > 0
    ]
    directory = tempfile.mkdtemp(prefix="code-seg-demo-", dir=output_dir)
    label_map_path = save_label_map(result.label_map, len(result.class_names), directory)
    return DemoPrediction(
        annotated=(result.image, masks),
        label_map_path=str(label_map_path),
        fractions=fractions_table(result.pixel_fractions),
        color_map=color_map(result.class_names),
    )


# --------------------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DemoModel:
    """The model of the process: the segmenter (None if none could be loaded) and a status for the page."""

    segmenter: CoDeSegmenter | None
    source: str | None
    status: str


def resolve_model_source(environ: Mapping[str, str], repo_root: str | Path) -> str | None:
    """The model to serve: ``$CODE_SEG_MODEL`` if set, else the toy-world model if it exists, else None."""
    chosen = environ.get(MODEL_ENV_VAR, "").strip()
    if chosen:
        return chosen
    toy_world = Path(repo_root) / TOY_WORLD_MODEL_DIR
    return str(toy_world) if (toy_world / "config.json").is_file() else None


def _describe(segmenter: CoDeSegmenter) -> str:
    config = segmenter.model.config
    vision = config.clip_config.vision_config
    parameters = sum(parameter.numel() for parameter in segmenter.model.parameters())
    return (
        f"CLIP vision width {vision.hidden_size}, patch {vision.patch_size}; {parameters / 1e6:.1f} M parameters; "
        f"inference short side {config.inference_short_side}, window {config.window_size}"
    )


def load_demo_model(source: str | None) -> DemoModel:
    """Load ``source`` (a folder or Hub id) once; failures become a status message, never an exception."""
    if source is None:
        return DemoModel(None, None, f"**No model is loaded.** {HOW_TO_LOAD_A_MODEL}")
    try:
        segmenter = CoDeSegmenter.from_pretrained(source)
    except (OSError, ValueError) as error:  # a missing, incomplete or damaged model: one line
        logger.warning("could not load %s: %s", source, error)
        return DemoModel(None, source, f"**No model is loaded:** loading `{source}` failed ({error}). "
                                       f"{HOW_TO_LOAD_A_MODEL}")
    except Exception as error:  # anything else is reported on the page too, with its traceback in the log
        logger.exception("could not load %s", source)
        return DemoModel(None, source, f"**No model is loaded:** loading `{source}` failed ({error}). "
                                       f"{HOW_TO_LOAD_A_MODEL}")
    return DemoModel(segmenter, source, f"**Model:** `{source}` ({_describe(segmenter)}).")


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------
DESCRIPTION = """\
# CoDe: open-vocabulary semantic segmentation

Type any class names and segment an image into them. CoDe (*Image-Text Co-Decomposition*, CVPR 2024) learns
to segment from image–caption pairs alone. `background` is not a text query: when switched on, it is a constant
score, and pixels where no class scores higher are labelled background.
"""


def _upload_path(image: gr.Image, payload: Any) -> str | None:
    """The uploaded file's path, undecoded (an inline data URL is written to a file by Gradio first)."""
    if payload is None:
        return None
    if payload.path is None:
        try:
            return gr.Image.preprocess(image, payload)
        except Exception as error:
            raise user_error(f"This image cannot be read: {error}") from error
    return str(payload.path)


def uploaded_image(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` whose uploads reach the handler as file paths, undecoded.

    Gradio's own preprocessing opens every upload with PIL before the handler runs, so a truncated, empty or
    non-image file (or a decompression bomb) failed there: the page showed a bare "Error" and API clients got
    "upstream Gradio app has raised an exception". Here ``prepare_image`` decodes the file: the same messages as
    the command line, EXIF orientation applied as by Gradio, PIL's pixel limit refused with a message. (An
    instance's ``preprocess``, not a subclass: Gradio writes a ``.pyi`` stub beside any module that subclasses
    one of its components.)
    """
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = functools.partial(_upload_path, image)
    return image


def check_upload(image: Any) -> None:
    """Name an unreadable upload as soon as it arrives (the same check ``predict`` makes)."""
    if image is not None:
        prepare_image(image)


def build_demo(
    model: DemoModel,
    examples: Sequence[Sequence[Any]] = (),
    default_preset: str | None = None,
    title: str = "CoDe segmentation",
) -> gr.Blocks:
    """The page: inputs, the segment button, the outputs and the examples (not cached).

    Args:
        model: the loaded model and its status line (shown at the top of the page). Without a model the controls
            are disabled and the examples left out.
        examples: rows of (image path, class text, background, threshold, PAMR).
        default_preset: the class preset shown first (a key of ``class_presets()``); default: the one of the
            model's saved ``class_vocabulary`` (``preset_for_vocabulary``).
    """
    config = model.segmenter.model.config if model.segmenter is not None else None
    vocabulary = getattr(config, "class_vocabulary", None)
    presets = class_presets(vocabulary)
    default_preset = default_preset or preset_for_vocabulary(vocabulary, presets)
    default_threshold = config.background_threshold if config is not None else 0.4
    default_pamr = config.use_pamr if config is not None else True
    default_text, default_background = preset_values(default_preset, presets)
    enabled = model.segmenter is not None

    def run(image, class_text, use_background, background_threshold, use_pamr):
        prediction = predict(model.segmenter, image, class_text, use_background, background_threshold, use_pamr)
        overlay = gr.AnnotatedImage(value=prediction.annotated, color_map=prediction.color_map)
        return overlay, prediction.label_map_path, prediction.fractions

    def choose_preset(name):
        if name == CUSTOM_PRESET:
            return gr.skip(), gr.skip()
        return preset_values(name, presets)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(DESCRIPTION)
        gr.Markdown(model.status, elem_id="model-status")
        with gr.Row():
            with gr.Column():
                image = uploaded_image(label="Image", sources=["upload", "clipboard"], elem_id="input-image",
                                      interactive=enabled)
                preset = gr.Dropdown([*presets, CUSTOM_PRESET], value=default_preset, label="Class preset",
                                     elem_id="class-preset", interactive=enabled)
                class_text = gr.Textbox(
                    value=default_text, lines=2, label="Classes (separated by commas or line breaks)",
                    elem_id="class-text", interactive=enabled,
                )
                with gr.Row():
                    use_background = gr.Checkbox(value=default_background, label="Background class",
                                                 interactive=enabled)
                    use_pamr = gr.Checkbox(value=default_pamr, label="PAMR refinement", interactive=enabled)
                background_threshold = gr.Slider(
                    0.0, 1.0, value=default_threshold, step=0.01, label="Background threshold",
                    info="score of the background class: higher labels more pixels background", interactive=enabled,
                )
                segment = gr.Button("Segment", variant="primary", elem_id="segment-button", interactive=enabled)
            with gr.Column():
                overlay = gr.AnnotatedImage(label="Segmentation", format="png", elem_id="overlay")
                fractions = gr.Dataframe(
                    headers=list(FRACTION_COLUMNS), label="Pixels per class", elem_id="fractions", interactive=False
                )
                label_map = gr.File(label="Label map (PNG, pixel value = class id)", elem_id="label-map")
        inputs = [image, class_text, use_background, background_threshold, use_pamr]
        image.upload(check_upload, inputs=image, outputs=None, api_visibility="private", show_progress="hidden")
        # A preset picked by the user fills the text; any text (typed, or set by an example) names its preset.
        preset.input(choose_preset, inputs=preset, outputs=[class_text, use_background], api_visibility="private")
        class_text.change(lambda text: matching_preset(text, presets), inputs=class_text, outputs=preset,
                          api_visibility="private", queue=False, show_progress="hidden")
        use_background.change(
            lambda on: gr.Slider(interactive=on and enabled), inputs=use_background, outputs=background_threshold,
            api_visibility="private",
        )
        segment.click(run, inputs=inputs, outputs=[overlay, label_map, fractions], api_name="segment")
        if examples and enabled:
            gr.Examples([list(row) for row in examples], inputs=inputs, label="Examples (generated, CC0)")
    return demo


__all__ = [
    "CUSTOM_PRESET",
    "DEMO_MAX_PIXELS",
    "MAX_CLASSES",
    "MODEL_ENV_VAR",
    "MODEL_PRESET",
    "TOY_WORLD_MODEL_DIR",
    "ClassPreset",
    "ClassRequest",
    "DemoModel",
    "DemoPrediction",
    "build_demo",
    "check_upload",
    "class_presets",
    "color_map",
    "fractions_table",
    "load_demo_model",
    "matching_preset",
    "parse_class_request",
    "predict",
    "prepare_image",
    "preset_for_vocabulary",
    "preset_values",
    "resolve_model_source",
    "save_label_map",
    "uploaded_image",
    "user_error",
]
