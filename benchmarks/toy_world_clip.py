"""How good is a small CLIP pretrained on the toy world? Time, zero-shot accuracy, MaskCLIP mIoU.

Generates the toy world (or loads one), pretrains a small CLIP with the default settings of
``training/pretrain_clip.py`` (or loads a saved one with ``--clip``) and measures on the test split:
- zero-shot accuracy at naming the dominant thing (largest visible area) among the thing classes,
  with the prompt "a photo of a {class}." (and with the 9-template ensemble);
- the same for the background (stuff) class;
- the MaskCLIP dense mIoU over all classes: frozen vision tower, last block with self-only
  attention, post-LN + projection per patch, cosine with the class prompts, bilinear upsampling,
  argmax; the confusion matrix is accumulated over the test set.

    python benchmarks/toy_world_clip.py [--world DIR] [--clip DIR] [--steps N] ...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from modeling_code.toy.clip_pretraining import (
    PROMPT_TEMPLATES,
    images_to_tensor,
    normalize_images,
    pretrain_clip,
    small_clip_config,
    tokenize_texts,
)
from modeling_code.toy.end_to_end import ToyPipelineSettings
from modeling_code.toy.word_tokenizer import build_clip_tokenizer
from modeling_code.toy.world import (
    TOY_CLASSES,
    TOY_STUFF,
    TOY_THINGS,
    ToyWorldConfig,
    build_toy_world,
    toy_noun_forms,
)


@torch.no_grad()
def class_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, classes, templates) -> torch.Tensor:
    """L2-normalised text embeddings [num_classes, C], averaged over templates."""
    embeddings = []
    for name in classes:
        ids = tokenize_texts(tokenizer, [t.format(name) for t in templates])
        features = model.get_text_features(input_ids=ids)
        features = getattr(features, "pooler_output", features)
        features = F.normalize(features, dim=-1).mean(dim=0)
        embeddings.append(F.normalize(features, dim=-1))
    return torch.stack(embeddings)


@torch.no_grad()
def image_embeddings(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    features = model.get_image_features(pixel_values=pixel_values)
    return F.normalize(getattr(features, "pooler_output", features), dim=-1)


@torch.no_grad()
def maskclip_features(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Dense CLIP features [B, C, h, w]: the last block with self-only attention, post-LN, projection."""
    vision = model.vision_model
    hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
    block = vision.encoder.layers[-1]
    hidden = hidden + block.self_attn.out_proj(block.self_attn.v_proj(block.layer_norm1(hidden)))
    hidden = hidden + block.mlp(block.layer_norm2(hidden))
    dense = model.visual_projection(vision.post_layernorm(hidden[:, 1:]))
    side = int(dense.shape[1] ** 0.5)
    return F.normalize(dense, dim=-1).transpose(1, 2).reshape(dense.shape[0], -1, side, side)


def mean_iou(confusion: np.ndarray) -> float:
    """mIoU from a confusion matrix [gt, pred]; classes absent from both are left out."""
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    valid = union > 0
    return float((true_positive[valid] / union[valid]).mean())


def evaluate(model: CLIPModel, tokenizer: CLIPTokenizer, test, batch_size: int = 100) -> dict:
    model.eval()
    image_size = model.config.vision_config.image_size
    single = ["a photo of a {}."]
    things = [TOY_CLASSES.index(c) for c in TOY_THINGS]
    stuff = [TOY_CLASSES.index(c) for c in TOY_STUFF]
    text_single = class_embeddings(model, tokenizer, TOY_CLASSES, single)
    text_ensemble = class_embeddings(model, tokenizer, TOY_CLASSES, PROMPT_TEMPLATES)
    counts = {"thing": 0, "thing_ensemble": 0, "stuff": 0, "n": 0}
    confusion = {"single": np.zeros((len(TOY_CLASSES),) * 2, np.int64)}
    confusion["ensemble"] = confusion["single"].copy()
    for start in range(0, len(test), batch_size):
        rows = test[start : start + batch_size]
        pixels = normalize_images(images_to_tensor(rows["image"], image_size))
        masks = np.stack([np.asarray(label) for label in rows["label"]]).astype(np.int64)
        global_features = image_embeddings(model, pixels)
        dense = maskclip_features(model, pixels)
        for name, text in (("single", text_single), ("ensemble", text_ensemble)):
            logits = torch.einsum("bchw,kc->bkhw", dense, text)
            logits = F.interpolate(logits, size=masks.shape[1:], mode="bilinear", align_corners=False)
            prediction = logits.argmax(1).numpy()
            confusion[name] += np.bincount(
                masks.ravel() * len(TOY_CLASSES) + prediction.ravel(), minlength=len(TOY_CLASSES) ** 2
            ).reshape(len(TOY_CLASSES), len(TOY_CLASSES))
        for row, mask in enumerate(masks):
            areas = np.bincount(mask.ravel(), minlength=len(TOY_CLASSES))
            dominant_thing = things[int(np.argmax(areas[things]))]
            background = stuff[int(np.argmax(areas[stuff]))]
            counts["n"] += 1
            if areas[dominant_thing] > 0:
                counts["thing"] += things[int((global_features[row] @ text_single[things].T).argmax())] == dominant_thing
                counts["thing_ensemble"] += (
                    things[int((global_features[row] @ text_ensemble[things].T).argmax())] == dominant_thing
                )
            counts["stuff"] += stuff[int((global_features[row] @ text_single[stuff].T).argmax())] == background
    return {
        "zero_shot_thing_accuracy": counts["thing"] / counts["n"],
        "zero_shot_thing_accuracy_ensemble": counts["thing_ensemble"] / counts["n"],
        "zero_shot_stuff_accuracy": counts["stuff"] / counts["n"],
        "maskclip_miou": mean_iou(confusion["single"]),
        "maskclip_miou_ensemble": mean_iou(confusion["ensemble"]),
        "maskclip_iou_per_class": {
            c: round(float(confusion["single"][i, i] / max(1, confusion["single"][i].sum()
                                                           + confusion["single"][:, i].sum()
                                                           - confusion["single"][i, i])), 3)
            for i, c in enumerate(TOY_CLASSES)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", help="a saved toy world (load_from_disk); generated if omitted")
    parser.add_argument("--clip", help="a saved CLIP directory to evaluate instead of pretraining one")
    parser.add_argument("--steps", type=int, default=ToyPipelineSettings.clip_steps)
    parser.add_argument("--batch_size", type=int, default=ToyPipelineSettings.clip_batch_size)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompt_probability", type=float, default=ToyPipelineSettings.clip_prompt_probability)
    parser.add_argument("--fragment_probability", type=float, default=ToyPipelineSettings.clip_fragment_probability)
    parser.add_argument("--min_crop_scale", type=float, default=1.0)
    parser.add_argument("--logit_scale_init", type=float, default=None)
    parser.add_argument("--vision_hidden_size", type=int, default=128)
    parser.add_argument("--vision_layers", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--text_hidden_size", type=int, default=128)
    parser.add_argument("--text_layers", type=int, default=3)
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--image_size", type=int, default=112)
    parser.add_argument("--max_objects", type=int, default=ToyWorldConfig.max_objects)
    parser.add_argument("--min_object_radius", type=float, default=ToyWorldConfig.min_object_radius)
    parser.add_argument("--max_object_radius", type=float, default=ToyWorldConfig.max_object_radius)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", help="save the pretrained CLIP and its tokenizer here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.world:
        world = datasets.load_from_disk(args.world)
    else:
        world = build_toy_world(ToyWorldConfig(
            num_train=args.num_train, image_size=args.image_size, max_objects=args.max_objects,
            min_object_radius=args.min_object_radius, max_object_radius=args.max_object_radius,
        ))
    print(f"world: {len(world['train'])} train / {len(world['test'])} test samples "
          f"({time.perf_counter() - start:.1f} s)")

    if args.clip:
        model = CLIPModel.from_pretrained(args.clip)
        tokenizer = CLIPTokenizer.from_pretrained(args.clip)
    else:
        from modeling_code.toy.world import toy_world_vocabulary

        tokenizer = build_clip_tokenizer(toy_world_vocabulary(), tempfile.mkdtemp(prefix="toy_tokenizer_"))
        config = small_clip_config(
            tokenizer, image_size=args.image_size, patch_size=args.patch_size,
            vision_hidden_size=args.vision_hidden_size, vision_layers=args.vision_layers,
            text_hidden_size=args.text_hidden_size, text_layers=args.text_layers,
        )
        if args.logit_scale_init is not None:
            config.logit_scale_init_value = args.logit_scale_init
        noun_forms = toy_noun_forms()
        start, cpu_start = time.perf_counter(), time.process_time()
        model = pretrain_clip(
            world["train"], tokenizer, config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, noun_forms=noun_forms, prompt_probability=args.prompt_probability,
            fragment_probability=args.fragment_probability,
            min_crop_scale=args.min_crop_scale,
        )
        print(f"pretraining time: {time.perf_counter() - start:.1f} s wall, "
              f"{time.process_time() - cpu_start:.1f} s CPU ({args.steps} steps x {args.batch_size})")
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    start = time.perf_counter()
    results = evaluate(model, tokenizer, world["test"])
    print(f"evaluation time: {time.perf_counter() - start:.1f} s")
    chance_things, chance_stuff = 1 / len(TOY_THINGS), 1 / len(TOY_STUFF)
    print(f"zero-shot dominant-thing accuracy ('a photo of a {{}}.'): {results['zero_shot_thing_accuracy']:.3f} "
          f"(chance {chance_things:.3f}); 9-template ensemble: {results['zero_shot_thing_accuracy_ensemble']:.3f}")
    print(f"zero-shot background accuracy: {results['zero_shot_stuff_accuracy']:.3f} (chance {chance_stuff:.3f})")
    print(f"MaskCLIP mIoU ('a photo of a {{}}.'): {100 * results['maskclip_miou']:.1f}; "
          f"9-template ensemble: {100 * results['maskclip_miou_ensemble']:.1f}")
    print("MaskCLIP IoU per class:", results["maskclip_iou_per_class"])


if __name__ == "__main__":
    main()
