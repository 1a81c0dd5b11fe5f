"""Evaluate a code-seg model on the standard open-vocabulary benchmarks (same as ``code-seg evaluate``).

    python training/evaluate.py --model DIR_OR_ID --benchmark voc --data_root data
    accelerate launch --num_processes 4 training/evaluate.py --model DIR_OR_ID --benchmark all --data_root data
"""

from __future__ import annotations

import argparse

from modeling_code.apps.allocator import retain_freed_memory
from modeling_code.apps.flags import ArgumentParser
from modeling_code.evaluation.arguments import add_evaluate_arguments
from modeling_code.evaluation.runner import run_evaluate


def main(argv: list[str] | None = None) -> None:
    retain_freed_memory("auto")  # the device accelerate picks
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_evaluate(add_evaluate_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
