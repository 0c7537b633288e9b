"""``train(config) -> result``: the one entry every launcher reaches.

Order of work: validate everything that can be wrong before a step is taken (config, dataset,
checkpoint), build the engine (DeepSpeed's, or the native one), resume, then epochs of identical
step counts on every rank, each ending with dev/test evaluation, the best-model export and a
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from rgfusion.configs import ConfigError, to_dict
from rgfusion.datasets import DataConfig, Manifest, build_text_processor, load_manifest, skip_stats, train_loader
from rgfusion.trainer import engine as eng
from rgfusion.trainer.checkpoint import Checkpoints, TrainState, enable_universal, seed_everything, tag_for
from rgfusion.trainer.config import RunConfig
from rgfusion.trainer.distenv import DistEnv, broadcast_list
from rgfusion.trainer.evaluate import evaluate_split, flat_metrics, format_table, primary, write_report
from rgfusion.trainer.export import consolidated_state_dict, write_export
from rgfusion.trainer.feed import DeviceFeed
from rgfusion.trainer.graphs import CapturedSteps
from rgfusion.trainer.loss import ContrastiveLoss
from rgfusion.trainer.model import build_model
from rgfusion.trainer.profiling import StepProfiler, phase
from rgfusion.trainer.redact import install_log_redaction, redact
from rgfusion.trainer.tracking import Tracker, git_commit

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(RuntimeError):
    """The run stopped itself (diverged); a checkpoint was written first."""


class TrainModule(nn.Module):
    """Model and loss as one module, so a learnable loss temperature joins the optimizer."""

    def __init__(self, model: nn.Module, loss: ContrastiveLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Any, ids: torch.Tensor, *, step: int, gather: Callable[[torch.Tensor], torch.Tensor] | None,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        img, cap = self.model(batch)
        return self.loss(img, cap, ids, ids, step=step, gather=gather, weight=weight)

    def param_groups_hint(self) -> dict[str, float]:
        return {f"model.{k}": v for k, v in self.model.param_groups_hint().items()}


def train(config: RunConfig, *, on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint one run; returns its result (same on every rank).

    ``on_eval`` (optional, called on every rank after each evaluation with the epoch's
    metrics) lets a sweep report intermediate results.
    """
    install_log_redaction()
    env = DistEnv.from_environ()
    if not env.is_main:  # one voice: other ranks only warn
        logging.getLogger("rgfusion").setLevel(logging.WARNING)
    device = eng.resolve_device(config, env)
    eng.set_cpu_threads(config, env)
    joined = eng.init_distributed(env, device)
    run = Run(config, env, device, on_eval)
    with _sigterm_flag() as stop:
        run.stop_flag = stop
        try:
            result = run.execute()
        finally:
            run.tracker.end("FINISHED" if run.finished else "KILLED")
    eng.release_engine(run.engine)
    del run  # its engine's references to the process groups go before leave_distributed frees them
    if joined:
        eng.leave_distributed(env)
    return result


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list[bool]]:
    """A one-item list set to True on SIGTERM (pre-emption), restored afterwards."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True
        log.warning("SIGTERM received: checkpointing at the next step and exiting")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a Ray Train worker thread): Ray handles it
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class Run:
    """One training run's state between setup and result."""

    def __init__(self, cfg: RunConfig, env: DistEnv, device: str,
                 on_eval: Callable[[dict[str, Any]], None] | None):
        self.cfg, self.env, self.device, self.on_eval = cfg, env, device, on_eval
        self.stop_flag = [False]
        self.finished = False
        # Whole-run throughput of this process (evaluation excluded), for the result.
        self.train_seconds = self.wait_seconds = self.edge_seconds = 0.0
        self.pairs = 0
        self.profile_steps = cfg.train.profile_steps
        self.out = Path(cfg.train.out_dir)
        self.tracker = Tracker(cfg.tracking, active=env.is_main)
        self.resolved = redact(to_dict(cfg))
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.train.compile and cfg.train.compile_mode == "reduce-overhead" and env.world_size > 1:
            raise ConfigError(f"train.compile_mode=reduce-overhead runs one process only (world size here "
                              f"{env.world_size}): its CUDA graphs crashed under DDP; use compile_mode=default")
        if cfg.train.cuda_graph and (env.world_size > 1 or not self.device.startswith("cuda")):
            raise ConfigError(f"train.cuda_graph runs one process on a CUDA device (here {env.world_size} "
                              f"process(es) on {self.device}); set train.cuda_graph=false")
        self.manifest = open_dataset(cfg.data, [cfg.eval.dev_split, cfg.eval.test_split, "train"])
        check_features(cfg, self.manifest)
        self.text = build_text_processor(cfg.data, self.manifest)
        self.micro = eng.micro_batch_size(cfg, env.world_size)
        train_images = self.manifest.split("train").num_samples
        self.steps_per_epoch = cfg.train.steps_per_epoch or math.ceil(train_images / cfg.train.batch_size)
        self.micro_per_epoch = self.steps_per_epoch * cfg.train.grad_accum
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.fingerprint = {
            "model": to_dict(cfg.model), "loss_kind": cfg.loss.kind,
            "learn_temperature": cfg.loss.kind == "infonce" and cfg.loss.learn_temperature,
            "dims": {"region_dim": self.manifest.region_dim, "grid_dim": self.manifest.grid_dim,
                     "grid_size": list(self.manifest.grid_size), "vocab_size": self.text.vocab_size}}
        self.ckpt = Checkpoints(cfg.checkpoint_dir, cfg.checkpoint.storage_options, env,
                                cache_dir=self.out / ".ckpt-cache", keep_last=cfg.checkpoint.keep_last,
                                fingerprint=self.fingerprint, engine=cfg.train.engine)
        chosen = self.ckpt.select(cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        native = cfg.train.engine == "native"
        stage = 0 if native else eng.deepspeed_config(cfg, env.world_size, self.device)["zero_optimization"]["stage"]
        universal = chosen is not None and self.ckpt.needs_universal(chosen, stage)
        self.ds_config = None if native else eng.deepspeed_config(cfg, env.world_size, self.device,
                                                                  load_universal=universal)
        self.precision = eng.resolve_precision(cfg, self.device)
        self.dtype = DTYPES[self.precision]

        seed_everything(cfg.train.seed)  # same initial weights on every rank
        model = build_model(cfg.model, region_dim=self.manifest.region_dim, grid_dim=self.manifest.grid_dim,
                            grid_size=tuple(self.manifest.grid_size), vocab_size=self.text.vocab_size)
        if cfg.train.compile:
            model.compile_towers(cfg.train.compile_mode, eager_random=cfg.train.compile_eager_random)
        model.use_side_streams(uses_side_streams(cfg, env.world_size, self.device))
        module = TrainModule(model, ContrastiveLoss(cfg.loss))
        enable_universal(module)
        if native:
            self.engine = eng.build_native_engine(module, cfg, env, device=self.device, precision=self.precision,
                                                  steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
        else:
            self.engine = eng.build_engine(module, cfg, self.ds_config, steps_per_epoch=self.steps_per_epoch,
                                           total_steps=self.total_steps)
        self.module: TrainModule = self.engine.module
        self.gather = eng.make_gather(env.world_size) if cfg.train.global_negatives else None
        self.captured = (CapturedSteps(self.module, self.engine.optimizer, cfg.loss, self.device)
                         if cfg.train.cuda_graph else None)
        if chosen is not None:
            folder = self.ckpt.prepare(chosen, universal=universal)
            self.state = self.ckpt.load(self.engine, chosen, folder)
        else:
            self.state = TrainState()
            seed_everything(cfg.train.seed * 1000 + env.rank)  # dropout differs per rank
        self._start_tracking(resumed=chosen is not None, stage=stage)

    def _start_tracking(self, *, resumed: bool, stage: int) -> None:
        tags = {"git_commit": git_commit(), "world_size": self.env.world_size, "zero_stage": stage,
                "engine": self.cfg.train.engine,
                "device": self.device, "precision": self.precision, "launcher": self.env.launcher,
                "dataset": self.manifest.name}
        run_id = self.tracker.start(run_id=self.state.run_id, config=self.resolved, tags=tags)
        self.state.run_id = broadcast_list([run_id])[0]  # every rank's result names the run
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
            files = [self.out / "config.yaml"]
            if self.ds_config is not None:
                files.append(self.out / "deepspeed.yaml")
                files[-1].write_text(yaml.safe_dump(redact(self.ds_config), sort_keys=False))
            if not resumed:
                for f in files:
                    self.tracker.log_artifact(f)

    # ------------------------------------------------------------------ the loop
    def execute(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        for epoch in range(state.epoch, cfg.train.epochs):
            status = self._train_epoch(epoch)
            if status != "ok":
                return self._result(status)
            self._end_epoch(epoch)
        self.finished = True
        return self._finish()

    def _train_epoch(self, epoch: int) -> str:
        cfg, env, state = self.cfg, self.env, self.state
        start = state.batch_in_epoch
        loader = train_loader(cfg.data, self.manifest, self.text, batch_size=self.micro,
                              steps=self.micro_per_epoch, rank=env.rank, world_size=env.world_size,
                              seed=cfg.train.seed, epoch=epoch, start_step=start,
                              pin_memory=self.device.startswith("cuda"),
                              reuse_memory=self.device.startswith("cuda") and cfg.data.reuse_batch_memory)
        bar = tqdm(total=self.micro_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   unit="batch", disable=not (env.is_main and cfg.train.progress), dynamic_ncols=True)
        profiler = StepProfiler(self.profile_steps, self.out / "profile", active=env.is_main)
        self.profile_steps = 0  # the first epoch this process trains, once
        bad_in_row = 0
        t_start = time.perf_counter()
        feed = DeviceFeed(iter(loader), self.device, self.dtype)
        window = Window(self.device, feed.wait_seconds)
        try:
            for batch, ids in feed:
                profiler.step()
                loss, stats = self._forward(batch, ids)
                bad, stop = self._check(loss)
                state.batch_in_epoch += 1
                bar.update(1)
                if bad:
                    bad_in_row += 1
                    self._skip_bad_step(bad_in_row)
                    continue
                bad_in_row = 0
                self._update(loss)
                # The whole step is queued (a captured one reads no loss): read the next batch meanwhile.
                feed.prefetch()
                window.add(loss.detach(), stats["collapsed_share"])
                self.pairs += self.micro * env.world_size
                stepped = self.engine.global_steps != state.global_step
                state.global_step = self.engine.global_steps
                if stepped and state.global_step % cfg.train.log_every == 0:
                    self._log_window(window, bar, feed.wait_seconds)
                    window = Window(self.device, feed.wait_seconds)
                if stop and stepped:
                    self._checkpoint()
                    return "preempted"
                last = state.batch_in_epoch >= self.micro_per_epoch
                every = cfg.checkpoint.every_steps
                if stepped and every and state.global_step % every == 0 and not last:
                    self._checkpoint()
        finally:
            profiler.stop()
            bar.close()
            self.train_seconds += time.perf_counter() - t_start
            self.wait_seconds += feed.wait_seconds
            self.edge_seconds += feed.edge_seconds
        self._settle_captured()
        return "ok"

    def _forward(self, batch: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss and stats of the step; a captured step (train.cuda_graph) has also updated."""
        if self.captured is not None:
            with phase("captured_step"):
                return self.captured(batch, ids, self.state.global_step)
        with phase("forward"):
            return self.engine(batch, ids, step=self.state.global_step, gather=self.gather)

    def _update(self, loss: torch.Tensor) -> None:
        if self.captured is not None:
            # The graph made the update (a non-finite loss skipped it there): count it.
            self.engine.count_update()
            return
        with phase("backward"):
            self.engine.backward(loss)
        with phase("optimizer_step"):
            self.engine.step()

    def _check(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(non-finite loss on any rank, SIGTERM on any rank): the step's one host sync
        (DeepSpeed adds its own for the gradient norm). A captured step (one process) needs
        none: the device skipped a non-finite update and counted it (``_settle_captured``)."""
        if self.captured is not None:
            return False, bool(self.stop_flag[0])
        with phase("loss_check"):
            flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                                 torch.full((), float(self.stop_flag[0]), device=loss.device)])
            bad, stop = eng.all_ranks_any(flags)
        return bad, stop

    def _skip_bad_step(self, bad_in_row: int) -> None:
        """Count a skipped step; too many in a row checkpoint and stop the run."""
        self.state.skipped_steps += 1
        if bad_in_row >= self.cfg.train.max_bad_steps:
            self._checkpoint()
            raise self._diverged(bad_in_row, "at")

    def _settle_captured(self) -> None:
        """Count the non-finite steps the captured graphs skipped since the last call (one
        sync, at log lines, checkpoints and epoch ends); a long run of them stops the run."""
        if self.captured is None:
            return
        bad, longest = self.captured.take_bad()
        self.state.skipped_steps += bad
        if longest >= self.cfg.train.max_bad_steps:
            self.ckpt.save(self.engine, self.state, config=self.resolved)
            raise self._diverged(longest, "by")

    def _diverged(self, in_row: int, when: str) -> TrainingStopped:
        return TrainingStopped(
            f"{in_row} non-finite losses in a row {when} step {self.state.global_step} (epoch "
            f"{self.state.epoch + 1}): the run diverged; lower optim.lr or check the data. "
            f"Checkpoint saved under {self.cfg.checkpoint_dir}")

    def _log_window(self, window: "Window", bar: tqdm, wait_now: float) -> None:
        """All-reduce the window's sums so the logged numbers cover every rank."""
        import torch.distributed as dist

        self._settle_captured()
        extra = torch.tensor([float(skip_stats().total)], dtype=torch.float64, device=self.device)
        sums = torch.cat([window.sums, extra])
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, collapsed, n, skipped = sums.tolist()
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        metrics = {
            "train/loss": loss_sum / max(n, 1),
            "train/lr": eng.current_lr(self.engine),
            "train/pairs_per_s": window.n * self.micro * self.env.world_size / elapsed,
            "train/data_wait_share": (wait_now - window.wait0) / elapsed,
            "train/skipped_samples": skipped,
            "train/skipped_steps": self.state.skipped_steps,
            "train/collapsed_share": collapsed / max(n, 1),
            "train/epoch": self.state.epoch + self.state.batch_in_epoch / self.micro_per_epoch,
        }
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        self.tracker.log_metrics(metrics, step=self.state.global_step)
        if self.env.is_main and not self.cfg.train.progress:  # batch jobs: the log file shows progress
            log.info("step %d: loss %.4f, lr %.2e, %.0f pairs/s, data wait %.1f%%", self.state.global_step,
                     metrics["train/loss"], metrics["train/lr"], metrics["train/pairs_per_s"],
                     100 * metrics["train/data_wait_share"])
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                        pairs_s=f"{metrics['train/pairs_per_s']:.0f}",
                        wait=f"{100 * metrics['train/data_wait_share']:.0f}%", refresh=False)

    def _end_epoch(self, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        last = epoch + 1 == cfg.train.epochs
        if not last and (epoch + 1) % cfg.eval.every_epochs:
            self._checkpoint()
            return
        dev = self._evaluate(cfg.eval.dev_split)
        test = self._evaluate(cfg.eval.test_split)
        rsum = primary(dev)["rsum"]
        best = state.best_rsum is None or rsum > state.best_rsum
        metrics = {**flat_metrics(dev, "dev"), **flat_metrics(test, "test"), "epoch": epoch + 1}
        self.tracker.log_metrics(metrics, step=state.global_step)
        if self.env.is_main:
            log.info("epoch %d: dev rsum %.1f, test rsum %.1f%s", epoch + 1, rsum, primary(test)["rsum"],
                     " (best)" if best else "")
        if best:
            state.best_rsum, state.best_epoch, state.best_test = rsum, epoch + 1, test
            state.best_tag = tag_for(state.global_step)
            self._export(self.out / "best")
            if self.env.is_main:
                write_report(self.out / "reports" / "dev_best.json", dev)
        if self.on_eval is not None:
            self.on_eval({"epoch": epoch + 1, "dev_rsum": rsum, "test_rsum": primary(test)["rsum"],
                          "global_step": state.global_step, **metrics})
        self._checkpoint(best=best)

    def _evaluate(self, split: str) -> dict[str, Any]:
        return evaluate_split(self.module.model, self.cfg.data, self.manifest, self.text, split=split,
                              batch_size=self.cfg.eval.batch_size, rank=self.env.rank,
                              world_size=self.env.world_size, device=self.device, dtype=self.dtype)

    def _checkpoint(self, best: bool = False) -> None:
        self._settle_captured()
        self.ckpt.save(self.engine, self.state, config=self.resolved, best=best)

    def _export(self, dest: Path) -> None:
        state = consolidated_state_dict(self.engine, self.module.model, self.env.rank)
        if state is not None:
            write_export(dest, state, config=self.resolved, manifest=self.manifest,
                         vocab_size=self.text.vocab_size)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any]:
        state = self.state
        if self.env.is_main and state.best_test:
            path = write_report(self.out / "reports" / "test.json",
                                {**state.best_test, "best_epoch": state.best_epoch,
                                 "best_dev_rsum": state.best_rsum, "run_id": state.run_id})
            print(f"\nTest retrieval at the best dev epoch ({state.best_epoch}):\n"
                  + format_table([state.best_test]), flush=True)
            self.tracker.log_artifact(path, "reports")
            self.tracker.log_artifact(self.out / "reports" / "dev_best.json", "reports")
            self.tracker.log_artifact(self.out / "best", "best_model")
            self.tracker.log_metrics({f"best/{k}": v for k, v in flat_metrics(state.best_test, "test").items()},
                                     step=state.global_step)
        return self._result("completed")

    def _result(self, status: str) -> dict[str, Any]:
        s = self.state
        steps_seconds = self.train_seconds - self.edge_seconds
        return {
            "status": status, "run_id": s.run_id, "tracking_uri": self.tracker.uri if self.tracker.active else None,
            "epochs": s.epoch, "global_step": s.global_step, "skipped_steps": s.skipped_steps,
            "best_epoch": s.best_epoch, "best_dev_rsum": s.best_rsum,
            "test": s.best_test, "test_rsum": primary(s.best_test)["rsum"] if s.best_test else None,
            "checkpoint_dir": self.cfg.checkpoint_dir, "best_checkpoint": s.best_tag,
            "export_dir": str(self.out / "best"), "report": str(self.out / "reports" / "test.json"),
            "pairs_per_s": self.pairs / self.train_seconds if self.train_seconds else None,
            # The steps' wait for data; each epoch's loader start and stop are reported apart.
            "data_wait_share": self.wait_seconds / steps_seconds if steps_seconds > 0 else None,
            "loader_start_stop_s": self.edge_seconds,
            "ui": self.tracker.ui_hint() if self.env.is_main else None,
        }


class Window:
    """Sums over the steps since the last log, kept on the device: adding them costs no sync.
    A non-finite loss (a captured step the device skipped) is left out of the means."""

    def __init__(self, device: str, wait0: float) -> None:
        self.t0 = time.perf_counter()
        self.wait0 = wait0  # the feed's cumulative data wait when the window opened
        # loss, collapsed share, finite steps
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, loss: torch.Tensor, collapsed: torch.Tensor) -> None:
        finite = loss.isfinite()
        self.sums += torch.stack([torch.where(finite, loss, 0.0).double(),
                                  torch.where(finite, collapsed, 0.0).double(), finite.double()])
        self.n += 1


def check_features(cfg: RunConfig, manifest: Manifest) -> None:
    """A dataset converted with --no-grids stores a zero placeholder grid: never train on it."""
    if cfg.model.uses_grid and not manifest.has_grids:
        raise ConfigError(f"data.url={cfg.data.url} has no grid features (converted with --no-grids): "
                          f"model.features={cfg.model.features} needs them; use model.features=region")


def open_dataset(cfg: DataConfig, splits: list[str]) -> Manifest:
    """The manifest, or one ConfigError line naming what is missing."""
    try:
        manifest = load_manifest(cfg.url, cfg.storage_options)
        for split in splits:
            manifest.split(split)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.url={cfg.url}: {e}") from None
    return manifest


def uses_side_streams(cfg: RunConfig, world_size: int, device: str) -> bool:
    """Whether ``train.side_streams`` applies to this run (see its comment in trainer/config.py)."""
    t = cfg.train
    return (t.side_streams and device.startswith("cuda") and t.engine == "native" and world_size == 1
            and not (t.compile and t.compile_mode == "reduce-overhead"))
