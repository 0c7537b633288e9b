"""The joint graph's attention bias: an MLP of each edge's relative geometry, one value per head.

On the math path the bias is the MLP (5 → hidden → heads) applied to ``relative_geometry``'s
(B, N, N, 5) features, laid heads-first and filled with the dtype's minimum where there is no
edge. At batch 128 that is 925,000 edges through two products padded from 5 and 8 columns, a
ReLU, a layout copy and a masked fill forward, twice as many kernels backward: about 0.85 ms of
an H200 step's kernel time for 0.02% of its FLOPs (benchmarks/RESULTS.md, session 12). With
``triton`` one kernel computes the features from the boxes, the MLP in registers and the masked
bias in its final layout; one more gives the MLP's weight gradients
(model/_triton_geometry_kernels.py). Edge features are then float32 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import triton_attention
from .attention import Attention
from .geometry import relative_geometry


def edge_bias(mlp: nn.Sequential, boxes: Tensor, adj: Tensor, dtype: torch.dtype, impl: Attention,
              geometry: Tensor | None = None) -> Tensor:
    """(B, heads, N, N) bias of node boxes (B, N, 4) through ``mlp`` (Linear, ReLU, Linear), in
    ``dtype``; ``finfo(dtype).min`` where ``adj`` (B, N, N) has no edge. ``geometry``: the boxes'
    ``relative_geometry`` if already computed (the math path reads it; the kernels derive it)."""
    first, _, last = mlp
    if fused(impl, boxes):
        return ops().bias(boxes.float().contiguous(), adj.contiguous(), first.weight, first.bias, last.weight,
                          last.bias, dtype)
    geometry = relative_geometry(boxes) if geometry is None else geometry
    bias = mlp(geometry.to(dtype)).permute(0, 3, 1, 2)
    return bias.masked_fill(~adj[:, None], torch.finfo(bias.dtype).min)


def fused(impl: Attention, boxes: Tensor) -> bool:
    """Whether ``edge_bias`` runs the kernels for these boxes."""
    return impl == "triton" and triton_attention.runs_on(boxes)


ops = triton_attention.LazyOps("._triton_geometry_kernels")
