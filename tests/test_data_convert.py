"""Converters: precomp, hdf5, TSV and npz-folder inputs -> shards, read back and compared."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rgfusion.datasets import convert as conv
from rgfusion.datasets import convert_sources as cs
from rgfusion.datasets.convert import ConvertConfig, ConvertError, convert
from rgfusion.datasets.reader import DataConfig, ShardReader, SkipStats, eval_loader, load_manifest
from rgfusion.datasets.schema import Manifest, Sample
from rgfusion.datasets.text import build_text_processor

R, DR, DG = 4, 8, 6  # regions per image, region dim, grid dim: tiny on purpose


# ---------------------------------------------------------------- reading back

def read_split(root: Path | str, split: str, storage_options: dict | None = None) -> tuple[Manifest, list[Sample]]:
    """Samples of a split in shard order, through the reader's shard decoding and checks."""
    manifest = load_manifest(str(root), storage_options)
    stats = SkipStats()
    reader = ShardReader(manifest, DataConfig(url=str(root), storage_options=storage_options or {}), stats)
    samples = [s for url in manifest.shard_urls(split) for s in reader.samples(url)]
    assert stats.total == 0, stats.as_dict()
    return manifest, samples


def cfg(out: Path, dataset: str = "custom", **kw) -> ConvertConfig:
    return ConvertConfig(out=str(out), dataset=dataset, samples_per_shard=kw.pop("samples_per_shard", 5),
                         vocab_min_count=1, progress=False, **kw)


# ---------------------------------------------------------------- precomp inputs

def write_precomp(folder: Path, prefix: str, n: int, *, seed: int, boxes: bool = True, grids: bool = True,
                  ids: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"ims": rng.random((n, R, DR), dtype=np.float32) * 10,
            "sizes": np.stack([rng.integers(100, 640, n), rng.integers(100, 480, n)], 1)}
    w, h = data["sizes"][:, 0:1, None], data["sizes"][:, 1:2, None]
    xy1 = rng.random((n, R, 2)) * 0.5
    norm = np.concatenate([xy1, xy1 + rng.random((n, R, 2)) * 0.5], -1)
    data["norm_boxes"] = norm
    data["boxes"] = (norm * np.concatenate([w, h, w, h], -1)).astype(np.float32)
    data["grids"] = rng.random((n, 2, 3, DG), dtype=np.float32)  # (N, H, W, D)
    np.save(folder / f"{prefix}_ims.npy", data["ims"])
    np.save(folder / f"{prefix}_sizes.npy", data["sizes"])
    if boxes:
        np.save(folder / f"{prefix}_boxes.npy", data["boxes"])
    if grids:
        np.save(folder / f"{prefix}_grids.npy", data["grids"])
    if ids:
        (folder / f"{prefix}_ids.txt").write_text("".join(f"{prefix}{i}\n" for i in range(n)))
    caps = [f"a {prefix} photo {i} number {j}" for i in range(n) for j in range(5)]
    (folder / f"{prefix}_caps.txt").write_text("\n".join(caps) + "\n")
    return data


def coco_precomp(folder: Path, **kw) -> dict[str, dict[str, np.ndarray]]:
    return {p: write_precomp(folder, p, n, seed=i, **kw)
            for i, (p, n) in enumerate((("train", 12), ("dev", 4), ("testall", 10)))}


def test_precomp_round_trip(tmp_path):
    src = coco_precomp(tmp_path / "in")
    out = tmp_path / "out"
    convert(cs.PrecompSource(tmp_path / "in", split_map=cs.precomp_split_map("coco")), cfg(out, "coco"))

    manifest, train = read_split(out, "train")
    assert (manifest.region_dim, manifest.grid_dim, manifest.grid_size, manifest.max_regions) == (DR, DG, (2, 3), R)
    assert manifest.splits["train"].samples_per_shard == [5, 5, 2]
    assert manifest.splits["train"].shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    test = manifest.splits["test"]
    assert (test.num_samples, test.protocol, test.folds) == (10, "coco1k5fold", [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]])
    assert manifest.meta["extra_protocols"] == {"test": ["coco5k"]}
    assert manifest.has_grids and manifest.has_boxes
    for split, prefix in (("train", "train"), ("test", "testall")):
        d = src[prefix]
        samples = read_split(out, split)[1]
        assert [s.image_id for s in samples] == [f"{prefix}{i}" for i in range(len(d["ims"]))]
        for i, s in enumerate(samples):
            assert s.region.dtype == np.float16 and s.grid.dtype == np.float16
            np.testing.assert_array_equal(s.region, d["ims"][i].astype(np.float16))
            np.testing.assert_allclose(s.boxes, d["norm_boxes"][i], atol=1e-6)
            np.testing.assert_array_equal(s.grid, d["grids"][i].reshape(6, DG).astype(np.float16))
            assert s.captions == [f"a {prefix} photo {i} number {j}" for j in range(5)]
            assert (s.width, s.height) == tuple(int(v) for v in d["sizes"][i])
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and "train" in vocab and "testall" not in vocab


def test_precomp_missing_boxes_or_grids_needs_a_flag(tmp_path):
    write_precomp(tmp_path / "in", "train", 6, seed=0, boxes=False, grids=False, ids=False)
    split_map = {"train": "train"}
    with pytest.raises(ConvertError, match="--no-boxes"):
        convert(cs.PrecompSource(tmp_path / "in", split_map=split_map, no_grids=True), cfg(tmp_path / "a"))
    with pytest.raises(ConvertError, match="--no-grids"):
        convert(cs.PrecompSource(tmp_path / "in", split_map=split_map, no_boxes=True), cfg(tmp_path / "b"))

    out = tmp_path / "c"
    convert(cs.PrecompSource(tmp_path / "in", split_map=split_map, no_boxes=True, no_grids=True), cfg(out))
    manifest, samples = read_split(out, "train")
    assert not manifest.has_grids and not manifest.has_boxes
    assert manifest.grid_size == (1, 1) and manifest.grid_dim == 1
    assert [s.image_id for s in samples] == [f"train_{i}" for i in range(6)]
    for s in samples:
        np.testing.assert_array_equal(s.boxes, np.tile([0, 0, 1, 1], (R, 1)))
        np.testing.assert_array_equal(s.grid, np.zeros((1, 1)))


def test_precomp_images_repeated_per_caption(tmp_path):
    """VSE++-era dumps store one ims row per caption; the converter keeps one per image."""
    folder = tmp_path / "in"
    d = write_precomp(folder, "train", 15, seed=0, grids=False, ids=False)
    np.save(folder / "train_sizes.npy", np.repeat(d["sizes"][::5], 5, 0))
    np.save(folder / "train_boxes.npy", np.repeat(d["boxes"][::5], 5, 0))
    np.save(folder / "train_ims.npy", np.repeat(d["ims"][::5], 5, 0))
    (folder / "train_caps.txt").write_text("\n".join(f"cap {i}" for i in range(15)))  # no final newline
    convert(cs.PrecompSource(folder, split_map={"train": "train"}, no_grids=True), cfg(tmp_path / "out"))
    samples = read_split(tmp_path / "out", "train")[1]
    assert len(samples) == 3
    np.testing.assert_array_equal(samples[1].region, d["ims"][5].astype(np.float16))
    assert samples[1].captions == [f"cap {i}" for i in range(5, 10)]


def test_pixel_boxes_with_swapped_size_are_an_error(tmp_path):
    folder = tmp_path / "in"
    d = write_precomp(folder, "train", 3, seed=0, grids=False)
    np.save(folder / "train_sizes.npy", d["sizes"][:, ::-1] // 4)
    with pytest.raises(ConvertError, match="exceed"):
        convert(cs.PrecompSource(folder, split_map={"train": "train"}, no_grids=True), cfg(tmp_path / "out"))


# ---------------------------------------------------------------- resume and memory

class Interrupt(Exception):
    pass


def test_resume_skips_published_shards(tmp_path, monkeypatch):
    coco_precomp(tmp_path / "in")
    out = tmp_path / "out"
    source = lambda: cs.PrecompSource(tmp_path / "in", split_map=cs.precomp_split_map("coco"))  # noqa: E731
    written = []

    class Failing(conv.ShardWriter):
        def write(self, sample):
            if len(written) == 12:  # train done (3 shards), interrupted inside dev's first shard
                raise Interrupt
            written.append(sample.image_id)
            super().write(sample)

    monkeypatch.setattr(conv, "ShardWriter", Failing)
    with pytest.raises(Interrupt):
        convert(source(), cfg(out, "coco", samples_per_shard=2))
    published = sorted(p.name for p in out.glob("*.tar"))
    assert published == [f"train-{i:06d}.tar" for i in range(6)]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp-*"))
    mtimes = {p: (out / p).stat().st_mtime_ns for p in published}

    monkeypatch.setattr(conv, "ShardWriter", conv.ShardWriter.__mro__[1])
    written.clear()
    calls = []
    real_samples = cs.PrecompSource.samples
    monkeypatch.setattr(cs.PrecompSource, "samples",
                        lambda self, split, start, stop: calls.append((split, start, stop))
                        or real_samples(self, split, start, stop))
    manifest = convert(source(), cfg(out, "coco", samples_per_shard=2))
    assert ("train", 0, 12) not in calls and ("dev", 0, 4) in calls
    assert {p: (out / p).stat().st_mtime_ns for p in published} == mtimes
    assert [len(read_split(out, s)[1]) for s in ("train", "dev", "test")] == [12, 4, 10]
    assert manifest.splits["train"].samples_per_shard == [2] * 6

    # A rerun over a finished dataset rewrites no shard; a different conversion is refused.
    convert(source(), cfg(out, "coco", samples_per_shard=2))
    assert {p: (out / p).stat().st_mtime_ns for p in published} == mtimes
    with pytest.raises(ConvertError, match="different conversion"):
        convert(source(), cfg(out, "coco", samples_per_shard=3))


def test_convert_to_s3_resumes(tmp_path, monkeypatch, s3_bucket, storage_options):
    src = write_precomp(tmp_path / "in", "train", 7, seed=3)
    url = f"s3://{s3_bucket}/coco"
    options = dict(cfg(url, samples_per_shard=2).__dict__, storage_options=storage_options)
    source = lambda: cs.PrecompSource(tmp_path / "in", split_map={"train": "train"})  # noqa: E731

    class Failing(conv.ShardWriter):
        def write(self, sample):
            if self.num_samples == 3:  # shard 0 published, shard 1 half-written
                raise Interrupt
            super().write(sample)

    monkeypatch.setattr(conv, "ShardWriter", Failing)
    with pytest.raises(Interrupt):
        convert(source(), ConvertConfig(**options))
    monkeypatch.undo()
    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/coco")) == ["convert-state.json", "train-000000.tar"]
    convert(source(), ConvertConfig(**options))
    manifest, samples = read_split(url, "train", storage_options)
    assert manifest.splits["train"].samples_per_shard == [2, 2, 2, 1]
    assert [s.image_id for s in samples] == [f"train{i}" for i in range(7)]
    np.testing.assert_array_equal(samples[6].region, src["ims"][6].astype(np.float16))


# ru_maxrss is no use here: Linux carries the parent's high-water mark into a forked child
# across exec, so a big pytest process would hide the child's own peak. VmHWM is per address space.
MEMORY_CHILD = textwrap.dedent("""
    import sys
    from rgfusion.datasets import convert_sources as cs
    from rgfusion.datasets.convert import ConvertConfig, convert
    import rgfusion.datasets.text  # torch: part of the fixed baseline, not of the conversion
    def peak_kb():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    before = peak_kb()
    convert(cs.PrecompSource(sys.argv[1], split_map={"train": "train"}, no_boxes=True, no_grids=True),
            ConvertConfig(out=sys.argv[2], samples_per_shard=200, progress=False))
    print(before, peak_kb())
""")


def test_peak_memory_is_bounded_by_a_window_not_the_dump(tmp_path):
    """A 400 MB dump (zeros: a sparse file, fast to make) converts with a peak RSS growth far
    below its size (without re-mapping it grows by ~the file size)."""
    n = 1400  # 1400 x 36 x 2048 float32 = 413 MB
    folder = tmp_path / "in"
    folder.mkdir()
    np.lib.format.open_memmap(folder / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, 2048)).flush()
    (folder / "train_caps.txt").write_text("a b c\n" * (5 * n))
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(folder), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = (int(v) for v in proc.stdout.split())
    growth_mb = (after - before) / 1024
    file_mb = (folder / "train_ims.npy").stat().st_size / 2**20
    assert growth_mb < 160, f"peak RSS grew {growth_mb:.0f} MB converting a {file_mb:.0f} MB dump"
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 7


# ---------------------------------------------------------------- Karpathy-based layouts

def karpathy_json(path: Path, layout: dict[str, list[str]], *, coco: bool = True) -> None:
    """Images in interleaved split order, with 5-6 captions (COCO has extras, dropped)."""
    images = []
    order = [(split, i) for split, ids in layout.items() for i in ids]
    order.sort(key=lambda t: t[1])
    for k, (split, image_id) in enumerate(order):
        entry = {"filepath": "x", "filename": f"{image_id}.jpg", "imgid": k, "split": split,
                 "sentids": [], "sentences": [{"raw": f"Photo {image_id} caption {j}.", "tokens": ["x"],
                                               "imgid": k, "sentid": j} for j in range(5 + k % 2)]}
        if coco:
            entry["cocoid"] = int(image_id)
        images.append(entry)
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))


COCO_LAYOUT = {"train": ["101", "103", "105"], "restval": ["102", "104"], "val": ["201", "202"],
               "test": [str(300 + i) for i in range(10)]}


def features(image_id: str):
    rng = np.random.default_rng(int(image_id))
    n = int(rng.integers(2, R + 1))  # variable region counts, as adaptive detectors give
    w, h = int(rng.integers(200, 640)), int(rng.integers(200, 480))
    boxes = np.sort(rng.random((n, 2, 2)), axis=1).reshape(n, 4) * [w, h, w, h]  # x1y1 <= x2y2
    return rng.random((n, DR), dtype=np.float32), boxes.astype(np.float32), w, h, \
        rng.random((9, DG), dtype=np.float32)


def check_karpathy_output(out: Path, layout: dict[str, list[str]], dataset: str = "coco") -> Manifest:
    manifest, train = read_split(out, "train")
    want = {"train": [i for s in ("train", "restval") for i in layout.get(s, [])], "dev": layout["val"],
            "test": layout["test"]}
    for split, ids in want.items():
        samples = read_split(out, split)[1]
        assert [s.image_id for s in samples] == sorted(ids, key=int)  # JSON order
        for s in samples:
            feats, boxes, w, h, grid = features(s.image_id)
            np.testing.assert_array_equal(s.region, feats.astype(np.float16))
            np.testing.assert_allclose(s.boxes, boxes / [w, h, w, h], atol=1e-6)
            np.testing.assert_array_equal(s.grid, grid.astype(np.float16))
            assert (s.width, s.height) == (w, h)
            assert s.captions == [f"Photo {s.image_id} caption {j}." for j in range(5)]
    assert manifest.max_regions == max(len(features(i)[0]) for ids in layout.values() for i in ids)
    assert manifest.grid_size == (3, 3)
    return manifest


def test_hdf5_with_karpathy_coco_splits_and_folds(tmp_path):
    import h5py

    karpathy_json(tmp_path / "dataset_coco.json", COCO_LAYOUT)
    with h5py.File(tmp_path / "feats.hdf5", "w") as f:
        for image_id in (i for ids in COCO_LAYOUT.values() for i in ids):
            feats, boxes, w, h, grid = features(image_id)
            f[f"{image_id}_features"], f[f"{image_id}_boxes"] = feats, boxes
            f[f"{image_id}_size"] = np.array([[h, w]])  # (1, 2) height, width as DLCT writes it
            f[f"{image_id}_grids"] = grid
    source = cs.KarpathySource(tmp_path / "dataset_coco.json", cs.Hdf5Regions(tmp_path / "feats.hdf5"),
                               cs.Hdf5Grids(tmp_path / "feats.hdf5"), progress=False)
    manifest = convert(source, cfg(tmp_path / "out", "coco", samples_per_shard=3))
    check_karpathy_output(tmp_path / "out", COCO_LAYOUT)
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 5, "dev": 2, "test": 10}
    assert manifest.splits["test"].folds == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]]
    assert manifest.splits["dev"].protocol == "all"

    # The trainer's loader pads the variable region counts and masks them.
    data = DataConfig(url=str(tmp_path / "out"), num_workers=0)
    batches = list(eval_loader(data, manifest, build_text_processor(data, manifest), split="test",
                               batch_size=4, rank=0, world_size=1))
    regions = [len(features(i)[0]) for i in COCO_LAYOUT["test"]]
    assert [i for b in batches for i in b.image_ids] == COCO_LAYOUT["test"]
    assert batches[0].regions.shape == (4, manifest.max_regions, DR)
    assert [int(n) for b in batches for n in b.region_mask.sum(1)] == regions
    assert batches[0].tokens.shape[0] == 4 * 5


def write_tsv(path: Path, ids: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for image_id in ids:
            feats, boxes, w, h, _ = features(image_id)
            writer.writerow([image_id, w, h, len(feats), base64.b64encode(boxes.tobytes()).decode(),
                             base64.b64encode(feats.tobytes()).decode()])


def test_tsv_joined_with_grid_folder_and_grid_array(tmp_path):
    layout = {"train": ["11", "12", "13", "14"], "val": ["21"], "test": ["31", "32"]}
    karpathy_json(tmp_path / "dataset_flickr30k.json", layout, coco=False)
    ids = [i for v in layout.values() for i in v]
    write_tsv(tmp_path / "a.tsv", ids[::-1][:3])  # rows in another order than the JSON, in two files
    write_tsv(tmp_path / "b.tsv", ids[::-1][3:])
    (tmp_path / "grids").mkdir()
    for image_id in ids:
        np.save(tmp_path / "grids" / f"{image_id}.npy", features(image_id)[4].reshape(3, 3, DG))
    tsv = [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]
    source = cs.KarpathySource(tmp_path / "dataset_flickr30k.json", cs.TsvRegions(tsv, progress=False),
                               cs.grid_lookup(str(tmp_path / "grids"), None), progress=False)
    manifest = convert(source, cfg(tmp_path / "out", "flickr30k"))
    check_karpathy_output(tmp_path / "out", layout)
    assert manifest.splits["test"].protocol == "flickr1k" and manifest.splits["test"].folds is None

    np.save(tmp_path / "grids.npy", np.stack([features(i)[4] for i in ids]))
    (tmp_path / "grid_ids.txt").write_text("\n".join(ids))
    with pytest.raises(ConvertError, match="--grid-ids"):
        cs.grid_lookup(str(tmp_path / "grids.npy"), None)
    source = cs.KarpathySource(tmp_path / "dataset_flickr30k.json", cs.TsvRegions(tsv, progress=False),
                               cs.grid_lookup(str(tmp_path / "grids.npy"), str(tmp_path / "grid_ids.txt")),
                               progress=False)
    convert(source, cfg(tmp_path / "out2", "flickr30k"))
    check_karpathy_output(tmp_path / "out2", layout)


def test_npz_and_npy_folders(tmp_path):
    layout = {"train": ["11", "12", "13"], "val": ["21"], "test": ["31", "32"]}
    karpathy_json(tmp_path / "k.json", layout, coco=False)
    feat_dir, grid_dir = tmp_path / "feats", tmp_path / "grids"
    feat_dir.mkdir(), grid_dir.mkdir()
    for k, image_id in enumerate(i for v in layout.values() for i in v):
        feats, boxes, w, h, grid = features(image_id)
        np.save(grid_dir / f"{image_id}.npy", grid)
        if k % 2:  # bottom-up-attention.pytorch's npz keys
            np.savez_compressed(feat_dir / f"{image_id}.npz", x=feats, bbox=boxes, image_w=w, image_h=h,
                                num_bbox=len(feats))
        else:  # hdf5 keys as files
            np.save(feat_dir / f"{image_id}.npy", feats)
            np.save(feat_dir / f"{image_id}_boxes.npy", boxes)
            np.save(feat_dir / f"{image_id}_size.npy", np.array([h, w]))
    source = cs.KarpathySource(tmp_path / "k.json", cs.FolderRegions(feat_dir), cs.FolderGrids(grid_dir),
                               progress=False)
    convert(source, cfg(tmp_path / "out"))
    check_karpathy_output(tmp_path / "out", layout, "custom")

    (grid_dir / "31.npy").unlink()
    with pytest.raises(ConvertError, match="1 images .* no region or grid features .*31"):
        convert(cs.KarpathySource(tmp_path / "k.json", cs.FolderRegions(feat_dir), cs.FolderGrids(grid_dir),
                                  progress=False), cfg(tmp_path / "out3"))


@pytest.mark.parametrize("chunk", [3, 17, 1 << 20])
def test_streamed_json_array_matches_json_load(tmp_path, chunk):
    karpathy_json(tmp_path / "k.json", COCO_LAYOUT)
    want = json.loads((tmp_path / "k.json").read_text())["images"]
    assert list(cs.iter_json_array(tmp_path / "k.json", "images", chunk=chunk)) == want
    (tmp_path / "pretty.json").write_text(json.dumps({"dataset": "coco", "images": want}, indent=2))
    assert list(cs.iter_json_array(tmp_path / "pretty.json", "images", chunk=chunk)) == want
    (tmp_path / "cut.json").write_text((tmp_path / "k.json").read_text()[:-200])
    with pytest.raises(ConvertError, match="truncated"):
        list(cs.iter_json_array(tmp_path / "cut.json", "images", chunk=chunk))


def test_karpathy_split_mapping_and_ids(tmp_path):
    karpathy_json(tmp_path / "c.json", COCO_LAYOUT)
    splits = cs.load_karpathy(tmp_path / "c.json")
    assert [im.image_id for im in splits["train"]] == ["101", "102", "103", "104", "105"]
    assert len(splits["test"]) == 10 and all(len(im.captions) == 5 for im in splits["train"])
    by_index = cs.load_karpathy(tmp_path / "c.json", id_field="imgid")
    assert by_index["dev"][0].image_id == "5"


# ---------------------------------------------------------------- command line

def run_cli(argv: list[str]) -> int:
    from rgfusion.datasets import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_cli_precomp_and_clear_errors(tmp_path, capsys):
    coco_precomp(tmp_path / "in", grids=False)
    out = tmp_path / "out"
    common = ["--out", str(out), "--dataset", "coco", "--samples-per-shard", "4", "--no-progress"]
    assert run_cli(["convert", "precomp", str(tmp_path / "in"), *common]) == 2
    assert "train_grids.npy not found: pass --no-grids" in capsys.readouterr().err
    assert run_cli(["convert", "precomp", str(tmp_path / "in"), *common, "--no-grids"]) == 0
    assert "train 12, dev 4, test 10" in capsys.readouterr().out
    manifest, _ = read_split(out, "test")
    assert manifest.splits["test"].protocol == "coco1k5fold"
    assert run_cli(["convert", "hdf5", str(tmp_path / "missing.h5"), "--captions", str(tmp_path / "x.json"),
                    "--out", str(tmp_path / "o2"), "--dataset", "coco"]) == 2
    assert "not found" in capsys.readouterr().err
