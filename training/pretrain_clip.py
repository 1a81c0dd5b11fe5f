"""Pretrain the toy world's small CLIP: the frozen CLIP that CoDe is then trained on.

    python training/pretrain_clip.py --output_dir outputs/toy_clip                     # generates the world
    python training/pretrain_clip.py --world outputs/toy_world --output_dir outputs/toy_clip

The directory written by ``--output_dir`` holds the ``CLIPModel`` (safetensors) and its tokenizer, built
from the toy world's vocabulary, loadable with ``CLIPModel.from_pretrained`` /
``CLIPTokenizer.from_pretrained``. The defaults take a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch

from modeling_code.apps.flags import ArgumentParser
from modeling_code.toy.clip_pretraining import pretrain_clip, small_clip_config
from modeling_code.toy.end_to_end import ToyPipelineSettings
from modeling_code.toy.word_tokenizer import build_clip_tokenizer
from modeling_code.toy.world import (
    ToyWorldConfig,
    build_toy_world,
    toy_noun_forms,
    toy_world_vocabulary,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", dest="out", required=True, help="directory for the CLIPModel and tokenizer")
    parser.add_alias("--out", "--output_dir")
    parser.add_argument("--world", help="a toy world saved with save_toy_world; generated when omitted")
    parser.add_argument("--save_world", help="also save the generated world here (load_from_disk format)")
    parser.add_argument("--num_train", type=int, default=ToyWorldConfig.num_train, help="generated world only")
    parser.add_argument("--image_size", type=int, default=ToyWorldConfig.image_size, help="generated world only")
    parser.add_argument("--world_seed", type=int, default=0, help="generated world only")
    parser.add_argument("--steps", type=int, default=ToyPipelineSettings.clip_steps)
    parser.add_argument("--batch_size", type=int, default=ToyPipelineSettings.clip_batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--prompt_probability", type=float, default=ToyPipelineSettings.clip_prompt_probability,
                        help="chance of replacing a caption by a prompt naming one of its nouns")
    parser.add_argument("--fragment_probability", type=float, default=ToyPipelineSettings.clip_fragment_probability,
                        help="chance of replacing a caption by a fragment keeping only one of its nouns")
    parser.add_argument("--min_crop_scale", type=float, default=1.0,
                        help="smallest area of the random crops (1.0: flips only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--vision_hidden_size", type=int, default=128)
    parser.add_argument("--vision_layers", type=int, default=4)
    parser.add_argument("--text_hidden_size", type=int, default=128)
    parser.add_argument("--text_layers", type=int, default=3)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--projection_dim", type=int, default=128)
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the pretraining; returns the output directory."""
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    if args.world:
        train = datasets.load_from_disk(args.world)["train"]
    else:
        world_config = ToyWorldConfig(
            seed=args.world_seed, image_size=args.image_size, num_train=args.num_train,
            num_validation=0 if not args.save_world else ToyWorldConfig.num_validation,
            num_test=0 if not args.save_world else ToyWorldConfig.num_test,
        )
        world = build_toy_world(world_config)
        if args.save_world:
            world.save_to_disk(args.save_world)
        train = world["train"]
    image_size = train[0]["image"].size[0]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(toy_world_vocabulary(), out)
    config = small_clip_config(
        tokenizer, image_size=image_size, patch_size=args.patch_size,
        vision_hidden_size=args.vision_hidden_size, vision_layers=args.vision_layers,
        text_hidden_size=args.text_hidden_size, text_layers=args.text_layers,
        num_attention_heads=args.num_attention_heads, projection_dim=args.projection_dim,
    )
    noun_forms = toy_noun_forms()
    losses: list[float] = []
    start = time.perf_counter()
    model = pretrain_clip(
        train, tokenizer, config, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        progress=not args.no_progress, weight_decay=args.weight_decay, noun_forms=noun_forms,
        prompt_probability=args.prompt_probability, fragment_probability=args.fragment_probability,
        min_crop_scale=args.min_crop_scale, loss_history=losses,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seconds": round(seconds, 1),
               "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:])}
    (out / "pretraining_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"saved to {out}: {args.steps} steps in {seconds:.0f} s, loss {losses[0]:.3f} -> {summary['final_loss']:.3f}")
    return out


if __name__ == "__main__":
    main()
