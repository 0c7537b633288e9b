"""The joint graph's geometry bias as Triton kernels (trainer/model/edge_bias.py) against the math
path in float64: the bias on every edge, the fill elsewhere, and the MLPs' weight gradients, for
one layer and for several computed at once. Without a GPU the kernels run in Triton's interpreter
(tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from rgfusion.trainer.model.edge_bias import edge_biases  # noqa: E402
from rgfusion.trainer.model.geometry import GEOMETRY_DIM  # noqa: E402

torch.set_num_threads(1)


def graph(b: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random node boxes, two of them degenerate (a padded region's zeros, a sliver), and a random
    adjacency with self loops."""
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(b, n, 2, generator=gen) * 0.7
    boxes = torch.cat([lo, lo + 0.02 + torch.rand(b, n, 2, generator=gen) * 0.3], dim=-1).clamp(0, 1)
    boxes[:, 0] = 0.0
    boxes[:, 1, 2] = boxes[:, 1, 0]
    adj = (torch.rand(b, n, n, generator=gen) < 0.6) | torch.eye(n, dtype=torch.bool)
    return boxes, adj


def mlp(hidden: int, heads: int, seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(GEOMETRY_DIM, hidden), nn.ReLU(), nn.Linear(hidden, heads))


def edge_bias(layer: nn.Sequential, boxes, adj, dtype, impl) -> torch.Tensor:
    return edge_biases([layer], boxes, adj, dtype, impl)[0]


@pytest.mark.parametrize("b,n,hidden,heads,layers", [(3, 11, 16, 8, 1), (2, 40, 12, 3, 1), (1, 85, 16, 8, 2),
                                                      (2, 13, 16, 8, 2), (2, 9, 12, 3, 3), (1, 9, 12, 3, 5)])
def test_bias_and_weight_gradients_equal_the_math_path(b, n, hidden, heads, layers):
    """Three layers: their hidden units and heads fill the kernels' padded blocks unevenly. Five:
    more than one call takes (four, then one)."""
    boxes, adj = graph(b, n)
    fused = [mlp(hidden, heads, seed) for seed in range(layers)]
    ref = [mlp(hidden, heads, seed).double() for seed in range(layers)]
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(b, heads, n, n, generator=gen) for _ in range(layers)]
    outs = edge_biases(fused, boxes, adj, torch.float32, "triton")
    expected = edge_biases(ref, boxes.double(), adj, torch.float64, "math")
    edges = adj[:, None].expand(b, heads, n, n)
    for out, want in zip(outs, expected, strict=True):
        torch.testing.assert_close(out[edges].double(), want[edges], atol=2e-5, rtol=2e-5)
        assert (out[~edges] == torch.finfo(torch.float32).min).all()
    sum((out * grad).sum() for out, grad in zip(outs, grads)).backward()
    sum((want * grad.double()).sum() for want, grad in zip(expected, grads)).backward()
    for layer, layer_ref in zip(fused, ref):
        for p, q in zip(layer.parameters(), layer_ref.parameters(), strict=True):
            assert p.grad.dtype == p.dtype
            torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-4, rtol=1e-4)


def test_a_layer_whose_bias_the_loss_leaves_out_gets_zero_gradients():
    boxes, adj = graph(2, 10)
    layers = [mlp(12, 3, seed) for seed in range(2)]
    outs = edge_biases(layers, boxes, adj, torch.float32, "triton")
    (outs[1].masked_fill(~adj[:, None], 0) ** 2).sum().backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layers[0].parameters())
    assert all(p.grad.abs().sum() > 0 for p in layers[1].parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_bias_is_the_float32_one_rounded(dtype):
    """Within one unit in the last place: Triton's interpreter truncates to bf16 where a GPU rounds."""
    boxes, adj = graph(2, 9)
    layer = mlp(16, 4)
    half = edge_bias(layer, boxes, adj, dtype, "triton")
    full = edge_bias(layer, boxes, adj, torch.float32, "triton")
    edges = adj[:, None].expand_as(half)
    assert half.dtype == dtype and (half[~edges] == torch.finfo(dtype).min).all()
    torch.testing.assert_close(half[edges].float(), full[edges], rtol=torch.finfo(dtype).eps, atol=1e-5)


def test_weights_in_bf16_get_bf16_gradients():
    boxes, adj = graph(2, 7)
    layer = copy.deepcopy(mlp(16, 8)).bfloat16()
    edge_bias(layer, boxes, adj, torch.bfloat16, "triton").float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in layer.parameters())
