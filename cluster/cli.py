"""``rgfusion submit|jobs|ray-train|sweep|compare``: multi-node jobs, sweeps and run comparison."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from rgfusion.cluster.checks import ClusterError, check_multinode, report


def register(subparsers: Any) -> None:
    _register_submit(subparsers)
    _register_jobs(subparsers)

    p = subparsers.add_parser("ray-train", help="train with Ray Train on the Ray cluster this process joins "
                                                "(the entrypoint `submit ray` gives its Ray Job)")
    _add_config(p)
    _add_ray_layout(p)
    p.set_defaults(func=_guard(cmd_ray_train))

    p = subparsers.add_parser("sweep", help="Ray Tune sweep over recipe fields (ASHA on dev RSUM, MLflow runs)")
    p.add_argument("--config", required=True, help="sweep file, e.g. configs/sweeps/lr_margin.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep-file field, e.g. --set num_trials=4")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster (host:port); default $RAY_ADDRESS, else a new local Ray")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.set_defaults(func=_guard(cmd_sweep))

    p = subparsers.add_parser("compare", help="rank MLflow runs: differing params, final dev/test metrics, "
                                              "dev RSUM plot")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--filter", help="MLflow filter, e.g. \"params.`model.pooling` = 'map'\"")
    p.add_argument("--parent", help="a sweep's parent run id: compare its trials")
    p.add_argument("--runs", help="comma-separated run ids")
    p.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.csv, dev_rsum.png")
    p.set_defaults(func=_guard(cmd_compare))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Cluster-side failures end in one line and exit code 1 (config errors are the CLI's: 2)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ClusterError, TimeoutError) as e:
            print(f"rgfusion: error: {e}", file=sys.stderr)
            return 1

    return wrapper


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training recipe (default: the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optim.lr=1e-4")


def _add_site(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="cluster profile: a name under configs/cluster/ or a YAML path")
    p.add_argument("--shared-path", action="append", default=[], metavar="PREFIX",
                   help="a local path prefix every node mounts (adds to the profile's shared_paths)")


def _add_ray_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (= DeepSpeed ranks)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--storage-path", required=True, help="shared URL for Ray's run state and checkpoints (s3://...)")
    p.add_argument("--name", default="rgfusion", help="run name (folder under --storage-path)")


# -- submit ------------------------------------------------------------------------------------

def _register_submit(subparsers: Any) -> None:
    submit = subparsers.add_parser("submit", help="submit a multi-node training job (slurm, deepspeed, ray)")
    kinds = submit.add_subparsers(dest="launcher", required=True)

    p = kinds.add_parser("slurm", help="sbatch a script: srun one torchrun per node, rendezvous on the first")
    _add_config(p)
    _add_site(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, help="processes (GPUs) per node; default: the profile's")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="wall-clock limit, e.g. 12:00:00")
    p.add_argument("--job-name", default="rgfusion")
    p.add_argument("--workdir", default=".", help="directory the job starts in (shared filesystem)")
    p.add_argument("--env-setup", action="append", default=[], metavar="LINE",
                   help="shell line run on every node before the launcher (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.set_defaults(func=_guard(cmd_submit_slurm))

    p = kinds.add_parser("deepspeed", help="run DeepSpeed's multi-node launcher over a hostfile")
    _add_config(p)
    _add_site(p)
    p.add_argument("--hostfile", required=True, help="lines of 'HOSTNAME slots=N'")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--launcher", default="pdsh", help="how DeepSpeed reaches hosts: pdsh, openmpi, mvapich, ...")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=_guard(cmd_submit_deepspeed))

    p = kinds.add_parser("ray", help="submit a Ray Job (Jobs API) that trains with Ray Train + DeepSpeed")
    _add_config(p)
    _add_site(p)
    _add_ray_layout(p)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray dashboard, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    p.add_argument("--endpoint", help="S3-compatible endpoint for --storage-path (default: the profile's)")
    p.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(func=_guard(cmd_submit_ray))


def _load(args: argparse.Namespace) -> Any:
    from rgfusion.trainer.config import load_config

    return load_config(args.config, args.set)


def _check(cfg: Any, profile: Any, args: argparse.Namespace, nodes: int) -> None:
    """Refuse local shards/checkpoints on multi-node jobs; warn about a missing tracking server."""
    tracking = cfg.tracking.uri or profile.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    report(check_multinode(
        nodes=nodes, tracking_uri=tracking if cfg.tracking.enabled else "http://(tracking disabled)",
        shared_paths=[*profile.shared_paths, *args.shared_path],
        locations={"data.url": cfg.data.url, "checkpoint dir": cfg.checkpoint_dir}))


def cmd_submit_slurm(args: argparse.Namespace) -> int:
    from rgfusion.cluster import slurm
    from rgfusion.cluster.profiles import load_profile

    profile = load_profile(args.profile)
    cfg = _load(args)
    _check(cfg, profile, args, args.nodes)
    job = slurm.SlurmJob(config=args.config or "default.yaml", overrides=args.set, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, job_name=args.job_name, partition=args.partition,
                         account=args.account, time=args.time, workdir=str(Path(args.workdir).resolve()),
                         env_setup=args.env_setup)
    script = slurm.render_sbatch(job, profile)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = slurm.submit(script, job.workdir, job.job_name)
    print(f"submitted Slurm job {job_id} ({job.nodes} nodes); logs: {job.workdir}/{job.job_name}-{job_id}.out")
    return 0


def cmd_submit_deepspeed(args: argparse.Namespace) -> int:
    from rgfusion.cluster import deepspeed_launch as dl
    from rgfusion.cluster.profiles import load_profile

    profile = load_profile(args.profile)
    hosts = dl.parse_hostfile(args.hostfile)
    cfg = _load(args)
    _check(cfg, profile, args, len(hosts))
    if len(hosts) > 1 and (Path.cwd() / "datasets" / "__init__.py").is_file():
        # The multi-node launcher prepends its working directory to PYTHONPATH on every host.
        print("rgfusion: warning: launching from a source tree: its datasets/ folder will shadow Hugging "
              "Face's `datasets` on the ranks' PYTHONPATH; run from another directory", file=sys.stderr)
    argv = dl.launcher_argv(args.hostfile, hosts, args.config or "default.yaml", args.set,
                            master_port=args.master_port, launcher=args.launcher)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    return dl.run(argv, profile, Path.cwd())


def cmd_submit_ray(args: argparse.Namespace) -> int:
    from rgfusion.cluster import ray_jobs
    from rgfusion.cluster.profiles import load_profile

    if not args.address:
        raise ClusterError("no Ray cluster named: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    profile = load_profile(args.profile)
    cfg = _load(args)
    spec = ray_jobs.RayTrainSpec(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                 cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                                 name=args.name)
    # Workers may land on different nodes: shards, checkpoints and Ray's storage must be shared.
    nodes = args.num_workers
    _check(cfg, profile, args, nodes)
    report(check_multinode(nodes=nodes, tracking_uri="http://(checked above)",
                           shared_paths=[*profile.shared_paths, *args.shared_path],
                           locations={"--storage-path": args.storage_path}))
    env = profile.launch_env()
    if args.endpoint:
        env["AWS_ENDPOINT_URL"] = args.endpoint
    job_id = ray_jobs.submit(args.address, cfg, spec, env)
    print(f"submitted Ray job {job_id}; follow it with: rgfusion jobs logs {job_id} --address {args.address}",
          flush=True)
    if not args.wait:
        return 0
    status = ray_jobs.wait(args.address, job_id, timeout=args.timeout)
    print(f"Ray job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


# -- jobs --------------------------------------------------------------------------------------

def _register_jobs(subparsers: Any) -> None:
    jobs = subparsers.add_parser("jobs", help="follow Ray Jobs: status, logs, stop")
    actions = jobs.add_subparsers(dest="action", required=True)
    for name, text in (("status", "print the job's status"), ("logs", "print the job's logs"),
                       ("stop", "stop the job")):
        p = actions.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="Ray dashboard, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=_guard(cmd_jobs))


def cmd_jobs(args: argparse.Namespace) -> int:
    from rgfusion.cluster import ray_jobs

    if not args.address:
        raise ClusterError("no Ray cluster named: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    client = ray_jobs.job_client(args.address)
    try:
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        elif args.action == "logs":
            if args.follow:
                ray_jobs.wait(args.address, args.job_id)
            else:
                print(client.get_job_logs(args.job_id), end="")
        else:
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    except RuntimeError as e:  # the Jobs API reports unknown ids this way
        raise ClusterError(f"job {args.job_id}: {str(e).strip().splitlines()[-1]}") from None
    return 0


# -- ray-train, sweep, compare -----------------------------------------------------------------

def cmd_ray_train(args: argparse.Namespace) -> int:
    from rgfusion.cluster import ray_jobs

    cfg = _load(args)
    spec = ray_jobs.RayTrainSpec(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                 cpus_per_worker=args.cpus_per_worker, storage_path=args.storage_path,
                                 name=args.name)
    metrics = ray_jobs.run_ray_train(cfg, spec, ray_jobs.object_store_options())
    print(f"ray-train: done; epochs {metrics.get('epoch')}, best dev rsum {metrics.get('best_dev_rsum')}; "
          f"checkpoints in {metrics.get('checkpoint_dir')}; result in {metrics.get('ray_checkpoint')}",
          flush=True)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rgfusion.cluster import sweep

    spec = sweep.load_sweep(args.config, args.set)
    summary = sweep.run_sweep(spec, address=args.address, resume=args.resume)
    print(f"\nSweep {spec.name} (MLflow parent run {summary['parent_run_id']}):\n{summary['table']}")
    if summary["best"]:
        print(f"\nbest trial {summary['best']['trial_id']}: dev rsum {summary['best']['best_dev_rsum']:.2f}; "
              f"recipe written to {summary['best_config']}")
        return 0
    print("no trial finished an evaluation", file=sys.stderr)
    return 1


def cmd_compare(args: argparse.Namespace) -> int:
    from rgfusion.cluster.compare import compare
    from rgfusion.trainer.config import TrackingConfig
    from rgfusion.trainer.tracking import resolve_uri

    uri = resolve_uri(TrackingConfig(uri=args.tracking_uri))
    runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    result = compare(uri, args.out, experiment=args.experiment, filter_string=args.filter, parent=args.parent,
                     run_ids=runs)
    print(result["markdown"])
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in result["paths"].items()))
    return 0
