"""The CoDe training loop on Accelerate (docs/method.md#losses): one process on a CPU to DDP/FSDP/multi-node, unchanged.

``training/train.py`` is a thin command line over ``train``. The loop: streamed image-caption data (skips
counted), AdamW with warmup + cosine, the two phases (masker block copy frozen for ``ust_steps``), gradient
clipping and accumulation, rotated ``checkpoint-STEP`` states that resume exactly (model, optimiser,
scheduler, RNG, step and data position), trackers, periodic evaluation keeping the best model, and a final
``save_pretrained`` of model and processor. What happens to the saved model next (``--push_to_hub``) is the
caller's: ``train`` hands its folder to ``on_final_model``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from ..modeling_code import CoDeModel
from ..processing_code import CoDeProcessor
from .config import TrainingConfig, save_training_config
from .data_sources import STREAM_PROGRESS_KEY, TrainingStream, make_dataloader
from .optimization import build_optimizer, scaled_learning_rates, warmup_cosine_schedule

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


# ------------------------------------------------------------------------------------------------ building
def build_model_and_processor(config: TrainingConfig) -> tuple[CoDeModel, CoDeProcessor]:
    """A fresh CoDe on ``model.clip`` (or a saved code-seg model) and its processor."""
    from transformers import CLIPTokenizer

    from ..image_processing_code import CoDeImageProcessor

    section = config.model
    if section.init_from:
        model = CoDeModel.from_pretrained(section.init_from)
        processor = CoDeProcessor.from_pretrained(section.init_from)
        return model, processor
    tokenizer = CLIPTokenizer.from_pretrained(section.clip)
    model = CoDeModel.from_clip(section.clip, tokenizer=tokenizer, **section.overrides)
    processor = CoDeProcessor(
        image_processor=CoDeImageProcessor(**section.processor_overrides),
        tokenizer=tokenizer,
        num_words=model.config.num_words,
        context_length=model.config.context_length,
        kg_template_set=model.config.kg_template_set,
        inference_template_set=model.config.inference_template_set,
    )
    return model, processor


def build_stream(config: TrainingConfig, processor: CoDeProcessor, sources: list[dict], rank: int, world: int,
                 epochs: int | None = None) -> TrainingStream:
    return TrainingStream(
        sources,
        transform=processor.prepare_training_sample,
        seed=config.data.seed,
        rank=rank,
        world_size=world,
        shuffle_buffer_size=config.data.shuffle_buffer,
        epochs=epochs,
    )


# ------------------------------------------------------------------------------------------------ checkpoints
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-STEP`` directories holding a finished save, oldest first."""
    directory = Path(output_dir)
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` -> the newest finished checkpoint (None if there is none); a path -> that path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a finished code-seg checkpoint (no {TRAINER_STATE_FILE})")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Save the full training state; the trainer-state file is written last, marking the save finished."""
    directory = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(directory))
    stream_states = gather_object([state.pop("stream")])
    if accelerator.is_main_process:
        payload = {**state, "step": step, "streams": stream_states}
        (directory / TRAINER_STATE_FILE).write_text(json.dumps(payload, indent=2))
        for old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


# ------------------------------------------------------------------------------------------------ loop pieces
def training_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> tuple[dict[str, float], float | None]:
    """One micro-batch under gradient accumulation: forward, backward, clip and step when gradients sync.

    Returns (every loss term as a float, the gradient norm before clipping or None between syncs).
    """
    grad_norm = None
    with accelerator.accumulate(model):
        output = model(**batch, return_loss=True)
        accelerator.backward(output.loss)
        if accelerator.sync_gradients:
            parameters = [p for p in model.parameters() if p.requires_grad]
            grad_norm = float(accelerator.clip_grad_norm_(parameters, max_grad_norm))
        optimizer.step()  # the prepared optimiser only steps when gradients sync
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    terms = {name: float(value.detach()) for name, value in output.items() if name.startswith("loss")}
    return terms, grad_norm


@torch.no_grad()
def validation_loss(model: CoDeModel, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean total loss over held-out batches (fixed RNG so repeated evaluations compare)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values = [float(model(**batch, return_loss=True).loss) for batch in batches]
    return sum(values) / max(len(values), 1)


class Evaluator:
    """Periodic evaluation: segmentation mIoU when a segmentation set is configured, else validation loss.

    ``__call__(model) -> (metric name, value, higher_is_better)``.
    """

    def __init__(self, config: TrainingConfig, processor: CoDeProcessor, accelerator: Accelerator):
        self.config = config
        self.processor = processor
        self.accelerator = accelerator
        self._validation_batches: list[dict[str, torch.Tensor]] | None = None

    @property
    def enabled(self) -> bool:
        section = self.config.eval
        return section.every > 0 and bool(section.dataset or self.config.data.validation_sources)

    def __call__(self, model: CoDeModel) -> tuple[str, float, bool]:
        if self.config.eval.dataset:
            return "miou", self._segmentation_miou(model), True
        return "validation_loss", validation_loss(model, self._held_out_batches(model.device)), False

    def _held_out_batches(self, device: torch.device) -> list[dict[str, torch.Tensor]]:
        if self._validation_batches is None:
            stream = build_stream(self.config, self.processor, self.config.data.validation_sources,
                                  self.accelerator.process_index, self.accelerator.num_processes, epochs=1)
            loader = make_dataloader(stream, self.config.data.batch_size, 0, self.processor.collate_training)
            batches = []
            for batch in loader:
                batch.pop(STREAM_PROGRESS_KEY)
                batches.append({k: v.to(device) for k, v in batch.items()})
                if len(batches) == self.config.eval.validation_batches:
                    break
            self._validation_batches = batches
        return self._validation_batches

    def _segmentation_miou(self, model: CoDeModel) -> float:
        from ..evaluation.runner import evaluate_dataset

        section = self.config.eval
        result = evaluate_dataset(
            model,
            self.processor,
            dataset=section.dataset,
            benchmark=section.benchmark,
            class_names=section.class_names,
            background=section.background,
            limit=section.limit,
            accelerator=self.accelerator,
            progress=False,
            **section.overrides,
        )
        return float(result.miou)


def record_class_vocabulary(model: CoDeModel, config: TrainingConfig) -> None:
    """Save with the model the classes its evaluation uses (``eval.benchmark`` or ``eval.class_names``), unless its
    config names them already (``model.overrides.class_vocabulary``): applications offer them first."""
    from ..evaluation.runner import evaluation_spec

    section = config.eval
    if model.config.class_vocabulary is None and (section.benchmark or section.class_names):
        model.config.class_vocabulary = list(evaluation_spec(section.benchmark, section.class_names,
                                                             section.background).class_names)


# ------------------------------------------------------------------------------------------------ train
def train(
    config: TrainingConfig,
    resume_from_checkpoint: str | None = None,
    on_final_model: Callable[[Path], Any] | None = None,
) -> Path:
    """Run training as configured; returns the directory holding the final ``save_pretrained`` model.

    Args:
        config: the training config.
        resume_from_checkpoint: ``"latest"`` or a ``checkpoint-STEP`` directory to resume from.
        on_final_model: called on the main process with that directory once the final model is saved, before
            the processes part (``training/train.py`` publishes it there for ``hub.push_to_hub``).
    """
    if config.hub.push_to_hub and on_final_model is None:
        logger.warning("hub.push_to_hub is set but train() publishes nothing itself: training/train.py pushes "
                       "the final model (or pass on_final_model)")
    output_dir = Path(config.checkpoint.output_dir)
    optim = config.optim
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        log_with=config.logging.tracker,
        project_dir=str(output_dir),
        # phase 1 freezes the block copy, whose query/key projections are never used (self-only attention)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(config.seed)
    model, processor = build_model_and_processor(config)
    record_class_vocabulary(model, config)
    model.set_masker_backbone_trainable(True)  # every trainable parameter registered with DDP and AdamW

    global_batch = config.data.batch_size * accelerator.num_processes * optim.gradient_accumulation_steps
    lr, min_lr = scaled_learning_rates(optim.lr, optim.min_lr, global_batch, optim.reference_batch_size)
    optimizer = build_optimizer(model, model.trainable_parameter_names(), lr, optim.weight_decay, optim.betas,
                                optim.eps, device_type=accelerator.device.type)
    scheduler = warmup_cosine_schedule(optimizer, optim.warmup_steps, optim.max_steps, lr, min_lr)
    # the scheduler stays unprepared (stepped once per optimiser step by training_step) but is checkpointed
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    core = accelerator.unwrap_model(model)

    stream = build_stream(config, processor, config.data.sources, accelerator.process_index,
                          accelerator.num_processes)
    step, best = 0, None
    checkpoint = resolve_checkpoint(output_dir, resume_from_checkpoint)
    if checkpoint is not None:
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        step, best = state["step"], state.get("best")
        stream.load_state_dict(state["streams"])  # before the loader's workers copy the stream
    # On CUDA the batches come in page-locked memory, so the host queues their copy to the GPU without waiting.
    copies_to_cuda = accelerator.device.type == "cuda"
    loader = make_dataloader(stream, config.data.batch_size, config.data.num_workers, processor.collate_training,
                             pin_memory=copies_to_cuda)
    batches = iter(loader)  # draws the loader's seed from the global RNG, so do it before restoring the RNG
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_training_config(config, output_dir / "training_config.yaml")
    if config.logging.tracker:
        accelerator.init_trackers(config.logging.project_name, config=_flat(config.to_dict()))
    evaluator = Evaluator(config, processor, accelerator)

    progress = tqdm(total=optim.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    window_start, window_samples = time.perf_counter(), 0
    micro_steps = 0
    while step < optim.max_steps:
        core.set_masker_backbone_trainable(step >= optim.ust_steps)
        batch = next(batches)
        stream.record_progress(batch.pop(STREAM_PROGRESS_KEY))
        batch = {k: v.to(accelerator.device, non_blocking=copies_to_cuda) for k, v in batch.items()}
        model.train()
        terms, grad_norm = training_step(accelerator, model, batch, optimizer, scheduler, optim.max_grad_norm)
        window_samples += batch["pixel_values"].shape[0] * accelerator.num_processes
        micro_steps += 1
        if grad_norm is None:
            continue
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{terms['loss']:.3f}")
        if step % config.logging.log_every == 0 or step == optim.max_steps:
            elapsed = time.perf_counter() - window_start
            skipped = stream.skipped
            logs = {f"train/{k}": v for k, v in terms.items()}
            logs.update({
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm,
                "train/samples_per_second": window_samples / max(elapsed, 1e-9),
                "data/skipped_image": skipped["image"],
                "data/skipped_caption": skipped["caption"],
                "train/phase": 2 if step > optim.ust_steps else 1,
            })
            accelerator.log(logs, step=step)
            window_start, window_samples = time.perf_counter(), 0
        if evaluator.enabled and (step % config.eval.every == 0 or step == optim.max_steps):
            name, value, higher_is_better = evaluator(core)
            accelerator.log({f"eval/{name}": value}, step=step)
            improved = best is None or (value > best["value"] if higher_is_better else value < best["value"])
            if improved:
                best = {"metric": name, "value": value, "step": step}
                if accelerator.is_main_process:
                    _save_pretrained(core, processor, output_dir / "best", extra={"best": best})
        if step % config.checkpoint.save_every == 0 and step < optim.max_steps:
            save_checkpoint(accelerator, output_dir, step,
                            {"best": best, "skipped": stream.skipped, "stream": stream.state_dict()},
                            config.checkpoint.keep_last)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_pretrained(core, processor, output_dir,
                         extra={"best": best, "skipped": stream.skipped, "steps": step})
        if on_final_model is not None:
            on_final_model(output_dir)
    # The DDP wrapper holds the process group: released first, the group dies here rather than at interpreter exit,
    # where gloo aborts a rank now and then ("terminate called without an active exception").
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    return output_dir


def _save_pretrained(model: CoDeModel, processor: CoDeProcessor, directory: Path, extra: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "training_summary.json").write_text(json.dumps(extra, indent=2))


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config values for trackers (which take scalars and strings only)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value if value is not None else "none"
        else:
            flat[name] = json.dumps(value)
    return flat

