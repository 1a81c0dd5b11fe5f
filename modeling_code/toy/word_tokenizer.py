"""Build a small CLIP BPE tokenizer whose vocabulary is a given word list.

Real CLIP checkpoints ship a 49,408-token vocabulary. Tests and the toy world need a tokenizer
that behaves exactly like CLIP's (byte-level BPE, ``</w>`` word ends, ``<|startoftext|>`` and
``<|endoftext|>`` last in the vocabulary) but is small enough for a tiny model: every byte is a
token, so any text tokenises, and each listed word is merged into a single token.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return [chr(c) for c in characters]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        rank, index = min(pairs)
        if rank > len(ranks):
            break
        pieces = [*pieces[:index], pieces[index] + pieces[index + 1], *pieces[index + 2:]]
    return pieces


def build_clip_tokenizer(words: Iterable[str], save_directory: str | Path) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` for ``words`` into ``save_directory`` and load them.

    Args:
        words: lower-case words (letters only are merged; other characters stay byte tokens).
        save_directory: where the tokenizer files are written (created if missing).

    Returns:
        A ``CLIPTokenizer`` loaded with ``from_pretrained(save_directory)``; its vocabulary size is
        ``len(tokenizer)`` and the two special tokens have the two highest ids, as in CLIP.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    base = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in base + [c + "</w>" for c in base]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.strip().lower() for w in words if w.strip()}):
        if not word.isalpha() or len(word) < 2:
            continue
        # BPE applies merges by rank across all words, so first see how far the existing merges take this
        # word, then chain new merges from its first piece until it is one token. New merges rank last, so
        # words added earlier keep their single token.
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _apply_merges([pair[0] + pair[1], *pieces[2:]], ranks)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    (save_directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (save_directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(save_directory))
