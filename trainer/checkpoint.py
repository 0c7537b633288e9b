"""Checkpoints that survive crashes, pre-emption, object stores and new world sizes.

Layout under the checkpoint root (a local folder or any fsspec URL)::

    step-00000120/            one tag: DeepSpeed's per-rank model/optimizer shards, or native_states.pt
        meta.json             train state, world size, ZeRO stage, model fingerprint, config
        client/rank-00000.json  each rank's RNG state
        COMPLETE.json         written last: every file's size and sha256
    latest                    tag of the newest complete checkpoint (published after COMPLETE)
    best                      tag of the checkpoint with the best dev RSUM

Every rank calls ``save`` (DeepSpeed hangs if only rank 0 saves). Remote roots are saved to
a node-local staging folder first and uploaded by each node's first process; only when every
node has uploaded does rank 0 write ``COMPLETE.json`` and then move ``latest``. A checkpoint
without a valid ``COMPLETE.json``, with a missing, truncated or altered file, or with a
pickle that holds anything but tensors and a few known DeepSpeed records, is refused.

The module carries DeepSpeed's universal-checkpoint info, so a ZeRO checkpoint written by
N processes is converted (``ds_to_universal``) and loaded with ``load_universal`` by M.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgfusion.configs import ConfigError, flatten
from rgfusion.datasets.storage import is_local, join_url, open_fs, publish_bytes, with_retries
from rgfusion.trainer.distenv import DistEnv, all_gather_object, barrier, broadcast_list

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
META = "meta.json"
TAG_RE = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used, with the reason in one line."""


@dataclass
class TrainState:
    """Where training stands; saved in meta.json and restored on resume."""

    epoch: int = 0  # epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed: the data-stream position
    global_step: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # micro-steps skipped for a non-finite loss
    best_rsum: float | None = None  # best dev RSUM so far
    best_epoch: int | None = None
    best_tag: str | None = None  # checkpoint saved right after the best dev evaluation
    best_test: dict[str, float] = field(default_factory=dict)  # test metrics at the best epoch
    run_id: str | None = None  # MLflow run that a resume continues


@dataclass
class Chosen:
    """A verified checkpoint picked for resume."""

    url: str  # the tag folder as given (local path or URL)
    tag: str
    meta: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


# DeepSpeed records its own small objects next to the tensors; these (and nothing else
# outside torch's defaults) may appear in a checkpoint's pickles.
def _safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path) -> Any:
    """``torch.load`` that refuses arbitrary pickled objects."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def enable_universal(model: torch.nn.Module) -> None:
    """Mark the module so DeepSpeed writes the info ``ds_to_universal`` needs."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    setattr(model, UNIVERSAL_CHECKPOINT_INFO,
            {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


# ---------------------------------------------------------------- RNG state (JSON, no pickle)

def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- files and verification

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` except the completeness marker."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE}


def verify_local(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used, or None when it is complete and intact."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (the save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} ({type(e).__name__})"
    for rel, info in files.items():
        p = folder / rel
        if not p.is_file():
            return f"file {rel} is missing"
        if p.stat().st_size != info["size"]:
            return f"file {rel} is truncated ({p.stat().st_size} of {info['size']} bytes)"
        if sha256_file(p) != info["sha256"]:
            return f"file {rel} is corrupt (sha256 mismatch)"
    for p in sorted(folder.rglob("*.pt")):
        try:
            safe_load(p)
        except Exception as e:  # noqa: BLE001 - any failure means "do not trust this file"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"file {p.relative_to(folder)} does not load as plain tensors ({first[:200]})"
    return None


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two model fingerprints."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def has_optimizer_shards(folder: Path) -> bool:
    return any(folder.glob("*optim_states.pt"))


# ---------------------------------------------------------------- the manager

class Checkpoints:
    """Save, verify, select, load and prune the checkpoints of one run (all ranks call it)."""

    def __init__(self, root: str, storage_options: dict[str, Any], env: DistEnv, *, cache_dir: str | Path,
                 keep_last: int, fingerprint: dict[str, Any], engine: str = "deepspeed"):
        self.root = root.rstrip("/")
        self.engine = engine
        self.storage_options = dict(storage_options)
        self.env = env
        self.keep_last = keep_last
        self.fingerprint = fingerprint
        self.fs, self.root_path = open_fs(self.root, self.storage_options)
        self.local = is_local(self.fs)
        # Node-local scratch: staging for uploads, downloads for resume, universal conversions.
        self.cache = Path(cache_dir) / f"node{env.node_rank}"

    # -- naming
    def url(self, *parts: str) -> str:
        return join_url(self.root, *parts)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root_path.rstrip("/"), *parts])

    def staging(self, tag: str) -> Path:
        return Path(self._path(tag)) if self.local else self.cache / "staging" / tag

    # -- save
    def save(self, engine: Any, state: TrainState, *, config: dict[str, Any], best: bool = False) -> str:
        """Checkpoint on every rank; returns the tag. ``latest`` moves only once it is complete."""
        tag = tag_for(state.global_step)
        folder = self.staging(tag)
        self._clear_stale(tag)
        barrier()
        engine.save_checkpoint(str(folder.parent), tag=tag, save_latest=False)
        client = folder / "client" / f"rank-{self.env.rank:05d}.json"
        client.parent.mkdir(parents=True, exist_ok=True)
        _write_json(client, {"rank": self.env.rank, "rng": rng_state()})
        if self.env.is_main:
            _write_json(folder / META, {
                "tag": tag, "state": dataclasses.asdict(state), "world_size": self.env.world_size,
                "engine": self.engine, "zero_stage": engine.zero_optimization_stage(),
                # bf16 without ZeRO still shards optimizer state; either way a new world size
                # then needs the universal conversion.
                "sharded_optimizer": has_optimizer_shards(folder), "fingerprint": self.fingerprint,
                "config": config, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        barrier()
        files: dict[str, Any] = {}
        if self.env.is_local_main:
            files = inventory(folder)
            if not self.local:
                self._upload(folder, tag, files)
        gathered = all_gather_object(files)
        if self.env.is_main:
            merged = {k: v for part in gathered for k, v in part.items()}
            publish_bytes(self.url(tag, COMPLETE), json.dumps({"tag": tag, "files": merged}, indent=1).encode(),
                          self.storage_options)
            publish_bytes(self.url("latest"), tag.encode(), self.storage_options)
            if best:
                publish_bytes(self.url("best"), tag.encode(), self.storage_options)
            self.prune()
        barrier()
        if not self.local and self.env.is_local_main:
            shutil.rmtree(folder, ignore_errors=True)
        if self.env.is_main:
            log.info("checkpoint %s saved (step %d)", self.url(tag), state.global_step)
        return tag

    def _clear_stale(self, tag: str) -> None:
        # A folder with this tag left by a crashed save (or, after skipped steps, an older
        # position at the same step) would mix its files with ours.
        if self.env.is_main and self.fs.exists(self._path(tag)):
            self.fs.rm(self._path(tag), recursive=True)
        if not self.local and self.env.is_local_main:
            shutil.rmtree(self.staging(tag), ignore_errors=True)

    def _upload(self, folder: Path, tag: str, files: dict[str, Any]) -> None:
        for rel in files:
            remote = self._path(tag, rel)
            with_retries(lambda: self.fs.put_file(str(folder / rel), remote), what=f"upload {rel}")

    # -- listing and pruning
    def tags(self) -> list[tuple[int, str, bool]]:
        """(step, tag, has COMPLETE.json) of every checkpoint folder, oldest first."""
        try:
            self.fs.invalidate_cache(self.root_path)
            entries = self.fs.ls(self.root_path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            m = TAG_RE.match(name)
            if m:
                out.append((int(m.group(1)), name, self.fs.exists(self._path(name, COMPLETE))))
        return sorted(out)

    def read_pointer(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(name)).decode().strip() or None
        except FileNotFoundError:
            return None

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best one (rank 0)."""
        tags = self.tags()
        complete = [t for _, t, ok in tags if ok]
        keep = set(complete[-self.keep_last:]) | {self.read_pointer("best")}
        newest = max((s for s, _, ok in tags if ok), default=-1)
        for step, tag, ok in tags:
            # Incomplete folders newer than the newest complete one may still be in flight
            # elsewhere only in theory (saves are collective); older ones are crash debris.
            if tag not in keep and (ok or step < newest):
                self.fs.rm(self._path(tag), recursive=True)
                log.info("pruned checkpoint %s", self.url(tag))

    # -- resume
    def select(self, spec: str) -> Chosen | None:
        """The checkpoint to resume from: ``auto`` = newest intact one here; else a path.

        All ranks call; rank 0 decides and broadcasts, so every rank resumes the same tag.
        """
        decision: list[Any] = [None]
        if self.env.is_main:
            try:
                decision[0] = ("ok", self._select_main(spec))
            except CheckpointError as e:
                decision[0] = ("error", str(e))
        decision = broadcast_list(decision)
        kind, value = decision[0]
        if kind == "error":
            raise CheckpointError(value)
        if value is None:
            return None
        chosen = Chosen(*value)
        problems = fingerprint_mismatch(chosen.meta.get("fingerprint", {}), self.fingerprint)
        if problems:
            raise CheckpointError(f"checkpoint {chosen.url} was trained with a different model config: "
                                  + "; ".join(problems[:4]))
        saved = chosen.meta.get("engine", "deepspeed")  # checkpoints from before the native engine
        if saved != self.engine:
            raise CheckpointError(f"checkpoint {chosen.url} was written by train.engine={saved}; resume it "
                                  f"with that engine (this run has train.engine={self.engine})")
        return chosen

    def _select_main(self, spec: str) -> tuple[str, str, dict] | None:
        if spec != "auto":
            return self._select_path(spec)
        tags = self.tags()
        for step, tag, _ in reversed(tags):
            url = self.url(tag)
            reason = self.check(url)
            if reason is None:
                return url, tag, json.loads((self.materialize(url) / META).read_text())
            log.warning("checkpoint %s is unusable: %s; falling back to the previous one", url, reason)
        if tags:
            log.warning("no intact checkpoint under %s; starting from scratch", self.root)
        return None

    def _select_path(self, spec: str) -> tuple[str, str, dict]:
        fs, path = open_fs(spec, self.storage_options)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not TAG_RE.match(name):
            # A checkpoint root: its newest intact checkpoint, and nothing else.
            other = Checkpoints(spec, self.storage_options, self.env, cache_dir=self.cache.parent,
                                keep_last=self.keep_last, fingerprint=self.fingerprint, engine=self.engine)
            found = other._select_main("auto")
            if found is None:
                raise CheckpointError(f"no intact checkpoint under {spec}")
            return found
        if not fs.exists(path):
            raise CheckpointError(f"checkpoint {spec} does not exist")
        reason = self.check(spec)
        if reason is not None:
            raise CheckpointError(f"checkpoint {spec} is unusable: {reason}")
        return spec, name, json.loads((self.materialize(spec) / META).read_text())

    def check(self, url: str) -> str | None:
        try:
            folder = self.materialize(url)
        except FileNotFoundError as e:
            return f"cannot be read ({e})"
        return verify_local(folder)

    def materialize(self, url: str) -> Path:
        """A local folder holding the checkpoint ``url`` (downloaded into the node cache if remote)."""
        fs, path = open_fs(url, self.storage_options)
        if is_local(fs):
            return Path(path)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        target = self.cache / "download" / name
        if not (target / COMPLETE).is_file() or verify_local(target) is not None:
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            with_retries(lambda: fs.get(path.rstrip("/") + "/", str(tmp), recursive=True),
                         what=f"download {url}")
            tmp.rename(target)
        return target

    def needs_universal(self, chosen: Chosen, zero_stage: int) -> bool:
        """True when the shards were written for another world size or ZeRO stage."""
        same = chosen.meta["world_size"] == self.env.world_size and chosen.meta["zero_stage"] == zero_stage
        if not same and not chosen.meta["sharded_optimizer"] and zero_stage != chosen.meta["zero_stage"]:
            raise CheckpointError(f"checkpoint {chosen.url} was written without ZeRO; resume it with "
                                  f"train.zero_stage=0 (this run has {zero_stage})")
        return not same and chosen.meta["sharded_optimizer"]

    def prepare(self, chosen: Chosen, *, universal: bool) -> Path:
        """Local folder to load (on every node): downloaded, verified, converted if needed."""
        out: list[Any] = [None]
        if self.env.is_local_main:
            try:
                folder = self.materialize(chosen.url)
                reason = verify_local(folder)
                if reason is not None:
                    raise CheckpointError(f"checkpoint {chosen.url} is unusable on node "
                                          f"{self.env.node_rank}: {reason}")
                out[0] = str(to_universal(folder, self.cache / "universal") if universal else folder)
            except CheckpointError as e:
                out[0] = e
        # Every rank learns its node's answer (an error anywhere stops everyone).
        answers = all_gather_object(out[0])
        errors = [a for a in answers if isinstance(a, Exception)]
        if errors:
            raise errors[0]
        node_first = self.env.rank - self.env.local_rank
        return Path(answers[node_first])

    def load(self, engine: Any, chosen: Chosen, folder: Path) -> TrainState:
        """Restore engine (model, optimizer, scheduler), RNG and the train state."""
        barrier()
        loaded, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {chosen.url}")
        state = TrainState(**chosen.meta["state"])
        client = folder / "client" / f"rank-{self.env.rank:05d}.json"
        if chosen.meta["world_size"] == self.env.world_size and client.is_file():
            set_rng_state(json.loads(client.read_text())["rng"])
        else:
            # Another world size: ranks no longer map one-to-one, so derive fresh streams.
            seed_everything(hash((state.global_step, self.env.rank)) % 2 ** 31)
        log.info("resumed from %s at epoch %d, batch %d, step %d", chosen.url, state.epoch,
                 state.batch_in_epoch, state.global_step)
        return state


def to_universal(folder: Path, out_root: Path) -> Path:
    """DeepSpeed's ``ds_to_universal`` conversion of one tag folder (node-local, cached)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target = out_root / folder.name
    done = target / ".converted"
    if done.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        ds_to_universal(args)
    log.info("converted %s to a universal checkpoint for a new world size", folder.name)
    done.write_text("ok")
    return target


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
