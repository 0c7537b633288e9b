"""Time the GELU feed-forward's Triton products (trainer/model/ffn.py) per tile option, against
cuBLAS's product with PyTorch's GELU, at the step's shapes. Needs a CUDA device.

    python3 benchmarks/ffn_bench.py --out ffn.json      # both shapes, every tile option

Shapes at batch 128, bfloat16: the joint graph's 10,880 nodes (1,024 → 4,096) and BERT's 2,560
word pieces (768 → 3,072). Per shape it times, as the median of Triton's ``do_bench``:

- forward: cuBLAS's ``x·w1ᵀ + b1`` alone (the floor), with PyTorch's GELU after it (eager and
  compiled), and ``_up_forward`` (the product with the GELU in its epilogue) per tile option;
- backward: cuBLAS's ``dy·w2`` alone, with ``gelu_backward`` and the bias gradient's column
  sum after it (eager and compiled), and ``_up_backward`` per tile option;
- the whole block forward and backward, PyTorch's path against the kernels' (default tiles).

Each kernel row also gives its largest difference from PyTorch's path, relative to the largest
value, so a wrong result shows beside its time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from rgfusion.trainer.model import _triton_ffn_kernels as kernels
from rgfusion.trainer.model import ffn

DEVICE = torch.device("cuda")
SHAPES = {"graph": (128 * 85, 1024, 4096), "bert": (128 * 20, 768, 3072)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
         (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4)]


def meta(tile: tuple) -> dict:
    bm, bn, bk, warps, stages = tile
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def bench_shape(name: str, m: int, k: int, n: int) -> dict:
    def t(*size, scale=1.0):
        return torch.randn(*size, device=DEVICE, dtype=torch.bfloat16) * scale

    x, w1, b1, w2, b2, dy = t(m, k), t(n, k, scale=k ** -0.5), t(n), t(k, n, scale=n ** -0.5), t(k), t(m, k)
    pre = F.linear(x, w1, b1)
    act = F.gelu(pre)

    def gelu_grad():
        d_pre = torch.ops.aten.gelu_backward(dy @ w2, pre)
        return d_pre, d_pre.float().sum(0)

    def up():
        h = F.linear(x, w1, b1)
        return h, F.gelu(h)

    d_pre_ref, _ = gelu_grad()
    flops = 2 * m * n * k
    row = {"shape": name, "m": m, "k": k, "n": n, "gemm_gflop": flops / 1e9,
           "forward_us": {"cublas_product": 1e3 * do_bench(lambda: F.linear(x, w1, b1)),
                          "cublas_gelu_eager": 1e3 * do_bench(up),
                          "cublas_gelu_compiled": 1e3 * do_bench(torch.compile(up))},
           "backward_us": {"cublas_product": 1e3 * do_bench(lambda: dy @ w2),
                           "cublas_gelu_eager": 1e3 * do_bench(gelu_grad),
                           "cublas_gelu_compiled": 1e3 * do_bench(torch.compile(gelu_grad))},
           "tiles": []}
    for tile in TILES:
        try:
            got_pre, got_act = kernels.up_forward(x, w1, b1, meta(tile))
            got_d, _ = kernels.up_backward(dy, w2, pre, meta(tile))
            row["tiles"].append({
                "tile": tile, "forward_us": 1e3 * do_bench(lambda tile=tile: kernels.up_forward(x, w1, b1, meta(tile))),
                "backward_us": 1e3 * do_bench(lambda tile=tile: kernels.up_backward(dy, w2, pre, meta(tile))),
                "error": max(error(got_pre, pre), error(got_act, act), error(got_d, d_pre_ref))})
        except Exception as e:  # a tile that does not fit (shared memory, registers) must not lose the rest
            row["tiles"].append({"tile": tile, "error_message": f"{type(e).__name__}: {e}"[:200]})
    row["block_us"] = whole_block(x, w1, b1, w2, b2)
    return row


def whole_block(x, w1, b1, w2, b2) -> dict:
    """Forward and backward of down(gelu(up(x))), PyTorch's path and the kernels'."""
    up, down = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    up.weight, up.bias = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(b1.clone())
    down.weight, down.bias = torch.nn.Parameter(w2.clone()), torch.nn.Parameter(b2.clone())
    x = x.clone().requires_grad_()
    out = {}
    for impl in ("math", "triton"):
        def step(impl=impl):
            ffn.feed_forward(x, up, down, impl).backward(torch.ones(x.shape, device=DEVICE, dtype=x.dtype))
        out[impl] = 1e3 * do_bench(step, grad_to_none=[x, *up.parameters(), *down.parameters()])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", default="")
    args = p.parse_args()
    ffn.ops()
    rows = [bench_shape(name, *SHAPES[name]) for name in args.shapes]
    for r in rows:
        print(f"\n{r['shape']}: {r['m']} x {r['k']} -> {r['n']} ({r['gemm_gflop']:.1f} GFLOP per product)")
        print("  forward  " + "  ".join(f"{k} {v:.1f}" for k, v in r["forward_us"].items()))
        print("  backward " + "  ".join(f"{k} {v:.1f}" for k, v in r["backward_us"].items()))
        print("  block fwd+bwd " + "  ".join(f"{k} {v:.1f}" for k, v in r["block_us"].items()))
        for t in r["tiles"]:
            if "error_message" in t:
                print(f"  tile {t['tile']}: {t['error_message']}")
                continue
            tflops = r["gemm_gflop"] / t["forward_us"] * 1e-3
            print(f"  tile {t['tile']}: forward {t['forward_us']:.1f} us ({tflops:.0f} TFLOP/s)  "
                  f"backward {t['backward_us']:.1f} us  error {t['error']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
