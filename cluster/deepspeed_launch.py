"""``rgfusion submit deepspeed``: DeepSpeed's multi-node launcher over the hosts of a hostfile.

The launcher reaches the other hosts itself (pdsh/ssh by default) and forwards the variables
listed in ``DS_ENV_FILE``; we write the profile's NCCL/object-store/MLflow environment there so
every rank sees the same site settings.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rgfusion.cluster.checks import ClusterError
from rgfusion.cluster.profiles import ClusterProfile
from rgfusion.cluster.slurm import train_argv
from rgfusion.configs import ConfigError

_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+)\s+slots=(?P<slots>\d+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: str | Path) -> list[Host]:
    """Hosts in DeepSpeed's ``name slots=N`` format; one clear error per bad line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"hostfile not found: {p}")
    hosts: list[Host] = []
    for number, raw in enumerate(p.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m:
            raise ConfigError(f"{p}:{number}: bad hostfile line {raw.strip()!r} (expected 'HOSTNAME slots=N')")
        host = Host(m["host"], int(m["slots"]))
        if host.slots < 1:
            raise ConfigError(f"{p}:{number}: slots must be >= 1 for host '{host.name}'")
        if any(h.name == host.name for h in hosts):
            raise ConfigError(f"{p}:{number}: host '{host.name}' is listed twice")
        hosts.append(host)
    if not hosts:
        raise ConfigError(f"{p}: hostfile lists no hosts")
    return hosts


def launcher_argv(
    hostfile: str | Path,
    hosts: list[Host],
    config: str,
    overrides: list[str],
    *,
    master_port: int,
    launcher: str = "pdsh",
) -> list[str]:
    """The ``deepspeed`` command; rendezvous on the first host of the hostfile."""
    return [
        "deepspeed",
        f"--hostfile={hostfile}",
        f"--num_nodes={len(hosts)}",
        f"--master_addr={hosts[0].name}",
        f"--master_port={master_port}",
        f"--launcher={launcher}",
        # Ranks read LOCAL_RANK from the environment; no argv surgery in the trainer.
        "--no_local_rank",
        # One host is launched locally: DeepSpeed's ssh probe would only refuse a machine
        # without an ssh server to itself.
        *(["--no_ssh_check"] if len(hosts) == 1 else []),
        "--no_python",
        *train_argv(config, overrides),
    ]


def write_env_file(path: str | Path, env: dict[str, str]) -> Path:
    """``KEY=VALUE`` lines the launcher exports on every host (DeepSpeed's .deepspeed_env format)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    tmp.replace(p)
    return p


def run(argv: list[str], profile: ClusterProfile, workdir: str | Path) -> int:
    """Run the launcher in the foreground with the profile's environment; its exit code."""
    env_file = write_env_file(Path(workdir) / ".deepspeed_env", profile.launch_env())
    env = {**os.environ, **profile.launch_env(), "DS_ENV_FILE": str(env_file)}
    try:
        return subprocess.run(argv, env=env, cwd=workdir).returncode
    except FileNotFoundError:
        raise ClusterError("the 'deepspeed' launcher is not on PATH (pip install deepspeed)") from None
