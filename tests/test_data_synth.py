"""Synthetic scenes: determinism, captions, and the region/grid information split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgfusion.datasets import DataConfig, build_text_processor, eval_loader, load_manifest
from rgfusion.datasets.synth import (
    CLASSES, COLOURS, LIGHTING, SCENES, SynthConfig, World, generate, iter_split, relation, write_synthetic,
)

SMALL = SynthConfig(train_images=60, dev_images=20, test_images=20, samples_per_shard=25)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    write_synthetic(SMALL, str(tmp_path / "a"), progress=False)
    write_synthetic(SMALL, str(tmp_path / "b"), progress=False)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    other, _ = generate(SynthConfig(seed=1), World(SynthConfig(seed=1)), "train", 0)
    same, _ = generate(SynthConfig(), World(SynthConfig()), "train", 0)
    assert not np.array_equal(other.grid, same.grid)


def test_split_sizes_do_not_change_other_images():
    a, _ = generate(SMALL, World(SMALL), "test", 3)
    bigger = SynthConfig(train_images=999, test_images=40)
    b, _ = generate(bigger, World(bigger), "test", 3)
    np.testing.assert_array_equal(a.region, b.region)
    assert a.captions == b.captions


def test_round_trip_through_reader(tmp_path):
    m = write_synthetic(SMALL, str(tmp_path), progress=False)
    assert m.splits["train"].samples_per_shard == [25, 25, 10] and m.splits["dev"].protocol == "all"
    loaded = load_manifest(str(tmp_path))
    assert loaded == m
    cfg = DataConfig(url=str(tmp_path), num_workers=0, dtype="float16")
    text = build_text_processor(cfg, loaded)
    expected = {s.image_id: s for s, _ in iter_split(SMALL, "test")}
    for b in eval_loader(cfg, loaded, text, split="test", batch_size=8, rank=0, world_size=1):
        for i, image_id in enumerate(b.image_ids):
            s = expected.pop(image_id)
            np.testing.assert_array_equal(b.regions[i, : len(s.region)].numpy(), s.region)
            np.testing.assert_array_equal(b.grids[i].numpy(), s.grid)
            assert torch.equal(b.tokens[b.caption_image == i][:, :1], torch.full((5, 1), 2))
    assert not expected
    assert text.vocab_size > 40


def test_features_look_like_cnn_activations():
    s, scene = generate(SynthConfig(), World(SynthConfig()), "train", 7)
    for feats in (s.region.astype(np.float32), s.grid.astype(np.float32)):
        assert feats.min() >= 0 and 0.15 < (feats > 0).mean() < 0.7  # ReLU-sparse, not one-hot
    assert len(scene.objects) <= s.region.shape[0] <= SynthConfig().max_regions


def test_paper_dims():
    cfg = SynthConfig(region_dim=2048, grid_dim=2048, grid_size=(7, 7), max_regions=36, latent_dim=64)
    s, _ = generate(cfg, World(cfg), "train", 0)
    assert s.region.shape[1] == 2048 and s.region.shape[0] <= 36 and s.grid.shape == (49, 2048)
    s.validate(region_dim=2048, grid_dim=2048, grid_cells=49, max_regions=36)


def test_captions_name_scene_lighting_objects_and_relations():
    cfg = SynthConfig()
    world = World(cfg)
    for i in range(30):
        s, scene = generate(cfg, world, "train", i)
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
        scene_words = {list(SCENES)[scene.scene], SCENES[list(SCENES)[scene.scene]]}
        light = LIGHTING[list(LIGHTING)[scene.lighting]]
        for c in s.captions:
            assert any(w in c for w in scene_words) and light in c
            assert any(f"{COLOURS[o.colour]} {CLASSES[o.cls]}" in c for o in scene.objects)
        if len(scene.objects) > 1:
            assert any(r in " ".join(s.captions) for r in ("left of", "right of", "above", "below"))


def test_relation_follows_box_centres():
    from rgfusion.datasets.synth import SceneObject

    def obj(x, y):
        return SceneObject(0, 0, 0, np.array([x, y, x + 0.1, y + 0.1], np.float32))

    assert relation(obj(0.1, 0.5), obj(0.6, 0.5)) == "to the left of"
    assert relation(obj(0.6, 0.5), obj(0.1, 0.45)) == "to the right of"
    assert relation(obj(0.5, 0.1), obj(0.5, 0.7)) == "above"
    assert relation(obj(0.5, 0.8), obj(0.45, 0.1)) == "below"


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Linear probe (multinomial logistic regression, full-batch L-BFGS) test accuracy."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = (torch.tensor((x - mean) / std, dtype=torch.float32) for x in (train_x, test_x))
    layer = torch.nn.Linear(xs.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    ys = torch.tensor(train_y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xs), ys) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((layer(xt).argmax(1) == torch.tensor(test_y)).float().mean())


@pytest.fixture(scope="module")
def pooled_features():
    """Mean-pooled region and grid features with the scene label, 600 train / 300 test images."""
    torch.set_num_threads(1)
    cfg = SynthConfig(train_images=600, test_images=300)
    world = World(cfg)
    out = {}
    for split in ("train", "test"):
        rows = [(s.region.astype(np.float32).mean(0), s.grid.astype(np.float32).mean(0), scene.scene)
                for s, scene in iter_split(cfg, split, world)]
        out[split] = tuple(np.stack([r[k] for r in rows]) for k in range(3))
    return out


def test_scene_is_decodable_from_grid_not_from_regions(pooled_features):
    (rtr, gtr, ytr), (rte, gte, yte) = pooled_features["train"], pooled_features["test"]
    chance = 1 / len(SCENES)
    grid_acc = probe_accuracy(gtr, ytr, gte, yte, len(SCENES))
    region_acc = probe_accuracy(rtr, ytr, rte, yte, len(SCENES))
    assert grid_acc > 0.9, grid_acc
    assert region_acc < chance + 0.1, region_acc


def test_objects_split_between_regions_and_grids():
    """Per object: its region feature vs the grid cell at its box centre (entangled with the scene
    and other objects). Class is clean in regions and weak in grids; colour the other way round."""
    torch.set_num_threads(1)
    cfg = SynthConfig(train_images=400, test_images=200)
    world = World(cfg)
    gh, gw = cfg.grid_size
    data = {}
    for split in ("train", "test"):
        rows = []
        for s, scene in iter_split(cfg, split, world):
            for o in scene.objects:
                match = np.flatnonzero((s.boxes == o.box).all(1))[0]
                cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
                cell = min(int(cy * gh), gh - 1) * gw + min(int(cx * gw), gw - 1)
                rows.append((s.region[match].astype(np.float32), s.grid[cell].astype(np.float32), o.cls, o.colour))
        data[split] = [np.stack([r[k] for r in rows]) for k in range(4)]
    (rtr, gtr, ctr, ktr), (rte, gte, cte, kte) = data["train"], data["test"]
    cls_region = probe_accuracy(rtr, ctr, rte, cte, len(CLASSES))
    cls_grid = probe_accuracy(gtr, ctr, gte, cte, len(CLASSES))
    col_region = probe_accuracy(rtr, ktr, rte, kte, len(COLOURS))
    col_grid = probe_accuracy(gtr, ktr, gte, kte, len(COLOURS))
    accs = dict(cls_region=cls_region, cls_grid=cls_grid, col_region=col_region, col_grid=col_grid)
    assert cls_region > 0.95 and cls_grid < cls_region - 0.4, accs
    assert col_region > 1 / len(COLOURS) + 0.1 and col_grid > col_region + 0.15, accs
