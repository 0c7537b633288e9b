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


@triton.jit
def _load_head(qkv, b, h, part, s_b, s_t, T, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Rows 0..BLOCK of head ``h``'s query (part 0), key (1) or value (2); rows ≥ T are zero."""
    i = tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ptr = qkv + b * s_b + i[:, None] * s_t + (part * H + h) * D + d[None, :]
    return tl.load(ptr, mask=(i < T)[:, None], other=0.0)


@triton.jit
def _head_qkv(qkv, b, h, s_b, s_t, T, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Query, key and value rows of the program's head."""
    return (_load_head(qkv, b, h, 0, s_b, s_t, T, H, D, BLOCK), _load_head(qkv, b, h, 1, s_b, s_t, T, H, D, BLOCK),
            _load_head(qkv, b, h, 2, s_b, s_t, T, H, D, BLOCK))


@triton.jit
def _mm(a, b, EXACT: tl.constexpr):
    """a·b; float32 inputs multiply in full float32, not TF32."""
    if EXACT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _store_head(dqkv, value, b, h, part, s_b, s_t, T, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    ptr = dqkv + b * s_b + i[:, None] * s_t + (part * H + h) * D + d[None, :]
    tl.store(ptr, value.to(dqkv.dtype.element_ty), mask=(i < T)[:, None])


@triton.jit
def _probabilities(q, k, bias, lse, bh, b, s_bias, T, scale, FROM_LSE: tl.constexpr,
                   BLOCK: tl.constexpr, EXACT: tl.constexpr):
    """Softmax of one head's scores; with FROM_LSE the row normalisers stored by the forward."""
    i = tl.arange(0, BLOCK)
    s = _mm(q, tl.trans(k), EXACT)
    key_bias = tl.load(bias + b * s_bias + i, mask=i < T, other=float("-inf")).to(tl.float32)
    s = s * scale + key_bias[None, :]
    if FROM_LSE:
        p = tl.exp(s - tl.load(lse + bh * BLOCK + i)[:, None])
    else:
        m = tl.max(s, 1)
        e = tl.exp(s - m[:, None])
        total = tl.sum(e, 1)
        p = e / total[:, None]
        tl.store(lse + bh * BLOCK + i, m + tl.log(total))
    return p


@triton.jit
def _keep(seed_ptr, bh, p_drop, BLOCK: tl.constexpr):
    """Dropout's keep mask of one head: a Philox stream keyed by the call's seed, one number per score."""
    i = tl.arange(0, BLOCK)
    offsets = bh * BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :]
    return tl.rand(tl.load(seed_ptr).to(tl.uint32), offsets) >= p_drop


@triton.jit
def _forward(qkv, bias, seed_ptr, out, lse, T, s_qb, s_qt, s_bias, s_ob, s_ot, scale, p_drop,
             H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr,
             EXACT: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    q, k, v = _head_qkv(qkv, b, h, s_qb, s_qt, T, H, D, BLOCK)
    p = _probabilities(q, k, bias, lse, bh, b, s_bias, T, scale, False, BLOCK, EXACT)
    if DROPOUT:
        p = tl.where(_keep(seed_ptr, bh, p_drop, BLOCK), p / (1.0 - p_drop), 0.0)
    # The output is (B, T, H·D): head h is columns h·D..(h+1)·D, as "part 0" of H heads.
    _store_head(out, _mm(p.to(v.dtype), v, EXACT), b, h, 0, s_ob, s_ot, T, H, D, BLOCK)


@triton.jit
def _backward(qkv, bias, seed_ptr, lse, dout, dqkv, T, s_qb, s_qt, s_bias, s_db, s_dt, s_gb, s_gt, scale, p_drop,
              H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DROPOUT: tl.constexpr,
              EXACT: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    q, k, v = _head_qkv(qkv, b, h, s_qb, s_qt, T, H, D, BLOCK)
    # The output gradient in the output's layout: one head is columns h·D..(h+1)·D.
    do = _load_head(dout, b, h, 0, s_db, s_dt, T, H, D, BLOCK)
    p = _probabilities(q, k, bias, lse, bh, b, s_bias, T, scale, True, BLOCK, EXACT)
    dp = _mm(do, tl.trans(v), EXACT)
    if DROPOUT:
        keep = _keep(seed_ptr, bh, p_drop, BLOCK)
        dropped = tl.where(keep, p / (1.0 - p_drop), 0.0)
        dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
    else:
        dropped = p
    dv = _mm(tl.trans(dropped.to(do.dtype)), do, EXACT)
    ds = (p * (dp - tl.sum(p * dp, 1)[:, None]) * scale).to(q.dtype)
    dq = _mm(ds, k, EXACT)
    dk = _mm(tl.trans(ds), q, EXACT)
    _store_head(dqkv, dq, b, h, 0, s_gb, s_gt, T, H, D, BLOCK)
    _store_head(dqkv, dk, b, h, 1, s_gb, s_gt, T, H, D, BLOCK)
    _store_head(dqkv, dv, b, h, 2, s_gb, s_gt, T, H, D, BLOCK)


def _meta(qkv: Tensor, heads: int, dropout_p: float) -> dict:
    """Compile-time arguments shared by both kernels."""
    block = block_size(qkv.shape[1])
    return dict(H=heads, D=qkv.shape[-1] // (3 * heads), BLOCK=block, DROPOUT=dropout_p > 0,
                EXACT=qkv.dtype == torch.float32, num_warps=8 if block > 64 else 4)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::short_self_attention", mutates_args=())
    def attention(qkv: Tensor, key_bias: Tensor, seed: Tensor | None, heads: int,
                  dropout_p: float) -> tuple[Tensor, Tensor]:
        meta = _meta(qkv, heads, dropout_p)
        B, T, width = qkv.shape
        out = qkv.new_empty(B, T, width // 3)
        lse = torch.empty(B * heads, meta["BLOCK"], device=qkv.device, dtype=torch.float32)
        wrap_triton(_forward)[(B * heads,)](
            qkv, key_bias, qkv if seed is None else seed, out, lse, T, qkv.stride(0), qkv.stride(1),
            key_bias.stride(0), out.stride(0), out.stride(1), meta["D"] ** -0.5, dropout_p, **meta)
        return out, lse

    @triton_op("rgfusion::short_self_attention_backward", mutates_args=())
    def backward_op(grad: Tensor, qkv: Tensor, key_bias: Tensor, seed: Tensor | None, lse: Tensor, heads: int,
                    dropout_p: float) -> Tensor:
        meta = _meta(qkv, heads, dropout_p)
        B, T, _ = qkv.shape
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        wrap_triton(_backward)[(B * heads,)](
            qkv, key_bias, qkv if seed is None else seed, lse, grad, dqkv, T, qkv.stride(0), qkv.stride(1),
            key_bias.stride(0), grad.stride(0), grad.stride(1), dqkv.stride(0), dqkv.stride(1), meta["D"] ** -0.5,
            dropout_p, **meta)
        return dqkv

    def setup_context(ctx, inputs, output) -> None:
        qkv, key_bias, seed, heads, dropout_p = inputs
        ctx.save_for_backward(qkv, key_bias, seed, output[1])
        ctx.heads, ctx.dropout_p = heads, dropout_p

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
        qkv, key_bias, seed, lse = ctx.saved_tensors
        # Only the last dimension must be contiguous: the kernel reads rows at any stride.
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dqkv = backward_op(grad_out, qkv, key_bias, seed, lse, ctx.heads, ctx.dropout_p)
        return dqkv, None, None, None, None

    register_autograd(attention, backward, setup_context=setup_context)
    return SimpleNamespace(attention=attention, backward=backward_op)
