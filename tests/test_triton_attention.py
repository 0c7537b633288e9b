"""BERT's one-kernel self-attention (trainer/model/triton_attention.py) against a brute-force
reference: outputs and query-key-value gradients, with masked keys, dropout and odd lengths.
Without a GPU the kernels run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rgfusion.trainer.model import triton_attention  # noqa: E402

torch.set_num_threads(1)


def reference(qkv, key_bias, heads, keep=None, p=0.0):
    """Per head softmax(q·kᵀ/√d + bias)·v, the weights multiplied by ``keep / (1 - p)``."""
    b, t, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.double().view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + key_bias.double()[:, None, None, :], dim=-1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return (weights @ v).transpose(1, 2).reshape(b, t, width // 3)


def case(b=3, t=7, heads=2, d=16, lengths=(7, 4, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, 3 * heads * d, generator=g).requires_grad_()
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    return qkv, torch.zeros(b, t).masked_fill(~mask, -1e4), mask


def grad(out, qkv, weight):
    return torch.autograd.grad((out * weight).sum(), qkv)[0]


@pytest.mark.parametrize("shape", [dict(), dict(b=2, t=20, heads=3, d=32, lengths=(20, 13)),
                                   dict(b=2, t=1, heads=1, d=16, lengths=(1, 1)),
                                   dict(b=1, t=33, heads=2, d=16, lengths=(30,))])
def test_output_and_gradient_equal_the_reference(shape):
    heads = shape.get("heads", 2)
    qkv, bias, _ = case(**shape)
    out = triton_attention.self_attention(qkv, bias, heads, 0.0)
    ref = reference(qkv, bias, heads)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    torch.testing.assert_close(grad(out, qkv, weight).double(), grad(ref, qkv, weight.double()).double(),
                               atol=1e-5, rtol=1e-5)


def keep_mask(b, t, heads, p, rng_seed):
    """The kernel's own keep mask for a call made from PyTorch's generator at ``rng_seed``.

    With q = k = 0 every key gets weight 1/t, and with value rows the unit vectors the output
    holds the dropped weights themselves: keep / (t (1 - p)) or 0."""
    d = triton_attention.block_size(t)
    qkv = torch.zeros(b, t, heads, 3, d)
    qkv[:, :, :, 2, :t] = torch.eye(t)[None, :, None]
    qkv = qkv.permute(0, 1, 3, 2, 4).reshape(b, t, 3 * heads * d)
    torch.manual_seed(rng_seed)
    out = triton_attention.self_attention(qkv, torch.zeros(b, t), heads, p)
    return out.view(b, t, heads, d)[..., :t].permute(0, 2, 1, 3) > 0


def test_dropout_drops_the_weights_the_backward_assumes():
    p, heads = 0.3, 2
    qkv, bias, _ = case(heads=heads)
    keep = keep_mask(3, 7, heads, p, rng_seed=5)
    assert 0.55 < keep.double().mean().item() < 0.85
    torch.manual_seed(5)
    out = triton_attention.self_attention(qkv, bias, heads, p)
    ref = reference(qkv, bias, heads, keep, p)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    torch.testing.assert_close(grad(out, qkv, weight).double(), grad(ref, qkv, weight.double()).double(),
                               atol=1e-5, rtol=1e-5)


def test_each_call_draws_a_new_mask_at_the_rate_asked():
    first, second = keep_mask(4, 16, 2, 0.1, rng_seed=1), keep_mask(4, 16, 2, 0.1, rng_seed=2)
    assert not torch.equal(first, second)
    rate = 1 - torch.cat([first, second]).double().mean().item()
    assert 0.07 < rate < 0.13  # 4,096 draws: 0.1 ± 3 standard deviations


def test_half_precision_stays_within_its_rounding():
    # float16: the interpreter's bfloat16 products are wrong (tests/test_gpu.py checks bfloat16).
    qkv, bias, _ = case(b=2, t=20, heads=2, d=32, lengths=(20, 11))
    half = qkv.detach().half().requires_grad_()
    out = triton_attention.self_attention(half, bias.half(), 2, 0.0)
    assert out.dtype == torch.float16
    ref = reference(qkv, bias, 2)
    torch.testing.assert_close(out.double(), ref.detach(), atol=5e-3, rtol=5e-3)
    weight = torch.randn_like(ref)
    torch.testing.assert_close(grad(out, half, weight.half()).double(), grad(ref, qkv, weight).double(),
                               atol=2e-2, rtol=2e-2)


def test_applies_only_where_its_tiles_stay_small():
    assert triton_attention.applies(torch.zeros(2, 64, 3 * 2 * 64), heads=2)
    assert triton_attention.applies(torch.zeros(2, 20, 3 * 2 * 128), heads=2)  # a 32-word block
    assert not triton_attention.applies(torch.zeros(2, 65, 3 * 2 * 64), heads=2)  # a 128-word block
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 2 * 24), heads=2)  # head size 24
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 2 * 64, dtype=torch.float64), heads=2)


def test_fused_bert_computes_the_same_with_the_kernel():
    transformers = pytest.importorskip("transformers")
    from rgfusion.trainer.model.bert import FusedBert

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=60, max_position_embeddings=24)
    torch.manual_seed(0)
    math = FusedBert(cfg, "math").eval()
    fused = FusedBert(cfg, "triton").eval()
    fused.load_state_dict(math.state_dict())
    tokens = torch.randint(1, 60, (3, 9))
    lengths = torch.tensor([9, 5, 2])
    mask = torch.arange(9)[None] < lengths[:, None]
    ref, out = math(tokens, lengths, mask), fused(tokens, lengths, mask)
    torch.testing.assert_close(out[mask], ref[mask], atol=2e-5, rtol=2e-5)
    weight = torch.randn_like(ref)
    (ref[mask] * weight[mask]).sum().backward()
    (out[mask] * weight[mask]).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), math.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5, msg=name)
