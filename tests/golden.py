"""Golden numerics: what the fixed tiny model of ``tests/data/model_v0_1`` computes, for refactors to keep.

``compute_golden`` runs every numeric path a refactor could disturb on fixed inputs: the masker's window masks,
the KP masks, the vocabulary embeddings, whole-image score and label maps, and one training forward/backward
(every weighted loss term and every trainable parameter's gradient), once without Gumbel noise and once with
seeded noise. ``tests/data/golden.safetensors`` holds its inputs and outputs as computed by the code of 0.1.0;
``tests/test_golden.py`` compares today's code against it.

Regenerate only for an intended change of results, in a commit of its own that says why:
``python tests/golden.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

DATA = Path(__file__).resolve().parent / "data"
MODEL_DIR = DATA / "model_v0_1"
GOLDEN_FILE = DATA / "golden.safetensors"
VOCABULARY = ["cat", "sofa", "background", "sky"]
TRAINING_CAPTIONS = ["a red cat on the sofa", "two dogs in the grass", "a man with a blue car"]
TRAINING_NOUNS = [["cat", "dog", "man"], ["sofa", "grass", "car"]]  # K = 2 rows per caption, noun-major


def make_inputs(processor) -> dict[str, torch.Tensor]:
    """The fixed inputs: windows, two images of different sizes (as uint8 pixels) and a training batch."""
    generator = torch.Generator().manual_seed(2024)
    inputs = {
        "windows": torch.randn(2, 3, 32, 48, generator=generator),
        "image_0": torch.randint(0, 256, (72, 90, 3), generator=generator, dtype=torch.uint8),
        "image_1": torch.randint(0, 256, (50, 64, 3), generator=generator, dtype=torch.uint8),
        "train_pixel_values": torch.randn(3, 3, 32, 32, generator=generator),
        "caption_input_ids": processor.tokenize(TRAINING_CAPTIONS),
        "noun_input_ids": processor.tokenize([noun for row in TRAINING_NOUNS for noun in row]),
        "template_input_ids": processor.tokenize(
            [f"a photo of a {noun}." for row in TRAINING_NOUNS for noun in row]
        ),
    }
    labels = torch.full_like(inputs["caption_input_ids"], -1)
    labels[:, 1:6] = 0
    labels[0, 3], labels[0, 6] = 1, 2
    labels[1, 2], labels[1, 5] = 1, 2
    labels[2, 4], labels[2, 7] = 2, 1
    inputs["text_labels"] = labels
    return inputs


def load_golden_model():
    from modeling_code import CoDeModel, CoDeProcessor

    return CoDeModel.from_pretrained(MODEL_DIR), CoDeProcessor.from_pretrained(MODEL_DIR)


def _inference_outputs(model, processor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from modeling_code.inference import encode_vocabulary

    model.eval()
    vocabulary = encode_vocabulary(model, processor, VOCABULARY, with_kp_embeddings=True)
    window = model.segment_window(inputs["windows"], vocabulary.class_embeddings, vocabulary.kp_class_embeddings)
    images = [Image.fromarray(inputs[f"image_{index}"].numpy()) for index in range(2)]
    processed = processor(images=images, return_tensors="pt")
    segmentation = model(**processed, **vocabulary.model_inputs())
    label_maps = processor.post_process_semantic_segmentation(segmentation)
    outputs = {
        "class_embeddings": vocabulary.class_embeddings,
        "kp_class_embeddings": vocabulary.kp_class_embeddings,
        "window_masks": window.masks,
        "window_kp_masks": window.kp_masks,
    }
    for index in range(2):
        outputs[f"scores_{index}"] = segmentation.scores[index]
        outputs[f"labels_{index}"] = label_maps[index]
    return outputs


def _training_outputs(model, inputs: dict[str, torch.Tensor], noise: bool) -> dict[str, torch.Tensor]:
    model.config.gumbel_noise = noise
    model.train()
    model.set_masker_backbone_trainable(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    batch = {key: inputs[key] for key in ("caption_input_ids", "noun_input_ids", "text_labels")}
    output = model(
        pixel_values=inputs["train_pixel_values"],
        kg_template_input_ids=inputs["template_input_ids"],
        return_loss=True,
        **batch,
    )
    output.loss.backward()
    prefix = "noise" if noise else "plain"
    outputs = {f"{prefix}.{name}": value.detach() for name, value in output.items() if name.startswith("loss")}
    outputs[f"{prefix}.positive_masks"] = output.positive_masks
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            outputs[f"{prefix}.grad.{name}"] = parameter.grad.detach().clone()
    return outputs


def compute_golden(inputs: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """(inputs, outputs) of today's code on the golden model; ``inputs`` default to ``make_inputs``."""
    model, processor = load_golden_model()
    inputs = make_inputs(processor) if inputs is None else inputs
    with torch.no_grad():
        outputs = _inference_outputs(model, processor, inputs)
    for noise in (False, True):
        outputs.update(_training_outputs(model, inputs, noise))
    return inputs, outputs


def load_golden() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    stored = load_file(GOLDEN_FILE)
    inputs = {key[len("input.") :]: value for key, value in stored.items() if key.startswith("input.")}
    outputs = {key[len("output.") :]: value for key, value in stored.items() if key.startswith("output.")}
    return inputs, outputs


def write_golden() -> None:
    inputs, outputs = compute_golden()
    tensors = {f"input.{key}": value.contiguous() for key, value in inputs.items()}
    tensors.update({f"output.{key}": value.contiguous() for key, value in outputs.items()})
    save_file(tensors, GOLDEN_FILE)
    print(f"wrote {len(tensors)} tensors to {GOLDEN_FILE}")


if __name__ == "__main__":
    np.random.seed(0)
    write_golden()
