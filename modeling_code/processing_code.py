"""``CoDeProcessor``: images, captions and class names -> the tensors the CoDe model consumes.

It pairs a ``CoDeImageProcessor`` with a CLIP BPE tokenizer and adds the text decomposition of the
training data (docs/method.md#training-data): caption nouns, K sampled nouns, their prompt templates and pseudo word
labels. Token sequences are CLIP's: SOS, tokens, EOS, padded with id 0 (not the EOS id that
transformers' CLIP tokenizers pad with; the non-causal text decoder sees the padding).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, CLIPTokenizer
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

from .configuration_code import PROTOCOL_CONFIG_FIELDS, CoDeConfig, InferenceProtocol
from .image_processing_code import CoDeImageProcessor, ImageLike
from .inference import class_list
from .templates import get_templates
from .text_decomposition import NounDecomposer, pseudo_text_labels

# Hub/cache options of ``from_pretrained`` that the image processor and the tokenizer also need.
SUB_PROCESSOR_LOADING_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "token",
    "revision",
    "subfolder",
)
PER_NOUN_KEYS = ("noun_input_ids", "kg_template_input_ids")
# What a saved processor needs besides the weights: each entry is satisfied by any one of its file sets.
PROCESSOR_FILES = {
    "processor_config.json": (("processor_config.json",), ("preprocessor_config.json",)),
    "tokenizer.json": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "tokenizer_config.json": (("tokenizer_config.json",),),
}


def check_processor_files(folder: Any, subfolder: str = "") -> None:
    """Refuse a local model folder whose processor files are incomplete, naming the missing ones.

    Without them transformers builds a tokenizer of its special tokens alone, which gives every class the same
    ids: the model then labels every pixel with the first class, without a word. Hub ids are checked after
    loading (``check_tokenizer_vocabulary``).

    Raises:
        OSError: ``folder`` is a directory that lacks one of ``PROCESSOR_FILES``.
    """
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        return
    directory = os.path.join(folder, subfolder) if subfolder else os.fspath(folder)
    missing = [
        name
        for name, alternatives in PROCESSOR_FILES.items()
        if not any(all(os.path.isfile(os.path.join(directory, file)) for file in files) for files in alternatives)
    ]
    if missing:
        raise OSError(
            f"The model folder {directory} lacks processor files: {', '.join(missing)}. A saved CoDe model needs "
            "its processor next to the weights: save it with processor.save_pretrained(folder) (the tokenizer "
            "files may also be vocab.json + merges.txt)."
        )


def check_tokenizer_vocabulary(tokenizer: CLIPTokenizer, source: Any) -> None:
    """Refuse a tokenizer that knows only its special tokens (what transformers builds when its files are missing).

    Raises:
        OSError: the tokenizer has no vocabulary beyond its special tokens.
    """
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise OSError(
            f"The tokenizer loaded from {source} has no vocabulary (only its {len(tokenizer)} special tokens): "
            "its tokenizer files are missing, so every class would get the same token ids."
        )

logger = logging.getLogger(__name__)


def bpe_token_ids(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The BPE token ids of each text: no start or end token, no padding, no truncation.

    These are the ids a noun has inside a caption's ``clip_token_ids`` row, so they locate nouns in captions
    (pseudo word labels, ``text_decomposition.pseudo_text_labels``). Returns one list per text; ``[]`` for none.
    """
    if not texts:
        return []
    # verbose=False: over-long texts are handled (and reported) by the caller, not logged.
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def clip_token_ids(tokenizer: CLIPTokenizer, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, list[bool]]:
    """CLIP token ids as CoDe uses them: SOS, BPE tokens, EOS, then 0 up to ``context_length`` (docs/method.md#text-side).

    Texts that do not fit are cut with EOS kept as the last token. Returns ``(ids [N, L], truncated flags)``.
    """
    if context_length < 2:
        raise ValueError(f"context_length must hold at least SOS and EOS (2); got {context_length}.")
    input_ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    truncated: list[bool] = []
    for row, tokens in enumerate(bpe_token_ids(tokenizer, texts)):
        sequence = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        truncated.append(len(sequence) > context_length)
        if len(sequence) > context_length:
            sequence = [*sequence[: context_length - 1], tokenizer.eos_token_id]
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return input_ids, truncated


def _saved_protocol(
    path: Any, processor_dict: dict, image_processor: CoDeImageProcessor, loading_kwargs: dict
) -> InferenceProtocol:
    """The inference protocol of a saved model directory, from its ``config.json``.

    0.1 also stored the resize in the image processor (``eval_short_side``, ``eval_max_long_side``) and the
    template set in the processor (``inference_template_set``). Migration rule: the model config wins, as 0.1's
    ``CoDeSegmenter`` already applied it, and a disagreement is logged; a directory without ``config.json``
    (a processor saved alone) keeps its own old values.
    """
    legacy = {
        "short_side": image_processor.legacy_resize.get("eval_short_side"),
        "max_long_side": image_processor.legacy_resize.get("eval_max_long_side"),
        "template_set": processor_dict.pop("inference_template_set", None),
    }
    legacy = {name: value for name, value in legacy.items() if value is not None}
    # transformers builds a default config from a folder without config.json: look for the file itself
    if cached_file(path, "config.json", _raise_exceptions_for_missing_entries=False, **loading_kwargs) is None:
        return InferenceProtocol().replace(**legacy)  # a processor saved on its own
    protocol = CoDeConfig.from_pretrained(path, **loading_kwargs).inference_protocol
    disagreeing = {name: value for name, value in legacy.items() if getattr(protocol, name) != value}
    if disagreeing:
        logger.warning(
            "The processor files of %s hold old (0.1) inference settings that differ from the model config; the "
            "model config's are used: %s",
            path,
            ", ".join(f"{PROTOCOL_CONFIG_FIELDS[name]} {getattr(protocol, name)!r} (processor: {value!r})"
                      for name, value in disagreeing.items()),
        )
    return protocol


class CoDeProcessor(ProcessorMixin):
    r"""Processor of CoDe.

    Args:
        image_processor: a ``CoDeImageProcessor`` (a default one if ``None``).
        tokenizer: a CLIP BPE tokenizer (``CLIPTokenizer``).
        spacy_model: spaCy pipeline used to find the nouns of captions.
        num_words: K, nouns sampled per caption.
        context_length: L, positions per token sequence.
        kg_template_set: template set (``templates.TEMPLATE_SETS``) filled with each sampled noun
            for the knowledge-guidance loss; one template is drawn at random per noun.
        protocol: the inference protocol (resize and KP template set) of the model this processor serves.
            ``from_pretrained`` reads it from the model's ``config.json``; the paper's protocol by default.
            It is not saved with the processor: the model config owns it.
    """

    def __init__(
        self,
        image_processor: CoDeImageProcessor | None = None,
        tokenizer: CLIPTokenizer | None = None,
        spacy_model: str = "en_core_web_sm",
        num_words: int = 2,
        context_length: int = 77,
        kg_template_set: str = "imagenet",
        protocol: InferenceProtocol | None = None,
        **deprecated: Any,
    ) -> None:
        if image_processor is None:
            image_processor = CoDeImageProcessor()
        if not isinstance(image_processor, CoDeImageProcessor):
            raise TypeError(f"image_processor must be a CoDeImageProcessor; got {type(image_processor).__name__}.")
        if tokenizer is None:
            raise ValueError("CoDeProcessor needs a CLIP tokenizer, e.g. CLIPTokenizer.from_pretrained(<clip id>).")
        if context_length < 2:
            raise ValueError(f"context_length must hold at least SOS and EOS (2); got {context_length}.")
        if "inference_template_set" in deprecated:
            warnings.warn(
                "CoDeProcessor(inference_template_set=...) is deprecated and goes in 0.3: the template set is part "
                "of the model's InferenceProtocol (protocol=InferenceProtocol(template_set=...)).",
                FutureWarning,
                stacklevel=2,
            )
            protocol = (protocol or InferenceProtocol()).replace(template_set=deprecated.pop("inference_template_set"))
        if deprecated:
            raise TypeError(f"CoDeProcessor got unexpected arguments {sorted(deprecated)}")
        super().__init__(image_processor, tokenizer)
        self.spacy_model = spacy_model
        self.num_words = num_words
        self.context_length = context_length
        self.kg_template_set = kg_template_set
        self.kg_templates = get_templates(kg_template_set)
        self.inference_protocol = protocol or InferenceProtocol()
        self.noun_decomposer = NounDecomposer(spacy_model, num_words)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> CoDeProcessor:
        """Load a saved processor: its two parts by their own classes, then its settings; ``kwargs`` override them.

        The parts are loaded here rather than by transformers' sub-processor resolution, which changed across 5.x
        releases (5.25 loads a remote-code image processor from a second copy of its module, whose class then fails
        the type check of ``__init__``). No Auto* registration is needed, for local and Hub remote code alike.
        """
        loading_kwargs = {key: kwargs.pop(key) for key in SUB_PROCESSOR_LOADING_KWARGS if key in kwargs}
        check_processor_files(pretrained_model_name_or_path, loading_kwargs.get("subfolder") or "")
        image_processor = kwargs.pop("image_processor", None) or CoDeImageProcessor.from_pretrained(
            pretrained_model_name_or_path, **loading_kwargs
        )
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, **loading_kwargs)
            check_tokenizer_vocabulary(tokenizer, pretrained_model_name_or_path)
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **loading_kwargs)
        if "protocol" not in kwargs:
            kwargs["protocol"] = _saved_protocol(
                pretrained_model_name_or_path, processor_dict, image_processor, loading_kwargs
            )
        settings = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer"}
        # loader options such as trust_remote_code (from AutoProcessor) are not settings
        values = {key: value for key, value in {**processor_dict, **kwargs}.items() if key in settings}
        return cls(image_processor, tokenizer, **values)

    # ----------------------------------------------------------------------------------- text

    def tokenize_with_truncation_flags(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> tuple[torch.Tensor, list[bool]]:
        """``tokenize`` that also reports which texts did not fit (no warning is logged).

        Returns:
            ``(input_ids, truncated)``: a ``torch.LongTensor`` [N, L] and one bool per text.
        """
        length = self.context_length if context_length is None else context_length
        return clip_token_ids(self.tokenizer, [texts] if isinstance(texts, str) else list(texts), length)

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """CLIP token ids: SOS, BPE tokens, EOS, then 0 up to L positions.

        Texts longer than L are cut to L positions with EOS kept as the last one.

        Args:
            texts: one text or a list of N texts.
            context_length: L (``self.context_length`` if ``None``).

        Returns:
            ``torch.LongTensor`` [N, L].
        """
        return self.tokenize_with_truncation_flags(texts, context_length)[0]

    # ------------------------------------------------------------------------------- training

    def prepare_training_sample(self, image: ImageLike, caption: str, rng: random.Random) -> dict[str, torch.Tensor]:
        """One training example (docs/method.md#training-data).

        The noun check runs before the image is decoded, so unusable captions cost no decoding.

        Args:
            image: anything ``CoDeImageProcessor.load_image`` accepts.
            caption: the paired caption.
            rng: source of all randomness (noun sampling, crop and flip, template choice).

        Returns:
            ``pixel_values`` [3, S, S] float, ``caption_input_ids`` [L], ``noun_input_ids`` [K, L]
            (each sampled noun tokenised alone), ``kg_template_input_ids`` [K, L] (a random template of
            ``kg_template_set`` filled with each noun) and ``text_labels`` [L] (pseudo labels: -1,
            0 for any noun, k for the k-th sampled noun); integer tensors are int64.

        Raises:
            NotEnoughNounsError: the caption has fewer than K distinct nouns.
            InvalidImageError: the image cannot be loaded.
        """
        nouns = self.noun_decomposer.extract_nouns(caption)
        selected = self.noun_decomposer.sample_nouns(nouns, rng, caption=caption)
        pixel_values = self.image_processor.preprocess_train(image, np.random.default_rng(rng.getrandbits(64)))
        prompts = [rng.choice(self.kg_templates).format(noun) for noun in selected]

        caption_input_ids = self.tokenize([caption])[0]
        noun_token_ids = dict(zip(nouns, bpe_token_ids(self.tokenizer, nouns)))
        text_labels = pseudo_text_labels(
            caption_input_ids.tolist(),
            list(noun_token_ids.values()),
            [noun_token_ids[noun] for noun in selected],
        )
        return {
            "pixel_values": pixel_values,
            "caption_input_ids": caption_input_ids,
            "noun_input_ids": self.tokenize(selected),
            "kg_template_input_ids": self.tokenize(prompts),
            "text_labels": torch.tensor(text_labels, dtype=torch.long),
        }

    @staticmethod
    def collate_training(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch training examples from ``prepare_training_sample``.

        Returns:
            ``pixel_values`` [B, 3, S, S], ``caption_input_ids`` [B, L], ``text_labels`` [B, L], and
            ``noun_input_ids`` / ``kg_template_input_ids`` [K*B, L] stacked noun-major: row k*B + b is
            noun k of sample b.
        """
        if not samples:
            raise ValueError("Cannot collate an empty list of samples.")
        batch = {}
        for key in samples[0]:
            stacked = torch.stack([sample[key] for sample in samples])
            if key in PER_NOUN_KEYS:
                # [B, K, L] -> [K, B, L] -> [K*B, L]
                stacked = stacked.transpose(0, 1).reshape(-1, stacked.shape[-1])
            batch[key] = stacked
        return batch

    # ------------------------------------------------------------------------------ inference

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        protocol: InferenceProtocol | None = None,
        **deprecated: Any,
    ) -> BatchFeature:
        """Inference inputs: what ``CoDeModel.forward`` takes, under the same names.

        Args:
            images: one image or a list (anything ``CoDeImageProcessor.load_image`` takes). Paths and encoded
                bytes are decoded here with their EXIF orientation applied; an in-memory PIL image or array is
                taken as given.
            text: the vocabulary, shared by every image of the call: a list of class names, or one string of
                names separated by commas or newlines. ``background`` stands for a constant score map; class
                ids are positions in this list.
            return_tensors: only ``"pt"`` (torch) is supported.
            protocol: resize and template set; default: this processor's (the model's) protocol.

        Returns:
            ``BatchFeature`` with, for images, ``pixel_values`` (a tensor [B, 3, H, W], or a list of [3, H_i, W_i]
            when sizes differ) and ``original_sizes`` (``(height, width)`` of each image as given); for text,
            ``class_input_ids`` [N_text, L] (the class names, ``background`` left out),
            ``kp_template_input_ids`` [N_text, T, L] (each class in the T templates of the protocol's template
            set) and ``background_index`` (position of ``background`` in the list, or None).
        """
        if "class_names" in deprecated:
            warnings.warn(
                "CoDeProcessor(class_names=...) is deprecated and goes in 0.3; pass the vocabulary as text=...",
                FutureWarning,
                stacklevel=2,
            )
            text = deprecated.pop("class_names") if text is None else text
        if deprecated:
            raise TypeError(f"CoDeProcessor.__call__ got unexpected arguments {sorted(deprecated)}")
        if images is None and text is None:
            raise ValueError("Give images, text (the class names) or both.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"CoDeProcessor returns torch tensors only; got return_tensors={return_tensors!r}.")
        protocol = protocol or self.inference_protocol
        data: dict[str, Any] = {}
        if images is not None:
            data.update(self.image_processor.preprocess(images, protocol=protocol))
        if text is not None:
            data.update(self.encode_text(text, protocol))
        return BatchFeature(data)

    def encode_text(
        self,
        text: str | Sequence[str],
        protocol: InferenceProtocol | None = None,
        with_kp_templates: bool = True,
    ) -> dict[str, Any]:
        """The text part of ``__call__``.

        Returns:
            ``class_input_ids`` [N_text, L], ``kp_template_input_ids`` [N_text, T, L] (each class in the T
            templates of the protocol's template set; left out with ``with_kp_templates=False``) and
            ``background_index``. A name too long for a template is cut, with a warning naming it.

        Raises:
            ValueError / TypeError: a bad class list (see ``inference.clean_class_names``); names repeating
                (ignoring case) are refused, since class ids are positions in the list.
        """
        names, background_index = class_list(text)
        text_names = [name for index, name in enumerate(names) if index != background_index]
        encoded: dict[str, Any] = {"class_input_ids": self.tokenize(text_names), "background_index": background_index}
        if with_kp_templates:
            templates = get_templates((protocol or self.inference_protocol).template_set)
            prompts = [template.format(name) for name in text_names for template in templates]
            input_ids, truncated = self.tokenize_with_truncation_flags(prompts)
            count = len(templates)
            too_long = [name for row, name in enumerate(text_names) if any(truncated[row * count : (row + 1) * count])]
            if too_long:
                logger.warning(
                    "Class names too long for the template prompts (%d token positions including start and end) "
                    "are truncated: %s",
                    self.context_length,
                    too_long,
                )
            encoded["kp_template_input_ids"] = input_ids.view(len(text_names), len(templates), -1)
        return encoded

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Label maps [H_i, W_i] (class ids: positions in the vocabulary) from the model's output, with each
        pixel's score when ``return_scores``; see ``CoDeImageProcessor.post_process_semantic_segmentation``."""
        return self.image_processor.post_process_semantic_segmentation(
            outputs, target_sizes, return_scores=return_scores
        )


__all__ = ["CoDeProcessor", "bpe_token_ids", "clip_token_ids"]
