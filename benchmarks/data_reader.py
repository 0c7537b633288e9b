"""Reader throughput harness (issue 2): ``rgfusion data bench`` on paper-sized synthetic shards,
from a local folder and through a local S3 endpoint (moto's server in its own process).

    .venv/bin/python benchmarks/data_reader.py --images 2000 --work /tmp/rgf-bench-data

Generates the dataset once (36x2048 regions + 7x7x2048 grids, float16), then prints each
bench command and its summary lines. Results are recorded by hand in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(argv: list[str], env: dict | None = None) -> str:
    print("$", shlex.join(argv), flush=True)
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith(("read ", "total:", "cpu:", "peak RSS", "skipped"))]
    print("\n".join(lines) or out, flush=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_matrix(url: str, extra: list[str], env: dict | None = None) -> None:
    for workers, dtype in ((0, "float16"), (0, "float32"), (1, "float16"), (2, "float16")):
        sh([str(BIN / "rgfusion"), "data", "bench", url, "--batch-size", "128", "--workers", str(workers),
            "--dtype", dtype, *extra], env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--work", default="/tmp/rgf-bench-data")
    ap.add_argument("--skip-s3", action="store_true")
    args = ap.parse_args()
    root = Path(args.work) / "paper"
    if not (root / "manifest.json").exists():
        sh([str(BIN / "rgfusion"), "data", "synth", "--out", str(root), "--recipe", "data/synthetic_paper_dims.yaml",
            "--set", f"train_images={args.images}", "--set", "dev_images=100", "--set", "test_images=100",
            "--quiet"])
    sh(["du", "-sh", str(root)])
    bench_matrix(str(root), [])
    if args.skip_s3:
        return

    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"moto server on {endpoint} did not start") from None
                time.sleep(0.2)
        upload = ("import s3fs, sys; fs = s3fs.S3FileSystem(client_kwargs={'endpoint_url': sys.argv[1]}); "
                  "fs.mkdir('bench'); fs.put(sys.argv[2], 'bench/paper', recursive=True)")
        subprocess.run([str(BIN / "python"), "-c", upload, endpoint, str(root)], check=True, env=env)
        bench_matrix("s3://bench/paper", ["--endpoint-url", endpoint], env)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
