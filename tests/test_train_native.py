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
from rgfusion.trainer.flat_adamw import FlatAdamW, adamw_update
from rgfusion.trainer.native import STATE_FILE

torch.set_num_threads(1)


class Mean(nn.Module):
    """Mean-reduced regression loss on a small MLP: halves of a batch average to the whole."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.net(x).squeeze(-1) - y) ** 2).mean()


NATIVE = ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=2", "optim.schedule=constant",
          "optim.lr=1e-2"]


def native(*overrides: str):
    cfg = load_config(None, [*NATIVE, *overrides])
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


@pytest.mark.parametrize("clip", [0.5, 2.5, 0.0])  # norms are 2-3: all, some or (0) no steps clipped
def test_steps_match_torch_adamw_with_clipping_and_warmup(clip):
    engine = native(f"optim.grad_clip={clip}")
    ref = Mean()
    decay = {id(p): g["weight_decay"] for g, f in zip(engine.optimizer.param_groups, engine.optimizer.flats)
             for p in f.params}
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
        norm = nn.utils.clip_grad_norm_(ref.parameters(), clip or math.inf)
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
    state = engine.optimizer.state.values()
    steps = [s["step"].clone() for s in state]
    x, y = data(1, seed=1)[0]
    engine.backward(engine(x, y) * float("nan"))
    engine.step()
    assert math.isnan(engine.get_global_grad_norm())
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert [s["step"] for s in state] == steps == [torch.tensor(1.0)] * len(steps)
    assert all(p.grad is None for p in engine.module.parameters())  # the bad gradients are gone


def native_bf16(*overrides: str):
    cfg = load_config(None, ["train.engine=native", "train.zero_stage=0", "optim.warmup_steps=0", "optim.lr=1e-2",
                             *overrides])
    return eng.build_native_engine(Mean(), cfg, DistEnv.from_environ({}, []), device="cpu", precision="bf16",
                                   steps_per_epoch=1, total_steps=10)


def test_bf16_computes_in_bf16_and_steps_fp32_masters():
    engine, fp32 = native_bf16(), native("optim.warmup_steps=0")
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert all(m.dtype == torch.float32 for m in engine.optimizer.masters())
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in data()]
    train(engine, batches)
    train(fp32, data())
    for m, p, ref in zip(engine.optimizer.masters(), engine.params, fp32.params):  # all in parameter-group order
        assert torch.equal(p, m.bfloat16())  # the model holds the rounded masters
        torch.testing.assert_close(m, ref, atol=0.05, rtol=0.05)  # bf16 compute, same trajectory
    # Two accumulated halves step as the whole batch does.
    split = native_bf16("train.grad_accum=2", "train.batch_size=128")
    train(split, batches, split=2)
    for a, b in zip(split.optimizer.masters(), engine.optimizer.masters()):
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
    for a, b in zip(straight.optimizer.masters(), resumed.optimizer.masters()):
        assert torch.equal(a, b)


def test_split_masters_resume_exactly_and_refuse_a_run_without_their_kernels(tmp_path, monkeypatch):
    """optim.master=split: a checkpoint holds the joined fp32 masters, and a resumed run steps on
    to the same masters, to the bit. Split masters need FlatAdamW's Triton kernels: on a CPU a run
    stops at the start with a one-line reason; here the kernels run in Triton's interpreter."""
    import functools

    from rgfusion.trainer import native as native_engine

    with pytest.raises(ConfigError, match="optim.master 'split' needs bf16 weights and FlatAdamW's Triton kernels"):
        native_bf16("optim.master=split")
    pytest.importorskip("triton")
    monkeypatch.setattr(native_engine, "FlatAdamW", functools.partial(FlatAdamW, kernels=True))
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in data()]
    straight, first = native_bf16("optim.master=split"), native_bf16("optim.master=split")
    assert first.optimizer.flats[0].low is not None
    train(straight, batches)
    train(first, batches[:2])
    first.save_checkpoint(str(tmp_path), tag="step-00000002")
    saved = torch.load(tmp_path / "step-00000002" / STATE_FILE, weights_only=True)["module"]
    assert all(v.dtype == torch.float32 for v in saved.values())
    resumed = native_bf16("optim.master=split")
    resumed.load_checkpoint(str(tmp_path), tag="step-00000002")
    train(resumed, batches[2:])
    for a, b in zip(straight.optimizer.masters(), resumed.optimizer.masters()):
        assert torch.equal(a, b)
    for p, m in zip(resumed.params, resumed.optimizer.masters()):
        torch.testing.assert_close(p.float(), m, rtol=2**-8, atol=0)  # the model holds them rounded


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_update_is_torch_adamw_on_the_scaled_gradient(dtype):
    """adamw_update against torch.optim.AdamW on a copy: weight decay, clip scales, and a
    non-finite step that changes nothing and is not counted."""
    gen = torch.Generator().manual_seed(0)
    master = torch.randn(300, generator=gen)
    ref = nn.Parameter(master.clone())
    opt = torch.optim.AdamW([ref], betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    m, v, step = torch.zeros(300), torch.zeros(300), torch.zeros(())
    weights = master.bfloat16() if dtype == torch.bfloat16 else None
    for scale, lr in [(1.0, 1e-2), (0.3, 5e-3), (math.nan, 1e-2), (0.7, 2e-2)]:
        grad = torch.randn(300, generator=gen).to(dtype) * (1 if math.isfinite(scale) else math.inf)
        scale, ok = torch.tensor(scale), torch.tensor(math.isfinite(scale))
        if ok:
            ref.grad = grad.float() * scale
            opt.param_groups[0]["lr"] = lr
            opt.step()
        step += ok
        adamw_update(grad, master, m, v, weights, scale, ok, torch.tensor(lr), step, 0.8, 0.95, 1e-6, 0.1)
        state = opt.state[ref]
        torch.testing.assert_close(master, ref.detach())
        torch.testing.assert_close(m, state["exp_avg"])
        torch.testing.assert_close(v, state["exp_avg_sq"])
        assert torch.equal(step, state["step"])
        assert weights is None or torch.equal(weights, master.bfloat16())


def test_bf16_weights_are_views_into_the_flat_buffers():
    """The update writes the bf16 weights as the rounded masters, in place, and drops the
    gradients so the next backward hands over fresh ones."""
    engine = native_bf16()
    flats = engine.optimizer.flats
    for x, y in data(3):
        engine.backward(engine(x.bfloat16(), y.bfloat16()))
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for f in flats for p in f.params)
        engine.step()
        for f in flats:
            assert [p.data_ptr() for p in f.params] == [w.data_ptr() for w in f.views(f.weights)]
            assert torch.equal(f.weights, f.master.bfloat16()) and all(p.grad is None for p in f.params)
    assert engine.optimizer.state[flats[0].master]["step"] == 3


def test_a_parameter_without_a_gradient_keeps_its_value():
    """A parameter backward never reached steps on a zero gradient: without weight decay it
    stays where it was."""
    model = Mean()
    groups = [{"params": list(model.parameters()), "lr": 1e-2}]
    opt = FlatAdamW(groups, precision="fp32", lr=1e-2)
    frozen = model.net[2].bias.detach().clone()
    x, y = data(1)[0]
    model(x, y).backward()
    model.net[2].bias.grad = None
    opt.step()
    assert torch.equal(model.net[2].bias.detach(), frozen)


# Inductor's CPU backend imports torch.utils.mkldnn, which warns about its own use of torch.jit.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_step_matches_the_eager_one_without_recompiling():
    """The path CUDA takes: clip and all group updates compiled as one graph, whose guards hold
    from step to step (a recompile per step would cost seconds each)."""
    def build(compiled: bool) -> tuple[Mean, FlatAdamW]:
        model = Mean()
        groups = eng.param_groups(model, load_config(None, []).optim, {})
        return model, FlatAdamW(groups, precision="bf16", lr=1e-2, weight_decay=0.1, max_norm=0.5, compiled=compiled)

    runs = [build(False), build(True)]
    for i, (x, y) in enumerate(data(4)):
        for model, opt in runs:
            (model(x.bfloat16(), y.bfloat16()) * (math.nan if i == 2 else 1)).backward()
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                opt.step()
        eager_norm, compiled_norm = (float(opt.norm) for _, opt in runs)
        assert compiled_norm == pytest.approx(eager_norm, nan_ok=True) and math.isnan(eager_norm) == (i == 2)
    (eager, _), (compiled, _) = runs
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b)


def test_loads_the_optimizer_state_of_the_engine_before_flat_buffers(tmp_path):
    """Its checkpoints hold torch.optim.AdamW's state, one entry per parameter in group order."""
    cfg = load_config(None, NATIVE)
    model, batches = Mean(), data(4)
    opt = torch.optim.AdamW(eng.param_groups(model, cfg.optim, {}), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    schedule = eng.lr_schedule(cfg, steps_per_epoch=10, total_steps=20)(opt)
    for x, y in batches[:2]:
        opt.zero_grad()
        model(x, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        schedule.step()
    (tmp_path / "step-00000002").mkdir()
    torch.save({"module": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": schedule.state_dict(),
                "global_steps": 2, "micro_steps": 2}, tmp_path / "step-00000002" / STATE_FILE)
    resumed = native()
    resumed.load_checkpoint(str(tmp_path), tag="step-00000002")
    for key in ("exp_avg", "exp_avg_sq"):
        flat = [resumed.optimizer.state[f.master][key] for f in resumed.optimizer.flats]
        per_param = [opt.state[p][key].reshape(-1) for g in opt.param_groups for p in g["params"]]
        assert torch.equal(torch.cat(flat), torch.cat(per_param))
    straight = native()
    train(straight, batches)
    train(resumed, batches[2:])
    for a, b in zip(straight.module.parameters(), resumed.module.parameters()):
        torch.testing.assert_close(a, b)


def test_a_parameter_without_old_state_gets_zero_moments():
    """torch.optim.AdamW keeps no state for a parameter that never had a gradient."""
    groups = [{"params": [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))], "lr": 1e-2}]
    old = torch.optim.AdamW(groups[0]["params"])
    groups[0]["params"][1].grad = torch.ones(2, 2)
    old.step()
    opt = FlatAdamW(groups, precision="fp32", lr=1e-2)
    opt.load_state_dict(old.state_dict())
    state = opt.state[opt.flats[0].master]
    assert state["step"] == 1 and torch.equal(state["exp_avg"][:3], torch.zeros(3))
    assert torch.equal(state["exp_avg"][3:], old.state[groups[0]["params"][1]]["exp_avg"].reshape(-1))


@pytest.mark.parametrize("key,value", [("master", "split"), ("moments", "bf16")])
def test_split_masters_and_bf16_moments_need_the_native_engine(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key} '{value}' is the native engine's"):
        load_config(None, [f"optim.{key}={value}"])
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        load_config(None, [f"optim.{key}=fp16"])


def test_bf16_moments_resume_exactly_and_load_fp32_ones(tmp_path):
    """optim.moments=bf16: the moments are bf16 in the optimizer and its checkpoint, a resumed
    run steps on to the same masters to the bit (the rounding's bits come from the step count, not
    a generator), and a run with fp32 moments resumes from the checkpoint too."""
    batches = [(x.bfloat16(), y.bfloat16()) for x, y in data()]
    straight, first = native_bf16("optim.moments=bf16"), native_bf16("optim.moments=bf16")
    train(straight, batches)
    train(first, batches[:2])
    first.save_checkpoint(str(tmp_path), tag="step-00000002")
    resumed = native_bf16("optim.moments=bf16")
    resumed.load_checkpoint(str(tmp_path), tag="step-00000002")
    state = resumed.optimizer.state[resumed.optimizer.flats[0].key]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg_sq"], first.optimizer.state[first.optimizer.flats[0].key]["exp_avg_sq"])
    train(resumed, batches[2:])
    for a, b in zip(straight.optimizer.masters(), resumed.optimizer.masters()):
        assert torch.equal(a, b)
    fp32 = native_bf16()
    fp32.load_checkpoint(str(tmp_path), tag="step-00000002")
    train(fp32, batches[2:])
    for a, b in zip(straight.optimizer.masters(), fp32.optimizer.masters()):
        torch.testing.assert_close(a, b, rtol=0.01, atol=1e-3)


def test_cuda_graph_compile_needs_the_native_engine():
    with pytest.raises(ConfigError, match="reduce-overhead"):
        load_config(None, ["train.compile=true", "train.compile_mode=reduce-overhead"])


@pytest.mark.parametrize("sets", [["train.cuda_graph=true"],
                                  ["train.cuda_graph=true", "train.engine=native", "train.zero_stage=0",
                                   "train.grad_accum=2"],
                                  ["train.cuda_graph=true", "train.engine=native", "train.zero_stage=0",
                                   "train.compile=true", "train.compile_mode=reduce-overhead"]])
def test_cuda_graph_needs_native_one_micro_step_and_no_graphs_of_inductor(sets):
    with pytest.raises(ConfigError, match="cuda_graph needs engine 'native', grad_accum 1"):
        load_config(None, sets)


def test_cuda_graph_is_refused_on_a_cpu_in_one_line(tmp_path):
    from rgfusion.trainer import loop

    cfg = load_config(None, ["train.cuda_graph=true", "train.engine=native", "train.zero_stage=0",
                             "train.device=cpu", f"train.out_dir={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="train.cuda_graph runs one process on a CUDA device"):
        loop.train(cfg)


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
        torch.save([m.detach().clone() for m in engine.optimizer.masters()], out)
    # Both ranks leave together: a rank tearing gloo down while its peer still talks to it was
    # seen to abort ("terminate called without an active exception") in a full test run.
    eng.leave_distributed(env)
    assert not dist.is_initialized()


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
    for a, b in zip(torch.load(out), single.optimizer.masters()):
        torch.testing.assert_close(a, b, **tolerance)


def test_an_optimizer_state_of_another_layout_is_refused_in_one_line():
    """A checkpoint from a model with other param groups must not load moments into the wrong
    parameters."""
    def opt(*sizes: tuple[int, ...]) -> FlatAdamW:
        return FlatAdamW([{"params": [nn.Parameter(torch.ones(s)) for s in group], "lr": 1e-2} for group in sizes],
                         precision="fp32", lr=1e-2)

    saved = opt([(3,), (2, 2)]).state_dict()
    with pytest.raises(ValueError, match="the saved optimizer has 1 param groups, this one 2"):
        opt([(3,)], [(4,)]).load_state_dict(saved)
    old = torch.optim.AdamW([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="saved param group 0 has 3 parameters, this one 2"):
        opt([(3,), (2, 2)]).load_state_dict(old.state_dict())
