"""Retrieval metrics against hand-computed values and a brute-force (sort-based) reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rgfusion.trainer.metrics import evaluate_protocol, retrieval_metrics

# 3 images × 6 captions (2 each); with cap_emb = I the similarity matrix is exactly S.
S = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.35],
    ]
)
CAP_TO_IMG = torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_computed_values():
    m = retrieval_metrics(S, torch.eye(6), CAP_TO_IMG, chunk=2)
    # i2t ranks: image 0 -> 0; image 1 best own 0.5 below 0.7, 0.6 -> 2; image 2 0.35 below 0.4 -> 1.
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == pytest.approx(2.0)
    # t2i ranks per caption: [0, 2, 1, 2, 2, 0]; median 1.5 -> floor + 1 = 2.
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(7 / 6 + 1)
    assert m["rsum"] == pytest.approx(2 * (100 / 3) + 4 * 100.0)


def test_ties_count_against_the_model():
    m = retrieval_metrics(torch.ones(3, 4), torch.ones(6, 4), CAP_TO_IMG)
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_meanr"] == 5.0 and m["t2i_meanr"] == 3.0


def brute_force(img, cap, cap_to_img):
    """VSE-style reference: full similarity matrix, argsort, position of the ground truth."""
    sims = (img @ cap.T).numpy()
    c2i = cap_to_img.numpy()
    i2t = np.array([min(np.where(np.argsort(-sims[i]) == c)[0][0] for c in np.where(c2i == i)[0]) for i in range(len(img))])
    t2i = np.array([np.where(np.argsort(-sims[:, j]) == c2i[j])[0][0] for j in range(len(cap))])
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r < k)
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def random_set(n, per=5, d=16, seed=0, noise=2.0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    cap_to_img = torch.arange(n).repeat_interleave(per)
    cap = torch.nn.functional.normalize(img[cap_to_img] + noise * torch.randn(n * per, d, generator=g) / d**0.5, dim=-1)
    return img, cap, cap_to_img


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_matches_brute_force(chunk):
    img, cap, c2i = random_set(37)
    got = retrieval_metrics(img, cap, c2i, chunk=chunk)
    want = brute_force(img, cap, c2i)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_uneven_caption_counts_and_shuffled_captions():
    img, cap, c2i = random_set(12, seed=1)
    keep = torch.randperm(len(c2i), generator=torch.Generator().manual_seed(2))[:40]
    c2i = c2i[keep]
    if len(set(c2i.tolist())) < 12:  # every image needs a caption
        c2i = torch.cat([c2i, torch.arange(12)])
        keep = torch.cat([keep, torch.arange(12) * 5])
    got = retrieval_metrics(img, cap[keep], c2i, chunk=5)
    want = brute_force(img, cap[keep], c2i)
    for k in want:
        assert got[k] == pytest.approx(want[k]), k


def test_coco_1k_five_fold_averages_folds():
    img, cap, c2i = random_set(50, seed=3)
    got = evaluate_protocol(img, cap, c2i, "coco1k5fold")
    folds = [brute_force(img[s : s + 10], cap[5 * s : 5 * s + 50], c2i[5 * s : 5 * s + 50] - s) for s in range(0, 50, 10)]
    for k in folds[0]:
        assert got[k] == pytest.approx(sum(f[k] for f in folds) / 5), k
    explicit = evaluate_protocol(img, cap, c2i, "coco1k5fold", folds=[[i, i + 10] for i in range(0, 50, 10)])
    assert explicit == got
    # Smaller galleries are easier: the fold average beats the whole-set numbers.
    assert got["rsum"] >= evaluate_protocol(img, cap, c2i, "coco5k")["rsum"]


@pytest.mark.parametrize("protocol", ["flickr1k", "coco5k", "all"])
def test_whole_set_protocols(protocol):
    img, cap, c2i = random_set(20, seed=4)
    assert evaluate_protocol(img, cap, c2i, protocol) == retrieval_metrics(img, cap, c2i)


def test_bad_inputs_fail_clearly():
    img, cap, c2i = random_set(4)
    with pytest.raises(ValueError, match="every image"):
        retrieval_metrics(img, cap[:5], c2i[:5])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, cap, c2i + 1)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_protocol(img, cap, c2i, "coco2k")
    with pytest.raises(ValueError, match="folds"):
        evaluate_protocol(img[:3], cap[:15], c2i[:15], "coco1k5fold")


def test_5k_by_25k_in_bounded_memory():
    """5,000 images × 25,000 captions: peak memory stays far below the 500 MB a full float32
    similarity matrix would take (measured in a fresh process so other tests don't count)."""
    code = textwrap.dedent(
        """
        import resource, torch
        torch.set_num_threads(1)
        from rgfusion.trainer.metrics import retrieval_metrics
        g = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(5000, 32, generator=g), dim=-1)
        cap = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + torch.randn(25000, 32, generator=g), dim=-1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = retrieval_metrics(img, cap, torch.arange(5000).repeat_interleave(5), chunk=500)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, m["rsum"])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    grew_mb, rsum = out.stdout.split()
    assert int(grew_mb) < 250, out.stdout  # ~80 MB seen with chunk=500
    assert 0 < float(rsum) <= 600
