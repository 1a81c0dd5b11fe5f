"""Training-step speed and memory on this CPU: the tiny test config and a random ViT-B/16-sized CoDe.

    python benchmarks/train_step.py [--threads 2] [--steps 5] [--batch-size 2] [--region-checkpointing]

Prints samples/s (median step time over ``--steps`` after a warm-up step), the peak process RSS of a fresh
subprocess doing the same steps, and the parameter count and memory of the frozen part (one CLIP) vs the
trainable part. Random weights cost exactly what trained ones do.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_code import CoDeConfig, CoDeModel
from modeling_code.apps.allocator import retain_freed_memory

SIZES = {
    "vit-b16": {},
    "tiny": {
        "clip_config": {
            "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999,
                            "pad_token_id": 0},
            "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            "projection_dim": 32,
        },
        "text_decoder_num_heads": 4,
        "image_background_size": 32,
    },
}


def token_rows(num_rows: int, lengths: list[int], vocab_size: int, eos: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, 77] ids: SOS, random tokens, EOS, then 0-padding; row i has lengths[i % len] tokens."""
    rows = torch.zeros(num_rows, 77, dtype=torch.long)
    for row in range(num_rows):
        length = lengths[row % len(lengths)]
        rows[row, 0] = eos - 1
        rows[row, 1 : 1 + length] = torch.randint(1, vocab_size - 2, (length,), generator=generator)
        rows[row, 1 + length] = eos
    return rows


def make_batch(config: CoDeConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """A batch shaped like real data: ~15-token captions, 1-2 token nouns, ~8-token templates."""
    generator = torch.Generator().manual_seed(0)
    text = config.clip_config.text_config
    vocab, eos = text.vocab_size, text.eos_token_id
    num_rows = config.num_words * batch_size
    image_size = config.clip_config.vision_config.image_size
    labels = torch.full((batch_size, 77), -1)
    labels[:, 2:4] = 1
    labels[:, 6] = 2
    labels[:, 9] = 0
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "caption_input_ids": token_rows(batch_size, [14, 17], vocab, eos, generator),
        "noun_input_ids": token_rows(num_rows, [1, 2], vocab, eos, generator),
        "kg_template_input_ids": token_rows(num_rows, [7, 9], vocab, eos, generator),
        "text_labels": labels,
    }


def parameter_report(model: CoDeModel) -> dict[str, float]:
    frozen = [p for n, p in model.named_parameters() if n.startswith("clip.")]
    trainable = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
    return {
        "frozen_params_M": sum(p.numel() for p in frozen) / 1e6,
        "frozen_MB": sum(p.numel() * p.element_size() for p in frozen) / 2**20,
        "trainable_params_M": sum(p.numel() for p in trainable) / 1e6,
        "trainable_MB": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
    }


def run_steps(size: str, batch_size: int, steps: int, region_checkpointing: bool = False) -> tuple[list[float], CoDeModel]:
    """Time ``steps`` calls of the trainer's own ``training_step`` (forward, backward, clipping, AdamW, zeroing)
    with the trainer's optimiser (``build_optimizer``)."""
    from accelerate import Accelerator

    from modeling_code.training.optimization import build_optimizer
    from modeling_code.training.trainer import training_step

    retain_freed_memory()  # as training does
    torch.manual_seed(0)
    config = CoDeConfig(**SIZES[size], region_activation_checkpointing=region_checkpointing)
    accelerator = Accelerator(cpu=True)
    model = CoDeModel(config).train()
    model.set_masker_backbone_trainable(True)
    optimizer = build_optimizer(model, model.trainable_parameter_names(), lr=1e-5, device_type="cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batch = make_batch(config, batch_size)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        training_step(accelerator, model, batch, optimizer, scheduler, max_grad_norm=5.0)
        times.append(time.perf_counter() - start)
    return times[1:], accelerator.unwrap_model(model)


def peak_rss_of_this_process_mb() -> float:
    """This process image's peak RSS: Linux's VmHWM (``ru_maxrss`` can carry the peak of the process that
    forked it across exec), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb(size: str, threads: int, batch_size: int, region_checkpointing: bool = False) -> float:
    """Peak RSS of a fresh process that builds the model and runs two training steps."""
    command = [sys.executable, __file__, "--rss-only", size, "--threads", str(threads), "--batch-size", str(batch_size)]
    child = subprocess.run(command + ["--region-checkpointing"] * region_checkpointing,
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_MB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "vit-b16"], choices=sorted(SIZES))
    parser.add_argument("--region-checkpointing", action="store_true",
                        help="CoDeConfig.region_activation_checkpointing: less memory, one more vision forward")
    parser.add_argument("--rss-only", help=argparse.SUPPRESS)  # internal: measure one size in a fresh process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.rss_only:
        run_steps(args.rss_only, args.batch_size, 2, args.region_checkpointing)
        print(json.dumps({"peak_rss_MB": peak_rss_of_this_process_mb()}))
        return

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, K=2, median of {args.steps}"
          f"{', region activation checkpointing' if args.region_checkpointing else ''}")
    for size in args.sizes:
        times, model = run_steps(size, args.batch_size, args.steps, args.region_checkpointing)
        median = statistics.median(times)
        report = parameter_report(model)
        del model
        rss = peak_rss_mb(size, args.threads, args.batch_size, args.region_checkpointing)
        print(
            f"{size:8s} step {median:6.3f} s  ({args.batch_size / median:6.2f} samples/s)  peak RSS {rss:7.0f} MB  "
            f"frozen {report['frozen_params_M']:6.1f} M params ({report['frozen_MB']:6.0f} MB)  "
            f"trainable {report['trainable_params_M']:6.1f} M ({report['trainable_MB']:5.0f} MB)"
        )


if __name__ == "__main__":
    main()
