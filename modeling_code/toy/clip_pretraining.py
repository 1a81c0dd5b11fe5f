"""Pretrain a small CLIP from scratch on an image-caption dataset (the toy world's frozen CLIP).

CoDe needs a frozen, pretrained CLIP. Where no real checkpoint can be downloaded, this module
trains a small ``transformers.CLIPModel`` with CLIP's symmetric InfoNCE loss in a few CPU minutes.
The conventions match the rest of code-seg: images normalised with ImageNet statistics, texts
tokenised to exactly 77 positions (start token, tokens, end token, then padding with id 0).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ..image_processing_code import IMAGENET_MEAN, IMAGENET_STD
from ..processing_code import bpe_token_ids, clip_token_ids
from ..text_decomposition import pseudo_text_labels

CONTEXT_LENGTH = 77
# Prompts for the optional noun-prompt texts (the 9 "custom" evaluation templates of CoDe).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of a {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of many {}.",
    "a photo of {}s.",
)


def small_clip_config(
    tokenizer: CLIPTokenizer,
    image_size: int = 112,
    patch_size: int = 16,
    vision_hidden_size: int = 128,
    vision_layers: int = 4,
    text_hidden_size: int = 128,
    text_layers: int = 3,
    num_attention_heads: int = 4,
    projection_dim: int = 128,
) -> CLIPConfig:
    """A small ``CLIPConfig`` for ``tokenizer``'s vocabulary (QuickGELU, MLP ratio 4, 77 text positions).

    The special ids come from the tokenizer (start and end tokens are inside its vocabulary);
    ``pad_token_id`` is 0 because texts are padded with 0.
    """
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    for name, width in (("vision_hidden_size", vision_hidden_size), ("text_hidden_size", text_hidden_size)):
        if width % num_attention_heads != 0:
            raise ValueError(f"{name} ({width}) must be divisible by num_attention_heads ({num_attention_heads})")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_hidden_size,
        "intermediate_size": 4 * text_hidden_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_attention_heads,
        "max_position_embeddings": CONTEXT_LENGTH,
        "hidden_act": "quick_gelu",
        "projection_dim": projection_dim,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": 0,
    }
    vision_config = {
        "hidden_size": vision_hidden_size,
        "intermediate_size": 4 * vision_hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": num_attention_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_act": "quick_gelu",
        "projection_dim": projection_dim,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def tokenize_texts(
    tokenizer: CLIPTokenizer, texts: Sequence[str], context_length: int = CONTEXT_LENGTH
) -> torch.Tensor:
    """CLIP token ids [N, context_length]: start, tokens, end, then zeros; overlong texts keep the end token."""
    return clip_token_ids(tokenizer, list(texts), context_length)[0]


def images_to_tensor(images: Sequence, image_size: int) -> torch.Tensor:
    """Stack PIL images (resized to ``image_size`` if needed) into uint8 [N, 3, image_size, image_size]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), resample=2)  # bilinear
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float [N, 3, H, W] normalised with ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment_images(
    images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.8
) -> torch.Tensor:
    """Light augmentation: random resized crop (area in [min_scale, 1], same aspect) and horizontal flip.

    Args:
        images: float [N, 3, H, W] (already normalised).
    Returns:
        float [N, 3, H, W].
    """
    batch = images.shape[0]
    scale = torch.sqrt(torch.empty(batch).uniform_(min_scale, 1.0, generator=generator))
    shift_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - scale)
    shift_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - scale)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def caption_nouns(caption: str, noun_forms: Mapping[str, str]) -> set[str]:
    """The nouns a caption names, found through ``noun_forms`` (word form -> noun, "circles" -> "circle")."""
    return {noun_forms[word] for word in caption.replace(",", " ").replace(".", " ").split() if word in noun_forms}


def pick_noun(nouns: set[str], generator: torch.Generator) -> str:
    """One of ``nouns``, drawn uniformly (in sorted order, so a seed always gives the same noun)."""
    return sorted(nouns)[int(torch.randint(len(nouns), (1,), generator=generator))]


def noun_prompts(
    nouns_per_caption: Sequence[set[str]], generator: torch.Generator
) -> list[tuple[str, str] | None]:
    """For each caption's nouns, ``(prompt, noun)`` with a prompt such as "a photo of the small {noun}."

    None where a caption names no noun.
    """
    prompts: list[tuple[str, str] | None] = []
    for nouns in nouns_per_caption:
        if not nouns:
            prompts.append(None)
            continue
        noun = pick_noun(nouns, generator)
        template = PROMPT_TEMPLATES[int(torch.randint(len(PROMPT_TEMPLATES), (1,), generator=generator))]
        prompts.append((template.format(noun), noun))
    return prompts


def fragment_blank_positions(caption_ids: torch.Tensor, kept_token_ids: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
    """Which positions a one-noun fragment of each caption blanks: every word except the noun's.

    A fragment is what CoDe's word highlighting makes of a caption: the noun's tokens stay where they
    are, the other words' embeddings are replaced (here by zeros, where CoDe's learnable text
    background starts), and start, end and padding are untouched.

    Args:
        caption_ids: [n, L] ids as :func:`tokenize_texts` makes them (start, tokens, end, zeros).
        kept_token_ids: for each caption, the token-id sequences to keep (e.g. every form of one
            noun: "circle", "circles"); every occurrence is kept.
    Returns:
        bool [n, L], True where the word embedding is blanked.
    """
    blank = torch.zeros(caption_ids.shape, dtype=torch.bool)
    for row, (ids, kept) in enumerate(zip(caption_ids.tolist(), kept_token_ids)):
        end = max(position for position, token_id in enumerate(ids) if token_id != 0)
        labels = pseudo_text_labels(ids, [], kept)
        blank[row, 1:end] = torch.tensor([label <= 0 for label in labels[1:end]], dtype=torch.bool)
    return blank


@contextlib.contextmanager
def blanked_word_embeddings(token_embedding: torch.nn.Embedding) -> Iterator[list[torch.Tensor | None]]:
    """While active, word embeddings are zeroed where ``holder[0]`` (bool [B, L], or None: nothing) is True.

    Yields the one-element ``holder`` to set before each forward pass; the hook is removed on exit, also on error.
    """
    holder: list[torch.Tensor | None] = [None]
    hook = token_embedding.register_forward_hook(
        lambda module, inputs, output: output if holder[0] is None else output.masked_fill(holder[0][..., None], 0.0)
    )
    try:
        yield holder
    finally:
        hook.remove()


def positive_pairs(
    captions: Sequence[str], nouns_per_caption: Sequence[set[str]], texts: Sequence[tuple[str, str]]
) -> torch.Tensor:
    """Which image matches which text: bool [B images, B texts], the diagonal always true.

    ``texts[j]`` is ``("caption", caption)`` or ``("noun", noun)``: a caption matches every image
    with the same caption, a noun prompt every image whose caption names that noun. Counting
    these as positives keeps duplicate captions and shared nouns from being pushed apart.
    """
    positives = torch.tensor(
        [
            [caption == value if kind == "caption" else value in nouns for kind, value in texts]
            for caption, nouns in zip(captions, nouns_per_caption)
        ],
        dtype=torch.bool,
    ).view(len(captions), len(texts))  # built as Python lists: element-wise tensor writes cost ~75 ms a batch
    return positives | torch.eye(len(captions), len(texts), dtype=torch.bool)


def multi_positive_clip_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with several positives: cross-entropy against uniform targets over them.

    Args:
        logits_per_image: [B, B] scaled similarities (images x texts).
        positives: bool [B, B]; with only the diagonal true this is exactly CLIP's loss.
    """
    targets = positives.float()
    image_loss = -(targets / targets.sum(1, keepdim=True) * logits_per_image.log_softmax(1)).sum(1).mean()
    text_targets = targets.T
    text_loss = -(text_targets / text_targets.sum(1, keepdim=True) * logits_per_image.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (image_loss + text_loss)


def choose_batch_texts(
    caption_ids: torch.Tensor,
    captions: Sequence[str],
    nouns_per_caption: Sequence[set[str]],
    tokenizer: CLIPTokenizer,
    generator: torch.Generator,
    prompt_probability: float,
    fragment_probability: float,
    form_token_ids: Mapping[str, Sequence[Sequence[int]]],
) -> tuple[torch.Tensor, list[tuple[str, str]], torch.Tensor | None]:
    """The text each pair of a batch is trained with: its caption, a noun prompt or a one-noun fragment.

    Args:
        caption_ids: [B, L] the batch's caption ids; ``captions`` their texts.
        nouns_per_caption: the nouns each caption names.
        form_token_ids: for each noun, the token-id sequences of its forms (what a fragment keeps).
    Returns:
        (input ids [B, L], texts as :func:`positive_pairs` reads them, bool [B, L] positions to blank or None).
    """
    input_ids = caption_ids
    texts = [("caption", caption) for caption in captions]
    if prompt_probability > 0:
        prompts = noun_prompts(nouns_per_caption, generator)
        use = torch.rand(len(caption_ids), generator=generator) < prompt_probability
        rows = [row for row in range(len(caption_ids)) if use[row] and prompts[row] is not None]
        if rows:
            input_ids = input_ids.clone()
            input_ids[rows] = tokenize_texts(tokenizer, [prompts[row][0] for row in rows])
            for row in rows:
                texts[row] = ("noun", prompts[row][1])
    blank = None
    if fragment_probability > 0:
        use = torch.rand(len(caption_ids), generator=generator) < fragment_probability
        rows = [row for row in range(len(caption_ids))
                if use[row] and texts[row][0] == "caption" and nouns_per_caption[row]]
        if rows:
            nouns = [pick_noun(nouns_per_caption[row], generator) for row in rows]
            blank = torch.zeros(input_ids.shape, dtype=torch.bool)
            blank[rows] = fragment_blank_positions(input_ids[rows], [form_token_ids[noun] for noun in nouns])
            for row, noun in zip(rows, nouns):
                texts[row] = ("noun", noun)
    return input_ids, texts, blank


def learning_rate_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_clip(
    dataset,
    tokenizer: CLIPTokenizer,
    config: CLIPConfig,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    noun_forms: Mapping[str, str] | None = None,
    prompt_probability: float = 0.0,
    fragment_probability: float = 0.0,
    min_crop_scale: float = 1.0,
    image_column: str = "image",
    caption_column: str = "caption",
    loss_history: list[float] | None = None,
) -> CLIPModel:
    """Train a ``CLIPModel`` from scratch with CLIP's symmetric InfoNCE on image-caption pairs.

    Pairs whose texts are equal (or, for noun prompts, whose captions name the prompt's noun)
    count as positives of each other (:func:`multi_positive_clip_loss`).

    Args:
        dataset: a ``datasets.Dataset`` (or any mapping of columns) with ``image_column`` (PIL images)
            and ``caption_column`` (strings).
        tokenizer: the tokenizer whose ids ``config`` was built for.
        config: the model configuration, e.g. from :func:`small_clip_config`.
        steps, batch_size, lr, weight_decay: AdamW (betas 0.9/0.98, eps 1e-6) run for ``steps``
            batches of ``batch_size`` pairs; LR warms up linearly over ``warmup_fraction`` of the
            steps, then decays with a cosine to 0. Weight decay spares biases, norms and embeddings.
        seed: seeds model initialisation, batch order and augmentation.
        noun_forms, prompt_probability: if given, each pair's text is replaced with probability
            ``prompt_probability`` by a prompt ("a photo of the small {noun}.") naming one noun of
            its caption; ``noun_forms`` maps caption words to nouns ("circles" -> "circle").
        fragment_probability: each remaining pair's text is, with this probability, a one-noun fragment
            of its caption (:func:`fragment_blank_positions`), matching every image that names the noun.
            CoDe's highlighted captions are such fragments, which a CLIP trained on whole captions
            alone has never seen.
        min_crop_scale: smallest area fraction of the random crops (1.0: horizontal flips only;
            resampling blurs the toy world's fine surface patterns).
        loss_history: if given, the loss of every step is appended to it.

    Returns:
        The trained model, in eval mode.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got steps={steps}, batch_size={batch_size}")
    if (prompt_probability > 0 or fragment_probability > 0) and not noun_forms:
        raise ValueError("prompt_probability or fragment_probability > 0 needs noun_forms (caption word -> noun)")
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image_size = config.vision_config.image_size
    images = images_to_tensor(dataset[image_column], image_size)
    captions = list(dataset[caption_column])
    caption_ids = tokenize_texts(tokenizer, captions)
    noun_forms = noun_forms or {}
    nouns_per_caption = [caption_nouns(caption, noun_forms) for caption in captions]
    forms_by_noun: dict[str, list[str]] = {}
    for form, noun in noun_forms.items():
        forms_by_noun.setdefault(noun, []).append(form)
    form_token_ids = {noun: bpe_token_ids(tokenizer, forms) for noun, forms in forms_by_noun.items()}
    if len(captions) < batch_size:
        raise ValueError(f"dataset has {len(captions)} pairs, fewer than batch_size={batch_size}")

    model = CLIPModel(config)
    model.train()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        is_vector = parameter.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if is_vector else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    warmup_steps = max(1, int(warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, steps, warmup_steps)
    )
    # Fragments blank word embeddings between the token embedding and the position embedding.
    with blanked_word_embeddings(model.text_model.embeddings.token_embedding) as blank:
        order = torch.randperm(len(captions), generator=generator)
        cursor = 0
        bar = tqdm(range(steps), desc="pretraining CLIP", disable=not progress)
        for _ in bar:
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(captions), generator=generator), 0
            batch = order[cursor : cursor + batch_size]
            cursor += batch_size
            batch_captions = [captions[i] for i in batch.tolist()]
            batch_nouns = [nouns_per_caption[i] for i in batch.tolist()]
            input_ids, texts, blank[0] = choose_batch_texts(
                caption_ids[batch], batch_captions, batch_nouns, tokenizer, generator,
                prompt_probability, fragment_probability, form_token_ids,
            )
            # The text tower is causal and pools at the end token: positions after the longest text
            # cannot change the result, so they are not computed.
            length = int((input_ids == tokenizer.eos_token_id).int().argmax(dim=1).max()) + 1
            if blank[0] is not None:
                blank[0] = blank[0][:, :length]
            pixel_values = augment_images(normalize_images(images[batch]), generator, min_crop_scale)
            logits = model(input_ids=input_ids[:, :length], pixel_values=pixel_values).logits_per_image
            loss = multi_positive_clip_loss(logits, positive_pairs(batch_captions, batch_nouns, texts))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if loss_history is not None:
                loss_history.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
