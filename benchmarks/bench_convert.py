"""Converter throughput and peak memory on a generated precomp dump.

Writes ``N`` images of 36x2048 region features, 7x7x2048 grids, pixel boxes and sizes (float32,
non-negative like ReLU activations) to ``--work``, then times ``rgfusion data convert precomp``
in a child process and reports images/s, input MB/s and the child's peak RSS (its VmHWM:
``ru_maxrss`` would report this process's own high-water mark, which Linux carries into a forked
child across exec).

    .venv/bin/python benchmarks/bench_convert.py --images 3000 --work /tmp/rgf-bench-convert
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REGIONS, DIM, GRID = 36, 2048, 7
CHILD = """
import sys
from rgfusion.trainer.cli import main
rc = main(sys.argv[1:])
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
sys.exit(rc)
"""


def make_dump(folder: Path, n: int, seed: int = 0, chunk: int = 250) -> int:
    """The precomp files, written chunk by chunk; returns their total size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ims = np.lib.format.open_memmap(folder / "train_ims.npy", "w+", np.float32, (n, REGIONS, DIM))
    grids = np.lib.format.open_memmap(folder / "train_grids.npy", "w+", np.float32, (n, GRID, GRID, DIM))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        ims[a:b] = np.maximum(rng.standard_normal((b - a, REGIONS, DIM), dtype=np.float32), 0)
        grids[a:b] = np.maximum(rng.standard_normal((b - a, GRID, GRID, DIM), dtype=np.float32), 0)
    ims.flush(), grids.flush()
    del ims, grids
    sizes = np.stack([rng.integers(320, 641, n), rng.integers(240, 481, n)], 1)
    corners = np.sort(rng.random((n, REGIONS, 2, 2)), axis=2)  # (x1, y1) <= (x2, y2)
    boxes = corners.reshape(n, REGIONS, 4) * np.concatenate([sizes, sizes], 1)[:, None, :]
    np.save(folder / "train_boxes.npy", boxes.astype(np.float32))
    np.save(folder / "train_sizes.npy", sizes)
    (folder / "train_caps.txt").write_text("".join(f"a photo of thing {i % 97} near item {j}\n"
                                                   for i in range(n) for j in range(5)))
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--work", default="/tmp/rgf-bench-convert")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    size = make_dump(work / "in", args.images)
    print(f"dump: {args.images} images, {size / 2**20:.0f} MB in {time.perf_counter() - t0:.0f} s")

    cli = ["data", "convert", "precomp", str(work / "in"), "--out", str(work / "out"), "--dataset", "custom",
           "--split", "train=train", "--samples-per-shard", str(args.samples_per_shard), "--no-progress"]
    print("command: rgfusion", " ".join(cli))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *cli], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # CPU seconds stay meaningful when other work shares the cores (wall time does not).
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    peak = int(proc.stdout.split()[-1]) / 1024
    out = sum(p.stat().st_size for p in (work / "out").iterdir())
    print(f"converted {args.images} images in {wall:.1f} s: {args.images / wall:.0f} images/s, "
          f"{size / 2**20 / wall:.0f} MB/s in, {out / 2**20:.0f} MB out; peak RSS {peak:.0f} MB; "
          f"{cpu:.1f} CPU s ({args.images / cpu:.0f} images per CPU s); load average {load:.1f} at start")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
