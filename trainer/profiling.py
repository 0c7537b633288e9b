"""``train.profile_steps``: the PyTorch profiler over a few steps of the first epoch, rank 0 only.

The loop marks its phases with ``phase(name)`` (a ``record_function`` range, about a
microsecond when no profiler runs), so the tables show where a step's host time goes (waiting
for data, forward, the loss check, backward, optimizer) next to the top operators by GPU and
CPU time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # skip start-up effects: allocator growth, cuDNN autotuning, loader start


def phase(name: str) -> record_function:
    return record_function(f"rgfusion/{name}")


class StepProfiler:
    """Call ``step()`` once per training step; writes ``trace.json`` and ``ops.txt`` into ``out``."""

    def __init__(self, steps: int, out: Path, *, active: bool):
        self.out = out
        self.prof = None
        if steps and active:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, schedule=schedule(wait=WARMUP_STEPS, warmup=1, active=steps, repeat=1),
                                on_trace_ready=self._save)
            self.prof.start()

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _save(self, prof: profile) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / "trace.json"))
        avg = prof.key_averages()
        tables = [f"== phases of the loop ==\n{_phases(avg)}"]
        if torch.cuda.is_available():
            tables.append("== top operators by GPU time ==\n" + avg.table(sort_by="self_device_time_total", row_limit=30))
        tables.append("== top operators by CPU time ==\n" + avg.table(sort_by="self_cpu_time_total", row_limit=30))
        (self.out / "ops.txt").write_text("\n\n".join(tables))
        log.info("profile written to %s", self.out)


def _phases(avg: object) -> str:
    # Host-side ranges only: each range also has a zero-time device-side twin in the averages.
    rows = [e for e in avg if e.key.startswith("rgfusion/") and e.device_type == DeviceType.CPU]
    total = sum(e.cpu_time_total for e in rows) or 1.0
    return "\n".join(f"{e.key:28s} calls {e.count:5d}  host ms/call {e.cpu_time_total / max(e.count, 1) / 1e3:8.2f}"
                     f"  share {100 * e.cpu_time_total / total:5.1f}%" for e in sorted(rows, key=lambda e: e.key))
