"""Ray Jobs: submit a Ray Train run to a cluster through the Jobs API, and follow it.

``submit`` uploads the resolved recipe as the job's working directory and starts the
entrypoint ``rgfusion ray-train`` on the head node. That driver runs a ``TorchTrainer`` whose
workers each call the trainer's ``train(config)``: Ray has already joined them into one
process group (gloo on CPU, NCCL on GPU), the trainer builds its DeepSpeed engine on it and
takes the device from Ray's context. Ray's run state goes to the shared ``storage_path``;
the trainer's DeepSpeed checkpoints go under it too, unless the recipe names a
``checkpoint.dir``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rgfusion.cluster.checks import ClusterError
from rgfusion.configs import from_dict, to_dict

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The training result inside the Ray checkpoint of the final report.
RESULT_FILE = "rgfusion_result.json"


class RayUnreachable(ClusterError):
    """The Ray dashboard (Jobs API) or cluster did not answer."""


@dataclass
class RayTrainSpec:
    """How the Ray Train run is laid out on the cluster."""

    # Ray Train workers = DeepSpeed ranks.
    num_workers: int = 2
    # One GPU per worker (NCCL); False trains on CPU with gloo.
    use_gpu: bool = False
    # CPU cores reserved per worker (its data loader workers run inside this budget).
    cpus_per_worker: float = 1.0
    # Shared fsspec URL (s3://bucket/prefix) every node reaches: Ray's run state and, by
    # default, the DeepSpeed checkpoints.
    storage_path: str = ""
    # Run name: the folder under storage_path.
    name: str = "rgfusion"


def job_client(address: str) -> Any:
    """A Jobs API client; one clear error when the dashboard does not answer."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayUnreachable(f"cannot reach the Ray Jobs API at {address}: {first}") from None


def entrypoint(spec: RayTrainSpec, recipe: str) -> str:
    argv = ["rgfusion", "ray-train", "--config", recipe, "--num-workers", str(spec.num_workers),
            "--cpus-per-worker", str(spec.cpus_per_worker), "--storage-path", spec.storage_path,
            "--name", spec.name]
    return shlex.join(argv + (["--use-gpu"] if spec.use_gpu else []))


def submit(address: str, config: Any, spec: RayTrainSpec, env: dict[str, str]) -> str:
    """Submit the job; returns its submission id."""
    client = job_client(address)
    workdir = Path(tempfile.mkdtemp(prefix="rgfusion-job-"))
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return client.submit_job(
        entrypoint=entrypoint(spec, "recipe.yaml"),
        submission_id=f"rgfusion-{spec.name}-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(workdir), "env_vars": env},
        metadata={"rgfusion.name": spec.name},
    )


def wait(address: str, job_id: str, *, timeout: float | None = None, follow: bool = True) -> str:
    """Stream the job's logs (if ``follow``) until it ends; its final status."""
    client = job_client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if follow:
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(1.0)


# -- the job's driver: runs on the cluster -----------------------------------------------------

def storage(storage_path: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """Ray Train's (path, filesystem) for an fsspec URL, so s3fs options (endpoint) apply."""
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(storage_path, **storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_ray_train(config: Any, spec: RayTrainSpec, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Train with ``spec.num_workers`` Ray Train workers; the final report (plus Ray's checkpoint path)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not config.checkpoint.dir:
        config.checkpoint.dir = f"{spec.storage_path.rstrip('/')}/{spec.name}/checkpoints"
        config.checkpoint.storage_options = config.checkpoint.storage_options or storage_options
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    path, fs = storage(spec.storage_path, storage_options)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": to_dict(config)},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                               resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=spec.name, storage_path=path, storage_filesystem=fs),
    )
    result = trainer.fit()
    return {**(result.metrics or {}), "ray_checkpoint": result.checkpoint.path if result.checkpoint else None}


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer's ``train`` with per-epoch metrics reported to Ray.

    The DeepSpeed checkpoints are the trainer's (every rank saves into config.checkpoint.dir,
    a shared URL); the final report hands Ray a small checkpoint that records the training
    result and where those checkpoints are, so ``Result.checkpoint`` leads to them.
    """
    import ray.train

    from rgfusion.trainer import train
    from rgfusion.trainer.config import RunConfig

    config = from_dict(RunConfig, loop_config["config"], "ray-train")
    where = {"checkpoint_dir": config.checkpoint_dir}

    def report(metrics: dict[str, Any]) -> None:
        # Every rank reports: Ray Train synchronises reports across workers.
        ray.train.report({**_numeric(metrics), **where})

    result = train(config, on_eval=report)
    final = {**_numeric(result), "epoch": result["epochs"], **where}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def object_store_options() -> dict[str, Any]:
    """fsspec options for the object store named by ``AWS_ENDPOINT_URL`` (a profile sets it)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
