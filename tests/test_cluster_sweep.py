"""Ray Tune sweeps on a two-node Ray cluster (head + worker on this machine) with a real
``mlflow server``, and ``rgfusion compare`` on the runs the sweep created."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster_helpers import TINY, write_tiny_data
from servers import start_mlflow_server, start_ray_cluster
from rgfusion.cluster import sweep as sw
from rgfusion.configs import ConfigError

BIN = Path(sys.executable).parent
EPOCHS = 4
GOOD_LR = (3.0e-3, 2.0e-3)


def rgfusion(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(BIN / "rgfusion"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ray_two_nodes():
    cluster = start_ray_cluster(worker_nodes=1, cpus_per_node=1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A folder both Ray "nodes" see (they are one machine), declared in the sweeps' shared_paths."""
    root = tmp_path_factory.mktemp("shared")
    write_tiny_data(root / "data")
    return root


def base_fields(shared: Path, mlflow_url: str, name: str, **over) -> dict:
    return {"name": name, "recipe": "default.yaml",
            "fixed": {**TINY, "data.url": str(shared / "data"), "train.epochs": EPOCHS},
            "tracking_uri": mlflow_url, "experiment": "sweep-test", "storage_path": str(shared / "sweeps"),
            "shared_paths": [str(shared)], "resources": {"cpu": 1}, **over}


@pytest.fixture(scope="module")
def asha_sweep(ray_two_nodes, mlflow_server, shared):
    """Four trials: two learning rates that learn, two that cannot; ASHA must cut the latter."""
    path = write_sweep(shared / "asha.yaml", **base_fields(
        shared, mlflow_server.url, "asha",
        space={"optim.lr": {"grid": [*GOOD_LR, 1.0e-9, 1.0e-10]}}, num_trials=4,
        scheduler={"grace_period": 1, "reduction_factor": 2}))
    done = rgfusion("sweep", "--config", str(path), "--address", ray_two_nodes.address)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    parent = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                "tags.`rgfusion.sweep` = 'asha' and tags.`rgfusion.kind` = 'sweep'")
    assert len(parent) == 1
    return {"out": done.stdout, "path": path, "client": client, "parent": parent[0],
            "dir": shared / "sweeps" / "asha"}


def test_sweep_on_two_nodes_asha_nested_mlflow_runs_best_recipe(asha_sweep):
    out, client, parent = asha_sweep["out"], asha_sweep["client"], asha_sweep["parent"]
    assert "2 Ray node(s), up to 2 concurrent trials" in out  # derived from 2 × 1 CPU
    children = sw.trial_runs(client, parent.info.run_id)
    assert len(children) == 4
    assert {c.data.params["optim.lr"] for c in children} == {"0.003", "0.002", "1e-09", "1e-10"}
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    epochs = {c.data.params["optim.lr"]: len(client.get_metric_history(c.info.run_id, "dev/rsum")) for c in children}
    stopped = [c for c in children if c.data.tags.get("rgfusion.stopped_early") == "true"]
    assert stopped, epochs
    assert all(epochs[c.data.params["optim.lr"]] < EPOCHS and c.info.status == "KILLED" for c in stopped)
    assert max(epochs.values()) == EPOCHS
    assert all(c.info.status == "FINISHED" for c in children if c not in stopped)
    assert "stopped by ASHA at epoch" in out
    # The best trial's resolved config: a stand-alone recipe that loads and names a good lr.
    from rgfusion.trainer.config import load_config

    best = asha_sweep["dir"] / "best.yaml"
    cfg = load_config(str(best))
    assert cfg.optim.lr in GOOD_LR and cfg.train.epochs == EPOCHS and cfg.tracking.parent_run_id is None
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert {"best.yaml", "summary.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    best_child = client.get_run(parent.data.tags["rgfusion.best_run_id"])
    assert float(best_child.data.params["optim.lr"]) == cfg.optim.lr
    assert parent.data.metrics["best/dev_rsum"] == max(
        m.value for m in client.get_metric_history(best_child.info.run_id, "dev/rsum"))


def test_resume_of_a_finished_sweep_keeps_its_parent_run(asha_sweep, ray_two_nodes):
    done = rgfusion("sweep", "--config", str(asha_sweep["path"]), "--address", ray_two_nodes.address, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parent_id = asha_sweep["parent"].info.run_id
    assert f"MLflow parent run {parent_id}" in done.stdout
    assert len(sw.trial_runs(asha_sweep["client"], parent_id)) == 4


def test_failed_trial_is_recorded_failed_and_the_sweep_goes_on(ray_two_nodes, mlflow_server, shared):
    fields = base_fields(shared, mlflow_server.url, "fail", num_trials=2,
                         space={"data.url": {"grid": [str(shared / "missing"), str(shared / "data")]}})
    fields["fixed"]["train.epochs"] = 1
    path = write_sweep(shared / "fail.yaml", **fields)
    done = rgfusion("sweep", "--config", str(path), "--address", ray_two_nodes.address)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    client = mlflow_server_client(mlflow_server)
    parent = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                "tags.`rgfusion.sweep` = 'fail' and tags.`rgfusion.kind` = 'sweep'")[0]
    children = {c.data.params["data.url"]: c for c in sw.trial_runs(client, parent.info.run_id)}
    failed = children[str(shared / "missing")]
    assert failed.info.status == "FAILED" and "no dataset manifest" in failed.data.tags["rgfusion.error"]
    assert children[str(shared / "data")].info.status == "FINISHED"
    assert "| failed |" in done.stdout


@pytest.mark.slow
def test_multi_worker_trial_is_a_ray_train_run_across_both_nodes(ray_two_nodes, mlflow_server, shared):
    fields = base_fields(shared, mlflow_server.url, "workers", num_trials=1, space={"optim.lr": {"choice": [3.0e-3]}},
                         resources={"cpu": 0.5, "workers": 2})
    fields["fixed"]["train.epochs"] = 2
    done = rgfusion("sweep", "--config", str(write_sweep(shared / "workers.yaml", **fields)),
                    "--address", ray_two_nodes.address)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "up to 1 concurrent trials" in done.stdout and "| completed |" in done.stdout
    client = mlflow_server_client(mlflow_server)
    parent = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                                "tags.`rgfusion.sweep` = 'workers' and tags.`rgfusion.kind` = 'sweep'")[0]
    (child,) = sw.trial_runs(client, parent.info.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["world_size"] == "2"
    assert child.data.tags["launcher"] == "ray"


@pytest.mark.slow
def test_interrupted_sweep_resumes(ray_two_nodes, mlflow_server, shared):
    """Kill the sweep's driver after its first trial reported; --resume finishes both trials."""
    import signal
    import time

    fields = base_fields(shared, mlflow_server.url, "resume", num_trials=2, max_concurrent=1,
                         space={"optim.lr": {"grid": [3.0e-3, 2.0e-3]}}, scheduler={"grace_period": EPOCHS})
    path = write_sweep(shared / "resume.yaml", **fields)
    log = open(shared / "resume-1.log", "w+")
    first = subprocess.Popen([str(BIN / "rgfusion"), "sweep", "--config", str(path), "--address", ray_two_nodes.address],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results = shared / "sweeps" / "resume" / "tune"
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size for p in results.glob("*/result.json")):
        assert first.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-4000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = rgfusion("sweep", "--config", str(path), "--address", ray_two_nodes.address, "--resume")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    state = yaml.safe_load((shared / "sweeps" / "resume" / sw.STATE_FILE).read_text())
    assert f"MLflow parent run {state['parent_run_id']}" in done.stdout
    assert done.stdout.count("| completed |") == 2
    client = mlflow_server_client(mlflow_server)
    children = sw.trial_runs(client, state["parent_run_id"])
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert sorted(c.data.params["optim.lr"] for c in children if c.info.status == "FINISHED") == ["0.002", "0.003"]


def mlflow_server_client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(server.url)


def test_multinode_sweep_refuses_sqlite_tracking(ray_two_nodes, shared, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", **base_fields(
        shared, f"sqlite:///{tmp_path}/m.db", "sqlite", space={"optim.lr": {"choice": [1.0e-3]}}, num_trials=1))
    done = rgfusion("sweep", "--config", str(path), "--address", ray_two_nodes.address)
    assert done.returncode == 2
    assert f"MLflow tracking URI 'sqlite:///{tmp_path}/m.db' is not a tracking server" in done.stderr
    assert not (tmp_path / "m.db").exists()


def test_unreachable_ray_address_is_one_clear_error(tmp_path, shared):
    path = write_sweep(tmp_path / "s.yaml", **base_fields(
        shared, "http://127.0.0.1:1", "x", space={"optim.lr": {"choice": [1.0e-3]}}, num_trials=1))
    done = rgfusion("sweep", "--config", str(path), "--address", "127.0.0.1:1", timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("rgfusion: error: cannot reach the Ray cluster at 127.0.0.1:1")


# -- sweep files: checked before anything starts ---------------------------------------------------

@pytest.mark.parametrize("space, needle", [
    ({"optim.lrr": {"loguniform": [1.0e-4, 1.0e-2]}}, "sweep space 'optim.lrr' = 0.0001: .*unknown key 'optim.lrr'"),
    ({"model.pooling": {"choice": ["map", "attention"]}}, "sweep space 'model.pooling' = 'attention': .*must be one of"),
    ({"optim.lr": {"loguniform": [0, 1.0e-2]}}, "space 'optim.lr': loguniform needs 0 < low < high"),
    ({"optim.lr": {"normal": [0, 1]}}, "space 'optim.lr': expected one of"),
    ({"optim.lr": {"choice": []}}, "space 'optim.lr': choice needs a non-empty list"),
])
def test_bad_space_is_one_clear_error(tmp_path, space, needle):
    path = write_sweep(tmp_path / "s.yaml", name="x", recipe="default.yaml", space=space)
    with pytest.raises(ConfigError, match=needle):
        sw.load_sweep(str(path))


def test_grid_must_divide_num_trials_and_packaged_sweeps_load(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", name="x", recipe="default.yaml", num_trials=3,
                       space={"loss.margin": {"grid": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="num_trials=3 is not a multiple of the grid's 2 points"):
        sw.load_sweep(str(path))
    for name in ("lr_margin", "fusion_grid"):
        assert sw.load_sweep(f"sweeps/{name}.yaml").space


def test_optuna_search_is_checked(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", name="x", recipe="default.yaml", search={"algorithm": "optuna"},
                       num_trials=2, space={"loss.margin": {"grid": [0.1, 0.2]}})
    with pytest.raises(ConfigError, match="optuna cannot expand 'grid' entries"):
        sw._searcher(sw.load_sweep(str(path)))
    path = write_sweep(tmp_path / "s.yaml", name="x", recipe="default.yaml", search={"algorithm": "optuna", "seed": 1},
                       space={"loss.margin": {"uniform": [0.1, 0.3]}})
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the optuna package"):
            sw._searcher(sw.load_sweep(str(path)))
    else:
        assert type(sw._searcher(sw.load_sweep(str(path)))).__name__ == "OptunaSearch"


def test_max_concurrent_follows_cluster_resources():
    assert sw.derive_max_concurrent({"CPU": 16, "GPU": 4}, sw.TrialResources(cpu=2, gpu=1)) == 4
    assert sw.derive_max_concurrent({"CPU": 16}, sw.TrialResources(cpu=3)) == 5
    # A Train trial holds its workers plus the controller's CPU.
    assert sw.derive_max_concurrent({"CPU": 40, "GPU": 8}, sw.TrialResources(cpu=4, gpu=1, workers=4)) == 2
    with pytest.raises(ConfigError, match="one trial needs .*GPU.*but the Ray cluster has"):
        sw.derive_max_concurrent({"CPU": 8}, sw.TrialResources(cpu=1, gpu=1))


def test_summary_table_ranks_trials():
    rows = [{"trial_id": "a", "status": "completed", "params": {"optim.lr": 0.001}, "best_dev_rsum": 200.0,
             "epochs": 4, "run_id": "r1"},
            {"trial_id": "b", "status": "failed", "params": {"optim.lr": 0.1}, "best_dev_rsum": None,
             "epochs": 0, "run_id": None},
            {"trial_id": "c", "status": "stopped by ASHA at epoch 1", "params": {"optim.lr": 1e-9},
             "best_dev_rsum": 150.5, "epochs": 1, "run_id": "r3"}]
    lines = sw.format_summary(rows, ["optim.lr"]).splitlines()
    assert lines[0] == "| trial | optim.lr | best dev rsum | epochs | status | mlflow run |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a", "| c", "| b"]
    assert "| c | 1e-09 | 150.50 | 1 | stopped by ASHA at epoch 1 | r3 |" in lines


# -- compare ------------------------------------------------------------------------------------

def test_compare_sweep_children_against_mlflow(asha_sweep, mlflow_server, tmp_path):
    client, parent = asha_sweep["client"], asha_sweep["parent"]
    out = tmp_path / "cmp"
    done = rgfusion("compare", "--parent", parent.info.run_id, "--tracking-uri", mlflow_server.url,
                    "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "compare.csv").open()))
    children = {c.info.run_id: c for c in sw.trial_runs(client, parent.info.run_id)}
    assert {r["run_id"] for r in rows} == set(children)
    # Only optim.lr differs by choice (out_dir, run names and tags are bookkeeping).
    header = list(rows[0])
    assert header[4] == "optim.lr" and "train.out_dir" not in header and "dev/rsum" in header
    for r in rows:
        run = children[r["run_id"]]
        assert r["optim.lr"] == run.data.params["optim.lr"] and r["status"] == run.info.status
        assert float(r["dev/rsum"]) == pytest.approx(run.data.metrics["dev/rsum"])
        assert float(r["test/rsum"]) == pytest.approx(run.data.metrics["test/rsum"])
        assert r["url"] == f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    ranked = [float(r["dev/rsum"]) for r in rows]
    assert ranked == sorted(ranked, reverse=True) and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    markdown = (out / "compare.md").read_text()
    assert f"]({rows[0]['url']})" in markdown.splitlines()[2] and done.stdout.startswith(markdown.splitlines()[0])
    png = (out / "dev_rsum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_by_experiment_filter_and_by_ids(asha_sweep, mlflow_server, tmp_path):
    children = sw.trial_runs(asha_sweep["client"], asha_sweep["parent"].info.run_id)
    done = rgfusion("compare", "--experiment", "sweep-test", "--filter",
                    "params.`optim.lr` = '0.003' and tags.`rgfusion.sweep` = 'asha'",
                    "--tracking-uri", mlflow_server.url, "--out", str(tmp_path / "a"), timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "a" / "compare.csv").open()))
    assert [r["run_id"] for r in rows] == [c.info.run_id for c in children if c.data.params["optim.lr"] == "0.003"]
    ids = [c.info.run_id for c in children[:2]]
    done = rgfusion("compare", "--runs", ",".join(ids), "--tracking-uri", mlflow_server.url,
                    "--out", str(tmp_path / "b"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert {r["run_id"] for r in csv.DictReader((tmp_path / "b" / "compare.csv").open())} == set(ids)
    done = rgfusion("compare", "--experiment", "nope", "--tracking-uri", mlflow_server.url, timeout=120)
    assert done.returncode == 2 and "MLflow experiment 'nope' not found" in done.stderr
