"""Caption side: word features (BiGRU or a local Hugging Face transformer), pooled and projected."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention
from .bert import FusedBert
from .config import ModelConfig, TextConfig
from .pooling import build_pooling
from .streams import beside


class BiGRUWords(nn.Module):
    """Word embeddings from the dataset vocabulary through a bidirectional GRU (VSE++/VSE∞).

    Each direction is its own cuDNN GRU over the padded batch; the backward one reads every
    caption reversed *within its length*, so both directions start on real words and padding
    (always after the words) never reaches a valid position. That is exactly what packing gives,
    without packing's host-side lengths: no sync, static shapes, CUDA-graph and compile friendly.
    """

    def __init__(self, cfg: TextConfig, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        # Layer by layer, as a stacked bidirectional GRU: layer l+1 sees both directions of l.
        dims = [cfg.word_dim] + [2 * hidden] * (cfg.layers - 1)
        self.forward_gru = nn.ModuleList(nn.GRU(d, hidden, batch_first=True) for d in dims)
        self.backward_gru = nn.ModuleList(nn.GRU(d, hidden, batch_first=True) for d in dims)
        self.side_streams = False  # set by RetrievalModel.use_side_streams

    @property
    def out_dim(self) -> int:
        return self.hidden

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        order = reverse_within_length(lengths.clamp(min=1), tokens.shape[1])
        x = self.embed(tokens)
        for fwd, bwd in zip(self.forward_gru, self.backward_gru):
            # Slot 1: the caption tower itself may already run on side stream 0.
            out_f, out_b = beside(lambda: fwd(x)[0], lambda: take_steps(bwd(take_steps(x, order))[0], order),
                                  x.device, enabled=self.side_streams, slot=1)
            x = torch.cat([out_f, out_b], dim=-1)
        # Average of the two directions (VSE∞) keeps the width at `hidden`.
        return (x[..., : self.hidden] + x[..., self.hidden :]) / 2


def reverse_within_length(lengths: Tensor, steps: int) -> Tensor:
    """(N, T) time index that reverses positions < length and leaves padding in place.

    It is its own inverse, so the same index maps the reversed outputs back."""
    t = torch.arange(steps, device=lengths.device)[None, :]
    return torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)


def take_steps(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand_as(x))


class HFWords(nn.Module):
    """A pretrained transformer read from a local directory; nothing is downloaded."""

    def __init__(self, path: str, attention: Attention) -> None:
        super().__init__()
        from transformers import AutoModel

        # Hugging Face's "eager" attention is the same matrix-product path as our 'math' (and
        # 'triton', whose kernels only our own modules call).
        impl = "sdpa" if attention == "sdpa" else "eager"
        self.model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=impl)
        # The [CLS] pooler is never used: drop it so every parameter gets a gradient (ZeRO and
        # DDP-style reducers expect that) and no optimizer state is wasted on it.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None

    @property
    def out_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=tokens, attention_mask=attention_mask.long()).last_hidden_state


def transformer_words(path: str, attention: Attention, *, fused: bool) -> nn.Module:
    """The pretrained transformer at ``path``: a :class:`FusedBert` when asked and the checkpoint
    is one, else Hugging Face's own module."""
    words = HFWords(path, attention)
    return FusedBert.from_hf(words.model, attention) if fused and FusedBert.supports(words.model.config) else words


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
            self.hf = transformer_words(t.hf_path, cfg.attention, fused=t.fused_bert)
            words = self.hf
        self.pool = build_pooling(cfg.pooling, words.out_dim, map_heads=cfg.map_heads, map_combine=cfg.map_combine,
                                  attention=cfg.attention)
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
