"""Image–text retrieval metrics as pure functions (R@K, median/mean rank, RSUM, dataset protocols).

Ranks are 0-based counts of wrong candidates scored at least as high as the right one: ties count
against the model, so a collapsed model (all scores equal) scores 0 instead of a perfect R@1.
Similarities are computed in chunks of rows, so memory stays at ``chunk × n_candidates`` scores
(5,000 images × 25,000 captions never materialise at once).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RECALL_AT = (1, 5, 10)


@torch.no_grad()
def i2t_ranks(img_emb: Tensor, cap_emb: Tensor, cap_to_img: Tensor, chunk: int = 1000) -> Tensor:
    """(N,) rank of each image's best-ranked caption among all captions."""
    # Written in place into one buffer: per-chunk result tensors kept alive between the large
    # temporaries fragment the heap (glibc) and RSS grows by GBs over a 5K × 25K evaluation.
    ranks = torch.empty(img_emb.shape[0], dtype=torch.long, device=img_emb.device)
    for start in range(0, img_emb.shape[0], chunk):
        s = img_emb[start : start + chunk] @ cap_emb.T
        own = cap_to_img[None, :] == torch.arange(start, start + s.shape[0], device=s.device)[:, None]
        best = s.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        torch.sum((s >= best) & ~own, dim=1, out=ranks[start : start + s.shape[0]])
    return ranks


@torch.no_grad()
def t2i_ranks(img_emb: Tensor, cap_emb: Tensor, cap_to_img: Tensor, chunk: int = 1000) -> Tensor:
    """(M,) rank of each caption's image among all images."""
    ranks = torch.empty(cap_emb.shape[0], dtype=torch.long, device=cap_emb.device)
    for start in range(0, cap_emb.shape[0], chunk):
        s = cap_emb[start : start + chunk] @ img_emb.T
        own = s.gather(1, cap_to_img[start : start + s.shape[0], None])
        torch.sum(s >= own, dim=1, out=ranks[start : start + s.shape[0]])
    # The image itself always satisfies s >= own.
    return ranks - 1


def rank_summary(ranks: Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * (r < k).double().mean().item() for k in RECALL_AT}
    # VSE convention: floor(numpy-style median of 0-based ranks) + 1.
    out[f"{prefix}_medr"] = float(torch.quantile(r, 0.5).floor().item() + 1)
    out[f"{prefix}_meanr"] = float(r.mean().item() + 1)
    return out


def retrieval_metrics(img_emb: Tensor, cap_emb: Tensor, cap_to_img: Tensor, chunk: int = 1000) -> dict[str, float]:
    """i2t/t2i R@1/5/10, median and mean rank (1-based) and RSUM (sum of the six recalls)."""
    _check(img_emb, cap_emb, cap_to_img)
    cap_to_img = cap_to_img.to(img_emb.device).long()
    out = rank_summary(i2t_ranks(img_emb, cap_emb, cap_to_img, chunk), "i2t")
    out.update(rank_summary(t2i_ranks(img_emb, cap_emb, cap_to_img, chunk), "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    return out


def evaluate_protocol(
    img_emb: Tensor,
    cap_emb: Tensor,
    cap_to_img: Tensor,
    protocol: str,
    folds: Sequence[Sequence[int]] | None = None,
    chunk: int = 1000,
) -> dict[str, float]:
    """Metrics under a dataset protocol.

    flickr1k, coco5k, all: the whole set is one gallery (Flickr30K's 1K test, COCO's 5K test,
    or any split as is). coco1k5fold: each fold ``[start, end)`` of images (default: 5 equal
    folds) is its own gallery with its captions; every metric is averaged over folds.
    """
    if protocol in ("flickr1k", "coco5k", "all"):
        return retrieval_metrics(img_emb, cap_emb, cap_to_img, chunk)
    if protocol != "coco1k5fold":
        raise ValueError(f"unknown protocol {protocol!r} (flickr1k|coco5k|coco1k5fold|all)")
    n = img_emb.shape[0]
    if folds is None:
        if n % 5:
            raise ValueError(f"coco1k5fold needs explicit folds when {n} images do not split into 5")
        folds = [(i * n // 5, (i + 1) * n // 5) for i in range(5)]
    cap_to_img = cap_to_img.to(img_emb.device).long()
    results = []
    for start, end in folds:
        sel = (cap_to_img >= start) & (cap_to_img < end)
        results.append(retrieval_metrics(img_emb[start:end], cap_emb[sel], cap_to_img[sel] - start, chunk))
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _check(img_emb: Tensor, cap_emb: Tensor, cap_to_img: Tensor) -> None:
    if img_emb.ndim != 2 or cap_emb.ndim != 2 or img_emb.shape[1] != cap_emb.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (M, D), got {tuple(img_emb.shape)} and {tuple(cap_emb.shape)}")
    if cap_to_img.shape != (cap_emb.shape[0],):
        raise ValueError(f"cap_to_img must have shape ({cap_emb.shape[0]},), got {tuple(cap_to_img.shape)}")
    idx = cap_to_img.long().cpu()
    if idx.numel() and (idx.min() < 0 or idx.max() >= img_emb.shape[0]):
        raise ValueError(f"cap_to_img has image indices outside [0, {img_emb.shape[0]})")
    if (torch.bincount(idx, minlength=img_emb.shape[0]) == 0).any():
        raise ValueError("every image needs at least one caption in cap_to_img")
