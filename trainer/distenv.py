"""Where this process sits in the job: the one place that reads launcher environments.

Launchers tell a process its rank in different ways: torchrun and the ``deepspeed`` launcher
set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (the latter also appends ``--local_rank=N`` to
argv), Slurm's ``srun`` sets ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, and a Ray
Train worker learns its place from ``ray.train.get_context()`` with the process group
already initialised by Ray. Everything else in the trainer reads ``DistEnv``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Launcher = Literal["single", "torchrun", "slurm", "ray"]


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank, 0 .. world_size-1
    local_rank: int  # rank among the processes of this node (selects the GPU)
    world_size: int  # all processes of the job
    local_world_size: int  # processes on this node
    node_rank: int  # which node, 0 .. nodes-1 (names node-local caches)
    launcher: Launcher  # who started us, for tags and error messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     argv: Sequence[str] | None = None) -> "DistEnv":
        env = os.environ if environ is None else environ
        argv = sys.argv if argv is None else argv
        ray_env = _from_ray()
        if ray_env is not None:
            return ray_env
        if "RANK" in env and "WORLD_SIZE" in env:
            return _from_torchrun(env, argv)
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
            return _from_slurm(env)
        local = _argv_local_rank(argv)
        return cls(rank=0, local_rank=local or 0, world_size=1, local_world_size=1, node_rank=0,
                   launcher="single")

    def export(self, environ: dict[str, str] | None = None) -> None:
        """Make the ``env://`` rendezvous variables match (srun starts processes without them)."""
        env = os.environ if environ is None else environ
        if self.launcher != "slurm":
            return
        env.setdefault("RANK", str(self.rank))
        env.setdefault("WORLD_SIZE", str(self.world_size))
        env.setdefault("LOCAL_RANK", str(self.local_rank))
        env.setdefault("LOCAL_WORLD_SIZE", str(self.local_world_size))
        env.setdefault("MASTER_ADDR", slurm_master_addr(env))
        # One port per job so two jobs sharing a node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _from_torchrun(env: Mapping[str, str], argv: Sequence[str]) -> DistEnv:
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else _argv_local_rank(argv)
    local = rank if local is None else local
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    node = int(env.get("GROUP_RANK", env.get("NODE_RANK", rank // max(local_world, 1))))
    return DistEnv(rank=rank, local_rank=local, world_size=world, local_world_size=local_world,
                   node_rank=node, launcher="torchrun")


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(world // nodes, 1)
    return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", "0")),
                   world_size=world, local_world_size=local_world,
                   node_rank=int(env.get("SLURM_NODEID", "0")), launcher="slurm")


def _from_ray() -> DistEnv | None:
    # Only a process that already imported Ray can be a Ray Train worker; importing Ray here
    # would cost seconds on every plain run.
    if "ray" not in sys.modules:
        return None
    try:
        import ray.train

        ctx = ray.train.get_context()
        world = ctx.get_world_size()
    except Exception:  # noqa: BLE001 - not inside a Ray Train session
        return None
    return DistEnv(rank=ctx.get_world_rank(), local_rank=ctx.get_local_rank(), world_size=world,
                   local_world_size=ctx.get_local_world_size(), node_rank=ctx.get_node_rank(),
                   launcher="ray")


def _argv_local_rank(argv: Sequence[str]) -> int | None:
    for i, arg in enumerate(argv):
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m:
            if m.group(1) is not None:
                return int(m.group(1))
            if i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
    return None


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """First host of ``SLURM_JOB_NODELIST`` (``node[03-05,9]`` -> ``node03``)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if first is None:
        return nodelist
    prefix, ranges = first.group(1), first.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def pick_device(env: DistEnv) -> str:
    """``cuda:N`` for this process's GPU, or ``cpu``.

    Under Ray, ``CUDA_VISIBLE_DEVICES`` is narrowed per worker, so Ray's own answer is used
    rather than ``local_rank`` (which would index past the visible devices).
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if env.launcher == "ray":
        import ray.train.torch

        return str(ray.train.torch.get_device())
    return f"cuda:{env.local_rank % torch.cuda.device_count()}"


# Small collectives on the default group; no-ops for a single process.

def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast_list(obj: list) -> list:
    """Rank 0's picklable list items on every rank (in place)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
