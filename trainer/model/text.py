"""Caption side: word features (BiGRU or a local Hugging Face transformer), pooled and projected."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig, TextConfig
from .pooling import build_pooling


class BiGRUWords(nn.Module):
    """Word embeddings from the dataset vocabulary through a bidirectional GRU (VSE++/VSE∞)."""

    def __init__(self, cfg: TextConfig, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        self.gru = nn.GRU(cfg.word_dim, hidden, cfg.layers, batch_first=True, bidirectional=True)

    @property
    def out_dim(self) -> int:
        return self.hidden

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        # Packing needs the lengths on the host (one sync per batch); it keeps the backward
        # direction from starting on padding, which would make features depend on batch padding.
        packed = pack_padded_sequence(
            self.embed(tokens), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=tokens.shape[1])
        # Average of the two directions (VSE∞) keeps the width at `hidden`.
        return (out[..., : self.hidden] + out[..., self.hidden :]) / 2


class HFWords(nn.Module):
    """A pretrained transformer read from a local directory; nothing is downloaded."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        # The [CLS] pooler is never used: drop it so every parameter gets a gradient (ZeRO and
        # DDP-style reducers expect that) and no optimizer state is wasted on it.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None

    @property
    def out_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=tokens, attention_mask=attention_mask.long()).last_hidden_state


class TextEncoder(nn.Module):
    """Tokens (C, T) to one (C, width) vector: word features, pooling, linear projection."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        t = cfg.text
        self.encoder = t.encoder
        if t.encoder == "bigru":
            self.gru = BiGRUWords(t, vocab_size, t.hidden or cfg.width)
            words = self.gru
        else:
            self.hf = HFWords(t.hf_path)
            words = self.hf
        self.pool = build_pooling(cfg.pooling, words.out_dim, map_heads=cfg.map_heads, map_combine=cfg.map_combine)
        self.proj = nn.Linear(words.out_dim, cfg.width)

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        words = self.gru if self.encoder == "bigru" else self.hf
        feats = words(tokens, lengths, attention_mask)
        return self.proj(self.pool(feats, self.word_mask(tokens, lengths, attention_mask)))

    def word_mask(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        # The BiGRU's valid positions are what packing used (lengths); the transformer's are its mask.
        if self.encoder == "hf":
            return attention_mask.bool()
        return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.clamp(min=1)[:, None]
