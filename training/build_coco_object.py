"""Build COCO-Object label maps (80 COCO things + background) in the mmsegmentation layout.

From COCO instance annotations:
    python training/build_coco_object.py --instances coco/annotations/instances_val2017.json \
        --images_dir coco/val2017 --output_root data/coco_stuff164k
From COCO-Stuff 164k raw maps (GroupViT's exact conversion):
    python training/build_coco_object.py --stuffthingmaps data/coco_stuff164k/annotations/val2017 \
        --output_root data/coco_stuff164k
"""

from __future__ import annotations

import argparse

from modeling_code.apps.flags import ArgumentParser
from modeling_code.evaluation.coco_object import build_from_instances, build_from_stuffthingmaps, link_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--instances", help="COCO instances json, e.g. instances_val2017.json")
    origin.add_argument("--stuffthingmaps", help="folder of raw COCO-Stuff 164k stuffthingmaps PNGs")
    parser.add_argument(
        "--output_root", required=True, help="coco_object data root, e.g. data/coco_stuff164k"
    )
    parser.add_argument("--images_dir", help="COCO val2017 images, linked as <output_root>/images/val2017")
    parser.add_argument("--limit", type=int, help="only the first N images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.images_dir:
        link_images(args.images_dir, args.output_root)
    if args.instances:
        count = build_from_instances(args.instances, args.output_root, limit=args.limit)
    else:
        count = build_from_stuffthingmaps(args.stuffthingmaps, args.output_root, limit=args.limit)
    print(f"wrote {count} COCO-Object label maps under {args.output_root}")


if __name__ == "__main__":
    main()
