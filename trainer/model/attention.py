"""Scaled dot-product attention over short sets (tens of nodes or words).

Two implementations of one function. ``sdpa`` is PyTorch's fused kernel dispatch. ``math`` is
two batched matrix products around a float32 softmax. With an additive bias that needs a
gradient (the graph's geometry bias), a key mask, or MAP's one 1,024-wide head, PyTorch falls
back to the memory-efficient kernel, which inductor cannot fuse with the arithmetic around it.
Compiled and captured, the math path was 2-7% faster on an H100; eager, its extra launches made
the step slower (benchmarks/RESULTS.md, session 3), so ``sdpa`` is the default. ``triton``
concerns BERT's self-attention only (model/triton_attention.py); here it is the math path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

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
