"""The two attention implementations against a per-row loop, and against each other in the model."""

from __future__ import annotations

import math

import pytest
import torch

from rgfusion.trainer.model import ModelConfig, TextConfig, build_model
from rgfusion.trainer.model.attention import attend
from rgfusion.trainer.model.pooling import MASK_VALUE

torch.set_num_threads(1)


def reference(q, k, v, bias):
    """One softmax per (batch, head, query row), written out."""
    b, h, n, d = q.shape
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float64)
    bias = torch.zeros(1, 1, 1, 1) if bias is None else bias
    bias = bias.expand(b, h, n, k.shape[2])
    for i in range(b):
        for j in range(h):
            for r in range(n):
                s = torch.tensor([float(q[i, j, r] @ k[i, j, c]) / math.sqrt(d) + float(bias[i, j, r, c])
                                  for c in range(k.shape[2])], dtype=torch.float64)
                out[i, j, r] = torch.softmax(s, 0) @ v[i, j].double()
    return out


def qkv(seed=0, b=2, h=3, n=4, m=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, d, generator=g))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("bias_kind", ["none", "dense", "key-mask"])
def test_attend_matches_per_row_softmax(impl, bias_kind):
    q, k, v = qkv()
    bias = {"none": None,
            "dense": torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1)),
            "key-mask": torch.tensor([[0, 0, MASK_VALUE, 0, MASK_VALUE], [0] * 5]).float()[:, None, None, :]}[bias_kind]
    got = attend(q, k, v, bias, 0.0, impl)
    torch.testing.assert_close(got.double(), reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_math_gradients_match_sdpa_including_the_bias():
    grads = {}
    for impl in ("sdpa", "math"):
        q, k, v = (t.requires_grad_() for t in qkv())
        bias = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (attend(q, k, v, bias, 0.0, impl) * torch.linspace(-1, 1, 6)).sum().backward()
        grads[impl] = [t.grad for t in (q, k, v, bias)]
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_math_dropout_changes_the_output():
    q, k, v = qkv()
    torch.manual_seed(0)
    dropped = attend(q, k, v, None, 0.5, "math")
    assert not torch.allclose(dropped, attend(q, k, v, None, 0.0, "math"))


def test_model_embeddings_and_gradients_do_not_depend_on_the_implementation():
    from tests.test_model_encoder import GRID, GRID_DIM, REGION_DIM, VOCAB, caption_inputs, image_inputs

    out = {}
    for impl in ("sdpa", "math"):
        cfg = ModelConfig(width=16, heads=2, geometry_hidden=4, ffn_mult=2, map_heads=2, attention=impl,
                          text=TextConfig(word_dim=8))
        torch.manual_seed(0)
        model = build_model(cfg, region_dim=REGION_DIM, grid_dim=GRID_DIM, grid_size=GRID, vocab_size=VOCAB).eval()
        regions, boxes, mask, grids = image_inputs(r=5)
        mask[0, 3:] = False
        img = model.embed_images(regions, boxes, mask, grids)
        cap = model.embed_captions(*caption_inputs())
        (img @ cap.T).sum().backward()
        out[impl] = (img, cap, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out["math"][0], out["sdpa"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["math"][1], out["sdpa"][1], atol=1e-5, rtol=1e-4)
    assert out["math"][2].keys() == out["sdpa"][2].keys()
    for name, g in out["sdpa"][2].items():
        torch.testing.assert_close(out["math"][2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash")
