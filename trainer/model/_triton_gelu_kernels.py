"""The Triton kernels behind :mod:`trainer.model.ffn` and their custom operators.

Imported on first use only: it imports Triton. A program takes one (BLOCK_M, BLOCK_N) tile of
the up projection's output ``h`` (without its bias). The forward writes ``gelu(h + b)``. The
backward writes the pre-activation's gradient and, as row ``pid_m`` of ``shares``, that tile's
column sums of it: PyTorch sums the shares into the bias gradient (deterministic, no atomics),
so nothing reads the gradient again for the bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

# Globals a kernel reads must be constexprs for Triton's compiler (its interpreter takes any).
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _pre_activation(h, bias, rows, cols, M, N):
    """h + bias over the tile, in float32 after rounding to h's dtype, as PyTorch's addmm
    would have written it; and which of the tile's elements exist."""
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(h + rows[:, None] * N + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    x += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)
    return x.to(h.dtype.element_ty).to(tl.float32), inside


@triton.jit
def _forward(h, bias, act, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """act = gelu(h + bias), exact (erf) GELU as ``nn.GELU()``; all (M, N) row-major."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x, inside = _pre_activation(h, bias, rows, cols, M, N)
    y = 0.5 * x * (1.0 + tl.erf(x * SQRT_HALF))
    tl.store(act + rows[:, None] * N + cols[None, :], y.to(act.dtype.element_ty), mask=inside)


@triton.jit
def _backward(grad, h, bias, d_pre, shares, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d_pre = grad ⊙ gelu'(h + bias), and this tile's column sums of d_pre as rounded (what
    a bias-gradient reduction over d_pre would sum) into ``shares`` row ``program_id(0)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x, inside = _pre_activation(h, bias, rows, cols, M, N)
    offsets = rows[:, None] * N + cols[None, :]
    g = tl.load(grad + offsets, mask=inside, other=0.0).to(tl.float32)
    slope = 0.5 * (1.0 + tl.erf(x * SQRT_HALF)) + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    d = (g * slope).to(d_pre.dtype.element_ty)
    tl.store(d_pre + offsets, d, mask=inside)
    tl.store(shares + tl.program_id(0) * N + cols, tl.sum(d.to(tl.float32), 0), mask=cols < N)


@dataclass
class Launch:
    """Tile and warps of both kernels; benchmarks/ffn_bench.py --tiles sweeps them at the step's shapes.
    64 rows: 170 shares of the bias gradient for the graph's 10,880 nodes, each a 4,096-float row."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4

    def grid(self, h: Tensor) -> tuple[int, int]:
        return triton.cdiv(h.shape[0], self.block_m), triton.cdiv(h.shape[1], self.block_n)

    @property
    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps)


LAUNCH = Launch()


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::bias_gelu", mutates_args=())
    def bias_gelu(h: Tensor, bias: Tensor) -> Tensor:
        act = torch.empty_like(h)
        wrap_triton(_forward)[LAUNCH.grid(h)](h, bias, act, h.shape[0], h.shape[1], **LAUNCH.meta)
        return act

    @triton_op("rgfusion::bias_gelu_backward", mutates_args=())
    def backward_op(grad: Tensor, h: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-activation's gradient, and the bias's in float32."""
        d_pre = torch.empty_like(h)
        shares = torch.empty(LAUNCH.grid(h)[0], h.shape[1], device=h.device, dtype=torch.float32)
        wrap_triton(_backward)[LAUNCH.grid(h)](grad, h, bias, d_pre, shares, h.shape[0], h.shape[1], **LAUNCH.meta)
        return d_pre, shares.sum(0)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad: Tensor):
        h, bias = ctx.saved_tensors
        d_pre, d_bias = backward_op(grad.contiguous(), h, bias)
        return d_pre, d_bias.to(bias.dtype)

    register_autograd(bias_gelu, backward, setup_context=setup_context)
    return SimpleNamespace(bias_gelu=bias_gelu, backward=backward_op)
