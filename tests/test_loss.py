"""Contrastive losses against brute-force loops and hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rgfusion.trainer.loss import (
    ContrastiveLoss,
    LossConfig,
    contrastive_loss,
    hard_weight,
    ids_to_tensor,
)


def embeddings(b=6, d=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    cap = F.normalize(img + 0.8 * torch.randn(b, d, generator=g), dim=-1)
    return img.requires_grad_(requires_grad), cap.requires_grad_(requires_grad)


def brute_triplet(img, cap, ids, margin, hardest, cols_img=None, cols_cap=None, col_ids=None):
    """VSE++ loss by explicit loops: anchors are the local rows, candidates the columns."""
    cols_img = img if cols_img is None else cols_img
    cols_cap = cap if cols_cap is None else cols_cap
    col_ids = ids if col_ids is None else col_ids
    total = 0.0
    for i in range(img.shape[0]):
        pos = float(img[i] @ cap[i])
        for anchor, cols in ((img[i], cols_cap), (cap[i], cols_img)):
            costs = [
                max(0.0, margin + float(anchor @ cols[j]) - pos)
                for j in range(cols.shape[0])
                if col_ids[j] != ids[i]
            ]
            total += (max(costs) if costs else 0.0) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("hardest", [False, True])
def test_triplet_matches_brute_force_with_same_image_masked(hardest):
    img, cap = embeddings()
    ids = torch.tensor([10, 11, 12, 10, 13, 11])  # images 10 and 11 were sampled twice
    cfg = LossConfig(warmup_steps=5)
    loss, _ = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=10 if hardest else 0)
    assert loss.item() == pytest.approx(brute_triplet(img, cap, ids.tolist(), 0.2, hardest), rel=1e-5)


# With img = I, the score matrix is S = cap.T exactly (i2t uses rows of S, t2i its columns).
S = torch.tensor([[0.9, 0.5, 0.7], [0.1, 0.8, 0.3], [0.2, 0.6, 0.95]])


def test_hardest_negative_is_picked_by_hand():
    cap = S.T.clone().requires_grad_(True)
    ids = torch.arange(3)
    loss, stats = contrastive_loss(torch.eye(3), cap, ids, ids, cfg=LossConfig(warmup_steps=0, margin=0.3), step=0)
    # i2t row 0: 0.3 + 0.7 - 0.9; t2i caption 1: 0.3 + 0.6 - 0.8; caption 2: 0.3 + 0.7 - 0.95.
    assert loss.item() == pytest.approx(0.1 + 0.1 + 0.05, abs=1e-6)
    loss.backward()
    # Gradient only on each violating anchor's positive (-1) and its hardest negative (+1).
    expected = torch.tensor([[-1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    torch.testing.assert_close(cap.grad, expected.T)
    assert stats["hard_neg_mean"].item() == pytest.approx((0.7 + 0.3 + 0.6 + 0.2 + 0.6 + 0.7) / 6)


def test_same_image_captions_are_never_negatives_by_hand():
    # Images 0 and 2 are the same picture: S[0, 2] = 0.7 (its own other caption) must be ignored.
    ids = torch.tensor([0, 1, 0])
    loss, _ = contrastive_loss(torch.eye(3), S.T.clone(), ids, ids, cfg=LossConfig(warmup_steps=0, margin=0.3), step=0)
    assert loss.item() == pytest.approx(0.3 + 0.6 - 0.8, abs=1e-6)  # only caption 1 violates
    total, _ = contrastive_loss(torch.eye(3), S.T.clone(), ids, ids, cfg=LossConfig(margin=0.3), step=0)
    # All-negatives sum: caption 1 vs images 0 (0.5) and 2 (0.6); image 1 vs captions 0, 2 (0.1, 0.3).
    assert total.item() == pytest.approx(0.0 + 0.1 + 0.0 + 0.0, abs=1e-6)


def test_warmup_weights():
    hard = LossConfig(warmup_steps=3)
    assert [hard_weight(hard, s) for s in range(5)] == [0, 0, 0, 1, 1]
    grad = LossConfig(warmup_steps=2, warmup_mode="gradual", ramp_steps=4)
    assert [hard_weight(grad, s) for s in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    one = LossConfig(warmup_steps=3, warmup_mode="gradual", ramp_steps=1)
    assert [hard_weight(one, s) for s in range(5)] == [hard_weight(hard, s) for s in range(5)]


def test_gradual_blend_is_linear_between_sum_and_max():
    img, cap = embeddings()
    ids = torch.arange(6)
    cfg = LossConfig(warmup_steps=2, warmup_mode="gradual", ramp_steps=4)
    total = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=0)[0]
    hardest = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=9)[0]
    mid = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=3)[0]
    assert mid.item() == pytest.approx(0.5 * total.item() + 0.5 * hardest.item(), rel=1e-6)


def test_lse_relaxation_bounds_the_hard_max():
    img, cap = embeddings(b=8)
    ids = torch.arange(8)
    hard = contrastive_loss(img, cap, ids, ids, cfg=LossConfig(warmup_steps=0), step=0)[0]
    soft = contrastive_loss(img, cap, ids, ids, cfg=LossConfig(warmup_steps=0, max_mode="lse"), step=0)[0]
    sharp = contrastive_loss(
        img, cap, ids, ids, cfg=LossConfig(warmup_steps=0, max_mode="lse", lse_temperature=1e-4), step=0
    )[0]
    # max <= lse <= max + τ ln(n): each of the 16 hinge terms moves by at most 0.01·ln 7.
    assert hard.item() <= soft.item() <= hard.item() + 16 * 0.01 * math.log(7) + 1e-6
    assert sharp.item() == pytest.approx(hard.item(), abs=1e-3)


def test_collapse_is_detected():
    # Every embedding identical: every hardest negative equals its positive.
    img = F.normalize(torch.ones(5, 4), dim=-1)
    ids = torch.arange(5)
    loss, stats = contrastive_loss(img, img.clone(), ids, ids, cfg=LossConfig(warmup_steps=0), step=0)
    assert stats["collapsed_share"].item() == 1.0
    assert loss.item() == pytest.approx(2 * 5 * 0.2)
    assert stats["pos_mean"].item() == pytest.approx(1.0)
    img, cap = embeddings()
    _, healthy = contrastive_loss(img, img.clone(), torch.arange(6), torch.arange(6), cfg=LossConfig(), step=0)
    assert healthy["collapsed_share"].item() == 0.0


def test_collapsed_share_counts_rows_precisely():
    # Row 0: hardest negative == positive - 1e-5 (collapsed); rows 1, 2 healthy.
    img = torch.eye(3)
    cap = torch.tensor([[0.5, 0.5 - 1e-5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    _, stats = contrastive_loss(img, cap, torch.arange(3), torch.arange(3), cfg=LossConfig(), step=0)
    # Anchors: i2t rows 0..2 then t2i rows 0..2; only image 0 (i2t) is collapsed -> 1/6.
    assert stats["collapsed_share"].item() == pytest.approx(1 / 6)


def test_stats_are_detached_tensors():
    img, cap = embeddings(requires_grad=True)
    _, stats = contrastive_loss(img, cap, torch.arange(6), torch.arange(6), cfg=LossConfig(), step=0)
    assert {"collapsed_share", "pos_mean", "neg_mean", "hard_neg_mean", "hard_weight"} <= set(stats)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_infonce_matches_brute_force_and_learns_temperature():
    img, cap = embeddings(requires_grad=True)
    ids = torch.tensor([0, 1, 2, 0, 3, 4])
    module = ContrastiveLoss(LossConfig(kind="infonce", temperature=0.1))
    loss, stats = module(img, cap, ids, ids, step=0)
    assert stats["temperature"].item() == pytest.approx(0.1)
    ref, im, cp = 0.0, img.detach(), cap.detach()
    for i in range(6):
        pos = float(im[i] @ cp[i]) / 0.1
        for anchor, cols in ((im[i], cp), (cp[i], im)):
            logits = [pos] + [float(anchor @ cols[j]) / 0.1 for j in range(6) if ids[j] != ids[i]]
            ref += math.log(sum(math.exp(x) for x in logits)) - pos
    assert loss.item() == pytest.approx(ref / 12, rel=1e-5)
    loss.backward()
    assert module.log_temperature.grad is not None and module.log_temperature.grad != 0
    assert list(ContrastiveLoss(LossConfig()).parameters()) == []


def test_gather_gives_global_negatives_with_local_gradients():
    """Two simulated ranks: the gather returns [rank0 | rank1] with grads only for the local slice."""
    img, cap = embeddings(b=8, seed=3)
    ids = torch.arange(8)
    cfg = LossConfig(warmup_steps=0)
    full, _ = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=0)
    parts = []
    for rank in range(2):
        sl = slice(4 * rank, 4 * rank + 4)
        local_img = img[sl].clone().requires_grad_(True)
        local_cap = cap[sl].clone().requires_grad_(True)
        local = {id(local_img): img, id(local_cap): cap}

        def gather(t, sl=sl, local=local):
            whole = local.get(id(t), ids).clone()
            return torch.cat([whole[: sl.start], t, whole[sl.stop :]]) if t.dtype.is_floating_point else whole

        loss, _ = contrastive_loss(local_img, local_cap, ids[sl], ids[sl], cfg=cfg, step=0, gather=gather)
        loss.backward()
        assert local_img.grad is not None and local_img.grad.abs().sum() > 0
        ref = brute_triplet(img[sl], cap[sl], ids[sl].tolist(), 0.2, True, img, cap, ids.tolist())
        assert loss.item() == pytest.approx(ref, rel=1e-5)
        parts.append(loss.item())
    assert sum(parts) == pytest.approx(full.item(), rel=1e-5)


def test_rows_without_negatives_cost_nothing_and_stay_finite():
    img, cap = embeddings(b=3, requires_grad=True)
    same = torch.zeros(3, dtype=torch.long)
    for cfg in (LossConfig(warmup_steps=0), LossConfig(warmup_steps=0, max_mode="lse"), LossConfig(kind="infonce")):
        loss, stats = contrastive_loss(img, cap, same, same, cfg=cfg, step=0)
        loss.backward()
        assert torch.isfinite(img.grad).all() and stats["collapsed_share"].item() == 0.0
        img.grad = None


def test_misaligned_rows_are_rejected():
    img, cap = embeddings()
    with pytest.raises(ValueError, match="row-aligned"):
        contrastive_loss(img, cap[:4], torch.arange(6), torch.arange(4), cfg=LossConfig(), step=0)


def test_ids_to_tensor_is_stable():
    a = ids_to_tensor(["123", "abc", "123"])
    assert a.dtype == torch.long and a[0] == a[2] and a[0] != a[1]
    assert torch.equal(a, ids_to_tensor(["123", "abc", "123"]))


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(), LossConfig(warmup_steps=0, max_mode="lse"), LossConfig(kind="infonce"),
     LossConfig(warmup_steps=1, warmup_mode="gradual", ramp_steps=4)],
    ids=["sum", "lse", "infonce", "gradual"],
)
def test_loss_never_reads_data_on_the_host(cfg):
    """Runs on the meta device, where any .item()/host copy/data-dependent shape would raise."""
    img = torch.randn(4, 8, device="meta", requires_grad=True)
    ids = torch.arange(4, device="meta")
    loss, stats = contrastive_loss(img, img * 2, ids, ids, cfg=cfg, step=2)
    loss.backward()
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in stats.values())


@pytest.mark.parametrize("kind", ["triplet", "infonce"])
def test_weight_tensor_gives_the_step_s_loss_stats_and_gradients(kind):
    # A captured step reads the hardest-negative weight from a device tensor.
    cfg = LossConfig(kind=kind, warmup_steps=2, warmup_mode="gradual", ramp_steps=4)
    for step in range(8):
        img, cap = (t.requires_grad_() for t in embeddings())
        ids = torch.arange(6)
        ref, ref_stats = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=step)
        (g_img, g_cap) = torch.autograd.grad(ref, [img, cap])
        weight = torch.tensor(hard_weight(cfg, step))
        got, stats = contrastive_loss(img, cap, ids, ids, cfg=cfg, step=10**9, weight=weight)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(torch.autograd.grad(got, [img, cap]), (g_img, g_cap))
        for k, v in ref_stats.items():
            torch.testing.assert_close(stats[k], v, equal_nan=True, msg=k)
