"""Convert the authors' released CoDe checkpoint into a code-seg model directory (docs/method.md#the-authors-checkpoint).

    python training/convert_original_checkpoint.py --checkpoint checkpoint.pth \
        --clip openai/clip-vit-base-patch16 --output_dir code-vit-b16 [--push_to_hub --hub_model_id USER/NAME]

The CLIP architecture and tokenizer come from ``--clip``; every weight, the frozen CLIP's included, comes from
the checkpoint. The output directory (safetensors weights, config, processor) loads with
``AutoModel.from_pretrained`` / ``CoDeProcessor.from_pretrained``. The mapping itself lives in
``modeling_code.apps.conversion``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformers import CLIPConfig, CLIPTokenizer

from modeling_code.apps.conversion import load_original_checkpoint, model_from_original
from modeling_code.apps.flags import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the original checkpoint (.pth)")
    parser.add_argument("--clip", default="openai/clip-vit-base-patch16",
                        help="transformers CLIP (Hub id or directory) giving the architecture and tokenizer")
    parser.add_argument("--output_dir", dest="out", required=True,
                        help="directory to write the converted model and processor to")
    parser.add_alias("--out", "--output_dir")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="load a checkpoint that pickles non-tensor objects with full unpickling "
                             "(runs code from the file: trusted files only)")
    parser.add_argument("--text_decoder_num_heads", type=int, default=8,
                        help="attention heads of the text decoder (not recorded in the checkpoint)")
    parser.add_argument("--copy_tolerance", type=float, default=0.0,
                        help="largest difference between the checkpoint's CLIP copies accepted without a warning")
    parser.add_argument("--push_to_hub", action="store_true", help="also upload the result to the Hub")
    parser.add_argument("--hub_model_id", help="Hub repository for --push_to_hub (USER/NAME)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    return args


def build_processor(tokenizer: CLIPTokenizer, config):
    """The processor saved next to the model, with the model's text settings."""
    from modeling_code.image_processing_code import CoDeImageProcessor
    from modeling_code.processing_code import CoDeProcessor

    return CoDeProcessor(
        image_processor=CoDeImageProcessor(),
        tokenizer=tokenizer,
        num_words=config.num_words,
        context_length=config.context_length,
        kg_template_set=config.kg_template_set,
        inference_template_set=config.inference_template_set,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        original = load_original_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
        tokenizer = CLIPTokenizer.from_pretrained(args.clip)
        model = model_from_original(
            original,
            CLIPConfig.from_pretrained(args.clip),
            tokenizer,
            copy_tolerance=args.copy_tolerance,
            text_decoder_num_heads=args.text_decoder_num_heads,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    processor = build_processor(tokenizer, model.config)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"Converted {len(original)} original tensors into {len(model.state_dict())} CoDe tensors: {args.out}")
    if args.push_to_hub:
        model.push_to_hub(args.hub_model_id)
        processor.push_to_hub(args.hub_model_id)
        print(f"Uploaded to https://huggingface.co/{args.hub_model_id}")


if __name__ == "__main__":
    main()
