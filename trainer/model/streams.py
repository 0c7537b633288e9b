"""Independent branches of the model side by side on CUDA streams.

The caption tower does not depend on the image tower until the loss, and the BiGRU's two
directions do not depend on each other. On one stream their kernels queue one after the other,
and many of them (the GRU's time steps, BERT's 2,560-token matrix products) fill only part of
the GPU. On two streams the GPU runs them at the same time. Autograd runs each backward op on
the stream of its forward op, so the backward passes overlap too, and a CUDA graph captured
around the step keeps the two branches as parallel paths.

Side streams have high priority. The branch put there is the caption tower: BERT's chain of
hundreds of small kernels, latency-bound, while the image tower's large matrix products can
fill any SM the chain leaves free. At normal priority the chain's kernels queued behind the image
tower's blocks and it ended 1.8 ms after the image tower (an H100 trace, benchmarks/RESULTS.md,
session 5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

A = TypeVar("A")

_SIDE: dict[tuple[int, int, int], torch.cuda.Stream] = {}


def side_stream(device: torch.device, slot: int, priority: int = -1) -> torch.cuda.Stream:
    """One long-lived side stream per (device, slot, priority): new streams per call would defeat
    the caching allocator's per-stream pools and a captured graph's fixed stream set. Lower
    numbers run first: 0 is a new stream's (the lowest), and torch keeps four levels, 0 to -3,
    clamped into the device's range."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, slot, priority)
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=index, priority=priority)
    return _SIDE[key]


def beside(main: Callable[[], A], side: Callable[[], Tensor], device: torch.device, *, enabled: bool,
           slot: int = 0, priority: int = -1, side_first: bool = True) -> tuple[A, Tensor]:
    """``(main(), side())`` with ``side`` on a side stream of ``device`` when ``enabled`` on CUDA.

    ``side`` is launched first unless ``side_first`` is false: on a step bound by the host, its
    kernels then start while the host is still launching ``main``'s. Nested calls need distinct
    slots. Inside torch.compile both run on the current stream (dynamo would have to trace the
    stream switches).
    """
    if not enabled or device.type != "cuda" or torch.compiler.is_compiling():
        return main(), side()
    current = torch.cuda.current_stream(device)
    stream = side_stream(device, slot, priority)
    stream.wait_stream(current)
    if not side_first:
        result = main()
    with torch.cuda.stream(stream):
        out = side()
    if side_first:
        result = main()
    current.wait_stream(stream)
    # Allocated on the side stream, used and freed on this one: the allocator must not hand
    # the block to the side stream again before this stream is done with it.
    out.record_stream(current)
    return result, out
