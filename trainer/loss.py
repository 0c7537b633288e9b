"""Contrastive losses for the joint embedding: VSE++ hinge triplet (with warm-up and relaxations)
and InfoNCE, with same-image masking and optional cross-rank negatives."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

# Hardest negative this close to (or above) the positive counts as a collapsed row.
COLLAPSE_TOL = 1e-4
# CLIP's cap on 1/temperature (logit scale <= 100) keeps a learnable temperature from blowing up.
MIN_TEMPERATURE = 0.01


@dataclass
class LossConfig:
    """Which contrastive loss, and the remedies for hardest-negative collapse."""

    # triplet: VSE++ hinge loss; infonce: softmax cross-entropy over the batch (CLIP-style).
    kind: Literal["triplet", "infonce"] = "triplet"
    # Hinge margin of the triplet loss; 0.2 is the VSE++/VSE∞ value for cosine similarities.
    margin: float = 0.2
    # Steps summing the hinge over all negatives before hardest negatives take over: hardest
    # negatives from random init collapse (VSE++ warms up ~1 epoch; ~1000 steps at batch 128).
    warmup_steps: int = 1000
    # After warm-up: switch to hardest negatives at once, or blend linearly over `ramp_steps`.
    warmup_mode: Literal["hard_switch", "gradual"] = "hard_switch"
    # Length of the gradual blend (all negatives -> hardest); 1 behaves like hard_switch.
    ramp_steps: int = 1000
    # How the hardest negative is taken: exact max, or τ·logsumexp(s/τ), a smooth upper bound
    # (max <= lse <= max + τ·ln n) that spreads gradient over near-hardest negatives.
    max_mode: Literal["hard", "lse"] = "hard"
    # τ of the LSE relaxation; 0.01 keeps τ·ln(127) ≈ 0.05 well below the margin.
    lse_temperature: float = 0.01
    # InfoNCE softmax temperature (initial value when learned); CLIP starts at 0.07.
    temperature: float = 0.07
    # Learn the InfoNCE temperature (as log τ, in :class:`ContrastiveLoss`).
    learn_temperature: bool = True

    def __post_init__(self) -> None:
        if self.margin < 0 or self.warmup_steps < 0 or self.ramp_steps < 1:
            raise ValueError("margin and warmup_steps must be >= 0 and ramp_steps >= 1")
        if self.lse_temperature <= 0 or self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"lse_temperature must be > 0 and temperature >= {MIN_TEMPERATURE}")


Gather = Callable[[Tensor], Tensor]


def hard_weight(cfg: LossConfig, step: int) -> float:
    """Weight of the hardest-negative term (0 = all negatives summed, 1 = hardest only)."""
    if step < cfg.warmup_steps:
        return 0.0
    if cfg.warmup_mode == "hard_switch":
        return 1.0
    return min(1.0, (step - cfg.warmup_steps + 1) / cfg.ramp_steps)


def contrastive_loss(
    img: Tensor,
    cap: Tensor,
    img_ids: Tensor,
    cap_ids: Tensor,
    *,
    cfg: LossConfig,
    step: int,
    gather: Gather | None = None,
    log_temperature: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss over the local pairs and detached stats.

    Row i of ``img`` and of ``cap`` form a positive pair (training batches hold one caption per
    image). Every row is an anchor twice: image→captions and caption→images. Candidates are the
    columns of the (optionally gathered, global) batch; a column whose id equals the anchor's
    (``img_ids``/``cap_ids``: integers naming the image, see :func:`ids_to_tensor`) is never a
    negative — that covers the positive itself and the same image sampled twice.
    ``gather(t)`` must return the global tensor with gradient flowing back to the local slice.

    Triplet: summed over anchors (VSE++), so a fully collapsed batch scores 2·B·margin. The
    hardest-negative weight is ``hard_weight(cfg, step)``, or ``weight`` (a 0-d tensor) when
    given: then both terms are always computed and blended on the device, so a captured CUDA
    graph replays correctly at every step of the warm-up and ramp (``step`` is then unused).
    InfoNCE: mean over anchors, temperature ``exp(log_temperature)`` or ``cfg.temperature``.
    Stats (0-d tensors, no host sync): ``collapsed_share`` = share of the 2·B anchors that have
    a negative and whose hardest negative similarity is >= positive − 1e-4; ``pos_mean``,
    ``neg_mean`` (over all negative pairs), ``hard_neg_mean``, ``hard_weight``, ``temperature``.
    """
    if img.shape != cap.shape or img_ids.shape != (img.shape[0],) or cap_ids.shape != img_ids.shape:
        raise ValueError(
            f"img {tuple(img.shape)}, cap {tuple(cap.shape)} and their ids must be row-aligned positive pairs"
        )
    all_img, all_cap, all_img_ids, all_cap_ids = (
        (img, cap, img_ids, cap_ids) if gather is None else (gather(img), gather(cap), gather(img_ids), gather(cap_ids))
    )
    pos = (img * cap).sum(-1).repeat(2)
    scores = torch.cat([img @ all_cap.T, cap @ all_img.T])
    neg = torch.cat([img_ids[:, None] != all_cap_ids[None, :], cap_ids[:, None] != all_img_ids[None, :]])
    has_neg = neg.any(1)
    if cfg.kind == "triplet":
        w = hard_weight(cfg, step) if weight is None else weight
        loss = scores.new_zeros(())
        if weight is not None or w < 1:
            loss = loss + (1 - w) * ((cfg.margin + scores - pos[:, None]).clamp(min=0) * neg).sum()
        if weight is not None or w > 0:
            hardest = _hardest(scores, neg, has_neg, cfg.lse_temperature if cfg.max_mode == "lse" else None)
            loss = loss + w * ((cfg.margin + hardest - pos).clamp(min=0) * has_neg).sum()
        temperature = scores.new_full((), float("nan"))
    else:
        w = 0.0
        temperature = (
            log_temperature.exp().clamp(min=MIN_TEMPERATURE)
            if log_temperature is not None
            else scores.new_full((), cfg.temperature)
        )
        logits = torch.cat([pos[:, None], scores.masked_fill(~neg, float("-inf"))], dim=1) / temperature
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return loss, _stats(scores.detach(), pos.detach(), neg, has_neg, w, temperature.detach())


def _hardest(scores: Tensor, neg: Tensor, has_neg: Tensor, lse_temperature: float | None) -> Tensor:
    """Per-row hardest negative (exact max, or LSE relaxation); 0 for rows without negatives."""
    masked = torch.where(has_neg[:, None], scores.masked_fill(~neg, float("-inf")), 0.0)
    if lse_temperature is None:
        return masked.amax(1)
    return lse_temperature * torch.logsumexp(masked / lse_temperature, dim=1)


def _stats(
    scores: Tensor, pos: Tensor, neg: Tensor, has_neg: Tensor, w: float | Tensor, temperature: Tensor
) -> dict[str, Tensor]:
    hardest = _hardest(scores, neg, has_neg, None)
    collapsed = has_neg & (hardest >= pos - COLLAPSE_TOL)
    negf = neg.to(scores.dtype)
    return {
        "collapsed_share": collapsed.float().mean(),
        "pos_mean": pos.mean(),
        "neg_mean": (scores * negf).sum() / negf.sum().clamp(min=1),
        "hard_neg_mean": (hardest * has_neg).sum() / has_neg.sum().clamp(min=1),
        # A fill kernel, not a host copy (CUDA graphs).
        "hard_weight": w.detach().to(scores.dtype) if isinstance(w, Tensor) else scores.new_full((), w),
        "temperature": temperature,
    }


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss` with the learnable InfoNCE temperature as a parameter.

    Its parameters (none for the triplet loss) must join the optimizer with the model's.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        learn = cfg.kind == "infonce" and cfg.learn_temperature
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature))) if learn else None

    def forward(
        self, img: Tensor, cap: Tensor, img_ids: Tensor, cap_ids: Tensor, *, step: int, gather: Gather | None = None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return contrastive_loss(img, cap, img_ids, cap_ids, cfg=self.cfg, step=step, gather=gather,
                                log_temperature=self.log_temperature, weight=weight)


def ids_to_tensor(image_ids: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """Stable int64 ids for image-id strings (same string -> same integer on every rank/process)."""
    values = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True) for s in image_ids]
    return torch.tensor(values, dtype=torch.long, device=device)
