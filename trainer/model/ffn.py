"""The GELU feed-forward block, ``down(gelu(up(x)))``, of the graph layers and of FusedBert.

The GELU is a pointwise kernel between two products: forward it reads the up projection's
output and writes the activation, backward it reads the activation's gradient and the
pre-activation and writes the pre-activation's gradient, then a reduction reads that again for
the bias gradient. At batch 128 that is 10,880 graph nodes × 4,096 columns per layer, and the
H200 step spent about 1.3 ms of kernel time in these GELU kernels (benchmarks/RESULTS.md,
session 12). With ``triton`` the up projection's product applies the GELU in its epilogue, and
the backward's product ``dy·w2`` applies the GELU's derivative and sums the bias gradient in
its own (model/_triton_ffn_kernels.py). The kernels take bfloat16 or float16 rows on a GPU;
float32 ones, multiplied exactly, only under Triton's interpreter (the CPU tests): on a GPU
cuBLAS's float32 products are the faster ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_attention
from .attention import Attention


def feed_forward(x: Tensor, up: nn.Linear, down: nn.Linear, impl: Attention) -> Tensor:
    """``down(gelu(up(x)))`` over the last dim of ``x``; ``impl`` as ``ModelConfig.attention``."""
    if impl == "triton" and applies(x, up, down):
        y, _, _ = ops().ffn(x.reshape(-1, x.shape[-1]).contiguous(), up.weight, up.bias, down.weight, down.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return down(F.gelu(up(x)))


def applies(x: Tensor, up: nn.Linear, down: nn.Linear) -> bool:
    """Whether the kernels take ``x`` through these projections."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    exact = x.dtype == torch.float32 and triton_attention.interpreting()
    return ((half or exact) and triton_attention.runs_on(x) and up.bias is not None and down.bias is not None
            and all(p.dtype == x.dtype for p in (up.weight, up.bias, down.weight, down.bias))
            and x.shape[-1] % 16 == 0 and up.weight.stride(-1) == 1 and down.weight.stride(-1) == 1)


_OPS = None


def ops():
    """The custom operators, defined on first use, as ``triton_attention.ops`` says."""
    global _OPS
    if _OPS is None:
        from . import _triton_ffn_kernels as kernels

        _OPS = kernels.register()
    return _OPS
