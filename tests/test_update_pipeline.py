"""The update pipelined with the next forward (trainer/update_pipeline.py): FlatAdamW's gathered
update in ranges against its own step, stages that no forward reads ahead of, and pipelined steps
against end-of-step ones. Off CUDA a stage runs at the step's start; the streams and their
events are tested in tests/test_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from rgfusion.trainer.flat_adamw import FlatAdamW  # noqa: E402
from rgfusion.trainer.update_pipeline import UpdatePipeline, order_groups, plan_stages  # noqa: E402

torch.set_num_threads(1)


def flat_runs(dtype: torch.dtype, moments: str = "fp32") -> list[tuple[list[list[nn.Parameter]], FlatAdamW]]:
    """Two optimizers over copies of one model's two groups; a size of 5 puts later parameters
    off the 8-element grid."""
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        groups = [[nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
                  for sizes in ([(3, 70), (5,), (16, 13)], [(410,), (24, 8)])]
        opt = FlatAdamW([{"params": groups[0], "lr": 1e-2, "weight_decay": 0.1},
                         {"params": groups[1], "lr": 3e-3, "betas": (0.0, 0.99)}],
                        precision="bf16" if dtype == torch.bfloat16 else "fp32", lr=1e-2, max_norm=5.0, kernels=True,
                        moments=moments)
        runs.append((groups, opt))
    return runs


@pytest.mark.parametrize("dtype,moments", [(torch.bfloat16, "fp32"), (torch.float32, "fp32"),
                                           (torch.bfloat16, "bf16")])
def test_gathered_update_in_ranges_is_the_update(dtype, moments):
    """gather, conclude and apply_range over pieces of each group (one starting off the 8-element
    grid) give FlatAdamW.step's masters, moments, steps and weights to the bit: a clip that
    scales, a parameter without a gradient, and a non-finite gradient that changes nothing. bf16
    moments round with the same random bits however the group is cut."""
    (plain_groups, plain), (piped_groups, piped) = flat_runs(dtype, moments)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        grads = [[torch.randn(p.shape, generator=gen).to(dtype) * (3 if i == 0 else 0.1) for p in g]
                 for g in plain_groups]
        if i == 2:
            grads[1][0][5] = math.inf
        for groups in (plain_groups, piped_groups):
            for group, group_grads in zip(groups, grads):
                for p, g in zip(group, group_grads):
                    p.grad = None if p.shape == (5,) else g.clone()
        plain.step()
        piped.gather([1])
        piped.gather([0])
        piped.conclude()
        assert all(p.grad is None for g in piped_groups for p in g)
        for group, cuts in ((0, (0, 213, 215, 423)), (1, (0, 7, 602))):
            for lo, hi in zip(cuts, cuts[1:]):
                piped.apply_range(group, lo, hi)
        assert math.isfinite(float(piped.norm)) == (i != 2)
        torch.testing.assert_close(piped.norm, plain.norm, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(plain.flats, piped.flats):
            assert torch.equal(b.master, a.master)
            if a.weights is not None:
                assert torch.equal(b.weights, a.weights)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(piped.state[b.key][key], plain.state[a.key][key])
    assert piped.state[piped.flats[0].key]["step"] == 3


def test_a_gathered_update_needs_the_kernels():
    opt = FlatAdamW([{"params": [nn.Parameter(torch.ones(4))]}], lr=0.1, kernels=False, compiled=False)
    with pytest.raises(ValueError, match="gather needs the Triton kernels"):
        opt.gather([0])


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Early(nn.Module):
    """Reads the last blocks' weights before it calls any block, as the joint graph computes every
    layer's geometry bias first."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x):
        early = sum(b.lin.weight.sum(0) for b in self.blocks[2:])
        x = x * self.scale + 0.01 * early
        for b in self.blocks:
            x = b(x)
        return x


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = Early()
        self.text = nn.Sequential(nn.Embedding(20, 8), *(Block() for _ in range(3)))

    def forward(self, x, tokens):
        return self.image(x), self.text(tokens).mean(1)


def towers_and_batch():
    model = Towers()
    return model, torch.randn(6, 8), torch.randint(0, 20, (6, 5))


def test_stages_begin_before_every_first_read_of_their_parameters():
    model, x, tokens = towers_and_batch()
    stages = plan_stages([model.image, model.text], lambda: model(x, tokens), parts=4)
    by_tower = [[s for s in stages if s.tower == t] for t in (0, 1)]
    assert all(len(s) >= 3 for s in by_tower)  # several stages per tower
    assert by_tower[0][0].module is model.image and by_tower[1][0].module is model.text
    members = [p for s in stages for p in s.params]
    assert len(members) == len(list(model.parameters())) == len({id(p) for p in members})
    stage_of = {p: i for i, s in enumerate(stages) for p in s.params}
    assert stage_of[model.image.blocks[3].lin.weight] == stage_of[model.image.scale]  # read before any block
    begun: set[int] = set()
    for i, s in enumerate(stages):
        s.module.register_forward_pre_hook(lambda _m, _a, i=i: begun.add(i))
    getattr_ = nn.Module.__getattr__

    def reading(module, name):
        value = getattr_(module, name)
        if isinstance(value, nn.Parameter):
            assert stage_of[value] in begun, f"{name} read before its stage began"
        return value

    nn.Module.__getattr__ = reading
    try:
        model(x, tokens)
    finally:
        nn.Module.__getattr__ = getattr_
    assert begun == set(range(len(stages)))


def pipelined(model, x, tokens, parts: int = 4):
    stages = plan_stages([model.image, model.text], lambda: model(x, tokens), parts=parts)
    groups = order_groups([{"params": list(model.parameters()), "weight_decay": 0.1}], stages)
    opt = FlatAdamW(groups, precision="fp32", lr=1e-2, max_norm=1.0, kernels=True)
    return UpdatePipeline(opt, stages, torch.device("cpu"))


@pytest.mark.parametrize("compiled", [False, True])
def test_pipelined_steps_give_the_end_of_step_losses(compiled):
    """Four steps with the update at each step's end and four pipelined (torch.compile's graph
    broken at each stage's wait where ``compiled``): the same losses and, once the pipeline's last
    update is flushed, the same weights."""
    losses, weights = [], []
    for mode in ("end", "pipelined"):
        model, x, tokens = towers_and_batch()
        if mode == "end":
            opt = FlatAdamW([{"params": list(model.parameters()), "weight_decay": 0.1}], precision="fp32", lr=1e-2,
                            max_norm=1.0, kernels=True)
        else:
            pipeline = pipelined(model, x, tokens)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        got = []
        for _ in range(4):
            if mode == "pipelined":
                pipeline.start()
            img, cap = forward(x, tokens)
            if mode == "pipelined":
                pipeline.join()
            loss = (img - cap).square().mean()
            loss.backward()
            if mode == "pipelined":
                pipeline.finish({})
            else:
                opt.step()
            got.append(loss.item())
        if mode == "pipelined":
            pipeline.flush()
            assert not pipeline.pending
        losses.append(got)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert losses[0] == losses[1] and len(set(losses[0])) == 4
    for a, b in zip(*weights):
        assert torch.equal(a, b)


def test_a_stage_must_lie_together_in_its_group():
    model, x, tokens = towers_and_batch()
    stages = plan_stages([model.image, model.text], lambda: model(x, tokens), parts=4)
    mixed = [{"params": list(model.image.parameters())}, {"params": list(model.text.parameters())}]
    opt = FlatAdamW(mixed, precision="fp32", lr=1e-2, kernels=True)
    with pytest.raises(ValueError, match="must lie together"):
        UpdatePipeline(opt, stages, torch.device("cpu"))
    outside = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="belong to no stage"):
        order_groups([{"params": [*model.parameters(), outside]}], stages)


def test_a_probe_that_skips_a_tower_is_an_error():
    model, x, _ = towers_and_batch()
    with pytest.raises(ValueError, match=r"did not call tower\(s\) \[1\]"):
        plan_stages([model.image, model.text], lambda: model.image(x))
