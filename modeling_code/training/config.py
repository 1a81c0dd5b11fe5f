"""Training configuration as data: nested dataclasses read from YAML, any key overridable as ``a.b=value``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSection:
    clip: str = "openai/clip-vit-base-patch16"  # any transformers CLIP (Hub id or directory)
    init_from: str | None = None  # a saved code-seg model to start from instead of a bare CLIP
    overrides: dict[str, Any] = field(default_factory=dict)  # CoDeConfig fields
    processor_overrides: dict[str, Any] = field(default_factory=dict)  # CoDeImageProcessor fields


@dataclass
class DataSection:
    sources: list[dict[str, Any]] = field(default_factory=list)  # DataSourceConfig dicts
    validation_sources: list[dict[str, Any]] = field(default_factory=list)  # held-out image-caption pairs
    batch_size: int = 16  # per process
    num_workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 3.2e-4  # base LR at global batch `reference_batch_size`
    min_lr: float = 4e-5
    reference_batch_size: int = 4096  # LRs scale linearly with global batch / this
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_steps: int = 15000
    max_steps: int = 50000
    ust_steps: int = 30000  # phase 1: the masker's CLIP block copy stays frozen for these steps
    max_grad_norm: float = 5.0
    gradient_accumulation_steps: int = 1


@dataclass
class CheckpointSection:
    output_dir: str = "outputs/code-seg"
    save_every: int = 5000
    keep_last: int = 3


@dataclass
class LoggingSection:
    log_every: int = 50
    tracker: str | None = "tensorboard"  # any accelerate tracker name, or null
    project_name: str = "code-seg"


@dataclass
class EvalSection:
    every: int = 5000  # 0 disables periodic evaluation
    benchmark: str | None = None  # a benchmark key, evaluated on `dataset` (a segmentation source)
    dataset: dict[str, Any] | None = None  # {"path": ..., "split": ..., "image_column": ..., "label_column": ...}
    class_names: list[str] | None = None  # a custom class list for `dataset` instead of a benchmark's
    background: bool = False
    limit: int | None = None  # images per evaluation (None: all)
    validation_batches: int = 4  # held-out validation-loss batches when no segmentation set is given
    overrides: dict[str, Any] = field(default_factory=dict)  # inference settings (use_pamr, window_size, ...)


@dataclass
class HubSection:
    push_to_hub: bool = False
    hub_model_id: str | None = None
    private: bool = False


@dataclass
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    hub: HubSection = field(default_factory=HubSection)
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a (nested) dataclass from a dict, rejecting unknown keys with their dotted path."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise KeyError(f"unknown training config key(s) {[f'{where}{k}' for k in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = tuple(value) if isinstance(fields[name].default, tuple) else value
    return cls(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` overrides (values parsed as YAML) into a nested dict, in place; returns it."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key.sub=value")
        dotted, raw = override.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {key!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return values


def load_training_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a YAML training config (or start from the defaults) and apply command-line overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
    apply_overrides(values, overrides or [])
    return _build(TrainingConfig, values, "")


def save_training_config(config: TrainingConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
