"""DeepSpeed, ranks and devices: the only module that parallelises the (single-device) model.

The DeepSpeed config is generated from the typed ``RunConfig`` (ZeRO stage, precision,
micro-batch and accumulation, clipping, AdamW) and an optional raw DeepSpeed file is
deep-merged over it. Parameter groups carry the model's per-module learning-rate multipliers
and keep norms and biases out of weight decay. The learning-rate schedule is a pure function
of the optimizer step.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from rgfusion.configs import ConfigError, deep_merge, resolve_recipe
from rgfusion.trainer.config import OptimConfig, RunConfig
from rgfusion.trainer.distenv import DistEnv, pick_device

log = logging.getLogger(__name__)


def resolve_device(cfg: RunConfig, env: DistEnv) -> str:
    if cfg.train.device == "cpu":
        return "cpu"
    device = pick_device(env)
    if cfg.train.device == "cuda" and device == "cpu":
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return device


def set_cpu_threads(cfg: RunConfig, env: DistEnv) -> int:
    """Intra-op threads for a rank: its share of the cores minus its reader processes.

    An OpenMP team larger than the cores it really gets spins against the data workers and
    other ranks. On this project's 2-core machine 2 threads trained 12x slower than 1. On a
    16-core GPU machine, a 45 MB batch cloned in the training process woke 16 threads that took
    the cores of 14 loader workers: 5,154 against 10,712 images/s (benchmarks/RESULTS.md,
    session 6). An explicit OMP_NUM_THREADS is respected.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(env.local_world_size, 1) - cfg.data.num_workers)
    torch.set_num_threads(threads)
    return threads


def resolve_precision(cfg: RunConfig, device: str) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def micro_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Pairs per rank per micro-step; the global batch must split evenly."""
    per = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by world size "
                          f"{world_size} x grad_accum {cfg.train.grad_accum}")
    return cfg.train.batch_size // per


def init_distributed(env: DistEnv, device: str) -> bool:
    """Join (or, for a single process, create) the process group: gloo on CPU, NCCL on GPU.
    Returns whether this call made it (False: Ray Train, or an earlier run in this process, did)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():  # Ray Train sets up the group before calling us
        return False
    # Its functions take `group=group.WORLD` as a default, evaluated on import: imported after
    # the group exists (DeepSpeed does so lazily), they keep the world group alive past
    # destroy_process_group, and gloo's threads then meet interpreter finalization, which
    # aborted ranks at exit ("terminate called without an active exception").
    import torch.distributed.nn  # noqa: F401
    env.export()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if env.launcher == "single":
        # A private group of one; no RANK/MASTER_* variables leak into this process's
        # environment (they would mislead child processes it starts). DeepSpeed's engine
        # insists on LOCAL_RANK, which alone makes no child think it is part of a job.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return True


def release_engine(engine: Any) -> None:
    """Remove DeepSpeed's gradient hooks: held by autograd, out of the garbage collector's sight,
    they would keep the engine, and the process groups it holds, alive until interpreter exit."""
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        destroy()


def leave_distributed(env: DistEnv) -> None:
    """Leave a launched job's process groups once every rank is done with them, and free them
    while the interpreter is whole: a gloo group that outlives it, or a rank that tears gloo down
    while a peer still talks to it, aborts the rank at exit ("terminate called without an active
    exception"), seen in two-process tests and in a two-node run on one machine."""
    import deepspeed.comm
    import torch.distributed as dist

    if env.launcher != "single" and dist.is_initialized():
        dist.barrier()
        if deepspeed.comm.is_initialized():  # its destroy also drops DeepSpeed's references to the groups
            deepspeed.comm.destroy_process_group()
        else:
            dist.destroy_process_group()
        gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: RunConfig, world_size: int, device: str, *, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run; a raw override file has the last word."""
    precision = resolve_precision(cfg, device)
    o = cfg.optim
    generated: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": o.grad_clip,
        # torch's AdamW: no CUDA op to JIT-build, and it runs on CPU ranks too.
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True}},
        "zero_optimization": {
            "stage": cfg.train.zero_stage,
            # Export gathers ZeRO-3 shards into one state dict on save.
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0); DeepSpeed skips overflow steps itself.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "checkpoint": {"load_universal": load_universal},
        # Our own progress bar and MLflow report progress; DeepSpeed's prints would duplicate.
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if device.startswith("cuda"):
        # Reduce gradient buckets on a side stream while backward goes on (DeepSpeed enables it
        # only for ZeRO-3 by default); gloo on CPU has no streams to overlap on.
        generated["zero_optimization"]["overlap_comm"] = True
    if cfg.train.deepspeed:
        generated = deep_merge(generated, read_deepspeed_file(cfg.train.deepspeed))
    return generated


def read_deepspeed_file(path: str) -> dict:
    p = Path(path) if Path(path).is_file() else resolve_recipe(path)
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: invalid DeepSpeed config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a DeepSpeed config must be a mapping")
    return data


def param_groups(model: torch.nn.Module, optim: OptimConfig, hint: dict[str, float]) -> list[dict]:
    """AdamW groups keyed by (lr multiplier, decays?).

    A parameter takes the multiplier of the longest module prefix in ``hint`` that contains
    it; 1-D parameters (norm scales, biases) get no weight decay.
    """
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (lr_multiplier(name, hint), p.ndim > 1)
        groups.setdefault(key, []).append(p)
    return [{"params": groups[k], "lr": optim.lr * k[0], "lr_mult": k[0],
             "weight_decay": optim.weight_decay if k[1] else 0.0, "name": _group_name(k)}
            for k in sorted(groups)]


def _group_name(key: tuple[float, bool]) -> str:
    return f"lr_x{key[0]:g}{'' if key[1] else '_no_decay'}"


def lr_multiplier(name: str, hint: dict[str, float]) -> float:
    best, mult = -1, 1.0
    for prefix, m in hint.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, mult = len(prefix), float(m)
    return mult


def lr_factor(step: int, optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base rate at optimizer step ``step`` (0-based)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return optim.decay_factor ** sum(1 for e in optim.decay_epochs if epoch >= e)
    span = max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(cfg: RunConfig, steps_per_epoch: int, total_steps: int
                ) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.optim, steps_per_epoch, total_steps))

    return schedule


def _groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    hint = dict(model.param_groups_hint()) if hasattr(model, "param_groups_hint") else {}
    return param_groups(model, cfg.optim, hint)


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict, *, steps_per_epoch: int,
                 total_steps: int) -> Any:
    """``deepspeed.initialize`` with our parameter groups and (unless overridden) schedule."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=_groups(model, cfg), config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else lr_schedule(cfg, steps_per_epoch, total_steps))
    return engine


def build_native_engine(model: torch.nn.Module, cfg: RunConfig, env: DistEnv, *, device: str, precision: str,
                        steps_per_epoch: int, total_steps: int) -> Any:
    """The plain-PyTorch engine of ``train.engine: native`` (trainer/native.py)."""
    from rgfusion.trainer.native import NativeEngine

    model.to(device)
    return NativeEngine(model, cfg, _groups(model, cfg), device=device, precision=precision, rank=env.rank,
                        world_size=env.world_size, schedule=lr_schedule(cfg, steps_per_epoch, total_steps))


def make_gather(world_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """All-gather along dim 0 whose gradient flows back into this rank's slice only.

    Each rank computes its loss against everyone's embeddings; gradients for the other
    slices are computed by their own ranks, and DeepSpeed's gradient averaging combines them.
    """
    if world_size <= 1:
        return None
    import torch.distributed as dist

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[dist.get_rank()] = x
        return torch.cat(parts, dim=0)

    return gather


def all_ranks_any(flags: torch.Tensor) -> list[bool]:
    """Element-wise OR across ranks of a 1-D float tensor of 0/1 flags on this rank's device:
    one small all-reduce and the step's one host read, so every rank decides alike."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(v) for v in flags.tolist()]


def current_lr(engine: Any) -> float:
    """Base-group learning rate (multiplier 1) for logs."""
    groups = engine.optimizer.param_groups
    for g in groups:
        if g.get("lr_mult", 1.0) == 1.0:
            return float(g["lr"])
    return float(groups[0]["lr"])
