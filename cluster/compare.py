"""``rgfusion compare``: a ranked table of MLflow runs, the params that differ, a dev-RSUM plot.

Runs come from an experiment (optionally narrowed by an MLflow filter string), from a sweep's
children (``--parent``), or from explicit ids. Each row links to the run in the MLflow UI. The
table is written as Markdown and CSV; dev RSUM per epoch of every selected run goes to a PNG.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rgfusion.configs import ConfigError

RANK_BY = "dev/rsum"
# Final metrics shown per run, when logged (the trainer's ``dev/...`` and ``test/...`` names).
METRICS = ("dev/rsum", "test/rsum", "dev/i2t_r1", "dev/t2i_r1", "test/i2t_r1", "test/t2i_r1")
# Params that differ between runs by construction (where a run writes, what it is called),
# not by choice of recipe: left out of the "what differs" columns.
BOOKKEEPING = ("tracking.", "train.out_dir", "train.progress", "checkpoint.dir", "checkpoint.resume")


@dataclass
class Row:
    run_id: str
    name: str
    status: str
    url: str
    params: dict[str, str]
    metrics: dict[str, float]


def select_runs(client: Any, *, experiment: str | None, filter_string: str | None = None,
                parent: str | None = None, run_ids: list[str] | None = None) -> list[Any]:
    """MLflow runs to compare; sweep parent runs themselves are left out."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        try:
            return [client.get_run(i) for i in run_ids]
        except MlflowException as e:
            raise ConfigError(f"--runs: {e.message}") from None
    if parent:
        try:
            experiment_ids = [client.get_run(parent).info.experiment_id]
        except MlflowException as e:
            raise ConfigError(f"--parent: {e.message}") from None
    else:
        if not experiment:
            raise ConfigError("name runs with --experiment, --parent or --runs")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"MLflow experiment '{experiment}' not found at {client.tracking_uri}")
        experiment_ids = [exp.experiment_id]
    clauses = [c for c in (filter_string, parent and f"tags.mlflow.parentRunId = '{parent}'") if c]
    try:
        runs = client.search_runs(experiment_ids, " and ".join(clauses), max_results=10000)
    except MlflowException as e:
        raise ConfigError(f"--filter {filter_string!r}: {e.message}") from None
    return [r for r in runs if r.data.tags.get("rgfusion.kind") != "sweep"]


def differing_params(param_sets: list[dict[str, str]]) -> list[str]:
    """Keys whose value (absence counts as a value) is not the same in every run."""
    keys = sorted(set().union(*param_sets)) if param_sets else []
    return [k for k in keys if not k.startswith(BOOKKEEPING) and len({p.get(k) for p in param_sets}) > 1]


def rank(rows: list[Row], key: str = RANK_BY) -> list[Row]:
    """Best first by ``key`` (higher is better); runs without it last."""
    return sorted(rows, key=lambda r: -r.metrics.get(key, -math.inf))


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI's address: the server itself, or a local ``mlflow ui`` on its default port."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def build_rows(runs: list[Any], ui: str) -> tuple[list[Row], list[str], list[str]]:
    """(ranked rows, differing param keys, metric columns present)."""
    keys = differing_params([r.data.params for r in runs])
    present = [m for m in METRICS if any(m in r.data.metrics for r in runs)]
    rows = [Row(run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], status=r.info.status,
                url=run_url(ui, r.info.experiment_id, r.info.run_id),
                params={k: r.data.params.get(k, "") for k in keys},
                metrics={m: r.data.metrics[m] for m in present if m in r.data.metrics}) for r in runs]
    return rank(rows), keys, present


def to_markdown(rows: list[Row], keys: list[str], metrics: list[str]) -> str:
    head = ["rank", "run", "status", *keys, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        cells = [str(i), f"[{r.name}]({r.url})", r.status, *(r.params[k] for k in keys),
                 *(_num(r.metrics.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_csv(rows: list[Row], keys: list[str], metrics: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "run_id", "run_name", "status", *keys, *metrics, "url"])
    for i, r in enumerate(rows, 1):
        w.writerow([i, r.run_id, r.name, r.status, *(r.params[k] for k in keys),
                    *(r.metrics.get(m, "") for m in metrics), r.url])
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def epoch_curve(client: Any, run_id: str, key: str = RANK_BY) -> list[tuple[float, float]]:
    """(epoch, value) of ``key``: the trainer logs it and ``epoch`` at the same step."""
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    points = [(epochs.get(m.step, float(i + 1)), m.value)
              for i, m in enumerate(sorted(client.get_metric_history(run_id, key), key=lambda m: m.step))]
    return sorted(points)


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev RSUM")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize="small")
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def compare(tracking_uri: str, out_dir: str | Path, *, experiment: str | None = None,
            filter_string: str | None = None, parent: str | None = None,
            run_ids: list[str] | None = None) -> dict[str, Any]:
    """Select, tabulate, rank and plot; returns the table and written paths."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = select_runs(client, experiment=experiment, filter_string=filter_string, parent=parent, run_ids=run_ids)
    if not runs:
        raise ConfigError("no runs matched")
    rows, keys, metrics = build_rows(runs, ui_base(tracking_uri))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, keys, metrics)
    paths = {"markdown": _write(out / "compare.md", markdown + "\n"),
             "csv": _write(out / "compare.csv", to_csv(rows, keys, metrics))}
    curves = {r.name: epoch_curve(client, r.run_id) for r in rows}
    paths["plot"] = plot(curves, out / "dev_rsum.png", f"dev RSUM per epoch ({len(rows)} runs)")
    return {"rows": rows, "params": keys, "metrics": metrics, "markdown": markdown, "paths": paths}


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
