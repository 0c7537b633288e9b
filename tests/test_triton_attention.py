"""The one-kernel self-attention of BERT and the graph (trainer/model/triton_attention.py)
against a brute-force reference: outputs, query-key-value gradients and the bias's gradient, with
masked keys, a per-head bias, dropout and odd lengths. Without a GPU the kernels run in Triton's
interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rgfusion.trainer.model import triton_attention  # noqa: E402

torch.set_num_threads(1)


def reference(qkv, bias, heads, keep=None, p=0.0):
    """Per head softmax(q·kᵀ/√d + bias)·v, the weights multiplied by ``keep / (1 - p)``."""
    b, t, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.double().view(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5 + bias.double(), dim=-1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return (weights @ v).transpose(1, 2).reshape(b, t, width // 3)


def case(b=3, t=7, heads=2, d=16, lengths=(7, 4, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, 3 * heads * d, generator=g).requires_grad_()
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    return qkv, torch.zeros(b, 1, 1, t).masked_fill(~mask[:, None, None], -1e4), mask


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


def keep_mask(b, tq, tk, heads, p, rng_seed):
    """The kernels' keep mask, (b, heads, tq, tk), for a call made from PyTorch's generator at
    ``rng_seed``. It depends on the position only, so a probe reads it off: with q = 0 every key
    gets weight 1/tk, and with unit-vector values the output holds the dropped weights
    themselves: keep / (tk (1 - p)) or 0."""
    d = triton_attention.block_size(tk)
    kv = torch.zeros(b, tk, 2, heads, d)
    kv[:, :, 1, :, :tk] = torch.eye(tk)[:, None]
    torch.manual_seed(rng_seed)
    out = triton_attention.cross_attention(torch.zeros(b, tq, heads * d), kv.view(b, tk, -1), None, heads, p)
    return out.view(b, tq, heads, d)[..., :tk].transpose(1, 2) > 0


def test_dropout_drops_the_weights_the_backward_assumes():
    p, heads = 0.3, 2
    qkv, bias, _ = case(heads=heads)
    keep = keep_mask(3, 7, 7, heads, p, rng_seed=5)
    assert 0.55 < keep.double().mean().item() < 0.85
    torch.manual_seed(5)
    out = triton_attention.self_attention(qkv, bias, heads, p)
    ref = reference(qkv, bias, heads, keep, p)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    torch.testing.assert_close(grad(out, qkv, weight).double(), grad(ref, qkv, weight.double()).double(),
                               atol=1e-5, rtol=1e-5)


def graph_bias(b, heads, t, seed=1):
    """A per-head bias with a gradient and some pairs masked, as the joint graph's geometry bias."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, t, t, heads, generator=g).requires_grad_()
    edges = torch.rand(b, t, t, generator=g) < 0.6
    edges |= torch.eye(t, dtype=torch.bool)
    return raw, raw.permute(0, 3, 1, 2).masked_fill(~edges[:, None], torch.finfo(torch.float32).min)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_a_per_head_bias_gets_its_gradient(p):
    heads, t = 2, 40  # a block of 64 elements: the backward makes two passes over the queries
    qkv, _, _ = case(b=2, t=t, heads=heads, d=16, lengths=(t, t))
    raw, bias = graph_bias(2, heads, t)
    keep = keep_mask(2, t, t, heads, p, rng_seed=3) if p else None
    torch.manual_seed(3)
    out = triton_attention.self_attention(qkv, bias, heads, p)
    ref = reference(qkv, bias, heads, keep, p)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    ours = torch.autograd.grad((out * weight).sum(), (qkv, raw), retain_graph=True)  # bias is shared
    theirs = torch.autograd.grad((ref * weight.double()).sum(), (qkv, raw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def cross_reference(q, kv, bias, heads, keep=None, p=0.0):
    b, tq, hidden = q.shape
    d = hidden // heads
    qh = q.double().view(b, tq, heads, d).transpose(1, 2)
    k, v = kv.double().view(b, kv.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
    scores = qh @ k.transpose(-1, -2) * d**-0.5
    weights = torch.softmax(scores if bias is None else scores + bias.double(), dim=-1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return (weights @ v).transpose(1, 2).reshape(b, tq, hidden)


@pytest.mark.parametrize("tq, tk, masked, p", [(7, 12, True, 0.0), (36, 49, False, 0.0), (49, 36, True, 0.25)])
def test_cross_attention_equals_the_reference(tq, tk, masked, p):
    heads, d = 2, 16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, tq, heads * d, generator=g).requires_grad_()
    kv = torch.randn(2, tk, 2 * heads * d, generator=g).requires_grad_()
    keys = torch.arange(tk)[None] < torch.tensor([tk, tk // 2])[:, None]
    bias = torch.zeros(2, 1, 1, tk).masked_fill(~keys[:, None, None], -1e4) if masked else None
    keep = keep_mask(2, tq, tk, heads, p, rng_seed=6) if p else None
    torch.manual_seed(6)
    out = triton_attention.cross_attention(q, kv, bias, heads, p)
    ref = cross_reference(q, kv, bias, heads, keep, p)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    ours = torch.autograd.grad((out * weight).sum(), (q, kv))
    theirs = torch.autograd.grad((ref * weight.double()).sum(), (q, kv))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_each_call_draws_a_new_mask_at_the_rate_asked():
    first, second = keep_mask(4, 16, 16, 2, 0.1, rng_seed=1), keep_mask(4, 16, 16, 2, 0.1, rng_seed=2)
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


def test_applies_only_where_one_program_holds_a_caption():
    assert triton_attention.applies(torch.zeros(2, 128, 3 * 256), heads=2)
    assert not triton_attention.applies(torch.zeros(2, 129, 3 * 64), heads=2)  # too long
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 24), heads=2)  # head size 12
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 512), heads=2)  # head size 256
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 64, dtype=torch.float64), heads=2)


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


def test_graph_layer_computes_the_same_with_the_kernel():
    from rgfusion.trainer.model import ModelConfig
    from rgfusion.trainer.model.geometry import GEOMETRY_DIM
    from rgfusion.trainer.model.image import GraphAttentionLayer

    torch.manual_seed(0)
    math = GraphAttentionLayer(ModelConfig(width=32, heads=2, attention="math")).eval()
    fused = GraphAttentionLayer(ModelConfig(width=32, heads=2, attention="triton")).eval()
    fused.load_state_dict(math.state_dict())
    b, n = 3, 11
    x, geometry = torch.randn(b, n, 32), torch.randn(b, n, n, GEOMETRY_DIM)
    adj = (torch.rand(b, n, n) < 0.5) | torch.eye(n, dtype=torch.bool)
    valid = torch.arange(n)[None] < torch.tensor([11, 8, 3])[:, None]
    ref, out = math(x, geometry, adj, valid), fused(x, geometry, adj, valid)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    weight = torch.randn_like(ref)
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), math.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("masked", [True, False])
def test_cgf_computes_the_same_with_the_kernel(masked):
    from rgfusion.trainer.model import ModelConfig
    from rgfusion.trainer.model.image import GatedCrossAttention

    torch.manual_seed(0)
    math = GatedCrossAttention(ModelConfig(width=32, heads=2, attention="math")).eval()
    fused = GatedCrossAttention(ModelConfig(width=32, heads=2, attention="triton")).eval()
    fused.load_state_dict(math.state_dict())
    x, other = torch.randn(3, 9, 32), torch.randn(3, 5, 32)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1])[:, None] if masked else None
    ref, out = math(x, other, mask), fused(x, other, mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    weight = torch.randn_like(ref)
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), math.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5, msg=name)
