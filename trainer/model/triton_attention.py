"""Attention over short sets (captions, the joint graph's nodes, CGF's two sets) as Triton kernels.

At batch 128 a caption is about 20 word pieces and the joint graph 85 nodes. On the math path
each attention is two batched products, a softmax, dropout's random numbers and layout copies
forward, twice that backward: many kernels that each move a few megabytes (benchmarks/RESULTS.md,
sessions 9 and 10). Here q, k and v are read where the projection left them, scores stay on chip,
dropout's mask comes from a Philox stream keyed by a per-call seed (the backward recomputes it
instead of storing it), and the result is written in the (batch, row, hidden) layout the output
product reads. The backward writes the gradients in the projections' layouts, so no copy sits
between them and those products' backward. A bias (BERT's key mask, the graph's geometry bias
per head) is read at its own strides; the graph's gets its gradient.

The kernels run on CUDA tensors, or on any tensor under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the CPU tests run them.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch
from torch import Tensor

# Head sizes the kernels take: a program keeps (block, head size) tiles in registers.
MAX_HEAD = 128


def applies(x: Tensor, head_dim: int) -> bool:
    """Whether the kernels run on projections like ``x`` with heads of ``head_dim``."""
    return (runs_on(x) and 16 <= head_dim <= MAX_HEAD and head_dim & (head_dim - 1) == 0
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))


def runs_on(x: Tensor) -> bool:
    """Whether Triton kernels can take ``x``: a CUDA tensor, or any tensor under the interpreter."""
    return x.is_cuda or interpreting()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def self_attention(qkv: Tensor, bias: Tensor | None, heads: int, dropout_p: float) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v for every head, as (B, T, hidden).

    ``qkv`` is (B, T, 3·hidden): query, key and value side by side, each split into ``heads``
    heads (the layout of one fused projection). ``bias`` broadcasts to (B, heads, T, T).
    Dropout with probability ``dropout_p`` applies to the attention weights.
    """
    return _call(qkv, None, bias, heads, dropout_p)


def cross_attention(q: Tensor, kv: Tensor, bias: Tensor | None, heads: int, dropout_p: float) -> Tensor:
    """:func:`self_attention` of queries ``q`` (B, Nq, hidden) over keys and values side by side
    in ``kv`` (B, Nk, 2·hidden); ``bias`` broadcasts to (B, heads, Nq, Nk)."""
    return _call(q, kv, bias, heads, dropout_p)


def _call(q: Tensor, kv: Tensor | None, bias: Tensor | None, heads: int, dropout_p: float) -> Tensor:
    # A device tensor, drawn by PyTorch's generator: a replayed CUDA graph draws a new one each time.
    seed = torch.randint(2**31 - 1, (1,), device=q.device) if dropout_p > 0 else None
    # The kernels read a head's columns as one contiguous run.
    q, kv = _unit_stride(q), None if kv is None else _unit_stride(kv)
    if bias is not None and bias.stride(-1) != 1 and bias.shape[-1] > 1:
        # A program reads rows of one head's bias: a heads-last one (a projection of every edge,
        # as the graph's math path makes) would be read at a stride of the head count, one
        # element per memory sector.
        bias = bias.contiguous()
    out, _ = ops().attention(q, kv, bias, seed, heads, float(dropout_p))
    return out


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def block_size(length: int, head_dim: int) -> int:
    """Rows per tile: tl.dot needs at least 16; a head of 128 keeps 32-row tiles to stay in registers."""
    return min(max(16, 1 << (length - 1).bit_length()), 64 if head_dim <= 64 else 32)


class LazyOps:
    """The custom operators of one kernels module, defined on first call: importing Triton is
    slow, and CUDA-only machines without it never get here. A model on these kernels defines them
    when it is built (``RetrievalModel``): dynamo cannot trace their definition, and a first call
    inside a compiled tower would split its graph there."""

    def __init__(self, module: str) -> None:
        self.module = module  # relative to this package
        self.ops: SimpleNamespace | None = None

    def __call__(self) -> SimpleNamespace:
        if self.ops is None:
            self.ops = importlib.import_module(self.module, __package__).register()
        return self.ops


ops = LazyOps("._triton_attention_kernels")
