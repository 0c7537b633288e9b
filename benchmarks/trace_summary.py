"""Where a profiled step's GPU time goes, from a PyTorch profiler chrome trace.

``gpu_bench.py --profile VARIANT --trace FILE.json.gz`` writes the trace; this reads it back and
prints, per step: the span from the first kernel to the last, how busy each CUDA stream was,
how much the streams overlapped, the idle time, kernel time by kind, and the top kernels. Kernels
replayed inside a CUDA graph appear in the trace too, so a captured step can be read this way.

    python benchmarks/trace_summary.py trace.json.gz --steps 5 [--timeline 500]
    python benchmarks/trace_summary.py trace.json.gz --steps 5 --origins 'reduce_kernel'
    python benchmarks/trace_summary.py trace.json.gz --steps 5 --by-grid   # one line per kernel and grid
    python benchmarks/trace_summary.py trace.json.gz --steps 5 --per-step  # when each stream starts and ends

``--origins REGEX`` says where the matching kernels were launched from: the CPU ops and, in a
trace recorded with Python stacks (``gpu_bench.py --profile V --stack``), the Python frames
around each launch. It needs an uncaptured step: a CUDA graph launches all its kernels at once.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import sys
from collections import defaultdict

KINDS = (  # first match wins
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|wgmma|cublas", re.I)),
    ("triton reduction", re.compile(r"^triton_(red|per)_")),
    ("triton pointwise", re.compile(r"^triton_")),
    ("cuDNN RNN", re.compile(r"rnn|RNN|cudnn", re.I)),
    ("torch reduction", re.compile(r"reduce_kernel|softmax|norm", re.I)),
    ("torch elementwise", re.compile(r"elementwise|vectorized|unrolled|index|gather|scatter|cat", re.I)),
    ("memcpy/memset", re.compile(r"^Memcpy|^Memset|memcpy|memset", re.I)),
)


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def span_end(event: dict) -> float:
    return float(event["ts"]) + float(event.get("dur", 0))


def gpu_kernels(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (µs), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def label(kernel: dict, by_grid: bool) -> str:
    """The kernel's name; with ``by_grid`` also its grid, which tells apart the calls of one Triton
    kernel at different shapes (the graph's attention from BERT's, a GELU of 4,096 columns from
    one of 3,072)."""
    if not by_grid:
        return kernel["name"]
    grid = kernel.get("args", {}).get("grid")
    return f"{kernel['name']} grid={'x'.join(map(str, grid)) if grid else '?'}"


def summarise(kernels: list[dict], steps: int, top: int, by_grid: bool = False) -> str:
    if not kernels:
        raise SystemExit("no GPU kernels in the trace: was it recorded with ProfilerActivity.CUDA?")
    spans = [(float(k["ts"]), span_end(k)) for k in kernels]
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    by_stream: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for k, iv in zip(kernels, spans):
        by_stream[str(k.get("tid"))].append(iv)
    busy = union_length(spans)
    summed = sum(e - s for s, e in spans)
    ms = lambda us: f"{us / steps / 1e3:7.3f} ms"  # noqa: E731 - a formatter, per step
    lines = [f"per step, over {steps} steps: span {ms(span)}, GPU busy {ms(busy)}, idle {ms(span - busy)}, "
             f"kernel time {ms(summed)} (streams overlapped {ms(summed - busy)})"]
    for stream, ivs in sorted(by_stream.items(), key=lambda kv: -sum(e - s for s, e in kv[1])):
        lines.append(f"  stream {stream:>6s}: {len(ivs) // steps:5d} kernels, {ms(sum(e - s for s, e in ivs))}")
    kinds: dict[str, float] = defaultdict(float)
    names: dict[str, list[float]] = defaultdict(list)
    for k in kernels:
        kinds[kind_of(k["name"])] += float(k["dur"])
        names[label(k, by_grid)].append(float(k["dur"]))
    lines.append("kernel time by kind:")
    lines += [f"  {kind:18s} {ms(t)} {100 * t / summed:5.1f}%" for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append(f"top {top} kernels (per step: time, calls, mean µs):")
    ranked = sorted(names.items(), key=lambda kv: -sum(kv[1]))[:top]
    lines += [f"  {ms(sum(d))} {len(d) // steps:4d} {sum(d) / len(d):8.1f}  {name[:130]}" for name, d in ranked]
    return "\n".join(lines)


def timeline(kernels: list[dict], steps: int, bucket_us: float, name_width: int = 36) -> str:
    """The first step cut into ``bucket_us`` slices: per slice and CUDA stream, the kernel time
    inside it and the kernel that took most of it. Shows when each stream starts, where one
    waits on the other and what runs alone at the end (e.g. the optimizer)."""
    t0 = min(float(k["ts"]) for k in kernels)
    end = t0 + (max(span_end(k) for k in kernels) - t0) / steps
    by_stream: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for k in kernels:
        if float(k["ts"]) < end:
            by_stream[str(k.get("tid"))].append((float(k["ts"]), span_end(k), k["name"]))
    streams = sorted(by_stream)
    head = " | ".join(f"stream {s} (first kernel at {min(iv[0] for iv in by_stream[s]) - t0:.0f} µs)"
                      .ljust(name_width + 8) for s in streams)
    lines = [f"timeline of the first step, {bucket_us:g} µs slices (per stream: kernel µs, top kernel):",
             f"  start µs | {head}"]
    lo = t0
    while lo < end:
        hi = min(lo + bucket_us, end)  # the next step's kernels stay out of the last slice
        cells = []
        for s in streams:
            time_by_name: dict[str, float] = defaultdict(float)
            for start, stop, name in by_stream[s]:
                if min(stop, hi) > max(start, lo):
                    time_by_name[name] += min(stop, hi) - max(start, lo)
            top = max(time_by_name, key=time_by_name.get, default="")
            cells.append(f"{sum(time_by_name.values()):6.0f} {top[:name_width]:{name_width}s}")
        lines.append(f"  {lo - t0:8.0f} | " + " | ".join(cells))
        lo += bucket_us
    return "\n".join(lines)


def replays(kernels: list[dict], steps: int) -> list[list[dict]]:
    """The kernels of each of the ``steps`` CUDA-graph replays, in time order. A replay's kernels
    share the correlation id of its graph launch; the copies into the captured batch before it
    have their own ids and are left out."""
    groups: dict[object, list[dict]] = defaultdict(list)
    for k in kernels:
        groups[k.get("args", {}).get("correlation")].append(k)
    groups.pop(None, None)
    largest = sorted(groups.values(), key=len, reverse=True)[:steps]
    if len(largest) < steps or len(largest[-1]) < 2:
        raise SystemExit(f"--per-step: fewer than {steps} graph replays in the trace (was the step captured?)")
    return sorted(largest, key=lambda g: min(float(k["ts"]) for k in g))


def per_step(kernels: list[dict], steps: int) -> str:
    """Per replay: the idle gap since the previous replay's last kernel, then per CUDA stream its
    first kernel's start, its last kernel's end and its busy time, all in µs from the replay's
    first kernel. Unlike the first step's timeline, later steps start on a GPU that was busy:
    a stream that starts late there waits inside the graph, not for the host."""
    lines = ["per step (one CUDA-graph replay each; µs from its first kernel): gap before | "
             "per stream: first..last (busy) | end"]
    previous_end = None
    for i, group in enumerate(replays(kernels, steps)):
        t0, end = min(float(k["ts"]) for k in group), max(span_end(k) for k in group)
        by_stream: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for k in group:
            by_stream[str(k.get("tid"))].append((float(k["ts"]), span_end(k)))
        cells = [f"stream {s} {min(a for a, _ in ivs) - t0:6.0f}..{max(b for _, b in ivs) - t0:6.0f} "
                 f"({union_length(ivs):6.0f})" for s, ivs in sorted(by_stream.items())]
        gap = "" if previous_end is None else f"{t0 - previous_end:6.0f}"
        lines.append(f"  {i + 1:3d} | {gap:>6s} | " + " | ".join(cells) + f" | {end - t0:6.0f}")
        previous_end = end
    return "\n".join(lines)


HOST_SPANS = ("cpu_op", "python_function", "user_annotation")


class HostNesting:
    """The CPU-side spans (ops, Python frames, annotations) of each thread, nested by time."""

    def __init__(self, events: list[dict]) -> None:
        by_thread: dict[tuple, list[dict]] = defaultdict(list)
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in HOST_SPANS:
                by_thread[(e.get("pid"), e.get("tid"))].append(e)
        self.threads = {}
        for thread, spans in by_thread.items():
            spans.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
            self.threads[thread] = ([float(e["ts"]) for e in spans], spans, self._parents(spans))

    @staticmethod
    def _parents(spans: list[dict]) -> list[int]:
        """Index of each span's innermost enclosing span (-1 for none); spans sorted by start."""
        parents, open_ = [], []
        for i, e in enumerate(spans):
            while open_ and span_end(spans[open_[-1]]) < span_end(e):
                open_.pop()
            parents.append(open_[-1] if open_ else -1)
            open_.append(i)
        return parents

    def around(self, event: dict) -> list[str]:
        """Names of the spans on ``event``'s thread that contain it, outermost first."""
        starts, spans, parents = self.threads.get((event.get("pid"), event.get("tid")), ([], [], []))
        end = span_end(event)
        # The span starting last before the event; one that ends too early has no descendant
        # holding the event either, so its parent is the next candidate.
        i = bisect.bisect_right(starts, float(event["ts"])) - 1
        while i >= 0 and span_end(spans[i]) < end:
            i = parents[i]
        chain = []
        while i >= 0:
            chain.append(spans[i]["name"])
            i = parents[i]
        return chain[::-1]


def origins(events: list[dict], kernels: list[dict], pattern: re.Pattern, steps: int, depth: int, top: int) -> str:
    """Kernel time of the ``kernels`` matching ``pattern``, by the innermost ``depth`` host spans
    around their launch in ``events`` (joined outermost first)."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    nesting = HostNesting(events)
    by_origin: dict[str, list[float]] = defaultdict(list)
    for k in kernels:
        if not pattern.search(k["name"]):
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is None:
            origin = "(its launch is not in the trace)"
        else:
            origin = " > ".join(nesting.around(launch)[-depth:]) or f"({launch['name']} outside any op)"
        by_origin[origin].append(float(k["dur"]))
    if not by_origin:
        return f"no kernel matches {pattern.pattern!r}"
    lines = [f"kernels matching {pattern.pattern!r} by where they were launched (per step: time, calls; spans outermost first):"]
    for chain, durs in sorted(by_origin.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(durs) / steps / 1e3:7.3f} ms {len(durs) // steps:4d}  {chain}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="chrome trace (.json or .json.gz) from torch.profiler")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--timeline", type=float, default=0, metavar="US",
                   help="also print the first step in slices of US microseconds, per stream")
    p.add_argument("--origins", default="", metavar="REGEX",
                   help="also print where the kernels whose name matches REGEX were launched from")
    p.add_argument("--depth", type=int, default=4, help="with --origins: host spans shown per launch, innermost")
    p.add_argument("--by-grid", action="store_true", help="rank kernels by name and grid, not by name alone")
    p.add_argument("--per-step", action="store_true",
                   help="also print, per captured step, when each stream starts and ends")
    args = p.parse_args(argv)
    try:
        pattern = re.compile(args.origins) if args.origins else None
    except re.error as e:
        p.error(f"--origins {args.origins!r}: {e}")
    events = load_events(args.trace)
    kernels = gpu_kernels(events)
    steps = max(args.steps, 1)
    print(summarise(kernels, steps, args.top, args.by_grid))
    if args.timeline > 0:
        print(timeline(kernels, steps, args.timeline))
    if args.per_step:
        print(per_step(kernels, steps))
    if pattern is not None:
        print(origins(events, kernels, pattern, steps, max(args.depth, 1), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
