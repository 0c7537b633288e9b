"""The input layouts ``rgfusion data convert`` reads, each as a ``Source`` (see ``convert.py``).

- ``PrecompSource``: SCAN/VSE∞ ``{split}_ims.npy`` + ``{split}_caps.txt`` (+ ids, boxes, sizes, grids).
- ``KarpathySource``: captions and splits from a Karpathy JSON, features looked up per image id in
  an hdf5 file (``Hdf5Regions``), bottom-up-attention TSV files (``TsvRegions``) or a folder of
  per-image files (``FolderRegions``); grids from the same hdf5, a folder or one array.

Nothing here holds more than one image's features at a time; the per-image metadata kept for
planning (ids, captions, TSV row offsets) is O(images) small objects, ~100 MB for COCO.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import logging
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from rgfusion.datasets.convert import (
    CAPTIONS_PER_IMAGE, NO_GRID, ConvertError, DatasetPlan, MmapRows, grid_cells, infer_grid_size,
    make_sample, normalise_boxes, whole_image_boxes,
)
from rgfusion.datasets.schema import Sample

log = logging.getLogger(__name__)


def _fingerprint_files(paths: Iterable[str | Path]) -> dict[str, int]:
    return {str(Path(p).resolve()): Path(p).stat().st_size for p in paths}


def _bar(items: Iterable[Any], desc: str, progress: bool, total: int | None = None) -> Iterable[Any]:
    return tqdm(items, desc=desc, total=total, disable=not progress, file=sys.stderr, unit="img")


# ---------------------------------------------------------------- precomp

def precomp_split_map(dataset: str) -> dict[str, str]:
    """Output split -> input file prefix. COCO's precomp ``test`` is only the first 1K fold;
    ``testall`` is the 5K test set the folds are cut from."""
    return {"train": "train", "dev": "dev", "test": "testall" if dataset == "coco" else "test"}


@dataclass
class _PrecompSplit:
    prefix: str  # input file prefix, e.g. "testall"
    num_samples: int
    stride: int  # ims rows per image: 1, or 5 when ims repeat each image once per caption
    ids: list[str]


class PrecompSource:
    """``{split}_ims.npy`` (N, R, Dr), ``{split}_caps.txt`` (5 lines per image, in order) and the
    optional ``{split}_ids.txt``, ``{split}_boxes.npy`` (N, R, 4 pixels) + ``{split}_sizes.npy``
    (N, 2 width, height), ``{split}_grids.npy`` (N, G, D) or (N, H, W, D)."""

    def __init__(self, folder: str | Path, *, split_map: dict[str, str] | None = None, no_boxes: bool = False, no_grids: bool = False, grid_size: tuple[int, int] | None = None,
                 captions_per_image: int = CAPTIONS_PER_IMAGE):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"precomp folder {folder} does not exist")
        self.split_map = split_map or precomp_split_map("custom")
        if "train" not in self.split_map:
            raise ConvertError("precomp needs a train split (the vocabulary is built from its captions)")
        self.no_boxes, self.no_grids, self.given_grid = no_boxes, no_grids, grid_size
        self.cpi = captions_per_image
        self._splits: dict[str, _PrecompSplit] = {}

    def _path(self, prefix: str, what: str) -> Path:
        return self.folder / f"{prefix}_{what}"

    def plan(self) -> DatasetPlan:
        dims: dict[str, Any] = {}
        for out, prefix in self.split_map.items():
            self._splits[out] = self._plan_split(prefix, dims)
        has_sizes = all(self._path(p, "sizes.npy").exists() for p in self.split_map.values())
        return DatasetPlan(
            region_dim=dims["region"][1], grid_dim=dims.get("grid_dim", 1),
            grid_size=dims.get("grid_size", (1, 1)), max_regions=dims["region"][0],
            captions_per_image=self.cpi,
            splits={out: s.num_samples for out, s in self._splits.items()},
            meta={"source": f"precomp {self.folder}", "has_boxes": not self.no_boxes,
                  "has_grids": not self.no_grids, "has_sizes": has_sizes})

    def _plan_split(self, prefix: str, dims: dict[str, Any]) -> _PrecompSplit:
        ims_path, caps_path = self._path(prefix, "ims.npy"), self._path(prefix, "caps.txt")
        for p in (ims_path, caps_path):
            if not p.exists():
                raise ConvertError(f"{p} not found")
        shape = np.load(ims_path, mmap_mode="r").shape
        if len(shape) != 3:
            raise ConvertError(f"{ims_path}: expected (N, regions, dim), got shape {shape}")
        _same(dims, "region", shape[1:], ims_path)
        lines = _count_lines(caps_path)
        if lines == shape[0] * self.cpi:
            stride = 1
        elif lines == shape[0] and lines % self.cpi == 0:
            stride = self.cpi  # VSE++-style dumps repeat each image once per caption
        else:
            raise ConvertError(f"{caps_path}: {lines} captions for {shape[0]} images in {ims_path.name} "
                               f"(expected {self.cpi} per image)")
        n = lines // self.cpi
        self._check_boxes(prefix, shape)
        self._check_grids(prefix, shape[0], dims)
        return _PrecompSplit(prefix, n, stride, self._read_ids(prefix, n))

    def _check_boxes(self, prefix: str, ims_shape: tuple[int, ...]) -> None:
        boxes, sizes = self._path(prefix, "boxes.npy"), self._path(prefix, "sizes.npy")
        if sizes.exists():
            _expect_shape(sizes, (ims_shape[0], 2))
        if self.no_boxes:
            if boxes.exists():
                log.warning("--no-boxes: ignoring %s", boxes)
            return
        if not boxes.exists():
            raise ConvertError(f"{boxes} not found: pass --no-boxes to use whole-image boxes")
        if not sizes.exists():
            raise ConvertError(f"{sizes} not found: pixel boxes in {boxes.name} need image sizes")
        _expect_shape(boxes, (*ims_shape[:2], 4))

    def _check_grids(self, prefix: str, rows: int, dims: dict[str, Any]) -> None:
        grids = self._path(prefix, "grids.npy")
        if self.no_grids:
            if grids.exists():
                log.warning("--no-grids: ignoring %s", grids)
            return
        if not grids.exists():
            raise ConvertError(f"{grids} not found: pass --no-grids for a region-only dataset")
        shape = np.load(grids, mmap_mode="r").shape
        if shape[0] != rows:
            raise ConvertError(f"{grids}: {shape[0]} rows, {rows} in the ims file")
        _same(dims, "grid_size", infer_grid_size(shape[1:], self.given_grid), grids)
        _same(dims, "grid_dim", shape[-1], grids)

    def _read_ids(self, prefix: str, n: int) -> list[str]:
        path = self._path(prefix, "ids.txt")
        if not path.exists():
            return [f"{prefix}_{i}" for i in range(n)]
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(ids) == n * self.cpi:
            ids = ids[:: self.cpi]  # one id per caption
        if len(ids) != n:
            raise ConvertError(f"{path}: {len(ids)} ids for {n} images")
        return ids

    def samples(self, split: str, start: int, stop: int) -> Iterator[Sample]:
        s = self._splits[split]
        ims = MmapRows(str(self._path(s.prefix, "ims.npy")))
        boxes = None if self.no_boxes else MmapRows(str(self._path(s.prefix, "boxes.npy")))
        sizes_path = self._path(s.prefix, "sizes.npy")
        sizes = np.load(sizes_path, mmap_mode="r") if sizes_path.exists() else None
        grids = None if self.no_grids else MmapRows(str(self._path(s.prefix, "grids.npy")))
        grid_size = infer_grid_size(grids.shape[1:], self.given_grid) if grids is not None else (1, 1)
        with open(self._path(s.prefix, "caps.txt"), encoding="utf-8") as caps:
            lines = itertools.islice(caps, start * self.cpi, None)
            for i in range(start, stop):
                row = i * s.stride
                captions = [next(lines).strip() for _ in range(self.cpi)]
                w, h = (int(v) for v in sizes[row]) if sizes is not None else (1, 1)
                regions = ims[row]
                box = whole_image_boxes(len(regions)) if boxes is None else \
                    normalise_boxes(boxes[row], w, h, s.ids[i])
                grid = NO_GRID if grids is None else grid_cells(grids[row], grid_size, s.ids[i])
                yield make_sample(s.ids[i], regions, box, grid, captions, w, h)

    def train_captions(self) -> Iterator[str]:
        with open(self._path(self.split_map["train"], "caps.txt"), encoding="utf-8") as f:
            for line in f:
                yield line.strip()

    def fingerprint(self) -> dict[str, Any]:
        files = sorted(p for p in self.folder.iterdir()
                       if p.name.split("_")[0] in set(self.split_map.values()))
        return {"layout": "precomp", "files": _fingerprint_files(files), "splits": self.split_map,
                "no_boxes": self.no_boxes, "no_grids": self.no_grids, "grid_size": self.given_grid}


def _count_lines(path: Path) -> int:
    """Lines as iteration sees them (a last line without a newline counts), streamed."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            count, last = count + chunk.count(b"\n"), chunk[-1:]
    return count + (last != b"\n")


def _expect_shape(path: Path, shape: tuple[int, ...]) -> None:
    got = np.load(path, mmap_mode="r").shape
    if got != tuple(shape):
        raise ConvertError(f"{path}: expected shape {tuple(shape)}, got {got}")


def _same(dims: dict[str, Any], key: str, value: Any, path: Path) -> None:
    value = tuple(value) if isinstance(value, (tuple, list)) else int(value)
    if dims.setdefault(key, value) != value:
        raise ConvertError(f"{path}: {key} {value} differs from the other splits' {dims[key]}")


# ---------------------------------------------------------------- Karpathy JSON

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


def iter_json_array(path: str | Path, key: str, chunk: int = 1 << 20) -> Iterator[Any]:
    """Items of the top-level array ``key`` of a JSON object, decoded one at a time, so a 150 MB
    ``dataset_coco.json`` never exists as one Python object tree (that alone costs >1 GB)."""
    decoder = json.JSONDecoder()
    opener = re.compile(r'"%s"\s*:\s*\[' % re.escape(key))
    with open(path, encoding="utf-8") as f:
        buf, pos = "", 0

        def refill() -> bool:
            """Drop the consumed text and append a chunk; False at the end of the file."""
            nonlocal buf, pos
            data = f.read(chunk)
            buf, pos = buf[pos:] + data, 0
            return bool(data)

        while not (m := opener.search(buf)):
            if not refill():
                raise ConvertError(f"{path}: no {key!r} array")
        pos = m.end()
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos == len(buf):
                if not refill():
                    raise ConvertError(f"{path}: truncated JSON in {key!r}")
                continue
            if buf[pos] == "]":
                return
            try:
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if not refill():
                    raise ConvertError(f"{path}: invalid or truncated JSON in {key!r}") from None
                continue
            yield item


@dataclass(frozen=True)
class KarpathyImage:
    image_id: str
    captions: tuple[str, ...]


def karpathy_id(entry: dict[str, Any], id_field: str) -> str:
    """Feature-file id of a Karpathy entry: COCO's ``cocoid``, else the file name's stem
    (Flickr30K features are keyed by the numeric file name); ``imgid`` is the JSON's own index."""
    if id_field == "auto":
        id_field = "cocoid" if "cocoid" in entry else "filename"
    if id_field not in entry:
        raise ConvertError(f"Karpathy entry {entry.get('filename', '?')!r} has no {id_field!r}")
    value = entry[id_field]
    return Path(value).stem if id_field == "filename" else str(value)


def load_karpathy(path: str | Path, *, id_field: str = "auto",
                  captions_per_image: int = CAPTIONS_PER_IMAGE) -> dict[str, list[KarpathyImage]]:
    """Output split -> images in JSON order (train = train + restval, dev = val, test = test)."""
    out: dict[str, list[KarpathyImage]] = {"train": [], "dev": [], "test": []}
    for entry in iter_json_array(path, "images"):
        split = KARPATHY_SPLITS.get(entry.get("split"))
        if split is None:
            raise ConvertError(f"{path}: image {entry.get('filename', '?')!r} has unknown split "
                               f"{entry.get('split')!r} (expected train/restval/val/test)")
        raws = [s["raw"].strip() for s in entry.get("sentences", [])]
        image_id = karpathy_id(entry, id_field)
        if len(raws) < captions_per_image:
            raise ConvertError(f"{path}: image {image_id} has {len(raws)} captions, "
                               f"needs {captions_per_image}")
        out[split].append(KarpathyImage(image_id, tuple(raws[:captions_per_image])))
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------- per-image feature lookups

@dataclass
class Regions:
    features: np.ndarray  # (n, Dr)
    boxes: np.ndarray | None  # (n, 4) pixel x1y1x2y2
    width: int | None
    height: int | None


class RegionLookup(Protocol):
    def shape(self, image_id: str) -> tuple[int, int] | None: ...  # (n, Dr), None if absent

    def read(self, image_id: str) -> Regions: ...

    def fingerprint(self) -> dict[str, Any]: ...


class GridLookup(Protocol):
    def shape(self, image_id: str) -> tuple[int, ...] | None: ...

    def read(self, image_id: str) -> np.ndarray: ...

    def fingerprint(self) -> dict[str, Any]: ...


def _size(values: np.ndarray, order: str) -> tuple[int, int]:
    """(width, height) from a 2-vector stored as ``hw`` or ``wh``."""
    v = np.asarray(values).reshape(-1)
    if v.size != 2:
        raise ConvertError(f"image size must have 2 values, got {v.size}")
    a, b = int(v[0]), int(v[1])
    return (b, a) if order == "hw" else (a, b)


class _Hdf5:
    """One lazily opened hdf5 file shared by the region and grid lookups (h5py keeps only its
    chunk cache in memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ConvertError(f"hdf5 file {path} not found")
        self._f: Any = None

    @property
    def f(self) -> Any:
        if self._f is None:
            import h5py

            self._f = h5py.File(self.path, "r")
        return self._f

    def shape(self, key: str) -> tuple[int, ...] | None:
        d = self.f.get(key)
        return None if d is None else tuple(d.shape)

    def read(self, key: str) -> np.ndarray | None:
        d = self.f.get(key)
        return None if d is None else np.asarray(d[()])


class Hdf5Regions:
    """``{id}_features`` (n, Dr), ``{id}_boxes`` (n, 4 pixels), ``{id}_size`` (2,)."""

    def __init__(self, path: str | Path, *, size_order: str = "hw"):
        self.h5 = _Hdf5(path)
        self.size_order = size_order

    def shape(self, image_id: str) -> tuple[int, int] | None:
        s = self.h5.shape(f"{image_id}_features")
        return None if s is None else (s[0], s[1])

    def read(self, image_id: str) -> Regions:
        size = self.h5.read(f"{image_id}_size")
        w, h = _size(size, self.size_order) if size is not None else (None, None)
        return Regions(self.h5.read(f"{image_id}_features"), self.h5.read(f"{image_id}_boxes"), w, h)

    def fingerprint(self) -> dict[str, Any]:
        return {"hdf5": _fingerprint_files([self.h5.path]), "size_order": self.size_order}


class Hdf5Grids:
    """``{id}_grids`` (G, D) or (H, W, D) in the hdf5 file of the regions."""

    def __init__(self, path: str | Path):
        self.h5 = _Hdf5(path)

    def shape(self, image_id: str) -> tuple[int, ...] | None:
        return self.h5.shape(f"{image_id}_grids")

    def read(self, image_id: str) -> np.ndarray:
        return self.h5.read(f"{image_id}_grids")

    def fingerprint(self) -> dict[str, Any]:
        return {"hdf5_grids": _fingerprint_files([self.h5.path])}


TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


class TsvRegions:
    """Bottom-up-attention TSV rows ``image_id, image_w, image_h, num_boxes, boxes, features``
    with base64 float32 arrays. A first pass records each row's byte offset (rows are read in
    the Karpathy order later, and COCO's dump is ~50 GB, so it is never held)."""

    def __init__(self, paths: list[str], *, progress: bool = True):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise ConvertError(f"TSV file {p} not found")
        self.progress = progress
        self._index: dict[str, tuple[int, int, int, int]] | None = None  # id -> file, offset, n, dim
        self._files: dict[int, Any] = {}
        csv.field_size_limit(sys.maxsize)

    def _build_index(self) -> dict[str, tuple[int, int, int, int]]:
        index: dict[str, tuple[int, int, int, int]] = {}
        total = sum(p.stat().st_size for p in self.paths)
        bar = tqdm(total=total, desc="index TSV", unit="B", unit_scale=True, disable=not self.progress,
                   file=sys.stderr)
        with bar:
            for k, path in enumerate(self.paths):
                with open(path, "rb") as f:
                    offset = 0
                    for line in f:
                        fields = line.rstrip(b"\r\n").split(b"\t")
                        if len(fields) < len(TSV_FIELDS):
                            raise ConvertError(f"{path}: row at byte {offset} has {len(fields)} fields, "
                                               f"expected {', '.join(TSV_FIELDS)}")
                        n = int(fields[3])
                        dim = _b64_len(fields[5]) // 4 // max(n, 1)
                        index[fields[0].decode()] = (k, offset, n, dim)
                        offset += len(line)
                        bar.update(len(line))
        return index

    def shape(self, image_id: str) -> tuple[int, int] | None:
        if self._index is None:
            self._index = self._build_index()
        entry = self._index.get(image_id)
        return None if entry is None else (entry[2], entry[3])

    def read(self, image_id: str) -> Regions:
        k, offset, n, _ = self._index[image_id]
        f = self._files.get(k) or self._files.setdefault(k, open(self.paths[k], "rb"))
        f.seek(offset)
        row = next(csv.reader(io.StringIO(f.readline().decode("ascii")), delimiter="\t"))
        item = dict(zip(TSV_FIELDS, row))
        decode = lambda s: np.frombuffer(base64.b64decode(s), dtype=np.float32).reshape(n, -1)  # noqa: E731
        return Regions(decode(item["features"]), decode(item["boxes"]),
                       int(float(item["image_w"])), int(float(item["image_h"])))

    def fingerprint(self) -> dict[str, Any]:
        return {"tsv": _fingerprint_files(self.paths)}


def _b64_len(text: bytes) -> int:
    """Decoded size of a base64 string without decoding it."""
    return len(text) * 3 // 4 - text[-2:].count(b"=")


# npz key names used by common extractors (ours, bottom-up-attention.pytorch's x/bbox/image_w).
NPZ_FEATURES = ("features", "feat", "x")
NPZ_BOXES = ("boxes", "bbox")


class FolderRegions:
    """Per-image ``{id}.npz`` (features + boxes + size, key names above; size as ``size`` or
    ``image_w``/``image_h``) or ``{id}.npy`` features with ``{id}_boxes.npy`` and ``{id}_size.npy``
    beside it (the hdf5 keys as files)."""

    def __init__(self, folder: str | Path, *, size_order: str = "hw"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"feature folder {self.folder} does not exist")
        self.size_order = size_order

    def shape(self, image_id: str) -> tuple[int, int] | None:
        npz, npy = self.folder / f"{image_id}.npz", self.folder / f"{image_id}.npy"
        if npz.exists():
            s = npz_member_shape(npz, NPZ_FEATURES)
        elif npy.exists():
            s = np.load(npy, mmap_mode="r").shape
        else:
            return None
        if len(s) != 2:
            raise ConvertError(f"image {image_id!r}: region features must be (n, dim), got shape {s}")
        return s[0], s[1]

    def read(self, image_id: str) -> Regions:
        npz = self.folder / f"{image_id}.npz"
        if npz.exists():
            with np.load(npz, allow_pickle=False) as z:
                feats = z[_first_key(z.files, NPZ_FEATURES, npz)]
                boxes = next((z[k] for k in NPZ_BOXES if k in z.files), None)
                w, h = _npz_size(z, self.size_order)
            return Regions(feats, boxes, w, h)
        feats = np.load(self.folder / f"{image_id}.npy", allow_pickle=False)
        boxes_path, size_path = self.folder / f"{image_id}_boxes.npy", self.folder / f"{image_id}_size.npy"
        boxes = np.load(boxes_path, allow_pickle=False) if boxes_path.exists() else None
        w, h = _size(np.load(size_path, allow_pickle=False), self.size_order) if size_path.exists() \
            else (None, None)
        return Regions(feats, boxes, w, h)

    def fingerprint(self) -> dict[str, Any]:
        return {"folder": str(self.folder.resolve()), "size_order": self.size_order}


def _first_key(names: list[str], wanted: tuple[str, ...], path: Path) -> str:
    for k in wanted:
        if k in names:
            return k
    raise ConvertError(f"{path}: none of the keys {wanted} (has {names})")


def _npz_size(z: Any, order: str) -> tuple[int | None, int | None]:
    if "size" in z.files:
        return _size(z["size"], order)
    for wk, hk in (("image_w", "image_h"), ("width", "height")):
        if wk in z.files and hk in z.files:
            return int(z[wk]), int(z[hk])
    return None, None


def npz_member_shape(path: Path, keys: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of the first of ``keys`` in an ``.npz``, from its header only (no data decompressed)."""
    with zipfile.ZipFile(path) as zf:
        key = _first_key([n.removesuffix(".npy") for n in zf.namelist()], keys, path)
        f = zf.open(f"{key}.npy")
        with f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            return tuple(read(f)[0])


class FolderGrids:
    """``{id}.npy`` grid per image."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def shape(self, image_id: str) -> tuple[int, ...] | None:
        p = self.folder / f"{image_id}.npy"
        return np.load(p, mmap_mode="r").shape if p.exists() else None

    def read(self, image_id: str) -> np.ndarray:
        return np.load(self.folder / f"{image_id}.npy", allow_pickle=False)

    def fingerprint(self) -> dict[str, Any]:
        return {"grid_folder": str(self.folder.resolve())}


class ArrayGrids:
    """One (N, G, D) or (N, H, W, D) ``.npy`` whose row i belongs to line i of an ids file."""

    def __init__(self, path: str | Path, ids_path: str | Path):
        self.path, self.ids_path = Path(path), Path(ids_path)
        self.rows = MmapRows(str(self.path))
        ids = [line.strip() for line in self.ids_path.read_text().splitlines() if line.strip()]
        if len(ids) != len(self.rows):
            raise ConvertError(f"{ids_path}: {len(ids)} ids for {len(self.rows)} rows of {path}")
        self.row_of = {image_id: i for i, image_id in enumerate(ids)}

    def shape(self, image_id: str) -> tuple[int, ...] | None:
        return self.rows.shape[1:] if image_id in self.row_of else None

    def read(self, image_id: str) -> np.ndarray:
        return self.rows[self.row_of[image_id]]

    def fingerprint(self) -> dict[str, Any]:
        return {"grid_array": _fingerprint_files([self.path, self.ids_path])}


def grid_lookup(path: str, ids_path: str | None) -> GridLookup:
    """``--grids``: a folder of ``{id}.npy`` or one array plus ``--grid-ids``."""
    p = Path(path)
    if p.is_dir():
        return FolderGrids(p)
    if not p.exists():
        raise ConvertError(f"--grids {path} not found")
    if ids_path is None:
        raise ConvertError(f"--grids {path} is one array: pass --grid-ids with one image id per row")
    return ArrayGrids(p, ids_path)


class KarpathySource:
    """Captions and splits from a Karpathy JSON; features per image id from the lookups."""

    def __init__(self, captions: str | Path, regions: RegionLookup, grids: GridLookup | None, *,
                 no_boxes: bool = False, grid_size: tuple[int, int] | None = None,
                 id_field: str = "auto", captions_per_image: int = CAPTIONS_PER_IMAGE, progress: bool = True):
        self.captions_path = Path(captions)
        if not self.captions_path.exists():
            raise ConvertError(f"Karpathy JSON {captions} not found")
        self.regions, self.grids = regions, grids
        self.no_boxes, self.given_grid = no_boxes, grid_size
        self.id_field, self.cpi, self.progress = id_field, captions_per_image, progress
        self._images: dict[str, list[KarpathyImage]] = {}
        self._grid_size = (1, 1)

    def plan(self) -> DatasetPlan:
        self._images = load_karpathy(self.captions_path, id_field=self.id_field, captions_per_image=self.cpi)
        if "train" not in self._images:
            raise ConvertError(f"{self.captions_path} has no train images (the vocabulary is built from them)")
        missing: list[str] = []
        region_dims, grid_shapes, max_regions = set(), set(), 0
        all_images = [im for ims in self._images.values() for im in ims]
        for im in _bar(all_images, "check features", self.progress):
            s = self.regions.shape(im.image_id)
            g = self.grids.shape(im.image_id) if self.grids is not None else ()
            if s is None or g is None:
                missing.append(im.image_id)
                continue
            region_dims.add(s[1])
            max_regions = max(max_regions, s[0])
            grid_shapes.add(tuple(g))
        if missing:
            what = "region or grid features" if self.grids is not None else "region features"
            raise ConvertError(f"{len(missing)} images of {self.captions_path.name} have no {what} "
                               f"(first: {', '.join(missing[:3])})")
        if len(region_dims) != 1:
            raise ConvertError(f"region features have different dims {sorted(region_dims)}")
        if len(grid_shapes) != 1:
            raise ConvertError(f"grid features have different shapes {sorted(grid_shapes)}")
        grid_shape = grid_shapes.pop()
        if self.grids is not None:
            self._grid_size = infer_grid_size(grid_shape, self.given_grid)
        return DatasetPlan(
            region_dim=region_dims.pop(), grid_dim=grid_shape[-1] if self.grids is not None else 1,
            grid_size=self._grid_size, max_regions=max(max_regions, 1), captions_per_image=self.cpi,
            splits={k: len(v) for k, v in self._images.items()},
            meta={"source": f"karpathy {self.captions_path.name}", "has_boxes": not self.no_boxes,
                  "has_grids": self.grids is not None})

    def samples(self, split: str, start: int, stop: int) -> Iterator[Sample]:
        for im in self._images[split][start:stop]:
            r = self.regions.read(im.image_id)
            if r.width is None or r.height is None:
                if not self.no_boxes:
                    raise ConvertError(f"image {im.image_id!r}: no image size to normalise its boxes")
                r.width = r.height = 1  # unknown; only boxes would have needed it
            if self.no_boxes:
                boxes = whole_image_boxes(len(r.features))
            elif r.boxes is None:
                raise ConvertError(f"image {im.image_id!r} has no boxes: pass --no-boxes to use whole-image boxes")
            else:
                boxes = normalise_boxes(r.boxes, r.width, r.height, im.image_id)
            grid = NO_GRID if self.grids is None else \
                grid_cells(self.grids.read(im.image_id), self._grid_size, im.image_id)
            yield make_sample(im.image_id, r.features, boxes, grid, list(im.captions), r.width, r.height)

    def train_captions(self) -> Iterator[str]:
        for im in self._images["train"]:
            yield from im.captions

    def fingerprint(self) -> dict[str, Any]:
        return {"layout": "karpathy", "captions": _fingerprint_files([self.captions_path]),
                "regions": self.regions.fingerprint(),
                "grids": self.grids.fingerprint() if self.grids is not None else None,
                "no_boxes": self.no_boxes, "grid_size": self.given_grid, "id_field": self.id_field}


__all__ = ["ArrayGrids", "FolderGrids", "FolderRegions", "Hdf5Grids", "Hdf5Regions", "KarpathySource",
           "PrecompSource", "TsvRegions", "grid_lookup", "iter_json_array", "load_karpathy",
           "precomp_split_map"]
