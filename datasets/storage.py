"""fsspec helpers: one place that knows about URLs, atomic publishing and retries.

Any fsspec URL works (a local folder, ``s3://bucket/prefix`` with an ``endpoint_url`` in
``storage_options["client_kwargs"]`` for MinIO-style stores, ``gs://``, ...).

Atomic publish: a file is written under a temporary name next to its final one and only
then renamed (local) or server-side copied (object stores) to its final name. Object stores
need the copy because s3fs commits a half-written object when an exception closes the file;
the temporary key is deleted on failure, so no partial shard ever appears under a final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Exception class names (botocore, aiohttp, urllib3) that mean "try again", matched by name so
# this module does not import every storage backend.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientPayloadError",
    "ClientOSError", "ProtocolError",
}
# Messages s3fs/gcsfs wrap into a plain OSError; HTTP 5xx as a whole word, so a shard named
# "train-000503.tar" in a message never matches.
_TRANSIENT_TEXT = re.compile(r"SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttl|"
                             r"Connection reset|timed out|\b50[0234]\b")


class DatasetNotFound(FileNotFoundError):
    """A missing bucket, folder or manifest, with a one-line explanation."""


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL."""
    return url_to_fs(url, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join_url(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}" if out else p
    return out


def is_transient(exc: BaseException) -> bool:
    """Network hiccups and throttling, not missing files or bad credentials."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    return isinstance(exc, OSError) and _TRANSIENT_TEXT.search(str(exc)) is not None


def with_retries(fn: Callable[[], T], *, retries: int = 4, base_delay: float = 0.2,
                 what: str = "storage call") -> T:
    """Call ``fn``, retrying transient errors with jittered exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if attempt >= retries or not is_transient(e):
                raise
            delay = base_delay * (2 ** attempt) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e,
                        attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _tmp_name(path: str) -> str:
    # Same folder, so a local rename never crosses filesystems; a suffix that no shard glob
    # (``*.tar``) or manifest reader ever matches.
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_open(url: str, storage_options: dict[str, Any] | None = None, *,
                retries: int = 4) -> Iterator[Any]:
    """Binary file handle whose content appears under ``url`` only if the block succeeds."""
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        _commit(fs, tmp, path, retries)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def _commit(fs: fsspec.AbstractFileSystem, tmp: str, path: str, retries: int) -> None:
    if is_local(fs):
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.copy(tmp, path), retries=retries, what=f"publish {path}")
    with contextlib.suppress(Exception):
        fs.rm(tmp)


def publish_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None, *,
                  retries: int = 4) -> None:
    """Write a whole (small) file atomically, retrying transient errors."""

    def attempt() -> None:
        with atomic_open(url, storage_options, retries=retries) as f:
            f.write(data)

    with_retries(attempt, retries=retries, what=f"write {url}")


def read_bytes(url: str, storage_options: dict[str, Any] | None = None, *, retries: int = 4) -> bytes:
    """Whole file; a missing file or bucket is one DatasetNotFound line."""
    fs, path = open_fs(url, storage_options)
    try:
        return with_retries(lambda: fs.cat_file(path), retries=retries, what=f"read {url}")
    except FileNotFoundError:
        raise DatasetNotFound(explain_missing(url, storage_options)) from None


def explain_missing(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Why ``url`` cannot be read: which of bucket / folder / file is missing."""
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            return f"{url}: folder {parent} does not exist"
        return f"{url}: file not found"
    bucket = path.split("/", 1)[0]
    try:
        bucket_ok = fs.exists(bucket)
    except Exception as e:  # noqa: BLE001 - only used to word the message
        return f"{url}: not found (checking bucket {bucket!r} also failed: {type(e).__name__}: {e})"
    if not bucket_ok:
        endpoint = (storage_options or {}).get("client_kwargs", {}).get("endpoint_url")
        at = f" at {endpoint}" if endpoint else ""
        return f"{url}: bucket {bucket!r} does not exist{at}"
    return f"{url}: object not found"


def list_files(url: str, pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) of files under ``url`` matching a glob; [] if the folder is missing."""
    fs, path = open_fs(url, storage_options)
    try:
        fs.invalidate_cache(path)
        found = with_retries(lambda: fs.glob(f"{path.rstrip('/')}/{pattern}"), what=f"list {url}")
    except FileNotFoundError:
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in found)
