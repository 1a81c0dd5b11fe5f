"""Publish a saved CoDe model to the Hub, with its remote code, processor and rendered model card.

    python training/publish.py MODEL_DIR USER/NAME [--results results.json] [--private] [--revision BRANCH]
    python training/publish.py MODEL_DIR USER/NAME --dry_run staged/   # writes exactly what would be uploaded
    python training/publish.py --example_card model_card.md           # regenerates the repository's example card

``training/train.py --push_to_hub`` calls the same ``modeling_code.apps.publishing.publish``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_code.apps.flags import ArgumentParser
from modeling_code.apps.model_card import DEFAULT_LICENSE, example_model_card
from modeling_code.apps.publishing import publish

PAPER_CONFIG = Path(__file__).resolve().parent / "configs" / "paper_cc3m_cc12m.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", type=Path, help="saved model + processor folder")
    parser.add_argument("repo_id", nargs="?", help="Hub model repository, USER/NAME")
    parser.add_argument("--results", type=Path, help="evaluation results.json for the card and its model-index")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--dry_run", type=Path, metavar="DIR", help="stage the upload in DIR instead of uploading")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"licence of the weights (default {DEFAULT_LICENSE})")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--example_card", type=Path, metavar="PATH",
                        help="only write the example card of the paper's recipe to PATH (model_card.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.example_card is not None:
        example_model_card(PAPER_CONFIG).save(args.example_card)
        print(f"wrote {args.example_card}")
        return 0
    if args.model_dir is None or args.repo_id is None:
        parser.error("MODEL_DIR and REPO_ID are required (unless --example_card)")
    try:
        result = publish(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            dry_run_dir=args.dry_run,
            results_json=args.results,
            license=args.license,
            token=args.token,
        )
    except (ValueError, OSError) as error:
        print(f"publish: error: {error}", file=sys.stderr)
        return 2
    if result.package_code:
        print("the folder predates the zero-shot-image-segmentation pipeline (no entry in its config.json): "
              "staged this package's remote code and the pipeline's entry")
    if result.folder is not None:
        print(f"dry run: staged {len(result.files)} files in {result.folder}:")
    else:
        print(f"uploaded {len(result.files)} files to {args.repo_id}: {result.commit_url}")
    for name in result.files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
