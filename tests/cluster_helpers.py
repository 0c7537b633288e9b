"""Tiny data and recipe overrides shared by the cluster tests (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

# A tiny full model that trains a few steps per epoch on 2 cores; all-negative loss throughout.
TINY = {
    "model.width": 16, "model.heads": 2, "model.map_heads": 2, "model.graph_layers": 1,
    "model.text.word_dim": 16,
    "data.num_workers": 0, "data.shuffle_buffer": 16, "data.max_words": 12,
    "loss.warmup_steps": 100000, "optim.lr": 3.0e-3, "optim.warmup_steps": 1, "optim.schedule": "constant",
    "train.batch_size": 8, "train.steps_per_epoch": 3, "train.log_every": 1, "train.progress": False,
    "train.zero_stage": 1, "eval.batch_size": 16, "checkpoint.every_steps": 0,
    "tracking.system_metrics": False,
}


def tiny_sets(extra: dict | None = None) -> list[str]:
    """``--set`` items for TINY plus ``extra`` (extra wins)."""
    items = {**TINY, **(extra or {})}
    return [f"{k}={'false' if v is False else 'true' if v is True else v}" for k, v in items.items()]


def write_tiny_data(root: Path, storage_options: dict | None = None) -> str:
    """A synthetic dataset of 32 train / 16 dev / 16 test images with tiny features."""
    from rgfusion.datasets.synth import SynthConfig, write_synthetic

    cfg = SynthConfig(train_images=32, dev_images=16, test_images=16, samples_per_shard=8, region_dim=8,
                      grid_dim=8, grid_size=(2, 2), max_regions=4)
    write_synthetic(cfg, str(root), storage_options, progress=False)
    return str(root)
