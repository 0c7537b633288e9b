"""The GELU feed-forward as Triton products with the GELU in their epilogues (trainer/model/ffn.py)
against ``down(gelu(up(x)))`` in float64: the output and all five gradients. Without a GPU the
kernels run in Triton's interpreter (tests/conftest.py)."""

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


def block(k: int, n: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(1)
    return nn.Linear(k, n).to(dtype), nn.Linear(n, k).to(dtype)


def run(x: torch.Tensor, up: nn.Linear, down: nn.Linear, impl: str, grad: torch.Tensor):
    """The output and the gradients of x and the four parameters, in float64."""
    x = x.detach().requires_grad_()
    y = feed_forward(x, up, down, impl)
    (y.double() * grad).sum().backward()
    return [t.detach().double() for t in (y, x.grad, up.weight.grad, up.bias.grad, down.weight.grad, down.bias.grad)]


@pytest.mark.parametrize("shape,n", [((300, 96), 320), ((2, 17, 48), 80), ((5, 16), 16)])
def test_output_and_gradients_equal_the_reference(shape, n):
    # 300 rows and 320 columns: three row blocks (the last one partial) by three column blocks.
    k = shape[-1]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    up, down = block(k, n)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = run(x.double(), *(copy.deepcopy(m).double() for m in (up, down)), "math", grad)
    got = run(x, up, down, "triton", grad)
    for name, a, b in zip(("output", "x", "up.weight", "up.bias", "down.weight", "down.bias"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_half_precision_is_no_further_from_float64_than_pytorchs_path():
    # float16: the interpreter's bfloat16 products are wrong (tests/test_gpu.py checks bfloat16).
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    up, down = block(64, 256)
    grad = torch.randn(200, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = run(x.double(), *(copy.deepcopy(m).double() for m in (up, down)), "math", grad)
    half = [copy.deepcopy(m).half() for m in (up, down)]
    ours = run(x.half(), *copy.deepcopy(half), "triton", grad)
    theirs = run(x.half(), *half, "math", grad)
    for a, b, exact in zip(ours, theirs, want):
        assert float((a - exact).norm()) <= 2 * float((b - exact).norm())


def test_the_bias_gradient_is_the_same_every_time():
    # Summed from per-block shares in a fixed order, not accumulated with atomics.
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(300, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first, second = (run(x, *block(32, 160), "triton", grad)[3] for _ in range(2))
    assert torch.equal(first, second)


def test_the_kernels_write_the_pre_activation_and_the_gelu():
    from rgfusion.trainer.model import _triton_ffn_kernels as kernels

    x = torch.randn(70, 32, generator=torch.Generator().manual_seed(0))
    up, _ = block(32, 48)
    pre, act = kernels.up_forward(x, up.weight.detach(), up.bias.detach())
    torch.testing.assert_close(pre, x @ up.weight.detach().t() + up.bias.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act, F.gelu(pre), atol=1e-6, rtol=1e-6)


def test_which_inputs_the_kernels_take():
    up, down = block(32, 64)
    assert ffn.applies(torch.zeros(4, 32), up, down)  # float32: under the interpreter only
    assert ffn.applies(torch.zeros(4, 32, dtype=torch.float16), *(m.half() for m in block(32, 64)))
    assert not ffn.applies(torch.zeros(4, 32, dtype=torch.float16), up, down)  # weights of another dtype
    assert not ffn.applies(torch.zeros(4, 24), *block(24, 64))  # a width no tile divides
    assert not ffn.applies(torch.zeros(4, 32), nn.Linear(32, 64, bias=False), down)
    assert not ffn.applies(torch.zeros(4, 32, dtype=torch.float64), *(m.double() for m in block(32, 64)))
