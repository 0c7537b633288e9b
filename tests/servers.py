"""Real local servers for tests, as plain functions (fixtures in test files wrap them).

``start_mlflow_server`` runs ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts in a
folder or an S3 bucket) and waits for its /health; ``start_ray_cluster`` starts a Ray head and
worker "nodes" on this machine. Every wait is bounded and fails with the server's own log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_mlflow_server(
    workdir: Path,
    *,
    artifacts_destination: str | None = None,
    s3_endpoint: str | None = None,
    timeout: float = 120.0,
) -> MlflowServer:
    """``mlflow server`` with a SQLite store under ``workdir``; artifacts in S3 or a folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "mlflow-server.log"
    env = dict(os.environ)
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    argv = [
        str(BIN / "python"), "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.5)


def loopback_only_ray() -> None:
    """Keep every Ray connection of this process and its children on 127.0.0.1.

    ``ray.init(address="127.0.0.1:P")`` (and a Ray Job's driver) rewrites a loopback address
    to the machine's outward IP before connecting; Ray's switch for single-machine platforms
    stops that. The variable reaches node processes started later; the constant covers a Ray
    this process already imported.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if "ray" in sys.modules:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False


@dataclass
class RayCluster:
    """A Ray cluster of several "nodes" on this machine (``ray.cluster_utils.Cluster``).

    ``address`` is for ``ray.init``; ``dashboard`` (when started) for the Jobs API.
    ``stop`` removes exactly the nodes this cluster started, nobody else's Ray.
    """

    cluster: object
    address: str
    dashboard: str | None

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()


def start_ray_cluster(*, worker_nodes: int = 0, cpus_per_node: int = 1, dashboard: bool = False) -> RayCluster:
    """A head plus ``worker_nodes`` worker nodes, all on 127.0.0.1, ``cpus_per_node`` CPUs each.

    Node processes inherit this process's environment; the venv's bin/ is put first on PATH
    so Ray Jobs entrypoints find the ``rgfusion`` command.
    """
    loopback_only_ray()
    from ray.cluster_utils import Cluster

    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    head = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1", "include_dashboard": dashboard}
    dash_port = free_port()
    if dashboard:
        head.update(dashboard_host="127.0.0.1", dashboard_port=dash_port)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(worker_nodes):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        url = f"http://127.0.0.1:{dash_port}" if dashboard else None
        if url:
            _wait_http(f"{url}/api/version", 120.0, None)
    except BaseException:
        cluster.shutdown()
        raise
    return RayCluster(cluster, cluster.address, url)


def _wait_http(url: str, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                detail = _tail(log) if log else ""
                raise RuntimeError(f"{url} did not answer in {timeout:.0f} s ({e}){detail}") from None
        time.sleep(0.5)
