"""Procedural scenes: the embedded default dataset, built to need region *and* grid features.

Each image is a scene type under a lighting, with 1-4 objects (class, colour, size, box).
Features are ReLU(random projection of a latent code) — non-negative, sparse, dense in every
dimension like CNN activations — and split the information the way the paper describes:

- region features (one per detector box): the object's class clearly, its colour weakly, no
  scene or lighting at all; plus clutter proposals (jittered partial boxes and background junk)
  like a detector's, so regions vary in number and are not all objects;
- grid features (one per cell): the scene and lighting everywhere, plus the colour (strongly)
  and class (weakly) of every object overlapping the cell, summed by overlap — objects sharing
  cells are entangled.

Five captions per image name objects with size and colour, spatial relations ("left of",
"above") and the scene and lighting. Matching a caption needs the scene (grid only), the
classes (clean in regions, entangled in grids) and the colours (strong in grids, weak in
regions): a model that fuses both beats either alone.

Everything is deterministic from ``seed``: the world (codes and projections) from the seed,
each image from (seed, split, index), so split sizes never change other images.
"""

from __future__ import annotations

import builtins
import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from rgfusion.configs import to_dict
from rgfusion.datasets.schema import Manifest, Sample, SplitInfo
from rgfusion.datasets.text import Vocab
from rgfusion.datasets.writer import ShardWriter, write_manifest, write_vocab


SCENES = {"beach": "on a beach", "forest": "in a forest", "kitchen": "in a kitchen",
          "street": "on a street", "office": "in an office", "snowfield": "in the snow",
          "desert": "in a desert", "park": "in a park"}
LIGHTING = {"day": "in daylight", "night": "at night", "sunset": "at sunset"}
CLASSES = ("dog", "cat", "car", "ball", "chair", "bicycle", "bird", "lamp", "cup", "umbrella")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
SIZES = ("small", "large")
SCENE_NAMES = tuple(SCENES)
LIGHTING_NAMES = tuple(LIGHTING)
SPLITS = ("train", "dev", "test")
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class SynthConfig:
    """Options of ``rgfusion data synth`` (defaults: small enough to train on a CPU in minutes)."""

    seed: int = 0  # world and every image derive from it; same seed, same bytes
    train_images: int = 3000  # enough images for a BiGRU vocab and a few hundred steps
    dev_images: int = 500  # model selection set; "all" protocol (one fold)
    test_images: int = 500  # reported set; large enough that R@1 differences are visible
    region_dim: int = 64  # Dr; the paper's bottom-up features are 2048
    grid_dim: int = 64  # Dg; a ResNet C5 map is 2048
    grid_size: tuple[int, int] = (4, 4)  # (H, W); objects of 0.15-0.6 image size span 1-9 cells
    max_regions: int = 12  # regions per image incl. clutter; bottom-up uses 36
    min_objects: int = 1
    max_objects: int = 4  # more objects -> more entanglement in grid cells
    latent_dim: int = 32  # size of the codes projected to features
    region_colour_weight: float = 0.25  # how weakly colour leaks into region features
    grid_colour_weight: float = 1.5  # colour detail of a fully covered cell, vs scene code norm 1
    grid_class_weight: float = 0.3  # how weakly class leaks into grid cells
    # Latent noise norm per feature vector (codes have norm 1). At the defaults a linear probe
    # reads object class from its region at ~1.0 and from its grid cell at ~0.2 (chance 0.1),
    # colour from its region at ~0.45 and from its cell at ~0.7 (chance 0.125), the scene from
    # pooled grids at ~1.0 and from pooled regions at chance.
    noise: float = 0.7
    samples_per_shard: int = 125  # fixed (not by bytes) so every split has >= 4 shards for 2x2 eval slots
    min_count: int = 1  # vocab: words seen fewer times in train captions become <unk>


@dataclass
class SceneObject:
    cls: int
    colour: int
    size: int
    box: np.ndarray  # (4,) normalised x1,y1,x2,y2


@dataclass
class Scene:
    scene: int
    lighting: int
    objects: list[SceneObject]


class World:
    """The fixed codes and projections shared by every image of a dataset."""

    def __init__(self, cfg: SynthConfig):
        rng = np.random.default_rng([cfg.seed, 0])
        d = cfg.latent_dim
        unit = lambda n: _unit(rng.standard_normal((n, d)))  # noqa: E731 - tiny local helper
        self.scene_code = unit(len(SCENES))
        self.light_code = unit(len(LIGHTING)) * 0.6
        self.class_code = unit(len(CLASSES))
        self.colour_code = unit(len(COLOURS))
        self.size_code = unit(len(SIZES)) * 0.3
        self.junk_code = unit(16)
        # Random projections with a negative bias: ReLU leaves about a third of units active,
        # the sparsity of pooled CNN features.
        self.region_proj = rng.standard_normal((d, cfg.region_dim))
        self.grid_proj = rng.standard_normal((d, cfg.grid_dim))
        self.bias = -0.5


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sample_scene(cfg: SynthConfig, rng: np.random.Generator) -> Scene:
    """Scene, lighting and objects drawn independently: region content says nothing of the scene."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects = []
    for _ in range(n):
        size = int(rng.integers(len(SIZES)))
        lo, hi = ((0.15, 0.3), (0.35, 0.6))[size]
        w, h = rng.uniform(lo, hi, size=2)
        x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        box = np.array([x1, y1, x1 + w, y1 + h], dtype=np.float32)
        objects.append(SceneObject(int(rng.integers(len(CLASSES))), int(rng.integers(len(COLOURS))), size, box))
    return Scene(int(rng.integers(len(SCENES))), int(rng.integers(len(LIGHTING))), objects)


def region_features(cfg: SynthConfig, world: World, scene: Scene, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(regions (n, Dr) float16, boxes (n, 4) float32): objects plus clutter, shuffled."""
    latents, boxes = [], []
    for o in scene.objects:
        latents.append(world.class_code[o.cls] + cfg.region_colour_weight * world.colour_code[o.colour]
                       + world.size_code[o.size])
        boxes.append(o.box)
    n_clutter = int(rng.integers(min(2, cfg.max_regions - len(latents)), cfg.max_regions - len(latents) + 1))
    for _ in range(n_clutter):
        if scene.objects and rng.random() < 0.5:
            # A detector's partial, shifted proposal on an object: weaker class evidence.
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            latents.append(0.5 * world.class_code[o.cls] + 0.5 * world.junk_code[int(rng.integers(16))])
            boxes.append(_jitter(o.box, rng))
        else:
            latents.append(world.junk_code[int(rng.integers(16))])
            boxes.append(_random_box(rng))
    z = np.stack(latents) + _noise(cfg, rng, len(latents))
    order = rng.permutation(len(latents))
    feats = _activate(z[order] @ world.region_proj, world.bias)
    return feats.astype(np.float16), np.stack(boxes)[order].astype(np.float32)


def grid_features(cfg: SynthConfig, world: World, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(H*W, Dg) float16: scene + lighting everywhere, objects summed by their overlap per cell."""
    gh, gw = cfg.grid_size
    cells = _cell_boxes(gh, gw)
    z = np.tile(world.scene_code[scene.scene] + world.light_code[scene.lighting], (gh * gw, 1))
    dim = 0.6 if LIGHTING_NAMES[scene.lighting] == "night" else 1.0  # colours fade in the dark
    for o in scene.objects:
        cover = _overlap(o.box, cells) * (gh * gw)  # share of each cell the object covers
        detail = (dim * cfg.grid_colour_weight * world.colour_code[o.colour]
                  + cfg.grid_class_weight * world.class_code[o.cls])
        z += cover[:, None] * detail[None, :]
    z += _noise(cfg, rng, gh * gw)
    return _activate(z @ world.grid_proj, world.bias).astype(np.float16)


def _noise(cfg: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian latent noise of expected norm ``cfg.noise`` (codes have norm 1)."""
    return cfg.noise / np.sqrt(cfg.latent_dim) * rng.standard_normal((n, cfg.latent_dim))


def _activate(x: np.ndarray, bias: float) -> np.ndarray:
    return np.maximum(x + bias, 0.0)


def _cell_boxes(gh: int, gw: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([xs / gw, ys / gh, (xs + 1) / gw, (ys + 1) / gh], -1).reshape(-1, 4)


def _overlap(box: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Intersection area of ``box`` with each cell."""
    w = np.clip(np.minimum(box[2], cells[:, 2]) - np.maximum(box[0], cells[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], cells[:, 3]) - np.maximum(box[1], cells[:, 1]), 0, None)
    return w * h


def _jitter(box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    shift = rng.uniform(-0.3, 0.3, size=4) * np.array([w, h, w, h])
    b = np.clip(box + shift, 0, 1)
    return np.array([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])], np.float32)


def _random_box(rng: np.random.Generator) -> np.ndarray:
    w, h = rng.uniform(0.1, 0.7, size=2)
    x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return np.array([x1, y1, x1 + w, y1 + h], np.float32)


def describe(o: SceneObject, with_size: bool) -> str:
    words = ([SIZES[o.size]] if with_size else []) + [COLOURS[o.colour], CLASSES[o.cls]]
    return " ".join(words)


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis their centres differ most (y grows down)."""
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` phrasings; each names the scene, the lighting and objects with attributes, most a
    spatial relation between two objects."""
    where, when = SCENES[SCENE_NAMES[scene.scene]], LIGHTING[LIGHTING_NAMES[scene.lighting]]
    objs = scene.objects
    out = []
    for k in range(n):
        order = rng.permutation(len(objs))
        a = objs[order[0]]
        b = objs[order[1]] if len(objs) > 1 else None
        style = k % 5
        if style == 0:
            rel = f" {relation(a, b)} a {describe(b, False)}" if b else ""
            out.append(f"a {describe(a, True)}{rel} {where} {when}")
        elif style == 1:
            rel = f" {relation(a, b)} a {describe(b, True)}" if b else " alone"
            out.append(f"{when} {where}, a {describe(a, False)}{rel}")
        elif style == 2:
            things = " and ".join(f"a {describe(objs[i], True)}" for i in order)
            name = SCENE_NAMES[scene.scene]
            out.append(f"{'an' if name[0] in 'aeiou' else 'a'} {name} scene {when} with {things}")
        elif style == 3:
            things = ", ".join(describe(objs[i], False) for i in order)
            count = _NUMBER[len(objs)] + (" object" if len(objs) == 1 else " objects")
            out.append(f"{count} {where} {when}: {things}")
        else:
            out.append(f"{where} {when} there is a {describe(a, True)}")
    return out


def generate(cfg: SynthConfig, world: World, split: str, index: int) -> tuple[Sample, Scene]:
    rng = np.random.default_rng([cfg.seed, 1 + SPLITS.index(split), index])
    scene = sample_scene(cfg, rng)
    region, boxes = region_features(cfg, world, scene, rng)
    grid = grid_features(cfg, world, scene, rng)
    width, height = ((640, 480), (500, 375), (480, 640))[int(rng.integers(3))]
    sample = Sample(f"synth-{split}-{index:07d}", region, boxes, grid, captions(scene, rng), width, height)
    return sample, scene


def iter_split(cfg: SynthConfig, split: str, world: World | None = None, start: int = 0,
               stop: int | None = None) -> Iterator[tuple[Sample, Scene]]:
    """Images ``start .. stop - 1`` of a split (all by default)."""
    world = world or World(cfg)
    for i in range(start, min(split_size(cfg, split), stop if stop is not None else split_size(cfg, split))):
        yield generate(cfg, world, split, i)


def split_size(cfg: SynthConfig, split: str) -> int:
    return {"train": cfg.train_images, "dev": cfg.dev_images, "test": cfg.test_images}[split]


def validate_config(cfg: SynthConfig) -> None:
    if not 1 <= cfg.min_objects <= cfg.max_objects <= 4:
        raise ValueError("synth: need 1 <= min_objects <= max_objects <= 4")
    if cfg.max_regions < cfg.max_objects:
        raise ValueError(f"synth: max_regions ({cfg.max_regions}) must be >= max_objects ({cfg.max_objects})")
    if min(cfg.region_dim, cfg.grid_dim, cfg.latent_dim, *cfg.grid_size) <= 0:
        raise ValueError("synth: dims and grid_size must be positive")
    if min(cfg.train_images, cfg.dev_images, cfg.test_images) <= 0:
        raise ValueError("synth: every split needs at least one image")


def write_synthetic(cfg: SynthConfig, root_url: str, storage_options: dict[str, Any] | None = None,
                    progress: bool = True, workers: int = 1) -> Manifest:
    """Write all splits, the vocabulary (train captions) and, last, the manifest.

    ``workers`` > 1 writes shards in parallel processes: every image is seeded by
    (seed, split, index), so the bytes are the same whatever the worker count."""
    validate_config(cfg)
    splits, train_captions = {}, []
    for split in SPLITS:
        jobs = [(cfg, root_url, storage_options, split, k) for k in range(-(-split_size(cfg, split) // cfg.samples_per_shard))]
        bar = tqdm(total=split_size(cfg, split), desc=f"synth {split}", unit="img", disable=not progress)
        shards = []
        with _pool(workers) as pool:
            for name, count, caps in pool.map(_write_shard, jobs):
                shards.append((name, count))
                train_captions.extend(caps if split == "train" else ())
                bar.update(count)
        bar.close()
        splits[split] = SplitInfo([n for n, _ in shards], [c for _, c in shards], sum(c for _, c in shards), "all")
    vocab = Vocab.build(train_captions, min_count=cfg.min_count)
    write_vocab(root_url, vocab, storage_options)
    manifest = Manifest(
        name="synthetic", region_dim=cfg.region_dim, grid_dim=cfg.grid_dim,
        grid_size=tuple(cfg.grid_size), max_regions=cfg.max_regions, captions_per_image=5,
        splits=splits, meta={"generator": "rgfusion.datasets.synth", "config": to_dict(cfg)},
        root=root_url, storage_options=dict(storage_options or {}))
    write_manifest(root_url, manifest, storage_options)
    return manifest


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    if workers <= 1:
        yield builtins  # builtins.map: same code path, no processes
        return
    # One BLAS thread per worker: each image's projection is a small matmul, and 62 workers each
    # starting a BLAS team the size of the machine spent most of their time contending.
    single = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = {k: os.environ.get(k) for k in single}
    os.environ.update(single)  # read by the spawned workers as they import numpy
    try:
        # spawn, not fork: the caller may hold torch/OpenMP threads that a fork would copy half-alive.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _write_shard(job: tuple) -> tuple[str, int, list[str]]:
    """Shard ``k`` of a split: images ``k*n .. (k+1)*n - 1``; returns its name, size and captions."""
    cfg, root_url, storage_options, split, k = job
    n = cfg.samples_per_shard
    captions_out: list[str] = []
    with ShardWriter(root_url, split, storage_options=storage_options, samples_per_shard=n,
                     start_index=k, region_dim=cfg.region_dim, grid_dim=cfg.grid_dim,
                     grid_cells=cfg.grid_size[0] * cfg.grid_size[1], max_regions=cfg.max_regions) as w:
        for sample, _ in iter_split(cfg, split, start=k * n, stop=(k + 1) * n):
            w.write(sample)
            captions_out.extend(sample.captions)
    (name, count), = w.close()
    return name, count, captions_out
