"""``rgfusion train``, ``rgfusion eval`` and ``rgfusion demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from rgfusion.configs import ConfigError
from rgfusion.datasets.cli import add_storage_args, storage_options_from

log = logging.getLogger(__name__)

# Exit code of a run that stopped itself (diverged); distinct from config errors (2).
EXIT_STOPPED = 3


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model from a recipe (any launcher: python, torchrun, "
                                            "deepspeed, srun, Ray)")
    p.add_argument("--config", help="recipe YAML (default: the embedded default, configs/default.yaml)")
    _add_set(p)
    p.add_argument("--resume", help="auto (newest intact checkpoint of this run, if any) or a checkpoint path")
    # The deepspeed launcher appends --local_rank=N; DistEnv reads it, argparse must accept it.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate a saved model (export folder or checkpoint) on a split")
    p.add_argument("--checkpoint", required=True,
                   help="export folder (model.safetensors), checkpoint folder (step-N) or checkpoint root")
    p.add_argument("--split", default="test")
    p.add_argument("--report", help="write the JSON report here")
    _add_set(p, "override the saved config, e.g. --set data.url=/data/flickr30k")
    add_storage_args(p)  # for a --checkpoint on object storage
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("demo", help="the main job: synthetic data -> train the fusion model -> "
                                           "evaluate -> recall table + MLflow run")
    p.add_argument("--out", default="runs/demo", help="folder for data, checkpoints, reports and mlflow.db")
    _add_set(p)
    p.set_defaults(func=cmd_demo)


def _add_set(p: argparse.ArgumentParser, text: str = "override a config field, e.g. --set optim.lr=1e-4") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def cmd_train(args: argparse.Namespace) -> int:
    from rgfusion.trainer.config import load_config

    overrides = list(args.set) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return _run_training(load_config(args.config, overrides))


def _run_training(cfg: Any) -> int:
    from rgfusion.trainer.distenv import DistEnv
    from rgfusion.trainer.loop import TrainingStopped, train

    try:
        result = train(cfg)
    except TrainingStopped as e:
        print(f"rgfusion: stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    if not DistEnv.from_environ().is_main:
        return 0
    if result.get("pairs_per_s"):
        print(f"throughput: {result['pairs_per_s']:.1f} pairs/s, data wait {100 * result['data_wait_share']:.1f}% "
              f"of step time, loader start/stop {result['loader_start_stop_s']:.1f} s in all", flush=True)
    if result.get("ui"):
        print(f"\nMLflow run {result['run_id']}; to browse it:\n  {result['ui']}", flush=True)
    if result["status"] == "preempted":
        print(f"rgfusion: pre-empted at step {result['global_step']}; checkpoint saved, resume with "
              f"--resume auto", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rgfusion.trainer import engine as eng
    from rgfusion.trainer.config import RunConfig
    from rgfusion.trainer.distenv import DistEnv
    from rgfusion.trainer.evaluate import evaluate_split, format_table, write_report
    from rgfusion.trainer.loop import open_dataset
    from rgfusion.trainer.redact import install_log_redaction
    from rgfusion.datasets import build_text_processor

    install_log_redaction()
    model, config = load_for_eval(args.checkpoint, storage_options_from(args))
    cfg = _config_with_overrides(RunConfig, config, args.set, args.checkpoint)
    env = DistEnv.from_environ()
    device = eng.resolve_device(cfg, env)
    joined = eng.init_distributed(env, device)
    manifest = open_dataset(cfg.data, [args.split])
    text = build_text_processor(cfg.data, manifest)
    report = evaluate_split(model.to(device), cfg.data, manifest, text, split=args.split,
                            batch_size=cfg.eval.batch_size, rank=env.rank, world_size=env.world_size,
                            device=device, dtype=torch.float32)
    if env.is_main:
        print(format_table([report]))
        if args.report:
            print(f"report: {write_report(args.report, report)}")
    if joined:
        eng.leave_distributed(env)
    return 0


def load_for_eval(path: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(model, saved config) from an export folder or a DeepSpeed checkpoint (folder or root),
    local or at an fsspec URL (fetched to a temporary folder first)."""
    from rgfusion.datasets.storage import is_local, open_fs

    fs, root = open_fs(path, storage_options)
    folder = _model_folder(fs, root.rstrip("/"), path)
    if is_local(fs):
        return _load_folder(Path(folder))
    with tempfile.TemporaryDirectory(prefix="rgfusion-eval-") as tmp:
        local = Path(tmp) / folder.rsplit("/", 1)[-1]
        fs.get(f"{folder}/", str(local), recursive=True)
        return _load_folder(local)


def _model_folder(fs: Any, root: str, path: str) -> str:
    """``root`` if it holds an export or a checkpoint; for a checkpoint root, the checkpoint its
    ``latest`` pointer names (so only that one is fetched from object storage)."""
    from rgfusion.trainer.export import WEIGHTS

    if fs.exists(f"{root}/{WEIGHTS}") or fs.exists(f"{root}/meta.json"):
        return root
    if fs.exists(f"{root}/latest"):
        return f"{root}/{fs.cat_file(f'{root}/latest').decode().strip()}"
    raise ConfigError(f"--checkpoint {path}: no {WEIGHTS}, meta.json or latest pointer there")


def _load_folder(folder: Path) -> tuple[Any, dict[str, Any]]:
    from rgfusion.trainer.export import WEIGHTS, load_exported

    if (folder / WEIGHTS).is_file():
        model, info = load_exported(folder)
        return model, info["config"]
    return _model_from_checkpoint(folder)


def _model_from_checkpoint(folder: Path) -> tuple[Any, dict[str, Any]]:
    from rgfusion.configs import from_dict
    from rgfusion.trainer.checkpoint import CheckpointError, safe_load, verify_local
    from rgfusion.trainer.model import ModelConfig, build_model

    reason = verify_local(folder)
    if reason is not None:
        raise CheckpointError(f"checkpoint {folder} is unusable: {reason}")
    meta = json.loads((folder / "meta.json").read_text())
    if meta["zero_stage"] == 0 and not meta["sharded_optimizer"]:
        state = safe_load(folder / "mp_rank_00_model_states.pt")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # Safe: verify_local loaded every file with weights_only first.
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    dims = meta["fingerprint"]["dims"]
    model_cfg = from_dict(ModelConfig, meta["config"]["model"], str(folder / "meta.json"), "model.")
    model = build_model(model_cfg, region_dim=dims["region_dim"], grid_dim=dims["grid_dim"],
                        grid_size=tuple(dims["grid_size"]), vocab_size=dims["vocab_size"])
    model.load_state_dict({k[len("model."):]: v.float() for k, v in state.items() if k.startswith("model.")})
    return model.eval(), meta["config"]


def _config_with_overrides(cls: Any, tree: dict[str, Any], overrides: list[str], source: str) -> Any:
    from rgfusion.configs import from_dict, parse_override, set_dotted

    tree = json.loads(json.dumps(tree))
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    return from_dict(cls, tree, source)


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> full fusion model -> evaluation -> table and MLflow run, in one command."""
    from rgfusion.datasets.synth import SynthConfig, write_synthetic
    from rgfusion.trainer.config import load_config

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "manifest.json").is_file():
        print(f"writing the synthetic dataset to {data} ...", flush=True)
        write_synthetic(SynthConfig(), str(data))
    overrides = [f"data.url={data}", f"train.out_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
                 f"tracking.artifact_location={(out / 'mlartifacts').as_uri()}", "tracking.run_name=demo",
                 *args.set]
    return _run_training(load_config(None, overrides))
