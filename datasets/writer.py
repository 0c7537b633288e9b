"""Shard writer: samples -> WebDataset tar shards on any fsspec URL, each published atomically.

Shards are named ``{split}-{index:06d}.tar`` under the dataset root. A shard is closed when
it reaches ``max_bytes`` or, in the fixed mode converters use for resuming, exactly
``samples_per_shard`` samples: then shard ``i`` always holds samples
``[i*samples_per_shard, (i+1)*samples_per_shard)`` and a restart can skip the shards that
``existing_shards`` reports as published. Tar headers are deterministic (mtime 0, uid 0), so
the same samples give byte-identical shards.

Remote shards are spooled to a local temporary file first so a failed upload can be retried
without re-encoding; memory stays one sample, whatever the shard size.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import tempfile
from collections.abc import Mapping
from typing import IO, Any

from rgfusion.datasets.schema import MANIFEST_NAME, VOCAB_NAME, Manifest, Sample, SchemaError
from rgfusion.datasets.storage import (
    atomic_open, is_local, join_url, list_files, open_fs, publish_bytes, with_retries,
)

log = logging.getLogger(__name__)

# WebDataset's guidance is 100 MB - 1 GB per shard: big enough for sequential object-store
# reads, small enough that workers x ranks get several shards each.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_TAR_BLOCK = 512


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def existing_shards(root_url: str, split: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Published shard names of a split, sorted (temporary files never match)."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    return [n for n in list_files(root_url, f"{split}-*.tar", storage_options) if pattern.match(n)]


def complete_prefix(root_url: str, split: str, storage_options: dict[str, Any] | None = None) -> int:
    """Number of shards 0..k-1 all published: where a fixed-size resume starts."""
    names = set(existing_shards(root_url, split, storage_options))
    k = 0
    while shard_name(split, k) in names:
        k += 1
    return k


class ShardWriter:
    """Context manager writing one split; ``close()`` returns ``[(shard_name, count), ...]``.

    Every sample is validated (dtypes, shapes, finite values, normalised boxes) and must have
    the same region/grid dims and cell count as the first one; duplicate image ids raise.
    """

    def __init__(self, root_url: str, split: str, *, storage_options: dict[str, Any] | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, samples_per_shard: int | None = None,
                 start_index: int = 0, region_dim: int | None = None, grid_dim: int | None = None,
                 grid_cells: int | None = None, max_regions: int | None = None, retries: int = 4):
        if samples_per_shard is not None and samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root_url = root_url
        self.split = split
        self.storage_options = dict(storage_options or {})
        self.max_bytes = max_bytes
        self.samples_per_shard = samples_per_shard
        self.retries = retries
        self.dims = {"region_dim": region_dim, "grid_dim": grid_dim, "grid_cells": grid_cells,
                     "max_regions": max_regions}
        self.index = start_index
        self.shards: list[tuple[str, int]] = []
        self.num_samples = 0
        self.max_regions_seen = 0
        self._keys: set[str] = set()
        self._fs, _ = open_fs(root_url, self.storage_options)
        self._local = is_local(self._fs)
        self._file: IO[bytes] | None = None
        self._ctx: Any = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: Sample) -> None:
        sample.validate(**self.dims)
        self._pin_dims(sample)
        key = sample.key
        if key in self._keys:
            raise SchemaError(f"duplicate image_id {sample.image_id!r} in split {self.split!r}")
        self._keys.add(key)
        members = sample.to_members()
        size = sum(_TAR_BLOCK + _padded(len(v)) for v in members.values())
        if self._tar is not None and self._full(size):
            self._finish()
        if self._tar is None:
            self._start()
        for name, data in members.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.num_samples += 1
        self.max_regions_seen = max(self.max_regions_seen, sample.region.shape[0])

    def close(self) -> list[tuple[str, int]]:
        if self._tar is not None:
            self._finish()
        return list(self.shards)

    def _pin_dims(self, s: Sample) -> None:
        # The first sample fixes the dims a manifest can describe; later ones must agree.
        for name, value in (("region_dim", s.region.shape[1]), ("grid_dim", s.grid.shape[1]),
                            ("grid_cells", s.grid.shape[0])):
            if self.dims[name] is None:
                self.dims[name] = value

    def _full(self, next_size: int) -> bool:
        if self.samples_per_shard is not None:
            return self._count >= self.samples_per_shard
        return self._bytes + next_size > self.max_bytes

    def _url(self) -> str:
        return join_url(self.root_url, shard_name(self.split, self.index))

    def _start(self) -> None:
        if self._local:
            self._ctx = atomic_open(self._url(), self.storage_options, retries=self.retries)
            self._file = self._ctx.__enter__()
        else:
            self._file = tempfile.NamedTemporaryFile(prefix="rgfusion-shard-", suffix=".tar")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        if self._local:
            self._ctx.__exit__(None, None, None)
        else:
            self._upload()
        name = shard_name(self.split, self.index)
        self.shards.append((name, self._count))
        log.debug("published %s (%d samples, %d bytes)", name, self._count, self._bytes)
        self._tar = self._file = self._ctx = None
        self.index += 1

    def _upload(self) -> None:
        spool = self._file
        try:
            def attempt() -> None:
                spool.seek(0)
                with atomic_open(self._url(), self.storage_options, retries=self.retries) as f:
                    while chunk := spool.read(8 * 1024 * 1024):
                        f.write(chunk)

            with_retries(attempt, retries=self.retries, what=f"upload {self._url()}")
        finally:
            spool.close()

    def _abort(self) -> None:
        """Drop the shard in progress: nothing half-written is published."""
        if self._tar is None:
            return
        try:
            self._tar.close()
        finally:
            if self._local:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            else:
                self._file.close()
            self._tar = self._file = self._ctx = None


def _padded(n: int) -> int:
    return (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK


def write_manifest(root_url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> str:
    """Publish ``manifest.json`` atomically; call it after every shard is written."""
    url = join_url(root_url, MANIFEST_NAME)
    publish_bytes(url, manifest.to_json().encode("utf-8"), storage_options)
    return url


def write_vocab(root_url: str, vocab: Mapping[str, int] | Any, storage_options: dict[str, Any] | None = None,
                name: str = VOCAB_NAME) -> str:
    """Publish a caption vocabulary (a ``Vocab`` or a word -> index mapping) as JSON."""
    words = vocab.word_to_index if hasattr(vocab, "word_to_index") else dict(vocab)
    url = join_url(root_url, name)
    publish_bytes(url, json.dumps(words, ensure_ascii=False).encode("utf-8"), storage_options)
    return url


def remove_stale_tmp(root_url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Delete temporary files left by a killed writer (they are never read); returns the count."""
    fs, path = open_fs(root_url, storage_options)
    stale = fs.glob(f"{path.rstrip('/')}/*.tmp-*") if fs.exists(path) else []
    for p in stale:
        fs.rm(p)
    return len(stale)


__all__ = ["DEFAULT_MAX_BYTES", "ShardWriter", "complete_prefix", "existing_shards",
           "remove_stale_tmp", "shard_name", "write_manifest", "write_vocab"]
