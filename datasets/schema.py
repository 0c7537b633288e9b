"""The on-storage schema: one sample per image, a manifest per dataset.

A WebDataset shard holds, per image (tar key = sanitised image id):
``region.npy`` float16 (n, Dr), ``boxes.npy`` float32 (n, 4) normalised x1y1x2y2,
``grid.npy`` float16 (H*W, Dg) row-major cells, ``json`` {"image_id", "captions", "width", "height"}.
``manifest.json`` at the dataset root describes splits, shards and dims; readers trust it for
epoch sizes and never list buckets. ``.npy`` members never use pickle.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rgfusion.datasets.storage import join_url

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
PROTOCOLS = ("flickr1k", "coco5k", "coco1k5fold", "all")
MEMBERS = ("region.npy", "boxes.npy", "grid.npy", "json")
REGION_DTYPE = np.dtype("<f2")
BOX_DTYPE = np.dtype("<f4")
GRID_DTYPE = np.dtype("<f2")
# Boxes from detectors overshoot the image border by a pixel or two; more than this means
# pixel coordinates were written without normalising.
BOX_SLACK = 0.01


class SchemaError(ValueError):
    """A sample or manifest that does not match the schema; ``reason`` is a short category
    (missing_member, bad_npy, bad_json, bad_shape, bad_value) used to count reader skips."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


_KEY_SAFE = re.compile(r"[A-Za-z0-9_\-]")


def sanitize_key(image_id: str) -> str:
    """Tar key for an image id: WebDataset splits member names at the first dot and treats
    ``/`` as a folder, so everything outside ``[A-Za-z0-9_-]`` is escaped as ``~hh`` (UTF-8
    bytes). Injective, so distinct ids never collide; the exact id travels in the json."""
    if not image_id:
        raise SchemaError("image_id must be a non-empty string")
    out = []
    for ch in image_id:
        if _KEY_SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


@dataclass
class Sample:
    """One image with its features and captions, as the writer takes and the reader decodes it."""

    image_id: str
    region: np.ndarray  # (n, Dr) float16; n may vary per image (0 allowed: grid-only images)
    boxes: np.ndarray  # (n, 4) float32, x1,y1,x2,y2 in [0, 1]
    grid: np.ndarray  # (G, Dg) float16, G = H*W row-major cells
    captions: list[str]
    width: int
    height: int

    @property
    def key(self) -> str:
        return sanitize_key(self.image_id)

    def validate(self, *, region_dim: int | None = None, grid_dim: int | None = None,
                 grid_cells: int | None = None, max_regions: int | None = None,
                 check_values: bool = True) -> None:
        """Raise SchemaError naming the image and the problem. Boxes are always range-checked
        (a few numbers); ``check_values`` adds the O(features) NaN/inf scan that the writer runs
        once so readers can skip it."""
        where = f"sample {self.image_id!r}"
        _check_array(where, "region", self.region, REGION_DTYPE, (None, region_dim))
        _check_array(where, "boxes", self.boxes, BOX_DTYPE, (self.region.shape[0], 4))
        _check_array(where, "grid", self.grid, GRID_DTYPE, (grid_cells, grid_dim))
        if max_regions is not None and self.region.shape[0] > max_regions:
            raise SchemaError(f"{where}: {self.region.shape[0]} regions > max_regions={max_regions}",
                              "bad_shape")
        if not isinstance(self.captions, list) or not all(isinstance(c, str) and c.strip() for c in self.captions):
            raise SchemaError(f"{where}: captions must be a list of non-empty strings", "bad_json")
        if not self.captions:
            raise SchemaError(f"{where}: no captions", "bad_json")
        for name in ("width", "height"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise SchemaError(f"{where}: {name} must be a positive integer, got {v!r}", "bad_json")
        self._check_boxes(where)
        for name in ("region", "grid") if check_values else ():
            if not np.isfinite(getattr(self, name)).all():
                raise SchemaError(f"{where}: {name} has NaN/inf values", "bad_value")

    def _check_boxes(self, where: str) -> None:
        b = self.boxes
        if not b.size:
            return
        if not np.isfinite(b).all() or b.min() < -BOX_SLACK or b.max() > 1 + BOX_SLACK:
            raise SchemaError(f"{where}: boxes must be normalised to [0,1], got range "
                              f"[{b.min():.3g}, {b.max():.3g}] (pixel coordinates?)", "bad_value")
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            raise SchemaError(f"{where}: boxes must be x1,y1,x2,y2 with x2>=x1 and y2>=y1", "bad_value")

    def meta(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "captions": list(self.captions),
                "width": int(self.width), "height": int(self.height)}

    def to_members(self) -> dict[str, bytes]:
        """Tar members (without the key prefix) in a fixed order."""
        return {
            "region.npy": npy_bytes(self.region),
            "boxes.npy": npy_bytes(self.boxes),
            "grid.npy": npy_bytes(self.grid),
            "json": json.dumps(self.meta(), ensure_ascii=False).encode("utf-8"),
        }

    @classmethod
    def from_members(cls, members: dict[str, bytes]) -> "Sample":
        """Decode tar members (pickle-free); raises SchemaError for missing/invalid members."""
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise SchemaError(f"missing member(s) {', '.join(missing)}", "missing_member")
        try:
            meta = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchemaError(f"json member is not valid JSON: {e}", "bad_json") from None
        if not isinstance(meta, dict) or not {"image_id", "captions", "width", "height"} <= set(meta):
            raise SchemaError("json member lacks image_id/captions/width/height", "bad_json")
        return cls(
            image_id=str(meta["image_id"]),
            region=load_npy(members["region.npy"], "region.npy"),
            boxes=load_npy(members["boxes.npy"], "boxes.npy"),
            grid=load_npy(members["grid.npy"], "grid.npy"),
            captions=meta["captions"],
            width=meta["width"],
            height=meta["height"],
        )


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(r"""\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}""")


def load_npy(data: bytes, name: str = "npy") -> np.ndarray:
    """Parse a ``.npy`` member without pickle; any failure becomes a SchemaError.

    Plain numeric arrays (all np.save writes for our members) take a fast path: the header is
    matched by a regular expression and the array is a zero-copy ``np.frombuffer`` view
    (``np.load`` spends most of its time in ``ast.literal_eval`` of the header). Anything else
    goes through ``np.load(allow_pickle=False)``, which refuses object arrays."""
    fast = _fast_npy(data)
    if fast is not None:
        return fast
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SchemaError(f"{name} is not a valid .npy: {e}", "bad_npy") from None
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"{name} is not a single .npy array", "bad_npy")
    return arr


def _fast_npy(data: bytes) -> np.ndarray | None:
    if data[:6] != _NPY_MAGIC or data[6] != 1:  # version 1.0 headers only; others: np.load
        return None
    start = 10 + int.from_bytes(data[8:10], "little")
    match = _NPY_HEADER.match(data[10:start].decode("latin1"))
    if match is None:
        return None
    descr, fortran, dims = match.groups()
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    dtype = np.dtype(descr)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - start != count * dtype.itemsize:
        return None  # truncated or padded: let np.load word the error
    arr = np.frombuffer(data, dtype, count, start)
    return arr.reshape(shape, order="F" if fortran == "True" else "C")


def _check_array(where: str, name: str, arr: Any, dtype: np.dtype, shape: tuple[int | None, ...]) -> None:
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"{where}: {name} must be a numpy array, got {type(arr).__name__}", "bad_shape")
    if arr.dtype != dtype:
        raise SchemaError(f"{where}: {name} must be {dtype.name}, got {arr.dtype.name}", "bad_shape")
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise SchemaError(f"{where}: {name} must have shape {want}, got {tuple(arr.shape)}", "bad_shape")


@dataclass
class SplitInfo:
    """One split's shards; counts come from the writer so readers never count by listing."""

    shards: list[str]  # shard paths relative to the dataset root, in order
    samples_per_shard: list[int]  # images in each shard, same order as ``shards``
    num_samples: int  # total images in the split (= sum of samples_per_shard)
    protocol: str = "all"  # evaluation protocol: flickr1k | coco5k | coco1k5fold | all
    folds: list[list[int]] | None = None  # [start, end) image ranges for fold protocols (COCO 5x1K)

    def validate(self, name: str) -> None:
        if len(self.shards) != len(self.samples_per_shard):
            raise SchemaError(f"split {name!r}: {len(self.shards)} shards but "
                              f"{len(self.samples_per_shard)} samples_per_shard entries")
        if sum(self.samples_per_shard) != self.num_samples:
            raise SchemaError(f"split {name!r}: samples_per_shard sums to {sum(self.samples_per_shard)}, "
                              f"num_samples is {self.num_samples}")
        if any(n < 0 for n in self.samples_per_shard):
            raise SchemaError(f"split {name!r}: negative shard count")
        if self.protocol not in PROTOCOLS:
            raise SchemaError(f"split {name!r}: protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        for f in self.folds or []:
            if len(f) != 2 or not 0 <= f[0] < f[1] <= self.num_samples:
                raise SchemaError(f"split {name!r}: fold {f} is not a [start, end) range within "
                                  f"{self.num_samples} images")


@dataclass
class Manifest:
    """``manifest.json``: what a reader needs to build pipelines without listing storage."""

    name: str  # dataset name: synthetic | flickr30k | coco | ...
    region_dim: int  # Dr, feature size of each region
    grid_dim: int  # Dg, feature size of each grid cell
    grid_size: tuple[int, int]  # (H, W) of the grid; grid.npy has H*W rows
    max_regions: int  # upper bound on regions per image; readers pad to it (static shapes)
    captions_per_image: int  # eval batches carry this many captions per image
    splits: dict[str, SplitInfo]
    vocab: str | None = VOCAB_NAME  # caption vocabulary file relative to root (BiGRU)
    schema_version: int = SCHEMA_VERSION
    meta: dict[str, Any] = field(default_factory=dict)  # provenance (source files, seed, options)
    # Where the manifest was loaded from; not serialised, so a dataset can be moved or copied.
    root: str = field(default="", compare=False)
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def grid_cells(self) -> int:
        return int(self.grid_size[0]) * int(self.grid_size[1])

    @property
    def has_grids(self) -> bool:
        """False for datasets converted with --no-grids (their 1x1 zero grid is a placeholder)."""
        return bool(self.meta.get("has_grids", True))

    @property
    def has_boxes(self) -> bool:
        """False for datasets converted with --no-boxes (every box is the whole image)."""
        return bool(self.meta.get("has_boxes", True))

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise SchemaError(f"dataset {self.root or self.name!r} has no split {name!r} "
                              f"(has: {', '.join(self.splits)})")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        return [join_url(self.root, s) for s in self.split(split).shards]

    def validate(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise SchemaError(f"manifest schema_version {self.schema_version} is not supported "
                              f"(this reader knows {SCHEMA_VERSION})")
        for name in ("region_dim", "grid_dim", "max_regions", "captions_per_image"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SchemaError(f"manifest: {name} must be a positive integer, got {v!r}")
        if len(self.grid_size) != 2 or any(int(s) <= 0 for s in self.grid_size):
            raise SchemaError(f"manifest: grid_size must be [H, W], got {self.grid_size!r}")
        for name, info in self.splits.items():
            info.validate(name)

    def to_json(self) -> str:
        self.validate()
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        d["grid_size"] = [int(s) for s in self.grid_size]
        d["splits"] = {k: dataclasses.asdict(v) for k, v in self.splits.items()}
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str | bytes, root: str = "", storage_options: dict | None = None) -> "Manifest":
        where = f"{root or '<manifest>'}"
        try:
            d = json.loads(text)
            splits = {k: SplitInfo(**v) for k, v in d.pop("splits").items()}
            known = {f.name for f in dataclasses.fields(cls) if f.compare}
            unknown = set(d) - known
            if unknown:
                raise SchemaError(f"unknown key(s) {sorted(unknown)}")
            m = cls(splits=splits, **d, root=root, storage_options=dict(storage_options or {}))
            m.grid_size = tuple(int(s) for s in m.grid_size)
        except SchemaError as e:
            raise SchemaError(f"{where}: invalid manifest: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SchemaError(f"{where}: invalid manifest: {type(e).__name__}: {e}") from None
        try:
            m.validate()
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        return m
