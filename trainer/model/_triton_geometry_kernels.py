"""The Triton kernels behind :mod:`trainer.model.edge_bias` and their custom operators.

Imported on first use only: it imports Triton. One program takes one node ``i`` of one image and
all its edges ``j``: it computes their relative geometry from the two boxes as
:func:`trainer.model.geometry.relative_geometry` does, the MLP's hidden layer in registers, and
writes the bias of every head. The backward recomputes the same and writes each program's share
of the four weight gradients; PyTorch sums the shares (no atomics: the sum is deterministic).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

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
def _column(w, k, f, HID, F: tl.constexpr):
    """Column ``f`` of the (HID, F) first-layer weight, as float32; padded rows are zero."""
    return tl.load(w + k * F + f, mask=k < HID, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _pre_activation(w1, b1, k, dx, dy, dw, dh, iou, HID, F: tl.constexpr):
    """(J, HID_P) first layer before its ReLU, for hidden units ``k``."""
    pre = tl.load(b1 + k, mask=k < HID, other=0.0).to(tl.float32)[None, :]
    pre += dx[:, None] * _column(w1, k, 0, HID, F) + dy[:, None] * _column(w1, k, 1, HID, F)
    pre += dw[:, None] * _column(w1, k, 2, HID, F) + dh[:, None] * _column(w1, k, 3, HID, F)
    return pre + iou[:, None] * _column(w1, k, 4, HID, F)


@triton.jit
def _forward(boxes, adj, w1, b1, w2, b2, out, N, HID, fill, H: tl.constexpr, J: tl.constexpr,
             HID_P: tl.constexpr, F: tl.constexpr, MIN: tl.constexpr):
    # The indices are made here, not returned by a helper: torch's analysis of which tensors a
    # kernel writes takes every tensor a helper was given as written when a stored-to address
    # depends on that helper's result, and would take the weights (leaves) as written.
    pid = tl.program_id(0)
    b, i, j, k = pid // N, pid % N, tl.arange(0, J), tl.arange(0, HID_P)
    real, dx, dy, dw, dh, iou = _features(boxes, b, i, j, N, MIN)
    pre = _pre_activation(w1, b1, k, dx, dy, dw, dh, iou, HID, F)
    hidden = tl.maximum(pre, 0.0)
    edge = tl.load(adj + pid * N + j, mask=real, other=0) != 0
    for h in tl.static_range(H):
        w2h = tl.load(w2 + h * HID + k, mask=k < HID, other=0.0).to(tl.float32)
        value = tl.sum(hidden * w2h[None, :], 1) + tl.load(b2 + h).to(tl.float32)
        value = tl.where(edge, value, tl.cast(fill, tl.float32))
        tl.store(out + ((b * H + h) * N + i) * N + j, value.to(out.dtype.element_ty), mask=real)


@triton.jit
def _backward(boxes, adj, w1, b1, w2, grad, shares, N, HID, H: tl.constexpr, J: tl.constexpr,
              HID_P: tl.constexpr, F: tl.constexpr, MIN: tl.constexpr):
    """This program's shares of the gradients, one row of ``shares``: the first-layer weight
    by input feature (F × HID_P), its bias (HID_P), the second-layer weight (H × HID_P), its bias (H)."""
    pid = tl.program_id(0)
    b, i, j, k = pid // N, pid % N, tl.arange(0, J), tl.arange(0, HID_P)  # here: see _forward
    real, dx, dy, dw, dh, iou = _features(boxes, b, i, j, N, MIN)
    pre = _pre_activation(w1, b1, k, dx, dy, dw, dh, iou, HID, F)
    hidden = tl.maximum(pre, 0.0)
    # A non-edge holds the fill, not the MLP's output: no gradient flows there.
    edge = (tl.load(adj + pid * N + j, mask=real, other=0) != 0) & real
    share = shares + pid * ((F + 1 + H) * HID_P + H)
    d_hidden = tl.zeros((J, HID_P), tl.float32)
    for h in tl.static_range(H):
        g = tl.load(grad + ((b * H + h) * N + i) * N + j, mask=edge, other=0.0).to(tl.float32)
        tl.store(share + (F + 1 + h) * HID_P + k, tl.sum(g[:, None] * hidden, 0))
        tl.store(share + (F + 1 + H) * HID_P + h, tl.sum(g, 0))
        d_hidden += g[:, None] * tl.load(w2 + h * HID + k, mask=k < HID, other=0.0).to(tl.float32)[None, :]
    d_pre = tl.where(pre > 0, d_hidden, 0.0)
    tl.store(share + k, tl.sum(d_pre * dx[:, None], 0))
    tl.store(share + HID_P + k, tl.sum(d_pre * dy[:, None], 0))
    tl.store(share + 2 * HID_P + k, tl.sum(d_pre * dw[:, None], 0))
    tl.store(share + 3 * HID_P + k, tl.sum(d_pre * dh[:, None], 0))
    tl.store(share + 4 * HID_P + k, tl.sum(d_pre * iou[:, None], 0))
    tl.store(share + F * HID_P + k, tl.sum(d_pre, 0))


def _meta(boxes: Tensor, w1: Tensor, w2: Tensor) -> dict:
    n = boxes.shape[1]
    return dict(H=w2.shape[0], J=max(16, triton.next_power_of_2(n)), HID_P=max(16, triton.next_power_of_2(w1.shape[0])),
                F=GEOMETRY_DIM, MIN=MIN_SIZE, num_warps=4)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::geometry_bias", mutates_args=())
    def bias_op(boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                dtype: torch.dtype) -> Tensor:
        batch, n = boxes.shape[:2]
        out = torch.empty(batch, w2.shape[0], n, n, device=boxes.device, dtype=dtype)
        wrap_triton(_forward)[(batch * n,)](boxes, adj, w1, b1, w2, b2, out, n, w1.shape[0],
                                            torch.finfo(dtype).min, **_meta(boxes, w1, w2))
        return out

    @triton_op("rgfusion::geometry_bias_backward", mutates_args=())
    def backward_op(grad: Tensor, boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor) -> Tensor:
        """The four weight gradients in float32, laid end to end as one row of ``_backward``'s shares."""
        batch, n = boxes.shape[:2]
        meta = _meta(boxes, w1, w2)
        heads, hp = w2.shape[0], meta["HID_P"]
        shares = torch.empty(batch * n, (meta["F"] + 1 + heads) * hp + heads, device=boxes.device,
                             dtype=torch.float32)
        wrap_triton(_backward)[(batch * n,)](boxes, adj, w1, b1, w2, grad, shares, n, w1.shape[0], **meta)
        return shares.sum(0)

    def setup_context(ctx, inputs, output) -> None:
        boxes, adj, w1, b1, w2, b2, _dtype = inputs
        ctx.save_for_backward(boxes, adj, w1, b1, w2)
        ctx.dtypes = [t.dtype for t in (w1, b1, w2, b2)]

    def backward(ctx, grad: Tensor):
        boxes, adj, w1, b1, w2 = ctx.saved_tensors
        total = backward_op(grad.contiguous(), boxes, adj, w1, b1, w2)
        (hid, f), heads = w1.shape, w2.shape[0]
        hp = _meta(boxes, w1, w2)["HID_P"]
        dw1, db1, dw2, db2 = total.split([f * hp, hp, heads * hp, heads])
        grads = dw1.view(f, hp)[:, :hid].t(), db1[:hid], dw2.view(heads, hp)[:, :hid], db2
        return None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None

    register_autograd(bias_op, backward, setup_context=setup_context)
    return SimpleNamespace(bias=bias_op, backward=backward_op)
