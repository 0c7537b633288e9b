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

# Query rows per pass of the backward: its (rows, keys) score tiles and the key-side
# accumulators fit in registers together up to 128 keys at head size 128.
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
def _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, Tq, Tk, scale, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
            EXACT: tl.constexpr):
    """q·kᵀ·scale + bias for query ``rows`` against every key; keys ≥ Tk get -inf."""
    j = tl.arange(0, BK)
    s = _mm(q, tl.trans(k), EXACT) * scale
    if HAS_BIAS:
        ptr = bias + b * sb_b + h * sb_h + rows[:, None] * sb_i + j[None, :] * sb_j
        # Padding query rows read 0, not -inf: a row of -inf makes NaNs that reach real gradients.
        s += tl.load(ptr, mask=(rows < Tq)[:, None] & (j < Tk)[None, :], other=0.0).to(tl.float32)
    return tl.where((j < Tk)[None, :], s, float("-inf"))


@triton.jit
def _keep(seed_ptr, bh, rows, p_drop, BQ: tl.constexpr, BK: tl.constexpr):
    """Dropout's keep mask of query ``rows`` of one head: a Philox stream keyed by the call's seed."""
    j = tl.arange(0, BK)
    return tl.rand(tl.load(seed_ptr).to(tl.uint32), bh * BQ * BK + rows[:, None] * BK + j[None, :]) >= p_drop


@triton.jit
def _forward(q_src, kv_src, bias, seed_ptr, out, lse, Tq, Tk, s_qb, s_qt, s_kb, s_kt, q_col, k_col, v_col,
             sb_b, sb_h, sb_i, sb_j, s_ob, s_ot, scale, p_drop, H: tl.constexpr, D: tl.constexpr,
             BQ: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
             EXACT: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BQ)
    keys = tl.arange(0, BK)
    q = _load_rows(q_src, b, q_col + h * D, s_qb, s_qt, rows, Tq, D)
    k = _load_rows(kv_src, b, k_col + h * D, s_kb, s_kt, keys, Tk, D)
    v = _load_rows(kv_src, b, v_col + h * D, s_kb, s_kt, keys, Tk, D)
    s = _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, Tq, Tk, scale, BK, HAS_BIAS, EXACT)
    m = tl.max(s, 1)
    e = tl.exp(s - m[:, None])
    total = tl.sum(e, 1)
    tl.store(lse + bh * BQ + rows, m + tl.log(total))
    p = e / total[:, None]
    if DROPOUT:
        p = tl.where(_keep(seed_ptr, bh, rows, p_drop, BQ, BK), p / (1.0 - p_drop), 0.0)
    _store_rows(out, _mm(p.to(v.dtype), v, EXACT), b, h * D, s_ob, s_ot, rows, Tq, D)


@triton.jit
def _backward(q_src, kv_src, bias, seed_ptr, lse, dout, dq_dst, dkv_dst, dbias, Tq, Tk, s_qb, s_qt, s_kb, s_kt,
              q_col, k_col, v_col, sb_b, sb_h, sb_i, sb_j, s_db, s_dt, s_gqb, s_gqt, s_gkb, s_gkt, scale, p_drop,
              H: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr,
              HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, EXACT: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """Gradients in the sources' layouts (same columns); dbias, if asked, is (B, H, Tq, Tk) contiguous."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    keys = tl.arange(0, BK)
    k = _load_rows(kv_src, b, k_col + h * D, s_kb, s_kt, keys, Tk, D)
    v = _load_rows(kv_src, b, v_col + h * D, s_kb, s_kt, keys, Tk, D)
    dk = tl.zeros((BK, D), dtype=tl.float32)
    dv = tl.zeros((BK, D), dtype=tl.float32)
    for start in tl.static_range(0, BQ, ROWS):
        rows = start + tl.arange(0, ROWS)
        q = _load_rows(q_src, b, q_col + h * D, s_qb, s_qt, rows, Tq, D)
        # The output gradient in the output's layout: head h is columns h·D..(h+1)·D.
        do = _load_rows(dout, b, h * D, s_db, s_dt, rows, Tq, D)
        s = _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, Tq, Tk, scale, BK, HAS_BIAS, EXACT)
        p = tl.exp(s - tl.load(lse + bh * BQ + rows)[:, None])
        dp = _mm(do, tl.trans(v), EXACT)
        if DROPOUT:
            keep = _keep(seed_ptr, bh, rows, p_drop, BQ, BK)
            dropped = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            dropped = p
        dv += _mm(tl.trans(dropped.to(do.dtype)), do, EXACT)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        if BIAS_GRAD:
            ptr = dbias + (bh * Tq + rows[:, None]) * Tk + keys[None, :]
            tl.store(ptr, ds.to(dbias.dtype.element_ty), mask=(rows < Tq)[:, None] & (keys < Tk)[None, :])
        ds = (ds * scale).to(q.dtype)
        _store_rows(dq_dst, _mm(ds, k, EXACT), b, q_col + h * D, s_gqb, s_gqt, rows, Tq, D)
        dk += _mm(tl.trans(ds), q, EXACT)
    _store_rows(dkv_dst, dk, b, k_col + h * D, s_gkb, s_gkt, keys, Tk, D)
    _store_rows(dkv_dst, dv, b, v_col + h * D, s_gkb, s_gkt, keys, Tk, D)


def _bias_strides(bias: Tensor | None) -> list[int]:
    if bias is None:
        return [0, 0, 0, 0]
    # A size-1 dimension broadcasts: stride 0 reads its one entry for every index.
    return [0 if n == 1 else s for n, s in zip(bias.shape, bias.stride())]


def _layout(q: Tensor, kv: Tensor | None, heads: int, dropout_p: float, bias: Tensor | None) -> dict:
    """Launch arguments shared by both kernels. ``kv`` None: ``q`` is a (B, T, 3·hidden) product."""
    hidden = q.shape[-1] // 3 if kv is None else q.shape[-1]
    kv_src = q if kv is None else kv
    D, bq, bk = hidden // heads, block_size(q.shape[1]), block_size(kv_src.shape[1])
    return dict(grid=(q.shape[0] * heads,), kv_src=kv_src, hidden=hidden, Tq=q.shape[1], Tk=kv_src.shape[1],
                cols=(0, hidden, 2 * hidden) if kv is None else (0, 0, hidden),
                meta=dict(H=heads, D=D, BQ=bq, BK=bk, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0,
                          EXACT=q.dtype == torch.float32, num_warps=8 if max(bq, bk) * D >= 128 * 64 else 4))


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::short_attention", mutates_args=())
    def attention(q: Tensor, kv: Tensor | None, bias: Tensor | None, seed: Tensor | None, heads: int,
                  dropout_p: float) -> tuple[Tensor, Tensor]:
        a = _layout(q, kv, heads, dropout_p, bias)
        out = q.new_empty(q.shape[0], a["Tq"], a["hidden"])
        lse = torch.empty(a["grid"][0], a["meta"]["BQ"], device=q.device, dtype=torch.float32)
        kv_src = a["kv_src"]
        wrap_triton(_forward)[a["grid"]](
            q, kv_src, q if bias is None else bias, q if seed is None else seed, out, lse, a["Tq"], a["Tk"],
            q.stride(0), q.stride(1), kv_src.stride(0), kv_src.stride(1), *a["cols"], *_bias_strides(bias),
            out.stride(0), out.stride(1), a["meta"]["D"] ** -0.5, dropout_p, **a["meta"])
        return out, lse

    @triton_op("rgfusion::short_attention_backward", mutates_args=())
    def backward_op(grad: Tensor, q: Tensor, kv: Tensor | None, bias: Tensor | None, seed: Tensor | None,
                    lse: Tensor, heads: int, dropout_p: float, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        a = _layout(q, kv, heads, dropout_p, bias)
        kv_src = a["kv_src"]
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        # Self-attention: one gradient, in the query-key-value product's layout.
        dkv = dq if kv is None else torch.empty(kv.shape, device=kv.device, dtype=kv.dtype)
        dbias = q.new_empty((grad.shape[0], heads, a["Tq"], a["Tk"]) if bias_grad else (0,),
                            dtype=q.dtype if bias is None else bias.dtype)
        wrap_triton(_backward)[a["grid"]](
            q, kv_src, q if bias is None else bias, q if seed is None else seed, lse, grad, dq, dkv, dbias,
            a["Tq"], a["Tk"], q.stride(0), q.stride(1), kv_src.stride(0), kv_src.stride(1), *a["cols"],
            *_bias_strides(bias), grad.stride(0), grad.stride(1), dq.stride(0), dq.stride(1), dkv.stride(0),
            dkv.stride(1), a["meta"]["D"] ** -0.5, dropout_p, ROWS=min(BACKWARD_ROWS, a["meta"]["BQ"]),
            BIAS_GRAD=bias_grad, **a["meta"])
        return dq, dkv if kv is not None else dq.new_empty(0), dbias

    def setup_context(ctx, inputs, output) -> None:
        q, kv, bias, seed, heads, dropout_p = inputs
        ctx.save_for_backward(q, kv, bias, seed, output[1])
        ctx.heads, ctx.dropout_p = heads, dropout_p

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
        q, kv, bias, seed, lse = ctx.saved_tensors
        # Only the last dimension must be contiguous: the kernel reads rows at any stride.
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        bias_grad = ctx.needs_input_grad[2]
        dq, dkv, dbias = backward_op(grad_out, q, kv, bias, seed, lse, ctx.heads, ctx.dropout_p, bias_grad)
        return (dq, dkv if kv is not None else None, dbias.sum_to_size(bias.shape) if bias_grad else None,
                None, None, None)

    register_autograd(attention, backward, setup_context=setup_context)
    return SimpleNamespace(attention=attention, backward=backward_op)
