"""Streaming reader: round trips, distribution over ranks x workers, bad input."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import DR, GRID, MAXR, make_sample, sample_members, write_dataset, write_raw_shard

from rgfusion.datasets import DataConfig, build_text_processor, eval_loader, load_manifest, skip_stats, train_loader
from rgfusion.datasets.reader import ShardReader, SkipStats, deal_shards, iter_tar, worker_steps
from rgfusion.datasets.schema import SchemaError, load_npy, npy_bytes
from rgfusion.datasets.storage import DatasetNotFound

UNEVEN = {"train": [7, 1, 13, 0, 3], "dev": [5, 9, 2]}


@pytest.fixture(autouse=True)
def _fresh_skip_stats():
    skip_stats().reset()
    yield
    skip_stats().reset()


def open_dataset(root: Path, **cfg_kw):
    m = load_manifest(str(root))
    cfg = DataConfig(url=str(root), num_workers=0, shuffle_buffer=8, dtype="float16", **cfg_kw)
    return cfg, m, build_text_processor(cfg, m)


def eval_all(cfg, m, text, split, world_size=1, batch_size=4):
    out = []
    for rank in range(world_size):
        out.extend(eval_loader(cfg, m, text, split=split, batch_size=batch_size, rank=rank, world_size=world_size))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_round_trip_gives_back_arrays_and_captions(tmp_path, workers):
    samples = write_dataset(str(tmp_path), UNEVEN)["dev"]
    cfg, m, text = open_dataset(tmp_path)
    cfg.num_workers = workers
    batches = eval_all(cfg, m, text, "dev")
    by_id = {s.image_id: s for s in samples}
    seen = []
    for b in batches:
        assert b.regions.shape[1:] == (MAXR, DR) and b.grids.shape[1:] == (GRID[0] * GRID[1], 6)
        assert b.grid_size == GRID and b.regions.dtype == torch.float16 and b.boxes.dtype == torch.float32
        assert b.caption_image.tolist() == [i for i in range(len(b)) for _ in range(5)]
        for i, image_id in enumerate(b.image_ids):
            s = by_id[image_id]
            n = s.region.shape[0]
            assert b.region_mask[i].tolist() == [True] * n + [False] * (MAXR - n)
            np.testing.assert_array_equal(b.regions[i, :n].numpy(), s.region)
            assert not b.regions[i, n:].any() and not b.boxes[i, n:].any()
            np.testing.assert_array_equal(b.boxes[i, :n].numpy(), s.boxes)
            np.testing.assert_array_equal(b.grids[i].numpy(), s.grid)
            want = text(s.captions)
            rows = (b.caption_image == i).nonzero().flatten()
            assert torch.equal(b.lengths[rows], want[1])
            assert torch.equal(b.tokens[rows, : want[0].shape[1]], want[0])
        seen.extend(b.image_ids)
    assert sorted(seen) == sorted(by_id)


def test_train_batches_one_caption_per_image_and_dtype(tmp_path):
    samples = write_dataset(str(tmp_path), UNEVEN)["train"]
    cfg, m, text = open_dataset(tmp_path)
    cfg.dtype = "bfloat16"
    batches = list(train_loader(cfg, m, text, batch_size=6, steps=5, rank=0, world_size=1, seed=1, epoch=0))
    assert len(batches) == 5
    captions = {s.image_id: {tuple(text([c])[0][0].tolist()) for c in s.captions} for s in samples}
    for b in batches:
        assert b.regions.dtype == torch.bfloat16 and len(b) == 6 and b.tokens.shape[0] == 6
        assert b.caption_image.tolist() == list(range(6))
        for i, image_id in enumerate(b.image_ids):
            assert tuple(b.tokens[i, : b.lengths[i]].tolist()) in captions[image_id]
    moved = batches[0].to("cpu", torch.float32)
    assert moved.regions.dtype == torch.float32 and moved.boxes.dtype == torch.float32


def test_train_stream_is_seeded(tmp_path):
    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path)

    def ids(**kw):
        args = dict(batch_size=4, steps=4, rank=0, world_size=2, seed=0, epoch=0) | kw
        return [b.image_ids for b in train_loader(cfg, m, text, **args)]

    assert ids() == ids()
    assert ids() != ids(rank=1) and ids() != ids(epoch=1) and ids() != ids(seed=5)
    assert len(ids(start_step=3)) == 1


def test_a_pass_reads_at_most_a_quarter_more_than_it_yields(tmp_path, monkeypatch):
    """The shuffle buffer is capped at a quarter of the pass: WebDataset fills it by reading two
    samples per yield and drops what it holds at the end, so a 1,000-sample buffer on a
    30-sample pass would read 60."""
    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path)
    cfg.shuffle_buffer = 1000
    reads = []
    original = ShardReader.samples

    def counted(self, url):
        for sample in original(self, url):
            reads.append(sample.image_id)
            yield sample

    monkeypatch.setattr(ShardReader, "samples", counted)
    batches = list(train_loader(cfg, m, text, batch_size=6, steps=5, rank=0, world_size=1, seed=1, epoch=0))
    assert sum(len(b) for b in batches) == 30
    assert 30 <= len(reads) <= 30 + 7


@pytest.mark.parametrize("steps", [1, 5, 6])
def test_two_ranks_two_workers_same_batch_count(tmp_path, steps):
    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path)
    cfg.num_workers = 2
    counts = [sum(1 for _ in train_loader(cfg, m, text, batch_size=4, steps=steps, rank=r, world_size=2,
                                          seed=0, epoch=0)) for r in range(2)]
    assert counts == [steps, steps]


@pytest.mark.parametrize("sizes", [UNEVEN["train"], [4, 9]])  # the second: fewer shards than 2x2 slots
def test_two_ranks_two_workers_eval_covers_every_image_once(tmp_path, sizes):
    samples = write_dataset(str(tmp_path), {"train": sizes})["train"]
    cfg, m, text = open_dataset(tmp_path)
    cfg.num_workers = 2
    per_rank = []
    for rank in range(2):
        loader = eval_loader(cfg, m, text, split="train", batch_size=3, rank=rank, world_size=2)
        ids = [i for b in loader for i in b.image_ids]
        assert len(ids) == loader.num_samples
        per_rank.append(ids)
    all_ids = per_rank[0] + per_rank[1]
    assert sorted(all_ids) == sorted(s.image_id for s in samples)
    assert len(all_ids) == len(set(all_ids))


def test_eval_batches_carry_each_image_position_in_the_split(tmp_path):
    """Positions restore the manifest's order (COCO folds are slices of it) across ranks × workers."""
    samples = write_dataset(str(tmp_path), {"train": UNEVEN["train"]})["train"]
    cfg, m, text = open_dataset(tmp_path)
    cfg.num_workers = 2
    got = {}
    for rank in range(2):
        for b in eval_loader(cfg, m, text, split="train", batch_size=3, rank=rank, world_size=2):
            got.update(zip(b.positions.tolist(), b.image_ids))
    assert [got[p] for p in sorted(got)] == [s.image_id for s in samples]
    assert sorted(got) == list(range(len(samples)))


def test_deal_shards_brute_force():
    for counts in itertools.product([0, 1, 5], repeat=4):
        for slots in (1, 3, 4, 6):
            dealt = deal_shards(list(counts), slots)
            flat = sorted(i for d in dealt for i in d)
            assert flat == [i for i, c in enumerate(counts) if c > 0]
            assert all(d == sorted(d) for d in dealt)


def test_worker_steps_sum_and_order():
    for total in range(12):
        for workers in range(1, 5):
            share = [worker_steps(total, workers, w) for w in range(workers)]
            assert sum(share) == total and share == sorted(share, reverse=True)
            assert max(share) - min(share) <= 1


# -- bad input ---------------------------------------------------------------------------------

def corrupt_dataset(root: Path, bad_members) -> list:
    """dev split: shard 0 holds [good, bad, good]; returns the good samples."""
    write_dataset(str(root), {"train": [2], "dev": [3]})
    good = [make_sample(100), make_sample(101)]
    write_raw_shard(str(root), "dev", 0, sample_members(good[0]) + bad_members + sample_members(good[1]))
    return good


def _replace(members, suffix, data):
    return [(n, data if n.endswith(suffix) else d) for n, d in members]


BAD = {
    "bad_npy": lambda s: _replace(sample_members(s), ".region.npy", b"not an npy file"),
    "bad_npy_pickle": lambda s: _replace(sample_members(s), ".grid.npy", _pickled_npy()),
    "missing_member": lambda s: [m for m in sample_members(s) if not m[0].endswith(".boxes.npy")],
    "bad_shape": lambda s: _replace(sample_members(s), ".region.npy", npy_bytes(np.zeros((2, DR + 1), np.float16))),
    "bad_json": lambda s: _replace(sample_members(s), ".json", b"{not json"),
    "bad_value": lambda s: _replace(sample_members(s), ".boxes.npy", npy_bytes(s.boxes * 640)),
}


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_is_skipped_and_counted(tmp_path, kind, caplog):
    good = corrupt_dataset(tmp_path, BAD[kind](make_sample(999, n_regions=3)))
    cfg, m, text = open_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rgfusion.datasets.reader"):
        ids = [i for b in eval_all(cfg, m, text, "dev") for i in b.image_ids]
    assert ids == [s.image_id for s in good]
    reason = "bad_npy" if kind.startswith("bad_npy") else kind
    assert skip_stats().as_dict() == {"total": 1, reason: 1}
    assert "skipped bad input" in caplog.text and make_sample(999).key in caplog.text


@pytest.mark.parametrize("cut", [0, 4096, 4096 + 100, 4608 + 50, 16384])  # empty, at a header,
def test_truncated_tar_keeps_samples_before_the_cut(tmp_path, cut):  # in one, in data, before end
    write_dataset(str(tmp_path), {"train": [2], "dev": [4]})
    shard = tmp_path / "dev-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut])
    cfg, m, text = open_dataset(tmp_path)
    ids = [i for b in eval_all(cfg, m, text, "dev") for i in b.image_ids]
    complete_before_cut = max(cut // 4096 - 1, 0)  # 4 members of 1 KB each per sample here
    assert ids == [f"dev/img.{2 + i}" for i in range(complete_before_cut)]
    assert skip_stats().as_dict() == {"total": 1, "bad_tar": 1}


def test_missing_shard_is_counted_and_training_continues(tmp_path):
    write_dataset(str(tmp_path), {"train": [3, 3]})
    (tmp_path / "train-000001.tar").unlink()
    cfg, m, text = open_dataset(tmp_path)
    cfg.num_workers = 2
    assert sum(1 for _ in train_loader(cfg, m, text, batch_size=2, steps=6, rank=0, world_size=1,
                                       seed=0, epoch=0)) == 6
    assert skip_stats().by_reason["missing_shard"] >= 1  # merged from the worker processes


def test_all_shards_bad_is_an_error_not_a_hang(tmp_path):
    write_dataset(str(tmp_path), {"train": [3]})
    (tmp_path / "train-000000.tar").write_bytes(b"garbage" * 100)
    cfg, m, text = open_dataset(tmp_path)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(train_loader(cfg, m, text, batch_size=2, steps=2, rank=0, world_size=1, seed=0, epoch=0))


def test_skip_warnings_are_rate_limited(caplog):
    stats = SkipStats(interval=3600)
    with caplog.at_level(logging.WARNING, logger="rgfusion.datasets.reader"):
        for i in range(5):
            stats.record("bad_npy", f"sample {i}")
    assert stats.total == 5 and caplog.text.count("skipped bad input") == 1


def test_missing_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFound, match="no dataset manifest: .*file not found"):
        load_manifest(str(tmp_path))
    with pytest.raises(DatasetNotFound, match="folder .* does not exist"):
        load_manifest(str(tmp_path / "nope" / "deeper"))


# -- tar and npy parsing against the standard library's -----------------------------------------

def test_iter_tar_matches_tarfile_on_long_names_and_odd_entries(tmp_path):
    long_key = "x" * 150  # > 100 chars: tarfile writes a pax header
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in [(f"{long_key}.a.npy", b"1" * 700), (f"{long_key}.json", b"{}"),
                           ("k\u00e9y.json", b"[]"), ("dir/k2.json", b""), ("k3.txt", b"x" * 512)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(iter_tar(io.BytesIO(buf.getvalue())))
    assert got == [(long_key, {"a.npy": b"1" * 700, "json": b"{}"}), ("k\u00e9y", {"json": b"[]"}),
                   ("dir/k2", {"json": b""}), ("k3", {"txt": b"x" * 512})]


def test_iter_tar_rejects_garbage():
    with pytest.raises(tarfile.ReadError, match="invalid"):
        list(iter_tar(io.BytesIO(b"not a tar" * 200)))


def test_fast_npy_agrees_with_np_load():
    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 4)).astype(np.float16), rng.random((2, 3)).astype(">f4"),
              np.zeros((0, 5), np.float16), np.asfortranarray(rng.random((4, 3))), np.arange(7),
              rng.random((2, 3, 4)).astype(np.float32), np.array(3.5), np.array([1, 2], np.uint8)]
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        data = buf.getvalue()
        for blob in (data, data[:-1], data + b"\0"):
            try:
                want = np.load(io.BytesIO(blob), allow_pickle=False)
            except ValueError:
                with pytest.raises(SchemaError, match="not a valid .npy"):
                    load_npy(blob)
                continue
            got = load_npy(blob)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


# -- transient storage errors ------------------------------------------------------------------

class FlakyFile(io.BytesIO):
    """A shard stream that drops the connection once, after ``fail_at`` bytes."""

    failures = 0

    def __init__(self, data: bytes, fail_at: int):
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n=-1):
        if FlakyFile.failures == 0 and self.tell() + max(n, 0) > self.fail_at:
            FlakyFile.failures += 1
            raise ConnectionResetError("connection reset by peer")
        return super().read(n)


def test_transient_error_mid_shard_resumes_after_yielded_samples(tmp_path, monkeypatch):
    from rgfusion.datasets import reader as reader_mod

    samples = write_dataset(str(tmp_path), {"train": [1], "dev": [5]})["dev"]
    data = (tmp_path / "dev-000000.tar").read_bytes()
    FlakyFile.failures = 0
    monkeypatch.setattr(reader_mod.ShardReader, "_open", lambda self, url: FlakyFile(data, fail_at=len(data) // 2))
    monkeypatch.setattr(reader_mod.time, "sleep", lambda s: None)
    cfg, m, text = open_dataset(tmp_path)
    stats = SkipStats()
    got = [s.image_id for s in reader_mod.ShardReader(m, cfg, stats).samples(m.shard_urls("dev")[0])]
    assert FlakyFile.failures == 1 and stats.total == 0
    assert got == [s.image_id for s in samples]


def test_with_retries_retries_only_transient_errors(monkeypatch):
    from rgfusion.datasets import storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("read timed out")
        return "ok"

    assert storage.with_retries(flaky, retries=4) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.with_retries(lambda: calls.append(1) or open("/nonexistent/x"), retries=4)
    assert len(calls) == 1
    with pytest.raises(TimeoutError):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("again")), retries=2)


def test_transient_classification():
    from rgfusion.datasets.storage import is_transient

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError("An error occurred (SlowDown) when calling GetObject"))
    assert is_transient(OSError("server replied 503"))
    assert not is_transient(OSError("bad bytes in s3://b/train-000503.tar"))
    assert not is_transient(FileNotFoundError("timed out"))  # missing stays missing
    assert not is_transient(PermissionError("Access Denied"))


def test_reused_worker_memory_gives_the_batches_of_fresh_memory(tmp_path):
    # 12 batches from 2 workers with 4 buffers each: every buffer is written three times,
    # images with fewer regions after ones with more (their padding must be zero again).
    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path, prefetch_factor=2)
    cfg.num_workers = 2
    args = dict(batch_size=4, steps=12, rank=0, world_size=1, seed=3, epoch=0)
    fresh = list(train_loader(cfg, m, text, **args))
    reused = [b.copy_out(torch.clone) for b in train_loader(cfg, m, text, reuse_memory=True, **args)]
    assert len(reused) == 12 and all(b.lease is None for b in reused)
    for a, b in zip(fresh, reused):
        assert a.image_ids == b.image_ids
        for name in ("regions", "boxes", "region_mask", "grids", "tokens", "lengths"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_buffer_is_written_again_only_once_released(monkeypatch):
    from rgfusion.datasets.reader import WorkerBuffers

    flags = torch.zeros(2, 2, dtype=torch.int32)
    buffers = WorkerBuffers(flags, worker=1)
    shapes = ((2, 3, 4), (2, 5, 4))
    (r0, _), lease0 = buffers.acquire(shapes, torch.float16)
    (r1, _), lease1 = buffers.acquire(shapes, torch.float16)
    assert flags.tolist() == [[0, 0], [1, 1]] and r0.data_ptr() != r1.data_ptr()
    monkeypatch.setattr(WorkerBuffers, "WAIT_S", 0.05)
    with pytest.raises(RuntimeError, match="batch buffer 0 was not released"):
        buffers.acquire(shapes, torch.float16)
    lease0.release()
    (again, _), _ = buffers.acquire(shapes, torch.float16)
    assert again.data_ptr() == r0.data_ptr() and flags.tolist() == [[0, 0], [1, 1]]
    lease1.release()
    with pytest.raises(ValueError, match="reused batch memory holds"):
        buffers.acquire(((3, 3, 4), (3, 5, 4)), torch.float16)


def _recording_pins():
    from rgfusion.datasets.reader import InPlacePins

    registered, unregistered = [], []
    pins = InPlacePins(register=lambda t: registered.append(t.untyped_storage().data_ptr()) or True,
                       unregister=lambda t: unregistered.append(t.untyped_storage().data_ptr()), pin=torch.clone)
    return pins, registered, unregistered


def _worker_batches(cfg, m, text, steps=12):
    """The DataLoader's (batch, skips) pairs of a reused-memory pass, and its buffer flags."""
    loader = train_loader(cfg, m, text, reuse_memory=True, batch_size=4, steps=steps, rank=0, world_size=1, seed=3,
                          epoch=0)
    plan, items = loader.worker_items(pin_memory=False)
    return items, plan.buffer_flags


def test_in_place_pins_register_each_worker_buffer_once(tmp_path):
    # The held mapping is what makes torch's shared-memory cache return the same storage each
    # time a worker sends a buffer again: 12 batches from 2 workers use 8 buffers of 2 fields.
    from rgfusion.datasets.reader import pinned_in_background

    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path, prefetch_factor=2)
    cfg.num_workers = 2
    fresh = list(train_loader(cfg, m, text, batch_size=4, steps=12, rank=0, world_size=1, seed=3, epoch=0))
    pins, registered, unregistered = _recording_pins()
    items, flags = _worker_batches(cfg, m, text)
    reused = []
    for batch, _ in pinned_in_background(items, pins, depth=2, release_all=flags.zero_):
        if batch is None:  # a worker's skip counts alone
            continue
        assert batch.lease is not None and batch.regions.untyped_storage().data_ptr() in pins.held
        reused.append(batch.copy_out(torch.clone))
    assert len(registered) == len(set(registered)) == 16
    assert sorted(unregistered) == sorted(registered) and not pins.held
    for a, b in zip(fresh, reused, strict=True):
        assert a.image_ids == b.image_ids and torch.equal(a.regions, b.regions) and torch.equal(a.grids, b.grids)


def test_a_consumer_stopping_early_does_not_wait_for_its_workers(tmp_path):
    # The consumer keeps every batch unreleased (as a feed with copies in flight would) and
    # stops after 3: the worker is stuck waiting for a buffer, and closing must not wait 600 s.
    from rgfusion.datasets.reader import pinned_in_background

    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path, prefetch_factor=2)
    cfg.num_workers = 1
    pins, registered, unregistered = _recording_pins()
    items, flags = _worker_batches(cfg, m, text, steps=40)
    stream = pinned_in_background(items, pins, depth=2, release_all=flags.zero_)
    kept = [next(stream) for _ in range(3)]
    time.sleep(0.5)  # the worker fills its 4 buffers and waits
    start = time.monotonic()
    stream.close()
    assert time.monotonic() - start < 10 and len(kept) == 3
    assert sorted(unregistered) == sorted(registered) and registered


def test_pinning_thread_errors_reach_the_consumer():
    from rgfusion.datasets.reader import InPlacePins, pinned_in_background

    def broken():
        yield None, None
        raise OSError("shard gone")

    stream = pinned_in_background(broken(), InPlacePins(register=lambda t: True, unregister=lambda t: None),
                                  depth=2, release_all=lambda: None)
    assert next(stream) == (None, None)
    with pytest.raises(OSError, match="shard gone"):
        next(stream)


def test_in_place_pins_fall_back_to_copies_when_registration_fails(tmp_path):
    from rgfusion.datasets.reader import InPlacePins

    write_dataset(str(tmp_path), UNEVEN)
    cfg, m, text = open_dataset(tmp_path, prefetch_factor=2)
    cfg.num_workers = 1
    pins = InPlacePins(register=lambda t: False, unregister=lambda t: None, pin=torch.clone)
    batches = [pins(b) for b in train_loader(cfg, m, text, reuse_memory=True, batch_size=4, steps=6,
                                             rank=0, world_size=1, seed=3, epoch=0)]
    assert pins.failed and all(b.lease is None for b in batches) and not pins.held


def test_leases_go_back_once_their_copies_complete():
    from rgfusion.datasets.reader import Lease, LeasesInFlight

    class Event:  # stands in for torch.cuda.Event
        def __init__(self):
            self.done = self.waited = False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = self.done = True

    flags = torch.ones(1, 3, dtype=torch.int32)
    leases, events = LeasesInFlight(), [Event() for _ in range(3)]
    for slot, event in enumerate(events):
        leases.add(Lease(flags, 0, slot), event)
    leases.poll()  # all but the newest are waited for: the consumer may block on the loader next
    assert flags.tolist() == [[0, 0, 1]] and events[0].waited and not events[2].waited
    events[2].done = True
    leases.add(Lease(flags, 0, 0), Event())
    flags[0, 0] = 1
    leases.poll()
    assert flags.tolist() == [[1, 0, 0]]
    leases.poll(keep=0)
    assert flags.tolist() == [[0, 0, 0]] and not leases.queue
