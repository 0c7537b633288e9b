"""Cluster profiles: what differs between clusters, kept out of the recipes.

A profile (``configs/cluster/<name>.yaml``) says how a job gets onto a cluster's nodes:
partition and account, the modules or container that provide the software, shell lines that
prepare the environment, where the shared object store and the MLflow server are, and which
filesystem prefixes every node sees. Recipes stay portable; the profile is the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rgfusion.configs import RECIPES_DIR, ConfigError, from_dict, read_recipe

PROFILES_DIR = RECIPES_DIR / "cluster"

# NCCL/PyTorch settings every multi-node launch starts from; a profile's ``nccl`` entries
# override them one by one.
DEFAULT_NCCL_ENV: dict[str, str] = {
    # NVLink SHARP multicast needs fabric-manager support that many nodes lack; when it is
    # missing NCCL fails at communicator creation, so it is opt-in.
    "NCCL_NVLS_ENABLE": "0",
    # A rank that dies must abort the collective on the others instead of hanging the job.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Warnings only: INFO floods the log with one topology dump per rank.
    "NCCL_DEBUG": "WARN",
}


@dataclass
class ClusterProfile:
    """One cluster's site settings (a ``configs/cluster/*.yaml`` file)."""

    # Shown in job names and error messages.
    name: str = "default"
    # Slurm partition and account; None leaves the choice to the site's defaults.
    partition: str | None = None
    account: str | None = None
    # Wall-clock limit when the command line gives none (Slurm's D-HH:MM:SS syntax).
    time: str = "24:00:00"
    # GPUs per node when the command line gives none.
    gpus_per_node: int = 8
    # CPU cores for the one launcher task per node (data loader workers live under it).
    cpus_per_node: int = 32
    # ``module load`` names, in order (e.g. a CUDA and an NCCL module).
    modules: list[str] = field(default_factory=list)
    # Container image for srun (pyxis/enroot ``--container-image``); None runs on the host.
    container: str | None = None
    # ``--container-mounts`` entries (src:dst) so the container sees shared filesystems.
    container_mounts: list[str] = field(default_factory=list)
    # Shell lines run before the launcher on every node (activate a venv, set proxies, ...).
    env_setup: list[str] = field(default_factory=list)
    # Extra environment variables exported to every rank (e.g. NCCL_SOCKET_IFNAME).
    env: dict[str, str] = field(default_factory=dict)
    # Overrides of DEFAULT_NCCL_ENV (a value of "" unsets that variable).
    nccl: dict[str, str] = field(default_factory=dict)
    # S3-compatible endpoint of the site's object store, exported for s3fs/boto3 and MLflow.
    object_store_endpoint: str | None = None
    # MLflow tracking server every node reaches; None keeps the recipe's URI.
    tracking_uri: str | None = None
    # Filesystem prefixes mounted on every node (Lustre, NFS home, ...): local paths under
    # them are fine for shards and checkpoints of a multi-node job.
    shared_paths: list[str] = field(default_factory=list)
    # TCP port of the torchrun rendezvous store on the first node.
    rdzv_port: int = 29500

    def launch_env(self) -> dict[str, str]:
        """Environment variables the job exports on every node, in a stable order."""
        nccl = {**DEFAULT_NCCL_ENV, **{k: str(v) for k, v in self.nccl.items()}}
        out = {k: v for k, v in nccl.items() if v != ""}
        if self.object_store_endpoint:
            # boto3 (via s3fs) reads AWS_ENDPOINT_URL; MLflow's artifact client its own variable.
            out["AWS_ENDPOINT_URL"] = self.object_store_endpoint
            out["MLFLOW_S3_ENDPOINT_URL"] = self.object_store_endpoint
        if self.tracking_uri:
            out["MLFLOW_TRACKING_URI"] = self.tracking_uri
        out.update({k: str(v) for k, v in self.env.items()})
        return out


def load_profile(name_or_path: str | None) -> ClusterProfile:
    """A profile by file path or by name under ``configs/cluster/``; None is the default one."""
    if name_or_path is None:
        return ClusterProfile()
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(f"cluster profile not found: {name_or_path} (known: {known})")
    data = read_recipe(path)
    data.setdefault("name", path.stem)
    return from_dict(ClusterProfile, data, str(path))
