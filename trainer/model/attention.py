"""Scaled dot-product attention over short sets (tens of nodes or words).

Two implementations of one function. ``sdpa`` is PyTorch's fused kernel dispatch. ``math`` is
two batched matrix products around a float32 softmax. With an additive bias that needs a
gradient (the graph's geometry bias), a key mask, or MAP's one 1,024-wide head, PyTorch falls
back to the memory-efficient kernel, which inductor cannot fuse with the arithmetic around it.
Compiled and captured, the math path was 2-7% faster on an H100; eager, its extra launches made
the step slower (benchmarks/RESULTS.md, session 3), so ``sdpa`` is the default. ``triton``
runs the self- and cross-attention of projections laid side by side (``self_attend``,
``cross_attend``) as Triton kernels (model/triton_attention.py); ``attend`` takes the math path
for it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_attention

Attention = Literal["sdpa", "math", "triton"]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, dropout_p: float, impl: Attention) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v over the last two dims; ``bias`` broadcasts to the scores.

    Any ``impl`` but ``sdpa`` is the math path."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return p @ v


def self_attend(qkv: Tensor, bias: Tensor | None, heads: int, dropout_p: float, impl: Attention) -> Tensor:
    """Attention of a fused (B, T, 3·hidden) query-key-value projection to (B, T, hidden);
    ``bias`` broadcasts to (B, heads, T, T)."""
    b, t, width = qkv.shape
    if impl == "triton" and triton_attention.applies(qkv, width // (3 * heads)):
        return triton_attention.self_attention(qkv, bias, heads, dropout_p)
    q, k, v = qkv.view(b, t, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return attend(q, k, v, bias, dropout_p, impl).transpose(1, 2).reshape(b, t, width // 3)


def cross_attend(q: Tensor, kv: Tensor, bias: Tensor | None, heads: int, dropout_p: float,
                 impl: Attention) -> Tensor:
    """Attention of queries (B, Nq, hidden) over a (B, Nk, 2·hidden) key-value projection to
    (B, Nq, hidden); ``bias`` broadcasts to (B, heads, Nq, Nk)."""
    b, n, width = q.shape
    if impl == "triton" and triton_attention.applies(q, width // heads):
        return triton_attention.cross_attention(q, kv, bias, heads, dropout_p)
    k, v = kv.view(b, kv.shape[1], 2, heads, width // heads).permute(2, 0, 3, 1, 4)
    att = attend(q.view(b, n, heads, width // heads).transpose(1, 2), k, v, bias, dropout_p, impl)
    return att.transpose(1, 2).reshape(b, n, width)
