"""Time the feed-forward's bias-and-GELU kernels (trainer/model/ffn.py) against PyTorch's compiled
path, at the step's shapes. Needs a CUDA device.

    python3 benchmarks/ffn_bench.py --out ffn.json

Shapes at batch 128, bfloat16: the joint graph's 10,880 nodes × 4,096 and BERT's 2,560 word pieces
× 3,072. Forward: bias and GELU of the product's output. Backward: the pre-activation's gradient
and the bias gradient. Each figure is the median of Triton's ``do_bench`` in µs; each kernel row
also gives its largest difference from PyTorch's path, relative to the largest value.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from rgfusion.trainer.model import ffn

DEVICE = torch.device("cuda")
SHAPES = {"graph": (128 * 85, 4096), "bert": (128 * 20, 3072)}


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def bench_shape(name: str, m: int, n: int) -> dict:
    h, grad = (torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)

    def forward():
        return F.gelu(h + bias)

    def backward():
        d_pre = torch.ops.aten.gelu_backward(grad, h + bias)
        return d_pre, d_pre.float().sum(0)

    forward_c, backward_c = torch.compile(forward), torch.compile(backward)
    ops = ffn.ops()
    d_pre, d_bias = ops.backward(grad, h, bias)
    want_pre, want_bias = backward_c()
    return {"shape": name, "m": m, "n": n,
            "forward_us": {"compiled": 1e3 * do_bench(forward_c), "kernel": 1e3 * do_bench(lambda: ops.bias_gelu(h, bias))},
            "backward_us": {"compiled": 1e3 * do_bench(backward_c),
                            "kernel": 1e3 * do_bench(lambda: ops.backward(grad, h, bias))},
            "error": max(error(ops.bias_gelu(h, bias), forward_c()), error(d_pre, want_pre), error(d_bias, want_bias))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = [bench_shape(name, *shape) for name, shape in SHAPES.items()]
    for r in rows:
        print(f"{r['shape']:6s} {r['m']:6d} x {r['n']:5d}  forward compiled {r['forward_us']['compiled']:7.1f} "
              f"kernel {r['forward_us']['kernel']:7.1f}  backward compiled {r['backward_us']['compiled']:7.1f} "
              f"kernel {r['backward_us']['kernel']:7.1f}  error {r['error']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
