"""The Triton attention kernels (trainer/model/triton_attention.py) against a brute-force
reference: outputs and gradients of the projections and of the bias, with masked keys, a bias
per head, dropout, one and several blocks of keys, self- and cross-attention. Without a GPU the
kernels run in Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from triton_compiler import run_compiler

pytest.importorskip("triton")

from rgfusion.trainer.model import triton_attention  # noqa: E402

torch.set_num_threads(1)


def heads_of(x, n, heads, parts):
    """(parts, B, heads, n, d) views of ``parts`` projections laid side by side in x."""
    return x.double().view(x.shape[0], n, parts, heads, x.shape[-1] // (parts * heads)).permute(2, 0, 3, 1, 4)


def reference(q, kv, bias, heads, keep=None, p=0.0):
    """Per head softmax(q·kᵀ/√d + bias)·v, the weights multiplied by ``keep / (1 - p)``;
    ``kv`` None: ``q`` holds query, key and value side by side."""
    if kv is None:
        q, k, v = heads_of(q, q.shape[1], heads, 3)
    else:
        (q,), (k, v) = heads_of(q, q.shape[1], heads, 1), heads_of(kv, kv.shape[1], heads, 2)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores if bias is None else scores + bias.double(), dim=-1)
    if keep is not None:
        weights = weights * keep / (1 - p)
    out = weights @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def key_bias(b, t, lengths):
    """(B, 1, 1, T): 0 for a caption's words, -1e4 past its length."""
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    return torch.zeros(b, t).masked_fill(~mask, -1e4)[:, None, None, :]


def case(b=3, t=7, heads=2, d=16, lengths=(7, 4, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3 * heads * d, generator=g).requires_grad_(), key_bias(b, t, lengths)


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


def assert_same(out, ref, inputs, tol):
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    weight = torch.randn(ref.shape, dtype=torch.float64)
    for a, b in zip(grads(out, inputs, weight.to(out.dtype)), grads(ref, inputs, weight)):
        torch.testing.assert_close(a.double(), b.double(), atol=tol * 4, rtol=tol * 4)


# Head size 128 takes 32-row blocks, so 40 words are two blocks of keys; 70 at head size 32 too.
@pytest.mark.parametrize("shape", [dict(), dict(b=2, t=20, heads=3, d=32, lengths=(20, 13)),
                                   dict(b=2, t=1, heads=1, d=16, lengths=(1, 1)),
                                   dict(b=1, t=33, heads=2, d=16, lengths=(30,)),
                                   dict(b=2, t=40, heads=2, d=128, lengths=(40, 9)),
                                   dict(b=1, t=70, heads=1, d=32, lengths=(66,))])
def test_self_attention_and_its_gradient_equal_the_reference(shape):
    heads = shape.get("heads", 2)
    qkv, bias = case(**shape)
    out = triton_attention.self_attention(qkv, bias, heads, 0.0)
    assert_same(out, reference(qkv, None, bias, heads), [qkv], 1e-5)


@pytest.mark.parametrize("t,d", [(9, 16), (45, 128)])
def test_a_bias_per_head_gets_its_gradient(t, d):
    # The joint graph's geometry bias: (B, heads, N, N) at the strides of a (B, N, N, heads) product.
    qkv, _ = case(b=2, t=t, heads=2, d=d, lengths=(t, t))
    bias = torch.randn(2, t, t, 2).permute(0, 3, 1, 2).requires_grad_()
    out = triton_attention.self_attention(qkv, bias, 2, 0.0)
    assert_same(out, reference(qkv, None, bias, 2), [qkv, bias], 1e-5)


def test_projections_at_any_strides():
    # A query product read column-major (a transposed view) and keys and values cut from a wider one.
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 32, 9, generator=g).transpose(1, 2).requires_grad_()
    kv = torch.randn(2, 5, 70, generator=g)[..., 3:67].requires_grad_()
    out = triton_attention.cross_attention(q, kv, None, 2, 0.0)
    assert_same(out, reference(q, kv, None, 2), [q, kv], 1e-5)


@pytest.mark.parametrize("nq,nk,d,masked", [(36, 49, 128, False), (49, 36, 128, True), (5, 3, 16, True)])
def test_cross_attention_and_its_gradients_equal_the_reference(nq, nk, d, masked):
    # CGF: regions attend to cells, and cells to the regions a mask keeps.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, nq, 2 * d, generator=g).requires_grad_()
    kv = torch.randn(2, nk, 4 * d, generator=g).requires_grad_()
    bias = key_bias(2, nk, (nk, 2)) if masked else None
    out = triton_attention.cross_attention(q, kv, bias, 2, 0.0)
    assert_same(out, reference(q, kv, bias, 2), [q, kv], 1e-5)


def keep_mask(b, t, heads, p, rng_seed):
    """The kernels' own keep mask for a call made from PyTorch's generator at ``rng_seed``.

    With q = k = 0 every key gets weight 1/t, and with value rows the unit vectors the output
    holds the dropped weights themselves: keep / (t (1 - p)) or 0. The mask depends on the
    call's sizes and seed only, not on the head size."""
    d = 128
    qkv = torch.zeros(b, t, heads, 3, d)
    qkv[:, :, :, 2, :t] = torch.eye(t)[None, :, None]
    qkv = qkv.permute(0, 1, 3, 2, 4).reshape(b, t, 3 * heads * d)
    torch.manual_seed(rng_seed)
    out = triton_attention.self_attention(qkv, None, heads, p)
    return out.view(b, t, heads, d)[..., :t].permute(0, 2, 1, 3) > 0


@pytest.mark.parametrize("t,d", [(7, 16), (40, 128)])
def test_dropout_drops_the_weights_the_backward_assumes(t, d):
    p, heads = 0.3, 2
    qkv, bias = case(t=t, heads=heads, d=d, lengths=(t, 4, 1))
    keep = keep_mask(3, t, heads, p, rng_seed=5)
    assert 0.55 < keep.double().mean().item() < 0.85
    torch.manual_seed(5)
    out = triton_attention.self_attention(qkv, bias, heads, p)
    assert_same(out, reference(qkv, None, bias, heads, keep, p), [qkv], 1e-5)


def test_each_call_draws_a_new_mask_at_the_rate_asked():
    first, second = keep_mask(4, 16, 2, 0.1, rng_seed=1), keep_mask(4, 16, 2, 0.1, rng_seed=2)
    assert not torch.equal(first, second)
    rate = 1 - torch.cat([first, second]).double().mean().item()
    assert 0.07 < rate < 0.13  # 4,096 draws: 0.1 ± 3 standard deviations


def test_half_precision_stays_within_its_rounding():
    # float16: the interpreter's bfloat16 products are wrong (tests/test_gpu.py checks bfloat16).
    qkv, bias = case(b=2, t=40, heads=2, d=128, lengths=(40, 11))
    half = qkv.detach().half().requires_grad_()
    out = triton_attention.self_attention(half, bias.half(), 2, 0.0)
    assert out.dtype == torch.float16
    ref = reference(qkv, None, bias, 2)
    torch.testing.assert_close(out.double(), ref.detach(), atol=5e-3, rtol=5e-3)
    weight = torch.randn_like(ref)
    torch.testing.assert_close(grads(out, [half], weight.half())[0].double(), grads(ref, [qkv], weight)[0].double(),
                               atol=2e-2, rtol=2e-2)


def test_applies_to_power_of_two_heads_up_to_128():
    assert triton_attention.applies(torch.zeros(2, 200, 3 * 2 * 64), head_dim=64)
    assert triton_attention.applies(torch.zeros(2, 85, 3 * 2 * 128), head_dim=128)
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 2 * 256), head_dim=256)
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 2 * 24), head_dim=24)
    assert not triton_attention.applies(torch.zeros(2, 8, 3 * 2 * 64, dtype=torch.float64), head_dim=64)


def same_gradients(a, b, tol):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        if x.grad is not None or y.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, atol=tol, rtol=tol, msg=name)


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
    same_gradients(fused, math, 2e-5)


def test_the_image_tower_computes_the_same_with_the_kernels():
    # The joint graph's self-attention with its geometry bias, and both of CGF's cross-attentions.
    from rgfusion.trainer.model.config import ModelConfig
    from rgfusion.trainer.model.image import ImageEncoder

    towers = []
    for attention in ("math", "triton"):
        torch.manual_seed(0)
        towers.append(ImageEncoder(ModelConfig(width=64, heads=4, attention=attention), 24, 20, (3, 3)).eval())
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(3, 5, 2, generator=g) * 0.6
    inputs = (torch.randn(3, 5, 24, generator=g), torch.cat([xy, xy + 0.3], -1),
              torch.arange(5)[None] < torch.tensor([[5], [3], [1]]), torch.randn(3, 9, 20, generator=g))
    ref, out = (tower(*inputs) for tower in towers)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    weight = torch.randn_like(ref)
    (ref * weight).sum().backward()
    (out * weight).sum().backward()
    same_gradients(towers[1], towers[0], 5e-5)


@pytest.mark.parametrize("block", [16, 64])
def test_any_block_size_gives_the_same_result(block, monkeypatch):
    # The launch option benchmarks/attention_bench.py sweeps: 16-row blocks split 33 words into
    # three blocks of keys, 64-row ones hold them in one.
    from rgfusion.trainer.model import _triton_attention_kernels as kernels

    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch(block=block))
    qkv, _ = case(b=2, t=33, heads=2, d=32, lengths=(33, 33))
    bias = torch.randn(2, 2, 33, 33).requires_grad_()
    keep = keep_mask(2, 33, 2, 0.2, rng_seed=4)
    torch.manual_seed(4)
    out = triton_attention.self_attention(qkv, bias, 2, 0.2)
    assert_same(out, reference(qkv, None, bias, 2, keep, 0.2), [qkv, bias], 1e-5)


@pytest.mark.parametrize("launch", [dict(forward_keys=16), dict(block=16), dict(block=16, forward_keys=32),
                                    dict(block=16, query_pass_keys=64), dict(block=32, query_pass_keys=16),
                                    dict(block=16, forward_rows=64, forward_warps=8),
                                    dict(block=32, forward_rows=16, forward_keys=64),
                                    dict(block=16, key_pass_keys=64, key_pass_warps=8)])
def test_forward_key_tiles_keep_forward_and_backward_in_step(launch, monkeypatch):
    # The backward redraws the forward's mask with its own tiles: 33 keys in 16-key tiles under
    # 64 rows, in one tile of 64 (the default under 16 rows) or in 32-key tiles forward, must meet
    # the same random numbers in the backward's tiles; so must the query pass's own key tiles, the
    # forward's own row tiles (64 rows over the backward's 16: its row sums padded further), and
    # the key pass holding all 33 keys in one block of 64 over 16-row query tiles (no query pass).
    from rgfusion.trainer.model import _triton_attention_kernels as kernels

    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch(**launch))
    qkv, _ = case(b=2, t=33, heads=2, d=32, lengths=(33, 33))
    bias = torch.randn(2, 2, 33, 33).requires_grad_()
    keep = keep_mask(2, 33, 2, 0.2, rng_seed=4)
    assert 0.7 < keep.double().mean().item() < 0.9
    torch.manual_seed(4)
    out = triton_attention.self_attention(qkv, bias, 2, 0.2)
    assert_same(out, reference(qkv, None, bias, 2, keep, 0.2), [qkv, bias], 1e-5)


def test_key_tiles_of_the_forward_and_of_the_query_pass():
    from rgfusion.trainer.model._triton_attention_kernels import forward_key_block, query_pass_key_block

    # The graph's 85 nodes, CGF's 36 regions and 49 cells, BERT's 20 words, at heads of 128 (32-row
    # tiles); 200 keys would need a tile past 128.
    assert [forward_key_block(n, 32) for n in (85, 36, 49, 20, 200)] == [128, 32, 32, 32, 32]
    assert forward_key_block(70, 16) == 128 and forward_key_block(70, 64) == 64
    # The query pass: up to 64 keys in one tile, more in the row tiles.
    assert [query_pass_key_block(n, 32) for n in (85, 36, 49, 64, 65)] == [32, 64, 64, 64, 32]


def test_a_key_pass_holding_every_key_needs_no_query_pass(monkeypatch):
    from rgfusion.trainer.model import _triton_attention_kernels as kernels

    # The graph's 85 nodes at 8 heads of 128: 32-row tiles, all keys in one program of 128.
    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch(key_pass_keys=128, key_pass_warps=16))
    shape = kernels._Shape(torch.empty(4, 85, 3 * 8 * 128), None, None, 8, 0.1)
    grid, blocks, meta = shape.key_pass_launch()
    assert shape.keys_fit and grid == (4 * 8,) and blocks == 1
    assert (meta["BLOCK"], meta["ROWS"], meta["num_warps"], meta["KEYS_FIT"]) == (128, 32, 16, True)
    # CGF's 49 cells span two row tiles: they keep them, as they do in the forward.
    assert kernels._Shape(torch.empty(4, 36, 8 * 128), torch.empty(4, 49, 2 * 8 * 128), None, 8,
                          0.1).key_pass_launch()[:2] == ((2 * 4 * 8,), 2)
    monkeypatch.setattr(kernels, "LAUNCH", kernels.Launch())
    shape = kernels._Shape(torch.empty(4, 85, 3 * 8 * 128), None, None, 8, 0.1)
    assert not shape.keys_fit and shape.key_pass_launch()[:2] == ((3 * 4 * 8,), 3)


def test_kernel_resources_compiles_for_a_gpu_this_machine_lacks():
    # benchmarks/kernel_resources.py: Triton's own compiler, not its interpreter, so a process of its own.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    out = run_compiler([str(script), "--shapes", "caption", "geometry", "--blocks", "0", "16", "--key-pass-keys", "0",
                        "64"], timeout=300, check=True).stdout.splitlines()
    assert out[0].startswith("Triton ") and out[0].endswith("sm_90")
    rows = [line.split() for line in out[2:]]
    # 20 words fit one 32-row block, so no query pass; 16-row blocks split them and need one. The
    # key pass also with 64 keys a program over query tiles of the row tile.
    assert [r[:3] for r in rows] == [["geometry", "forward", "16"], ["geometry", "backward", "8"],
                                     ["caption", "forward", "32"], ["caption", "forward", "16"],
                                     ["caption", "backward_query", "16x32"], ["caption", "backward_key", "32"],
                                     ["caption", "backward_key", "32x64"], ["caption", "backward_key", "16"],
                                     ["caption", "backward_key", "16x64"]]
    for r in rows:
        registers, spills, programs, sass, exps, products = int(r[6]), int(r[7]), int(r[9]), int(r[10]), int(
            r[11]), int(r[12]) + int(r[13])
        assert 0 < registers <= 255 and spills >= 0 and programs >= 1 and sass > 0
        # The attention kernels exponentiate scores their products made; the geometry ones neither.
        assert (exps > 0 and products > 0) == (r[0] == "caption")
