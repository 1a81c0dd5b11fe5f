"""Model cards of published CoDe models, rendered with ``huggingface_hub.ModelCard`` from a template.

The template (``model_card_template.md``, shipped in the package) is filled from the model's ``CoDeConfig``,
the training configuration saved beside it (``training_config.yaml``, when present) and an evaluation
``results.json`` (``evaluation.evaluator.write_results_json``), whose benchmarks become the card's ``model-index``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_code import CoDeConfig
from ..evaluation.evaluator import MODEL_INDEX_TASK
from ..training.config import load_training_config

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
TRAINING_CONFIG_FILE = "training_config.yaml"
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = (
    "code-seg",
    "open-vocabulary-segmentation",
    "semantic-segmentation",
    "text-supervised",
    "zero-shot",
    "clip",
)
MODEL_INDEX_METRIC = {"type": "mean_iou", "name": "mIoU"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repository id (``owner/name``) rather than a local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def load_results(path: str | Path) -> dict[str, Any]:
    """Read an evaluation ``results.json``, checking the fields the card uses.

    Raises:
        ValueError: the file is not JSON or lacks ``benchmarks`` entries with name, type, split and mIoU.
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    benchmarks = results.get("benchmarks") if isinstance(results, dict) else None
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise ValueError(f"{path} has no 'benchmarks' mapping; expected the results.json of code-seg's evaluation")
    required = ("display_name", "dataset_type", "split", "mIoU")
    for key, entry in benchmarks.items():
        missing = [field for field in required if field not in entry]
        if missing:
            raise ValueError(f"{path}: benchmark {key!r} lacks {missing}")
    return results


def eval_results(results: Mapping[str, Any]) -> list[EvalResult]:
    """One ``EvalResult`` (mIoU in %, 2 decimals) per benchmark of a ``results.json`` with a finite mIoU."""
    entries = []
    for benchmark in results["benchmarks"].values():
        miou = benchmark["mIoU"]
        if miou is None or not math.isfinite(miou):
            continue
        entries.append(
            EvalResult(
                task_type=MODEL_INDEX_TASK["type"],
                task_name=MODEL_INDEX_TASK["name"],
                dataset_type=benchmark["dataset_type"],
                dataset_name=benchmark["display_name"],
                dataset_split=benchmark["split"],
                metric_type=MODEL_INDEX_METRIC["type"],
                metric_name=MODEL_INDEX_METRIC["name"],
                metric_value=round(float(miou), 2),
            )
        )
    return entries


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _result_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": f"{entry['display_name']} (`{key}`)",
            "split": entry["split"],
            "num_images": entry.get("num_images", "n/a"),
            "miou": _percent(entry["mIoU"]),
            "macc": _percent(entry.get("mAcc")),
            "aacc": _percent(entry.get("aAcc")),
            "paper": "-" if entry.get("paper_mIoU") is None else f"{entry['paper_mIoU']:.1f}",
        }
        for key, entry in results["benchmarks"].items()
    ]


def _scalar_settings(results: Mapping[str, Any]) -> dict[str, Any]:
    settings = results.get("settings") or {}
    return {key: value for key, value in settings.items() if isinstance(value, (str, int, float, bool))}


def _training_summary(training_config: Mapping[str, Any]) -> dict[str, Any]:
    """The template's view of a training configuration (a ``TrainingConfig`` dict, defaults filled in)."""
    data, optim = training_config["data"], training_config["optim"]
    return {
        "sources": [{"path": s["path"], "type": s["type"], "weight": s.get("weight", 1.0)} for s in data["sources"]],
        "batch_size": data["batch_size"],
        "mixed_precision": training_config["mixed_precision"],
        **{key: optim[key] for key in ("max_steps", "lr", "min_lr", "reference_batch_size", "warmup_steps",
                                       "ust_steps", "weight_decay", "max_grad_norm")},
    }


def render_model_card(
    config: CoDeConfig,
    repo_id: str,
    results: Mapping[str, Any] | None = None,
    training_config: Mapping[str, Any] | None = None,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """Render the card of a model published as ``repo_id``.

    Args:
        config: the model's configuration (architecture and inference protocol).
        repo_id: the Hub repository (``owner/name``); its name is the ``model-index`` name.
        results: a ``results.json`` (``load_results``): the evaluation table and ``model-index``.
        training_config: a ``TrainingConfig.to_dict()``: the recipe; its CLIP and Hub data sources become
            ``base_model`` and ``datasets`` when they are Hub ids.
        license: the licence identifier of the weights.
    """
    training = _training_summary(training_config) if training_config is not None else None
    base_model = training_config["model"]["clip"] if training_config is not None else None
    base_model = base_model if is_hub_id(base_model) else None
    datasets = [s["path"] for s in (training or {}).get("sources", []) if s["type"] == "hub" and is_hub_id(s["path"])]
    model_name = repo_id.rstrip("/").split("/")[-1]
    evaluations = eval_results(results) if results is not None else []
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=list(CARD_TAGS),
        base_model=base_model,
        datasets=datasets or None,
        metrics=[MODEL_INDEX_METRIC["type"]],
        eval_results=evaluations or None,
        # The model-index needs a name; without results it would only clutter the metadata.
        model_name=model_name if evaluations else None,
    )
    vision, text = config.clip_config.vision_config, config.clip_config.text_config
    rows = _result_rows(results) if results is not None else []
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        license=license,
        base_model=base_model,
        vision_width=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        patch_size=vision.patch_size,
        text_width=text.hidden_size,
        decoder_blocks=config.decoder_num_blocks,
        prompt_context_length=config.prompt_context_length,
        inference_short_side=config.inference_short_side,
        inference_max_long_side=config.inference_max_long_side,
        window_size=config.window_size,
        window_stride=config.window_stride,
        use_pamr=config.use_pamr,
        pamr_iterations=config.pamr_iterations,
        kp_weight=config.kp_weight,
        inference_template_set=config.inference_template_set,
        kg_template_set=config.kg_template_set,
        background_threshold=config.background_threshold,
        results=rows,
        any_paper=any(row["paper"] != "-" for row in rows),
        evaluation_settings=_scalar_settings(results) if results is not None else {},
        training=training,
    )


def model_card_for_directory(
    model_dir: str | Path,
    repo_id: str,
    results_json: str | Path | None = None,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of a saved model folder: its ``config.json``, its ``training_config.yaml`` if present
    (as the trainer writes it), and ``results_json`` if given."""
    model_dir = Path(model_dir)
    config = CoDeConfig.from_pretrained(model_dir)
    training_path = model_dir / TRAINING_CONFIG_FILE
    training_config = load_training_config(training_path).to_dict() if training_path.is_file() else None
    results = load_results(results_json) if results_json is not None else None
    return render_model_card(config, repo_id, results, training_config, license)


def example_model_card(training_config_path: str | Path, repo_id: str = "your-username/code-vit-b16-cc3m-cc12m") -> ModelCard:
    """The card of a model trained with the paper's recipe (default ``CoDeConfig``), without results:
    the repository's ``model_card.md``."""
    return render_model_card(CoDeConfig(), repo_id, training_config=load_training_config(training_config_path).to_dict())


__all__ = [
    "TEMPLATE_PATH",
    "eval_results",
    "example_model_card",
    "is_hub_id",
    "load_results",
    "model_card_for_directory",
    "render_model_card",
]
