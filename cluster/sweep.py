"""``rgfusion sweep``: Ray Tune over dotted recipe fields, ASHA on dev RSUM, MLflow parent/child runs.

A sweep file (``configs/sweeps/*.yaml``) names a base recipe, fixed overrides and a search
space; each trial is the trainer's ``train(config)`` on the resolved recipe, reporting dev RSUM
after every evaluation so ASHA can stop weak trials early. The sweep is one MLflow parent run
(created, with its experiment, before any trial starts) and every trial a nested child run.
At the end the best trial's resolved config is written as a recipe YAML and logged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rgfusion.cluster.checks import check_multinode, is_tracking_server, report
from rgfusion.configs import ConfigError, from_dict, load, read_recipe, set_dotted, to_dict

METRIC = "dev_rsum"  # what ASHA and the best-trial choice maximise
TIME_ATTR = "epoch"  # ASHA's clock: epochs, as reported by the trainer after each evaluation
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
STATE_FILE = "sweep_state.json"


@dataclass
class SearchConfig:
    """How trial parameters are drawn."""

    # random: Tune's variant generator (random draws and grid expansion); optuna: TPE over
    # the same space (needs the optuna package; no grid entries).
    algorithm: Literal["random", "optuna"] = "random"
    # Seed of the draws, so a sweep can be repeated.
    seed: int | None = None


@dataclass
class SchedulerConfig:
    """ASHA on dev RSUM, in epochs."""

    # Epochs every trial runs before it may be stopped (early RSUM is noisy).
    grace_period: int = 1
    # Each rung keeps the best 1/reduction_factor of the trials that reached it.
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError("grace_period must be >= 1 and reduction_factor >= 2")


@dataclass
class TrialResources:
    """What one trial reserves."""

    # CPU cores and GPUs per worker.
    cpu: float = 1.0
    gpu: float = 0.0
    # Workers per trial: 1 trains in the trial's own process; more makes the trial a Ray Train
    # run with DeepSpeed across that many workers.
    workers: int = 1

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.gpu < 0 or self.workers < 1 or self.cpu + self.gpu == 0:
            raise ValueError("resources need cpu or gpu > 0 and workers >= 1")

    def trial_reserve(self) -> dict[str, float]:
        """What Tune reserves for the trial itself: everything when it trains in-process; one
        CPU for the Train controller otherwise (its workers reserve their own)."""
        return {"cpu": self.cpu, "gpu": self.gpu} if self.workers == 1 else {"cpu": 1.0}

    def bundle(self) -> dict[str, float]:
        """What the cluster must hold for one trial (a Train run adds its controller's CPU)."""
        extra = 1.0 if self.workers > 1 else 0.0
        return {"CPU": self.cpu * self.workers + extra, "GPU": self.gpu * self.workers}


@dataclass
class SweepConfig:
    """A sweep file."""

    name: str
    # Base recipe of every trial (path, or a name under the packaged configs/).
    recipe: str
    # Search space: dotted recipe field -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} |
    # {choice: [...]} | {grid: [...]}.
    space: dict[str, Any]
    # Dotted recipe fields every trial sets (e.g. shorter epochs for the sweep).
    fixed: dict[str, Any] = field(default_factory=dict)
    # Trials in total (with grid entries: a multiple of the grid's size).
    num_trials: int = 8
    # Trials running at once; None = as many as the cluster's CPUs/GPUs hold.
    max_concurrent: int | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    # MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else the trainer's local SQLite default
    # (refused when the Ray cluster has more than one node).
    tracking_uri: str | None = None
    # MLflow experiment of the parent and trial runs; None = the base recipe's.
    experiment: str | None = None
    # Tune's state (for --resume) and the trials' output folders: a shared URL or shared
    # path on multi-node clusters.
    storage_path: str = "runs/sweeps"
    # Local paths every node mounts (see the cluster profiles' shared_paths).
    shared_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_trials < 1 or (self.max_concurrent is not None and self.max_concurrent < 1):
            raise ValueError("num_trials and max_concurrent must be >= 1")
        if not self.space:
            raise ValueError("space is empty: name at least one dotted recipe field to search")


# -- the space ---------------------------------------------------------------------------------

def parse_dimension(key: str, spec: Any) -> tuple[str, list[Any]]:
    """``{kind: args}`` of one space entry, checked; one clear error per bad entry."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"space '{key}': expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space '{key}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("loguniform", "uniform"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"space '{key}': {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"space '{key}': {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, "
                              f"got {args!r}")
    return kind, args


def candidate_values(kind: str, args: list[Any]) -> list[Any]:
    """Values that stand for the dimension when checking it against the recipe."""
    return [float(a) for a in args] if kind in ("loguniform", "uniform") else list(args)


def validate_space(space: dict[str, Any], base_tree: dict[str, Any], source: str) -> None:
    """Every dimension names an existing recipe field and every value fits its type."""
    from rgfusion.trainer.config import RunConfig

    for key, spec in space.items():
        kind, args = parse_dimension(key, spec)
        for value in candidate_values(kind, args):
            tree = copy.deepcopy(base_tree)
            set_dotted(tree, key, value)
            try:
                from_dict(RunConfig, tree, source)
            except ConfigError as e:
                raise ConfigError(f"sweep space '{key}' = {value!r}: {e}") from None


def grid_size(space: dict[str, Any]) -> int:
    return math.prod(len(spec["grid"]) for spec in space.values() if "grid" in spec)


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    build = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
             "choice": tune.choice, "grid": tune.grid_search}
    return {key: build[kind](args) for key, (kind, args) in
            ((k, parse_dimension(k, v)) for k, v in space.items())}


def samples_per_grid_point(sweep: SweepConfig) -> int:
    """Tune's num_samples: trials are num_samples × grid points."""
    points = grid_size(sweep.space)
    if sweep.num_trials % points:
        raise ConfigError(f"num_trials={sweep.num_trials} is not a multiple of the grid's {points} points")
    return sweep.num_trials // points


def derive_max_concurrent(cluster: dict[str, float], resources: TrialResources) -> int:
    """Trials the cluster's CPUs and GPUs hold at once."""
    need = resources.bundle()
    fits = [int(cluster.get(name, 0.0) // amount) for name, amount in need.items() if amount > 0]
    n = min(fits)
    if n < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        raise ConfigError(f"one trial needs {need} but the Ray cluster has {have}")
    return n


# -- trial configs -----------------------------------------------------------------------------

def base_tree(sweep: SweepConfig) -> dict[str, Any]:
    """The base recipe with the sweep's fixed fields applied."""
    tree = read_recipe(sweep.recipe)
    for key, value in sweep.fixed.items():
        set_dotted(tree, key, value)
    return tree


def trial_tree(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(tree, key, value)
    return tree


@dataclass
class TrialContext:
    """What every trial needs from the driver (sent once through Ray's object store)."""

    sweep: str
    base: dict[str, Any]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials_dir: str
    resources: TrialResources
    # The sweep's folder/URL under the storage path (Ray Train runs of multi-worker trials).
    storage_path: str


def trial_config(ctx: TrialContext, params: dict[str, Any], trial_id: str) -> Any:
    """The trial's RunConfig: base + params, nested under the sweep's MLflow run."""
    from rgfusion.trainer.config import RunConfig

    tree = trial_tree(ctx.base, params)
    set_dotted(tree, "train.out_dir", f"{ctx.trials_dir}/{trial_id}")
    set_dotted(tree, "train.progress", False)
    # A restarted trial (after --resume) continues from its own latest checkpoint, if any.
    set_dotted(tree, "checkpoint.resume", "auto")
    set_dotted(tree, "tracking.uri", ctx.tracking_uri)
    set_dotted(tree, "tracking.experiment", ctx.experiment)
    set_dotted(tree, "tracking.parent_run_id", ctx.parent_run_id)
    set_dotted(tree, "tracking.run_name", f"{ctx.sweep}-{trial_id}")
    set_dotted(tree, "tracking.tags", {**tree.get("tracking", {}).get("tags", {}),
                                       "rgfusion.sweep": ctx.sweep, "rgfusion.trial_id": trial_id})
    return from_dict(RunConfig, tree, f"sweep {ctx.sweep} trial {trial_id}")


def best_recipe(base: dict[str, Any], params: dict[str, Any], sweep: str) -> dict[str, Any]:
    """The best trial's full resolved config as a stand-alone recipe (no sweep bookkeeping)."""
    from rgfusion.trainer.config import RunConfig

    tree = to_dict(from_dict(RunConfig, trial_tree(base, params), f"sweep {sweep} best trial"))
    tree["train"]["out_dir"] = f"runs/{sweep}-best"
    return tree


# -- the trial ---------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: train, reporting dev RSUM per evaluation; failures recorded in MLflow."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    try:
        config = trial_config(ctx, params, trial_id)
        if ctx.resources.workers > 1:
            _train_distributed(config, ctx, trial_id)
        else:
            _train_here(config)
    except Exception as e:  # ASHA's stop is a SystemExit out of tune.report: not a failure
        mark_failed(ctx, trial_id, params, e)
        raise


def _train_here(config: Any) -> None:
    """Train in the trial's process. The last epoch is reported only once ``train`` returned:
    ASHA answers a report at max_t with "stop", which would cut the run's wrap-up (final
    checkpoint, test report, MLflow status) short."""
    from ray import tune

    from rgfusion.trainer import train

    final: dict[str, float] = {}

    def on_eval(metrics: dict[str, Any]) -> None:
        numeric = _tune_metrics(metrics)
        if numeric[TIME_ATTR] < config.train.epochs:
            tune.report(numeric)
        else:
            final.update(numeric)

    train(config, on_eval=on_eval)
    if final:
        tune.report(final)


def _tune_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _train_distributed(config: Any, ctx: TrialContext, trial_id: str) -> None:
    """A trial spanning several workers: Ray Train + DeepSpeed, results relayed to Tune."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from rgfusion.cluster.ray_jobs import _worker, object_store_options, storage

    res = ctx.resources
    use_gpu = res.gpu > 0
    path, fs = storage(ctx.storage_path, object_store_options())
    TorchTrainer(
        _worker,
        train_loop_config={"config": to_dict(config)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": res.cpu, "GPU": res.gpu}),
        run_config=ray.train.RunConfig(name=f"train-{trial_id}", storage_path=path, storage_filesystem=fs,
                                       callbacks=[TuneReportCallback()]),
    ).fit()


def mark_failed(ctx: TrialContext, trial_id: str, params: dict[str, Any], error: BaseException) -> None:
    """The trial's MLflow child run ends FAILED with the error (created if training never began)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    runs = trial_runs(client, ctx.parent_run_id, trial_id)
    if runs:
        run_id = runs[0].info.run_id
    else:
        experiment = client.get_experiment_by_name(ctx.experiment)
        run_id = client.create_run(
            experiment.experiment_id, run_name=f"{ctx.sweep}-{trial_id}",
            tags={"mlflow.parentRunId": ctx.parent_run_id, "rgfusion.sweep": ctx.sweep,
                  "rgfusion.trial_id": trial_id}).info.run_id
        for key, value in params.items():
            client.log_param(run_id, key, str(value))
    client.set_tag(run_id, "rgfusion.error", f"{type(error).__name__}: {error}"[:5000])
    client.set_terminated(run_id, status="FAILED")


def trial_runs(client: Any, parent_run_id: str, trial_id: str | None = None) -> list[Any]:
    """The sweep's child runs (of one trial, if given)."""
    parent = client.get_run(parent_run_id)
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`rgfusion.trial_id` = '{trial_id}'"
    return client.search_runs([parent.info.experiment_id], query, max_results=10000)


# -- the driver --------------------------------------------------------------------------------

def load_sweep(path: str, overrides: list[str] = ()) -> SweepConfig:
    sweep = load(SweepConfig, path, list(overrides))
    base = base_tree(sweep)
    validate_space(sweep.space, base, f"{path}")
    samples_per_grid_point(sweep)
    return sweep


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (None: a new local Ray); one clear error if unreachable."""
    import ray

    if ray.is_initialized():
        return
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            from rgfusion.cluster.ray_jobs import RayUnreachable

            raise RayUnreachable(f"cannot reach the Ray cluster at {address}: {e}") from None
    ray.init(address=address, include_dashboard=False if address is None else None, logging_level="WARNING")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def run_sweep(sweep: SweepConfig, *, address: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary (best trial, rows, paths)."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rgfusion.trainer.config import RunConfig
    from rgfusion.trainer.redact import redact_text
    from rgfusion.trainer.tracking import resolve_uri

    base = base_tree(sweep)
    base_cfg = from_dict(RunConfig, copy.deepcopy(base), sweep.recipe)
    uri = resolve_uri(dataclasses.replace(base_cfg.tracking, uri=sweep.tracking_uri or base_cfg.tracking.uri))
    connect(address)
    nodes = alive_nodes()
    storage_root = _absolute(sweep.storage_path)
    report(check_multinode(nodes=nodes, tracking_uri=uri, shared_paths=sweep.shared_paths,
                           require_tracking_server=True,
                           locations={"data.url": base_cfg.data.url, "storage_path": storage_root}))
    max_concurrent = sweep.max_concurrent or derive_max_concurrent(ray.cluster_resources(), sweep.resources)
    print(f"sweep {sweep.name}: {nodes} Ray node(s), up to {max_concurrent} concurrent trials, "
          f"MLflow {redact_text(uri)}", flush=True)
    if not is_tracking_server(uri) and max_concurrent > 1:
        print(f"rgfusion: warning: {max_concurrent} concurrent trials writing to {redact_text(uri)}; SQLite may lock "
              "('database is locked'): prefer an MLflow tracking server", file=sys.stderr, flush=True)

    sweep_root = f"{storage_root.rstrip('/')}/{sweep.name}"
    # Local outputs (trial folders, best recipe, summary): under the storage path when it is a
    # folder, else under runs/sweeps/ here.
    out = Path(sweep_root if "://" not in sweep_root else Path("runs/sweeps").resolve() / sweep.name)
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment = sweep.experiment or base_cfg.tracking.experiment
    state = _parent_run(client, out, sweep, experiment, resume)
    ctx = TrialContext(sweep=sweep.name, base=base, tracking_uri=uri, experiment=experiment,
                       parent_run_id=state["parent_run_id"], trials_dir=str(out / "trials"),
                       resources=sweep.resources, storage_path=sweep_root)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), sweep.resources.trial_reserve())
    tune_path = f"{sweep_root}/tune"
    if resume:
        if not tune.Tuner.can_restore(tune_path):
            raise ConfigError(f"--resume: no sweep state at {tune_path}")
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.space),
            tune_config=tune.TuneConfig(
                num_samples=samples_per_grid_point(sweep), max_concurrent_trials=max_concurrent,
                search_alg=_searcher(sweep),
                scheduler=ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max",
                                        max_t=base_cfg.train.epochs, grace_period=sweep.scheduler.grace_period,
                                        reduction_factor=sweep.scheduler.reduction_factor)),
            run_config=tune.RunConfig(name="tune", storage_path=sweep_root, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    return _finish(sweep, client, ctx, grid, out, max_t=base_cfg.train.epochs)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _searcher(sweep: SweepConfig) -> Any:
    if sweep.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.search.seed)
    if grid_size(sweep.space) > 1:
        raise ConfigError("search.algorithm optuna cannot expand 'grid' entries; use 'choice' or algorithm random")
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search.algorithm optuna needs the optuna package (pip install optuna)") from None
    return OptunaSearch(metric=METRIC, mode="max", seed=sweep.search.seed)


def _parent_run(client: Any, out: Path, sweep: SweepConfig, experiment: str, resume: bool) -> dict[str, str]:
    """The sweep's MLflow run, created (with its experiment) before any trial starts."""
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=sweep.name,
                            tags={"rgfusion.sweep": sweep.name, "rgfusion.kind": "sweep"})
    run_id = run.info.run_id
    for key, value in {"recipe": sweep.recipe, "num_trials": sweep.num_trials,
                       "search.algorithm": sweep.search.algorithm,
                       "scheduler.grace_period": sweep.scheduler.grace_period,
                       "scheduler.reduction_factor": sweep.scheduler.reduction_factor,
                       **{f"space.{k}": json.dumps(v) for k, v in sweep.space.items()},
                       **{f"fixed.{k}": v for k, v in sweep.fixed.items()}}.items():
        client.log_param(run_id, key, str(value)[:6000])
    state = {"parent_run_id": run_id, "experiment_id": experiment_id}
    _write_atomic(state_path, json.dumps(state, indent=2))
    return state


def _finish(sweep: SweepConfig, client: Any, ctx: TrialContext, grid: Any, out: Path, *, max_t: int) -> dict[str, Any]:
    """Close the trials' and the sweep's MLflow runs, write the best recipe and the summary."""
    rows = [_row(client, ctx, result, max_t) for result in grid]
    # Nothing of a finished sweep still runs: a child left RUNNING was cut off (an interrupted
    # sweep's trial that restarted into a new run, a killed worker).
    for run in trial_runs(client, ctx.parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    finished = [r for r in rows if r["best_dev_rsum"] is not None]
    summary: dict[str, Any] = {"parent_run_id": ctx.parent_run_id, "rows": rows, "best": None}
    if finished:
        best = max(finished, key=lambda r: r["best_dev_rsum"])
        recipe = best_recipe(ctx.base, best["params"], sweep.name)
        path = _write_atomic(out / "best.yaml", f"# best trial {best['trial_id']} of sweep {sweep.name} "
                             f"(dev rsum {best['best_dev_rsum']:.2f})\n" + yaml.safe_dump(recipe, sort_keys=False))
        client.log_artifact(ctx.parent_run_id, str(path))
        client.log_metric(ctx.parent_run_id, "best/dev_rsum", best["best_dev_rsum"])
        client.set_tag(ctx.parent_run_id, "rgfusion.best_trial", best["trial_id"])
        if best["run_id"]:
            client.set_tag(ctx.parent_run_id, "rgfusion.best_run_id", best["run_id"])
        summary.update(best=best, best_config=str(path))
    table = format_summary(rows, list(sweep.space))
    summary["table"] = table
    summary_path = _write_atomic(out / "summary.md", table + "\n")
    client.log_artifact(ctx.parent_run_id, str(summary_path))
    client.set_terminated(ctx.parent_run_id, status="FINISHED" if finished else "FAILED")
    return summary


def _row(client: Any, ctx: TrialContext, result: Any, max_t: int) -> dict[str, Any]:
    """One trial's outcome; the run of a trial ASHA cut short is tagged so."""
    metrics = result.metrics or {}
    params = dict(result.config or {})
    # A trial that failed before its first report has no metrics: its folder name has the id.
    folder = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(str(result.path)).name)
    trial_id = metrics.get("trial_id") or (folder.group(1) if folder else Path(str(result.path)).name)
    history = result.metrics_dataframe
    best = float(history[METRIC].max()) if history is not None and METRIC in history else None
    epochs = int(metrics.get(TIME_ATTR, 0) or 0)
    if result.error is not None:
        status = "failed"
    elif epochs < max_t:
        status = f"stopped by ASHA at epoch {epochs}"
    else:
        status = "completed"
    runs = trial_runs(client, ctx.parent_run_id, trial_id)
    run_id = runs[0].info.run_id if runs else None
    if run_id and status.startswith("stopped"):
        client.set_tag(run_id, "rgfusion.stopped_early", "true")
    return {"trial_id": trial_id, "status": status, "params": params, "best_dev_rsum": best,
            "epochs": epochs, "run_id": run_id}


def format_summary(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """Markdown table of trials, best first."""
    order = sorted(rows, key=lambda r: -(r["best_dev_rsum"] if r["best_dev_rsum"] is not None else -math.inf))
    head = ["trial", *keys, "best dev rsum", "epochs", "status", "mlflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in order:
        vals = [_fmt(r["params"].get(k)) for k in keys]
        rsum = "" if r["best_dev_rsum"] is None else f"{r['best_dev_rsum']:.2f}"
        lines.append("| " + " | ".join([r["trial_id"], *vals, rsum, str(r["epochs"]), r["status"],
                                        r["run_id"] or ""]) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
