"""The run's typed configuration: one section per component, one recipe per run.

``RunConfig`` composes the data layer's ``DataConfig``, the model's ``ModelConfig``, the
loss's ``LossConfig`` and the trainer's own sections below. A recipe (``configs/*.yaml``)
fills it; ``--set key=value`` overrides any dotted field; unknown keys are an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rgfusion.configs import ConfigError, load
from rgfusion.datasets import DataConfig
from rgfusion.trainer.loss import LossConfig
from rgfusion.trainer.model import ModelConfig

DEFAULT_RECIPE = "default.yaml"


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a warm-up-then-decay schedule."""

    # Base learning rate at the end of warm-up, for a global batch of train.batch_size.
    lr: float = 5e-4
    # Decoupled weight decay; norms and biases never decay (it would only shrink their scale).
    weight_decay: float = 1e-4
    # Adam moments; 0.999 is the standard second-moment horizon.
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Global gradient-norm clip; VSE++ clips at 2.0 because hardest-negative losses spike early.
    grad_clip: float = 2.0
    # Linear warm-up from 0, in optimizer steps; lets Adam's moments settle before full steps.
    warmup_steps: int = 500
    # After warm-up: constant, step (×decay_factor at each of decay_epochs, the VSE recipe) or
    # cosine down to min_lr_ratio×lr at the last step.
    schedule: Literal["constant", "step", "cosine"] = "step"
    # Epochs (0-based) at whose start the step schedule multiplies the rate by decay_factor.
    decay_epochs: list[int] = field(default_factory=lambda: [15])
    decay_factor: float = 0.1
    # Floor of the cosine schedule as a fraction of lr.
    min_lr_ratio: float = 0.0
    # The native engine's fp32 masters in bf16: "fp32", a buffer of their own, or "split", the
    # bf16 weights plus the 16 bits their rounding removed (exact; 26 instead of 28 bytes of
    # memory traffic per parameter in the update, which ends every step). Split needs CUDA with
    # Triton; the weights then round half away from zero where torch rounds ties to even.
    master: Literal["fp32", "split"] = "fp32"
    # The native engine's AdamW moments: "fp32", or "bf16" rounded stochastically from fp32
    # arithmetic (8 bytes less memory traffic per parameter in the update; rounding to the
    # nearest would freeze the second moment, which moves 0.1% a step at beta2 = 0.999).
    moments: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive, warmup_steps and grad_clip non-negative")
        if len(self.betas) != 2:
            raise ValueError("betas must be [beta1, beta2]")


@dataclass
class TrainConfig:
    """Loop, batch and precision; everything about how steps are taken."""

    # Where reports, exported weights and (by default) checkpoints of this run go.
    out_dir: str = "runs/default"
    # One seed derives model init, dropout and every data stream (per epoch, rank, worker).
    seed: int = 0
    epochs: int = 25
    # Image–caption pairs per optimizer step over ALL ranks; each rank gets
    # batch_size / (world_size × grad_accum), so a resume on another world size keeps the recipe.
    batch_size: int = 128
    # Micro-batches accumulated per optimizer step (bigger effective batch on small memory).
    grad_accum: int = 1
    # Optimizer steps per epoch; None = ceil(train images / batch_size) from the manifest.
    steps_per_epoch: int | None = None
    # deepspeed: DeepSpeed's engine, any ZeRO stage. native: plain PyTorch (bf16 weights with fp32
    # masters, flat-buffer AdamW, DDP), ZeRO-0 only, with far less host work per step
    # (trainer/native.py).
    engine: Literal["deepspeed", "native"] = "deepspeed"
    # ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 + gradients, 3 + weights.
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 on GPUs that support it, fp32 on CPU (CPU bf16 matmuls are slower than fp32).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # A raw DeepSpeed JSON/YAML file deep-merged over the generated config (last word wins),
    # e.g. configs/deepspeed/zero3.yaml; relative names resolve against the packaged configs.
    deepspeed: str | None = None
    # Contrast each rank's pairs against the embeddings of all ranks (global negatives): the
    # hardest-negative loss sees world_size× more candidates, as with one big batch.
    global_negatives: bool = True
    # auto = this process's GPU if CUDA is available, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Non-finite losses in a row before the run stops (after a checkpoint): a diverged run.
    max_bad_steps: int = 20
    # Optimizer steps between metric logs (and progress-bar refreshes of the rates).
    log_every: int = 10
    # Rank-0 progress bar; off for log files of batch jobs.
    progress: bool = True
    # torch.compile the model (inductor): fused kernels and fewer launches for a host-bound
    # eager step. ZeRO 0-2 only; the first steps and each new evaluation shape compile.
    compile: bool = False
    # Inductor mode of train.compile: reduce-overhead replays the compiled forward and backward
    # as CUDA graphs (one recording per caption length), for steps bound by kernel launches;
    # native engine, one process only (under DDP on 4 H100s a rank died with SIGSEGV).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Under train.compile, dropout draws from PyTorch's own random kernels, as eager mode does,
    # rather than from inductor's generator inlined in each fused kernel: 2% faster BERT step on
    # an H200, and the masks of an eager run with the same seed (model/retrieval.py).
    compile_eager_random: bool = True
    # Run the caption tower beside the image tower (and the BiGRU's two directions beside each
    # other) on CUDA side streams: for steps bound by the GPU (the captured harness step gained
    # 5-8%), i.e. with cuda_graph; without it the trainer's step on one H100 is bound by the
    # host and gained nothing, hence off by default.
    # Applies only where known safe: CUDA, engine native, one process, compile_mode not
    # reduce-overhead (its CUDA graph trees assume one stream; DDP's gradient hooks were never
    # checked with side streams). Elsewhere it is ignored.
    side_streams: bool = False
    # Capture the whole step (forward, loss, backward, update) as CUDA graphs and replay one per
    # step (trainer/graphs.py): a step bound by kernel launches becomes one launch. Engine
    # native on CUDA, one process, grad_accum 1, compile_mode not reduce-overhead. Captions are
    # padded to a multiple of 8 word slots (masked); the first steps of each caption length run
    # uncaptured. The host reads no loss per step: a non-finite step, skipped on the device,
    # still counts as a step of the schedule and is counted at the next log line.
    cuda_graph: bool = False
    # Steps of the first epoch to run under the PyTorch profiler on rank 0 (after 5 warm-up
    # steps); writes <out_dir>/profile/{ops.txt,trace.json}. 0 = off.
    profile_steps: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be positive")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be positive or null")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ValueError("log_every and max_bad_steps must be positive")
        if self.compile and self.zero_stage == 3:
            raise ValueError("compile works with zero_stage 0-2 (ZeRO-3 gathers weights in hooks compile can't trace)")
        if self.engine == "native" and (self.zero_stage != 0 or self.precision == "fp16" or self.deepspeed):
            raise ValueError("engine 'native' runs without ZeRO, loss scaling or a DeepSpeed file: set "
                             "zero_stage 0, precision auto/bf16/fp32 and no deepspeed file, or use engine 'deepspeed'")
        if self.compile_mode == "reduce-overhead" and self.engine != "native":
            raise ValueError("compile_mode 'reduce-overhead' needs engine 'native' (DeepSpeed's hooks and "
                             "CUDA graphs were never run together here)")
        if self.cuda_graph and (self.engine != "native" or self.grad_accum != 1
                                or (self.compile and self.compile_mode == "reduce-overhead")):
            raise ValueError("cuda_graph needs engine 'native', grad_accum 1 and no compile_mode "
                             "'reduce-overhead' (which records graphs of its own)")
        if self.profile_steps < 0:
            raise ValueError("profile_steps must be >= 0")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints: where, how often, how many, and resume."""

    # Local folder or fsspec URL (s3://bucket/run/ckpt); None = <train.out_dir>/checkpoints.
    dir: str | None = None
    # fsspec options for a remote dir (e.g. {"client_kwargs": {"endpoint_url": ...}}).
    storage_options: dict = field(default_factory=dict)
    # Optimizer steps between checkpoints (0 = epoch ends only); bounds the work lost to a crash.
    every_steps: int = 1000
    # Complete checkpoints kept besides the best one; older ones are pruned.
    keep_last: int = 2
    # auto = newest complete checkpoint in dir (fresh start if none); or a checkpoint path.
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("every_steps must be >= 0 and keep_last >= 1")


@dataclass
class EvalConfig:
    """Retrieval evaluation after each epoch (dev picks the best; test is reported)."""

    # Images per evaluation batch per rank (each brings captions_per_image captions).
    batch_size: int = 128
    # Split that selects the best checkpoint by RSUM.
    dev_split: str = "dev"
    # Split reported at the best dev epoch with the dataset's protocol (Flickr 1K, COCO 5×1K/5K).
    test_split: str = "test"
    # Evaluate every N epochs (the last epoch is always evaluated).
    every_epochs: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.every_epochs < 1:
            raise ValueError("eval batch_size and every_epochs must be positive")


@dataclass
class TrackingConfig:
    """MLflow: rank 0 logs params, metrics, tags and artifacts."""

    enabled: bool = True
    # Tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working dir.
    uri: str | None = None
    # Artifact root for experiments created on a local store; None = ./mlartifacts.
    # (A tracking server decides its own artifact destination.)
    artifact_location: str | None = None
    experiment: str = "rgfusion"
    run_name: str | None = None
    # A sweep's run: this run becomes its nested child.
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # CPU/GPU/memory sampled by MLflow's system-metrics thread.
    system_metrics: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.train.out_dir) / "checkpoints")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A recipe (default: the embedded default) plus ``key=value`` overrides."""
    cfg = load(RunConfig, path if path is not None else DEFAULT_RECIPE, list(overrides))
    if not cfg.data.url:
        raise ConfigError("data.url is empty: set it in the recipe or with --set data.url=...")
    for key, value in (("master", "split"), ("moments", "bf16")):
        if getattr(cfg.optim, key) == value and cfg.train.engine != "native":
            raise ConfigError(f"optim.{key} '{value}' is the native engine's: set train.engine=native "
                              "(and zero_stage 0)")
    return cfg
