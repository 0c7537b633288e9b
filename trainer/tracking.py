"""MLflow tracking on rank 0 (other ranks get a tracker that does nothing).

The resolved config (secrets redacted) becomes flattened params; step metrics, per-epoch
dev/test metrics, system metrics, tags and artifacts follow. A resumed run continues the
same MLflow run id. Tracking failures are logged and never stop training.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from rgfusion.configs import flatten
from rgfusion.trainer.config import TrackingConfig
from rgfusion.trainer.redact import redact, redact_text

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow rejects longer param values.
MAX_PARAM_CHARS = 6000


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def is_local_store(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def git_commit() -> str | None:
    """Commit of the source tree this code runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """Flattened, redacted config as MLflow params (strings within MLflow's size limit)."""
    flat = flatten(redact(config))
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in flat.items()}


class Tracker:
    """Rank 0's MLflow run; a no-op object elsewhere or when tracking is disabled."""

    def __init__(self, cfg: TrackingConfig, *, active: bool):
        self.cfg = cfg
        self.active = active and cfg.enabled
        self.run_id: str | None = None
        self.uri = resolve_uri(cfg)

    def start(self, *, run_id: str | None, config: dict[str, Any], tags: dict[str, Any]) -> str | None:
        """Start (or, with ``run_id``, continue) the run; params only on a fresh run."""
        if not self.active:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        if run_id is not None and not self._exists(run_id):
            log.warning("MLflow run %s not found at %s; starting a new run", run_id, redact_text(self.uri))
            run_id = None
        experiment_id = None if run_id else self._experiment_id()
        parent = self.cfg.parent_run_id
        run_tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **self.cfg.tags}
        if parent and not run_id:
            run_tags["mlflow.parentRunId"] = parent
        run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=self.cfg.run_name,
                               nested=mlflow.active_run() is not None, tags=run_tags,
                               log_system_metrics=self.cfg.system_metrics)
        self.run_id = run.info.run_id
        if run_id is None:
            self._safe(mlflow.log_params, params_of(config))
        else:
            self._safe(mlflow.set_tags, run_tags)
        log.info("MLflow run %s at %s", self.run_id, redact_text(self.uri))
        return self.run_id

    def _exists(self, run_id: str) -> bool:
        import mlflow

        try:
            mlflow.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException for unknown ids
            return False

    def _experiment_id(self) -> str:
        import mlflow
        from mlflow.exceptions import MlflowException

        exp = mlflow.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if is_local_store(self.uri):
            location = self.cfg.artifact_location or Path("mlartifacts").resolve().as_uri()
        try:
            return mlflow.create_experiment(self.cfg.experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            return mlflow.get_experiment_by_name(self.cfg.experiment).experiment_id

    def _safe(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must not kill training
            log.warning("MLflow %s failed: %s", getattr(fn, "__name__", "call"), redact_text(str(e))[:300])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or self.run_id is None:
            return
        import mlflow

        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None}
        self._safe(mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or self.run_id is None:
            return
        import mlflow

        p = Path(path)
        if p.is_dir():
            self._safe(mlflow.log_artifacts, str(p), artifact_path)
        elif p.is_file():
            self._safe(mlflow.log_artifact, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active or self.run_id is None:
            return
        import mlflow

        self._safe(mlflow.end_run, status=status)

    def ui_hint(self) -> str | None:
        """How to open the MLflow UI on this run."""
        if self.run_id is None:
            return None
        if is_local_store(self.uri):
            import mlflow

            exp = mlflow.get_run(self.run_id).info.experiment_id
            return (f"mlflow ui --backend-store-uri {redact_text(self.uri)} --port 5000  "
                    f"# then open http://127.0.0.1:5000/#/experiments/{exp}/runs/{self.run_id}")
        return f"open {redact_text(self.uri).rstrip('/')}/#/runs/{self.run_id}"
