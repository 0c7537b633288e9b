"""A Ray Job through the Jobs API of a local Ray head (+ one worker node): Ray Train with two
workers and DeepSpeed (gloo), or the native engine, trains a tiny model; checkpoints land in the
test S3 endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_helpers import tiny_sets, write_tiny_data
from servers import start_ray_cluster

BIN = Path(sys.executable).parent


def rgfusion(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rgfusion"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    # The nodes inherit the test S3 credentials that s3_endpoint put in the environment.
    cluster = start_ray_cluster(worker_nodes=1, cpus_per_node=1, dashboard=True)
    yield cluster
    cluster.stop()


def test_ray_job_trains_with_two_workers_and_checkpoints_to_s3(ray_head, s3_endpoint, s3_bucket, tmp_path):
    import boto3

    data = write_tiny_data(tmp_path / "data")
    sets = tiny_sets({"data.url": data, "train.out_dir": f"{tmp_path}/run", "train.epochs": 2,
                      "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    done = rgfusion("submit", "ray", "--address", ray_head.dashboard, "--num-workers", "2",
                    "--storage-path", f"s3://{s3_bucket}/ray", "--name", "tiny", "--endpoint", s3_endpoint,
                    "--shared-path", str(tmp_path), *[a for s in sets for a in ("--set", s)],
                    "--wait", "--timeout", "480", timeout=540)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    job_id = re.search(r"submitted Ray job (\S+);", done.stdout).group(1)
    assert f"Ray job {job_id}: SUCCEEDED" in done.stdout
    assert "ray-train: done; epochs 2, best dev rsum" in done.stdout, done.stdout[-6000:]
    assert f"; checkpoints in s3://{s3_bucket}/ray/tiny/checkpoints" in done.stdout

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket=s3_bucket, Prefix="ray/tiny/")["Contents"]]
    assert "ray/tiny/checkpoints/latest" in keys
    # Both ranks' ZeRO optimizer shards, written by two Ray Train workers.
    assert any(k.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys), keys
    assert any(k.startswith("ray/tiny/checkpoints/step-") and k.endswith("COMPLETE.json") for k in keys)
    # Ray's own checkpoint of the final report records the training result.
    result_key = next(k for k in keys if k.endswith("/rgfusion_result.json"))
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key=result_key)["Body"]
    result = json.loads(body.read())
    assert result["status"] == "completed" and result["epochs"] == 2 and result["best_checkpoint"]

    status = rgfusion("jobs", "status", job_id, "--address", ray_head.dashboard)
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), status.stderr
    logs = rgfusion("jobs", "logs", job_id, "--address", ray_head.dashboard)
    assert "ray-train: done; epochs 2" in logs.stdout
    stop = rgfusion("jobs", "stop", job_id, "--address", ray_head.dashboard)
    assert stop.returncode == 0 and "already finished" in stop.stdout
    unknown = rgfusion("jobs", "status", "no-such-job", "--address", ray_head.dashboard)
    assert unknown.returncode == 1 and unknown.stderr.startswith("rgfusion: error: job no-such-job:")


def test_ray_job_on_the_native_engine(ray_head, s3_endpoint, s3_bucket, tmp_path):
    """Ray Train sets up the process group; the native engine's DDP runs in it."""
    import boto3

    data = write_tiny_data(tmp_path / "data")
    sets = tiny_sets({"data.url": data, "train.out_dir": f"{tmp_path}/run", "train.epochs": 1,
                      "tracking.enabled": "false", "train.engine": "native", "train.zero_stage": 0})
    done = rgfusion("submit", "ray", "--address", ray_head.dashboard, "--num-workers", "2",
                    "--storage-path", f"s3://{s3_bucket}/ray", "--name", "native", "--endpoint", s3_endpoint,
                    "--shared-path", str(tmp_path), *[a for s in sets for a in ("--set", s)],
                    "--wait", "--timeout", "300", timeout=360)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "ray-train: done; epochs 1" in done.stdout, done.stdout[-6000:]
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint)
            .list_objects_v2(Bucket=s3_bucket, Prefix="ray/native/checkpoints/")["Contents"]]
    assert any(k.endswith("/native_states.pt") for k in keys) and not any("optim_states" in k for k in keys), keys


def test_jobs_stop_ends_a_running_job(ray_head, tmp_path):
    import time

    done = rgfusion("submit", "ray", "--address", ray_head.dashboard, "--num-workers", "1",
                    "--storage-path", str(tmp_path / "ray"), "--set", f"data.url={tmp_path}/none")
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted Ray job (\S+);", done.stdout).group(1)
    stop = rgfusion("jobs", "stop", job_id, "--address", ray_head.dashboard)
    assert stop.returncode == 0 and f"{job_id}: stop requested" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.monotonic() + 120
    while True:
        status = rgfusion("jobs", "status", job_id, "--address", ray_head.dashboard).stdout
        if status.startswith(f"{job_id}: STOPPED") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status.startswith(f"{job_id}: STOPPED"), status


def test_unreachable_jobs_api_is_one_clear_error(tmp_path):
    done = rgfusion("submit", "ray", "--address", "http://127.0.0.1:1", "--storage-path", "s3://b/x",
                    "--num-workers", "1", "--set", f"data.url={tmp_path}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "rgfusion: error: cannot reach the Ray Jobs API at http://127.0.0.1:1")


def test_ray_submit_refuses_a_local_storage_path(tmp_path):
    done = rgfusion("submit", "ray", "--address", "http://127.0.0.1:1", "--storage-path", str(tmp_path / "ray"),
                    "--num-workers", "2", "--set", "data.url=s3://b/data", "--set", "checkpoint.dir=s3://b/ck",
                    "--set", "tracking.uri=http://mlflow:5000")
    assert done.returncode == 2
    assert f"--storage-path '{tmp_path}/ray' is a local path but the job spans 2 nodes" in done.stderr
