"""A step's optimizer update run beside the next step's forward, in stages.

FlatAdamW's update moves 28 bytes per parameter: 1.05 ms of the 11.2 ms BERT step on an H200,
alone at the end of every step (benchmarks/RESULTS.md, session 17), because the next forward reads
the weights it writes and the global-norm clip needs every gradient first. Updating each tower
before that tower's next forward did not pay (sessions 12, 15, 18): a tower then waited for its
whole update. Here:

- the step ends with each tower's gradients copied into flat buffers and summed, on the tower's
  own stream, and the clip scale taken (``finish``);
- the next step starts the update on one stream per tower (``start``), in stages, in the order the
  forward first reads the parameters, and records an event after each stage;
- the forward waits for a stage's event just before it first reads that stage's parameters: a
  forward pre-hook of the module where the stage begins (``wait``).

Each parameter sees the same gradient, clip scale and step count as when updated at the end of
its step, so the losses are the same. The stages come from one eager probe forward
(``plan_stages``): the order in which modules are first called and parameters first read (by
name, through ``nn.Module.__getattr__``). A parameter belongs to the last wait point before its
first read, so nothing reads a weight before its stage is done; one never read by name falls into
the tower's first stage. torch.compile does not trace the wait: a compiled tower breaks its graph
there, so the kernels after the point are launched after the wait.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import count

import torch
from torch import nn

from .flat_adamw import FlatAdamW


@dataclass
class Stage:
    """Parameters of one tower updated together; ``module``'s forward pre-hook waits for them."""

    tower: int
    module: nn.Module
    params: list[nn.Parameter]


def plan_stages(towers: list[nn.Module], probe: Callable[[], object], parts: int = 8) -> list[Stage]:
    """About ``parts`` stages per tower, in the order ``probe()`` (a forward through the towers)
    reads their parameters. A stage begins at a module holding at least half a stage's share of
    its tower's parameters, once the parameters read since the last stage began reach that share."""
    called, read = _record(towers, probe)
    stages = []
    for t, tower in enumerate(towers):
        params = list(tower.parameters())
        share = sum(p.numel() for p in params) / parts
        points = _wait_points(tower, called, read, share)
        members: list[list[nn.Parameter]] = [[] for _ in points]
        times = [called[m] for m in points]
        for p in params:
            when = read.get(p, -1)
            members[max(sum(1 for t0 in times if t0 < when) - 1, 0)].append(p)
        stages += [Stage(t, m, ps) for m, ps in zip(points, members) if ps]
    return stages


def _record(towers: list[nn.Module], probe: Callable[[], object]) -> tuple[dict, dict]:
    """(module -> time of its first call, parameter -> time of its first read by name) in ``probe()``."""
    clock, called, read = count(), {}, {}
    inside = {m for tower in towers for m in tower.modules()}
    getattr_ = nn.Module.__getattr__

    def reading(module: nn.Module, name: str):
        value = getattr_(module, name)
        if isinstance(value, nn.Parameter) and value not in read:
            read[value] = next(clock)
        return value

    def calling(module: nn.Module, _args) -> None:
        if module in inside and module not in called:
            called[module] = next(clock)

    handle = nn.modules.module.register_module_forward_pre_hook(calling)
    nn.Module.__getattr__ = reading
    try:
        with torch.no_grad():
            probe()
    finally:
        nn.Module.__getattr__ = getattr_
        handle.remove()
    missing = [i for i, tower in enumerate(towers) if tower not in called]
    if missing:
        raise ValueError(f"plan_stages: the probe did not call tower(s) {missing}")
    return called, read


def _wait_points(tower: nn.Module, called: dict, read: dict, share: float) -> list[nn.Module]:
    """The modules where the tower's stages begin: the tower itself, then greedily as
    ``plan_stages`` says."""
    sizes = {m: sum(p.numel() for p in m.parameters()) for m in tower.modules()}
    candidates = sorted((called[m], m) for m in tower.modules() if m in called and sizes[m] >= share / 2)
    own = {id(p) for p in tower.parameters()}
    reads = sorted((when, p.numel()) for p, when in read.items() if id(p) in own)
    points, last = [tower], called[tower]
    for when, module in candidates:
        if module is not tower and sum(n for t, n in reads if last < t < when) >= share:
            points.append(module)
            last = when
    return points


class UpdatePipeline:
    """Runs ``opt``'s update in ``stages`` beside the next step's forward (see the module's doc).

    ``opt``'s param groups must each hold one tower's parameters, in stage order
    (``order_groups``). A step calls ``start`` before the towers' forward, ``join`` after it, and
    ``finish`` after the backward; ``flush`` applies a pending update at once (before a checkpoint
    or an evaluation). ``priority``: the update streams' (0, the default, is the lowest; see
    model/streams.py). Off CUDA the stages run at ``start``, one after the other. ``spin``: GPU
    clock cycles each stage idles first; a test sets it to check that no result changes when the
    update runs late, as it would if the forward read a weight before its stage's event."""

    spin = 0

    def __init__(self, opt: FlatAdamW, stages: list[Stage], device: torch.device, priority: int = 0) -> None:
        self.opt, self.stages, self.device = opt, stages, device
        where = {p: (i, k) for i, f in enumerate(opt.flats) for k, p in enumerate(f.params)}
        self.ranges = [self._ranges(s, where) for s in stages]
        self.towers = sorted({s.tower for s in stages})
        self.groups = {t: sorted({where[p][0] for s in stages if s.tower == t for p in s.params}) for t in self.towers}
        if sum(map(len, self.groups.values())) != len({g for gs in self.groups.values() for g in gs}):
            raise ValueError("UpdatePipeline: each param group must hold one tower's parameters (order_groups)")
        self.pending = False
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event() for _ in stages] if self.cuda else []
        self.streams = {t: torch.cuda.Stream(device, priority=priority) for t in self.towers} if self.cuda else {}
        self.waiting = [False] * len(stages)
        self.handles = [s.module.register_forward_pre_hook(self._hook(i)) for i, s in enumerate(stages)]

    def _ranges(self, stage: Stage, where: dict) -> list[tuple[int, int, int]]:
        """(group, first element, end) of each group's share of ``stage``, which must lie together."""
        spans: dict[int, list[tuple[int, int]]] = {}
        for p in stage.params:
            i, k = where[p]
            lo = sum(q.numel() for q in self.opt.flats[i].params[:k])
            spans.setdefault(i, []).append((lo, lo + p.numel()))
        out = []
        for i, parts in sorted(spans.items()):
            parts.sort()
            if any(a[1] != b[0] for a, b in zip(parts, parts[1:])):
                raise ValueError("UpdatePipeline: a stage's parameters must lie together in each param group "
                                 "(build the optimizer from order_groups' groups)")
            out.append((i, parts[0][0], parts[-1][1]))
        return out

    def _hook(self, index: int):
        @torch._dynamo.disable
        def wait(_module, _args) -> None:
            if self.waiting[index]:
                self.waiting[index] = False
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_event(self.events[index])

        return wait

    def start(self) -> None:
        """The pending update, stage by stage: on CUDA queued on the update streams, each stage's
        event recorded for the forward's waits."""
        if not self.pending:
            return
        self.pending = False
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for t in self.towers:
            stream = self.streams.get(t)
            if stream is not None:
                stream.wait_stream(current)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for index, stage in enumerate(self.stages):
                    if stage.tower != t:
                        continue
                    if self.spin and self.cuda:
                        torch.cuda._sleep(self.spin)
                    for group, lo, hi in self.ranges[index]:
                        self.opt.apply_range(group, lo, hi)
                    if self.cuda:
                        self.events[index].record()
                        self.waiting[index] = True

    def join(self) -> None:
        """After the forward: the current stream waits for every update stream (the backward's
        gradients reuse nothing the update reads, but ``finish`` rewrites the flat gradients)."""
        self.waiting = [False] * len(self.stages)
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for stream in self.streams.values():
            current.wait_stream(stream)

    def finish(self, tower_streams: dict[int, torch.cuda.Stream | None], finite: torch.Tensor | None = None) -> None:
        """After the backward: each tower's gradients gathered on ``tower_streams[tower]`` (None:
        the current stream), then the clip scale on the current stream; the update is pending."""
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for t in self.towers:
            stream = tower_streams.get(t) if self.cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                self.opt.gather(self.groups[t])
            if stream is not None:
                current.wait_stream(stream)
        self.opt.conclude(finite)
        self.pending = True

    def flush(self) -> None:
        """Apply a pending update now, on the current stream."""
        if self.pending:
            streams, self.streams = self.streams, {}
            try:
                self.start()
            finally:
                self.streams = streams
            self.waiting = [False] * len(self.stages)


def order_groups(groups: list[dict], stages: list[Stage]) -> list[dict]:
    """``groups`` (param groups) split by tower and each one's parameters put in stage order, as
    ``UpdatePipeline`` needs them; empty groups are left out."""
    rank = {p: (s.tower, i) for i, s in enumerate(stages) for p in s.params}
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        missing = [p for p in params if p not in rank]
        if missing:
            raise ValueError(f"order_groups: {len(missing)} parameter(s) belong to no stage (outside the towers)")
        for tower in sorted({rank[p][0] for p in params}):
            own = sorted((p for p in params if rank[p][0] == tower), key=lambda p: rank[p][1])
            out.append({**g, "params": own})
    return out

