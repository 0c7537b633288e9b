"""Retrieval evaluation: every rank embeds its share, rank 0 computes the metrics once.

Ranks step in lock-step (a rank that ran out of batches repeats a dummy forward) because a
ZeRO-3 forward gathers parameters collectively. Embeddings travel to rank 0, are put in
canonical order (the split's order in the manifest; natural order of image ids for batches
that carry no positions), and scored under the split's protocol plus any
extra protocols the manifest names (COCO test: 5-fold 1K and 5K). Every rank receives the
result, so all agree on which epoch is best.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgfusion.datasets import Batch, DataConfig, Manifest, eval_loader
from rgfusion.trainer.metrics import evaluate_protocol

log = logging.getLogger(__name__)

TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass
class Embedded:
    """One split's embeddings in canonical image order."""

    image_ids: list[str]
    images: torch.Tensor  # (N, D) float32
    captions: torch.Tensor  # (M, D) float32
    cap_to_img: torch.Tensor  # (M,) long, index into images


def natural_key(image_id: str) -> list[Any]:
    """``img-10`` after ``img-9``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", image_id)]


def protocols_for(manifest: Manifest, split: str) -> list[str]:
    info = manifest.split(split)
    extra = (manifest.meta or {}).get("extra_protocols", {}).get(split, [])
    return [info.protocol, *[p for p in extra if p != info.protocol]]


def dummy_batch(manifest: Manifest) -> Batch:
    """A one-image batch of valid shapes for ranks that ran out of real ones."""
    r = manifest.max_regions
    mask = torch.zeros(1, r, dtype=torch.bool)
    mask[0, 0] = True
    return Batch(regions=torch.zeros(1, r, manifest.region_dim), boxes=torch.zeros(1, r, 4), region_mask=mask,
                 grids=torch.zeros(1, manifest.grid_cells, manifest.grid_dim), grid_size=tuple(manifest.grid_size),
                 tokens=torch.tensor([[2, 3]]), lengths=torch.tensor([2]),
                 attention_mask=torch.ones(1, 2, dtype=torch.bool), caption_image=torch.tensor([0]),
                 image_ids=["<dummy>"])


@torch.no_grad()
def embed_local(model: nn.Module, loader: Any, manifest: Manifest, *, device: str, dtype: torch.dtype,
                world_size: int) -> tuple[list[str], list[Any], torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (image ids, sort keys, image emb, caption emb, caption -> local image index)."""
    import torch.distributed as dist

    ids: list[str] = []
    keys: list[Any] = []
    imgs, caps, owners = [], [], []
    it = iter(loader)
    spare = dummy_batch(manifest)
    lockstep = world_size > 1 and dist.is_initialized()
    while True:
        batch = next(it, None)
        if lockstep:
            more = torch.tensor([0.0 if batch is None else 1.0], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if more.item() == 0:
                break
        elif batch is None:
            break
        b = (batch or spare).to(device, dtype)
        img = model.embed_images(b.regions, b.boxes, b.region_mask, b.grids)
        cap = model.embed_captions(b.tokens, b.lengths, b.attention_mask)
        if batch is None:
            continue
        owners.append(batch.caption_image + len(ids))
        ids.extend(batch.image_ids)
        keys.extend(batch.positions.tolist() if batch.positions is not None
                    else [natural_key(i) for i in batch.image_ids])
        imgs.append(img.float().cpu())
        caps.append(cap.float().cpu())
    width = imgs[0].shape[1] if imgs else 0
    cat = (lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape))
    return ids, keys, cat(imgs, (0, width)), cat(caps, (0, width)), cat(owners, (0,)).long()


def assemble(parts: list[tuple[list[str], list[Any], torch.Tensor, torch.Tensor, torch.Tensor]]) -> Embedded:
    """All ranks' parts in canonical image order (ascending sort key)."""
    ids: list[str] = []
    keys: list[Any] = []
    imgs, caps, owners = [], [], []
    for pid, pkeys, pimg, pcap, powner in parts:
        if not pid:  # a rank without shards of this split
            continue
        owners.append(powner + len(ids))
        ids.extend(pid)
        keys.extend(pkeys)
        imgs.append(pimg)
        caps.append(pcap)
    images, captions, owner = torch.cat(imgs), torch.cat(caps), torch.cat(owners)
    order = sorted(range(len(ids)), key=keys.__getitem__)
    position = torch.empty(len(ids), dtype=torch.long)
    position[torch.tensor(order, dtype=torch.long)] = torch.arange(len(ids))
    cap_to_img = position[owner]
    # Captions grouped by image in canonical order (stable within an image).
    cap_order = torch.argsort(cap_to_img, stable=True)
    return Embedded([ids[i] for i in order], images[order], captions[cap_order], cap_to_img[cap_order])


def score(emb: Embedded, manifest: Manifest, split: str) -> dict[str, Any]:
    """{"split", "images", "captions", "protocols": {name: metrics}} for one split."""
    info = manifest.split(split)
    if len(emb.image_ids) != info.num_samples:
        log.warning("%s: evaluated %d images, the manifest lists %d (bad samples were skipped)",
                    split, len(emb.image_ids), info.num_samples)
    results = {}
    for proto in protocols_for(manifest, split):
        folds = info.folds if proto == "coco1k5fold" and len(emb.image_ids) == info.num_samples else None
        results[proto] = evaluate_protocol(emb.images, emb.captions, emb.cap_to_img, proto, folds)
    return {"split": split, "images": len(emb.image_ids), "captions": int(emb.captions.shape[0]),
            "protocols": results}


def evaluate_split(model: nn.Module, data_cfg: DataConfig, manifest: Manifest, text: Any, *, split: str,
                   batch_size: int, rank: int, world_size: int, device: str,
                   dtype: torch.dtype) -> dict[str, Any]:
    """Embed on every rank, score on rank 0, and hand the report to every rank."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    try:
        loader = eval_loader(data_cfg, manifest, text, split=split, batch_size=batch_size, rank=rank,
                             world_size=world_size, pin_memory=device.startswith("cuda"))
        local = embed_local(model, loader, manifest, device=device, dtype=dtype, world_size=world_size)
    finally:
        model.train(was_training)
    distributed = dist.is_initialized() and world_size > 1
    parts: list[Any] = [None] * world_size if rank == 0 else []
    if distributed:
        dist.gather_object(local, parts if rank == 0 else None, dst=0)
    else:
        parts = [local]
    report: list[Any] = [score(assemble(parts), manifest, split) if rank == 0 else None]
    if rank == 0:
        log.info("scored %s: %d images, %d captions, rsum %.1f", split, report[0]["images"],
                 report[0]["captions"], primary(report[0])["rsum"])
    if distributed:
        dist.broadcast_object_list(report, src=0)
    return report[0]


def primary(report: dict[str, Any]) -> dict[str, float]:
    """Metrics of the split's main protocol (the first listed)."""
    return next(iter(report["protocols"].values()))


def flat_metrics(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{prefix}/{metric}`` for the main protocol and ``{prefix}/{protocol}/{metric}`` for all."""
    out = {f"{prefix}/{k}": v for k, v in primary(report).items()}
    if len(report["protocols"]) > 1:
        for proto, metrics in report["protocols"].items():
            out.update({f"{prefix}/{proto}/{k}": v for k, v in metrics.items()})
    return out


def format_table(reports: list[dict[str, Any]]) -> str:
    """Recall table, one row per (split, protocol)."""
    head = f"{'split':<8}{'protocol':<13}" + "".join(f"{k:>9}" for k in TABLE_KEYS)
    rows = [head, "-" * len(head)]
    for rep in reports:
        for proto, m in rep["protocols"].items():
            rows.append(f"{rep['split']:<8}{proto:<13}" + "".join(f"{m[k]:>9.1f}" for k in TABLE_KEYS))
    return "\n".join(rows)


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(p)
    return p
