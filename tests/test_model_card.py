"""Model cards: rendered with huggingface_hub, parsed back, model-index equal to the evaluation's own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

from modeling_code import CoDeConfig
from modeling_code.apps.model_card import (
    example_model_card,
    is_hub_id,
    load_results,
    model_card_for_directory,
    render_model_card,
)
from modeling_code.evaluation.evaluator import BenchmarkResult, write_outputs
from modeling_code.evaluation.metrics import ConfusionMatrix
from modeling_code.evaluation.specs import get_benchmark
from modeling_code.training.config import load_training_config, save_training_config

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO_ROOT / "training" / "configs" / "paper_cc3m_cc12m.yaml"


def benchmark_result(key: str, seed: int) -> BenchmarkResult:
    """A benchmark result from a random prediction of a random label map."""
    spec = get_benchmark(key)
    rng = np.random.default_rng(seed)
    label = rng.integers(0, spec.num_classes, (24, 24))
    prediction = np.where(rng.random((24, 24)) < 0.6, label, rng.integers(0, spec.num_classes, (24, 24)))
    confusion = ConfusionMatrix(spec.num_classes)
    confusion.update(prediction, label)
    return BenchmarkResult(spec, confusion, num_images=1, source="synthetic")


@pytest.fixture
def evaluation_outputs(tmp_path):
    """(results.json path, the model-index the evaluation wrote for model name 'code-tiny')."""
    results = [benchmark_result("voc", 0), benchmark_result("cityscapes", 1)]
    written = write_outputs(results, tmp_path / "eval", {"model": "me/code-tiny", "use_pamr": True}, "code-tiny")
    model_index = yaml.safe_load(written["model_index"].read_text())["model-index"]
    return written["results"], model_index


def test_card_model_index_matches_the_results_file(evaluation_outputs, tmp_path):
    results_path, evaluation_model_index = evaluation_outputs
    results = load_results(results_path)
    card = render_model_card(CoDeConfig(), "me/code-tiny", results)
    card.save(tmp_path / "README.md")

    parsed = ModelCard.load(tmp_path / "README.md")
    metadata = parsed.data.to_dict()
    assert metadata["model-index"] == evaluation_model_index
    assert (metadata["license"], metadata["library_name"], metadata["pipeline_tag"]) == (
        "apache-2.0", "transformers", "image-segmentation")
    assert metadata["metrics"] == ["mean_iou"] and "open-vocabulary-segmentation" in metadata["tags"]
    by_dataset = {result.dataset_name: result for result in parsed.data.eval_results}
    for benchmark in results["benchmarks"].values():
        result = by_dataset[benchmark["display_name"]]
        assert (result.dataset_type, result.dataset_split) == (benchmark["dataset_type"], benchmark["split"])
        assert result.metric_value == round(benchmark["mIoU"], 2)
        assert f"| {benchmark['mIoU']:.2f} | {benchmark['mAcc']:.2f} | {benchmark['aAcc']:.2f} |" in parsed.text
    assert "| PASCAL VOC 2012 (`voc`) | val | 1 |" in parsed.text and "57.7 |" in parsed.text
    assert "`use_pamr=True`" in parsed.text


def test_benchmarks_without_a_finite_miou_stay_out_of_the_model_index(evaluation_outputs, tmp_path):
    results = load_results(evaluation_outputs[0])
    results["benchmarks"]["cityscapes"]["mIoU"] = None
    card = render_model_card(CoDeConfig(), "me/code-tiny", results)
    names = [entry.dataset_name for entry in ModelCard(str(card)).data.eval_results]
    assert names == ["PASCAL VOC 2012"]
    assert "| Cityscapes (`cityscapes`) | val | 1 | n/a |" in card.text


def test_card_without_results_or_training_config():
    card = ModelCard(str(render_model_card(CoDeConfig(), "me/bare")))
    metadata = card.data.to_dict()
    assert "model-index" not in metadata and "base_model" not in metadata and "datasets" not in metadata
    assert "No evaluation results are attached" in card.text
    assert "training configuration was not recorded" in card.text
    assert 'AutoModel.from_pretrained("me/bare", trust_remote_code=True)' in card.text
    assert "@inproceedings{" in card.text and "## Limitations" in card.text


def test_card_of_a_model_folder_reads_config_and_training_recipe(tmp_path):
    config = CoDeConfig(background_threshold=0.55, window_size=320, use_pamr=False)
    config.save_pretrained(tmp_path)
    training = load_training_config(PAPER_CONFIG, ["optim.max_steps=1234", f"model.clip={tmp_path}"])
    save_training_config(training, tmp_path / "training_config.yaml")
    card = model_card_for_directory(tmp_path, "me/code-folder")
    metadata = card.data.to_dict()
    assert "base_model" not in metadata  # a local CLIP folder is no Hub id
    assert metadata["datasets"] == ["pixparse/cc3m-wds", "pixparse/cc12m-wds"]
    assert "1234 steps" in card.text and "`pixparse/cc3m-wds` (hub, weight 3.3)" in card.text
    assert "sliding windows of 320" in card.text and "constant score of\n  0.55" in card.text
    assert "PAMR" not in card.text.split("## Usage")[0]


def test_results_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(path)
    path.write_text(json.dumps({"settings": {}}))
    with pytest.raises(ValueError, match="no 'benchmarks' mapping"):
        load_results(path)
    path.write_text(json.dumps({"benchmarks": {"voc": {"display_name": "VOC", "split": "val", "mIoU": 1.0}}}))
    with pytest.raises(ValueError, match=r"benchmark 'voc' lacks \['dataset_type'\]"):
        load_results(path)


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert is_hub_id("openai/clip-vit-base-patch16")
    assert not is_hub_id("outputs/toy_world/clip") and not is_hub_id(str(tmp_path)) and not is_hub_id(None)
    (tmp_path / "local").mkdir()
    assert not is_hub_id(str(tmp_path / "local"))


def test_repository_model_card_is_the_rendered_example(tmp_path):
    """model_card.md is regenerated with `python training/publish.py --example-card model_card.md`."""
    example_model_card(PAPER_CONFIG).save(tmp_path / "model_card.md")
    assert (REPO_ROOT / "model_card.md").read_text() == (tmp_path / "model_card.md").read_text()
    metadata = ModelCard.load(REPO_ROOT / "model_card.md").data.to_dict()
    assert metadata["base_model"] == "openai/clip-vit-base-patch16"
    assert metadata["pipeline_tag"] == "image-segmentation"
