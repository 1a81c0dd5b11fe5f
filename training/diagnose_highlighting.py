"""Word masks, what the frozen CLIP matches highlighted captions with, and how selective the masker's class masks
are, for a model trained on the toy world.

    python training/diagnose_highlighting.py --model outputs/toy_world/code_model \
        --world outputs/toy_world/world --num_samples 64

Prints the figures behind the README's explanation of full CoDe vs the TCL-only ablation in the toy world.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from modeling_code.apps.flags import ArgumentParser


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained CoDe model directory")
    parser.add_argument("--world", required=True, help="the toy world the model was trained on (a saved DatasetDict)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seeds the nouns sampled per caption")
    args = parser.parse_args(argv)

    import datasets

    from modeling_code import CoDeModel, CoDeProcessor
    from modeling_code.toy.diagnostics import diagnose_highlighting, measure_mask_selectivity
    from modeling_code.toy.world import TOY_CLASSES, TOY_THINGS, toy_noun_forms

    split = datasets.load_from_disk(args.world)[args.split]
    samples = split.select(range(min(args.num_samples, len(split))))
    model, processor = CoDeModel.from_pretrained(args.model), CoDeProcessor.from_pretrained(args.model)
    diagnosis = diagnose_highlighting(model, processor, samples, TOY_CLASSES, toy_noun_forms(), TOY_THINGS, seed=args.seed)
    selectivity = measure_mask_selectivity(model, processor, samples, TOY_CLASSES, TOY_THINGS)
    print(json.dumps({**asdict(diagnosis), "mask_selectivity": asdict(selectivity)}, indent=2))


if __name__ == "__main__":
    main()
