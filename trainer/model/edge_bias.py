"""The joint graph's attention bias: an MLP of each edge's relative geometry, one value per head.

On the math path the bias is the MLP (5 → hidden → heads) applied to ``relative_geometry``'s
(B, N, N, 5) features, laid heads-first and filled with the dtype's minimum where there is no
edge. At batch 128 that is 925,000 edges through two products padded from 5 and 8 columns, a
ReLU, a layout copy and a masked fill forward, twice as many kernels backward: about 0.85 ms of
an H200 step's kernel time for 0.02% of its FLOPs (benchmarks/RESULTS.md, session 12). With
``triton`` one kernel computes the features from the boxes, the MLP in registers and the masked
bias in its final layout, for every graph layer at once; one more gives the MLPs' weight
gradients (model/_triton_geometry_kernels.py). Edge features are then float32 throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import triton_attention
from .attention import Attention
from .geometry import relative_geometry


def edge_biases(mlps: Sequence[nn.Sequential], boxes: Tensor, adj: Tensor, dtype: torch.dtype,
                impl: Attention) -> list[Tensor]:
    """One (B, heads, N, N) bias per MLP (Linear, ReLU, Linear) of node boxes (B, N, 4), in
    ``dtype``; ``finfo(dtype).min`` where ``adj`` (B, N, N) has no edge. The edge features are
    computed once for all of them, and the kernels compute up to MAX_LAYERS of them in one pass."""
    if fused(impl, boxes):
        boxes, adj = boxes.float().contiguous(), adj.contiguous()
        biases = []
        for start in range(0, len(mlps), MAX_LAYERS):
            chunk = mlps[start:start + MAX_LAYERS]
            weights = [torch.stack([getattr(mlp[index], name) for mlp in chunk])
                       for index in (0, 2) for name in ("weight", "bias")]
            biases += ops().bias(boxes, adj, *weights, dtype)
        return biases
    geometry = relative_geometry(boxes).to(dtype)
    biases = []
    for mlp in mlps:
        bias = mlp(geometry).permute(0, 3, 1, 2)  # under autocast, not necessarily in ``dtype``
        biases.append(bias.masked_fill(~adj[:, None], torch.finfo(bias.dtype).min))
    return biases


def fused(impl: Attention, boxes: Tensor) -> bool:
    """Whether ``edge_biases`` runs the kernels for these boxes."""
    return impl == "triton" and triton_attention.runs_on(boxes)


ops = triton_attention.LazyOps("._triton_geometry_kernels")
# Layers per kernel call: the kernels take one output (and gradient) pointer per layer.
MAX_LAYERS = 4
