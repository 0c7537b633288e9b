"""The Triton kernels behind :mod:`trainer.model.edge_bias` and their custom operators.

Imported on first use only: it imports Triton. A program takes ROWS nodes of one image. For each
node ``i`` it computes the relative geometry of all its edges ``j`` from the two boxes, as
:func:`trainer.model.geometry.relative_geometry` does, then every graph layer's MLP at once, as
two small products in registers (the layers' first weights side by side, their second weights
block-diagonal), and writes every layer's and head's bias, each layer's into a tensor of its own
(one stacked tensor, unbound, had its gradient stacked back by a 30 MB copy in the step,
session 17). The features, the boxes and the
adjacency are read once for all layers: with one kernel per layer the two layers' bias kernels
took 0.70 ms of an H200 step, each bound by its loop's latency, not its work (session 16). The
backward recomputes the same and accumulates the
weight gradients as products over the edges, then writes them once as the program's share;
PyTorch sums the shares (no atomics, so the sum is deterministic). A first version took one node
per program and reduced each gradient across its threads: its backward took 560 µs per layer on
an H200 (benchmarks/RESULTS.md, session 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton_attention_kernels import _mm
from .edge_bias import MAX_LAYERS
from .geometry import GEOMETRY_DIM, MIN_SIZE


@triton.jit
def _box(boxes, index, mask):
    """x1, y1, x2, y2 of the boxes at ``index`` (a scalar or a vector)."""
    ptr = boxes + index * 4
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + 1, mask=mask, other=0.0),
            tl.load(ptr + 2, mask=mask, other=0.0), tl.load(ptr + 3, mask=mask, other=0.0))


@triton.jit
def _targets(boxes, b, j, N, MIN: tl.constexpr):
    """What an edge's features take from its target node, for nodes ``j``: whether each exists,
    its box, centre, log width and height, and area. The same for every source node, so a
    program loads and computes them once, not in each step of its loop."""
    real = j < N
    x1, y1, x2, y2 = _box(boxes, b * N + j, real)
    return (real, x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, tl.log(tl.maximum(x2 - x1, MIN)),
            tl.log(tl.maximum(y2 - y1, MIN)), tl.maximum(x2 - x1, 0.0) * tl.maximum(y2 - y1, 0.0))


@triton.jit
def _inputs(boxes, b, i, N, real, x1j, y1j, x2j, y2j, cxj, cyj, lwj, lhj, area_j, c, MIN: tl.constexpr):
    """(J, P) first-layer inputs of node ``i``'s edges to the ``_targets``: the five features of j
    seen from i in columns 0-4, a 1 in column 5 (the first layer's bias), zeros after."""
    x1i, y1i, x2i, y2i = _box(boxes, b * N + i, True)
    dx = cxj - (x1i + x2i) / 2
    dy = cyj - (y1i + y2i) / 2
    dw = lwj - tl.log(tl.maximum(x2i - x1i, MIN))
    dh = lhj - tl.log(tl.maximum(y2i - y1i, MIN))
    inter = (tl.maximum(tl.minimum(x2i, x2j) - tl.maximum(x1i, x1j), 0.0)
             * tl.maximum(tl.minimum(y2i, y2j) - tl.maximum(y1i, y1j), 0.0))
    area_i = tl.maximum(x2i - x1i, 0.0) * tl.maximum(y2i - y1i, 0.0)
    iou = inter / tl.maximum(area_i + area_j - inter, MIN * MIN)
    x = tl.where(c == 0, dx[:, None], tl.where(c == 1, dy[:, None], tl.where(c == 2, dw[:, None], 0.0)))
    x = tl.where(c == 3, dh[:, None], tl.where(c == 4, iou[:, None], tl.where(c == 5, 1.0, x)))
    return tl.where(real[:, None], x, 0.0)


@triton.jit
def _first_layers(w1, b1, r, k, L, HID, P: tl.constexpr, F: tl.constexpr):
    """(P, K) first-layer weights of every layer as x·W: row f < F is input feature f, row F the
    bias; column k is hidden unit k % P of layer k // P."""
    layer, unit = k // P, k % P
    ok = (layer < L) & (unit < HID)
    w = tl.load(w1 + (layer * HID + unit) * F + r, mask=(r < F) & ok, other=0.0).to(tl.float32)
    return tl.where(r == F, tl.load(b1 + layer * HID + unit, mask=ok, other=0.0).to(tl.float32), w)


@triton.jit
def _second_layers(w2, k, o, L, HID, H: tl.constexpr, P: tl.constexpr):
    """(K, O) second-layer weights of every layer, block-diagonal: hidden unit k of layer k // P to
    head o % H of layer o // H."""
    layer, unit = k // P, k % P
    ok = (layer == o // H) & (layer < L) & (unit < HID)
    return tl.load(w2 + (layer * H + o % H) * HID + unit, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _bias_offsets(o, b, i, j, N, H: tl.constexpr):
    """Offsets of node ``i``'s row in a layer's bias, (B, H, N, N), as a (J, O) block: column o is
    head o % H (of layer o // H). Offsets, not addresses: see ``_forward``."""
    return ((b * H + o[None, :] % H) * N + i) * N + j[:, None]


@triton.jit
def _forward(boxes, adj, w1, b1, w2, b2, out0, out1, out2, out3, N, HID, fill, L: tl.constexpr, H: tl.constexpr,
             J: tl.constexpr, P: tl.constexpr, K: tl.constexpr, O: tl.constexpr, F: tl.constexpr,
             ROWS: tl.constexpr, MIN: tl.constexpr, EXACT: tl.constexpr):
    """ROWS nodes of one image: each one's bias over all its edges, every head of every layer, in
    two small products; layer l's into ``out{l}`` (L ≤ MAX_LAYERS)."""
    # Index vectors are made here, and a helper gives offsets, never addresses: torch's analysis
    # of which tensors a kernel writes takes every tensor a helper was given as written when a
    # stored-to address depends on that helper's result, and would take the weights (leaves) as written.
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, ROWS)
    b, first = pid // blocks, pid % blocks * ROWS
    j = tl.arange(0, J)
    c, k, o = tl.arange(0, P)[None, :], tl.arange(0, K), tl.arange(0, O)
    weight1 = _first_layers(w1, b1, tl.arange(0, P)[:, None], k[None, :], L, HID, P, F)
    weight2 = _second_layers(w2, k[:, None], o[None, :], L, HID, H, P)
    bias2 = tl.load(b2 + o, mask=o < L * H, other=0.0).to(tl.float32)[None, :]
    real, x1j, y1j, x2j, y2j, cxj, cyj, lwj, lhj, area_j = _targets(boxes, b, j, N, MIN)
    for i in range(first, tl.minimum(first + ROWS, N)):
        x = _inputs(boxes, b, i, N, real, x1j, y1j, x2j, y2j, cxj, cyj, lwj, lhj, area_j, c, MIN)
        hidden = tl.maximum(_mm(x, weight1, EXACT), 0.0)
        value = _mm(hidden, weight2, EXACT) + bias2
        edge = tl.load(adj + (b * N + i) * N + j, mask=real, other=0) != 0
        value = tl.where(edge[:, None], value, tl.cast(fill, tl.float32)).to(out0.dtype.element_ty)
        at = _bias_offsets(o, b, i, j, N, H)
        # One store: each column's address in its layer's bias.
        column = o[None, :] // H
        ptrs = out0 + at
        if L > 1:
            ptrs = tl.where(column == 1, out1 + at, ptrs)
        if L > 2:
            ptrs = tl.where(column == 2, out2 + at, ptrs)
        if L > 3:
            ptrs = tl.where(column == 3, out3 + at, ptrs)
        tl.store(ptrs, value, mask=real[:, None] & (column < L))


@triton.jit
def _backward(boxes, adj, w1, b1, w2, grad0, grad1, grad2, grad3, shares, N, HID, L: tl.constexpr,
              H: tl.constexpr, J: tl.constexpr, P: tl.constexpr, K: tl.constexpr, O: tl.constexpr,
              F: tl.constexpr, ROWS: tl.constexpr, MIN: tl.constexpr, EXACT: tl.constexpr):
    """ROWS nodes of one image: their share of every layer's gradients, one row of ``shares``: the
    first layers' weights and biases as ``_first_layers`` lays them out (P × K), the second layers'
    weights as ``_second_layers`` does (K × O), their biases (O). Layer l's bias gradient is
    ``grad{l}``."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, ROWS)
    b, first = pid // blocks, pid % blocks * ROWS
    j = tl.arange(0, J)  # here: see _forward
    c, k, o = tl.arange(0, P)[None, :], tl.arange(0, K), tl.arange(0, O)
    weight1 = _first_layers(w1, b1, tl.arange(0, P)[:, None], k[None, :], L, HID, P, F)
    weight2_t = _second_layers(w2, k[None, :], o[:, None], L, HID, H, P)  # (O, K)
    d_weight1 = tl.zeros((P, K), tl.float32)
    d_weight2 = tl.zeros((K, O), tl.float32)
    d_bias2 = tl.zeros((O,), tl.float32)
    real, x1j, y1j, x2j, y2j, cxj, cyj, lwj, lhj, area_j = _targets(boxes, b, j, N, MIN)
    for i in range(first, tl.minimum(first + ROWS, N)):
        x = _inputs(boxes, b, i, N, real, x1j, y1j, x2j, y2j, cxj, cyj, lwj, lhj, area_j, c, MIN)
        pre = _mm(x, weight1, EXACT)
        # A non-edge holds the fill, not the MLP's output: no gradient flows there.
        edge = (tl.load(adj + (b * N + i) * N + j, mask=real, other=0) != 0) & real
        at = _bias_offsets(o, b, i, j, N, H)
        # One load: each column's address in its layer's gradient. The same select as _forward's
        # store, not shared: a helper given all four slots would have torch's write analysis take
        # the unused ones as written there (tests/test_triton_writes.py).
        column = o[None, :] // H
        ptrs = tl.where(column == 1, grad1 + at, grad0 + at)
        if L > 2:
            ptrs = tl.where(column == 2, grad2 + at, ptrs)
        if L > 3:
            ptrs = tl.where(column == 3, grad3 + at, ptrs)
        g = tl.load(ptrs, mask=edge[:, None] & (column < L), other=0.0).to(tl.float32)
        d_weight2 += _mm(tl.trans(tl.maximum(pre, 0.0)), g, EXACT)
        d_bias2 += tl.sum(g, 0)
        d_pre = tl.where(pre > 0, _mm(g, weight2_t, EXACT), 0.0)
        d_weight1 += _mm(tl.trans(x), d_pre, EXACT)
    share = shares + pid * (P * K + K * O + O)
    tl.store(share + tl.arange(0, P)[:, None] * K + k[None, :], d_weight1)
    tl.store(share + P * K + k[:, None] * O + o[None, :], d_weight2)
    tl.store(share + P * K + K * O + o, d_bias2)


@dataclass
class Launch:
    """Nodes per program (enough to amortise loading the weights and, backward, writing a share of
    the gradients), warps and pipeline stages of one kernel; benchmarks/geometry_bench.py sweeps them."""

    rows: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Alone on an H200 at the step's shape (benchmarks/RESULTS.md, session 18): forward 66.8 µs
# against 98.9 for 8 rows on 4 warps in 3 stages, which both kernels took before; backward 176.4
# against 264.5. At 2 warps the backward holds 251 registers a thread, without spills; with float32
# biases (full-precision products) it spills 1,768 bytes, against 688 at 4 warps (neither timed).
LAUNCH = {"forward": Launch(rows=16, num_warps=4, num_stages=1),
          "backward": Launch(rows=8, num_warps=2, num_stages=1)}


def _meta(boxes: Tensor, w1: Tensor, w2: Tensor, dtype: torch.dtype, kernel: str) -> dict:
    """Compile-time arguments of stacked weights ``w1`` (L, hidden, 5) and ``w2`` (L, heads,
    hidden). A bias in float32 takes float32 products; in 16 bits, TF32 ones on tensor cores:
    float32 ones spilled in the one-layer backward at sm_90, where TF32 ones took 166 registers
    (164 for two layers with the local Triton 3.9, no spills: benchmarks/kernel_resources.py)."""
    layers, hidden, heads, n = w1.shape[0], w1.shape[1], w2.shape[1], boxes.shape[1]
    p = max(16, triton.next_power_of_2(max(hidden, GEOMETRY_DIM + 1)))
    return dict(L=layers, H=heads, J=max(16, triton.next_power_of_2(n)), P=p, K=triton.next_power_of_2(layers * p),
                O=max(16, triton.next_power_of_2(layers * heads)), F=GEOMETRY_DIM, ROWS=LAUNCH[kernel].rows,
                MIN=MIN_SIZE, EXACT=dtype == torch.float32, num_warps=LAUNCH[kernel].num_warps,
                num_stages=LAUNCH[kernel].num_stages)


def _programs(boxes: Tensor, kernel: str) -> int:
    return boxes.shape[0] * triton.cdiv(boxes.shape[1], LAUNCH[kernel].rows)


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::geometry_bias", mutates_args=())
    def bias_op(boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                dtype: torch.dtype) -> list[Tensor]:
        """Every layer's bias (B, heads, N, N) from the layers' stacked weights (at most MAX_LAYERS)."""
        batch, n = boxes.shape[:2]
        outs = [torch.empty(batch, w2.shape[1], n, n, device=boxes.device, dtype=dtype) for _ in range(w1.shape[0])]
        wrap_triton(_forward)[(_programs(boxes, "forward"),)](
            boxes, adj, w1, b1, w2, b2, *_slots(outs), n, w1.shape[1], torch.finfo(dtype).min,
            **_meta(boxes, w1, w2, dtype, "forward"))
        return outs

    @triton_op("rgfusion::geometry_bias_backward", mutates_args=())
    def backward_op(grads: list[Tensor], boxes: Tensor, adj: Tensor, w1: Tensor, b1: Tensor, w2: Tensor) -> Tensor:
        """The weight gradients in float32, summed over the programs' shares (see ``_backward``)."""
        meta = _meta(boxes, w1, w2, grads[0].dtype, "backward")
        p, k, o = meta["P"], meta["K"], meta["O"]
        programs = _programs(boxes, "backward")
        shares = torch.empty(programs, p * k + k * o + o, device=boxes.device, dtype=torch.float32)
        wrap_triton(_backward)[(programs,)](boxes, adj, w1, b1, w2, *_slots(grads), shares, boxes.shape[1],
                                            w1.shape[1], **meta)
        return shares.sum(0)

    def setup_context(ctx, inputs, output) -> None:
        boxes, adj, w1, b1, w2, b2, _dtype = inputs
        ctx.save_for_backward(boxes, adj, w1, b1, w2)
        ctx.dtypes = [t.dtype for t in (w1, b1, w2, b2)]

    def backward(ctx, grads: list[Tensor | None]):
        boxes, adj, w1, b1, w2 = ctx.saved_tensors
        like = next(g for g in grads if g is not None)
        # A layer whose bias took no part in the loss gets none.
        grads = [torch.zeros_like(like) if g is None else g.contiguous() for g in grads]
        total = backward_op(grads, boxes, adj, w1, b1, w2)
        weights = _unpack(total, w1, w2, _meta(boxes, w1, w2, like.dtype, "backward"))
        return None, None, *(g.to(dtype) for g, dtype in zip(weights, ctx.dtypes)), None

    register_autograd(bias_op, backward, setup_context=setup_context)
    return SimpleNamespace(bias=bias_op, backward=backward_op)


def _slots(tensors: list[Tensor]) -> list[Tensor]:
    """One tensor per layer slot of the kernels; the slots past the layers repeat the first (never read or written)."""
    if not 1 <= len(tensors) <= MAX_LAYERS:
        raise ValueError(f"the geometry kernels take 1 to {MAX_LAYERS} layers per call, not {len(tensors)}")
    return tensors + tensors[:1] * (MAX_LAYERS - len(tensors))


def _unpack(total: Tensor, w1: Tensor, w2: Tensor, meta: dict) -> tuple[Tensor, ...]:
    """The summed shares as the stacked weights' gradients: (L, hidden, 5), (L, hidden),
    (L, heads, hidden), (L, heads)."""
    (layers, hid, f), heads = w1.shape, w2.shape[1]
    p, k, o = meta["P"], meta["K"], meta["O"]
    first, second, bias2 = total.split([p * k, k * o, o])
    # Column l·P + u of the first block is unit u of layer l; the second block is block-diagonal.
    first = first.view(p, k)[:, : layers * p].view(p, layers, p)[:, :, :hid]  # (feature row, layer, unit)
    second = second.view(k, o)[: layers * p, : layers * heads].view(layers, p, layers, heads)
    second = torch.stack([second[l, :hid, l] for l in range(layers)])  # (layer, unit, head)
    return (first[:f].permute(1, 2, 0), first[f], second.transpose(1, 2),
            bias2[: layers * heads].view(layers, heads))
