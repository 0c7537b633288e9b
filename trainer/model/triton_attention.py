"""BERT's self-attention over a short caption as one Triton kernel forward and one backward.

At batch 128 a caption is about 20 word pieces. On the math path each layer's attention is two
batched products of 20×64 tiles, a softmax, dropout's random numbers and three layout copies
forward, twice that backward: about 15 kernels that each move a few megabytes, about 1 ms of the
12-layer step on an H200 (benchmarks/RESULTS.md, session 9). Here one program holds one
caption's head: q, k and v are read where the fused query-key-value product left them, the
scores stay in registers, dropout's mask comes from a Philox stream keyed by a per-call seed
(the backward recomputes it instead of storing it), and the result is written in the (caption,
word, hidden) layout the output product reads. The backward writes the gradient in the
query-key-value product's layout, so no copy sits between it and that product's backward.

The kernels run on CUDA tensors, or on any tensor under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests run them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# One program keeps a caption's (BLOCK, BLOCK) scores and (BLOCK, head size) tiles in registers.
# BERT-base's 32×64 tiles made the H200 step 4% faster; the same kernels on 128×128 tiles (the
# graph's 85 nodes, 128 per head) made it 31% slower (benchmarks/RESULTS.md, session 10), so
# longer captions and wider heads take the math path.
MAX_TILE = 64 * 64


def applies(qkv: Tensor, heads: int) -> bool:
    """Whether :func:`self_attention` runs on this (B, T, 3·hidden) product."""
    head_dim = qkv.shape[-1] // (3 * heads)
    return ((qkv.is_cuda or interpreting()) and block_size(qkv.shape[1]) * head_dim <= MAX_TILE
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and qkv.dtype in (torch.float32, torch.float16, torch.bfloat16))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def self_attention(qkv: Tensor, key_bias: Tensor, heads: int, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√d + key_bias)·v for every head, as (B, T, hidden).

    ``qkv`` is (B, T, 3·hidden): query, key and value side by side, each split into ``heads``
    heads (the layout of :class:`~trainer.model.bert.FusedBertLayer`'s product). ``key_bias``
    is (B, T), added to every query's scores against that key (0 or a large negative).
    Dropout with probability ``dropout_p`` applies to the attention weights.
    """
    # A device tensor, drawn by PyTorch's generator: a replayed CUDA graph draws a new one each time.
    seed = torch.randint(2**31 - 1, (1,), device=qkv.device) if dropout_p > 0 else None
    key_bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
    out, _ = _ops().attention(qkv, key_bias, seed, heads, float(dropout_p))
    return out


def block_size(words: int) -> int:
    # tl.dot needs every dimension to be at least 16.
    return max(16, 1 << (words - 1).bit_length())


_OPS = None


def _ops():
    """The custom operators, defined on first use: importing Triton is slow and CUDA-only
    machines without it never get here."""
    global _OPS
    if _OPS is None:
        from . import _triton_attention_kernels as kernels

        _OPS = kernels.register()
    return _OPS
