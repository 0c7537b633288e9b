"""The whole training step as one CUDA graph (``train.cuda_graph``).

A compiled step of the full model still launches about 1,400 kernels from Python. On one H100
the trainer's BiGRU recipe ran at 3,300-4,700 pairs/s, bound by those launches, while the model
step captured as one graph (benchmarks/gpu_bench.py) ran at 12,800 (benchmarks/RESULTS.md).
Here the forward, loss, backward and the optimizer's update are recorded once per batch shape
and then replayed, one launch per step.

- Shapes. The reader pads regions to the recipe's maximum, so only the caption length varies;
  captions are padded to a multiple of 8 word slots (masked: the embeddings do not change),
  so a few graphs serve every batch. A new shape first runs ``warmup`` ordinary steps on a
  side stream (compilation, cuBLAS workspaces, the optimizer's first call), then is captured.
- State that changes between steps is read from device tensors filled before each replay: the
  learning rates (``FlatAdamW.load_lrs``) and the loss's hardest-negative weight. A non-finite
  loss or gradient norm skips the update on the device, as the eager loop skips the step.
- No host sync per step. The eager loop reads each loss back to decide whether to update; here
  the device decides, and counts non-finite steps (in all, and the longest run in a row) for
  the loop to read at its log lines and checkpoints (``take_bad``). The host launches step t+1
  once step t-1 has finished, so the GPU always has a step queued while the host prepares the
  next. Unlike the eager loop, a skipped step still counts as a step of the schedule.
- Memory. All graphs share one pool: nothing a replay leaves behind is read by a later one
  (gradients are consumed by the update inside the graph; loss and stats are copied out).
- Capture is thread-local: other threads (the loader's pinning) may use CUDA meanwhile.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from rgfusion.datasets import Batch
from rgfusion.trainer.loss import LossConfig, hard_weight

WORDS_MULTIPLE = 8
AHEAD = 2  # steps queued on the GPU at most: the one running and the one just launched


@dataclass
class Captured:
    """One recorded step and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    batch: Batch
    ids: Tensor
    loss: Tensor
    stats: dict[str, Tensor]
    norm: Tensor | None


class CapturedSteps:
    """``steps(batch, ids, global_step) -> (loss, stats)``: one training step, update included.

    ``module`` is the trainer's model-and-loss module, ``optimizer`` the native engine's
    FlatAdamW over its parameters. One process, no gradient accumulation (the loop checks)."""

    def __init__(self, module: nn.Module, optimizer: Any, loss_cfg: LossConfig, device: str, warmup: int = 2):
        self.module, self.optimizer, self.loss_cfg, self.warmup = module, optimizer, loss_cfg, warmup
        self.weight = torch.zeros((), device=device)
        # Non-finite steps: in all, in a row now, and the longest row since the last take_bad.
        self.bad = torch.zeros(3, dtype=torch.int64, device=device)
        self.launched: deque[torch.cuda.Event] = deque()
        self.graphs: dict[tuple, Captured] = {}
        self.eager_runs: Counter[tuple] = Counter()
        self.pool: Any = None
        self.side = torch.cuda.Stream(torch.device(device))

    def __call__(self, batch: Batch, ids: Tensor, global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = pad_words(batch, WORDS_MULTIPLE)
        self.weight.fill_(hard_weight(self.loss_cfg, global_step))
        self.optimizer.load_lrs()
        key = shape_key(batch)
        captured = self.graphs.get(key)
        if captured is None:
            if self.eager_runs[key] < self.warmup:
                self.eager_runs[key] += 1
                return self._on_side_stream(batch, ids)
            captured = self.graphs[key] = self._capture(batch, ids)
        while len(self.launched) >= AHEAD:
            self.launched.popleft().synchronize()
        copy_into(captured.batch, batch)
        captured.ids.copy_(ids)
        captured.graph.replay()
        self.launched.append(torch.cuda.Event())
        self.launched[-1].record()
        self.optimizer.norm = captured.norm
        # Copies: the next replay of this graph overwrites its outputs.
        return captured.loss.clone(), {k: v.clone() for k, v in captured.stats.items()}

    def take_bad(self) -> tuple[int, int]:
        """(non-finite steps, the longest run of them in a row) since the last call: one sync."""
        return take_bad(self.bad)

    def _step(self, batch: Batch, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = self.module(batch, ids, step=0, gather=None, weight=self.weight)
        loss.backward()
        finite = loss.detach().isfinite()
        self.optimizer.update(finite=finite)
        count_bad(self.bad, ~finite)
        return loss.detach(), {k: v.detach() for k, v in stats.items()}

    def _on_side_stream(self, batch: Batch, ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # Capture wants its warm-up off the default stream (lazy initialisations go there).
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = self._step(batch, ids)
        main.wait_stream(self.side)
        return out

    def _capture(self, batch: Batch, ids: Tensor) -> Captured:
        static = batch.clone()
        static_ids = ids.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread allocates pinned memory meanwhile, which
        # the default mode counts against the capture (a run on an H100 died of it).
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss, stats = self._step(static, static_ids)
        if self.pool is None:
            self.pool = graph.pool()
        return Captured(graph, static, static_ids, loss, stats, self.optimizer.norm)


def count_bad(counters: Tensor, bad: Tensor) -> None:
    """Add one step to ``counters`` (int64: non-finite steps, the current run of them, the
    longest run), on the device: ``bad`` is a 0-d bool tensor, never read by the host."""
    total, run, longest = counters.unbind()
    total.add_(bad)
    run.add_(1).mul_(bad)
    longest.copy_(torch.maximum(longest, run))


def take_bad(counters: Tensor) -> tuple[int, int]:
    """(non-finite steps, longest run) counted since the last take; a run still going on
    carries over into the next take's longest."""
    total, _, longest = counters.tolist()
    counters[0] = 0
    counters[2] = counters[1]
    return total, longest


def pad_words(batch: Batch, multiple: int) -> Batch:
    """``batch`` with its captions padded by masked word slots to a multiple of ``multiple``."""
    extra = -batch.tokens.shape[1] % multiple
    if not extra:
        return batch
    tokens = torch.cat([batch.tokens, batch.tokens.new_zeros(batch.tokens.shape[0], extra)], dim=1)
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_zeros(batch.tokens.shape[0], extra)], dim=1)
    return replace(batch, tokens=tokens, attention_mask=mask)


def shape_key(batch: Batch) -> tuple:
    """What a recorded graph is specific to: every tensor's shape and dtype."""
    return tuple((name, tuple(v.shape), v.dtype) for name, v in batch.tensors().items())


def copy_into(static: Batch, batch: Batch) -> None:
    targets = static.tensors()
    for name, value in batch.tensors().items():
        targets[name].copy_(value, non_blocking=True)
