"""Model-step throughput, MFU, evaluation speed and a profile on one device.

Times a full training step (forward, loss, backward, AdamW) of the real model on random inputs of
the real shapes, so the figure isolates the model from the data path (the trainer's own log gives
the end-to-end pairs/s and data-wait share). Run on a GPU machine:

    python benchmarks/gpu_bench.py --out results.json            # full-size matrix
    python benchmarks/gpu_bench.py --batch 256 --only full-bert-bf16w-graph
    python benchmarks/gpu_bench.py --attention math --side-streams --pad-shapes --only full-bert-bf16w-compile-graph
    python benchmarks/gpu_bench.py --device cpu --tiny            # smoke test on a CPU
    # where a compiled (uncaptured) step's kernels come from: ops and Python frames per launch
    python benchmarks/gpu_bench.py --attention math --side-streams --pad-shapes --only full-bert-bf16w-default \
        --profile full-bert-bf16w-default --stack --trace t.json.gz --no-eval
    python benchmarks/trace_summary.py t.json.gz --steps 5 --origins 'reduce_kernel'

Variants are ``<model>-<precision>[-<mode>]``. Precisions: ``fp32`` (TF32 matmuls), ``bf16``
(autocast over fp32 parameters), ``bf16w`` (bf16 parameters with fp32 master weights: the native
engine's FlatAdamW with the recipe's parameter groups and gradient clip). Modes: none (eager),
``default`` (torch.compile of the towers), ``graph`` (the whole step captured as one CUDA graph),
``compile-graph`` (both), ``autotune-graph`` (inductor's max-autotune GEMM search, then the
capture).

Steps are launched back to back, as the trainer launches them, and timed on the GPU; the step
time and MFU come from that. ``step_ms_synced`` also times each step with the host waiting for
it, which adds the next launch (0.04-0.32 ms per captured step on an H100); rows before session 7
reported that figure. Each variant runs in a fresh compile state. Prints one table row per
variant; ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import get_args

import torch
import torch._inductor.config

from rgfusion.trainer.config import OptimConfig
from rgfusion.trainer.engine import param_groups
from rgfusion.trainer.flat_adamw import FlatAdamW
from rgfusion.trainer.loss import LossConfig, contrastive_loss
from rgfusion.trainer.metrics import evaluate_protocol
from rgfusion.trainer.model import ModelConfig, TextConfig, build_model, count_parameters
from rgfusion.trainer.model.attention import Attention
from rgfusion.trainer.model.bert import FusedBertLayer
from rgfusion.trainer.model.flops import image_flops, text_flops
from rgfusion.trainer.model.retrieval import compile_options
from rgfusion.trainer.model.streams import beside, side_stream
from rgfusion.trainer.update_pipeline import UpdatePipeline, order_groups, plan_stages

# H100 SXM dense bf16 tensor-core peak from the datasheet; MFU is quoted against it.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


@dataclass
class Shape:
    batch: int = 128
    regions: int = 36
    region_dim: int = 2048
    grid: tuple[int, int] = (7, 7)
    grid_dim: int = 2048
    width: int = 1024
    words: int = 16  # mean COCO/Flickr caption length in words; BERT sees ~20 word pieces
    vocab: int = 10_000
    attention: str = "sdpa"  # ModelConfig.attention: the fused SDPA kernels or the math path
    side_streams: bool = False  # the caption tower (and BiGRU directions) on side CUDA streams
    side_priority: str = "high"  # of the caption tower's side stream: "high" or "normal"
    side_first: bool = True  # the side stream's tower launched (or captured) before the main stream's
    # the tower on the side stream: "caption" (the default), or "image", so that the image tower,
    # the longer chain since session 12, gets the side stream's high priority (0.3 ms slower, session 16)
    side_tower: str = "caption"
    fused_bert: bool = True  # TextConfig.fused_bert: FusedBert or Hugging Face's BertModel
    # "both"; "image"/"text": only that tower runs, the other's embeddings are a fixed stand-in,
    # so the step's length is that tower's chain (plus loss and update) and how well the two
    # overlap in the full step can be read off.
    towers: str = "both"
    # "": the caption tower attends as ``attention`` says; "cudnn"/"efficient": through SDPA,
    # restricted to that kernel (an unsupported case is an error, not a silent fallback).
    text_sdpa: str = ""
    eager_random: bool = True  # train.compile_eager_random: dropout's random numbers from PyTorch's kernels
    # torch.compile mode of the image tower alone in compiled variants ("": the variant's mode), so
    # inductor's GEMM autotuning (and its GELU epilogues) can be tried where most products are
    image_compile: str = ""
    # inductor options of the image tower's compile alone, e.g. (("triton.mix_order_reduction", False),):
    # its stream holds the step's critical path since session 17
    image_inductor: tuple[tuple[str, object], ...] = ()
    # bf16w's FlatAdamW update: "kernels" (Triton, the gradients read in place), "split" (the same
    # on split masters, optim.master=split) or "compiled" (inductor, the gradients gathered into
    # one flat buffer first)
    adamw: str = "kernels"
    # bf16w's AdamW moments: "fp32" or "bf16", rounded stochastically (optim.moments)
    moments: str = "fp32"
    # "end": the update after the backward. "overlap", a timing probe only, whose numbers are
    # wrong: the update of the gradients on hand at the start of the step, on a third stream, with
    # no wait before the towers read the weights. It bounds what an update pipelined with the next
    # forward could gain.
    # "pipelined": trainer/update_pipeline.py, the update beside the next forward in
    # ``update_stages`` stages per tower, the forward waiting for each just before it reads it;
    # "staged": its layout of the optimizer's buffers (by tower, in stage order), updated at the end.
    update: str = "end"
    update_stages: int = 8
    update_priority: int = 0  # of the pipelined update's streams
    # the captured step's stream priority, the image tower's; a high-priority side stream gets one
    # level more (0, a new stream's, is the lowest, so -1 leaves the probe's update stream below both)
    image_priority: int = 0


@dataclass
class Variant:
    name: str
    features: str = "both"
    graph: bool = True
    cgf: bool = True
    pooling: str = "map"
    text: str = "bigru"
    # "fp32"; "bf16": autocast over fp32 parameters; "bf16w": bf16 parameters, fp32 master weights.
    precision: str = "fp32"
    # "": eager; "default"/"max-autotune-no-cudagraphs": torch.compile of the towers;
    # "graph": the whole step (forward, loss, backward, AdamW) captured once as a CUDA graph;
    # "compile-graph": the towers compiled (mode "default"), then the whole step captured;
    # "autotune-graph": the same with inductor's GEMM autotuning (minutes of compilation).
    compile: str = ""

    @property
    def captured(self) -> bool:
        """Whether the whole step is replayed as one CUDA graph."""
        return self.compile in ("graph", "compile-graph", "autotune-graph")

    @property
    def compile_mode(self) -> str:
        """torch.compile mode of the towers; "" leaves them eager."""
        # Inductor without its own CUDA graphs: capture_step makes the one graph.
        captured_modes = {"compile-graph": "default", "autotune-graph": "max-autotune-no-cudagraphs"}
        if self.compile in captured_modes:
            return captured_modes[self.compile]
        return "" if self.compile in ("", "graph") else self.compile


MODELS = {
    "full-bigru": {},
    "full-bert": {"text": "bert"},
    "region-gpo-bigru": {"features": "region", "graph": False, "cgf": False, "pooling": "gpo"},
}


PRECISIONS = ("fp32", "bf16", "bf16w")
MODES = ("", "default", "graph", "compile-graph", "autotune-graph")


def variants() -> list[Variant]:
    out = []
    for model, fields in MODELS.items():
        for precision in PRECISIONS:
            for mode in MODES:
                name = f"{model}-{precision}{'-' + mode if mode else ''}"
                out.append(Variant(name, precision=precision, compile=mode, **fields))
    return out


def bert_dir(shape: Shape, tiny: bool) -> str:
    """A randomly initialised BERT-base-sized model saved locally (nothing is downloaded)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522) if not tiny else BertConfig(
        vocab_size=shape.vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    path = tempfile.mkdtemp(prefix="bert-")
    BertModel(cfg).save_pretrained(path)
    return path


def model_config(v: Variant, shape: Shape, hf_path: str | None) -> ModelConfig:
    text = TextConfig(encoder="hf", hf_path=hf_path, fused_bert=shape.fused_bert) if v.text == "bert" else TextConfig()
    return ModelConfig(
        width=shape.width, features=v.features, graph=v.graph, cgf=v.cgf, pooling=v.pooling, text=text,
        heads=8 if shape.width >= 64 else 2, attention=shape.attention,
    )


def make_batch(
    shape: Shape, vocab: int, device: torch.device, seq: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random inputs; ``dtype`` is that of the float features (boxes stay fp32: the model casts them)."""
    b = shape.batch
    xy = torch.rand(b, shape.regions, 2, device=device) * 0.7
    wh = torch.rand(b, shape.regions, 2, device=device) * 0.3 + 0.05
    lengths = torch.randint(max(seq // 2, 1), seq + 1, (b,), device=device)
    lengths[0] = seq  # the reader pads to the longest caption: keep the padded length fixed
    return {
        # ReLU of Gaussians: non-negative, CNN-like activations with half the entries zero.
        "regions": torch.randn(b, shape.regions, shape.region_dim, device=device).relu_().to(dtype),
        "boxes": torch.cat([xy, (xy + wh).clamp(max=1)], -1),
        # Detectors keep 10..36 boxes per image; padding the rest is part of the real cost.
        "region_mask": torch.arange(shape.regions, device=device)[None]
        < torch.randint(min(10, shape.regions), shape.regions + 1, (b, 1), device=device),
        "grids": torch.randn(b, shape.grid[0] * shape.grid[1], shape.grid_dim, device=device).relu_().to(dtype),
        "tokens": torch.randint(4, vocab, (b, seq), device=device),
        "lengths": lengths,
        "attention_mask": torch.arange(seq, device=device)[None] < lengths[:, None],
    }


def feature_dtype(v: Variant) -> torch.dtype:
    # bf16w parameters take bf16 inputs (no autocast casts them); the others take fp32.
    return torch.bfloat16 if v.precision == "bf16w" else torch.float32


def autocast_for(v: Variant, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if v.precision == "bf16" else nullcontext()


def make_update(model: torch.nn.Module, v: Variant, device: torch.device, shape: Shape,
                probe: dict[str, torch.Tensor]) -> Callable[[], None] | UpdatePipeline:
    """Builds the optimizer and returns the update that follows backward: it steps and leaves the
    gradients ready for the next backward. bf16w also casts the model.

    bf16w is the native engine's optimizer (trainer/flat_adamw.py) over the trainer's param
    groups: fp32 masters in flat buffers, the recipe's global-norm clip, a skipped non-finite
    update, the bf16 weights written in the same pass (``shape.adamw``: see Shape). With
    ``shape.update`` "pipelined" it returns an UpdatePipeline whose stages a forward of ``probe``
    (a batch) lays out. The others are torch's fused AdamW. No host syncs either way: the update
    is CUDA-graph capturable."""
    pipelined = shape.update == "pipelined"
    if v.precision == "bf16w":
        optim = OptimConfig()
        groups = param_groups(model, optim, model.param_groups_hint())
        if shape.update in ("pipelined", "staged"):
            probe = {k: t.float() if t.is_floating_point() else t for k, t in probe.items()}
            stages = plan_stages([model.image, model.text], lambda: embed_both(model, probe), shape.update_stages)
            groups = order_groups(groups, stages)
        # the pipelined update needs the kernels (on a CPU, Triton's interpreter)
        kernels = False if shape.adamw == "compiled" else (True if shape.update != "end" else None)
        opt = FlatAdamW(groups, precision="bf16", lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                        weight_decay=optim.weight_decay, max_norm=optim.grad_clip,
                        kernels=kernels, master="split" if shape.adamw == "split" else "fp32",
                        moments=shape.moments)
        model.to(torch.bfloat16)  # buffers; the parameters are views into the flat bf16 weights
        # step drops the gradients itself
        return UpdatePipeline(opt, stages, device, shape.update_priority) if pipelined else opt.step
    if shape.update != "end":
        raise ValueError(f"--update {shape.update}: bf16w variants only (FlatAdamW)")
    fused = {"fused": True, "capturable": v.captured} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)  # captured, the next replay re-allocates them in place

    return update


def embed_both(model, batch: dict[str, torch.Tensor]):
    return (model.embed_images(batch["regions"], batch["boxes"], batch["region_mask"], batch["grids"]),
            model.embed_captions(batch["tokens"], batch["lengths"], batch["attention_mask"]))


def side_priority(shape: Shape) -> int:
    """The side stream's priority: one level above the image tower's when high."""
    return shape.image_priority - 1 if shape.side_priority == "high" else shape.image_priority


def side_of(shape: Shape, device: torch.device) -> torch.cuda.Stream | None:
    """The side tower's stream (model/streams.py beside's), None without one."""
    return side_stream(device, 0, side_priority(shape)) if shape.side_streams and device.type == "cuda" else None


def step_fn(model, update: Callable[[], None], loss_cfg, ids, v: Variant, shape: Shape):
    device = next(model.parameters()).device
    autocast = autocast_for(v, device)

    def images(batch):
        with autocast:
            return model.embed_images(batch["regions"], batch["boxes"], batch["region_mask"], batch["grids"]).float()

    def captions(batch):
        with autocast:
            return model.embed_captions(batch["tokens"], batch["lengths"], batch["attention_mask"]).float()

    if v.compile_mode:  # each tower on its own, so the two can run on two streams
        options = compile_options(v.compile_mode, eager_random=shape.eager_random)
        image_options = {**compile_options(shape.image_compile or v.compile_mode, eager_random=shape.eager_random),
                         **dict(shape.image_inductor)}
        images, captions = torch.compile(images, options=image_options), torch.compile(captions, options=options)
    stand_in = torch.randn(shape.batch, model.cfg.width, device=device)

    def embed(batch):
        if shape.towers == "image":
            return images(batch), stand_in
        if shape.towers == "text":
            return stand_in, captions(batch)
        towers = (images, captions) if shape.side_tower == "caption" else (captions, images)
        main, side = beside(lambda: towers[0](batch), lambda: towers[1](batch), device, enabled=shape.side_streams,
                            priority=side_priority(shape), side_first=shape.side_first)
        return (main, side) if shape.side_tower == "caption" else (side, main)

    pipeline = update if isinstance(update, UpdatePipeline) else None
    # the tower on the side stream gathers its gradients there (towers: 0 image, 1 caption)
    side = side_of(shape, device)
    gather_streams = {1: side} if shape.side_tower == "caption" else {0: side}

    def step(batch):
        if pipeline:
            pipeline.start()
        if shape.update == "overlap" and device.type == "cuda" and any(p.grad is not None for p in model.parameters()):
            current, third = torch.cuda.current_stream(device), side_stream(device, slot=7, priority=0)
            third.wait_stream(current)
            with torch.cuda.stream(third):
                update()
            img, cap = embed(batch)
            current.wait_stream(third)
        else:
            img, cap = embed(batch)
        if pipeline:
            pipeline.join()
        loss, _ = contrastive_loss(img, cap, ids, ids, cfg=loss_cfg, step=10**9)
        loss.backward()
        if pipeline:
            pipeline.finish(gather_streams)
        elif shape.update != "overlap":
            update()
        return loss

    step.embed = embed  # (image, caption) embeddings without the loss and update
    return step


def capture_step(step, batch: dict[str, torch.Tensor], priority: int = 0):
    """The whole training step as one CUDA graph: one launch per step instead of ~1,500.

    Inputs are copied into the captured (static) batch before each replay; shapes must not change,
    which the reader guarantees for regions (padded to max_regions) and a fixed caption length.
    Each step ends with its gradients dropped, so the captured backward allocates them in the
    graph's pool and every replay writes them afresh."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up allocates optimizer state and cuDNN workspaces, and runs torch.compile's compilation.
    with torch.cuda.stream(side):
        for _ in range(3):
            step(batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream(priority=priority) if priority else None):
        loss = step(batch)

    def replay(new_batch):
        for k, t in batch.items():
            t.copy_(new_batch[k], non_blocking=True)
        graph.replay()
        return loss

    return replay


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches, device, warmup: int, iters: int, *, back_to_back: bool = True) -> list[float]:
    """Seconds per step. Back to back (CUDA only), steps are launched as a training loop launches
    them and timed by CUDA events between their starts, with one sync at the end. Otherwise the
    host waits for each step, which adds the next step's launch to every step: the figure that
    sessions 1-6 reported."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    if back_to_back and device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        for i in range(iters):
            marks[i].record()
            step(batches[i % len(batches)])
        marks[-1].record()
        sync(device)
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class Bench:
    """A model ready to time: its step (captured when the variant says so) and its inputs."""

    model: torch.nn.Module
    step: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    batches: list[dict[str, torch.Tensor]]
    cfg: ModelConfig
    seq: int


def build_bench(v: Variant, shape: Shape, device: torch.device, hf_path: str | None, tiny: bool) -> Bench:
    torch.manual_seed(0)
    cfg = model_config(v, shape, hf_path)
    vocab = 30522 if (v.text == "bert" and not tiny) else shape.vocab
    model = build_model(
        cfg, region_dim=shape.region_dim, grid_dim=shape.grid_dim, grid_size=shape.grid, vocab_size=vocab
    ).to(device)
    model.use_side_streams(shape.side_streams)
    if shape.text_sdpa:
        bert_layers = [m for m in model.modules() if isinstance(m, FusedBertLayer)]
        if not bert_layers:
            raise ValueError("--text-sdpa needs the fused BERT caption tower")
        for layer in bert_layers:
            layer.attention = "sdpa"
    seq = shape.words + 4 if v.text == "bert" else shape.words
    # Several input sets so repeated steps don't just re-read one batch from cache.
    batches = [make_batch(shape, vocab, device, seq, feature_dtype(v)) for _ in range(3)]
    update = make_update(model, v, device, shape, batches[0])
    step = step_fn(model, update, LossConfig(), torch.arange(shape.batch, device=device), v, shape)
    if v.captured:
        step = capture_step(step, {k: t.clone() for k, t in batches[0].items()}, shape.image_priority)
    return Bench(model, step, batches, cfg, seq)


def bench_variant(v: Variant, shape: Shape, device, hf_path, args) -> dict:
    bench = build_bench(v, shape, device, hf_path, args.tiny)
    # Passes back to back: a machine whose clock falls as it warms shows in their medians.
    passes = [time_steps(bench.step, bench.batches, device, args.warmup if i == 0 else 0, args.iters)
              for i in range(args.passes)]
    times = [t for p in passes for t in p]
    synced = time_steps(bench.step, bench.batches, device, 0, args.iters, back_to_back=False)
    med = statistics.median(times)
    flops = row_flops(bench, shape)
    pairs = shape.batch / med
    peak = next((p for k, p in PEAK_BF16_FLOPS.items() if k in device_name(device)), None)
    row = {
        **dataclasses.asdict(v),
        "towers": shape.towers,
        "batch": shape.batch,
        "params": count_parameters(bench.model),
        "step_ms": round(med * 1e3, 2),
        "step_ms_spread": round((max(times) - min(times)) * 1e3, 2),
        **({"step_ms_passes": [round(statistics.median(p) * 1e3, 2) for p in passes]} if args.passes > 1 else {}),
        "step_ms_synced": round(statistics.median(synced) * 1e3, 2),
        "pairs_per_s": round(pairs, 1),
        "train_flops_per_pair": 3 * flops,
        "mfu_bf16_peak": round(3 * flops * pairs / peak, 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    if v.text == "bigru" and v.compile == "":
        row.update(split_text_image(bench.model, bench.batches[0], v, device, args))
    del bench
    # Every variant's step closes over the same functions: without a reset, each later variant
    # recompiles them against guards piled up by the earlier ones, and past dynamo's cache limit
    # runs them uncompiled. (A BERT row after a BiGRU row in one process did not finish within
    # 7 minutes, session 7; alone it took 2.)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def row_flops(bench: Bench, shape: Shape) -> int:
    """Forward FLOPs per pair of the towers the row runs."""
    image = image_flops(bench.cfg, shape.region_dim, shape.grid_dim, shape.grid, shape.regions)
    text = text_flops(bench.cfg, bench.seq)
    return {"image": image, "text": text}.get(shape.towers, image + text)


def split_text_image(model, batch, v: Variant, device, args) -> dict:
    """Forward+backward time of each tower alone: says whether the recurrent part bounds the step."""
    autocast = autocast_for(v, device)

    def tower(fn):
        def run(b):
            with autocast:
                fn(b).float().sum().backward()
        return run

    img = tower(lambda b: model.embed_images(b["regions"], b["boxes"], b["region_mask"], b["grids"]))
    txt = tower(lambda b: model.embed_captions(b["tokens"], b["lengths"], b["attention_mask"]))
    out = {}
    for name, fn in (("image_tower_ms", img), ("text_tower_ms", txt)):
        out[name] = round(statistics.median(time_steps(fn, [batch], device, 2, max(args.iters // 2, 3))) * 1e3, 2)
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@torch.no_grad()
def bench_eval(shape: Shape, device, args) -> dict:
    """Embed 5,000 images × 25,000 captions with the full model, then every COCO 5K recall."""
    n_img = 100 if args.tiny else 5000
    cfg = model_config(Variant("eval", precision="bf16"), shape, None)
    model = build_model(
        cfg, region_dim=shape.region_dim, grid_dim=shape.grid_dim, grid_size=shape.grid, vocab_size=shape.vocab
    ).to(device).eval()
    chunk = 500
    feats = make_batch(dataclasses.replace(shape, batch=chunk), shape.vocab, device, shape.words)
    cap_batch = make_batch(dataclasses.replace(shape, batch=chunk * 5), shape.vocab, device, shape.words)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sync(device)
    t0 = time.perf_counter()
    with autocast:
        imgs = torch.cat([
            model.embed_images(feats["regions"], feats["boxes"], feats["region_mask"], feats["grids"]).float()
            for _ in range(n_img // chunk or 1)
        ])[:n_img]
        caps = torch.cat([
            model.embed_captions(cap_batch["tokens"], cap_batch["lengths"], cap_batch["attention_mask"]).float()
            for _ in range(n_img // chunk or 1)
        ])[: 5 * n_img]
    sync(device)
    t_embed = time.perf_counter() - t0
    cap_to_img = torch.arange(n_img, device=device).repeat_interleave(5)
    metrics = evaluate_protocol(imgs, caps, cap_to_img, "coco5k", None)
    sync(device)
    total = time.perf_counter() - t0
    return {"images": n_img, "captions": 5 * n_img, "embed_s": round(t_embed, 2), "total_s": round(total, 2),
            "rsum": round(float(metrics.get("rsum", float("nan"))), 2)}


PROFILE_STEPS = 5


def profile_variant(v: Variant, shape: Shape, device, hf_path, args) -> str:
    from torch.profiler import ProfilerActivity, profile

    bench = build_bench(v, shape, device, hf_path, args.tiny)
    time_steps(bench.step, bench.batches[:1], device, 3, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, with_stack=args.stack) as prof:
        time_steps(bench.step, bench.batches[:1], device, 0, PROFILE_STEPS)
    if args.trace:  # the timeline, for benchmarks/trace_summary.py or a trace viewer
        tmp = args.trace.removesuffix(".gz")
        prof.export_chrome_trace(tmp)
        if args.trace.endswith(".gz"):
            with open(tmp, "rb") as src, gzip.open(args.trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(tmp)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90)


def inductor_option(p: argparse.ArgumentParser, flag: str, item: str) -> tuple[str, object]:
    """``KEY=VALUE`` as a torch._inductor.config key and value; an unknown key or a bad literal is
    a usage error."""
    key, _, value = item.partition("=")
    try:
        getattr(torch._inductor.config, key)  # an unknown key raises here instead of being set
        return key, ast.literal_eval(value)
    except (AttributeError, ValueError, SyntaxError) as e:
        p.error(f"{flag} {item}: {type(e).__name__}: {e}")


def check_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[Variant]:
    """The variants ``--only`` names (all without it); an unknown name is an error, not an empty run."""
    valid = {v.name: v for v in variants()}
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted + ([args.profile] if args.profile else []) if n not in valid]
    if unknown:
        p.error(f"unknown variant(s) {','.join(unknown)}; valid: {','.join(valid)}")
    return [v for v in valid.values() if not wanted or v.name in wanted]


def ffn_on_math_path() -> None:
    """Every feed-forward block (graph layers, FusedBert) on PyTorch's path, whatever the model's
    attention says; the process's models only, for comparing rows."""
    from rgfusion.trainer.model import bert, ffn, image

    def math(x, up, down, impl):
        return ffn.feed_forward(x, up, down, "math")

    bert.feed_forward = image.feed_forward = math


def geometry_per_layer() -> None:
    """The graph layers' geometry biases from one kernel call per layer, as before session 16,
    instead of one pass for all layers; the process's models only, for comparing rows."""
    from rgfusion.trainer.model import edge_bias, image

    def per_layer(mlps, boxes, adj, dtype, impl):
        return [edge_bias.edge_biases([mlp], boxes, adj, dtype, impl)[0] for mlp in mlps]

    image.edge_biases = per_layer


def attention_launch(p: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """``KEY=VALUE`` items into the Triton attention kernels' launch options (their ``Launch``);
    an unknown key or a value that is no integer is a usage error."""
    from rgfusion.trainer.model import _triton_attention_kernels as kernels

    known = {f.name for f in dataclasses.fields(kernels.Launch)}
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known or not value.lstrip("-").isdigit():
            p.error(f"--attention-launch {item}: KEY=INTEGER, KEY one of {sorted(known)}")
        options[key] = int(value)
    kernels.LAUNCH = dataclasses.replace(kernels.LAUNCH, **options)
    return dataclasses.asdict(kernels.LAUNCH)


def geometry_launch(p: argparse.ArgumentParser, items: list[str]) -> dict[str, dict]:
    """``KERNEL=ROWSxWARPSxSTAGES`` items (KERNEL forward or backward) into the geometry kernels'
    launch settings; anything else is a usage error."""
    from rgfusion.trainer.model import _triton_geometry_kernels as kernels

    for item in items:
        kernel, _, value = item.partition("=")
        numbers = value.split("x")
        if kernel not in kernels.LAUNCH or len(numbers) != 3 or not all(n.isdigit() for n in numbers):
            p.error(f"--geometry-launch {item}: KERNEL=ROWSxWARPSxSTAGES, KERNEL one of {sorted(kernels.LAUNCH)}")
        kernels.LAUNCH = {**kernels.LAUNCH, kernel: kernels.Launch(*map(int, numbers))}
    return {k: dataclasses.asdict(v) for k, v in kernels.LAUNCH.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke test")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 128, 8 with --tiny)")
    p.add_argument("--attention", choices=get_args(Attention), default="sdpa", help="model.attention of every variant")
    p.add_argument("--towers", choices=("both", "image", "text"), default="both",
                   help="run only one tower, the other's embeddings a fixed stand-in: that tower's chain alone")
    p.add_argument("--text-sdpa", choices=("", "cudnn", "efficient"), default="",
                   help="BERT's attention through SDPA restricted to this kernel (every SDPA call is)")
    p.add_argument("--compile-random", choices=("eager", "inductor"), default="eager",
                   help="compiled dropout's random numbers: PyTorch's kernels (the trainer's default) or inductor's")
    p.add_argument("--image-compile", choices=("", "default", "max-autotune-no-cudagraphs"), default="",
                   help="torch.compile mode of the image tower alone in compiled variants (default: the variant's)")
    p.add_argument("--attention-launch", action="append", default=[], metavar="KEY=VALUE",
                   help="a launch option of the Triton attention kernels (model/_triton_attention_kernels.py "
                        "Launch), e.g. forward_keys=32: the graph's forward in the backward's tiles, as before "
                        "session 17")
    p.add_argument("--geometry-launch", action="append", default=[], metavar="KERNEL=ROWSxWARPSxSTAGES",
                   help="the geometry kernels' launch (model/_triton_geometry_kernels.py LAUNCH), e.g. "
                        "backward=8x4x3: both kernels' setting before session 18")
    p.add_argument("--image-inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="an inductor option of the image tower's compile alone, e.g. triton.mix_order_reduction=False")
    p.add_argument("--update", choices=("end", "pipelined", "staged", "overlap"), default="end",
                   help="bf16w: the update at the end of the step, or pipelined with the next forward in stages "
                        "(trainer/update_pipeline.py; staged: its buffers' layout, updated at the end); overlap: "
                        "a timing probe whose numbers are wrong, the update beside the next forward without waits")
    p.add_argument("--update-stages", type=int, default=8, help="--update pipelined: stages per tower")
    p.add_argument("--update-priority", type=int, default=0,
                   help="--update pipelined: its streams' priority (0, the lowest, to -3)")
    p.add_argument("--image-priority", type=int, default=0,
                   help="the captured step's stream priority (the image tower's), 0 to -2; the caption "
                        "tower's high-priority side stream gets one level more")
    p.add_argument("--adamw", choices=("kernels", "split", "compiled"), default="kernels",
                   help="bf16w's optimizer update on CUDA: Triton kernels (split: on split fp32 masters, "
                        "optim.master=split), or inductor's over gathered gradients")
    p.add_argument("--moments", choices=("fp32", "bf16"), default="fp32",
                   help="bf16w's AdamW moments, bf16 ones rounded stochastically (optim.moments)")
    p.add_argument("--ffn", choices=("model", "math"), default="model",
                   help="math: the feed-forward blocks on PyTorch's path even with --attention triton "
                        "(an ablation of model/ffn.py's kernels)")
    p.add_argument("--geometry", choices=("layers", "per-layer"), default="layers",
                   help="per-layer: the graph's geometry biases one kernel call per layer, not all layers "
                        "in one (an ablation, with --attention triton)")
    p.add_argument("--sm-carveout", type=int, default=None, metavar="SMS",
                   help="matrix products leave this many SMs free (torch's experimental cuBLASLt SM count "
                        "target): persistent products then keep to one wave beside the other stream's kernels")
    p.add_argument("--blas", choices=("cublas", "cublaslt"), default=None,
                   help="torch.backends.cuda.preferred_blas_library for the products (default: torch's)")
    p.add_argument("--side-streams", action="store_true",
                   help="run the caption tower beside the image tower on a side CUDA stream")
    p.add_argument("--side-priority", choices=("high", "normal"), default="high",
                   help="priority of the side stream (with --side-streams)")
    p.add_argument("--side-tower", choices=("caption", "image"), default="caption",
                   help="with --side-streams: the tower on the side stream; the other runs on the main stream")
    p.add_argument("--launch-order", choices=("side", "main"), default="side",
                   help="with --side-streams: launch (or capture) the side stream's tower first, or the main stream's")
    p.add_argument("--fused-bert", choices=("on", "off"), default="on",
                   help="BERT as rgfusion's FusedBert (one query-key-value product per layer) or Hugging Face's module")
    p.add_argument("--pad-shapes", action="store_true",
                   help="inductor pads every matrix product to aligned sizes (the geometry MLP's 5 inputs, "
                        "the box embedding's 7), compiled variants only")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (a Python literal), e.g. coordinate_descent_tuning=True")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--passes", type=int, default=1,
                   help="time --iters steps this many times back to back; the row adds each pass's median")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--profile", default="", help="variant name to profile (table printed)")
    p.add_argument("--trace", default="", help="with --profile: write its chrome trace here (.json or .json.gz)")
    p.add_argument("--stack", action="store_true",
                   help="with --profile: record Python stacks too (trace_summary.py --origins names the frames)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.passes < 1:
        p.error(f"--passes {args.passes}: at least 1")
    device = torch.device(args.device)
    shape = Shape(batch=8, regions=6, region_dim=32, grid=(3, 3), grid_dim=32, width=32, vocab=200) if args.tiny else Shape()
    shape = dataclasses.replace(shape, attention=args.attention, side_streams=args.side_streams,
                                side_priority=args.side_priority,
                                side_first=args.launch_order == "side", side_tower=args.side_tower,
                                fused_bert=args.fused_bert == "on",
                                towers=args.towers, text_sdpa=args.text_sdpa,
                                eager_random=args.compile_random == "eager", image_compile=args.image_compile,
                                image_inductor=tuple(inductor_option(p, "--image-inductor", item)
                                                     for item in args.image_inductor),
                                adamw=args.adamw, moments=args.moments, update=args.update,
                                update_stages=args.update_stages,
                                update_priority=args.update_priority,
                                image_priority=args.image_priority)
    if args.text_sdpa:  # the one kernel allowed: an unsupported case raises instead of falling back
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(args.text_sdpa == "efficient")
        torch.backends.cuda.enable_cudnn_sdp(args.text_sdpa == "cudnn")
    if args.batch is not None:
        shape = dataclasses.replace(shape, batch=args.batch)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows use TF32 tensor cores, as trainers do
    torch.backends.cudnn.allow_tf32 = True
    torch._inductor.config.force_shape_pad = args.pad_shapes
    for item in args.inductor:
        setattr(torch._inductor.config, *inductor_option(p, "--inductor", item))
    chosen = check_names(p, args)
    if args.ffn == "math":
        ffn_on_math_path()
    launch = attention_launch(p, args.attention_launch) if args.attention_launch else None
    geometry = geometry_launch(p, args.geometry_launch) if args.geometry_launch else None
    if args.sm_carveout is not None:
        torch._C._set_sm_carveout_experimental(args.sm_carveout)
    if args.blas is not None:
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.geometry == "per-layer":
        geometry_per_layer()
    hf_path = bert_dir(shape, args.tiny) if any(v.text == "bert" for v in chosen) or args.profile else None
    rows = []
    for v in chosen:
        try:
            rows.append(bench_variant(v, shape, device, hf_path, args))
        except Exception as e:  # one failing variant (e.g. a compile error) must not lose the rest
            rows.append({"name": v.name, "batch": shape.batch, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": device_name(device), "torch": torch.__version__, "shape": dataclasses.asdict(shape),
              "sm_carveout": torch._C._get_sm_carveout_experimental(), "attention_launch": launch,
              "geometry_launch": geometry, "rows": rows}
    if not args.no_eval:
        result["eval"] = bench_eval(shape, device, args)
        print(json.dumps(result["eval"]), flush=True)
    if args.profile:
        v = next(v for v in variants() if v.name == args.profile)
        result["profile"] = profile_variant(v, shape, device, hf_path, args)
        print(result["profile"])
    print(f"\n{'variant':38s} {'pairs/s':>9s} {'step ms':>8s} {'MFU':>6s} {'text ms':>8s} {'image ms':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:38s} ERROR {r['error'][:80]}")
            continue
        mfu = f"{100 * r['mfu_bf16_peak']:.1f}%" if r["mfu_bf16_peak"] else "-"
        print(f"{r['name']:38s} {r['pairs_per_s']:9.0f} {r['step_ms']:8.1f} {mfu:>6s} "
              f"{r.get('text_tower_ms', '-')!s:>8s} {r.get('image_tower_ms', '-')!s:>8s}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
