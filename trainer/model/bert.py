"""BERT with one query-key-value projection per layer: Hugging Face's BertModel as a function,
with the same weights, in fewer and larger kernels.

At batch 128 a caption is about 20 word pieces, so each of BERT's matrix products has only
2,560 rows. Three 768-wide products for query, key and value cost three launches, three
transposes and, in backward, three weight products, three input products with two adds, and
three bias reductions. One 2,304-wide product costs one of each. BERT's tower is the longest
chain of the step on a GPU (benchmarks/RESULTS.md, session 5), so its kernel count is time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention, self_attend
from .ffn import feed_forward
from .pooling import additive_mask


class FusedBertLayer(nn.Module):
    """Post-norm encoder layer: attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(self, config, attention: Attention) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.attention = attention
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.up = nn.Linear(d, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, d)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """``bias``: (B, 1, 1, T), added to every query's scores against each key."""
        p = self.attention_dropout if self.training else 0.0
        att = self_attend(self.qkv(x), bias, self.heads, p, self.attention)
        x = self.norm1(x + self.drop(self.out(att)))
        return self.norm2(x + self.drop(feed_forward(x, self.up, self.down, self.attention)))


class FusedBert(nn.Module):
    """Token ids (C, T) and their mask to (C, T, hidden) features, as ``BertModel(...).last_hidden_state``."""

    def __init__(self, config, attention: Attention) -> None:
        super().__init__()
        d = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, d)
        # Captions are one segment: only row 0 is read, but the table is kept so the weights
        # convert back to a BertModel unchanged.
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(FusedBertLayer(config, attention) for _ in range(config.num_hidden_layers))
        self.out_dim = d

    @staticmethod
    def supports(config) -> bool:
        """Whether a Hugging Face config is the architecture this module computes."""
        return (config.model_type == "bert" and config.hidden_act == "gelu"
                and getattr(config, "position_embedding_type", "absolute") == "absolute")

    @classmethod
    def from_hf(cls, model: nn.Module, attention: Attention) -> FusedBert:
        """This module holding ``model``'s (a BertModel's) weights."""
        fused = cls(model.config, attention)
        fused.load_state_dict(fused_state(model.state_dict(), model.config.num_hidden_layers))
        return fused

    def forward(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        n = tokens.shape[1]
        x = self.word(tokens) + self.token_type.weight[0] + self.position.weight[:n]
        x = self.drop(self.norm(x))
        bias = additive_mask(attention_mask.bool(), x.dtype)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x


def fused_state(hf: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """A BertModel state dict renamed for :class:`FusedBert`, query/key/value concatenated."""
    out = {
        "word.weight": hf["embeddings.word_embeddings.weight"],
        "position.weight": hf["embeddings.position_embeddings.weight"],
        "token_type.weight": hf["embeddings.token_type_embeddings.weight"],
        "norm.weight": hf["embeddings.LayerNorm.weight"],
        "norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    renames = {"attention.output.dense": "out", "attention.output.LayerNorm": "norm1",
               "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "norm2"}
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}qkv.{kind}"] = torch.cat(
                [hf[f"{src}attention.self.{part}.{kind}"] for part in ("query", "key", "value")])
            for old, new in renames.items():
                out[f"{dst}{new}.{kind}"] = hf[f"{src}{old}.{kind}"]
    return out
