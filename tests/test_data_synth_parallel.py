"""Parallel synthesis writes the same bytes as one process (each image is seeded by its index)."""

from __future__ import annotations

from rgfusion.datasets.synth import SynthConfig, write_synthetic


def test_workers_write_identical_dataset(tmp_path):
    cfg = SynthConfig(train_images=30, dev_images=12, test_images=12, samples_per_shard=8,
                      region_dim=8, grid_dim=8, latent_dim=8)
    write_synthetic(cfg, str(tmp_path / "one"), progress=False)
    write_synthetic(cfg, str(tmp_path / "two"), progress=False, workers=2)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert "train-000003.tar" in names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
