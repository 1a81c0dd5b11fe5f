"""The zero-shot-image-segmentation pipeline: results equal the processor -> model -> post-processing steps;
options, inputs and errors; saved with every model; loading through transformers.pipeline with and without the
package, from a save_pretrained folder and from a publish dry run."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NO_PACKAGE_PRELUDE, save_exif_photo, upright_test_picture
from PIL import Image
from transformers import pipeline

from modeling_code import CoDeModel, CoDeProcessor, ZeroShotImageSegmentationPipeline, pipeline_code
from modeling_code.apps.publishing import publish
from modeling_code.image_processing_code import InvalidImageError
from modeling_code.pipeline_code import CUSTOM_PIPELINES, PIPELINE_TASK

LABELS = ["cat", "sofa", "grass", "sky", "road", "tree", "water", "bird"]
REPO_ROOT = Path(__file__).resolve().parent.parent
LEGACY_DIR = REPO_ROOT / "tests" / "data" / "model_v0_1"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return CoDeModel.from_pretrained(tiny_model_dir).eval(), CoDeProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def segment(loaded):
    model, processor = loaded
    return ZeroShotImageSegmentationPipeline(model=model, processor=processor, device="cpu")


def photo(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def by_hand(loaded, image, labels, **protocol_overrides):
    """The steps the pipeline stands for: (label map, per-pixel scores) at the image's size."""
    model, processor = loaded
    inputs = processor(images=image, text=labels)
    protocol = model.config.inference_protocol.replace(**protocol_overrides)
    outputs = model(**inputs, protocol=protocol)
    result = processor.post_process_semantic_segmentation(outputs, return_scores=True)[0]
    return result["segmentation"], result["scores"]


def check_against_steps(entries, label_map, scores, labels):
    """Entries are the labels present, in vocabulary order, with their exact masks and mean scores."""
    present = [index for index in range(len(labels)) if (label_map == index).any()]
    assert [entry["label"] for entry in entries] == [labels[index] for index in present]
    for entry, index in zip(entries, present):
        mask = np.asarray(entry["mask"])
        assert entry["mask"].mode == "L" and mask.shape == tuple(label_map.shape)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, (label_map == index).numpy())
        assert entry["score"] == pytest.approx(scores[label_map == index].double().mean().item(), abs=1e-6)
    coverage = sum(np.asarray(entry["mask"]) == 255 for entry in entries)
    assert (coverage == 1).all()  # the masks partition the image


def test_a_batch_of_different_sizes_equals_the_steps_and_encodes_the_vocabulary_once(segment, loaded, monkeypatch):
    model, _ = loaded
    images = [photo(90, 70, 0), photo(41, 120, 1), Image.new("RGB", (64, 64), (40, 160, 60))]
    calls = []
    encode = model.get_class_embeddings
    monkeypatch.setattr(model, "get_class_embeddings", lambda ids: calls.append(ids.shape) or encode(ids))

    results = segment(images, candidate_labels=LABELS, background_threshold=0.0)

    assert calls == [(len(LABELS), model.config.context_length)]  # one vocabulary for the three images
    assert len(results) == 3
    absent = 0
    for image, entries in zip(images, results):
        label_map, scores = by_hand(loaded, image, LABELS, background_threshold=0.0)
        assert label_map.shape == (image.height, image.width)
        check_against_steps(entries, label_map, scores, LABELS)
        absent += len(LABELS) - len(entries)
    assert absent > 0  # labels that label no pixel get no entry


def test_background_option_adds_and_refuses_background(segment, loaded):
    image = photo(50, 40, 3)
    only_background = segment(image, candidate_labels=["cat", "sofa"], background=True, background_threshold=1.0)
    assert [entry["label"] for entry in only_background] == ["background"]
    assert only_background[0]["score"] == pytest.approx(1.0)
    assert np.asarray(only_background[0]["mask"]).min() == 255

    listed = ["background", "cat", "sofa"]
    entries = segment(image, candidate_labels=listed, background_threshold=0.3)
    check_against_steps(entries, *by_hand(loaded, image, listed, background_threshold=0.3), listed)
    assert "background" in [entry["label"] for entry in entries]  # the class list hits background
    assert "background" not in [entry["label"] for entry in segment(image, candidate_labels=["cat", "sofa"])]
    with pytest.raises(ValueError, match="background=False"):
        segment(image, candidate_labels=listed, background=False)


def test_labels_as_one_string_and_the_pamr_option(segment, loaded):
    image = photo(60, 45, 4)
    as_list = segment(image, candidate_labels=["cat", "sofa", "grass"], use_pamr=False)
    as_text = segment(image, candidate_labels="cat, sofa\ngrass", use_pamr=False)
    assert [entry["label"] for entry in as_text] == [entry["label"] for entry in as_list]
    for text_entry, list_entry in zip(as_text, as_list):
        assert text_entry["score"] == list_entry["score"]
        assert np.array_equal(np.asarray(text_entry["mask"]), np.asarray(list_entry["mask"]))
    check_against_steps(as_text, *by_hand(loaded, image, ["cat", "sofa", "grass"], use_pamr=False),
                        ["cat", "sofa", "grass"])


def test_defaults_given_when_the_pipeline_is_built(loaded):
    model, processor = loaded
    segment = ZeroShotImageSegmentationPipeline(model=model, processor=processor, device="cpu",
                                                candidate_labels="cat, sofa", background_threshold=0.0)
    image = photo(30, 30, 5)
    assert segment(image) == segment(image, candidate_labels=["cat", "sofa"], background_threshold=0.0)
    with pytest.raises(ValueError, match="background applies to candidate_labels: give them in the same call"):
        segment(image, background=True)


def test_paths_bytes_and_urls_are_read_upright_at_their_size(segment, tmp_path):
    upright = upright_test_picture(48, 30)
    path = save_exif_photo(tmp_path / "phone.png", upright, orientation=6)
    assert Image.open(path).size == (30, 48)  # stored sideways
    expected = segment(upright, candidate_labels=["cat", "sofa"])
    for source in (str(path), path.read_bytes()):
        entries = segment(source, candidate_labels=["cat", "sofa"])
        assert [entry["mask"].size for entry in entries] == [(48, 30)] * len(entries)
        assert [entry["label"] for entry in entries] == [entry["label"] for entry in expected]

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/phone.png"
        entries = segment(url, candidate_labels=["cat", "sofa"])
        assert [entry["mask"].size for entry in entries] == [(48, 30)] * len(entries)
        with pytest.raises(InvalidImageError, match=r"Could not download the image at .*missing\.png"):
            segment(url.replace("phone", "missing"), candidate_labels=["cat"])
    finally:
        server.shutdown()
        server.server_close()


def test_bad_calls_name_the_problem(segment, tmp_path):
    image = photo(20, 20, 6)
    with pytest.raises(ValueError, match="Give candidate_labels"):
        segment(image)
    with pytest.raises(ValueError, match="repeat"):
        segment(image, candidate_labels=["cat", "Cat"])
    with pytest.raises(TypeError, match=r"unexpected options \['colour'\]"):
        segment(image, candidate_labels=["cat"], colour="red")
    with pytest.raises(ValueError, match="batch_size must be 1"):
        segment([image, image], candidate_labels=["cat"], batch_size=2)
    with pytest.raises(ValueError, match="No class names"):
        segment(image, candidate_labels=" , \n")
    with pytest.raises(ValueError, match=r"background_threshold must be in \[0, 1\]"):
        segment(image, candidate_labels=["cat"], background_threshold=2.0)
    with pytest.raises(InvalidImageError, match=r"missing\.jpg"):
        segment(str(tmp_path / "missing.jpg"), candidate_labels=["cat"])


def test_every_saved_model_carries_the_pipeline(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert CUSTOM_PIPELINES[PIPELINE_TASK]["impl"] == "pipeline_code.ZeroShotImageSegmentationPipeline"
    assert (tiny_model_dir / "pipeline_code.py").read_bytes() == Path(pipeline_code.__file__).read_bytes()

    # A folder saved before the pipeline existed is published with this package's code and the entry.
    result = publish(LEGACY_DIR, "me/legacy", dry_run_dir=tmp_path / "staged")
    staged = json.loads((tmp_path / "staged" / "config.json").read_text())
    assert result.package_code and staged["custom_pipelines"] == CUSTOM_PIPELINES
    assert "pipeline_code.py" in result.files and (tmp_path / "staged" / "pipeline_code.py").is_file()
    legacy = json.loads((LEGACY_DIR / "config.json").read_text())
    assert {key: value for key, value in staged.items() if key != "custom_pipelines"} == legacy


def test_a_model_in_memory_through_transformers_pipeline_and_saved_back(loaded, tmp_path):
    model, processor = loaded
    segment = pipeline(PIPELINE_TASK, model=model, processor=processor, device="cpu")  # registered on import
    assert isinstance(segment, ZeroShotImageSegmentationPipeline)
    image = photo(40, 30, 11)
    expected = segment(image, candidate_labels=["cat", "sofa"])

    segment.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert json.loads((saved / "config.json").read_text())["custom_pipelines"] == CUSTOM_PIPELINES
    assert (saved / "pipeline_code.py").is_file() and (saved / "processor_config.json").is_file()
    reloaded = ZeroShotImageSegmentationPipeline(
        model=CoDeModel.from_pretrained(saved), processor=CoDeProcessor.from_pretrained(saved), device="cpu"
    )
    assert reloaded(image, candidate_labels=["cat", "sofa"]) == expected


# ------------------------------------------------------------------------------------ through transformers
PIPELINE_SCRIPT = """
import json, sys, torch
from PIL import Image
from transformers import pipeline
if sys.argv[2] == "installed":
    import modeling_code  # the package imported first: its registered classes must not clash with the folder's
segment = pipeline("zero-shot-image-segmentation", model=sys.argv[1], trust_remote_code=True, device="cpu",
                   dtype=getattr(torch, sys.argv[3]))
images = [Image.new("RGB", (90, 70), (40, 160, 60)), Image.open("photo.jpg"), Image.new("RGB", (33, 51), (9, 9, 9))]
results = segment(images, candidate_labels="cat, sofa, grass", background=True, background_threshold=0.2)
print(json.dumps({
    "modules": [type(segment).__module__, type(segment.model).__module__, type(segment.processor).__module__],
    "package_loaded": "modeling_code" in sys.modules,
    "dtype": str(segment.model.dtype),
    "results": [[[e["label"], e["mask"].size, e["mask"].mode, sorted(set(e["mask"].getdata()))] for e in r]
                for r in results],
}))
"""


@pytest.fixture(scope="module")
def dry_run_dir(tiny_model_dir, tmp_path_factory):
    staged = tmp_path_factory.mktemp("published") / "staged"
    publish(tiny_model_dir, "me/code-tiny", dry_run_dir=staged)
    return staged


@pytest.mark.slow
@pytest.mark.parametrize("package", ["installed", "import-blocked"])
@pytest.mark.parametrize("source", ["save_pretrained", "publish dry run"])
def test_pipeline_loads_through_transformers(package, source, tiny_model_dir, dry_run_dir, segment, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir if source == "save_pretrained" else dry_run_dir, folder)
    prelude = NO_PACKAGE_PRELUDE if package == "import-blocked" else (
        "from PIL import Image\nImage.new('RGB', (90, 70), (40, 160, 60)).save('photo.jpg')\n"
    )
    dtype = "bfloat16" if package == "installed" else "float32"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    completed = subprocess.run(
        [sys.executable, "-c", prelude + PIPELINE_SCRIPT, str(folder), package, dtype],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["modules"][0].startswith("transformers_modules.")  # the folder's own pipeline code
    assert report["package_loaded"] == (package == "installed")
    if package == "import-blocked":
        assert all(module.startswith("transformers_modules.") for module in report["modules"])
    assert report["dtype"] == f"torch.{dtype}"
    sizes = [(90, 70), (90, 70), (33, 51)]
    assert [[entry[1] for entry in entries] for entries in report["results"]] == [
        [list(size)] * len(entries) for size, entries in zip(sizes, report["results"])
    ]
    for entries in report["results"]:
        assert entries and all(entry[2] == "L" and set(entry[3]) <= {0, 255} for entry in entries)
        assert [entry[0] for entry in entries] == [
            label for label in ["cat", "sofa", "grass", "background"] if label in [e[0] for e in entries]
        ]
    if dtype == "float32":  # the labels of the package's pipeline in this process
        in_process = segment([Image.new("RGB", (90, 70), (40, 160, 60)), Image.new("RGB", (33, 51), (9, 9, 9))],
                             candidate_labels="cat, sofa, grass", background=True, background_threshold=0.2)
        assert [[entry[0] for entry in entries] for entries in report["results"][::2]] == [
            [entry["label"] for entry in entries] for entries in in_process
        ]


def test_scores_of_the_post_processing_are_the_winning_class_scores(loaded):
    model, processor = loaded
    outputs = model(**processor(images=[photo(50, 40, 8), photo(30, 60, 9)], text=["cat", "sofa", "grass"]))
    plain = processor.post_process_semantic_segmentation(outputs)
    with_scores = processor.post_process_semantic_segmentation(outputs, return_scores=True)
    for labels, result, maps, size in zip(plain, with_scores, outputs.scores, outputs.original_sizes):
        assert torch.equal(result["segmentation"], labels)
        resized = torch.nn.functional.interpolate(maps[None].float(), size=tuple(size), mode="bilinear",
                                                  align_corners=False)[0]
        torch.testing.assert_close(result["scores"], resized.gather(0, labels[None])[0])


def test_the_benchmark_times_the_three_paths(loaded):
    spec = importlib.util.spec_from_file_location("pipeline_benchmark", REPO_ROOT / "benchmarks" / "pipeline.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    model, processor = loaded
    figures = benchmark.measure(model, processor, photo(50, 40, 10), ["background", "cat", "sofa"], runs=2)
    assert set(figures) == {"pipeline", "segmenter", "segmenter_cached"}
    assert all(0 < seconds < 60 for seconds in figures.values())
