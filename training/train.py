"""Train CoDe: ``accelerate launch training/train.py --config training/configs/<name>.yaml [key.sub=value ...]``.

Any config key can be overridden after the config file, e.g. ``optim.max_steps=1000 data.batch_size=8``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modeling_code.apps.allocator import retain_freed_memory
from modeling_code.apps.flags import ArgumentParser
from modeling_code.training.config import load_training_config
from modeling_code.training.trainer import train


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML training config (defaults: the paper's hyper-parameters)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value")
    parser.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-STEP directory")
    parser.add_argument("--output_dir", help="shorthand for checkpoint.output_dir=...")
    parser.add_argument("--push_to_hub", action="store_true", help="push the final model with its card")
    parser.add_argument("--hub_model_id", help="Hub repository id for --push_to_hub")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"checkpoint.output_dir={args.output_dir}")
    if args.push_to_hub:
        overrides.append("hub.push_to_hub=true")
    if args.hub_model_id:
        overrides.append(f"hub.hub_model_id={args.hub_model_id}")
    config = load_training_config(args.config, overrides)
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retain_freed_memory("auto")  # the device accelerate picks
    train(config, resume_from_checkpoint=args.resume_from_checkpoint,
          on_final_model=hub_publisher(config) if config.hub.push_to_hub else None)


def hub_publisher(config):
    """Publishes a saved model folder (model, processor, remote code, card) to ``config.hub.hub_model_id``."""

    def push(output_dir: Path) -> None:
        from modeling_code.apps.publishing import publish

        result = publish(output_dir, config.hub.hub_model_id, private=config.hub.private)
        logging.getLogger(__name__).info("pushed %s to %s", output_dir, result.commit_url)

    return push


if __name__ == "__main__":
    main()
