"""The Triton kernels behind :mod:`trainer.model.ffn` and their custom operators.

Imported on first use only: it imports Triton. Both kernels are one tiled matrix product
(``_product``) with the GELU in its epilogue, where the tile is still in registers:

- ``_up_forward``: ``pre = x·w1ᵀ + b1`` and ``act = gelu(pre)``, both written by the product's
  program, so no kernel reads ``pre`` back to apply the GELU.
- ``_up_backward``: ``d_pre = (dy·w2) ⊙ gelu'(pre)``, the product that gives the activation's
  gradient finishing it into the pre-activation's, plus each row block's column sums of
  ``d_pre`` as its share of ``b1``'s gradient (PyTorch sums the shares: deterministic, and no
  reduction kernel reads ``d_pre`` again).

The other products (the down projection, the weight and input gradients) stay cuBLAS's.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

# Globals a kernel reads must be constexprs for Triton's compiler (its interpreter takes any).
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(h):
    """Exact (erf) GELU, as ``nn.GELU()``."""
    return 0.5 * h * (1.0 + tl.erf(h * SQRT_HALF))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.erf(h * SQRT_HALF)) + h * tl.exp(-0.5 * h * h) * INV_SQRT_2PI


@triton.jit
def _blocks(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row and column block.

    GROUP_M row blocks take the column blocks in turn, so the weight tiles they share are read
    from L2 rather than memory."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _product(a, b, rows, cols, M, N, K, s_am, s_ak, s_bk, s_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    """The (rows, cols) tile of a·b in float32, a (M, K) and b (K, N) at their strides; K is a
    multiple of BLOCK_K. Rows and columns past the end wrap onto real ones, so the loads need no
    mask; their results are never stored."""
    k = tl.arange(0, BLOCK_K)
    a_ptr = a + (rows % M)[:, None] * s_am + k[None, :] * s_ak
    b_ptr = b + k[:, None] * s_bk + (cols % N)[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _k in range(0, K, BLOCK_K):
        if EXACT:
            acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr), acc)
        a_ptr += BLOCK_K * s_ak
        b_ptr += BLOCK_K * s_bk
    return acc


@triton.jit
def _up_forward(x, w, bias, pre, act, M, N, K, s_xm, s_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXACT: tl.constexpr):
    """pre = x·wᵀ + bias and act = gelu(pre), (M, N) row-major; x (M, K) and w (N, K) are
    contiguous along K. The GELU reads ``pre`` rounded, as the backward will."""
    block_m, block_n = _blocks(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, cols = block_m * BLOCK_M + tl.arange(0, BLOCK_M), block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _product(x, w, rows, cols, M, N, K, s_xm, 1, 1, s_wn, BLOCK_M, BLOCK_N, BLOCK_K, EXACT)
    h = (acc + tl.load(bias + cols % N).to(tl.float32)).to(pre.dtype.element_ty)
    offsets = rows[:, None] * N + cols[None, :]
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(pre + offsets, h, mask=inside)
    tl.store(act + offsets, _gelu(h.to(tl.float32)).to(act.dtype.element_ty), mask=inside)


@triton.jit
def _up_backward(grad, w, pre, d_pre, shares, M, N, K, s_gm, s_wk, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EXACT: tl.constexpr):
    """d_pre = (grad·w) ⊙ gelu'(pre), (M, N) row-major, grad (M, K) and w (K, N) contiguous along
    their last dims; and in row ``block_m`` of ``shares`` this row block's column sums of d_pre
    as rounded, which b1's gradient sums, as cuBLAS's path would."""
    block_m, block_n = _blocks(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, cols = block_m * BLOCK_M + tl.arange(0, BLOCK_M), block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _product(grad, w, rows, cols, M, N, K, s_gm, 1, s_wk, 1, BLOCK_M, BLOCK_N, BLOCK_K, EXACT)
    offsets = rows[:, None] * N + cols[None, :]
    inside = (rows < M)[:, None] & (cols < N)[None, :]
    h = tl.load(pre + offsets, mask=inside, other=0.0).to(tl.float32)
    d = (acc * _gelu_grad(h)).to(d_pre.dtype.element_ty)
    tl.store(d_pre + offsets, d, mask=inside)
    tl.store(shares + block_m * N + cols, tl.sum(tl.where(inside, d.to(tl.float32), 0.0), 0), mask=cols < N)


def tiles(m: int, n: int, k: int) -> dict:
    """Compile-time arguments for an (m, k)·(k, n) product."""
    block_k = next(b for b in (64, 32, 16) if k % b == 0)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _grid(m: int, n: int, k: int, meta: dict) -> tuple[int]:
    if k % meta["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={meta['BLOCK_K']} does not divide the product's depth {k}")
    return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def up_forward(x: Tensor, w1: Tensor, b1: Tensor, meta: dict | None = None, launch=None) -> tuple[Tensor, Tensor]:
    """(pre, act) of ``_up_forward``; ``meta`` overrides :func:`tiles` (benchmarks/ffn_bench.py
    sweeps it). ``launch`` wraps the kernel (``wrap_triton`` inside the custom operator)."""
    (m, k), n = x.shape, w1.shape[0]
    meta = {**tiles(m, n, k), **(meta or {})}
    pre, act = x.new_empty(m, n), x.new_empty(m, n)
    kernel = launch(_up_forward) if launch else _up_forward
    kernel[_grid(m, n, k, meta)](x, w1, b1, pre, act, m, n, k, x.stride(0), w1.stride(0),
                              EXACT=x.dtype == torch.float32, **meta)
    return pre, act


def up_backward(grad: Tensor, w2: Tensor, pre: Tensor, meta: dict | None = None, launch=None) -> tuple[Tensor, Tensor]:
    """(d_pre, b1's gradient in float32) of ``_up_backward``; ``meta`` and ``launch`` as in
    :func:`up_forward`."""
    (m, k), n = grad.shape, pre.shape[1]
    meta = {**tiles(m, n, k), **(meta or {})}
    d_pre = torch.empty_like(pre)
    shares = torch.empty(triton.cdiv(m, meta["BLOCK_M"]), n, device=grad.device, dtype=torch.float32)
    kernel = launch(_up_backward) if launch else _up_backward
    kernel[_grid(m, n, k, meta)](grad, w2, pre, d_pre, shares, m, n, k, grad.stride(0), w2.stride(0),
                              EXACT=grad.dtype == torch.float32, **meta)
    return d_pre, shares.sum(0)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::gelu_feed_forward", mutates_args=())
    def ffn(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """down(gelu(up(x))) of (M, K) rows, and the pre-activation and activation it saves."""
        pre, act = up_forward(x, w1, b1, launch=wrap_triton)
        return torch.addmm(b2, act, w2.t()), pre, act

    @triton_op("rgfusion::gelu_feed_forward_backward", mutates_args=())
    def backward_op(grad: Tensor, w2: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
        return up_backward(grad, w2, pre, launch=wrap_triton)

    def setup_context(ctx, inputs, output) -> None:
        x, w1, _, w2, _ = inputs
        _, pre, act = output
        ctx.save_for_backward(x, w1, w2, pre, act)

    def backward(ctx, grad: Tensor, _grad_pre: Tensor | None, _grad_act: Tensor | None):
        x, w1, w2, pre, act = ctx.saved_tensors
        grad = grad.contiguous()
        d_pre, d_b1 = backward_op(grad, w2, pre)
        return d_pre @ w1, d_pre.t() @ x, d_b1.to(w1.dtype), grad.t() @ act, grad.sum(0)

    register_autograd(ffn, backward, setup_context=setup_context)
    return SimpleNamespace(ffn=ffn, backward=backward_op)
