"""Time FlatAdamW's whole update (clip and AdamW, bf16 weights) at the BERT recipe's parameter
groups, replayed in a CUDA graph as in the captured step. Needs a CUDA device.

    python3 benchmarks/adamw_bench.py --out adamw.json

Rows: the Triton kernels (trainer/flat_adamw_triton.py) for each program shape (elements × warps)
of AdamW's kernel, then, with the fastest of those, for each of the sums of squares'; the
kernels on split masters (optim.master=split, 26 bytes a parameter), on bf16 moments
(optim.moments=bf16, 20 bytes) and on both (18 bytes), each for every AdamW shape; the compiled
torch update, which first gathers the gradients into one flat buffer
(flat_adamw.clip_and_update); and inductor's AdamW pass alone on gradients already gathered
(flat_adamw.adamw_update), the bandwidth the kernels' AdamW should reach. Each figure is the
median over ``--iters`` replays, in µs, with the memory traffic it implies in TB/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import gpu_bench  # noqa: E402

from rgfusion.trainer.config import OptimConfig  # noqa: E402
from rgfusion.trainer.engine import param_groups  # noqa: E402
from rgfusion.trainer.flat_adamw import FlatAdamW, adamw_update  # noqa: E402
from rgfusion.trainer.flat_adamw_triton import TritonUpdate  # noqa: E402
from rgfusion.trainer.model.retrieval import RetrievalModel  # noqa: E402

DEVICE = torch.device("cuda")
BYTES = 28  # per parameter in AdamW's pass: bf16 gradient read, fp32 master and moments read and written, bf16 weights written
SPLIT_BYTES = 26  # the same with split masters: the bf16 weights and the int16 low bits read and written instead
BF16_MOMENTS = 8  # bytes fewer per parameter with the moments in bf16


def group_sizes() -> list[tuple[list[int], float]]:
    """The recipe's param groups of the full BERT model: sizes and weight decay."""
    shape = gpu_bench.Shape()
    v = next(v for v in gpu_bench.variants() if v.name == "full-bert-bf16w-compile-graph")
    cfg = gpu_bench.model_config(v, shape, gpu_bench.bert_dir(shape, False))
    model = RetrievalModel(cfg, region_dim=shape.region_dim, grid_dim=shape.grid_dim, grid_size=shape.grid,
                           vocab_size=30522)
    return [([p.numel() for p in g["params"]], g["weight_decay"])
            for g in param_groups(model, OptimConfig(), model.param_groups_hint())]


def replay_us(run, iters: int) -> float:
    """Median µs of ``run`` replayed from a CUDA graph, captured as gpu_bench captures a step."""
    replay = gpu_bench.capture_step(lambda _: run(), {})
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay({})
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def shape(text: str) -> tuple[int, int]:
    """'2048x4' as (2048, 4)."""
    elements, warps = text.split("x")
    return int(elements), int(warps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=shape, nargs="+", default=[(1024, 2), (1024, 4), (2048, 2), (2048, 4), (4096, 4)],
                   help="AdamW's program shapes, elements x warps")
    p.add_argument("--sums", type=shape, nargs="+",
                   default=[(2048, 4), (8192, 4), (8192, 8), (16384, 8), (32768, 8), (32768, 16)],
                   help="the sums of squares' program shapes")
    p.add_argument("--kernels-only", action="store_true", help="leave out the compiled update (its compile takes a minute)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default="")
    args = p.parse_args()
    sizes = group_sizes()
    params = [[nn.Parameter(torch.randn(n, device=DEVICE) * 0.02) for n in group] for group, _ in sizes]
    grads = [[torch.randn(n, device=DEVICE, dtype=torch.bfloat16) for n in group] for group, _ in sizes]
    total = sum(n for group, _ in sizes for n in group)
    rows = []

    def row(name: str, us: float, bytes_per_parameter: int = BYTES) -> None:
        rows.append({"name": name, "us": round(us, 1), "tb_per_s": round(bytes_per_parameter * total / us / 1e6, 2)})
        print(f"{name:36s} {us:8.1f} µs  {rows[-1]['tb_per_s']:5.2f} TB/s at {bytes_per_parameter} B per parameter",
              flush=True)

    def optimizer(kernels: bool, master: str = "fp32", moments: str = "fp32") -> FlatAdamW:
        return FlatAdamW([{"params": ps, "weight_decay": wd} for ps, (_, wd) in zip(params, sizes)],
                         precision="bf16", lr=1e-4, weight_decay=0.01, max_norm=2.0, kernels=kernels, master=master,
                         moments=moments)

    def update(opt: FlatAdamW) -> None:
        for ps, gs in zip(params, grads):
            for p_, g in zip(ps, gs):
                p_.grad = g
        opt.update()

    opt, groups = optimizer(kernels=True), [group for group, _ in sizes]
    for u in args.updates:
        opt._update = TritonUpdate(groups, DEVICE, update=u, sums=args.sums[0])
        row(f"kernels update {u[0]}x{u[1]} sums {args.sums[0][0]}x{args.sums[0][1]}", replay_us(lambda: update(opt),
                                                                                              args.iters))
    best = min(zip(rows, args.updates), key=lambda r: r[0]["us"])[1]
    for s in args.sums[1:]:
        opt._update = TritonUpdate(groups, DEVICE, update=best, sums=s)
        row(f"kernels update {best[0]}x{best[1]} sums {s[0]}x{s[1]}", replay_us(lambda: update(opt), args.iters))
    kinds = (("split", "fp32", "split masters", SPLIT_BYTES), ("fp32", "bf16", "bf16 moments", BYTES - BF16_MOMENTS),
             ("split", "bf16", "split masters, bf16 moments", SPLIT_BYTES - BF16_MOMENTS))
    for master, moments, name, traffic in kinds:  # fewer bytes a parameter may want other program shapes
        other = optimizer(kernels=True, master=master, moments=moments)
        for u in args.updates:
            other._update = TritonUpdate(groups, DEVICE, update=u, sums=args.sums[0])
            row(f"kernels, {name}, update {u[0]}x{u[1]}", replay_us(lambda: update(other), args.iters), traffic)
        del other
    if not args.kernels_only:
        opt = optimizer(kernels=False)
        row("compiled, with the gather", replay_us(lambda: update(opt), args.iters))
    flat = torch.cat([g for group in grads for g in group])
    state = [torch.zeros(total, device=DEVICE) for _ in range(3)]
    weights = torch.empty(total, device=DEVICE, dtype=torch.bfloat16)
    one, ok, lr, step = (torch.tensor(v, device=DEVICE) for v in (1.0, True, 1e-4, 1.0))
    compiled = torch.compile(adamw_update, fullgraph=True)
    row("inductor AdamW pass alone", replay_us(
        lambda: compiled(flat, *state, weights, one, ok, lr, step, 0.9, 0.999, 1e-8, 0.01), args.iters))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "parameters": total, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
