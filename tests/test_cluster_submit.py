"""Job submission: the Slurm script (rendered, syntax-checked, its per-node launch run for two
"nodes" on 127.0.0.1), DeepSpeed hostfiles and launcher command, reachability checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_helpers import tiny_sets, write_tiny_data
from servers import free_port
from rgfusion.cluster import deepspeed_launch as dl
from rgfusion.cluster import slurm
from rgfusion.cluster.checks import check_multinode, is_shared_location
from rgfusion.cluster.profiles import DEFAULT_NCCL_ENV, ClusterProfile, load_profile
from rgfusion.configs import ConfigError

BIN = Path(sys.executable).parent


def rgfusion(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rgfusion"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_profiles_load_and_export_nccl_defaults():
    gpu = load_profile("slurm_gpu")
    env = gpu.launch_env()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    container = load_profile("slurm_container")
    env = container.launch_env()
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == container.object_store_endpoint
    assert env["MLFLOW_TRACKING_URI"] == container.tracking_uri
    # A profile may switch a default off entirely.
    assert "NCCL_DEBUG" not in ClusterProfile(nccl={"NCCL_DEBUG": ""}).launch_env()
    assert set(DEFAULT_NCCL_ENV) <= set(ClusterProfile().launch_env())
    with pytest.raises(ConfigError, match="cluster profile not found: nope .*known: .*slurm_gpu"):
        load_profile("nope")


def test_sbatch_script_is_valid_bash_with_one_launcher_per_node(tmp_path):
    job = slurm.SlurmJob(config="configs/x y.yaml", overrides=["optim.lr=1.0e-4", "model.pooling=gpo"], nodes=4,
                         gpus_per_node=8, job_name="fus", workdir=str(tmp_path), env_setup=["echo ready"])
    script = slurm.render_sbatch(job, load_profile("slurm_container"))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    lines = script.splitlines()
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --partition=gpu" in lines
    assert "export NCCL_NVLS_ENABLE=0" in lines
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert slurm.launch_function(job, load_profile("slurm_container")) in script
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--nodes=4" in srun and "--container-image=nvcr.io#nvidia/pytorch:24.08-py3" in srun
    assert "'configs/x y.yaml'" in script  # quoted for the shell
    assert "--set optim.lr=1.0e-4 --set model.pooling=gpo" in script


def test_dry_run_cli_prints_script_and_submit_reads_job_id(tmp_path):
    data = f"{tmp_path}/shared/data"
    args = ["submit", "slurm", "--nodes", "2", "--profile", "local", "--shared-path", str(tmp_path),
            "--workdir", str(tmp_path), "--set", f"data.url={data}", "--set", "tracking.uri=http://mlflow:5000",
            "--set", f"train.out_dir={tmp_path}/run"]
    done = rgfusion(*args, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash") and f"data.url={data}" in done.stdout
    # sbatch itself is a site tool: a stand-in prints what the real one prints with --parsable.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho \"4242;cluster\"\n")
    (fake / "sbatch").chmod(0o755)
    done = rgfusion(*args, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert "submitted Slurm job 4242" in done.stdout
    assert (tmp_path / "rgfusion.sbatch").read_text().startswith("#!/bin/bash")


def test_multinode_submit_refuses_local_paths_and_warns_without_tracking_server(tmp_path):
    done = rgfusion("submit", "slurm", "--nodes", "2", "--dry-run", "--set", f"data.url={tmp_path}/data",
                    cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert "warning: MLflow tracking URI '(unset)' is not a tracking server" in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("rgfusion: error:")]
    assert len(error) == 1 and f"data.url '{tmp_path}/data' is a local path but the job spans 2 nodes" in error[0]
    assert "checkpoint dir 'runs/default/checkpoints' is a local path" in error[0]
    # One node: anything goes.
    assert rgfusion("submit", "slurm", "--nodes", "1", "--dry-run", cwd=tmp_path).returncode == 0


def test_shared_location_rules():
    assert is_shared_location("s3://bucket/x") and is_shared_location("gs://b/x")
    assert not is_shared_location("/data/x") and not is_shared_location("file:///data/x")
    assert is_shared_location("/lustre/u/x", ["/lustre"]) and not is_shared_location("/lustre2/x", ["/lustre"])
    found = check_multinode(nodes=2, locations={"a": "s3://b/a"}, tracking_uri="sqlite:///m.db",
                            require_tracking_server=True)
    assert [f.level for f in found] == ["error"] and "sqlite:///m.db" in found[0].message
    assert check_multinode(nodes=1, locations={"a": "/x"}, tracking_uri=None) == []


def test_hostfile_parsing_and_deepspeed_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # spare\n")
    hosts = dl.parse_hostfile(hostfile)
    assert hosts == [dl.Host("node-a", 8), dl.Host("node-b", 8)]
    argv = dl.launcher_argv(hostfile, hosts, "configs/x.yaml", ["optim.lr=1.0e-4"], master_port=29600)
    assert argv[:7] == ["deepspeed", f"--hostfile={hostfile}", "--num_nodes=2", "--master_addr=node-a",
                        "--master_port=29600", "--launcher=pdsh", "--no_local_rank"]
    assert argv[7:] == ["--no_python", "rgfusion", "train", "--config", "configs/x.yaml", "--set", "optim.lr=1.0e-4"]
    # A single host is launched locally, without DeepSpeed's ssh probe.
    assert "--no_ssh_check" in dl.launcher_argv(hostfile, hosts[:1], "x.yaml", [], master_port=1)
    env_file = dl.write_env_file(tmp_path / ".deepspeed_env", {"NCCL_NVLS_ENABLE": "0"})
    assert env_file.read_text() == "NCCL_NVLS_ENABLE=0\n"


@pytest.mark.parametrize("text, needle", [
    ("node-a slots=8\nnode-b slots8\n", "hosts:2: bad hostfile line 'node-b slots8'"),
    ("node-a slots=0\n", "hosts:1: slots must be >= 1"),
    ("node-a slots=2\nnode-a slots=2\n", "hosts:2: host 'node-a' is listed twice"),
    ("# nothing\n", "hostfile lists no hosts"),
])
def test_bad_hostfile_is_one_clear_error(tmp_path, text, needle):
    (tmp_path / "hosts").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        dl.parse_hostfile(tmp_path / "hosts")
    done = rgfusion("submit", "deepspeed", "--hostfile", str(tmp_path / "hosts"), "--dry-run")
    assert done.returncode == 2 and done.stderr.count("rgfusion: error:") == 1 and needle.split(": ", 1)[-1] in done.stderr


def test_deepspeed_dry_run_prints_the_launcher_command(tmp_path):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    done = rgfusion("submit", "deepspeed", "--hostfile", str(tmp_path / "hosts"), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deepspeed --hostfile=") and "--no_python rgfusion train --config default.yaml" in done.stdout


def test_slurm_launch_lines_train_two_nodes_on_localhost(tmp_path):
    """The script's own ``launch_node`` run twice, as srun would on two nodes, with NODE_RANK 0/1."""
    data = write_tiny_data(tmp_path / "data")
    sets = tiny_sets({"data.url": data, "train.out_dir": f"{tmp_path}/run", "train.epochs": 1,
                      "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    job = slurm.SlurmJob(config="default.yaml", overrides=sets, nodes=2, gpus_per_node=1, workdir=str(tmp_path))
    profile = load_profile("local")
    script = slurm.render_sbatch(job, profile)
    function = slurm.launch_function(job, profile)
    assert function in script
    port = free_port()
    env = {**os.environ, **profile.launch_env(), "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "RDZV_ID": "test-job"}
    logs = [open(tmp_path / f"node{r}.log", "w+") for r in (0, 1)]
    nodes = [subprocess.Popen(["bash", "-c", f"set -euo pipefail\n{function}launch_node"], cwd=tmp_path,
                              env={**env, "NODE_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT,
                              start_new_session=True) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    out = [Path(f.name).read_text() for f in logs]
    assert codes == [0, 0], "\n-----\n".join(o[-3000:] for o in out)
    assert "Test retrieval at the best dev epoch" in "".join(out)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*/meta.json"))
    assert checkpoints and json.loads(checkpoints[-1].read_text())["world_size"] == 2


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_ranks_on_localhost(tmp_path):
    """``rgfusion submit deepspeed`` for real: DeepSpeed's launcher over a one-host hostfile."""
    data = write_tiny_data(tmp_path / "data")
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    sets = tiny_sets({"data.url": data, "train.out_dir": f"{tmp_path}/run", "train.epochs": 1,
                      "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db"})
    done = subprocess.run([str(BIN / "rgfusion"), "submit", "deepspeed", "--hostfile", str(tmp_path / "hosts"),
                           "--profile", "local", "--master-port", str(free_port()),
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=400,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (tmp_path / ".deepspeed_env").read_text().startswith("NCCL_NVLS_ENABLE=0\n")
    meta = sorted((tmp_path / "run" / "checkpoints").glob("step-*/meta.json"))
    assert meta and json.loads(meta[-1].read_text())["world_size"] == 2
