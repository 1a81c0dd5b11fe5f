"""The arguments of ``code-seg evaluate`` and ``training/evaluate.py``: declared without importing torch, so that
``--help`` and argument errors answer at once (``runner`` runs them)."""

from __future__ import annotations

import argparse


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="saved code-seg model: a local directory or a Hub id")
    parser.add_argument("--benchmark", default="all",
                        help="voc|context|coco_object|coco_stuff|cityscapes|ade20k|voc20|context59|all, or a "
                             "comma-separated list")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data_root", help="mmsegmentation data folder (VOCdevkit, ADEChallengeData2016, ...)")
    data.add_argument("--dataset", help="a datasets Hub id or local dataset directory with image/label columns")
    parser.add_argument("--split", default="validation", help="split of --dataset")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--labels_are_mapped", action="store_true",
                        help="--dataset labels are already class indices (skip the benchmark's raw-id mapping)")
    parser.add_argument("--class_names", help="classes for a custom --dataset (no --benchmark), separated by commas or line breaks")
    parser.add_argument("--background", action="store_true", help="with --class_names: label 0 is background")
    parser.add_argument("--output_dir", default="outputs/evaluation")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images of each benchmark")
    parser.add_argument("--num_visualize", type=int, default=8, help="images in the overlay grid")
    parser.add_argument("--no_pamr", dest="use_pamr", action="store_false", default=None)
    parser.add_argument("--pamr_iterations", type=int)
    parser.add_argument("--kp_weight", type=float)
    parser.add_argument("--bg_thresh", dest="background_threshold", type=float)
    parser.add_argument("--window_size", type=int)
    parser.add_argument("--window_stride", type=int)
    parser.add_argument("--short_side", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch_size", type=int,
                        help="images per model call (default: 1 on the CPU, 16 on a GPU, whose windows share passes)")
    parser.add_argument("--num_workers", type=int,
                        help="processes decoding images ahead of the model (default: none on the CPU, 4 on a GPU)")
    return parser


__all__ = ["add_evaluate_arguments"]
