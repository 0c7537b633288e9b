"""Streaming reader: manifest -> WebDataset pipelines -> padded ``Batch`` tensors.

Training (``train_loader``): every (rank, worker) draws shards at random, weighted by their
sample counts from the manifest (so every image is equally likely whatever the shard sizes),
decodes, shuffles through a buffer and batches. The buffer starts yielding once it holds one
batch (it keeps filling to ``shuffle_buffer`` as it goes), so an epoch's first batch costs one
batch of reading, not a full buffer: at 2,000 full-size samples per worker that wait was
seconds per epoch on the GPU machine. Each worker yields its own share of the
requested steps, counted here rather than through ``with_epoch`` (which counts per worker and
would give ranks different totals): every rank yields exactly ``steps - start_step`` batches.

Evaluation (``eval_loader``): the split's shards are dealt to the ``world_size * num_workers``
(rank, worker) slots, greedily by sample count; each slot reads its shards once in order, so
every image appears exactly once overall. Slots without shards yield nothing.

Shards open through fsspec (``fs.open(..., block_size=...)``), never ``pipe:``. Members are
read with ``np.load(allow_pickle=False)``. A bad shard or sample (truncated tar, invalid npy or
json, missing member, wrong shape) is skipped, counted in ``skip_stats()`` by reason and
reported by a rate-limited warning; transient storage errors reopen the shard with backoff
and resume after the samples already yielded.

Memory per worker process is bounded by the shuffle buffer (``shuffle_buffer``, or a quarter of
the worker's pass if that is smaller: ``shuffle_window``), not the dataset:
    resident ~= fixed overhead (interpreter + torch, ~0.3 GB)
                + (shuffle_buffer + (prefetch_factor + 1) * batch_size) * sample_bytes
                + block_size (one open shard's read-ahead, object stores only)
    sample_bytes = 2 * (R * Dr + H * W * Dg) + 16 * R + caption text
                   (x2 for the cast batch when dtype is float32)
e.g. 36x2048 regions + 7x7x2048 grids: 348 KB/sample; buffer 1000 -> ~0.35 GB per worker.
Evaluation has no shuffle buffer: (prefetch_factor + 1) * batch_size samples per worker.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from fsspec.core import strip_protocol

from rgfusion.datasets.schema import MANIFEST_NAME, Manifest, Sample, SchemaError
from rgfusion.datasets.storage import (
    DatasetNotFound, explain_missing, is_transient, join_url, open_fs, read_bytes, with_retries,
)
from rgfusion.datasets.text import TextProcessor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DataConfig:
    """Section ``data:`` of a recipe: where the shards are and how to stream them."""

    url: str = "data/synthetic"  # dataset root (folder or s3://bucket/prefix) holding manifest.json
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec kwargs, e.g. client_kwargs.endpoint_url
    # Samples per worker; bounds memory (see module docstring). At most a quarter of what the
    # worker yields in one epoch is used (reader.shuffle_window).
    shuffle_buffer: int = 1000
    num_workers: int = 2  # DataLoader worker processes per rank; 0 reads in the training process
    max_words: int = 32  # captions are truncated to this many tokens incl. <start>/<end>
    tokenizer: str | None = None  # None: dataset vocab (BiGRU); else a local HF tokenizer directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # features are float16 on disk
    # Object-store read-ahead per open shard: s3fs's 5 MB default costs a request per 5 MB;
    # 64 MB read 1.4x faster than 16 MB from the local S3 endpoint (benchmarks/RESULTS.md).
    block_size: int = 64 * 1024 * 1024
    retries: int = 4  # transient storage errors retried with backoff this many times
    prefetch_factor: int = 2  # batches each worker keeps ready
    # A CUDA trainer's workers write batches into a few shared-memory buffers, page-locked in
    # place and handed back once copied to the GPU, instead of fresh memory per batch: the
    # kernel's zero-filling page faults took as much CPU as the reading itself, and the pinning
    # thread's second copy bounds the loader (benchmarks/RESULTS.md, sessions 5 and 6).
    reuse_batch_memory: bool = True


# -- skipped input ---------------------------------------------------------------------------

class SkipStats:
    """Counts of skipped bad input by reason; warns at most once per ``interval`` seconds."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self.by_reason: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last_warn = -float("inf")
        self._unreported = 0

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, reason: str, detail: str) -> None:
        with self._lock:
            self.by_reason[reason] += 1
            self._unreported += 1
            now = time.monotonic()
            if now - self._last_warn < self.interval:
                return
            n, self._unreported, self._last_warn = self._unreported, 0, now
        log.warning("skipped bad input (%s): %s%s", reason, detail,
                    f" [+{n - 1} more since last warning]" if n > 1 else "")

    def merge(self, counts: dict[str, int]) -> None:
        """Add counts a DataLoader worker reported (it already warned)."""
        with self._lock:
            self.by_reason.update(counts)

    def reset(self) -> None:
        with self._lock:
            self.by_reason.clear()
            self._unreported = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, **self.by_reason}


_SKIP_STATS = SkipStats()


def skip_stats() -> SkipStats:
    """The process-wide counter the trainer logs (workers' counts are merged into it)."""
    return _SKIP_STATS


# -- manifest ---------------------------------------------------------------------------------

def load_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The dataset at ``url`` (its root, or the manifest.json itself); one clear error if absent."""
    root = url.rsplit("/", 1)[0] if url.endswith(".json") else url.rstrip("/")
    manifest_url = url if url.endswith(".json") else join_url(root, MANIFEST_NAME)
    try:
        text = read_bytes(manifest_url, storage_options)
    except DatasetNotFound as e:
        raise DatasetNotFound(f"no dataset manifest: {e}") from None
    except OSError as e:
        if not is_transient(e):
            raise
        raise DatasetNotFound(f"cannot read {manifest_url}: {type(e).__name__}: {e}") from None
    return Manifest.from_json(text, root=root, storage_options=storage_options)


# -- batches ----------------------------------------------------------------------------------

@dataclass
class Batch:
    """Padded image features and tokenised captions; see the contract for shapes."""

    regions: torch.Tensor  # (B, R, Dr) float; padded rows are zero
    boxes: torch.Tensor  # (B, R, 4) float32 normalised x1y1x2y2
    region_mask: torch.Tensor  # (B, R) bool, True = real region
    grids: torch.Tensor  # (B, G, Dg) float, G = H*W row-major
    grid_size: tuple[int, int]  # (H, W)
    tokens: torch.Tensor  # (C, T) long, 0-padded
    lengths: torch.Tensor  # (C,) long
    attention_mask: torch.Tensor  # (C, T) bool
    caption_image: torch.Tensor  # (C,) long, index of each caption's image in the batch
    image_ids: list[str]  # (B,)
    # (B,) eval only: each image's index in its split. The split's order is the canonical one
    # (COCO's 5 test folds are consecutive 1K slices of it), whatever order ranks read shards in.
    positions: torch.Tensor | None = None
    # Set on a batch written into a worker's reused memory: copy_out hands the memory back.
    lease: Lease | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Tensors on ``device``; the float features also cast to ``dtype`` (boxes stay float32).

        From pinned memory the copies are asynchronous; the cast then runs on the device."""
        def move(name: str, v: torch.Tensor) -> torch.Tensor:
            cast = dtype if name in ("regions", "grids") else None
            return v.to(device, dtype=cast, non_blocking=True) if cast else v.to(device, non_blocking=True)

        return self._map(move)

    def pin_memory(self) -> "Batch":
        """Page-locked copy; DataLoader(pin_memory=True) calls this in its pinning thread."""
        return self.copy_out(torch.Tensor.pin_memory)

    def copy_out(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """Each tensor copied by ``copy``; memory a worker reuses is handed back to it."""
        out = self._map(lambda _, v: copy(v))
        if self.lease is not None:
            self.lease.release()
            out.lease = None
        return out

    def clone(self) -> "Batch":
        """A copy with tensors of its own (a captured CUDA graph's static inputs)."""
        return self._map(lambda _, v: v.clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that hold tensors (``positions`` only in evaluation), by name."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "Batch":
        return replace(self, **{name: fn(name, v) for name, v in self.tensors().items()})


def collate(samples: list[Sample], manifest: Manifest, text: TextProcessor, dtype: torch.dtype,
            captions: list[list[str]], positions: list[int] | None = None,
            buffers: WorkerBuffers | None = None) -> Batch:
    """Pad to ``manifest.max_regions`` (static shapes) and tokenise ``captions[i]`` of image i.
    With ``buffers`` the features go into reused memory (see :class:`WorkerBuffers`)."""
    b, r = len(samples), manifest.max_regions
    shapes = ((b, r, manifest.region_dim), (b, manifest.grid_cells, manifest.grid_dim))
    if buffers is None:
        (regions, grids), lease = [_zeros(shape, dtype) for shape in shapes], None
    else:
        (regions, grids), lease = buffers.acquire(shapes, dtype)
    boxes = np.zeros((b, r, 4), np.float32)
    mask = np.zeros((b, r), bool)
    for i, s in enumerate(samples):
        n = s.region.shape[0]
        _cast_into(regions[i, :n], s.region)
        if lease is not None:
            regions[i, n:] = 0  # reused memory holds the last batch's regions
        _cast_into(grids[i], s.grid)
        boxes[i, :n], mask[i, :n] = s.boxes, True
    flat = [c for cs in captions for c in cs]
    tokens, lengths, attn = text(flat)
    owner = torch.from_numpy(np.repeat(np.arange(b), [len(cs) for cs in captions]))
    return Batch(regions, torch.from_numpy(boxes), torch.from_numpy(mask), grids, tuple(manifest.grid_size),
                 tokens, lengths, attn, owner, [s.image_id for s in samples],
                 None if positions is None else torch.tensor(positions, dtype=torch.long), lease)


@dataclass
class Lease:
    """One of a worker's buffers, in use until the consumer's copy releases it."""

    flags: torch.Tensor  # shared (workers, slots) int32: 1 = in use
    worker: int
    slot: int

    def release(self) -> None:
        self.flags[self.worker, self.slot] = 0


class WorkerBuffers:
    """A loader worker's reused batch memory: ``slots`` sets of shared feature tensors, taken
    in turn. A slot is written again only after the consumer released it (``Batch.copy_out``,
    or the device feed once its copy is done). The DataLoader keeps at most ``prefetch_factor``
    batches of a worker in flight, and the consumer one more while it waits for the next, so
    with two more slots a worker can always write; it waits only when the consumer's side
    (pinned batches queued for the trainer) is full, which is back-pressure."""

    WAIT_S = 600.0

    def __init__(self, flags: torch.Tensor, worker: int):
        self.flags, self.worker = flags, worker
        self.slots: list[list[torch.Tensor]] = []
        self.turn = 0

    def acquire(self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype) -> tuple[list[torch.Tensor], Lease]:
        slot = self.turn % self.flags.shape[1]
        deadline = time.monotonic() + self.WAIT_S
        while int(self.flags[self.worker, slot]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"loader worker {self.worker}: batch buffer {slot} was not released in "
                                   f"{self.WAIT_S:.0f} s; a consumer must hand each batch's lease back "
                                   f"(Batch.copy_out, or the device feed after its copy)")
            time.sleep(0.0005)
        if slot == len(self.slots):
            self.slots.append([_zeros(shape, dtype) for shape in shapes])
        tensors = self.slots[slot]
        if [tuple(t.shape) for t in tensors] != list(shapes) or tensors[0].dtype != dtype:
            raise ValueError(f"reused batch memory holds {[tuple(t.shape) for t in tensors]}, asked for {shapes}")
        self.flags[self.worker, slot] = 1
        self.turn += 1
        return tensors, Lease(self.flags, self.worker, slot)


# The batch fields that live in a worker's reused buffers, in ``collate``'s order; the others
# (boxes, masks, tokens) are a few hundred KB per batch and are allocated per batch.
REUSED_FIELDS = ("regions", "grids")


class InPlacePins:
    """The training process's side of reused batch memory on a CUDA machine.

    Pinning by copy moves every 45 MB full-size batch through the loader's one pinning thread
    a second time, about 16 ms of a core per batch on the CPU dev machine: at most ~60
    batches/s, below what the captured step takes. Here each worker buffer is page-locked
    where it lies (``cudaHostRegister``) the first time it arrives and stays mapped: holding it
    makes torch's shared-memory cache hand back the same mapping whenever the worker sends that
    buffer again, so no page is faulted in twice. The host-to-device copy then reads the
    worker's memory directly; the batch keeps its lease, which the consumer releases once that
    copy has completed (:class:`LeasesInFlight`). The small fields are pinned by copy.

    ``register(tensor) -> bool`` and ``unregister(tensor)`` page-lock a buffer; a failed
    registration (a driver that refuses shared memory) falls back to pinning by copy."""

    def __init__(self, register: Callable[[torch.Tensor], bool] | None = None,
                 unregister: Callable[[torch.Tensor], None] | None = None,
                 pin: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory):
        self.register, self.unregister = register or _cuda_register, unregister or _cuda_unregister
        self.pin = pin
        self.held: dict[int, torch.Tensor] = {}
        self.failed = False

    def __call__(self, batch: Batch) -> Batch:
        if batch.lease is None or self.failed:
            return batch.copy_out(self.pin)
        for name in REUSED_FIELDS:
            tensor = getattr(batch, name)
            key = tensor.untyped_storage().data_ptr()
            if key in self.held:
                continue
            if not self.register(tensor):
                self.failed = True
                log.warning("cudaHostRegister refused a loader buffer; pinning batches by copy instead")
                return batch.copy_out(self.pin)
            self.held[key] = tensor
        return replace(batch, **{name: self.pin(v) for name, v in batch.tensors().items()
                                 if name not in REUSED_FIELDS})

    def close(self) -> None:
        """Unlock and unmap every buffer; the device's copies from them must be complete."""
        if self.held and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        for tensor in self.held.values():
            self.unregister(tensor)
        self.held.clear()


_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


def _cuda_register(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    flags = _HOST_REGISTER_PORTABLE
    return int(torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags)) == 0


def _cuda_unregister(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.untyped_storage().data_ptr())


class LeasesInFlight:
    """Leases of batches whose host-to-device copies are queued on a stream: each goes back to
    its worker once the copy's CUDA event has completed (``poll``)."""

    def __init__(self) -> None:
        self.queue: deque[tuple[Lease, Any]] = deque()

    def add(self, lease: Lease, event: Any) -> None:
        self.queue.append((lease, event))

    def poll(self, keep: int = 1) -> None:
        """Release every completed copy, and wait for all but the ``keep`` newest: a consumer
        about to block on the loader must not hold a buffer its worker may be waiting for."""
        while self.queue and (len(self.queue) > keep or self.queue[0][1].query()):
            lease, event = self.queue.popleft()
            event.synchronize()
            lease.release()


def pinned_in_background(items: Iterator[tuple[Batch | None, Any]], pins: InPlacePins, depth: int,
                         release_all: Callable[[], None],
                         device: int | None = None) -> Iterator[tuple[Batch | None, Any]]:
    """``items`` (the DataLoader's (batch, skips) pairs) with each batch pinned by ``pins`` in a
    background thread, as the DataLoader's own pinning thread does for copies: receiving a
    batch from its worker and registering it stay off the training thread, whose eager steps
    are bound by the host. At most ``depth`` pinned batches wait.

    A consumer that stops early leaves batches unreleased while the thread may be waiting for
    a worker that waits for them: ``release_all`` hands every buffer back (nothing reads them
    any more) until the thread has stopped. The buffers are unregistered after that.

    ``device``: the rank's CUDA device, made current in the thread (a new thread starts on
    device 0, where each rank would open a context of its own), as in DataLoader's thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        torch.set_num_threads(1)  # this thread's copies are small
        if device is not None:
            torch.cuda.set_device(device)
        try:
            for batch, skipped in items:
                if not put((None if batch is None else pins(batch), skipped)):
                    return
            put(end)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    thread = threading.Thread(target=run, name="rgfusion-pin", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            release_all()
            thread.join(timeout=0.05)
        pins.close()


# Elements per copy: casting float16 in small pieces stays on this thread; one large copy wakes
# torch's OpenMP team, which costs 3x the CPU time on busy cores (benchmarks/RESULTS.md).
_CAST_CHUNK = 32768


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed batch tensor without a memset pass: fresh pages are zero-filled by the kernel.

    In a DataLoader worker it lives in shared memory from the start (as torch's default_collate
    does), so handing it to the training process needs no copy; elsewhere numpy's calloc'd
    pages, viewed as any 2/4-byte dtype."""
    if torch.utils.data.get_worker_info() is not None:
        proto = torch.empty(0, dtype=dtype)
        return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).view(shape)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(shape, np.dtype(f"u{size}"))).view(dtype)


def _cast_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """``dst[...] = src`` with dtype conversion; ``dst`` is a contiguous slice of a batch."""
    if dst.dtype == torch.float16 and src.dtype == np.float16:  # a plain copy: one numpy call
        np.copyto(dst.numpy(), src.reshape(dst.shape))
        return
    out, flat = dst.view(-1), torch.from_numpy(src).reshape(-1)
    for j in range(0, flat.numel(), _CAST_CHUNK):
        out[j: j + _CAST_CHUNK].copy_(flat[j: j + _CAST_CHUNK])


# -- shards -> samples ------------------------------------------------------------------------

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)


def iter_tar(stream: Any) -> Iterator[tuple[str, dict[str, bytearray]]]:
    """(key, {member suffix: bytes}) per sample of an uncompressed tar stream, in order.

    A minimal sequential ustar/pax reader: one ``read`` per header and per member, no seeks,
    about 20x less per-member overhead than tarfile (whose stream mode also re-copies its
    read-ahead buffer on every header). A stream that ends before the end-of-archive zero
    block, a short member or a header with a bad checksum raises ``tarfile.ReadError``; the
    sample being read at that point is dropped with it."""
    key, members = None, {}
    pax: dict[str, str] = {}
    offset = 0
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"truncated tar: no end-of-archive block after {offset} bytes")
        if header == _ZERO_BLOCK:
            break
        name, size, kind = _parse_header(header, offset)
        name, size = pax.pop("path", name), int(pax.pop("size", size))
        pax.clear()
        padding = -size % _BLOCK
        # Exactly the member, into a writable buffer: arrays decoded from it are zero-copy views
        # that torch can wrap without a copy.
        data = bytearray(size)
        if stream.readinto(data) != size or len(stream.read(padding)) != padding:
            raise tarfile.ReadError(f"truncated tar: member {name!r} at byte {offset} is cut short")
        offset += _BLOCK + size + padding
        if kind == b"x":  # pax extended header: applies to the next member
            pax = _parse_pax(data)
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: not sample data
            continue
        prefix, suffix = wds.tariterators.base_plus_ext(name)
        if prefix is None:
            continue
        if prefix != key:
            if key is not None:
                yield key, members
            key, members = prefix, {}
        members[suffix] = data
    if key is not None:
        yield key, members


def _parse_header(h: bytes, offset: int) -> tuple[str, int, bytes]:
    stored = _octal(h[148:156])
    if stored != sum(h) - sum(h[148:156]) + 8 * 32:  # checksum field counts as spaces
        raise tarfile.ReadError(f"invalid tar header at byte {offset} (bad checksum)")
    name = h[:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar" and h[345] != 0:
        name = h[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), _octal(h[124:136]), h[156:157]


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number {field!r} in tar header") from None


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records."""
    out, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1: pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError as e:
        raise tarfile.ReadError(f"invalid pax header: {e}") from None
    return out


class ShardReader:
    """Opens shards through fsspec and yields decoded, checked samples; counts what it skips."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, stats: SkipStats):
        self.manifest = manifest
        self.cfg = cfg
        self.stats = stats
        self._fs = None

    def _open(self, url: str) -> Any:
        if self._fs is None:
            self._fs, _ = open_fs(url, self.manifest.storage_options or self.cfg.storage_options)
        path = strip_protocol(url)
        return with_retries(lambda: self._fs.open(path, "rb", block_size=self.cfg.block_size),
                            retries=self.cfg.retries, what=f"open {url}")

    def samples(self, url: str) -> Iterator[Sample]:
        """Every valid sample of one shard; a transient error reopens it past those yielded."""
        done, attempt = 0, 0
        while True:
            try:
                with self._open(url) as f:
                    for i, (key, members) in enumerate(iter_tar(f)):
                        if i >= done:
                            done += 1
                            sample = self.decode(url, key, members)
                            if sample is not None:
                                yield sample
                return
            except Exception as e:  # noqa: BLE001 - any unreadable shard is skipped, never fatal
                if is_transient(e) and attempt < self.cfg.retries:
                    attempt += 1
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                reason = "missing_shard" if isinstance(e, FileNotFoundError) else "bad_tar"
                detail = explain_missing(url, self.manifest.storage_options) if reason == "missing_shard" else str(e)
                self.stats.record(reason, f"{url} after {done} samples: {type(e).__name__}: {detail}")
                return

    def decode(self, url: str, key: str, members: dict[str, bytes]) -> Sample | None:
        m = self.manifest
        try:
            s = Sample.from_members(members)
            s.validate(region_dim=m.region_dim, grid_dim=m.grid_dim, grid_cells=m.grid_cells,
                       max_regions=m.max_regions, check_values=False)
        except SchemaError as e:
            self.stats.record(e.reason, f"{url} sample {key}: {e}")
            return None
        return s


# -- per-worker streams -----------------------------------------------------------------------

def worker_steps(total: int, num_workers: int, worker: int) -> int:
    """Share of ``total`` batches for one worker; lower ids take the remainder, which matches
    the DataLoader's round-robin order so batches arrive without gaps."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def deal_shards(counts: list[int], slots: int) -> list[list[int]]:
    """Shard indices per slot, balancing samples greedily (largest shard first); each slot's
    shards are in manifest order. Empty shards are dropped; surplus slots get nothing."""
    load = [0] * slots
    out: list[list[int]] = [[] for _ in range(slots)]
    for idx in sorted((i for i, c in enumerate(counts) if c > 0), key=lambda i: (-counts[i], i)):
        s = min(range(slots), key=lambda j: (load[j], j))
        out[s].append(idx)
        load[s] += counts[idx]
    return [sorted(x) for x in out]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def shuffle_window(configured: int, samples: int) -> int:
    """The shuffle buffer of a worker whose pass yields ``samples``: the configured size, but at
    most a quarter of the pass.

    WebDataset's buffer fills by reading two samples for each one it yields, and whatever it
    holds when the pass ends is dropped. A buffer as large as the pass reads every sample twice:
    with 14 workers and 2,000 samples each, a 20,000-image epoch never leaves the filling, and
    the loader ran at half speed (benchmarks/RESULTS.md, session 6). Capped, a pass reads at most
    a quarter more than it yields.
    """
    return max(1, min(configured, samples // 4))


@dataclass
class _Plan:
    """What one rank streams; picklable so DataLoader workers can rebuild the pipeline."""

    cfg: DataConfig
    manifest: Manifest
    text: TextProcessor
    split: str
    batch_size: int
    rank: int
    world_size: int
    train: bool
    steps: int = 0  # training batches for this rank
    seed: tuple[int, ...] = ()  # (seed, epoch, start_step, rank); the worker id is appended
    buffer_flags: torch.Tensor | None = None  # shared (workers, slots): WorkerBuffers in use

    def worker_items(self, worker: int, num_workers: int) -> Iterator[tuple[Batch | None, dict[str, int]]]:
        """(batch, skips since the previous item); a final (None, skips) reports the rest."""
        stats = SkipStats(interval=skip_stats().interval)
        reader = ShardReader(self.manifest, self.cfg, stats)
        reported: Counter[str] = Counter()
        pipeline = self._train(reader, worker, num_workers) if self.train else self._eval(reader, worker, num_workers)
        for batch in pipeline:
            delta = stats.by_reason - reported
            reported = stats.by_reason.copy()
            yield batch, dict(delta)
        yield None, dict(stats.by_reason - reported)

    def _train(self, reader: ShardReader, worker: int, num_workers: int) -> Iterator[Batch]:
        n = worker_steps(self.steps, num_workers, worker)
        if n == 0:
            return iter(())
        rng = random.Random(_seed(*self.seed, worker))
        urls = self.manifest.shard_urls(self.split)
        weights = self.manifest.split(self.split).samples_per_shard
        if not any(weights):
            raise ValueError(f"split {self.split!r} of {self.manifest.root} has no samples")
        dtype = DTYPES[self.cfg.dtype]

        def shard_stream() -> Iterator[Sample]:
            dry = 0  # consecutive shards without one good sample: all-bad data must not spin forever
            while True:
                got = False
                for s in reader.samples(rng.choices(urls, weights)[0]):
                    got, dry = True, 0
                    yield s
                dry = 0 if got else dry + 1
                if dry > 10 * len(urls) + 10:
                    raise RuntimeError(f"no readable sample in {dry} consecutive shards of "
                                       f"{self.manifest.root} split {self.split!r}; see skip warnings")

        buffers = None if self.buffer_flags is None else WorkerBuffers(self.buffer_flags, worker)

        def to_batches(src: Iterator[Sample]) -> Iterator[Batch]:
            while True:
                chunk = [next(src) for _ in range(self.batch_size)]
                yield collate(chunk, self.manifest, self.text, dtype, [[rng.choice(s.captions)] for s in chunk],
                              buffers=buffers)

        buf = shuffle_window(self.cfg.shuffle_buffer, n * self.batch_size)
        initial = min(buf, self.batch_size)
        return wds.DataPipeline(shard_stream, wds.shuffle(buf, initial=initial, rng=rng), to_batches,
                                wds.slice(n)).iterator()

    def _eval(self, reader: ShardReader, worker: int, num_workers: int) -> Iterator[Batch]:
        info = self.manifest.split(self.split)
        mine = deal_shards(info.samples_per_shard, self.world_size * num_workers)[self.rank * num_workers + worker]
        urls = self.manifest.shard_urls(self.split)
        cpi = self.manifest.captions_per_image
        dtype = DTYPES[self.cfg.dtype]

        offsets = np.cumsum([0, *info.samples_per_shard])

        def samples() -> Iterator[tuple[Sample, int]]:
            for i in mine:
                for j, s in enumerate(reader.samples(urls[i])):
                    if len(s.captions) < cpi:
                        reader.stats.record("few_captions", f"{urls[i]}: {s.image_id} has {len(s.captions)} "
                                                            f"captions, evaluation needs {cpi}")
                        continue
                    # A skipped bad sample shifts j; only the relative order matters downstream.
                    yield s, int(offsets[i]) + j

        def to_batches(src: Iterator[tuple[Sample, int]]) -> Iterator[Batch]:
            chunk: list[tuple[Sample, int]] = []
            for item in src:
                chunk.append(item)
                if len(chunk) == self.batch_size:
                    yield self._eval_batch(chunk, dtype, cpi)
                    chunk = []
            if chunk:
                yield self._eval_batch(chunk, dtype, cpi)

        return wds.DataPipeline(samples, to_batches).iterator()

    def _eval_batch(self, chunk: list[tuple[Sample, int]], dtype: torch.dtype, cpi: int) -> Batch:
        samples = [s for s, _ in chunk]
        return collate(samples, self.manifest, self.text, dtype, [s.captions[:cpi] for s in samples],
                       [p for _, p in chunk])

    def slot_samples(self, num_workers: int) -> int:
        """Images this rank reads in evaluation (over its workers)."""
        counts = self.manifest.split(self.split).samples_per_shard
        slots = deal_shards(counts, self.world_size * num_workers)
        return sum(counts[i] for w in range(num_workers) for i in slots[self.rank * num_workers + w])


class _WorkerStream(torch.utils.data.IterableDataset):
    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[Batch | None, dict[str, int]]]:
        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.plan.worker_items(worker, num)


class Loader:
    """Iterable of ``Batch``; merges the workers' skip counts into ``skip_stats()``."""

    def __init__(self, plan: _Plan, num_workers: int, expected: int | None, pin_memory: bool = False,
                 reuse_memory: bool = False):
        self.plan = plan
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.reuse_memory = reuse_memory and num_workers > 0
        self.expected = expected  # exact batch count in training; None in evaluation
        self.num_samples = plan.slot_samples(max(num_workers, 1)) if not plan.train else None

    def __len__(self) -> int:
        if self.expected is None:
            raise TypeError("evaluation loaders have no fixed length; use num_samples")
        return self.expected

    def __iter__(self) -> Iterator[Batch]:
        in_place = self.reuse_memory and self.pin_memory
        plan, items = self.worker_items(pin_memory=self.pin_memory and not in_place)
        if in_place:
            items = pinned_in_background(items, InPlacePins(), depth=plan.cfg.prefetch_factor,
                                         release_all=plan.buffer_flags.zero_, device=torch.cuda.current_device())
        yielded = 0
        for batch, skipped in items:
            if skipped:
                skip_stats().merge(skipped)
            if batch is not None:
                yielded += 1
                yield batch
        if self.expected is not None and yielded != self.expected:
            raise RuntimeError(f"rank {self.plan.rank} yielded {yielded} batches, expected {self.expected}")

    def worker_items(self, pin_memory: bool) -> tuple[_Plan, Iterator[tuple[Batch | None, Any]]]:
        """One pass's (batch, skips) pairs from the DataLoader, and the plan its workers follow
        (with reused memory: fresh buffer flags, since the last pass's workers are gone)."""
        plan = self.plan
        if self.reuse_memory:
            slots = plan.cfg.prefetch_factor + 2
            plan = replace(plan, buffer_flags=torch.zeros(self.num_workers, slots, dtype=torch.int32).share_memory_())
        return plan, iter(torch.utils.data.DataLoader(
            _WorkerStream(plan), batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory,
            prefetch_factor=plan.cfg.prefetch_factor if self.num_workers > 0 else None))


def train_loader(cfg: DataConfig, manifest: Manifest, text: TextProcessor, *, batch_size: int, steps: int,
                 rank: int, world_size: int, seed: int, epoch: int, start_step: int = 0,
                 split: str = "train", pin_memory: bool = False, reuse_memory: bool = False) -> Loader:
    """Exactly ``steps - start_step`` training batches of ``batch_size`` images on every rank
    (one random caption per image), whatever the shard sizes. ``pin_memory`` (for a CUDA
    trainer) pins batches in a background thread so host-to-device copies are asynchronous.
    ``reuse_memory``: workers write into reused buffers, and the consumer hands each batch's
    ``lease`` back before the worker can write that buffer again: ``Batch.copy_out`` does
    without ``pin_memory``; with it the buffers are pinned in place (:class:`InPlacePins`) and
    the consumer releases the lease once its device copy is done (:class:`LeasesInFlight`)."""
    _check_rank(rank, world_size, batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, steps={steps}], got {start_step}")
    plan = _Plan(cfg, manifest, text, split, batch_size, rank, world_size, train=True,
                 steps=steps - start_step, seed=(seed, epoch, start_step, rank))
    return Loader(plan, cfg.num_workers, steps - start_step, pin_memory, reuse_memory)


def eval_loader(cfg: DataConfig, manifest: Manifest, text: TextProcessor, *, split: str, batch_size: int,
                rank: int, world_size: int, pin_memory: bool = False) -> Loader:
    """Each image of ``split`` exactly once across ranks x workers, with all its captions
    (``captions_per_image`` each, C = B * captions_per_image); ``image_ids`` reassemble order."""
    _check_rank(rank, world_size, batch_size)
    manifest.split(split)
    plan = _Plan(cfg, manifest, text, split, batch_size, rank, world_size, train=False)
    return Loader(plan, cfg.num_workers, None, pin_memory)


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


__all__ = ["Batch", "DataConfig", "Loader", "SkipStats", "collate", "deal_shards", "eval_loader",
           "iter_tar", "load_manifest", "skip_stats", "train_loader", "worker_steps"]
