"""Time the feed-forward's bias-and-GELU kernels (trainer/model/ffn.py) against PyTorch's compiled
path, at the step's shapes. Needs a CUDA device.

    python3 benchmarks/ffn_bench.py --out ffn.json
    python3 benchmarks/ffn_bench.py --tiles 64x128x4 32x256x4 128x128x8   # the kernels' tiles

Shapes at batch 128, bfloat16: the joint graph's 10,880 nodes × 4,096 and BERT's 2,560 word pieces
× 3,072. Forward: bias and GELU of the product's output. Backward: the pre-activation's gradient
and the bias gradient. Each figure is the median of Triton's ``do_bench`` in µs; each kernel row
also gives its largest difference from PyTorch's path, relative to the largest value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from rgfusion.trainer.model import _triton_gelu_kernels as gelu
from rgfusion.trainer.model import ffn

DEVICE = torch.device("cuda")
SHAPES = {"graph": (128 * 85, 4096), "bert": (128 * 20, 3072)}


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def bench_shape(name: str, m: int, n: int, tiles: list[gelu.Launch]) -> dict:
    h, grad = (torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)

    def forward():
        return F.gelu(h + bias)

    def backward():
        d_pre = torch.ops.aten.gelu_backward(grad, h + bias)
        return d_pre, d_pre.float().sum(0)

    forward_c, backward_c = torch.compile(forward), torch.compile(backward)
    ops = ffn.ops()
    want_pre, want_bias = backward_c()
    kernel = []
    for tile in tiles:
        gelu.LAUNCH = tile  # read at every call
        d_pre, d_bias = ops.backward(grad, h, bias)
        kernel.append({**dataclasses.asdict(tile),
                       "forward_us": 1e3 * do_bench(lambda: ops.bias_gelu(h, bias)),
                       "backward_us": 1e3 * do_bench(lambda: ops.backward(grad, h, bias)),
                       "error": max(error(ops.bias_gelu(h, bias), forward_c()), error(d_pre, want_pre),
                                    error(d_bias, want_bias))})
    return {"shape": name, "m": m, "n": n,
            "compiled_us": {"forward": 1e3 * do_bench(forward_c), "backward": 1e3 * do_bench(backward_c)},
            "kernel": kernel}


def tile(text: str) -> gelu.Launch:
    """MxNxWARPS, e.g. 64x128x4."""
    try:
        m, n, w = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a tile is ROWSxCOLUMNSxWARPS, e.g. 64x128x4") from None
    return gelu.Launch(block_m=m, block_n=n, num_warps=w)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    own = gelu.LAUNCH
    p.add_argument("--tiles", nargs="+", type=tile, default=[own],
                   help=f"the kernels' tiles as ROWSxCOLUMNSxWARPS (default: their own, {own.block_m}x{own.block_n}x"
                        f"{own.num_warps})")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = [bench_shape(name, *shape, args.tiles) for name, shape in SHAPES.items()]
    gelu.LAUNCH = own
    for r in rows:
        print(f"{r['shape']:6s} {r['m']:6d} x {r['n']:5d}  compiled: forward {r['compiled_us']['forward']:7.1f} "
              f"backward {r['compiled_us']['backward']:7.1f}")
        for k in r["kernel"]:
            print(f"  kernel {k['block_m']:4d}x{k['block_n']:<4d} {k['num_warps']} warps: forward "
                  f"{k['forward_us']:7.1f}  backward {k['backward_us']:7.1f}  error {k['error']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
