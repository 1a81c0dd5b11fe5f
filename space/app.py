"""Gradio app of code-seg: open-vocabulary segmentation of an uploaded image into typed class names.

The model is ``$CODE_SEG_MODEL`` (a saved model folder or a Hub id), else the toy-world model that
``bash scripts/toy_world.sh`` writes to ``outputs/toy_world/code_model``; the page says which one is loaded,
or how to get one. It is loaded once per process; requests go through a queue, one at a time.
Run: ``python space/app.py`` (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` choose the address).
"""

from __future__ import annotations

import os
from pathlib import Path

from modeling_code.apps.allocator import retain_freed_memory
from modeling_code.apps.demo import (
    build_demo,
    load_demo_model,
    preset_values,
    resolve_model_source,
)

SPACE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SPACE_DIR.parent
TOY_WORLD_CLASSES = preset_values("Toy world")[0]
# (image, class text, background switch, background threshold, PAMR) per example; the images are generated
# by space/make_examples.py and released under CC0.
EXAMPLES = [
    ("examples/toy_world_1.png", TOY_WORLD_CLASSES, False, 0.4, True),
    ("examples/toy_world_2.png", TOY_WORLD_CLASSES, False, 0.4, True),
    ("examples/shapes.png", "circle, triangle, square, grass, sky", True, 0.4, False),
]


def example_rows() -> list[list]:
    """The examples whose image file is present, with absolute paths."""
    rows = []
    for image, *settings in EXAMPLES:
        path = SPACE_DIR / image
        if path.is_file():
            rows.append([str(path), *settings])
    return rows


retain_freed_memory()  # every request frees and re-allocates the same large tensors
model_source = resolve_model_source(os.environ, REPO_ROOT)
model = load_demo_model(model_source)
demo = build_demo(model, example_rows())  # the class preset shown first: the vocabulary saved with the model
demo.queue(max_size=32, default_concurrency_limit=1)

if __name__ == "__main__":
    demo.launch()
