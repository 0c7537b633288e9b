"""Time the graph's geometry-bias kernels (trainer/model/_triton_geometry_kernels.py) at the step's
shape, per launch option. Needs a CUDA device.

    python3 benchmarks/geometry_bench.py                                  # the kernels' own launch
    python3 benchmarks/geometry_bench.py --rows 4 8 16 --warps 2 4 8 --stages 1 3 --out sweep.json

Batch 128 images of 85 nodes (36 regions, 49 grid cells), both graph layers' MLPs (5 → 16 → 8
heads) in one pass, biases in bfloat16. Each figure is the median of Triton's ``do_bench`` in µs,
forward (every layer's bias) and backward (the weight gradients' shares and their sum); the first
row with the kernels' own launch settings, each further one with one setting for both kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
from triton.testing import do_bench

from rgfusion.trainer.model import _triton_geometry_kernels as kernels
from rgfusion.trainer.model import edge_bias

DEVICE = torch.device("cuda")


def inputs(batch: int, nodes: int = 85, layers: int = 2, hidden: int = 16, heads: int = 8) -> tuple:
    """Boxes, a random adjacency (about half the edges) and the layers' stacked MLP weights."""
    corner = torch.rand(batch, nodes, 2, device=DEVICE) * 0.7
    boxes = torch.cat([corner, corner + 0.05 + torch.rand(batch, nodes, 2, device=DEVICE) * 0.25], -1)
    adj = torch.rand(batch, nodes, nodes, device=DEVICE) < 0.5
    weights = [torch.randn(*size, device=DEVICE) * 0.3
               for size in ((layers, hidden, 5), (layers, hidden), (layers, heads, hidden), (layers, heads))]
    return boxes, adj, weights


def bench(launches: dict[str, kernels.Launch], batch: int) -> dict:
    """Forward and backward µs with ``launches`` per kernel."""
    kernels.LAUNCH = launches  # read at every call
    ops = edge_bias.ops()
    boxes, adj, weights = inputs(batch)
    grads = [torch.randn_like(b) for b in ops.bias(boxes, adj, *weights, torch.bfloat16)]
    return {**{k: dataclasses.asdict(v) for k, v in launches.items()},
            "forward_us": 1e3 * do_bench(lambda: ops.bias(boxes, adj, *weights, torch.bfloat16)),
            "backward_us": 1e3 * do_bench(lambda: ops.backward(grads, boxes, adj, *weights[:3]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[], help="nodes per program")
    p.add_argument("--warps", nargs="+", type=int, default=[4])
    p.add_argument("--stages", nargs="+", type=int, default=[3])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="")
    args = p.parse_args()
    tuned = dict(kernels.LAUNCH)
    options = [("the kernels' own", tuned)] + [
        (f"{r} rows, {w} warps, {s} stages", {"forward": kernels.Launch(r, w, s), "backward": kernels.Launch(r, w, s)})
        for r, w, s in itertools.product(args.rows, args.warps, args.stages)]
    rows = []
    print(f"{'launch (both kernels)':32s} {'forward µs':>10s} {'backward µs':>11s}")
    for name, launches in options:
        rows.append({"launch": name, **bench(launches, args.batch)})
        print(f"{name:32s} {rows[-1]['forward_us']:10.1f} {rows[-1]['backward_us']:11.1f}", flush=True)
    kernels.LAUNCH = tuned
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
