"""Is every node able to reach what a job names? Shards, checkpoints and MLflow must be shared.

A path on one node's disk works for a single-node run and silently breaks a multi-node one:
other nodes find no shards, DeepSpeed writes each rank's checkpoint shard to its own disk,
SQLite/file tracking stores exist on one node only (and lock under concurrent writers).
These checks name the problem before anything is submitted.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rgfusion.configs import ConfigError

# fsspec protocols that name a node's own disk rather than a shared store.
LOCAL_PROTOCOLS = ("", "file", "local")


class ClusterError(RuntimeError):
    """A cluster-side failure (unreachable service, rejected submission) stated in one line."""


@dataclass(frozen=True)
class Finding:
    """One reachability problem; errors refuse the submission, warnings are printed."""

    level: Literal["error", "warning"]
    message: str


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_shared_location(url: str, shared_paths: list[str] | tuple[str, ...] = ()) -> bool:
    """True for object-store URLs and for local paths under a prefix every node mounts."""
    if protocol(url) not in LOCAL_PROTOCOLS:
        return True
    path = os.path.abspath(url.split("://", 1)[-1])
    return any(Path(path).is_relative_to(os.path.abspath(p)) for p in shared_paths)


def is_tracking_server(uri: str | None) -> bool:
    """MLflow URIs that many processes on many nodes may write to at once."""
    return bool(uri) and protocol(uri) in ("http", "https", "databricks")


def check_multinode(
    *,
    nodes: int,
    locations: dict[str, str | None],
    tracking_uri: str | None,
    shared_paths: list[str] | tuple[str, ...] = (),
    require_tracking_server: bool = False,
) -> list[Finding]:
    """Problems of a job spanning ``nodes`` nodes; ``locations`` maps a label to a URL/path."""
    if nodes <= 1:
        return []
    found = []
    for label, url in locations.items():
        if url and not is_shared_location(url, shared_paths):
            found.append(Finding(
                "error",
                f"{label} '{url}' is a local path but the job spans {nodes} nodes; use an object-store "
                "URL (s3://...) or a path under a shared filesystem listed in the profile's shared_paths",
            ))
    if not is_tracking_server(tracking_uri):
        found.append(Finding(
            "error" if require_tracking_server else "warning",
            f"MLflow tracking URI '{tracking_uri or '(unset)'}' is not a tracking server; other nodes "
            "cannot reach it and SQLite locks under concurrent writers: set an http(s):// server",
        ))
    return found


def report(findings: list[Finding]) -> None:
    """Print warnings; raise one error naming every refusal reason."""
    for f in findings:
        if f.level == "warning":
            print(f"rgfusion: warning: {f.message}", file=sys.stderr, flush=True)
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise ConfigError("refusing to submit: " + "; ".join(errors))
