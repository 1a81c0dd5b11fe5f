"""The runner with a deterministic fake predictor, its outputs, the overlay helpers and two-process evaluation."""

from __future__ import annotations

import json
import runpy
import textwrap

import datasets
import numpy as np
import pytest
import yaml
from helpers import grid_cell, launch_two_processes
from PIL import Image

from modeling_code.evaluation.evaluator import (
    BenchmarkResult,
    evaluate_benchmark,
    markdown_table,
    model_index_entries,
    save_overlay_grid,
    write_outputs,
)
from modeling_code.evaluation.metrics import ConfusionMatrix
from modeling_code.evaluation.segmentation_datasets import HFDatasetSource
from modeling_code.evaluation.specs import get_benchmark, map_labels
from modeling_code.predict.visualization import (
    IGNORE_COLOR,
    colorize,
    comparison_grid,
    draw_legend,
    overlay,
    palette,
    title_band_height,
    upscale,
)


def colour_coded_dataset(num_images: int = 5, seed: int = 0) -> datasets.Dataset:
    """VOC-style raw labels; the image's red channel is 10 x the label, green marks pixels to get wrong."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(num_images):
        height, width = rng.integers(6, 14, size=2)
        label = rng.integers(0, 21, size=(height, width)).astype(np.uint8)
        label[rng.random(label.shape) < 0.1] = 255
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[..., 0] = np.where(label == 255, 0, label * 10)
        pixels[..., 1] = np.where(rng.random(label.shape) < 0.25, 200, 0)
        images.append(Image.fromarray(pixels))
        labels.append(Image.fromarray(label))
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )


PREDICTOR_SOURCE = '''
def fake_predictor(image, class_names):
    """Read the VOC class from the red channel; pixels with a green mark get the next class."""
    pixels = np.asarray(image, dtype=np.int64)
    voc_class = pixels[..., 0] // 10 + (pixels[..., 1] > 100)
    return (voc_class - (class_names[0] != "background")) % len(class_names)
'''
namespace = {"np": np}
exec(PREDICTOR_SOURCE, namespace)
fake_predictor = namespace["fake_predictor"]


def expected_confusion(dataset: datasets.Dataset, key: str) -> ConfusionMatrix:
    spec = get_benchmark(key)
    confusion = ConfusionMatrix(spec.num_classes)
    for row in dataset:
        label = map_labels(np.asarray(row["label"]), spec)
        confusion.update(fake_predictor(row["image"].convert("RGB"), spec.class_names), label)
    return confusion


@pytest.mark.parametrize("key", ["voc", "voc20"])
def test_runner_counts_what_the_predictor_predicts(key):
    dataset = colour_coded_dataset()
    spec = get_benchmark(key)
    seen_vocabularies = []

    def recording_predictor(image, class_names):
        seen_vocabularies.append(class_names)
        return fake_predictor(image, class_names)

    result = evaluate_benchmark(
        recording_predictor, spec, HFDatasetSource(dataset), num_visualize=3, progress=False
    )
    np.testing.assert_array_equal(result.confusion.matrix, expected_confusion(dataset, key).matrix)
    assert result.num_images == 5
    assert seen_vocabularies == [spec.class_names] * 5
    assert (seen_vocabularies[0][0] == "background") == (key == "voc")
    assert [row.name for row in result.overlays] == ["validation/0", "validation/1", "validation/2"]
    assert 0.0 < result.miou < 1.0
    assert result.miou == result.metrics()["mIoU"]
    if key == "voc20":  # background pixels are not counted
        counted = sum(
            int(((np.asarray(row["label"]) != 0) & (np.asarray(row["label"]) != 255)).sum())
            for row in dataset
        )
        assert result.confusion.matrix.sum() == counted


def test_runner_rejects_predictions_of_the_wrong_size():
    source = HFDatasetSource(colour_coded_dataset(1))
    with pytest.raises(ValueError, match=r"voc/validation/0: the predictor returned shape \(1, 1\)"):
        evaluate_benchmark(
            lambda image, names: np.zeros((1, 1), int), get_benchmark("voc"), source, progress=False
        )


def hand_made_result(key: str, matrix: list[list[int]]) -> BenchmarkResult:
    spec = get_benchmark(key)
    full = np.zeros((spec.num_classes, spec.num_classes), dtype=np.int64)
    full[: len(matrix), : len(matrix)] = matrix
    return BenchmarkResult(spec, ConfusionMatrix.from_matrix(full), num_images=2, source="hand-made")


def test_markdown_table_and_model_index():
    # voc: background IoU 3/(3+1+1) = 0.6, aeroplane 4/(4+1+1) = 2/3 -> mIoU 63.33
    voc = hand_made_result("voc", [[3, 1], [1, 4]])
    cityscapes = hand_made_result("cityscapes", [[5]])
    assert markdown_table([voc, cityscapes]).splitlines() == [
        "| Benchmark | Split | Images | mIoU | mAcc | aAcc | Paper mIoU |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| PASCAL VOC 2012 (`voc`) | val | 2 | 63.33 | 77.50 | 77.78 | 57.7 |",
        "| Cityscapes (`cityscapes`) | val | 2 | 100.00 | 100.00 | 100.00 | 28.9 |",
    ]
    assert model_index_entries([voc], "code-vit-b16") == [
        {
            "name": "code-vit-b16",
            "results": [
                {
                    "task": {"type": "image-segmentation", "name": "Zero-shot semantic segmentation"},
                    "dataset": {"name": "PASCAL VOC 2012", "type": "pascal_voc", "split": "val"},
                    "metrics": [{"type": "mean_iou", "value": 63.33, "name": "mIoU"}],
                }
            ],
        }
    ]


def test_write_outputs(tmp_path):
    dataset = colour_coded_dataset()
    results = [
        evaluate_benchmark(
            fake_predictor, get_benchmark(key), HFDatasetSource(dataset), num_visualize=2, progress=False
        )
        for key in ("voc", "voc20")
    ]
    written = write_outputs(
        results, tmp_path, settings={"model": "fake", "pamr": True}, model_name="fake-model"
    )
    assert set(written) == {"results", "markdown", "model_index", "overlays/voc", "overlays/voc20"}

    content = json.loads((tmp_path / "results.json").read_text())
    assert content["settings"] == {"model": "fake", "pamr": True}
    voc = content["benchmarks"]["voc"]
    metrics = results[0].metrics()
    assert voc["mIoU"] == pytest.approx(100 * metrics["mIoU"], abs=1e-4)
    assert voc["num_images"] == 5 and voc["expected_num_images"] == 1449 and voc["num_classes"] == 21
    assert list(voc["per_class"]) == list(get_benchmark("voc").class_names)
    person = voc["per_class"]["person"]
    assert person["label_pixels"] == int(results[0].confusion.label_area[15])
    assert person["IoU"] == pytest.approx(100 * metrics["IoU"][15], abs=1e-4)
    assert voc["counted_pixels"] == int(results[0].confusion.matrix.sum())
    assert content["benchmarks"]["voc20"]["per_class"].keys() == set(get_benchmark("voc20").class_names)

    assert (tmp_path / "results.md").read_text() == markdown_table(results)
    model_index = yaml.safe_load((tmp_path / "model_index.yaml").read_text())
    assert model_index["model-index"] == model_index_entries(results, "fake-model")

    widest = max(round(row.image.width * 192 / row.image.height) for row in results[0].overlays)
    with Image.open(tmp_path / "overlays" / "voc.png") as grid:
        assert grid.mode == "RGB"
        assert grid.width == max(3 * widest + 2 * 4, 160)  # three columns, 4 px apart
        assert grid.height > 18 + 2 * 192  # header, two rows and a legend


def test_absent_classes_are_written_as_null(tmp_path):
    result = hand_made_result("voc", [[3, 1], [1, 4]])
    write_outputs([result], tmp_path, settings={}, model_name="m")
    per_class = json.loads((tmp_path / "results.json").read_text())["benchmarks"]["voc"]["per_class"]
    assert per_class["tvmonitor"] == {
        "IoU": None,
        "Acc": None,
        "label_pixels": 0,
        "predicted_pixels": 0,
        "intersection_pixels": 0,
    }
    assert not (tmp_path / "overlays").exists()  # no kept samples, no grid


def test_palette_is_deterministic_and_distinct():
    colors = palette(171)
    assert colors.shape == (171, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors, palette(171))
    np.testing.assert_array_equal(palette(5), colors[:5])  # a class keeps its colour in any vocabulary
    assert len({tuple(color) for color in colors}) == 171
    first = palette(21).astype(float)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + 1e9 * np.eye(21)
    assert distances.min() > 50  # a benchmark's worth of colours stays far apart
    assert colors.max(axis=1).min() > 150  # never near black (the ignore colour)
    assert colors.min(axis=1).max() < 160  # never near white
    np.testing.assert_array_equal(palette(361)[360], palette(1)[0])  # beyond 360 colours repeat
    with pytest.raises(ValueError, match="non-negative"):
        palette(-1)


def test_colorize_and_overlay():
    colors = palette(3)
    label = np.array([[0, 1], [2, 255]])
    painted = np.asarray(colorize(label, colors))
    np.testing.assert_array_equal(painted[0, 1], colors[1])
    np.testing.assert_array_equal(painted[1, 1], IGNORE_COLOR)
    image = Image.new("RGB", (2, 2), (100, 50, 0))
    np.testing.assert_array_equal(np.asarray(overlay(image, label, colors, alpha=0.0)), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(overlay(image, label, colors, alpha=1.0)), painted)
    with pytest.raises(ValueError, match="differs from the image size"):
        overlay(image, np.zeros((3, 2), int), colors)
    with pytest.raises(ValueError, match="2-D integer"):
        colorize(np.zeros((2, 2)), colors)


def test_draw_legend_adds_a_bar_below():
    colors = palette(4)
    image = Image.new("RGB", (200, 40), (9, 9, 9))
    legend = draw_legend(image, ["sky", "road", "car", "tree"], colors, class_indices=[1, 3])
    assert legend.width == 200 and legend.height > 40
    np.testing.assert_array_equal(np.asarray(legend)[:40], np.asarray(image))
    bar_colors = {tuple(pixel) for pixel in np.asarray(legend)[40:].reshape(-1, 3)}
    assert tuple(colors[1]) in bar_colors and tuple(colors[3]) in bar_colors
    assert tuple(colors[0]) not in bar_colors


def test_draw_legend_font_size_scales_the_bar():
    colors = palette(4)
    image = Image.new("RGB", (400, 40), (9, 9, 9))
    small = draw_legend(image, ["sky", "road", "car", "tree"], colors)
    large = draw_legend(image, ["sky", "road", "car", "tree"], colors, font_size=24)
    assert large.width == 400 and large.height > small.height
    bar = np.asarray(large)[40:]
    for color in colors:  # 24 x 24 swatches: a full row of the swatch's colour, 22 px inside its outline
        assert (bar == color).all(axis=-1).sum(axis=1).max() >= 22


def test_upscale_by_whole_factors():
    image = Image.fromarray(np.arange(200, dtype=np.uint8).reshape(10, 20))
    bigger = upscale(image, 25)
    assert bigger.size == (60, 30)  # factor 3: the short side reaches 25
    np.testing.assert_array_equal(np.asarray(bigger)[::3, ::3], np.asarray(image))
    assert upscale(image, 10) is image


def test_comparison_grid_layout_and_colours():
    class_names, colors = ["sky", "road", "car", "tree"], palette(4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(2)]
    labels = [rng.integers(0, 3, (20, 20)) for _ in range(2)]
    labels[0][0, 0] = 255
    predictions = {"model a": [np.full((20, 20), 1), np.full((20, 20), 2)], "model b": [np.zeros((20, 20), int)] * 2}
    figure = comparison_grid(images, labels, predictions, class_names, row_titles=["first", "second"],
                             min_cell_size=50, font_size=12, spacing=4, margin=5)
    cell, band = 60, title_band_height(12)  # 20 px upscaled 3 times
    grid_height = 5 + band + 2 * (band + cell) + 4 + 5
    assert figure.width == 2 * 5 + 4 * cell + 3 * 4 and figure.height > grid_height  # a legend below
    pixels = np.asarray(figure)

    def cell_of(row, column):
        return grid_cell(pixels, row, column, cell, band, spacing=4, margin=5)

    for row in range(2):
        np.testing.assert_array_equal(cell_of(row, 0), np.asarray(upscale(images[row], 50)))
        expected = np.asarray(colorize(labels[row], colors)).repeat(3, axis=0).repeat(3, axis=1)
        np.testing.assert_array_equal(cell_of(row, 1), expected)
        assert (cell_of(row, 2) == colors[1 + row]).all() and (cell_of(row, 3) == colors[0]).all()
    np.testing.assert_array_equal(cell_of(0, 1)[:3, :3], np.full((3, 3, 3), IGNORE_COLOR))
    top = 5 + 2 * band
    assert (pixels[top:top + cell, 5 + cell:5 + cell + 4] == 255).all()  # white between the cells
    legend = {tuple(pixel) for pixel in pixels[grid_height:].reshape(-1, 3)}
    assert {tuple(color) for color in colors[:3]} <= legend and tuple(colors[3]) not in legend  # no tree
    with pytest.raises(ValueError, match="2 label maps for 3 images"):
        comparison_grid([*images, images[0]], [*labels, labels[0]], predictions, class_names)
    with pytest.raises(ValueError, match="no images"):
        comparison_grid([], [], {}, class_names)


def test_overlay_grid_shape(tmp_path):
    rows = [
        evaluate_benchmark(
            fake_predictor, get_benchmark("voc"), HFDatasetSource(colour_coded_dataset(3)), progress=False
        ).overlays
    ][0]
    path = save_overlay_grid(rows, tmp_path / "grid.png", get_benchmark("voc").class_names, cell_height=32)
    with Image.open(path) as grid:
        assert grid.height > 18 + 3 * 36
    with pytest.raises(ValueError, match="no rows"):
        save_overlay_grid([], tmp_path / "empty.png", ["a"])


TWO_PROCESS_SCRIPT = """
import sys

import numpy as np
from accelerate import Accelerator

from modeling_code.evaluation.specs import get_benchmark
from modeling_code.evaluation.evaluator import evaluate_benchmark, write_outputs
from modeling_code.evaluation.segmentation_datasets import HFDatasetSource
{predictor}

def main(data_dir, out_dir, use_accelerator):
    accelerator = Accelerator(cpu=True) if use_accelerator else None
    results = [
        evaluate_benchmark(
            fake_predictor, get_benchmark(key), HFDatasetSource(data_dir), accelerator=accelerator,
            num_visualize=2, progress=False,
        )
        for key in ("voc", "voc20")
    ]
    if accelerator is None or accelerator.is_main_process:
        processes = 1 if accelerator is None else accelerator.num_processes
        write_outputs(results, out_dir, settings={{"num_processes": processes}}, model_name="fake")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no rank tears the group down while the other still uses it
        accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], use_accelerator=True)
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data_dir = tmp_path / "data"
    colour_coded_dataset(num_images=5).save_to_disk(data_dir)
    script = tmp_path / "evaluate_fake.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(predictor=textwrap.dedent(PREDICTOR_SOURCE)))

    runpy.run_path(str(script))["main"](str(data_dir), str(tmp_path / "single"), use_accelerator=False)

    completed = launch_two_processes([str(script), str(data_dir), str(tmp_path / "multi")])
    assert completed.returncode == 0, completed.stderr[-3000:]

    single = json.loads((tmp_path / "single" / "results.json").read_text())
    multi = json.loads((tmp_path / "multi" / "results.json").read_text())
    assert (single["settings"], multi["settings"]) == ({"num_processes": 1}, {"num_processes": 2})
    assert multi["benchmarks"] == single["benchmarks"]
    assert multi["benchmarks"]["voc"]["num_images"] == 5
    # The main process evaluates the first shard, so it keeps the same first images for the overlays.
    for key in ("voc", "voc20"):
        single_grid = (tmp_path / "single" / "overlays" / f"{key}.png").read_bytes()
        assert (tmp_path / "multi" / "overlays" / f"{key}.png").read_bytes() == single_grid
