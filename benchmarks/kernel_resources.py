"""Registers, spills and shared memory of the Triton kernels, compiled for a GPU without one.

    python3 benchmarks/kernel_resources.py                       # sm_90 (H100/H200), the default launch
    python3 benchmarks/kernel_resources.py --warps 4 8 --blocks 32 64 --arch 90
    python3 benchmarks/kernel_resources.py --shapes geometry     # the graph's geometry-bias kernels
    python3 benchmarks/kernel_resources.py --shapes graph --forward-keys 0 64 128   # the forward's key tiles
    python3 benchmarks/kernel_resources.py --shapes graph --query-pass-keys 0 128   # the query pass's
    python3 benchmarks/kernel_resources.py --shapes graph --key-pass-keys 0 128 --warps 4 8  # the key pass's

The attention kernels at the BERT step's three shapes, and ``geometry``: the geometry-bias
kernels at the graph's (85 nodes, two layers of 16 hidden units and 8 heads, a bf16 bias; the block column
is the nodes per program, and --blocks and --dropout do not apply).

Triton compiles to a cubin on any machine (its wheel ships ptxas and cuobjdump), so a kernel
change can be checked for what bounds a latency-bound kernel, how many programs fit on an SM,
before spending GPU time on it. A thread's registers bound the programs an SM holds:
65,536 / (registers × 32 × warps). The figures come from the Triton imported, whose code
generation differs between versions: for the GPU machine's (3.6.0 in December 2026), install it
apart (`python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0`) and put it first,
`PYTHONPATH=/tmp/t36/lib/python3.11/site-packages .venv/bin/python benchmarks/kernel_resources.py`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rgfusion.trainer.model import _triton_attention_kernels as kernels
from rgfusion.trainer.model import _triton_geometry_kernels as geometry
from rgfusion.trainer.model.triton_attention import block_size

# (head size, heads, self-attention, bias, bias gradient, queries, keys) at the BERT step's shapes.
SHAPES = {
    "caption": (64, 12, True, True, False, 20, 20),
    "graph": (128, 8, True, True, True, 85, 85),
    "cgf": (128, 8, False, True, False, 49, 36),
}
KERNELS = {"forward": kernels._forward, "backward_query": kernels._backward_query,
           "backward_key": kernels._backward_key}
CONSTANTS = ("H", "D", "BLOCK", "ROWS", "KEY_BLOCK", "SELF", "HAS_BIAS", "DROPOUT", "EXACT", "BIAS_GRAD", "KEYS_FIT",
             "QUERIES_FIT")
GEOMETRY_KERNELS = {"forward": geometry._forward, "backward": geometry._backward}
GEOMETRY_TYPES = {"boxes": "*fp32", "adj": "*i1", "shares": "*fp32", "N": "i32", "HID": "i32", "fill": "fp32"}


def signature(fn, dtype: str) -> dict[str, str]:
    """Argument types as Triton's compiler takes them: the tensors in ``dtype``, row sums and
    normalisers in float32, the seed int64, the two float arguments float32, the rest int32."""
    types = {}
    for name in fn.arg_names:
        if name in CONSTANTS:
            types[name] = "constexpr"
        elif name in ("lse", "delta"):
            types[name] = "*fp32"
        elif name == "seed_ptr":
            types[name] = "*i64"
        elif name in ("scale", "p_drop"):
            types[name] = "fp32"
        elif re.fullmatch(r"s[bqkovgd]?_\w+|NQ|NK|NQP|N_BLOCKS", name):
            types[name] = "i32"
        else:
            types[name] = f"*{dtype}"
    return types


def resources(kernel: str, shape: str, block: int, warps: int, stages: int, dropout: bool, arch: int,
              key_block: int) -> dict:
    """``key_block``: keys per tile of the forward or the query pass, or per program of the key pass
    (whose query tiles are ``block`` rows)."""
    head, heads, self_attention, bias, bias_grad, queries, keys = SHAPES[shape]
    fn = KERNELS[kernel]
    values = dict(H=heads, D=head, BLOCK=key_block if kernel == "backward_key" else block, ROWS=block,
                  KEY_BLOCK=key_block, SELF=self_attention, HAS_BIAS=bias, DROPOUT=dropout, EXACT=False,
                  BIAS_GRAD=bias_grad, KEYS_FIT=keys <= key_block, QUERIES_FIT=queries <= block)
    constants = {(i,): values[n] for i, n in enumerate(fn.arg_names) if n in CONSTANTS}
    types = signature(fn, "bf16")
    return usage(ASTSource(fn=fn, signature=types, constexprs=constants, attrs=aligned(fn, types)), warps, stages, arch)


def geometry_resources(kernel: str, warps: int, stages: int, arch: int) -> dict:
    fn = GEOMETRY_KERNELS[kernel]
    meta = geometry._meta(torch.empty(1, 85, 4), torch.empty(2, 16, 5), torch.empty(2, 8, 16), torch.bfloat16, kernel)
    constants = {(i,): meta[n] for i, n in enumerate(fn.arg_names) if n in meta}
    types = {n: "constexpr" if n in meta else GEOMETRY_TYPES.get(n, "*bf16") for n in fn.arg_names}
    return usage(ASTSource(fn=fn, signature=types, constexprs=constants, attrs=aligned(fn, types)), warps, stages,
                 arch)


def aligned(fn, types: dict[str, str]) -> dict:
    """Every pointer argument on 16 bytes, as the JIT specialises the tensors it is given: without
    it the compiler assumes no alignment and drops its vector loads and stores."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types[n].startswith("*")}


def usage(source: ASTSource, warps: int, stages: int, arch: int) -> dict:
    """Registers and spills (from the cubin), shared memory, programs per SM, and from the SASS the
    instructions, exponentials (MUFU.EX2) and matrix products (HGMMA: Hopper's warpgroup ones,
    HMMA: the warp's) of one kernel."""
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return dict(registers=registers, spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
                shared=compiled.metadata.shared, programs_per_sm=65536 // (registers * 32 * warps),
                sass=len(lines),
                **{op: sum(f" {op}" in line for line in lines) for op in ("MUFU.EX2", "HGMMA", "HMMA")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=[*SHAPES, "geometry"], choices=[*SHAPES, "geometry"])
    p.add_argument("--warps", nargs="+", type=int, default=None, help="default: each kernel's own")
    p.add_argument("--stages", nargs="+", type=int, default=None, help="default: each kernel's own")
    p.add_argument("--blocks", nargs="+", type=int, default=[0], help="rows per tile (0: the kernels' own choice)")
    p.add_argument("--dropout", nargs="+", type=int, default=[1], help="1: with dropout's mask, 0: without")
    p.add_argument("--forward-keys", nargs="+", type=int, default=[0],
                   help="keys per tile of the forward (0: the kernels' own choice)")
    p.add_argument("--query-pass-keys", nargs="+", type=int, default=[0],
                   help="keys per tile of the backward's query pass (0: the kernels' own choice)")
    p.add_argument("--key-pass-keys", nargs="+", type=int, default=[0],
                   help="keys per program of the backward's key pass (0: the row tile)")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    args = p.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}")
    print(f"{'shape':8s} {'kernel':15s} {'block':>7s} {'warps':>5s} {'stages':>6s} {'drop':>4s} "
          f"{'regs':>4s} {'spill B':>7s} {'smem B':>7s} {'per SM':>6s} {'SASS':>6s} {'EX2':>4s} {'HGMMA':>5s} "
          f"{'HMMA':>4s}")
    if "geometry" in args.shapes:
        for kernel in GEOMETRY_KERNELS:
            own = geometry.LAUNCH[kernel]
            for warps, stages in itertools.product(args.warps or [own.num_warps], args.stages or [own.num_stages]):
                found = geometry_resources(kernel, warps, stages, args.arch)
                row("geometry", kernel, own.rows, warps, stages, 0, found)
    # The kernels' own key tiles where --forward-keys, --query-pass-keys or --key-pass-keys says 0.
    key_tile = {"forward": kernels.forward_key_block, "backward_query": kernels.query_pass_key_block}
    for shape, kernel in itertools.product([s for s in args.shapes if s in SHAPES], KERNELS):
        head, *_, queries, keys = SHAPES[shape]
        key_tiles = {"forward": args.forward_keys, "backward_query": args.query_pass_keys,
                     "backward_key": args.key_pass_keys}[kernel]
        for block, key_block, warps, stages, dropout in itertools.product(
                args.blocks, key_tiles, args.warps or [kernels.LAUNCH.num_warps],
                args.stages or [kernels.LAUNCH.num_stages], args.dropout):
            block = block or block_size(max(queries, keys), head)
            if kernel == "backward_query" and keys <= block:
                continue  # keys in one block: no query pass
            key_block = key_block or key_tile.get(kernel, lambda _, rows: rows)(keys, block)
            tile = f"{block}" if key_block == block else f"{block}x{key_block}"
            row(shape, kernel, tile, warps, stages, dropout,
                resources(kernel, shape, block, warps, stages, bool(dropout), args.arch, key_block))


def row(shape: str, kernel: str, tile: int | str, warps: int, stages: int, dropout: int, r: dict) -> None:
    """``tile``: rows per tile, or ROWSxKEYS where a kernel's key tiles differ from its rows."""
    print(f"{shape:8s} {kernel:15s} {tile!s:>7s} {warps:5d} {stages:6d} {dropout:4d} {r['registers']:4d} "
          f"{r['spill_bytes']:7d} {r['shared']:7d} {r['programs_per_sm']:6d} {r['sass']:6d} {r['MUFU.EX2']:4d} "
          f"{r['HGMMA']:5d} {r['HMMA']:4d}", flush=True)


if __name__ == "__main__":
    main()
