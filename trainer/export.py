"""Consolidated weights for use without DeepSpeed: safetensors + resolved config + vocabulary.

An export folder holds ``model.safetensors`` (the retrieval model's full fp32 state dict),
``config.yaml`` (the resolved run config, secrets redacted), ``vocab.json`` (the dataset
vocabulary, for the BiGRU) and ``export.json`` (feature dims and grid size), which is enough
to rebuild the model and embed images and captions later.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from rgfusion.configs import from_dict
from rgfusion.datasets import Manifest
from rgfusion.trainer.model import ModelConfig, RetrievalModel, build_model

WEIGHTS = "model.safetensors"


def consolidated_state_dict(engine: Any, module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict of ``module`` on rank 0 (every rank must call: ZeRO-3 gathers)."""
    params = list(module.parameters())
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _copy(module) if rank == 0 else None
    return _copy(module) if rank == 0 else None


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def write_export(dest: str | Path, state: dict[str, torch.Tensor], *, config: dict[str, Any],
                 manifest: Manifest, vocab_size: int) -> Path:
    """Write the export folder atomically (a sibling temp folder renamed into place)."""
    from safetensors.torch import save_file

    from rgfusion.datasets.storage import join_url, read_bytes

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if manifest.vocab:
        (tmp / "vocab.json").write_bytes(read_bytes(join_url(manifest.root, manifest.vocab),
                                                    manifest.storage_options))
    (tmp / "export.json").write_text(json.dumps({
        "region_dim": manifest.region_dim, "grid_dim": manifest.grid_dim,
        "grid_size": list(manifest.grid_size), "vocab_size": vocab_size,
        "max_regions": manifest.max_regions, "dataset": manifest.name}, indent=1))
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def load_exported(folder: str | Path, device: str = "cpu") -> tuple[RetrievalModel, dict[str, Any]]:
    """(model in eval mode, info with 'config' and the dims) from an export folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no {WEIGHTS})")
    info = json.loads((folder / "export.json").read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    model_cfg = from_dict(ModelConfig, config["model"], str(folder / "config.yaml"), "model.")
    model = build_model(model_cfg, region_dim=info["region_dim"], grid_dim=info["grid_dim"],
                        grid_size=tuple(info["grid_size"]), vocab_size=info["vocab_size"])
    model.load_state_dict(load_file(str(folder / WEIGHTS), device="cpu"))
    return model.to(device).eval(), {**info, "config": config}
