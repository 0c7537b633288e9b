"""The Triton kernels behind :mod:`trainer.model.edge_bias` and their custom operators.

Imported on first use only: it imports Triton. A program takes ROWS nodes of one image. For each
node ``i`` it computes the relative geometry of all its edges ``j`` from the two boxes, as
:func:`trainer.model.geometry.relative_geometry` does, then the MLP as two (edges × 16) products
in registers, and writes every head's bias. The backward recomputes the same and accumulates the
weight gradients as products over the edges, then writes them once as the program's share;
PyTorch sums the shares (no atomics, so the sum is deterministic). A first version took one node
per program and reduced each gradient across its threads: its backward took 560 µs per layer on
an H200 (benchmarks/RESULTS.md, session 12).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_attention_kernels import _mm
from .geometry import GEOMETRY_DIM, MIN_SIZE


@triton.jit
def _box(boxes, index, mask):
    """x1, y1, x2, y2 of the boxes at ``index`` (a scalar or a vector)."""
    ptr = boxes + index * 4
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + 1, mask=mask, other=0.0),
            tl.load(ptr + 2, mask=mask, other=0.0), tl.load(ptr + 3, mask=mask, other=0.0))


@triton.jit
def _features(boxes, b, i, j, N, MIN: tl.constexpr):
    """Of node ``i``'s edges to nodes ``j``: which exist, and the five features of j seen from i."""
    real = j < N
    x1i, y1i, x2i, y2i = _box(boxes, b * N + i, True)
    x1j, y1j, x2j, y2j = _box(boxes, b * N + j, real)
    dx = (x1j + x2j) / 2 - (x1i + x2i) / 2
    dy = (y1j + y2j) / 2 - (y1i + y2i) / 2
    dw = tl.log(tl.maximum(x2j - x1j, MIN)) - tl.log(tl.maximum(x2i - x1i, MIN))
    dh = tl.log(tl.maximum(y2j - y1j, MIN)) - tl.log(tl.maximum(y2i - y1i, MIN))
    inter = (tl.maximum(tl.minimum(x2i, x2j) - tl.maximum(x1i, x1j), 0.0)
             * tl.maximum(tl.minimum(y2i, y2j) - tl.maximum(y1i, y1j), 0.0))
    area_i = tl.maximum(x2i - x1i, 0.0) * tl.maximum(y2i - y1i, 0.0)
    area_j = tl.maximum(x2j - x1j, 0.0) * tl.maximum(y2j - y1j, 0.0)
    iou = inter / tl.maximum(area_i + area_j - inter, MIN * MIN)
    return real, dx, dy, dw, dh, iou


@triton.jit
def _inputs(boxes, b, i, j, c, N, MIN: tl.constexpr):
    """(J, P) first-layer inputs of node ``i``'s edges to nodes ``j``: the five features in columns
    0-4, a 1 in column 5 (the first layer's bias), zeros after; and which edges exist."""
    real, dx, dy, dw, dh, iou = _features(boxes, b, i, j, N, MIN)
    x = tl.where(c == 0, dx[:, None], tl.where(c == 1, dy[:, None], tl.where(c == 2, dw[:, None], 0.0)))
    x = tl.where(c == 3, dh[:, None], tl.where(c == 4, iou[:, None], tl.where(c == 5, 1.0, x)))
    return tl.where(real[:, None], x, 0.0), real


@triton.jit
def _first_layer(w1, b1, r, c, HID, F: tl.constexpr):
    """(P, P) first-layer weight as x·W: row f < F is input feature f, row F the bias; column k is
    hidden unit k."""
    w = tl.load(w1 + c * F + r, mask=(r < F) & (c < HID), other=0.0).to(tl.float32)
    return tl.where(r == F, tl.load(b1 + c, mask=c < HID, other=0.0).to(tl.float32), w)


@triton.jit
def _forward(boxes, adj, w1, b1, w2, b2, out, N, HID, fill, H: tl.constexpr, J: tl.constexpr,
             P: tl.constexpr, F: tl.constexpr, ROWS: tl.constexpr, MIN: tl.constexpr, EXACT: tl.constexpr):
    """ROWS nodes of one image: each one's bias over all its edges, every head, in two small products."""
    # Index vectors are made here, not returned by a helper: torch's analysis of which tensors a
    # kernel writes takes every tensor a helper was given as written when a stored-to address
    # depends on that helper's result, and would take the weights (leaves) as written.
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, ROWS)
    b, first = pid // blocks, pid % blocks * ROWS
    j, p = tl.arange(0, J), tl.arange(0, P)
    r, c = p[:, None], p[None, :]
    weight1 = _first_layer(w1, b1, r, c, HID, F)
    weight2 = tl.load(w2 + c * HID + r, mask=(r < HID) & (c < H), other=0.0).to(tl.float32)  # (k, h)
    bias2 = tl.load(b2 + p, mask=p < H, other=0.0).to(tl.float32)[None, :]
    for i in range(first, tl.minimum(first + ROWS, N)):
        x, real = _inputs(boxes, b, i, j, c, N, MIN)
        hidden = tl.maximum(_mm(x, weight1, EXACT), 0.0)
        value = _mm(hidden, weight2, EXACT) + bias2
        edge = tl.load(adj + (b * N + i) * N + j, mask=real, other=0) != 0
        value = tl.where(edge[:, None], value, tl.cast(fill, tl.float32))
        tl.store(out + ((b * H + c) * N + i) * N + j[:, None], value.to(out.dtype.element_ty),
                 mask=real[:, None] & (c < H))


@triton.jit
def _backward(boxes, adj, w1, b1, w2, grad, shares, N, HID, H: tl.constexpr, J: tl.constexpr,
              P: tl.constexpr, F: tl.constexpr, ROWS: tl.constexpr, MIN: tl.constexpr, EXACT: tl.constexpr):
    """ROWS nodes of one image: their share of the gradients, one row of ``shares``: the first
    layer's weight and bias as ``_first_layer`` lays them out (P × P), the second layer's weight
    by (hidden unit, head) (P × P), its bias (P)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, ROWS)
    b, first = pid // blocks, pid % blocks * ROWS
    j, p = tl.arange(0, J), tl.arange(0, P)  # here: see _forward
    r, c = p[:, None], p[None, :]
    weight1 = _first_layer(w1, b1, r, c, HID, F)
    weight2_t = tl.load(w2 + r * HID + c, mask=(r < H) & (c < HID), other=0.0).to(tl.float32)  # (h, k)
    d_weight1 = tl.zeros((P, P), tl.float32)
    d_weight2 = tl.zeros((P, P), tl.float32)
    d_bias2 = tl.zeros((P,), tl.float32)
    for i in range(first, tl.minimum(first + ROWS, N)):
        x, real = _inputs(boxes, b, i, j, c, N, MIN)
        pre = _mm(x, weight1, EXACT)
        # A non-edge holds the fill, not the MLP's output: no gradient flows there.
        edge = (tl.load(adj + (b * N + i) * N + j, mask=real, other=0) != 0) & real
        g = tl.load(grad + ((b * H + c) * N + i) * N + j[:, None], mask=edge[:, None] & (c < H),
                    other=0.0).to(tl.float32)
        d_weight2 += _mm(tl.trans(tl.maximum(pre, 0.0)), g, EXACT)
        d_bias2 += tl.sum(g, 0)
        d_pre = tl.where(pre > 0, _mm(g, weight2_t, EXACT), 0.0)
        d_weight1 += _mm(tl.trans(x), d_pre, EXACT)
    share = shares + pid * (2 * P * P + P) + r * P + c
    tl.store(share, d_weight1)
    tl.store(share + P * P, d_weight2)
    tl.store(shares + pid * (2 * P * P + P) + 2 * P * P + p, d_bias2)


# Nodes per program: enough to amortise loading the weights and writing a share of the gradients.
ROWS = 8


def _meta(boxes: Tensor, w1: Tensor, w2: Tensor, dtype: torch.dtype) -> dict:
    """Compile-time arguments. A bias in float32 takes float32 products; in 16 bits, TF32 ones on
    tensor cores, which need 166 registers for the backward at sm_90 where float32 ones spill."""
    n = boxes.shape[1]
    p = max(16, triton.next_power_of_2(max(w1.shape[0], w2.shape[0], GEOMETRY_DIM + 1)))
    return dict(H=w2.shape[0], J=max(16, triton.next_power_of_2(n)), P=p, F=GEOMETRY_DIM, ROWS=ROWS, MIN=MIN_SIZE,
                EXACT=dtype == torch.float32, num_warps=4)


def _programs(boxes: Tensor) -> int:
    return boxes.shape[0] * triton.cdiv(boxes.shape[1], ROWS)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::geometry_bias", mutates_args=())
    def bias_op(boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                dtype: torch.dtype) -> Tensor:
        batch, n = boxes.shape[:2]
        out = torch.empty(batch, w2.shape[0], n, n, device=boxes.device, dtype=dtype)
        wrap_triton(_forward)[(_programs(boxes),)](boxes, adj, w1, b1, w2, b2, out, n, w1.shape[0],
                                            torch.finfo(dtype).min, **_meta(boxes, w1, w2, dtype))
        return out

    @triton_op("rgfusion::geometry_bias_backward", mutates_args=())
    def backward_op(grad: Tensor, boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor) -> Tensor:
        """The four weight gradients in float32, summed over the programs' shares (see ``_backward``)."""
        meta = _meta(boxes, w1, w2, grad.dtype)
        p = meta["P"]
        shares = torch.empty(_programs(boxes), 2 * p * p + p, device=boxes.device, dtype=torch.float32)
        wrap_triton(_backward)[(_programs(boxes),)](boxes, adj, w1, b1, w2, grad, shares, boxes.shape[1], w1.shape[0],
                                                    **meta)
        return shares.sum(0)

    def setup_context(ctx, inputs, output) -> None:
        boxes, adj, w1, b1, w2, b2, _dtype = inputs
        ctx.save_for_backward(boxes, adj, w1, b1, w2)
        ctx.dtypes = [t.dtype for t in (w1, b1, w2, b2)]

    def backward(ctx, grad: Tensor):
        boxes, adj, w1, b1, w2 = ctx.saved_tensors
        total = backward_op(grad.contiguous(), boxes, adj, w1, b1, w2)
        (hid, f), heads = w1.shape, w2.shape[0]
        p = _meta(boxes, w1, w2, grad.dtype)["P"]
        first, second, bias2 = total.split([p * p, p * p, p])
        first, second = first.view(p, p), second.view(p, p)
        grads = first[:f, :hid].t(), first[f, :hid], second[:hid, :heads].t(), bias2[:heads]
        return None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None

    register_autograd(bias_op, backward, setup_context=setup_context)
    return SimpleNamespace(bias=bias_op, backward=backward_op)
