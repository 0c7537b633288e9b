"""Caption text: the dataset's own vocabulary (BiGRU) or a local Hugging Face tokenizer (BERT-like).

Both give a ``TextProcessor``: ``processor(list_of_captions) -> (tokens (N,T) long,
lengths (N,) long, attention_mask (N,T) bool)``, padded on the right (vocab: with <pad> = 0;
HF: with the tokenizer's pad token).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rgfusion.datasets.storage import join_url, read_bytes

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIALS = (PAD, UNK, START, END)  # indices 0..3, fixed by the contract
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric words; punctuation carries no retrieval signal in VSE captions."""
    return _WORD.findall(text.lower())


@dataclass
class Vocab:
    """word -> index, with <pad>=0, <unk>=1, <start>=2, <end>=3."""

    word_to_index: dict[str, int]

    def __post_init__(self) -> None:
        for i, s in enumerate(SPECIALS):
            if self.word_to_index.get(s) != i:
                raise ValueError(f"vocab must map {s!r} to {i}")

    def __len__(self) -> int:
        return len(self.word_to_index)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocab":
        """From training captions; words seen fewer than ``min_count`` times become <unk>.
        Ties are broken alphabetically so the same captions always give the same indices."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls({w: i for i, w in enumerate(list(SPECIALS) + words)})

    def encode(self, text: str, max_words: int | None = None) -> list[int]:
        """<start> words <end>, truncated to ``max_words`` tokens in all (keeping <end>)."""
        unk = self.word_to_index[UNK]
        ids = [self.word_to_index.get(w, unk) for w in tokenize(text)]
        if max_words is not None:
            ids = ids[: max(max_words - 2, 0)]
        return [self.word_to_index[START], *ids, self.word_to_index[END]]

    def to_json(self) -> str:
        return json.dumps(self.word_to_index, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Vocab":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise ValueError("vocab.json must map words to integer indices")
        return cls(data)


class TextProcessor(Protocol):
    vocab_size: int

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(x) for x in seqs), np.int64, len(seqs))
    tokens = np.zeros((len(seqs), int(lengths.max(initial=0))), np.int64)
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    tokens[mask] = np.fromiter((t for x in seqs for t in x), np.int64, int(lengths.sum()))
    return torch.from_numpy(tokens), torch.from_numpy(lengths), torch.from_numpy(mask)


class VocabProcessor:
    """Captions -> vocab indices (BiGRU input)."""

    def __init__(self, vocab: Vocab, max_words: int):
        self.vocab = vocab
        self.max_words = max_words
        self.vocab_size = len(vocab)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pad_batch([self.vocab.encode(c, self.max_words) for c in captions])


class HFProcessor:
    """Captions -> a Hugging Face tokenizer's ids, from a local directory (never downloads)."""

    def __init__(self, path: str | Path, max_words: int):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.padding_side = "right"  # lengths and packed-sequence encoders assume it
        self.max_words = max_words
        self.vocab_size = len(self.tokenizer)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_words,
                             return_tensors="pt")
        mask = enc["attention_mask"].bool()
        return enc["input_ids"].long(), mask.sum(1).long(), mask


def build_text_processor(cfg: Any, manifest: Any) -> TextProcessor:
    """The dataset vocabulary when ``cfg.tokenizer`` is None, else the local HF tokenizer there."""
    if cfg.tokenizer:
        return HFProcessor(cfg.tokenizer, cfg.max_words)
    return VocabProcessor(load_vocab(manifest), cfg.max_words)


def load_vocab(manifest: Any) -> Vocab:
    if not manifest.vocab:
        raise ValueError(f"dataset {manifest.root} has no vocab; set data.tokenizer to a tokenizer directory")
    return Vocab.from_json(read_bytes(join_url(manifest.root, manifest.vocab), manifest.storage_options))
