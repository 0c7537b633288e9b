"""End-to-end training runs on CPU: real processes (torchrun, gloo), real DeepSpeed ZeRO,
real checkpoints on disk and S3, real MLflow (SQLite file and a local ``mlflow server``).

Tiny synthetic data (96 train images, width 32) keeps every run to seconds of compute; most
of the time is process start-up (DeepSpeed, MLflow imports). The dev split has 3 shards, so
with 2 ranks one rank runs out of evaluation batches first and must keep stepping in lock-step
(ZeRO-3 gathers weights collectively in every forward).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import free_port, start_mlflow_server

BIN = Path(sys.executable).parent
SECRET = "pw-0f9e8d7c6b5a-do-not-leak"
LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT"}

# Tiny full model; all-negative loss throughout so the logged loss is one quantity to compare.
TINY = [
    "model.width=32", "model.heads=4", "model.map_heads=2", "model.text.word_dim=32",
    "data.num_workers=0", "data.shuffle_buffer=32", "data.max_words=16",
    "loss.warmup_steps=100000", "optim.lr=3.0e-3", "optim.warmup_steps=2", "optim.schedule=constant",
    "train.batch_size=16", "train.log_every=2", "train.progress=false", "eval.batch_size=12",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="module")
def data_url(tmp_path_factory) -> str:
    from rgfusion.datasets.synth import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    cfg = SynthConfig(train_images=96, dev_images=36, test_images=24, samples_per_shard=12, region_dim=16,
                      grid_dim=16, grid_size=(3, 3), max_regions=8)
    write_synthetic(cfg, str(root), progress=False)
    return str(root)


def launch(args: list[str], *, nproc: int = 1, cwd: Path, nnodes: int = 1, node_rank: int = 0,
           port: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``rgfusion ...`` as one process or under torchrun; its own process group (killable)."""
    if nproc == 1 and nnodes == 1:
        argv = [str(BIN / "python"), "-m", "rgfusion.trainer.cli", *args]
    else:
        argv = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
                "-m", "rgfusion.trainer.cli", *args]
    # A launcher's variables in this process (another test's run) must not leak into children.
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(cwd / f"log-{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun puts workers in new sessions)."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in reversed(victims):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(victims, timeout=30)
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"run did not finish in {timeout} s:\n{output(proc)[-4000:]}")
    return proc.returncode, output(proc)


def output(proc: subprocess.Popen) -> str:
    proc.log.flush()  # type: ignore[attr-defined]
    return Path(proc.log.name).read_text(errors="replace")  # type: ignore[attr-defined]


def train(cwd: Path, sets: list[str], *, nproc: int = 1, extra: list[str] = (), timeout: float = 300,
          env: dict[str, str] | None = None) -> tuple[int, str]:
    args = ["train", *[a for s in TINY + sets for a in ("--set", s)], *extra]
    return finish(launch(args, nproc=nproc, cwd=cwd, env=env), timeout)


def run_id_of(out: str) -> str:
    return re.findall(r"MLflow run ([0-9a-f]{32})", out)[-1]


def metric(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def assert_loss_falls(uri: str, run_id: str) -> None:
    losses = [v for _, v in sorted(metric(uri, run_id, "train/loss"))]
    assert len(losses) >= 4, losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def ckpt_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step-*") if (p / "COMPLETE.json").is_file())


@pytest.fixture(scope="module")
def zero2_run(data_url, tmp_path_factory):
    """Two processes, ZeRO-2 (the shipped preset), 2 epochs of 6 steps, checkpoints every 4."""
    cwd = tmp_path_factory.mktemp("zero2")
    uri = f"sqlite:///{cwd}/mlflow.db"
    sets = [f"data.url={data_url}", f"train.out_dir={cwd}/run", f"tracking.uri={uri}", "train.epochs=2",
            "train.deepspeed=deepspeed/zero2.yaml", "checkpoint.every_steps=4"]
    rc, out = train(cwd, sets, nproc=2)
    assert rc == 0, out[-4000:]
    return {"cwd": cwd, "uri": uri, "sets": sets, "out": out, "run_id": run_id_of(out), "ckpt": cwd / "run" / "checkpoints"}


def test_zero2_two_processes_train_evaluate_checkpoint(zero2_run):
    out, ckpt = zero2_run["out"], zero2_run["ckpt"]
    assert_loss_falls(zero2_run["uri"], zero2_run["run_id"])
    # Metrics are computed once per evaluation (rank 0), not once per rank.
    assert len(re.findall(r"scored dev: 36 images, 180 captions", out)) == 2
    assert len(metric(zero2_run["uri"], zero2_run["run_id"], "dev/rsum")) == 2
    tags = ckpt_tags(ckpt)
    assert (ckpt / "latest").read_text() == "step-00000012" and "step-00000012" in tags
    files = json.loads((ckpt / "step-00000012" / "COMPLETE.json").read_text())["files"]
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "meta.json", "client/rank-00001.json"} <= set(files)
    report = json.loads((zero2_run["cwd"] / "run" / "reports" / "test.json").read_text())
    assert report["protocols"]["all"]["rsum"] > 0 and "i2t_r1" in out.split("Test retrieval")[-1]


def test_resume_two_processes_on_one_via_universal_checkpoint(zero2_run):
    cwd = zero2_run["cwd"]
    sets = [s for s in zero2_run["sets"] if not s.startswith("train.epochs")] + ["train.epochs=3"]
    rc, out = train(cwd, sets, nproc=1, extra=["--resume", "auto"])
    assert rc == 0, out[-4000:]
    assert "converted step-00000012 to a universal checkpoint" in out
    assert "resumed from" in out and "at epoch 2, batch 0, step 12" in out
    assert run_id_of(out) == zero2_run["run_id"]
    steps = [s for s, _ in metric(zero2_run["uri"], zero2_run["run_id"], "dev/rsum")]
    assert steps == [6, 12, 18]


@pytest.fixture(scope="module")
def native_run(zero2_run, tmp_path_factory):
    """zero2_run's recipe on the native engine: two processes (DDP over gloo)."""
    cwd = tmp_path_factory.mktemp("native")
    uri = f"sqlite:///{cwd}/mlflow.db"
    sets = [s for s in zero2_run["sets"] if not s.startswith(("train.out_dir", "tracking.uri", "train.deepspeed"))]
    sets += [f"train.out_dir={cwd}/run", f"tracking.uri={uri}", "train.engine=native", "train.zero_stage=0"]
    rc, out = train(cwd, sets, nproc=2)
    assert rc == 0, out[-4000:]
    return {"cwd": cwd, "uri": uri, "sets": sets, "out": out, "run_id": run_id_of(out), "ckpt": cwd / "run" / "checkpoints"}


def test_native_engine_trains_as_deepspeed_does(native_run, zero2_run):
    """fp32 on CPU: the same losses and dev RSUM step for step as ZeRO-2, one state file per checkpoint."""
    def first_two_epochs(run: dict, key: str) -> dict[int, float]:
        # The resume tests may have added a third epoch to either run.
        return {s: v for s, v in metric(run["uri"], run["run_id"], key) if s <= 12}

    for key, tolerance in (("train/loss", {"rel": 1e-4}), ("dev/rsum", {"abs": 0.5})):
        native, zero2 = first_two_epochs(native_run, key), first_two_epochs(zero2_run, key)
        assert sorted(native) == sorted(zero2) and len(native) >= 2, key
        assert [native[s] for s in sorted(native)] == pytest.approx([zero2[s] for s in sorted(native)], **tolerance)
    files = json.loads((native_run["ckpt"] / "step-00000012" / "COMPLETE.json").read_text())["files"]
    assert {"native_states.pt", "meta.json", "client/rank-00001.json"} <= set(files)
    assert not any("optim_states" in f for f in files)
    assert not (native_run["cwd"] / "run" / "deepspeed.yaml").exists()


def test_native_resumes_on_another_world_size_without_conversion(native_run, data_url, tmp_path):
    sets = [s for s in native_run["sets"] if not s.startswith("train.epochs")] + ["train.epochs=3"]
    rc, out = train(native_run["cwd"], sets, nproc=1, extra=["--resume", "auto"])
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "at epoch 2, batch 0, step 12" in out and "universal" not in out
    assert [s for s, _ in metric(native_run["uri"], native_run["run_id"], "dev/rsum")] == [6, 12, 18]
    # A native checkpoint is no DeepSpeed one: the other engine refuses it in one line.
    args = ["train", "--set", f"data.url={data_url}", "--set", f"train.out_dir={tmp_path}/x",
            "--resume", str(native_run["ckpt"])]
    rc, out = finish(launch([*args, *[a for s in TINY for a in ("--set", s)]], cwd=tmp_path))
    errors = [line for line in out.splitlines() if line.startswith("rgfusion: error:")]
    assert rc == 2 and len(errors) == 1 and "written by train.engine=native" in errors[0], out[-2000:]


def test_cuda_graph_compile_is_refused_for_several_processes(data_url, tmp_path):
    sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", "tracking.enabled=false", "train.engine=native",
            "train.zero_stage=0", "train.compile=true", "train.compile_mode=reduce-overhead"]
    rc, out = train(tmp_path, sets, nproc=2)
    assert rc != 0 and "compile_mode=reduce-overhead runs one process only (world size here 2)" in out, out[-2000:]
    assert "epoch 1" not in out


def test_zero3_two_processes_and_eval_of_the_saved_model(data_url, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", f"tracking.uri={uri}", "train.epochs=2",
            "train.deepspeed=deepspeed/zero3.yaml", "checkpoint.every_steps=0"]
    rc, out = train(tmp_path, sets, nproc=2)
    assert rc == 0, out[-4000:]
    assert_loss_falls(uri, run_id_of(out))
    assert len(re.findall(r"scored dev:", out)) == 2
    best = (tmp_path / "run" / "checkpoints" / "best").read_text()
    folder = tmp_path / "run" / "checkpoints" / best
    assert (folder / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()
    test_rsum = json.loads((tmp_path / "run" / "reports" / "test.json").read_text())["protocols"]["all"]["rsum"]
    # The ZeRO-3 checkpoint and the consolidated export evaluate alone to the reported numbers.
    for source in (folder, tmp_path / "run" / "best"):
        rc, ev = finish(launch(["eval", "--checkpoint", str(source), "--split", "test",
                                "--report", str(tmp_path / "ev.json")], cwd=tmp_path))
        assert rc == 0, ev[-3000:]
        assert json.loads((tmp_path / "ev.json").read_text())["protocols"]["all"]["rsum"] == pytest.approx(test_rsum)


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (root / "latest").is_file():
            return (root / "latest").read_text()
        if proc.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint:\n{output(proc)[-3000:]}")
        time.sleep(0.05)
    kill_tree(proc)
    pytest.fail(f"no checkpoint after {timeout} s:\n{output(proc)[-3000:]}")


def test_sigkill_mid_epoch_then_resume_auto_continues_same_run(data_url, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", f"tracking.uri={uri}", "train.epochs=1",
            "train.steps_per_epoch=40", "checkpoint.every_steps=3", "checkpoint.keep_last=1"]
    args = ["train", *[a for s in TINY + sets for a in ("--set", s)]]
    proc = launch(args, nproc=2, cwd=tmp_path)
    root = tmp_path / "run" / "checkpoints"
    wait_for_checkpoint(proc, root)
    kill_tree(proc)  # launcher and both workers, no chance to clean up
    first = output(proc)
    kept = (root / "latest").read_text()
    step = int(kept.split("-")[1])
    assert 0 < step < 40, first[-2000:]

    rc, out = train(tmp_path, sets, nproc=2, extra=["--resume", "auto"])
    assert rc == 0, out[-4000:]
    assert f"resumed from {root}/{kept} at epoch 0, batch {step}, step {step}" in out
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(MlflowClient(uri).get_experiment_by_name("rgfusion").experiment_id)
    assert len(runs) == 1 and runs[0].info.run_id == run_id_of(first) == run_id_of(out)
    assert runs[0].info.status == "FINISHED"
    assert max(s for s, _ in metric(uri, runs[0].info.run_id, "train/loss")) == 40


def test_sigterm_checkpoints_and_exits_cleanly(data_url, tmp_path):
    sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "train.epochs=1", "train.steps_per_epoch=400", "checkpoint.every_steps=2", "train.zero_stage=0"]
    proc = launch(["train", *[a for s in TINY + sets for a in ("--set", s)]], cwd=tmp_path)
    root = tmp_path / "run" / "checkpoints"
    wait_for_checkpoint(proc, root)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 0, out[-3000:]
    m = re.search(r"pre-empted at step (\d+)", out)
    assert m, out[-3000:]
    assert (root / "latest").read_text() == f"step-{int(m.group(1)):08d}"
    assert ckpt_tags(root)[-1] == f"step-{int(m.group(1)):08d}"


def test_two_node_torchrun_on_localhost(data_url, tmp_path):
    port = free_port()
    sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "train.epochs=1", "checkpoint.every_steps=0"]
    args = ["train", *[a for s in TINY + sets for a in ("--set", s)]]
    nodes = [launch(args, nproc=1, nnodes=2, node_rank=r, port=port, cwd=tmp_path) for r in (0, 1)]
    results = [finish(p) for p in nodes]
    assert all(rc == 0 for rc, _ in results), "\n----\n".join(o[-2500:] for _, o in results)
    assert "Test retrieval at the best dev epoch" in results[0][1]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
    files = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "COMPLETE.json").read_text())["files"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files


def test_mlflow_server_with_s3_artifacts_and_checkpoints(data_url, tmp_path, s3_endpoint, s3_bucket):
    import boto3

    server = start_mlflow_server(tmp_path / "server", artifacts_destination=f"s3://{s3_bucket}/mlflow",
                                 s3_endpoint=s3_endpoint)
    try:
        ck = f"s3://{s3_bucket}/runs/ckpt"
        sets = [f"data.url={data_url}", f"train.out_dir={tmp_path}/run", f"tracking.uri={server.url}",
                "train.epochs=1", f"checkpoint.dir={ck}", "checkpoint.every_steps=4",
                f"checkpoint.storage_options={{client_kwargs: {{endpoint_url: '{s3_endpoint}'}}, "
                f"key: testing, secret: {SECRET}}}"]
        rc, out = train(tmp_path, sets)
        assert rc == 0, out[-4000:]
        run_id = run_id_of(out)
        rc, resumed = train(tmp_path, [s for s in sets if s != "train.epochs=1"] + ["train.epochs=2"],
                            extra=["--resume", "auto"])
        assert rc == 0, resumed[-4000:]
        assert run_id_of(resumed) == run_id and "resumed from s3://" in resumed
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        params = run.data.params
        assert params["train.epochs"] == "1" and params["model.width"] == "32"
        assert params["checkpoint.storage_options.secret"] == "***"
        assert {"train/loss", "train/lr", "train/pairs_per_s", "train/data_wait_share", "dev/rsum",
                "test/rsum", "train/skipped_steps", "train/grad_norm"} <= set(run.data.metrics)
        assert run.data.tags["world_size"] == "1" and run.data.tags["zero_stage"] == "2"
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "deepspeed.yaml", "reports", "best_model"} <= artifacts
        assert "best_model/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "best_model")}
    finally:
        server.stop()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)
    assert "runs/ckpt/latest" in keys and any(k.endswith("COMPLETE.json") for k in keys)
    # `rgfusion eval` reads the checkpoint root straight from the bucket: the latest checkpoint
    # (end of epoch 2) scores what the run logged for it.
    rc, ev = finish(launch(["eval", "--checkpoint", ck, "--split", "test", "--endpoint-url", s3_endpoint,
                            "--storage-options", json.dumps({"key": "testing", "secret": SECRET}),
                            "--report", str(tmp_path / "ev.json")], cwd=tmp_path))
    assert rc == 0, ev[-3000:]
    logged = float(re.findall(r"test rsum ([\d.]+)", resumed)[-1])
    assert json.loads((tmp_path / "ev.json").read_text())["protocols"]["all"]["rsum"] == pytest.approx(logged, abs=0.051)
    rc, missing = finish(launch(["eval", "--checkpoint", f"s3://{s3_bucket}/nowhere", "--endpoint-url", s3_endpoint,
                                 "--storage-options", '{"key": "testing", "secret": "x"}'], cwd=tmp_path))
    assert rc == 2 and "no model.safetensors, meta.json or latest pointer there" in missing, missing[-2000:]
    # The secret never reached params (above), logs or written configs.
    assert SECRET not in out + resumed + ev
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json")]
    assert written and all(SECRET not in p.read_text(errors="replace") for p in written)


def test_bad_input_fails_before_training(zero2_run, data_url, tmp_path):
    cases = [
        (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
        (["--set", f"data.url={tmp_path}/missing"], "no dataset manifest"),
        (["--set", f"data.url={data_url}", "--set", "model.width=64", "--set", f"train.out_dir={tmp_path}/x",
          "--resume", str(zero2_run["ckpt"])], "different model config"),
    ]
    for args, needle in cases:
        rc, out = finish(launch(["train", *args, "--set", "train.progress=false"], cwd=tmp_path))
        assert rc == 2, out[-2000:]
        errors = [line for line in out.splitlines() if line.startswith("rgfusion: error:")]
        assert len(errors) == 1 and needle in errors[0], out[-2000:]
        assert "model.width: checkpoint 32, this run 64" in errors[0] or "--resume" not in args
        assert "epoch 1" not in out and not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_demo_main_job(tmp_path):
    """`rgfusion demo`: synthetic data -> full model -> evaluation -> table + MLflow run (~1.5 min)."""
    rc, out = finish(launch(["demo", "--out", str(tmp_path / "demo")], cwd=tmp_path), timeout=900)
    assert rc == 0, out[-4000:]
    table = out.split("Test retrieval at the best dev epoch")[-1]
    rsum = float(re.search(r"test\s+all(?:\s+[\d.]+){6}\s+([\d.]+)", table).group(1))
    assert rsum > 400, table  # the full model learns the synthetic scenes (522 when recorded)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/demo/mlflow.db" in out
    run_id = run_id_of(out)
    assert metric(f"sqlite:///{tmp_path}/demo/mlflow.db", run_id, "test/rsum")
    assert (tmp_path / "demo" / "best" / "model.safetensors").is_file()
