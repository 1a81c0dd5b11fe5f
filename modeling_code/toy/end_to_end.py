"""The embedded default: CoDe end to end on the toy world, on a CPU, in minutes (``code-seg toy-world``).

Stages: (1) generate the world (a ``datasets`` DatasetDict), (2) pretrain its small CLIP, (3) train CoDe
and the TCL-only ablation (co-decomposition terms off) with the normal trainer, (4) evaluate with the normal
evaluation code on the test split, next to the MaskCLIP baseline (the frozen CLIP's dense features alone:
CoDe's KP branch with weight 1), (5) draw the first test images' label maps side by side
(``comparison.png``: input | ground truth | MaskCLIP | TCL-only | CoDe) and print the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = Path(__file__).with_name("configs") / "toy_world.yaml"

# TCL-only ablation: the two co-decomposition terms (text segmentation and highlighted contrast) off.
TCL_ONLY_OVERRIDES = {"loss_text_segmentation_weight": 0.0, "loss_hcl_weight": 0.0}

COMPARISON_FILE = "comparison.png"
# The comparison figure: its first rows of the test split, each cell at least this many pixels a side.
COMPARISON_ROWS = 5
COMPARISON_CELL_SIZE = 256


@dataclasses.dataclass
class ToyPipelineSettings:
    """Sizes of each stage; ``quick()`` gives a miniature run for tests.

    The run uses torch's threads as they are: the caller sets them (``code-seg toy-world --threads``).
    """

    output_dir: str = "outputs/toy_world"
    seed: int = 0
    num_train: int = 4000
    num_validation: int = 100
    num_test: int = 300
    clip_steps: int = 300
    clip_batch_size: int = 128
    # Share of CLIP texts replaced by a noun prompt ("a photo of the small {noun}."): none in the toy recipe.
    clip_prompt_probability: float = 0.0
    # Share of CLIP texts that are one-noun fragments of their caption, as CoDe's highlighted captions are.
    clip_fragment_probability: float = 0.25
    code_steps: int | None = None  # None: the YAML config's optim.max_steps
    code_batch_size: int | None = None
    progress: bool = True

    @classmethod
    def quick(cls, output_dir: str) -> ToyPipelineSettings:
        return cls(output_dir=output_dir, num_train=48, num_validation=8, num_test=8, clip_steps=3,
                   clip_batch_size=16, code_steps=2, code_batch_size=4, progress=False)


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/5] {title}", flush=True)
    return time.perf_counter()


def _training_config(settings: ToyPipelineSettings, clip_dir: Path, world_dir: Path, output_dir: Path,
                     extra_overrides: dict[str, Any]):
    from ..training.config import load_training_config
    from .world import TOY_CLASSES

    values = yaml.safe_load(CONFIG_FILE.read_text())
    values["model"]["clip"] = str(clip_dir)
    values["model"]["overrides"].update(extra_overrides)
    values["model"]["overrides"]["class_vocabulary"] = list(TOY_CLASSES)  # saved with the model, for the demo
    values["data"]["sources"] = [{"type": "hub", "path": str(world_dir), "split": "train", "image_column": "image",
                                  "caption_column": "caption", "streaming": False}]
    values["data"]["seed"] = settings.seed
    values["seed"] = settings.seed
    values["checkpoint"]["output_dir"] = str(output_dir)
    if settings.code_steps is not None:
        optim = values["optim"]
        optim.update(max_steps=settings.code_steps, warmup_steps=min(optim["warmup_steps"], settings.code_steps - 1),
                     ust_steps=min(optim["ust_steps"], settings.code_steps))
    if settings.code_batch_size is not None:
        values["data"]["batch_size"] = settings.code_batch_size
        values["data"]["num_workers"] = 0
    path = output_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return load_training_config(path)


def run_toy_world(settings: ToyPipelineSettings) -> dict[str, Any]:
    """Run every stage; returns the summary written to ``<output_dir>/summary.json``."""
    import datasets

    from ..predict.segmenter import CoDeSegmenter
    from ..training.trainer import train
    from .clip_pretraining import pretrain_clip, small_clip_config
    from .word_tokenizer import build_clip_tokenizer
    from .world import TOY_CLASSES, ToyWorldConfig, save_toy_world, toy_noun_forms, toy_world_vocabulary

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = _stage(1, "generating the toy world")
    world_dir = out / "world"
    world_config = ToyWorldConfig(seed=settings.seed, num_train=settings.num_train,
                                  num_validation=settings.num_validation, num_test=settings.num_test)
    world = save_toy_world(world_config, world_dir)
    timings["world"] = time.perf_counter() - start
    print(f"    {len(world['train'])} train / {len(world['test'])} test images, classes: {', '.join(TOY_CLASSES)}")

    start = _stage(2, "pretraining the toy world's CLIP")
    clip_dir = out / "clip"
    tokenizer = build_clip_tokenizer(toy_world_vocabulary(), clip_dir)
    clip_config = small_clip_config(tokenizer, image_size=world_config.image_size)
    noun_forms = toy_noun_forms()
    clip = pretrain_clip(world["train"], tokenizer, clip_config, steps=settings.clip_steps,
                         batch_size=settings.clip_batch_size, seed=settings.seed, progress=settings.progress,
                         noun_forms=noun_forms, prompt_probability=settings.clip_prompt_probability,
                         fragment_probability=settings.clip_fragment_probability)
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    del clip
    timings["clip_pretraining"] = time.perf_counter() - start

    start = _stage(3, "training CoDe and the TCL-only ablation")
    runs = {"code": {}, "tcl_only": TCL_ONLY_OVERRIDES}
    model_dirs = {}
    for name, overrides in runs.items():
        print(f"    {name}", flush=True)
        model_dirs[name] = train(_training_config(settings, clip_dir, world_dir, out / f"{name}_model", overrides))
    timings["code_training"] = time.perf_counter() - start

    start = _stage(4, "evaluating on the test split")
    from ..evaluation.runner import evaluate_dataset

    test_set = {"path": str(world_dir), "split": "test", "raw_label_ids": False}
    rows = {
        "MaskCLIP baseline (KP branch only)": ("MaskCLIP", model_dirs["code"], {"kp_weight": 1.0}),
        "TCL-only ablation": ("TCL-only", model_dirs["tcl_only"], {}),
        "CoDe (full)": ("CoDe", model_dirs["code"], {}),
    }
    miou, shown = {}, {}
    for label, (column, model_dir, inference) in rows.items():
        segmenter = CoDeSegmenter.from_pretrained(model_dir)
        result = evaluate_dataset(segmenter.model, segmenter.processor, test_set, class_names=list(TOY_CLASSES),
                                  progress=settings.progress, num_visualize=COMPARISON_ROWS, **inference)
        miou[label] = 100 * result.miou
        shown[f"{column}: {100 * result.miou:.1f} mIoU"] = result.overlays
    timings["evaluation"] = time.perf_counter() - start

    _stage(5, "drawing the comparison figure")
    test = datasets.load_from_disk(str(world_dir))["test"]
    captions = test.select(range(min(COMPARISON_ROWS, len(test))))["caption"]
    comparison = write_comparison(shown, captions, out / COMPARISON_FILE)
    print(f"    {comparison}")

    table = "| model | test mIoU |\n|---|---|\n" + "\n".join(f"| {k} | {v:.1f} |" for k, v in miou.items())
    print("\n" + table + "\n")
    summary = {"miou": miou, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "model": str(model_dirs["code"]), "figures": {"comparison": str(comparison)},
               "settings": dataclasses.asdict(settings)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table + "\n")
    return summary


def write_comparison(shown: dict[str, list], captions: list[str], path: Path) -> Path:
    """Draw the samples the evaluations kept (column title -> ``OverlayRow`` list: the first images of the test
    split, the same for every model) as a ``comparison_grid``, each row titled with its caption; returns ``path``."""
    from ..predict.visualization import comparison_grid
    from .world import TOY_CLASSES

    first = next(iter(shown.values()))
    for column, samples in shown.items():
        if [sample.name for sample in samples] != [sample.name for sample in first]:
            raise ValueError(f"{column!r} kept other samples than {next(iter(shown))!r}")
    figure = comparison_grid(
        [sample.image for sample in first],
        [sample.label for sample in first],
        {column: [sample.prediction for sample in samples] for column, samples in shown.items()},
        list(TOY_CLASSES),
        row_titles=[f"test image {index}: {captions[index]}" for index in range(len(first))],
        min_cell_size=COMPARISON_CELL_SIZE,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, optimize=True)
    return path
