"""The GELU feed-forward block, ``down(gelu(up(x)))``, of the graph layers and of FusedBert.

Compiled, the GELU's backward took two kernels per block that both read the activation's
gradient and the pre-activation: a pointwise one writing the pre-activation's gradient, and the
bias gradient's reduction, which recomputed it (benchmarks/RESULTS.md, session 13; 182 + 38 µs
per graph layer in an H200 step). With ``triton`` the up projection's product leaves out the
bias, and one kernel adds it and applies the GELU forward; backward one kernel reads each input
once, writes the pre-activation's gradient and sums the bias gradient in shares
(model/_triton_gelu_kernels.py). The products stay cuBLAS's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import triton_attention
from .attention import Attention


def feed_forward(x: Tensor, up: nn.Linear, down: nn.Linear, impl: Attention) -> Tensor:
    """``down(gelu(up(x)))`` over the last dim of ``x``; ``impl`` as ``ModelConfig.attention``."""
    if impl == "triton" and triton_attention.runs_on(x) and up.bias is not None:
        h = F.linear(x, up.weight)
        act = ops().bias_gelu(h.reshape(-1, h.shape[-1]).contiguous(), up.bias)
        return down(act.view(h.shape))
    return down(F.gelu(up(x)))


ops = triton_attention.LazyOps("._triton_gelu_kernels")
