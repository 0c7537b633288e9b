"""Time the Triton attention kernels forward and backward at the BERT step's shapes, per launch option.

    python3 benchmarks/attention_bench.py                      # every shape, the default launch
    python3 benchmarks/attention_bench.py --warps 2 4 8 --stages 1 2 3 --out sweep.json
    python3 benchmarks/attention_bench.py --forward-keys 0 32 128   # the forward's key tiles
    python3 benchmarks/attention_bench.py --shapes graph --query-pass-keys 0 128   # the query pass's
    python3 benchmarks/attention_bench.py --shapes graph --forward-rows 0 64 --forward-warps 0 8 --forward-keys 0 128
    python3 benchmarks/attention_bench.py --shapes graph --key-pass-keys 0 128 --key-pass-warps 0 16  # one pass back

Shapes at batch 128: BERT's 20-word captions (12 heads of 64, a key mask), the joint graph's 85
nodes (8 heads of 128, a geometry bias per head with its gradient, heads-last as the model makes
it), and CGF's two directions (49 cells over 36 masked regions, 36 regions over 49 cells). Each
row is the median of ``--iters`` forward+backward calls (dropout 0.1 unless ``--dropout`` says), timed with CUDA events,
and the kernels' own times from the profiler. Eager calls are bound by the host's launches, so the
first figure mostly says that; compare the kernels' times. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from rgfusion.trainer.model import _triton_attention_kernels as kernels
from rgfusion.trainer.model import triton_attention

DEVICE = torch.device("cuda")


def inputs(shape: str, batch: int) -> tuple:
    """(q, kv, bias, heads): kv None for self-attention."""
    def t(*size):
        return torch.randn(*size, device=DEVICE, dtype=torch.bfloat16).requires_grad_()

    def key_mask(n: int):
        lengths = torch.randint(1, n + 1, (batch,), device=DEVICE)
        keep = torch.arange(n, device=DEVICE)[None] < lengths[:, None]
        return torch.zeros(batch, n, device=DEVICE, dtype=torch.bfloat16).masked_fill(~keep, -1e4)[:, None, None]

    if shape == "caption":
        return t(batch, 20, 3 * 768), None, key_mask(20), 12
    if shape == "graph":
        return t(batch, 85, 3 * 1024), None, t(batch, 85, 85, 8).permute(0, 3, 1, 2), 8
    if shape == "cgf-cells":
        return t(batch, 49, 1024), t(batch, 36, 2048), key_mask(36), 8
    return t(batch, 36, 1024), t(batch, 49, 2048), None, 8


def run(q, kv, bias, heads, dropout) -> None:
    if kv is None:
        out = triton_attention.self_attention(q, bias, heads, dropout)
    else:
        out = triton_attention.cross_attention(q, kv, bias, heads, dropout)
    out.backward(torch.ones_like(out))


def time_ms(args, iters: int) -> float:
    for _ in range(3):
        run(*args)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_us(args) -> dict[str, float]:
    """Each of our kernels' device time in one forward+backward call, in µs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run(*args)
        torch.cuda.synchronize()
    ours = ("_forward", "_backward_query", "_backward_key")
    return {e.key: round(e.device_time_total / 5, 1) for e in prof.key_averages() if e.key in ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = ["caption", "graph", "cgf-cells", "cgf-regions"]
    p.add_argument("--shapes", nargs="+", default=shapes, choices=shapes)
    p.add_argument("--warps", nargs="+", type=int, default=[kernels.LAUNCH.num_warps])
    p.add_argument("--stages", nargs="+", type=int, default=[kernels.LAUNCH.num_stages])
    p.add_argument("--blocks", nargs="+", type=int, default=[0], help="rows per tile (0: the kernels' own choice)")
    p.add_argument("--dropout", nargs="+", type=float, default=[0.1],
                   help="attention dropout; 0 shows what the random numbers cost")
    p.add_argument("--forward-keys", nargs="+", type=int, default=[0],
                   help="keys per tile of the forward (0: the kernels' own choice)")
    p.add_argument("--query-pass-keys", nargs="+", type=int, default=[0],
                   help="keys per tile of the backward's query pass (0: the kernels' own choice)")
    p.add_argument("--forward-rows", nargs="+", type=int, default=[0],
                   help="rows per tile of the forward alone (0: the row tile of the others)")
    p.add_argument("--forward-warps", nargs="+", type=int, default=[0],
                   help="warps of the forward alone (0: --warps)")
    p.add_argument("--key-pass-keys", nargs="+", type=int, default=[0],
                   help="the most keys a program of the key pass holds whole, when they span more than two row "
                        "tiles (0: row tiles); then there is no query pass")
    p.add_argument("--key-pass-warps", nargs="+", type=int, default=[0],
                   help="warps of the key pass alone (0: --warps)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    print(f"{'shape':12s} {'warps':>5s} {'stages':>6s} {'block':>5s} {'keys':>4s} {'qkeys':>5s} {'frows':>5s} "
          f"{'fwarps':>6s} {'kkeys':>5s} {'kwarps':>6s} {'drop':>4s} {'fwd+bwd ms':>10s}  kernels (µs)")
    for shape in args.shapes:
        torch.manual_seed(0)
        data = inputs(shape, args.batch)
        for warps, stages, block, keys, query_keys, rows_, warps_, key_keys, key_warps, dropout in itertools.product(
                args.warps, args.stages, args.blocks, args.forward_keys, args.query_pass_keys, args.forward_rows,
                args.forward_warps, args.key_pass_keys, args.key_pass_warps, args.dropout):
            kernels.LAUNCH = kernels.Launch(num_warps=warps, num_stages=stages, block=block or None,
                                            forward_keys=keys or None, query_pass_keys=query_keys or None,
                                            forward_rows=rows_ or None, forward_warps=warps_ or None,
                                            key_pass_keys=key_keys or None, key_pass_warps=key_warps or None)
            row = dict(shape=shape, warps=warps, stages=stages, block=block or "auto", forward_keys=keys or "auto",
                       query_pass_keys=query_keys or "auto", forward_rows=rows_ or "auto",
                       forward_warps=warps_ or "auto", key_pass_keys=key_keys or "auto",
                       key_pass_warps=key_warps or "auto", dropout=dropout)
            try:
                call = (*data, dropout)
                row.update(ms=round(time_ms(call, args.iters), 4), kernels_us=kernel_us(call))
            except Exception as e:  # a launch option a kernel cannot compile with, e.g. out of shared memory
                row.update(error=f"{type(e).__name__}: {e}"[:200])
            rows.append(row)
            print(f"{shape:12s} {warps:5d} {stages:6d} {row['block']:>5} {row['forward_keys']:>4} "
                  f"{row['query_pass_keys']:>5} {row['forward_rows']:>5} {row['forward_warps']:>6} "
                  f"{row['key_pass_keys']:>5} {row['key_pass_warps']:>6} {dropout:4.2f} "
                  f"{row.get('ms', float('nan')):10.3f}  {row.get('kernels_us', row.get('error'))}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
