"""``rgfusion data convert``: existing feature dumps -> shards, streaming, resumable.

Every layout (``convert_sources.py``) becomes a ``Source``: a cheap ``plan()`` pass that reads
only shapes and captions, then ``samples(split, start, stop)`` yielding ``Sample`` objects in a
fixed order. The driver here writes each split with a fixed ``samples_per_shard``, so shard ``i``
always holds samples ``[i*n, (i+1)*n)``: after an interruption a rerun finds the published
prefix of shards, skips it without reading its inputs, and continues; ``manifest.json`` is
written last, so a dataset without one is still being converted.

Memory stays bounded by one sample plus fixed windows (see ``MmapRows``), never by dataset size.

Datasets without boxes or grids are an explicit choice (``--no-boxes`` / ``--no-grids``):
- no boxes: every region gets the whole-image box [0, 0, 1, 1]; manifest ``meta.has_boxes`` false;
- no grids: every sample stores a 1x1 grid of one zero (the schema needs positive dims); manifest
  ``meta.has_grids`` false, ``grid_size`` [1, 1], ``grid_dim`` 1. ``Manifest.has_grids`` lets
  the trainer refuse ``features: grid|both`` on such a dataset;
- no image sizes (precomp without ``{split}_sizes.npy``): width = height = 1 and
  ``meta.has_sizes`` false.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from rgfusion.datasets.cli import add_storage_args, storage_options_from
from rgfusion.datasets.schema import BOX_SLACK, Manifest, Sample, SchemaError, SplitInfo
from rgfusion.datasets.storage import join_url, publish_bytes, read_bytes
from rgfusion.datasets.writer import (
    ShardWriter, complete_prefix, existing_shards, remove_stale_tmp, shard_name, write_manifest, write_vocab,
)

log = logging.getLogger(__name__)

STATE_NAME = "convert-state.json"
# Stand-in grid of a dataset converted with --no-grids (see module docstring).
NO_GRID = np.zeros((1, 1), dtype=np.float16)


class ConvertError(ValueError):
    """Input that cannot be converted, explained in one line."""


@dataclass
class ConvertConfig:
    """Options shared by every layout."""

    out: str  # dataset root URL (local folder, s3://bucket/prefix, ...): shards, vocab, manifest
    dataset: str = "custom"  # coco | flickr30k | custom: fixes the test protocol and COCO's folds
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for ``out``
    # Fixed (not byte-based) so shard i always holds the same samples and a restart can skip
    # finished shards. 500 x (36 + 49) x 2048 float16 is ~175 MB: inside WebDataset's
    # 100 MB - 1 GB guidance, and COCO's 113K train images still give ~227 shards to spread.
    samples_per_shard: int = 500
    # SCAN/VSE∞ vocabularies drop words seen fewer than 4 times in the training captions.
    vocab_min_count: int = 4
    progress: bool = True  # tqdm bars on stderr


@dataclass
class SplitPlan:
    """One output split: its size and how it is evaluated."""

    num_samples: int
    protocol: str = "all"
    folds: list[list[int]] | None = None


@dataclass
class DatasetPlan:
    """What a source will produce, known before any feature is read."""

    region_dim: int
    grid_dim: int
    grid_size: tuple[int, int]
    max_regions: int
    captions_per_image: int
    splits: dict[str, int]  # output split -> number of images, in writing order
    meta: dict[str, Any] = field(default_factory=dict)  # has_boxes/has_grids/has_sizes, source


class Source(Protocol):
    def plan(self) -> DatasetPlan: ...

    def samples(self, split: str, start: int, stop: int) -> Iterator[Sample]: ...

    def train_captions(self) -> Iterable[str]: ...

    def fingerprint(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- dataset conventions

CAPTIONS_PER_IMAGE = 5  # Flickr30K and COCO evaluation: 5 captions per image (COCO's extras dropped)
EXPECTED_SIZES = {
    "coco": {"train": 113_287, "dev": 5_000, "test": 5_000},
    "flickr30k": {"train": 29_000, "dev": 1_014, "test": 1_000},
}
COCO_FOLDS = 5  # COCO 1K results average 5 folds of 1,000 test images


def split_plan(dataset: str, split: str, num_samples: int) -> SplitPlan:
    """Protocol and folds of an output split under the dataset's convention.

    COCO test is the 5K ``testall`` set: evaluated as 5 folds of 1K (``coco1k5fold``, folds in
    the manifest) and, over all images, as ``coco5k``; Flickr30K test is ``flickr1k``."""
    expected = EXPECTED_SIZES.get(dataset, {}).get(split)
    if expected is not None and expected != num_samples:
        log.warning("%s %s has %d images; the standard split has %d", dataset, split, num_samples, expected)
    if split != "test":
        return SplitPlan(num_samples)
    if dataset == "coco":
        if num_samples % COCO_FOLDS:
            raise ConvertError(f"coco test has {num_samples} images, not a multiple of {COCO_FOLDS} folds")
        k = num_samples // COCO_FOLDS
        return SplitPlan(num_samples, "coco1k5fold", [[i * k, (i + 1) * k] for i in range(COCO_FOLDS)])
    if dataset == "flickr30k":
        return SplitPlan(num_samples, "flickr1k")
    return SplitPlan(num_samples)


def extra_protocols(dataset: str) -> dict[str, list[str]]:
    """Protocols beyond each split's main one, recorded in ``manifest.meta``."""
    return {"test": ["coco5k"]} if dataset == "coco" else {}


# ---------------------------------------------------------------- per-sample helpers

def normalise_boxes(boxes: np.ndarray, width: float, height: float, image_id: str) -> np.ndarray:
    """Pixel x1,y1,x2,y2 -> [0,1]. Detectors overshoot by a pixel (clipped); more than that means
    the size is wrong (e.g. height/width swapped), which must not pass silently."""
    if width <= 0 or height <= 0:
        raise ConvertError(f"image {image_id!r}: size {width}x{height} must be positive")
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([width, height, width, height])
    if out.size and (out.min() < -BOX_SLACK or out.max() > 1 + BOX_SLACK):
        raise ConvertError(f"image {image_id!r}: boxes exceed the {width}x{height} image "
                           f"(normalised range [{out.min():.3g}, {out.max():.3g}]); wrong size order?")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def whole_image_boxes(n: int) -> np.ndarray:
    return np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32), (n, 1))


def infer_grid_size(shape: tuple[int, ...], given: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of a grid array of shape (G, D) or (H, W, D); a non-square G needs ``given``."""
    if len(shape) == 3:
        hw = (int(shape[0]), int(shape[1]))
        if given is not None and tuple(given) != hw:
            raise ConvertError(f"grid shape {shape} does not match --grid-size {given[0]}x{given[1]}")
        return hw
    if len(shape) != 2:
        raise ConvertError(f"grid features must be (G, D) or (H, W, D), got shape {shape}")
    if given is not None:
        if given[0] * given[1] != shape[0]:
            raise ConvertError(f"grid has {shape[0]} cells, --grid-size {given[0]}x{given[1]} has "
                               f"{given[0] * given[1]}")
        return tuple(given)
    side = math.isqrt(shape[0])
    if side * side != shape[0]:
        raise ConvertError(f"grid has {shape[0]} cells, not a square: pass --grid-size HxW")
    return side, side


def grid_cells(grid: np.ndarray, grid_size: tuple[int, int], image_id: str) -> np.ndarray:
    """(H*W, D) row-major cells as float16."""
    h, w = grid_size
    fits = grid.shape[:2] == (h, w) if grid.ndim == 3 else grid.ndim == 2 and grid.shape[0] == h * w
    if not fits:
        raise ConvertError(f"image {image_id!r}: grid shape {grid.shape} does not fit grid size {h}x{w}")
    return to_float16(grid.reshape(h * w, grid.shape[-1]))


def to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 through torch: the same IEEE round-to-nearest-even as numpy's
    ``astype`` but vectorised (F16C), ~20x faster here, where the cast was 45% of conversion
    time. Chunks stay under torch's parallel grain size so the cast runs on this thread: on
    shared cores, waking an OpenMP team per call made it 80x slower instead. Other dtypes go
    through numpy (float64 -> float32 -> float16 could round twice)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        return x.astype(np.float16)
    import torch

    out = np.empty(x.shape, dtype=np.float16)
    src = torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else x.copy()).view(-1)
    dst = torch.from_numpy(out).view(-1)
    for a in range(0, src.numel(), _CAST_CHUNK):
        dst[a:a + _CAST_CHUNK].copy_(src[a:a + _CAST_CHUNK])
    return out


_CAST_CHUNK = 32768  # torch's internal GRAIN_SIZE: smaller copies never go parallel


def make_sample(image_id: str, regions: np.ndarray, boxes: np.ndarray, grid: np.ndarray,
                captions: list[str], width: int, height: int) -> Sample:
    """A schema sample; float16 on disk halves the size and is what readers expect."""
    return Sample(image_id=str(image_id), region=to_float16(regions),
                  boxes=boxes, grid=grid, captions=list(captions), width=int(width), height=int(height))


class MmapRows:
    """Rows of a ``.npy`` file through ``np.load(mmap_mode='r')``, re-opened every ``window``
    bytes. Mapped file pages count in the process's resident set until unmapped, so a single
    long-lived memmap of a 60 GB dump would grow RSS to the file size; re-mapping caps it."""

    def __init__(self, path: str, window: int = 64 << 20):
        self.path = path
        self.window = window
        head = np.load(path, mmap_mode="r")
        self.shape, self.dtype = tuple(head.shape), head.dtype
        self._mm: np.ndarray | None = None
        self._touched = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self._mm is None or self._touched >= self.window:
            self._mm = None  # drop the old mapping before making the next one
            self._mm = np.load(self.path, mmap_mode="r")
            self._touched = 0
        row = np.array(self._mm[i])
        self._touched += row.nbytes
        return row


# ---------------------------------------------------------------- the driver

def convert(source: Source, cfg: ConvertConfig) -> Manifest:
    """Write every split's missing shards, then the vocab, then the manifest."""
    plan = source.plan()
    state = {"fingerprint": source.fingerprint(), "dataset": cfg.dataset,
             "samples_per_shard": cfg.samples_per_shard, "vocab_min_count": cfg.vocab_min_count}
    _claim_output(cfg, state, list(plan.splits))
    splits = {name: _write_split(source, name, split_plan(cfg.dataset, name, n), plan, cfg)
              for name, n in plan.splits.items()}
    from rgfusion.datasets.text import Vocab  # imports torch: kept out of `rgfusion --help`

    vocab = Vocab.build(_progress(source.train_captions(), cfg, "vocab", unit="cap"),
                        min_count=cfg.vocab_min_count)
    write_vocab(cfg.out, vocab, cfg.storage_options)
    manifest = Manifest(
        name=cfg.dataset, region_dim=plan.region_dim, grid_dim=plan.grid_dim, grid_size=plan.grid_size,
        max_regions=plan.max_regions, captions_per_image=plan.captions_per_image, splits=splits,
        meta={**plan.meta, "extra_protocols": extra_protocols(cfg.dataset), "converter": state},
        root=cfg.out, storage_options=cfg.storage_options)
    write_manifest(cfg.out, manifest, cfg.storage_options)
    return manifest


def _claim_output(cfg: ConvertConfig, state: dict[str, Any], splits: list[str]) -> None:
    """Record what is being converted; refuse to resume into shards of a different conversion."""
    url = join_url(cfg.out, STATE_NAME)
    text = json.dumps(state, sort_keys=True, indent=1)
    try:
        previous = read_bytes(url, cfg.storage_options).decode("utf-8")
    except FileNotFoundError:
        previous = None
    if previous is not None and json.loads(previous) != json.loads(text):
        raise ConvertError(f"{cfg.out} holds a different conversion (see {STATE_NAME}); "
                           "use an empty output location")
    if previous is None:
        if any(existing_shards(cfg.out, s, cfg.storage_options) for s in splits):
            raise ConvertError(f"{cfg.out} already has shards of unknown origin; use an empty output location")
        publish_bytes(url, text.encode("utf-8"), cfg.storage_options)
    stale = remove_stale_tmp(cfg.out, cfg.storage_options)
    if stale:
        log.info("removed %d temporary files of an interrupted run", stale)


def _write_split(source: Source, name: str, sp: SplitPlan, plan: DatasetPlan, cfg: ConvertConfig) -> SplitInfo:
    per = cfg.samples_per_shard
    n_shards = math.ceil(sp.num_samples / per)
    done = min(complete_prefix(cfg.out, name, cfg.storage_options), n_shards)
    if done < n_shards:
        start = done * per
        if done:
            log.info("%s: %d of %d shards already published; resuming at sample %d", name, done, n_shards, start)
        with ShardWriter(cfg.out, name, storage_options=cfg.storage_options, samples_per_shard=per,
                         start_index=done, region_dim=plan.region_dim, grid_dim=plan.grid_dim,
                         grid_cells=plan.grid_size[0] * plan.grid_size[1],
                         max_regions=plan.max_regions) as writer:
            bar = tqdm(total=sp.num_samples, initial=start, desc=f"convert {name}", unit="img",
                       disable=not cfg.progress, file=sys.stderr)
            with bar:
                for sample in source.samples(name, start, sp.num_samples):
                    writer.write(sample)
                    bar.update(1)
    counts = [min(per, sp.num_samples - i * per) for i in range(n_shards)]
    return SplitInfo(shards=[shard_name(name, i) for i in range(n_shards)], samples_per_shard=counts,
                     num_samples=sp.num_samples, protocol=sp.protocol, folds=sp.folds)


def _progress(items: Iterable[Any], cfg: ConvertConfig, desc: str, **kw: Any) -> Iterable[Any]:
    return tqdm(items, desc=desc, disable=not cfg.progress, file=sys.stderr, **kw)


# ---------------------------------------------------------------- command line

def register_convert(data_subparsers: Any) -> None:
    """``rgfusion data convert {precomp,hdf5,tsv,npz}``."""
    parser = data_subparsers.add_parser("convert", help="convert a feature dump into shards")
    layouts = parser.add_subparsers(dest="layout", required=True)

    p = layouts.add_parser("precomp", help="SCAN/VSE∞ {split}_ims.npy + {split}_caps.txt folder")
    p.add_argument("folder")
    p.add_argument("--split", action="append", default=[], metavar="OUT=IN",
                   help="output split from input file prefix (default train=train dev=dev "
                        "test=testall for coco, test=test otherwise)")
    _common(p)
    p.set_defaults(func=_run)

    for name, help_, what in (
        ("hdf5", "one hdf5 file with {id}_features/_boxes/_size/_grids", "the .h5/.hdf5 file"),
        ("tsv", "bottom-up-attention TSV file(s)", "TSV file(s); rows in any order, indexed first"),
        ("npz", "folder of per-image {id}.npz (or {id}.npy + {id}_boxes.npy + {id}_size.npy)",
         "the folder"),
    ):
        p = layouts.add_parser(name, help=help_)
        p.add_argument("inputs", nargs="+" if name == "tsv" else 1, help=what)
        p.add_argument("--captions", required=True, help="Karpathy split JSON (dataset_coco.json, ...)")
        p.add_argument("--grids", help="grid features: a folder of {id}.npy, or one (N, ...) .npy "
                                       "with --grid-ids (hdf5 default: {id}_grids in the same file)")
        p.add_argument("--grid-ids", help="text file, one image id per row of the --grids array")
        p.add_argument("--id-field", choices=("auto", "cocoid", "imgid", "filename"), default="auto",
                       help="Karpathy JSON field naming the feature id (auto: cocoid, else filename stem)")
        if name != "tsv":
            p.add_argument("--size-order", choices=("hw", "wh"), default="hw",
                           help="order of {id}_size (hw: height, width, as region+grid hdf5 extractors write it)")
        _common(p)
        p.set_defaults(func=_run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset root URL (folder or s3://bucket/prefix)")
    p.add_argument("--dataset", choices=("coco", "flickr30k", "custom"), required=True,
                   help="split sizes and evaluation protocol convention")
    p.add_argument("--no-boxes", action="store_true", help="input has no boxes: use whole-image boxes")
    p.add_argument("--no-grids", action="store_true", help="input has no grid features (region-only dataset)")
    p.add_argument("--grid-size", type=_hw, help="HxW of (G, D) grids when G is not a square")
    p.add_argument("--samples-per-shard", type=int, default=ConvertConfig.samples_per_shard)
    p.add_argument("--vocab-min-count", type=int, default=ConvertConfig.vocab_min_count)
    p.add_argument("--no-progress", action="store_true")
    add_storage_args(p)


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 7x7, got {text!r}") from None
    return h, w


def source_from_args(args: argparse.Namespace) -> Source:
    from rgfusion.datasets import convert_sources as cs

    progress = not args.no_progress
    if args.layout == "precomp":
        split_map = _split_map(args.split) or cs.precomp_split_map(args.dataset)
        return cs.PrecompSource(args.folder, split_map=split_map, no_boxes=args.no_boxes,
                                no_grids=args.no_grids, grid_size=args.grid_size)
    if args.layout == "hdf5":
        regions = cs.Hdf5Regions(args.inputs[0], size_order=args.size_order)
    elif args.layout == "tsv":
        regions = cs.TsvRegions(args.inputs, progress=progress)
    else:
        regions = cs.FolderRegions(args.inputs[0], size_order=args.size_order)
    if args.no_grids:
        grids = None
    elif args.grids:
        grids = cs.grid_lookup(args.grids, args.grid_ids)
    elif args.layout == "hdf5":
        grids = cs.Hdf5Grids(args.inputs[0])
    else:
        raise ConvertError("no grid features given: pass --grids PATH or --no-grids")
    return cs.KarpathySource(args.captions, regions, grids, no_boxes=args.no_boxes, grid_size=args.grid_size,
                             id_field=args.id_field, progress=progress)


def _split_map(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        dst, sep, src = item.partition("=")
        if not sep or not dst or not src:
            raise ConvertError(f"--split {item!r}: expected OUT=IN, e.g. test=testall")
        out[dst] = src
    return out


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = ConvertConfig(out=args.out, dataset=args.dataset, storage_options=storage_options_from(args),
                        samples_per_shard=args.samples_per_shard, vocab_min_count=args.vocab_min_count,
                        progress=not args.no_progress)
    try:
        manifest = convert(source_from_args(args), cfg)
    except (ConvertError, SchemaError) as e:
        print(f"rgfusion: error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{k} {v.num_samples}" for k, v in manifest.splits.items())
    print(f"wrote {cfg.out}: {sizes} images; regions {manifest.max_regions}x{manifest.region_dim}, "
          f"grid {manifest.grid_size[0]}x{manifest.grid_size[1]}x{manifest.grid_dim}")
    return 0
