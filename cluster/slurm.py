"""Slurm submission: one launcher per node through ``srun``, torchrun rendezvous on the first node.

The rendered sbatch script finds the first node with ``scontrol show hostnames``, exports the
NCCL and site environment, defines ``launch_node`` (the per-node torchrun command, reading
NODE_RANK/MASTER_ADDR/MASTER_PORT/RDZV_ID from the environment) and runs it once per node
with ``srun``. ``launch_node`` is a plain bash function so the exact same text runs locally for
several "nodes" on 127.0.0.1 in tests.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rgfusion.cluster.checks import ClusterError
from rgfusion.cluster.profiles import ClusterProfile

# The trainer's CLI entry point; torchrun runs it with --no-python so the submit directory
# (which holds our ``datasets/`` folder) never lands on the workers' sys.path.
TRAIN_COMMAND = ("rgfusion", "train")


@dataclass
class SlurmJob:
    """What to run and on how much; site settings come from the ClusterProfile."""

    # Recipe path as the compute nodes see it (relative paths resolve against ``workdir``).
    config: str
    # ``key=value`` overrides passed to the trainer after the recipe.
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    # None takes the profile's value.
    gpus_per_node: int | None = None
    job_name: str = "rgfusion"
    # None takes the profile's values.
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    # Directory the job starts in (a shared filesystem path on real clusters).
    workdir: str = "."
    # Shell lines added after the profile's env_setup.
    env_setup: list[str] = field(default_factory=list)


def train_argv(config: str, overrides: list[str]) -> list[str]:
    """The trainer command line every launcher ends with."""
    argv = [*TRAIN_COMMAND, "--config", config]
    for item in overrides:
        argv += ["--set", item]
    return argv


def launch_function(job: SlurmJob, profile: ClusterProfile) -> str:
    """Bash function ``launch_node``: the torchrun command one node runs.

    c10d rendezvous: the node with NODE_RANK 0 hosts the store on MASTER_ADDR:MASTER_PORT
    (``is_host`` is explicit so two "nodes" on one host in tests don't both try to serve it).
    """
    gpus = job.gpus_per_node if job.gpus_per_node is not None else profile.gpus_per_node
    static = shlex.join([
        "torchrun",
        f"--nnodes={job.nodes}",
        f"--nproc-per-node={gpus}",
        "--rdzv-backend=c10d",
        "--max-restarts=0",
        "--no-python",
    ])
    dynamic = (
        '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" '
        '--rdzv-conf="is_host=$(( NODE_RANK == 0 ))"'
    )
    return (
        "launch_node() {\n"
        '  : "${NODE_RANK:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${RDZV_ID:?}"\n'
        f"  {static} {dynamic} \\\n"
        f"    {shlex.join(train_argv(job.config, job.overrides))}\n"
        "}\n"
    )


def render_sbatch(job: SlurmJob, profile: ClusterProfile) -> str:
    """The complete sbatch script."""
    if job.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {job.nodes}")
    gpus = job.gpus_per_node if job.gpus_per_node is not None else profile.gpus_per_node
    directives = {
        "job-name": job.job_name,
        "nodes": job.nodes,
        # One launcher task per node; torchrun forks the per-GPU ranks itself.
        "ntasks-per-node": 1,
        "gpus-per-node": gpus if gpus > 0 else None,
        "cpus-per-task": profile.cpus_per_node,
        "partition": job.partition or profile.partition,
        "account": job.account or profile.account,
        "time": job.time or profile.time,
        "chdir": job.workdir,
        "output": "%x-%j.out",
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives.items() if v is not None]
    lines += ["", "set -euo pipefail", ""]
    if profile.modules:
        lines += ["module purge"] + [f"module load {shlex.quote(m)}" for m in profile.modules]
    lines += [*profile.env_setup, *job.env_setup]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in profile.launch_env().items()]
    lines += [
        "",
        "# Rendezvous on the first node of the allocation.",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"MASTER_PORT={profile.rdzv_port}",
        'RDZV_ID="$SLURM_JOB_ID"',
        "export MASTER_ADDR MASTER_PORT RDZV_ID",
        "",
        launch_function(job, profile).rstrip("\n"),
        "export -f launch_node",
        "",
        shlex.join(_srun_argv(job, profile)) + " \\\n  bash -c 'NODE_RANK=$SLURM_NODEID launch_node'",
        "",
    ]
    return "\n".join(lines)


def _srun_argv(job: SlurmJob, profile: ClusterProfile) -> list[str]:
    argv = ["srun", f"--nodes={job.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if profile.container:
        argv.append(f"--container-image={profile.container}")
        if profile.container_mounts:
            argv.append(f"--container-mounts={','.join(profile.container_mounts)}")
    return argv


def submit(script: str, workdir: str | Path, job_name: str) -> str:
    """Write the script next to the job's outputs, ``sbatch`` it, return the job id."""
    path = Path(workdir) / f"{job_name}.sbatch"
    tmp = path.with_suffix(".sbatch.tmp")
    tmp.write_text(script)
    tmp.replace(path)
    try:
        done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ClusterError("sbatch not found: run `rgfusion submit slurm` on a Slurm login node, "
                           "or use --dry-run to print the script") from None
    if done.returncode != 0:
        raise ClusterError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    match = re.match(r"\s*(\d+)", done.stdout)
    if not match:
        raise ClusterError(f"sbatch printed no job id: {done.stdout.strip()!r}")
    return match.group(1)
