"""A plain-PyTorch engine for runs without ZeRO (``train.engine: native``).

DeepSpeed's engine does host work every step: per-parameter gradient hooks, and an overflow
check and gradient norm computed tensor by tensor in Python, ending in a host sync. On one H100
its ZeRO-2 step took 93 ms of host time against 21 ms of GPU work (benchmarks/RESULTS.md). A
ZeRO-0 step needs none of that. In bf16 this engine keeps the model's weights in bf16 and fp32
master copies for AdamW, as DeepSpeed does. FlatAdamW (trainer/flat_adamw.py) holds weights
and masters in flat per-group buffers and clips and steps them on the device, skipping the
update itself when the norm is not finite. Across ranks, DDP all-reduces gradients in buckets
during backward. Every rank holds the full state, so a checkpoint is one file that any world size
can resume.

It offers the part of DeepSpeed's engine interface that the loop, checkpoints and export use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgfusion.trainer.config import RunConfig
from rgfusion.trainer.flat_adamw import FlatAdamW

STATE_FILE = "native_states.pt"


class NativeEngine:
    """Model (DDP-wrapped across ranks), AdamW over fp32 weights, schedule and step counters."""

    def __init__(self, module: nn.Module, cfg: RunConfig, groups: list[dict], *, device: str, precision: str,
                 rank: int, world_size: int, schedule: Callable[[torch.optim.Optimizer], Any]) -> None:
        self.module, self.rank = module, rank
        self.params = [p for g in groups for p in g["params"]]
        o = cfg.optim
        # Before DDP, which buckets the parameters by their dtype: the optimizer moves them into its
        # flat buffers, in bf16 casting them (DeepSpeed's bf16 mode: no per-use casts as under
        # autocast, and inductor compiles the BiGRU, which it fails to do under autocast).
        self.optimizer = FlatAdamW(groups, precision=precision, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay, max_norm=o.grad_clip if o.grad_clip > 0 else math.inf,
                                   master=o.master, moments=o.moments)
        if precision == "bf16":
            module.to(torch.bfloat16)  # what the optimizer does not hold: buffers, frozen parameters
        self.wrapped: nn.Module = module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            index = torch.device(device).index
            self.wrapped = DistributedDataParallel(module, device_ids=None if index is None else [index])
        self.lr_scheduler = schedule(self.optimizer)
        self.accum = cfg.train.grad_accum
        self.global_steps = 0
        self.micro_steps = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            # Accumulating micro-steps skip the all-reduce; the boundary one reduces the sum.
            self.wrapped.require_backward_grad_sync = (self.micro_steps + 1) % self.accum == 0
        return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    @torch.no_grad()
    def step(self) -> None:
        """Count a micro-step; at an accumulation boundary, clip and update. An update skipped for
        a non-finite norm still counts as a step, as the loop's loss check has already skipped
        the non-finite losses themselves."""
        if (self.micro_steps + 1) % self.accum:
            self.micro_steps += 1
            return
        # Micro-steps have added up in the gradients, whose sum DDP all-reduced at the boundary.
        self.optimizer.step()
        self.count_update()

    def count_update(self) -> None:
        """Count an update the optimizer has made: the schedule and the step counters move on.
        A captured step (trainer/graphs.py) updates on the device and calls only this."""
        self.micro_steps += 1
        self.lr_scheduler.step()
        self.global_steps += 1

    def get_global_grad_norm(self) -> float | None:
        norm = self.optimizer.norm
        return None if norm is None else float(norm)

    def zero_optimization_stage(self) -> int:
        return 0

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """Rank 0 writes the one state file (every rank holds the same state). ``save_latest`` is
        in DeepSpeed's signature only: Checkpoints publishes its own pointer."""
        if self.rank != 0:
            return
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save({"module": self.full_state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                    "micro_steps": self.micro_steps}, tmp)
        tmp.replace(folder / STATE_FILE)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state with the fp32 masters in place of the bf16 weights."""
        state = self.module.state_dict()
        state.update({name: m.detach() for name, m in zip(self._param_names(), self.optimizer.masters())})
        return state

    def _param_names(self) -> list[str]:
        """State-dict names of ``self.params`` (and so of the optimizer's masters), in their order."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for p in self.params]

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[str | None, dict]:
        from rgfusion.trainer.checkpoint import safe_load

        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            return None, {}
        state = safe_load(path)
        # Both copy in place, into the flat buffers: the module's weights (in bf16, the masters
        # rounded), then the masters (split ones round the weights again, their own way).
        self.module.load_state_dict(state["module"])
        self.optimizer.load_masters([state["module"][name] for name in self._param_names()])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.micro_steps = int(state["global_steps"]), int(state["micro_steps"])
        return str(path), {}
