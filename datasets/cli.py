"""``rgfusion data synth|inspect|bench`` (and ``convert`` from ``rgfusion.datasets.convert``)."""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm



def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="dataset tools: synthetic scenes, convert, inspect, bench")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="write the procedural scene dataset (the embedded default)")
    p.add_argument("--out", default="data/synthetic", help="dataset root URL (folder or s3://bucket/prefix)")
    p.add_argument("--recipe", help="YAML of SynthConfig fields, e.g. configs/data/synthetic_paper_dims.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a SynthConfig field, e.g. --set train_images=500 --set grid_size=[7,7]")
    add_storage_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing shards in parallel (same bytes whatever the count)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("inspect", help="print a dataset's manifest summary and validate a sample of shards")
    p.add_argument("url")
    p.add_argument("--shards", type=int, default=2, help="shards per split to read and validate (0: all)")
    add_storage_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="measure read throughput (samples/s, MB/s per worker and total)")
    p.add_argument("url")
    p.add_argument("--split", default="train")
    p.add_argument("--mode", choices=("eval", "train"), default="eval",
                   help="eval: every image once; train: resampled, shuffled, --steps batches")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: read in this process)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="batches in train mode")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float32")
    p.add_argument("--block-size", type=int, default=64 * 1024 * 1024, help="object-store read-ahead bytes")
    p.add_argument("--pin", action="store_true",
                   help="train mode: pin batches and copy them to the GPU as the CUDA trainer does (needs CUDA)")
    p.add_argument("--reuse-memory", action="store_true",
                   help="train mode: workers reuse their batch memory (data.reuse_batch_memory); with --pin it "
                        "is pinned in place, else each batch is cloned out")
    add_storage_args(p)
    p.set_defaults(func=cmd_bench)

    try:
        convert = importlib.import_module("rgfusion.datasets.convert")
    except ModuleNotFoundError as e:
        if e.name != "rgfusion.datasets.convert":
            raise
    else:
        convert.register_convert(sub)


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", default="{}", help="fsspec options as JSON, e.g. "
                   '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (shortcut for client_kwargs.endpoint_url)")


def storage_options_from(args: argparse.Namespace) -> dict[str, Any]:
    try:
        opts = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise SystemExit(f"rgfusion: error: --storage-options is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise SystemExit("rgfusion: error: --storage-options must be a JSON object")
    if args.endpoint_url:
        opts.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    return opts


def _fail(e: Exception) -> int:
    print(f"rgfusion: error: {e}", file=sys.stderr)
    return 2


def cmd_synth(args: argparse.Namespace) -> int:
    from rgfusion.configs import load
    from rgfusion.datasets.synth import SynthConfig, write_synthetic

    cfg = load(SynthConfig, args.recipe, args.set)
    try:
        m = write_synthetic(cfg, args.out, storage_options_from(args), progress=not args.quiet,
                            workers=args.workers)
    except ValueError as e:
        return _fail(e)
    print(summary(m))
    return 0


def summary(m: Any) -> str:
    h, w = m.grid_size
    lines = [f"dataset {m.name!r} at {m.root} (schema v{m.schema_version})",
             f"  regions: up to {m.max_regions} x {m.region_dim}   grid: {h}x{w} x {m.grid_dim}   "
             f"captions/image: {m.captions_per_image}   vocab: {m.vocab}"]
    for name, s in m.splits.items():
        folds = f", {len(s.folds)} folds" if s.folds else ""
        lines.append(f"  {name:<6} {s.num_samples:>8} images in {len(s.shards):>4} shards  "
                     f"protocol {s.protocol}{folds}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rgfusion.datasets.reader import DataConfig, ShardReader, SkipStats, load_manifest
    from rgfusion.datasets.schema import SchemaError

    opts = storage_options_from(args)
    try:
        m = load_manifest(args.url, opts)
    except (FileNotFoundError, SchemaError) as e:
        return _fail(e)
    print(summary(m))
    stats = SkipStats(interval=0.0)
    reader = ShardReader(m, DataConfig(url=args.url, storage_options=opts), stats)
    problems = 0
    for split, info in m.splits.items():
        picks = range(len(info.shards)) if args.shards == 0 else _spread(len(info.shards), args.shards)
        for i in picks:
            url = m.shard_urls(split)[i]
            before = stats.total
            n = sum(1 for _ in reader.samples(url))
            bad = stats.total - before
            ok = n == info.samples_per_shard[i] and bad == 0
            problems += not ok
            print(f"  {'ok ' if ok else 'BAD'} {split}/{info.shards[i]}: {n} valid samples "
                  f"(manifest says {info.samples_per_shard[i]}), {bad} skipped")
    if problems:
        print(f"{problems} shard(s) failed validation: {dict(stats.by_reason)}", file=sys.stderr)
        return 1
    return 0


def _spread(n: int, k: int) -> list[int]:
    """Up to k shard indices spread over 0..n-1 (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from rgfusion.datasets.reader import DataConfig, eval_loader, load_manifest, skip_stats, train_loader
    from rgfusion.datasets.schema import SchemaError
    from rgfusion.datasets.text import build_text_processor

    torch.set_num_threads(1)  # an OpenMP team in this process would take the workers' cores
    if args.pin and not torch.cuda.is_available():
        return _fail(RuntimeError("--pin copies batches to the GPU: this machine has no CUDA device"))
    opts = storage_options_from(args)
    try:
        m = load_manifest(args.url, opts)
        m.split(args.split)
    except (FileNotFoundError, SchemaError) as e:
        return _fail(e)
    cfg = DataConfig(url=args.url, storage_options=opts, num_workers=args.workers, dtype=args.dtype,
                     shuffle_buffer=args.shuffle_buffer, block_size=args.block_size)
    text = build_text_processor(cfg, m)
    if args.mode == "eval":
        loader = eval_loader(cfg, m, text, split=args.split, batch_size=args.batch_size, rank=0, world_size=1)
        total = loader.num_samples
    else:
        loader = train_loader(cfg, m, text, batch_size=args.batch_size, steps=args.steps, rank=0, world_size=1,
                              seed=0, epoch=0, pin_memory=args.pin, reuse_memory=args.reuse_memory)
        total = args.steps * args.batch_size
    n = nbytes = 0
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc=f"bench {args.split} ({args.mode})") as bar:
        for batch in _to_gpu(loader, args.dtype) if args.pin else loader:
            if batch.lease is not None:  # reused memory, not pinned: the copy hands it back
                batch = batch.copy_out(torch.clone)
            n += len(batch)
            nbytes += _disk_bytes(batch, m)
            bar.update(len(batch))
    if args.pin:
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    workers = max(args.workers, 1)
    print(f"read {n} images ({nbytes / 1e6:.1f} MB of features on disk) in {secs:.2f} s with "
          f"{args.workers} worker(s), batch {args.batch_size}, dtype {args.dtype}")
    # Workers get equal shares of shards/steps, so the per-worker rate is the mean.
    print(f"total: {n / secs:.0f} images/s, {nbytes / 1e6 / secs:.1f} MB/s; "
          f"per worker: {n / secs / workers:.0f} images/s, {nbytes / 1e6 / secs / workers:.1f} MB/s")
    # CPU seconds (this process + finished workers) make figures comparable on a shared machine.
    print(f"cpu: {cpu:.2f} s, {n / cpu:.0f} images per CPU-second")
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if args.workers else 0
    print(f"peak RSS: this process {_peak_rss_mb():.0f} MB" +
          (f", largest worker {workers_rss:.0f} MB" if args.workers else ""))
    if skip_stats().total:
        print(f"skipped: {skip_stats().as_dict()}")
    return 0


def _to_gpu(loader: Any, dtype: str) -> Iterator[Any]:
    """The trainer's feed: each batch copied to the GPU while the next is read."""
    from rgfusion.datasets.reader import DTYPES
    from rgfusion.trainer.feed import DeviceFeed

    return (batch for batch, _ in DeviceFeed(iter(loader), "cuda", DTYPES[dtype]))


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    """VmHWM: unlike ru_maxrss it is not inherited from a parent across exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _disk_bytes(batch: Any, m: Any) -> int:
    """float16 feature bytes of the batch's real regions and grids (as stored, padding excluded)."""
    regions = int(batch.region_mask.sum())
    return 2 * (regions * m.region_dim + len(batch) * m.grid_cells * m.grid_dim) + 16 * regions
