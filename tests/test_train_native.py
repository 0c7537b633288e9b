"""The native engine against plain PyTorch: accumulation, clipping, skipped non-finite updates,
schedule, and a save/load round trip that continues exactly as the uninterrupted run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rgfusion.configs import ConfigError
from rgfusion.trainer import engine as eng
from rgfusion.trainer.config import load_config
from rgfusion.trainer.distenv import DistEnv

torch.set_num_threads(1)


class Mean(nn.Module):
    """Mean-reduced regression loss on a small MLP: halves of a batch average to the whole."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.net(x).squeeze(-1) - y) ** 2).mean()


def native(*overrides: str):
    cfg = load_config(None, ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=2",
                             "optim.schedule=constant", "optim.lr=1e-2", *overrides])
    env = DistEnv.from_environ({}, [])
    return eng.build_native_engine(Mean(), cfg, env, device="cpu", precision="fp32", steps_per_epoch=10,
                                   total_steps=20)


def data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, generator=g)) for _ in range(n)]


def train(engine, batches, split: int = 1) -> list[float]:
    norms = []
    for x, y in batches:
        for xs, ys in zip(x.chunk(split), y.chunk(split)):
            engine.backward(engine(xs, ys))
            engine.step()
        norms.append(engine.get_global_grad_norm())
    return norms


def test_steps_match_torch_adamw_with_clipping_and_warmup():
    engine = native("optim.grad_clip=0.5")
    ref = Mean()
    decay = {id(p): g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": decay[id(q)]}
                             for p, q in zip(ref.parameters(), engine.module.parameters())],
                            lr=1e-2, betas=engine.optimizer.defaults["betas"], eps=engine.optimizer.defaults["eps"])
    batches = data()
    norms = train(engine, batches)
    for i, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * min(1.0, (i + 1) / 2)  # linear warm-up over 2 steps, then constant
        opt.zero_grad()
        ref(x, y).backward()
        norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        assert norms[i] == pytest.approx(float(norm), rel=1e-5)
        opt.step()
    for a, b in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    assert engine.global_steps == 4


def test_accumulated_micro_steps_equal_one_big_step():
    whole, split = native(), native("train.grad_accum=2", "train.batch_size=128")
    train(whole, data())
    train(split, data(), split=2)
    assert split.global_steps == whole.global_steps == 4 and split.micro_steps == 8
    for a, b in zip(whole.module.parameters(), split.module.parameters()):
        torch.testing.assert_close(a, b)


def test_nonfinite_gradient_skips_the_update():
    engine = native()
    train(engine, data(1))
    before = [p.detach().clone() for p in engine.module.parameters()]
    steps = [engine.optimizer.state[p]["step"].clone() for p in engine.module.parameters()]
    x, y = data(1, seed=1)[0]
    engine.backward(engine(x, y) * float("nan"))
    engine.step()
    assert math.isnan(engine.get_global_grad_norm())
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert all(torch.equal(engine.optimizer.state[p]["step"], s) for p, s in zip(engine.module.parameters(), steps))
    assert all(p.grad is None for p in engine.module.parameters())  # the bad gradients are gone


def native_bf16(*overrides: str):
    cfg = load_config(None, ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=0", "optim.lr=1e-2",
                             *overrides])
    return eng.build_native_engine(Mean(), cfg, DistEnv.from_environ({}, []), device="cpu", precision="bf16",
                                   steps_per_epoch=1, total_steps=10)


def test_bf16_computes_in_bf16_and_steps_fp32_masters():
    engine, fp32 = native_bf16(), native("optim.warmup_steps=0")
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert all(m.dtype == torch.float32 for m in engine.masters)
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in data()]
    train(engine, batches)
    train(fp32, data())
    for m, p, ref in zip(engine.masters, engine.params, fp32.params):  # all in parameter-group order
        assert torch.equal(p, m.bfloat16())  # the model holds the rounded masters
        torch.testing.assert_close(m, ref, atol=0.05, rtol=0.05)  # bf16 compute, same trajectory
    # Two accumulated halves step as the whole batch does.
    split = native_bf16("train.grad_accum=2", "train.batch_size=128")
    train(split, batches, split=2)
    for a, b in zip(split.masters, engine.masters):
        torch.testing.assert_close(a, b, atol=0.02, rtol=0.02)


def test_bf16_checkpoint_keeps_the_fp32_masters(tmp_path):
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in data()]
    straight, first = native_bf16(), native_bf16()
    train(straight, batches)
    train(first, batches[:2])
    first.save_checkpoint(str(tmp_path), tag="step-00000002")
    resumed = native_bf16()
    resumed.load_checkpoint(str(tmp_path), tag="step-00000002")
    train(resumed, batches[2:])
    for a, b in zip(straight.masters, resumed.masters):
        assert torch.equal(a, b)


def test_save_and_load_continue_exactly(tmp_path):
    batches = data(4)
    straight = native()
    train(straight, batches)
    first = native()
    train(first, batches[:2])
    first.save_checkpoint(str(tmp_path), tag="step-00000002")
    resumed = native()
    path, _ = resumed.load_checkpoint(str(tmp_path), tag="step-00000002")
    assert path and resumed.global_steps == 2
    train(resumed, batches[2:])
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b)
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    assert resumed.load_checkpoint(str(tmp_path), tag="step-00000009") == (None, {})


def test_cuda_graph_compile_needs_the_native_engine():
    with pytest.raises(ConfigError, match="reduce-overhead"):
        load_config(None, ["train.compile=true", "train.compile_mode=reduce-overhead"])


@pytest.mark.parametrize("override", ["train.zero_stage=2", "train.precision=fp16",
                                      "train.deepspeed=deepspeed/zero2.yaml"])
def test_native_refuses_what_only_deepspeed_does(override):
    sets = ["train.engine=native", "train.zero_stage=0", override]
    with pytest.raises(ConfigError, match="engine 'native'"):
        load_config(None, sets)


def _ddp_worker(rank: int, rendezvous: str, precision: str, out: str) -> None:
    """One of two gloo ranks: 2 micro-steps of 2 samples per step, each rank its half of the batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous: no port to race other tests for.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2, node_rank=0, launcher="torchrun")
    cfg = load_config(None, ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=0", "optim.lr=1e-2",
                             "train.grad_accum=2", "train.batch_size=8"])
    engine = eng.build_native_engine(Mean(), cfg, env, device="cpu", precision=precision, steps_per_epoch=1,
                                     total_steps=10)
    cast = (lambda t: t.bfloat16()) if precision == "bf16" else (lambda t: t)
    for x, y in data(3):
        for xs, ys in zip(x[rank::2].chunk(2), y[rank::2].chunk(2)):
            engine.backward(engine(cast(xs), cast(ys)))
            engine.step()
    if rank == 0:
        torch.save([m.detach().clone() for m in engine.masters], out)
    dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ddp_with_accumulation_steps_as_one_process_on_the_whole_batch(tmp_path, precision):
    """DDP must all-reduce the sum of the accumulated micro-steps, not just the last one."""
    import torch.multiprocessing as mp

    out = tmp_path / "masters.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), precision, str(out)), nprocs=2)
    cfg = load_config(None, ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=0", "optim.lr=1e-2"])
    single = eng.build_native_engine(Mean(), cfg, DistEnv.from_environ({}, []), device="cpu", precision=precision,
                                     steps_per_epoch=1, total_steps=10)
    cast = (lambda t: t.bfloat16()) if precision == "bf16" else (lambda t: t)
    train(single, [(cast(x), cast(y)) for x, y in data(3)])
    tolerance = {"atol": 0.02, "rtol": 0.02} if precision == "bf16" else {}
    for a, b in zip(torch.load(out), single.masters):
        torch.testing.assert_close(a, b, **tolerance)
