"""Set poolers against per-sample reference implementations (VSE∞'s GPO as published)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rgfusion.trainer.model.pooling import (
    GeneralizedPooling,
    MaxPool,
    MeanPool,
    MultiAttentionPooling,
    positional_encoding,
)

torch.set_num_threads(1)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 5, generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool
    )
    return x, mask


def vse_infinity_gpo(gpo: GeneralizedPooling, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """VSE∞'s GPO.forward (features packed to the front, batch lengths packed into the GRU)."""
    max_len = int(lengths.max())
    pes = positional_encoding(max_len, 32).unsqueeze(0).repeat(lengths.size(0), 1, 1)
    mask = (torch.arange(max_len).expand(lengths.size(0), max_len) < lengths.unsqueeze(1)).unsqueeze(-1)
    pes = pes.masked_fill(mask == 0, 0)
    packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out_emb, _ = pad_packed_sequence(gpo.gru(packed)[0], batch_first=True)
    out_emb = (out_emb[:, :, : out_emb.size(2) // 2] + out_emb[:, :, out_emb.size(2) // 2 :]) / 2
    scores = gpo.score(out_emb)
    scores[torch.where(mask == 0)] = -10000
    weights = torch.softmax(scores / 0.1, 1)
    features = features[:, :max_len, :]
    sorted_features = features.masked_fill(mask == 0, -10000).sort(dim=1, descending=True)[0]
    sorted_features = sorted_features.masked_fill(mask == 0, 0)
    return (sorted_features * weights).sum(1)


def test_gpo_matches_vse_infinity():
    torch.manual_seed(0)
    gpo = GeneralizedPooling()
    x, mask = batch()
    # VSE∞ expects the valid features first: compact each row.
    order = torch.argsort((~mask).int(), dim=1, stable=True)
    packed_x = x.gather(1, order[..., None].expand_as(x))
    ref = vse_infinity_gpo(gpo, packed_x, mask.sum(1))
    torch.testing.assert_close(gpo(x, mask), ref, atol=1e-5, rtol=1e-5)


def test_map_matches_per_sample_softmax():
    torch.manual_seed(0)
    for combine in ("concat", "mean"):
        pool = MultiAttentionPooling(5, 3, combine)
        x, mask = batch()
        got = pool(x, mask)
        for b in range(4):
            xs = x[b, mask[b]]
            att = torch.softmax(pool.queries @ pool.key(xs).T / math.sqrt(5), dim=-1)
            pooled = att @ xs
            want = pooled.mean(0) if combine == "mean" else pool.combine(pooled.flatten())
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool, ref", [(MeanPool(), lambda v: v.mean(0)), (MaxPool(), lambda v: v.amax(0))])
def test_mean_and_max_match_per_sample(pool, ref):
    x, mask = batch()
    got = pool(x, mask)
    for b in range(4):
        torch.testing.assert_close(got[b], ref(x[b, mask[b]]))


@pytest.mark.parametrize("pool", [MeanPool(), MaxPool(), GeneralizedPooling(), MultiAttentionPooling(5, 2, "concat")])
def test_empty_sets_stay_finite(pool):
    x, _ = batch()
    assert torch.isfinite(pool(x, torch.zeros(4, 6, dtype=torch.bool))).all()
