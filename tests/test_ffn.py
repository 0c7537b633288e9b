"""The GELU feed-forward with its bias and GELU as Triton kernels (trainer/model/ffn.py) against
``down(gelu(up(x)))`` in float64: the output and all five gradients. Without a GPU the kernels
run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

from rgfusion.trainer.model import ffn  # noqa: E402
from rgfusion.trainer.model.ffn import feed_forward  # noqa: E402

torch.set_num_threads(1)


def block(k: int, n: int) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(1)
    return nn.Linear(k, n), nn.Linear(n, k)


def run(x: torch.Tensor, up: nn.Linear, down: nn.Linear, impl: str, grad: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients of x and the four parameters, in float64."""
    x = x.detach().requires_grad_()
    y = feed_forward(x, up, down, impl)
    (y.double() * grad).sum().backward()
    return [t.detach().double() for t in (y, x.grad, up.weight.grad, up.bias.grad, down.weight.grad, down.bias.grad)]


@pytest.mark.parametrize("shape,n", [((300, 96), 320), ((2, 17, 48), 80), ((5, 16), 16)])
def test_output_and_gradients_equal_the_reference(shape, n):
    # 300 rows and 320 columns: five row blocks (the last one partial) by three column blocks.
    k = shape[-1]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    up, down = block(k, n)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = run(x.double(), *(copy.deepcopy(m).double() for m in (up, down)), "math", grad)
    got = run(x, up, down, "triton", grad)
    for name, a, b in zip(("output", "x", "up.weight", "up.bias", "down.weight", "down.bias"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_no_further_from_float64_than_pytorchs_path(dtype):
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    up, down = block(64, 256)
    grad = torch.randn(200, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = run(x.double(), *(copy.deepcopy(m).double() for m in (up, down)), "math", grad)
    half = [copy.deepcopy(m).to(dtype) for m in (up, down)]
    ours = run(x.to(dtype), *copy.deepcopy(half), "triton", grad)
    theirs = run(x.to(dtype), *half, "math", grad)
    for a, b, exact in zip(ours, theirs, want):
        assert float((a - exact).norm()) <= 2 * float((b - exact).norm())


def test_the_bias_gradient_is_the_same_every_time():
    # Summed from per-block shares in a fixed order, not accumulated with atomics.
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(300, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first, second = (run(x, *block(32, 160), "triton", grad)[3] for _ in range(2))
    assert torch.equal(first, second)


def test_the_kernels_alone():
    h = torch.randn(70, 200, generator=torch.Generator().manual_seed(0))
    bias, grad = torch.randn(200), torch.randn(70, 200)
    act = ffn.ops().bias_gelu(h, bias)
    torch.testing.assert_close(act, F.gelu(h + bias), atol=1e-6, rtol=1e-6)
    d_pre, d_bias = ffn.ops().backward(grad, h, bias)
    want = torch.ops.aten.gelu_backward(grad.double(), (h + bias).double())
    torch.testing.assert_close(d_pre.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d_bias.double(), want.sum(0), atol=1e-5, rtol=1e-6)


def test_a_block_without_bias_takes_pytorchs_path():
    up, down = nn.Linear(16, 32, bias=False), nn.Linear(32, 16)
    x = torch.randn(4, 16)
    torch.testing.assert_close(feed_forward(x, up, down, "triton"), down(F.gelu(up(x))))
