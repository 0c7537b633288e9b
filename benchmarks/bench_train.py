"""Trainer throughput: pairs/s and data-wait share of the default recipe, 1 and 2 processes.

Runs ``rgfusion train`` (default recipe: full fusion model, BiGRU, ZeRO-2, synthetic data) for
a fixed number of optimizer steps as one process and under ``torchrun --nproc_per_node 2``
(gloo), and reads the trainer's own throughput line. The global batch is the same (64 pairs
per step), so two processes each take 32. CPU seconds of the whole run (start-up and the
epoch-end evaluation included) are reported too: wall-clock figures on shared cores are noisy.

    .venv/bin/python benchmarks/bench_train.py [--data DIR] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(nproc: int, data: str, steps: int, work: Path) -> dict:
    sets = [f"data.url={data}", f"train.out_dir={work}/np{nproc}", "train.epochs=1",
            f"train.steps_per_epoch={steps}", "checkpoint.every_steps=0", "tracking.enabled=false",
            "train.progress=false"]
    cli = ["-m", "rgfusion.trainer.cli", "train", *[a for s in sets for a in ("--set", s)]]
    argv = ([str(BIN / "python"), *cli] if nproc == 1 else
            [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
             f"--master_port={29500 + os.getpid() % 1000}", *cli])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    # No OMP_NUM_THREADS: the trainer sizes its thread team (torchrun sets 1 per worker itself).
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(f"{nproc} process run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    m = re.search(r"throughput: ([\d.]+) pairs/s, data wait ([\d.]+)%", out.stdout)
    return {"nproc": nproc, "pairs_per_s": float(m.group(1)), "data_wait_pct": float(m.group(2)),
            "wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_at_start": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="synthetic dataset root (default: write one to a temp folder)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from rgfusion.datasets.synth import SynthConfig, write_synthetic

            data = str(work / "data")
            write_synthetic(SynthConfig(), data, progress=False)
        rows = [run(n, data, args.steps, work) for n in args.nproc]
    print("| processes | pairs/s | data wait | wall | CPU time | load avg at start |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['nproc']} | {r['pairs_per_s']:.1f} | {r['data_wait_pct']:.1f}% | {r['wall_s']:.0f} s "
              f"| {r['cpu_s']:.0f} s | {r['load_at_start']:.1f} |")


if __name__ == "__main__":
    main()
