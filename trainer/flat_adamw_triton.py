"""FlatAdamW's clip and update as Triton kernels that read each gradient where autograd left it.

The compiled update (flat_adamw.clip_and_update) first gathers a group's gradients into one flat
buffer, then reads it for the norm and again for AdamW: on an H200, 0.21 ms of the BERT step's
1.4 ms update went to the gather alone, at the end of the step where nothing runs beside it
(benchmarks/RESULTS.md, session 14). Here a kernel sums the squares of every gradient in place,
one program turns the sums into the clip scale and advances the step counts, and one pass per
group reads gradient, master and moments and writes master, moments and the bf16 weights
(trainer/_triton_adamw_kernels.py). A
master in int16 is a split one's low bits (flat_adamw.split_master), the weights its high half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rgfusion.trainer import _triton_adamw_kernels as kernels

GRAD_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def cut(sizes: list[int], block: int, align: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """The chunks of a group whose parameters have ``sizes`` elements, laid end to end: rows of
    (parameter, first element, length, offset in the flat buffer), each at most ``block``
    elements of one parameter. Chunks whose start and length are multiples of ``align``, in the
    parameter and in the flat buffer, come first; the second value counts them."""
    aligned, rest, offset = [], [], 0
    for i, n in enumerate(sizes):
        for start in range(0, n, block):
            row = (i, start, min(block, n - start), offset + start)
            fits = (offset + start) % align == 0 and row[2] % align == 0 and start % align == 0
            (aligned if fits else rest).append(row)
        offset += n
    return aligned + rest, len(aligned)


@dataclass
class Launch:
    """Consecutive chunks of one group that one kernel launch takes."""

    param: Tensor
    start: Tensor
    length: Tensor
    flat: Tensor
    first: int  # index of its first chunk among all groups' (into the partial sums)
    aligned: bool

    @property
    def count(self) -> int:
        return len(self.param)


def launches(sizes: list[int], first: int, block: int, device: torch.device) -> list[Launch]:
    """A group's chunks of ``block`` elements as at most two launches: the aligned ones, then the rest."""
    rows, aligned = cut(sizes, block, kernels.ALIGN)
    columns = [torch.tensor(c, dtype=dtype, device=device)
               for c, dtype in zip(zip(*rows), (torch.int32, torch.int64, torch.int32, torch.int64))]
    parts = [(0, aligned, True), (aligned, len(rows), False)]
    return [Launch(*(c[a:b] for c in columns), first + a, fits) for a, b, fits in parts if b > a]


class GradientTable:
    """The addresses of a group's gradients in a device tensor, for the kernels.

    Autograd hands over new gradient tensors every step, mostly at the addresses of the step
    before (the caching allocator) and always at the recorded ones in a replayed CUDA graph, so
    the table is copied from pinned memory only when they change. A copy recorded in a graph
    reads its host buffer at every replay: a capture takes a buffer pinned beforehand (by any
    update outside a capture, as the warm-up before one is) and keeps it for good."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.addresses: list[int] = []
        self.table: Tensor | None = None
        self.spare: Tensor | None = None
        self.recorded: list[Tensor] = []

    def __call__(self, grads: list[Tensor]) -> Tensor:
        addresses = [g.data_ptr() for g in grads]
        if self.device.type != "cuda":  # Triton's interpreter reads host memory
            return torch.tensor(addresses, dtype=torch.int64)
        if torch.cuda.is_current_stream_capturing():
            if self.spare is None:
                raise RuntimeError("FlatAdamW: run one update outside a CUDA graph before capturing one")
            host, self.spare = self.spare, None
            self.recorded.append(host)
            host.copy_(torch.tensor(addresses, dtype=torch.int64))
            return host.to(self.device, non_blocking=True)
        if self.spare is None:
            self.spare = torch.empty(len(addresses), dtype=torch.int64, pin_memory=True)
        if addresses != self.addresses:
            self.addresses = addresses
            host = torch.tensor(addresses, dtype=torch.int64).pin_memory()
            self.table = host.to(self.device, non_blocking=True)
        assert self.table is not None
        return self.table


class TritonUpdate:
    """flat_adamw.clip_and_update's arguments and result, for the groups whose parameters have
    ``sizes`` elements each. ``update`` and ``sums``: the elements and warps of one
    program of AdamW's kernel and of the sum of squares' (benchmarks/adamw_bench.py times the
    choices; the sums, which read 2 bytes per element where AdamW moves 28, take larger chunks)."""

    def __init__(self, sizes: list[list[int]], device: torch.device,
                 update: tuple[int, int] = kernels.UPDATE, sums: tuple[int, int] = kernels.SUMS) -> None:
        self.update_shape, self.sums_shape = update, sums
        self.updates, _ = cover(sizes, update[0], device)
        self.sums_launches, chunks = cover(sizes, sums[0], device)
        self.partial = torch.empty(chunks, device=device)
        self.tables = [GradientTable(device) for _ in sizes]
        # The clip's results, (norm, scale, go-ahead), where the AdamW kernels read them: kept for
        # good, as a captured step's pool would reuse a fresh tensor before a later replay reads it.
        self.clipped = torch.zeros(3, device=device)
        self.steps: tuple[tuple[int, ...], Tensor] | None = None  # the step counts' addresses

    def __call__(self, grads: list[list[Tensor]], masters: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], weights: list[Tensor | None], lrs: list[Tensor], steps: list[Tensor],
                 hypers: list[tuple[float, float, float, float]], max_norm: float, finite: Tensor) -> Tensor:
        grads = [[readable(g) for g in group] for group in grads]  # alive until the kernels are queued
        tables = [table(group) for table, group in zip(self.tables, grads)]
        for i, (table, group) in enumerate(zip(tables, grads)):
            self.sums(i, table, GRAD_TYPES[group[0].dtype])
        norm, scale, ok = self.conclude(max_norm, finite, steps)
        block, warps = self.update_shape
        for i, (table, group) in enumerate(zip(tables, self.updates)):
            beta1, beta2, eps, decay = hypers[i]
            w = weights[i]
            for launch in group:
                kernels._adamw[(launch.count,)](
                    table, launch.param, launch.start, launch.length, launch.flat, masters[i], exp_avgs[i],
                    exp_avg_sqs[i], masters[i] if w is None else w, scale, ok, lrs[i], steps[i], beta1, beta2,
                    log(beta1), log(beta2), eps, decay, i, GRAD=GRAD_TYPES[grads[i][0].dtype],
                    HAS_WEIGHTS=w is not None, SPLIT=masters[i].dtype == torch.int16, ALIGNED=launch.aligned,
                    BLOCK=block, num_warps=warps)
        return norm

    def sums(self, i: int, table: Tensor, grad: tl.dtype, gathered: Tensor | None = None) -> None:
        """Group ``i``'s sums of squares into ``partial`` (``table``: its gradients' addresses, of
        type ``grad``); with ``gathered``, the gradients copied into that flat buffer too."""
        block, warps = self.sums_shape
        for launch in self.sums_launches[i]:
            kernels._sum_squares[(launch.count,)](
                table, launch.param, launch.start, launch.length, launch.flat, self.partial[launch.first:],
                self.partial if gathered is None else gathered, GRAD=grad, ALIGNED=launch.aligned,
                GATHER=gathered is not None, BLOCK=block, num_warps=warps)

    def gather(self, i: int, grads: list[Tensor], gathered: Tensor) -> None:
        """Group ``i``'s gradients into its flat buffer ``gathered``, and their sums of squares."""
        grads = [readable(g) for g in grads]
        self.sums(i, self.tables[i](grads), GRAD_TYPES[grads[0].dtype], gathered)

    def conclude(self, max_norm: float, finite: Tensor, steps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """From the sums of squares of every group: the norm, the clip scale and whether to update
        (1 or 0), as views of ``clipped``; the groups' ``steps`` (float32 counts) advanced by the
        last. One kernel (``_conclude``)."""
        addresses = tuple(s.data_ptr() for s in steps)
        if self.steps is None or self.steps[0] != addresses:  # outside a capture: the counts stay put
            self.steps = addresses, torch.tensor(addresses, dtype=torch.int64, device=self.clipped.device)
        kernels._conclude[(1,)](self.partial, len(self.partial), finite, self.steps[1], len(steps), self.clipped,
                                max_norm, BLOCK=1024, num_warps=4)
        return self.clipped[0], self.clipped[1], self.clipped[2]

    def update_range(self, i: int, gathered: Tensor, lo: int, hi: int, master: Tensor, exp_avg: Tensor,
                     exp_avg_sq: Tensor, weights: Tensor | None, lr: Tensor, step: Tensor,
                     hypers: tuple[float, float, float, float], scale: Tensor, ok: Tensor) -> None:
        """AdamW on elements ``lo:hi`` of group ``i``, the gradient read from ``gathered``;
        ``step`` already counts this update."""
        if hi <= lo:
            return
        block, warps = self.update_shape
        beta1, beta2, eps, decay = hypers
        kernels._adamw_range[(triton.cdiv(hi - lo, block),)](
            gathered, lo, hi, master, exp_avg, exp_avg_sq, master if weights is None else weights, scale, ok, lr,
            step, beta1, beta2, log(beta1), log(beta2), eps, decay, i, HAS_WEIGHTS=weights is not None,
            SPLIT=master.dtype == torch.int16, ALIGNED=lo % kernels.ALIGN == 0, BLOCK=block, num_warps=warps)


def cover(sizes: list[list[int]], block: int, device: torch.device) -> tuple[list[list[Launch]], int]:
    """Every group's launches over chunks of ``block`` elements, numbered on across groups, and
    how many chunks there are in all."""
    groups, first = [], 0
    for group in sizes:
        groups.append(launches(group, first, block, device))
        first += sum(launch.count for launch in groups[-1])
    return groups, first


def readable(t: Tensor) -> Tensor:
    """``t``, or a fresh copy where it is not contiguous or does not start on 16 bytes (a view),
    as the kernels read gradients."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def log(beta: float) -> float:
    """A beta's logarithm, for ``beta ** step`` as ``exp(step * log(beta))``; a beta of 0 gives 0."""
    return math.log(beta) if beta > 0 else -math.inf
