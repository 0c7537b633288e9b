"""Self-attention over a short set (a caption's words, the joint graph's nodes) as one Triton
kernel forward and one backward.

At batch 128 a caption is about 20 word pieces. On the math path each of BERT's layers spends
two batched products of 20×64 tiles, a softmax, dropout's random numbers and three layout copies
forward, twice that backward: about 15 kernels that each move a few megabytes, 85 µs a layer on
an H200 (benchmarks/RESULTS.md, session 9). Here one program holds one set's head: q, k and v
are read where the fused query-key-value product left them, the scores stay in registers,
dropout's mask comes from a Philox stream keyed by a per-call seed (the backward recomputes it
instead of storing it), and the result is written in the (set, element, hidden) layout the
output product reads. The backward writes the gradient in the query-key-value product's layout,
so no copy sits between it and that product's backward, and, where the bias needs one (the
graph's geometry bias), the bias's gradient.

The kernels run on CUDA tensors, or on any tensor under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests run them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# One program keeps a set's (BLOCK, BLOCK) scores and (BLOCK, head size) key-side tiles in
# registers: longer sets and wider heads take the math path.
MAX_ELEMENTS = 128
MAX_HEAD = 128


def applies(qkv: Tensor, heads: int) -> bool:
    """Whether :func:`self_attention` can run on this (B, T, 3·hidden) product."""
    head = qkv.shape[-1] // (3 * heads)
    return ((qkv.is_cuda or interpreting()) and qkv.shape[1] <= MAX_ELEMENTS and 16 <= head <= MAX_HEAD
            and head & (head - 1) == 0 and qkv.dtype in (torch.float32, torch.float16, torch.bfloat16))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def self_attention(qkv: Tensor, bias: Tensor, heads: int, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v for every head, as (B, T, hidden).

    ``qkv`` is (B, T, 3·hidden): query, key and value side by side, each split into ``heads``
    heads (the layout of a fused query-key-value product). ``bias`` is (B, 1 or heads, 1 or T,
    T), added to the scores; it gets a gradient if it requires one. Dropout with probability
    ``dropout_p`` applies to the attention weights.
    """
    # A device tensor, drawn by PyTorch's generator: a replayed CUDA graph draws a new one each time.
    seed = torch.randint(2**31 - 1, (1,), device=qkv.device) if dropout_p > 0 else None
    out, _ = _ops().attention(qkv, bias, seed, heads, float(dropout_p))
    return out


def block_size(elements: int) -> int:
    # tl.dot needs every dimension to be at least 16.
    return max(16, 1 << (elements - 1).bit_length())


_OPS = None


def _ops():
    """The custom operators, defined on first use: importing Triton is slow, and a machine
    without it runs the kernels nowhere."""
    global _OPS
    if _OPS is None:
        from . import _triton_attention_kernels as kernels

        _OPS = kernels.register()
    return _OPS
