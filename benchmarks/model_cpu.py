"""Forward+backward time and peak memory of the fusion model on this CPU (issue 3).

    .venv/bin/python benchmarks/model_cpu.py                 # batch 128, 36x2048 regions, 7x7x2048 grid
    .venv/bin/python benchmarks/model_cpu.py --recipe configs/ablations/concat.yaml --iters 2

One step = both encoders forward, the hardest-negative triplet loss, backward. Reports the
parameter count, analytic forward FLOPs per image–caption pair (training ≈ 3x), seconds per step
(wall and CPU time) and the achieved FLOP rate, and peak resident memory (ru_maxrss) above the process baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch
import yaml
from tqdm import tqdm

from rgfusion.configs import from_dict
from rgfusion.trainer.loss import LossConfig, contrastive_loss
from rgfusion.trainer.model import ModelConfig, build_model, count_parameters, flops_per_pair


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def inputs(args: argparse.Namespace, gen: torch.Generator):
    b, r = args.batch, args.regions
    xy = torch.rand(b, r, 2, generator=gen) * 0.7
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(b, r, 2, generator=gen) * 0.25], dim=-1)
    mask = torch.arange(r)[None, :] < torch.randint(r // 2, r + 1, (b, 1), generator=gen)
    regions = torch.randn(b, r, args.region_dim, generator=gen).abs()
    grids = torch.randn(b, args.grid * args.grid, args.grid_dim, generator=gen).abs()
    lengths = torch.randint(args.words // 2, args.words + 1, (b,), generator=gen)
    tmask = torch.arange(args.words)[None, :] < lengths[:, None]
    tokens = torch.randint(4, args.vocab, (b, args.words), generator=gen).masked_fill(~tmask, 0)
    return (regions, boxes, mask, grids), (tokens, lengths, tmask)


def model_config(args: argparse.Namespace) -> ModelConfig:
    section = {}
    if args.recipe:
        section = yaml.safe_load(open(args.recipe)).get("model", {})
    section["width"] = args.width
    return from_dict(ModelConfig, section, args.recipe or "<defaults>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="an ablation recipe whose model: section to use (default: full model)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--region-dim", type=int, default=2048)
    p.add_argument("--grid", type=int, default=7)
    p.add_argument("--grid-dim", type=int, default=2048)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--words", type=int, default=12, help="padded caption length (Flickr30K/COCO average ~12)")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config(args)
    grid_size = (args.grid, args.grid)
    model = build_model(cfg, region_dim=args.region_dim, grid_dim=args.grid_dim, grid_size=grid_size, vocab_size=args.vocab)
    model.train()
    img_in, cap_in = inputs(args, torch.Generator().manual_seed(0))
    ids = torch.arange(args.batch)
    loss_cfg = LossConfig(warmup_steps=0)
    baseline = peak_rss_mib()

    times, cpu = [], []
    for i in tqdm(range(args.iters + 1), desc="fwd+bwd steps"):
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        img = model.embed_images(*img_in)
        cap = model.embed_captions(*cap_in)
        loss, _ = contrastive_loss(img, cap, ids, ids, cfg=loss_cfg, step=0)
        loss.backward()
        if i:  # the first step pays one-off allocation and kernel selection
            times.append(time.perf_counter() - t0)
            cpu.append(cpu_seconds() - c0)

    fwd_pair = flops_per_pair(cfg, args.region_dim, args.grid_dim, grid_size, args.regions, args.words)
    step = statistics.mean(times)
    result = {
        "config": {k: getattr(cfg, k) for k in ("width", "features", "graph", "graph_layers", "cgf", "pooling")},
        "text": cfg.text.encoder,
        "batch": args.batch,
        "threads": args.threads,
        "params": count_parameters(model),
        "params_image": count_parameters(model.image),
        "params_text": count_parameters(model.text),
        "fwd_gflops_per_pair": round(fwd_pair / 1e9, 3),
        "train_gflops_per_step": round(3 * fwd_pair * args.batch / 1e9, 1),
        "step_s_mean": round(step, 2),
        "step_s_min": round(min(times), 2),
        # CPU seconds (all threads) per step: steadier than wall time when the cores are shared.
        "step_cpu_s_mean": round(statistics.mean(cpu), 2),
        "pairs_per_s": round(args.batch / step, 2),
        "achieved_gflop_s": round(3 * fwd_pair * args.batch / step / 1e9, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "peak_rss_above_baseline_mib": round(peak_rss_mib() - baseline),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
