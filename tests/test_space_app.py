"""The Space: ``space/app.py`` served on 127.0.0.1 and called through ``gradio_client``; its metadata files."""

from __future__ import annotations

import json
import re
import urllib.request
from importlib.metadata import requires

import gradio
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from helpers import BAD_IMAGE_FILES, EXAMPLE_IMAGE, SPACE_DIR, serve_app, write_bad_image
from huggingface_hub import SpaceCard
from PIL import Image

from modeling_code.apps.demo import color_map


@pytest.fixture(scope="module")
def app_log(tmp_path_factory):
    return tmp_path_factory.mktemp("space_log") / "app.log"


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, app_log):
    with serve_app(tiny_model_dir, app_log) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.mark.slow
def test_segment_endpoint_returns_overlay_label_map_and_table(client):
    overlay, label_map_path, table = client.predict(
        handle_file(str(EXAMPLE_IMAGE)), "circle, tile, grass", True, 0.4, False, api_name="/segment"
    )
    annotations = overlay["value"]["annotations"]
    labels = [annotation["label"] for annotation in annotations]
    assert labels and set(labels) <= {"background", "circle", "tile", "grass"}
    assert overlay["color_map"] == color_map(["background", "circle", "tile", "grass"])
    with Image.open(label_map_path) as saved:
        assert saved.mode == "P" and saved.size == Image.open(EXAMPLE_IMAGE).size
        ids = np.unique(np.array(saved))
    class_ids = {"background": 0, "circle": 1, "tile": 2, "grass": 3}
    assert sorted(class_ids[label] for label in labels) == ids.tolist()
    assert table["headers"] == ["class", "id", "pixels (%)"]
    assert sorted(row[0] for row in table["data"]) == sorted(labels)
    assert sum(row[2] for row in table["data"]) == pytest.approx(100, abs=0.05)
    for annotation in annotations:
        with Image.open(annotation["image"]) as mask:
            assert mask.size == (112, 112)


@pytest.mark.slow
def test_endpoint_errors_are_messages_not_tracebacks(client):
    with pytest.raises(AppError, match="Enter at least one class name") as caught:
        client.predict(handle_file(str(EXAMPLE_IMAGE)), " , ", True, 0.4, False, api_name="/segment")
    assert "Traceback" not in str(caught.value)
    with pytest.raises(AppError, match="Too many classes: 201"):
        names = ", ".join(f"class{i}" for i in range(200))
        client.predict(handle_file(str(EXAMPLE_IMAGE)), names, True, 0.4, False, api_name="/segment")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_IMAGE_FILES))
def test_unreadable_uploads_get_the_command_lines_message(client, tmp_path, name):
    """Gradio decoded uploads itself and answered "upstream Gradio app has raised an exception"."""
    path = write_bad_image(tmp_path, name)
    with pytest.raises(AppError, match=f"This image cannot be read: .*{BAD_IMAGE_FILES[name]}") as caught:
        client.predict(handle_file(str(path)), "cat", True, 0.4, False, api_name="/segment")
    assert "Traceback" not in str(caught.value) and "upstream" not in str(caught.value)


@pytest.mark.slow
def test_user_mistakes_leave_one_line_each_in_the_server_log(client, app_log, tmp_path):
    before = app_log.read_text()
    for classes in (" , ", "\n\n"):
        with pytest.raises(AppError, match="Enter at least one class name"):
            client.predict(handle_file(str(EXAMPLE_IMAGE)), classes, True, 0.4, False, api_name="/segment")
    with pytest.raises(AppError, match="cannot be read"):
        client.predict(handle_file(str(write_bad_image(tmp_path, "notes.png"))), "cat", True, 0.4, False,
                       api_name="/segment")
    added = app_log.read_text()[len(before):]
    assert "Traceback" not in added and "raise" not in added, added
    assert added.count("request refused: ") == 3, added


@pytest.mark.slow
def test_page_names_the_loaded_model_and_offers_the_examples(app_url, client, tiny_model_dir):
    with urllib.request.urlopen(app_url + "config", timeout=10) as response:
        config = json.load(response)
    props = {component["props"].get("elem_id"): component["props"] for component in config["components"]}
    assert props["model-status"]["value"].startswith(f"**Model:** `{tiny_model_dir}`")
    examples = [c["props"] for c in config["components"] if c["type"] == "dataset"]
    assert len(examples) == 1 and len(examples[0]["samples"]) == 3
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/segment"]


def test_space_front_matter_and_requirements():
    card = SpaceCard.load(SPACE_DIR / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__
    assert (SPACE_DIR / card.data.app_file).is_file()
    assert card.data.license == "apache-2.0" and card.data.models and card.data.title
    assert "CC0" in card.text and "CODE_SEG_MODEL" in card.text
    for name in ("toy_world_1.png", "toy_world_2.png", "shapes.png"):
        assert (SPACE_DIR / "examples" / name).is_file()

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[ ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
                for line in requirements if line.strip() and not line.startswith("#")}

    package = [requirement for requirement in requires("code-seg") if "extra ==" not in requirement]
    space = (SPACE_DIR / "requirements.txt").read_text().splitlines()
    assert names(package) <= names(space)
    assert "gradio" not in names(space)  # the Space's gradio is sdk_version
