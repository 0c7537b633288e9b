"""Batches handed to the step already on the device, the next one copied while this one trains.

The loader pins batches (``pin_memory``); here each pinned batch is copied on a side CUDA
stream once the step before it has been launched (``prefetch``), so the host-to-device copy
of 45 MB of full-size features overlaps the step instead of sitting in it. A batch in a
loader worker's reused memory (``data.reuse_batch_memory``, pinned in place) goes back to
its worker once its copy has completed. On CPU it is a plain pass-through with the dtype
cast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from rgfusion.datasets.reader import LeasesInFlight
from rgfusion.trainer.loss import ids_to_tensor
from rgfusion.trainer.profiling import phase


class DeviceFeed:
    """Iterator of ``(batch, ids)`` on ``device``.

    ``edge_seconds``: the waits for the first batch (loader processes starting and reading) and
    for the end of the stream (workers shutting down): once per epoch, not per step.
    ``wait_seconds``: the time blocked on the loader in between, the copies' enqueueing
    excluded: the data wait of the steps. On a GPU a wait counts only if the GPU had run out of
    queued work by the time the batch came: waits the GPU hid are not stalls, and a counted one
    is an upper bound of the GPU's idle time."""

    def __init__(self, batches: Iterator[Any], device: str, dtype: torch.dtype):
        self.src, self.device, self.dtype = batches, device, dtype
        self.stream = torch.cuda.Stream(torch.device(device)) if device.startswith("cuda") else None
        self.wait_seconds = self.edge_seconds = 0.0
        self.leases = LeasesInFlight()
        self.done = False
        self.pending = self._load(edge=True)

    def __iter__(self) -> "DeviceFeed":
        return self

    def __next__(self) -> tuple[Any, torch.Tensor]:
        self.prefetch()
        item, self.pending = self.pending, None
        if item is None:
            raise StopIteration
        if self.stream is not None:
            main = torch.cuda.current_stream()
            main.wait_stream(self.stream)
            # Memory allocated on the side stream must not be reused before the main stream is done.
            for t in [*item[0].tensors().values(), item[1]]:
                t.record_stream(main)
        return item

    def prefetch(self) -> None:
        """Take the next batch from the loader and start its copy. The loop calls this once it
        has launched the step: the host work (unpickling, pinning, enqueueing the copies) then
        runs while the GPU computes, not in the gap before the launch. ``next`` calls it if
        the loop did not."""
        if self.pending is None and not self.done:
            launched = None
            if self.stream is not None:
                launched = torch.cuda.Event()
                launched.record()
            self.pending = self._load(launched=launched)
            self.done = self.pending is None

    def _load(self, edge: bool = False, launched: Any = None) -> tuple[Any, torch.Tensor] | None:
        self.leases.poll()
        t0 = time.perf_counter()
        with phase("data_wait"):
            batch = next(self.src, None)
        waited = time.perf_counter() - t0
        if edge or batch is None:
            self.edge_seconds += waited
        elif launched is None or launched.query():
            self.wait_seconds += waited
        if batch is None:
            self.leases.poll(keep=0)
            return None
        return self._to_device(batch)

    def _to_device(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if self.stream is None and batch.lease is not None:  # on CPU .to() would not copy
            batch = batch.copy_out(torch.clone)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            moved = batch.to(self.device, self.dtype)
            if batch.lease is not None:
                event = torch.cuda.Event()
                event.record()
                self.leases.add(batch.lease, event)
                moved.lease = None
            return moved, ids_to_tensor(batch.image_ids, self.device)
