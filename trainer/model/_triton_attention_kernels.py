"""The Triton kernels behind :mod:`trainer.model.triton_attention` and their custom operators.

Imported on first use only: it imports Triton. The operators are ``torch.library.triton_op``s,
so torch.compile sees the kernels themselves instead of breaking the graph around them.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_attention import block_size

# Query rows per pass of the backward: its (rows, BLOCK) score tiles and the key-side
# accumulators fit in registers together up to BLOCK 128 at head size 128.
BACKWARD_ROWS = 32


@triton.jit
def _load_rows(ptr, b, col, s_b, s_t, rows, T, D: tl.constexpr):
    """(len(rows), D) block at column ``col`` of batch entry ``b``; rows ≥ T are zero."""
    d = tl.arange(0, D)
    return tl.load(ptr + b * s_b + rows[:, None] * s_t + col + d[None, :], mask=(rows < T)[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, value, b, col, s_b, s_t, rows, T, D: tl.constexpr):
    d = tl.arange(0, D)
    tl.store(ptr + b * s_b + rows[:, None] * s_t + col + d[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows < T)[:, None])


@triton.jit
def _mm(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, T, scale, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    """q·kᵀ·scale + bias for query ``rows`` against every key; keys ≥ T get -inf."""
    j = tl.arange(0, BLOCK)
    ptr = bias + b * sb_b + h * sb_h + rows[:, None] * sb_i + j[None, :] * sb_j
    # Padding query rows read 0, not -inf: a row of -inf would make NaNs that reach real gradients.
    add = tl.load(ptr, mask=(rows < T)[:, None] & (j < T)[None, :], other=0.0).to(tl.float32)
    add = tl.where((j < T)[None, :], add, float("-inf"))
    return _mm(q, tl.trans(k), EXACT) * scale + add


@triton.jit
def _keep(seed_ptr, bh, rows, p_drop, BLOCK: tl.constexpr):
    """Dropout's keep mask of query ``rows`` of one head: a Philox stream keyed by the call's seed."""
    j = tl.arange(0, BLOCK)
    return tl.rand(tl.load(seed_ptr).to(tl.uint32), bh * BLOCK * BLOCK + rows[:, None] * BLOCK + j[None, :]) >= p_drop


@triton.jit
def _forward(qkv, bias, seed_ptr, out, lse, T, s_qb, s_qt, sb_b, sb_h, sb_i, sb_j, s_ob, s_ot, scale, p_drop,
             H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr, EXACT: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK)
    q = _load_rows(qkv, b, h * D, s_qb, s_qt, rows, T, D)
    k = _load_rows(qkv, b, (H + h) * D, s_qb, s_qt, rows, T, D)
    v = _load_rows(qkv, b, (2 * H + h) * D, s_qb, s_qt, rows, T, D)
    s = _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, T, scale, BLOCK, EXACT)
    m = tl.max(s, 1)
    e = tl.exp(s - m[:, None])
    total = tl.sum(e, 1)
    tl.store(lse + bh * BLOCK + rows, m + tl.log(total))
    p = e / total[:, None]
    if DROPOUT:
        p = tl.where(_keep(seed_ptr, bh, rows, p_drop, BLOCK), p / (1.0 - p_drop), 0.0)
    _store_rows(out, _mm(p.to(v.dtype), v, EXACT), b, h * D, s_ob, s_ot, rows, T, D)


@triton.jit
def _backward(qkv, bias, seed_ptr, lse, dout, dqkv, dbias, T, s_qb, s_qt, sb_b, sb_h, sb_i, sb_j, s_db, s_dt,
              s_gb, s_gt, scale, p_drop, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
              ROWS: tl.constexpr, DROPOUT: tl.constexpr, EXACT: tl.constexpr, BIAS_GRAD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    keys = tl.arange(0, BLOCK)
    k = _load_rows(qkv, b, (H + h) * D, s_qb, s_qt, keys, T, D)
    v = _load_rows(qkv, b, (2 * H + h) * D, s_qb, s_qt, keys, T, D)
    dk = tl.zeros((BLOCK, D), dtype=tl.float32)
    dv = tl.zeros((BLOCK, D), dtype=tl.float32)
    for start in tl.static_range(0, BLOCK, ROWS):
        rows = start + tl.arange(0, ROWS)
        q = _load_rows(qkv, b, h * D, s_qb, s_qt, rows, T, D)
        # The output gradient in the output's layout: head h is columns h·D..(h+1)·D.
        do = _load_rows(dout, b, h * D, s_db, s_dt, rows, T, D)
        s = _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, T, scale, BLOCK, EXACT)
        p = tl.exp(s - tl.load(lse + bh * BLOCK + rows)[:, None])
        dp = _mm(do, tl.trans(v), EXACT)
        if DROPOUT:
            keep = _keep(seed_ptr, bh, rows, p_drop, BLOCK)
            dropped = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            dropped = p
        dv += _mm(tl.trans(dropped.to(do.dtype)), do, EXACT)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        if BIAS_GRAD:  # dbias is (B, H, T, T), contiguous
            ptr = dbias + (bh * T + rows[:, None]) * T + keys[None, :]
            tl.store(ptr, ds.to(dbias.dtype.element_ty), mask=(rows < T)[:, None] & (keys < T)[None, :])
        ds = (ds * scale).to(q.dtype)
        _store_rows(dqkv, _mm(ds, k, EXACT), b, h * D, s_gb, s_gt, rows, T, D)
        dk += _mm(tl.trans(ds), q, EXACT)
    _store_rows(dqkv, dk, b, (H + h) * D, s_gb, s_gt, keys, T, D)
    _store_rows(dqkv, dv, b, (2 * H + h) * D, s_gb, s_gt, keys, T, D)


def _bias_strides(bias: Tensor) -> list[int]:
    # A size-1 dimension broadcasts: stride 0 reads its one entry for every index.
    return [0 if n == 1 else s for n, s in zip(bias.shape, bias.stride())]


def _launch(qkv: Tensor, heads: int, dropout_p: float) -> dict:
    B, T, width = qkv.shape
    D, block = width // (3 * heads), block_size(T)
    return dict(grid=(B * heads,), H=heads, D=D, BLOCK=block, DROPOUT=dropout_p > 0,
                EXACT=qkv.dtype == torch.float32, num_warps=8 if block * D >= 128 * 64 else 4)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::short_self_attention", mutates_args=())
    def attention(qkv: Tensor, bias: Tensor, seed: Tensor | None, heads: int,
                  dropout_p: float) -> tuple[Tensor, Tensor]:
        a = _launch(qkv, heads, dropout_p)
        B, T, width = qkv.shape
        out = qkv.new_empty(B, T, width // 3)
        lse = torch.empty(B * heads, a["BLOCK"], device=qkv.device, dtype=torch.float32)
        wrap_triton(_forward)[a.pop("grid")](
            qkv, bias, qkv if seed is None else seed, out, lse, T, qkv.stride(0), qkv.stride(1),
            *_bias_strides(bias), out.stride(0), out.stride(1), a["D"] ** -0.5, dropout_p, **a)
        return out, lse

    @triton_op("rgfusion::short_self_attention_backward", mutates_args=())
    def backward_op(grad: Tensor, qkv: Tensor, bias: Tensor, seed: Tensor | None, lse: Tensor, heads: int,
                    dropout_p: float, bias_grad: bool) -> tuple[Tensor, Tensor]:
        a = _launch(qkv, heads, dropout_p)
        B, T, _ = qkv.shape
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        dbias = torch.empty((B, heads, T, T) if bias_grad else (0,), device=qkv.device, dtype=bias.dtype)
        wrap_triton(_backward)[a.pop("grid")](
            qkv, bias, qkv if seed is None else seed, lse, grad, dqkv, dbias, T, qkv.stride(0), qkv.stride(1),
            *_bias_strides(bias), grad.stride(0), grad.stride(1), dqkv.stride(0), dqkv.stride(1),
            a["D"] ** -0.5, dropout_p, ROWS=min(BACKWARD_ROWS, a["BLOCK"]), BIAS_GRAD=bias_grad, **a)
        return dqkv, dbias

    def setup_context(ctx, inputs, output) -> None:
        qkv, bias, seed, heads, dropout_p = inputs
        ctx.save_for_backward(qkv, bias, seed, output[1])
        ctx.heads, ctx.dropout_p = heads, dropout_p

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
        qkv, bias, seed, lse = ctx.saved_tensors
        # Only the last dimension must be contiguous: the kernel reads rows at any stride.
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        bias_grad = ctx.needs_input_grad[1]
        dqkv, dbias = backward_op(grad_out, qkv, bias, seed, lse, ctx.heads, ctx.dropout_p, bias_grad)
        return dqkv, dbias.sum_to_size(bias.shape) if bias_grad else None, None, None, None

    register_autograd(attention, backward, setup_context=setup_context)
    return SimpleNamespace(attention=attention, backward=backward_op)
