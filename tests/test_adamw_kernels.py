"""FlatAdamW's Triton update (trainer/flat_adamw_triton.py) against its torch update
(flat_adamw.clip_and_update), and the chunks it cuts the groups into against a brute-force
cover. On a GPU the update runs there; without one the kernels run in Triton's interpreter
(tests/conftest.py). The capture of the update in CUDA graphs is tested in tests/test_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from triton_compiler import run_compiler

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rgfusion.trainer import _triton_adamw_kernels as kernels  # noqa: E402

from rgfusion.trainer.flat_adamw import MOMENT_TYPES, FlatAdamW, clip_and_update  # noqa: E402
from rgfusion.trainer.flat_adamw_triton import TritonUpdate, cut  # noqa: E402

torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("sizes", [[5, 16, 40, 3, 8], [4104, 1, 2048, 2056], [8] * 5])
def test_chunks_cover_every_element_once(sizes):
    block, align = 32, 8
    rows, aligned = cut(sizes, block, align)
    seen = [torch.zeros(n, dtype=torch.int) for n in sizes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for k, (param, start, length, flat) in enumerate(rows):
        assert 0 < length <= block and flat == offsets[param] + start
        seen[param][start:start + length] += 1
        fits = all(v % align == 0 for v in (start, length, flat))
        assert fits == (k < aligned)  # the aligned chunks first, all of them
    assert all(torch.equal(s, torch.ones_like(s)) for s in seen)


def model(sizes: list[list[tuple[int, ...]]], seed: int) -> list[list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [[nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in group] for group in sizes]


# A bf16 group with a parameter that puts the ones after it off the 8-element grid, another
# with parameters that span several 2,048-element blocks, and beta1 = 0 in one group.
SIZES = [[(3, 700), (5,), (16, 130), (7,)], [(4100,), (24, 8)]]


def runs_of(*options: dict) -> list[tuple[list[list[nn.Parameter]], FlatAdamW]]:
    """The same model's two param groups (beta1 = 0 in the second), under each of the optimizer
    ``options``."""
    runs = []
    for extra in options:
        groups = model(SIZES, seed=0)
        opt = FlatAdamW([{"params": groups[0], "lr": 1e-2, "weight_decay": 0.1},
                         {"params": groups[1], "lr": 3e-3, "betas": (0.0, 0.99)}], lr=1e-2, max_norm=5.0, **extra)
        runs.append((groups, opt))
    return runs


def steps(runs, dtype: torch.dtype):
    """Four steps of every run on the same gradients, yielding after each: a clip that scales them
    in the first, a parameter without a gradient, and a non-finite gradient in the third that
    changes nothing and does not count the step."""
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        grads = [[torch.randn(p.shape, generator=gen).to(DEVICE, dtype) * (3 if i == 0 else 0.1) for p in g]
                 for g in runs[0][0]]
        if i == 2:
            grads[1][0][5] = math.inf
        for groups, opt in runs:
            for group, group_grads in zip(groups, grads):
                for p, g in zip(group, group_grads):
                    p.grad = None if p.shape == (7,) else g.clone()
            opt.step()
        yield i


@pytest.mark.parametrize("precision,moments", [("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")])
def test_kernels_step_as_the_torch_update(precision, moments):
    """Several steps (see ``steps``) of the kernels against the torch update. bf16 moments take
    the same random bits: at most the last place apart where the fp32 arithmetic differs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    runs = runs_of(*(dict(precision=precision, kernels=kernels, compiled=False, moments=moments)
                     for kernels in (False, True)))
    # Where the two fp32 moments differ in the last place (torch's lerp may fuse its multiply-add),
    # the rare element whose random bits fall between them rounds one bf16 step apart.
    close = dict(rtol=2**-7, atol=1e-6) if moments == "bf16" else dict(rtol=1e-5, atol=1e-7)
    master_close = dict(rtol=0, atol=1e-2 * 2**-6) if moments == "bf16" else dict(rtol=1e-5, atol=1e-6)
    for i in steps(runs, dtype):
        (_, torch_opt), (_, kernel_opt) = runs
        assert math.isfinite(float(kernel_opt.norm)) == (i != 2)
        torch.testing.assert_close(kernel_opt.norm, torch_opt.norm, equal_nan=True)
        for a, b in zip(torch_opt.flats, kernel_opt.flats):
            torch.testing.assert_close(b.master, a.master, **master_close)
            if b.weights is not None and DEVICE == "cuda":
                assert torch.equal(b.weights, b.master.bfloat16())
            elif b.weights is not None:  # the interpreter truncates to bf16 where a GPU rounds
                torch.testing.assert_close(b.weights.float(), b.master, rtol=2**-7, atol=0)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(kernel_opt.state[b.master][key], torch_opt.state[a.master][key], **close)
    assert kernel_opt.state[kernel_opt.flats[0].master]["step"] == 3
    assert kernel_opt.state[kernel_opt.flats[0].master]["exp_avg"].dtype == MOMENT_TYPES[moments]


MASK = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The hash, written out on Python integers."""
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK
    return x ^ (x >> 16)


@triton.jit
def _hash_and_round(index, x, bits, hashed, rounded, drawn, step, salt, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    h = kernels._mix(tl.load(index + offs, mask=mask).to(tl.uint32))
    tl.store(hashed + offs, h.to(tl.int32, bitcast=True), mask=mask)
    d = kernels._rounding_bits(offs, tl.load(step), salt)
    tl.store(drawn + offs, d.to(tl.int32, bitcast=True), mask=mask)
    r = kernels._round_stochastic(tl.load(x + offs, mask=mask), tl.load(bits + offs, mask=mask).to(tl.uint32))
    tl.store(rounded + offs, r, mask=mask)


def test_the_hash_and_the_rounding_agree_in_torch_python_and_the_kernels():
    from rgfusion.trainer.flat_adamw import mix32, round_stochastic, rounding_bits

    gen = torch.Generator().manual_seed(4)
    index = torch.cat([torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, MASK]),
                       torch.randint(0, 1 << 32, (250,), generator=gen, dtype=torch.int64)])
    expected = torch.tensor([lowbias32(int(i)) for i in index])
    assert torch.equal(mix32(index), expected)
    x = torch.randn(256, generator=gen) * 10.0 ** torch.randint(-20, 20, (256,), generator=gen)
    bits = torch.randint(0, 1 << 16, (256,), generator=gen)
    hashed, rounded = torch.empty(256, dtype=torch.int32), torch.empty(256, dtype=torch.bfloat16)
    drawn, step = torch.empty(256, dtype=torch.int32), torch.tensor(12345.0)
    on = [t.to(DEVICE) for t in (index, x, bits.to(torch.int32), hashed, rounded, drawn, step)]
    _hash_and_round[(1,)](*on, 3, 256, BLOCK=256)
    assert torch.equal(on[3].cpu().to(torch.int64) & MASK, expected)
    assert torch.equal(on[4].cpu().view(torch.int16), round_stochastic(x, bits).view(torch.int16))
    assert torch.equal(on[5].cpu().to(torch.int64) & MASK, rounding_bits(256, step, 3))  # the step's and group's draw


def test_stochastic_rounding_averages_to_the_value_over_all_bits():
    """Over all 2^16 values of the random bits, the rounded values' mean is the fp32 value
    exactly, and each is one of its two bf16 neighbours, for values of both signs and any size
    and for values bf16 holds already."""
    from rgfusion.trainer.flat_adamw import round_stochastic

    gen = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(6, generator=gen) * 10.0 ** torch.randint(-30, 30, (6,), generator=gen),
                        torch.tensor([1.0, -0.375, 0.0, 1e-40])])
    every = torch.arange(1 << 16)
    for x in values:
        out = round_stochastic(x.expand(1 << 16), every).double()
        assert out.mean().item() == x.item()
        cut = x.view(torch.int32) & ~0xFFFF
        neighbours = {cut.view(torch.float32).item(), (cut + 0x10000).view(torch.float32).item()}
        assert set(out.unique().tolist()) <= neighbours


def test_bf16_moments_follow_fp32_ones_where_rounding_to_the_nearest_freezes():
    """The second moment of a steady gradient climbs 0.1% of the way a step at beta2 = 0.999: to
    0.95 after 3,000 steps. Rounded to the nearest bf16 each step, it stops where that step is
    less than half a bf16 step (at 0.25); rounded stochastically it follows the fp32 one on average."""
    from rgfusion.trainer.flat_adamw import adamw_update

    n = 4096
    gen = torch.Generator().manual_seed(6)
    grad = 1 + 0.1 * torch.randn(n, generator=gen)
    runs = {kind: [torch.zeros(n), torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.zeros(())]
            for kind, dtype in (("fp32", torch.float32), ("nearest", torch.float32), ("stochastic", torch.bfloat16))}
    one, ok, lr = torch.ones(()), torch.tensor(True), torch.tensor(1e-4)
    for _ in range(3000):
        for kind, (master, m, v, step) in runs.items():
            step += 1
            adamw_update(grad, master, m, v, None, one, ok, lr, step, 0.9, 0.999, 1e-8, 0.0)
            if kind == "nearest":
                m.copy_(m.bfloat16())
                v.copy_(v.bfloat16())
    exact = runs["fp32"][2]
    torch.testing.assert_close(exact.mean(), torch.tensor(0.95 * (1 + 0.01)), rtol=0.01, atol=0)
    assert runs["nearest"][2].mean() < 0.3
    # Unbiased, with a noise of about 1.5% (each step's rounding, averaged over beta2's memory).
    error = runs["stochastic"][2].float() / exact - 1
    assert abs(error.mean()) < 1e-3 and error.std() < 0.025
    # The masters moved 0.3 and stay within a few percent of that of the fp32 ones.
    assert (runs["stochastic"][0] - runs["fp32"][0]).abs().max() < 0.02


@pytest.mark.parametrize("update,sums", [((16, 1), (64, 2)), ((128, 4), (16, 1))])
def test_any_program_shapes_give_the_torch_update(update, sums):
    """Small chunks: every parameter in several, the sums of squares cut apart from AdamW's, and
    a gradient that is a view starting off 16 bytes (which the kernels read from a copy)."""
    sizes = [[5 * 24, 40, 3], [300]]
    gen = torch.Generator().manual_seed(2)

    def state() -> list:
        grads = [[torch.randn(n, generator=gen).to(DEVICE, torch.bfloat16) for n in group] for group in sizes]
        grads[0][1] = torch.cat([grads[0][1][:1], grads[0][1]])[1:]
        buffers = [[torch.randn(sum(group), generator=gen).to(DEVICE).abs() for group in sizes] for _ in range(3)]
        weights = [m.bfloat16() for m in buffers[0]]
        steps = [torch.tensor(3.0, device=DEVICE) for _ in sizes]
        lrs = [torch.tensor(lr, device=DEVICE) for lr in (1e-2, 3e-3)]
        return [grads, *buffers, weights, lrs, steps, [(0.9, 0.99, 1e-8, 0.1), (0.8, 0.999, 1e-6, 0.0)], 2.0,
                torch.tensor(True, device=DEVICE)]

    reference = state()
    gen.manual_seed(2)
    kernel = state()
    norms = [clip_and_update(*reference), TritonUpdate(sizes, torch.device(DEVICE), update, sums)(*kernel)]
    torch.testing.assert_close(norms[1], norms[0])
    for a, b in zip(reference[1:4] + [reference[6]], kernel[1:4] + [kernel[6]]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_split_master_holds_fp32_exactly_and_rounds_to_the_nearest_bf16():
    from rgfusion.trainer.flat_adamw import join_master, split_master

    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-30, 30, (4000,), generator=gen),
                        torch.tensor([0.0, -0.0, 1.0, -1.0, 3.4e38, -3.4e38, 1e-40, -1e-40])])
    bits = values.view(torch.int32)
    # Exact ties between two bf16 values, of both signs and both parities of the upper half.
    ties = ((bits[:64] & ~0xFFFF) | 0x8000).view(torch.float32)
    values = torch.cat([values, ties])
    weights, low = split_master(values)
    assert weights.dtype == torch.bfloat16 and low.dtype == torch.int16
    chunked = split_master(values.view(8, -1), chunk=999)  # chunks that end mid-row, the last one short
    assert torch.equal(chunked[0].view(-1).view(torch.int16), weights.view(torch.int16))
    assert torch.equal(chunked[1].view(-1), low) and chunked[0].shape == (8, 509)
    assert torch.equal(join_master(weights, low).view(torch.int32), values.view(torch.int32))
    tie = (values.view(torch.int32) & 0xFFFF) == 0x8000
    assert tie.sum() >= 64
    # Elsewhere the nearest bf16, as torch rounds; at a tie the one away from zero.
    assert torch.equal(weights[~tie].view(torch.int16), values[~tie].bfloat16().view(torch.int16))
    assert (weights[tie].float().abs() > values[tie].abs()).all()


def test_split_masters_step_exactly_as_fp32_ones():
    """The kernels on split masters against the same kernels on fp32 ones: the same masters to
    the bit, the same moments, and the weights the masters' rounding; a non-finite step and a
    parameter without a gradient included."""
    from rgfusion.trainer.flat_adamw import split_master

    runs = runs_of(*(dict(precision="bf16", kernels=True, master=kind) for kind in ("fp32", "split")))
    for _ in steps(runs, torch.bfloat16):
        pass
    (_, fp32), (groups, split) = runs
    for a, b in zip(fp32.flats, split.flats):
        assert torch.equal(b.master_values().view(torch.int32), a.master.view(torch.int32))
        assert torch.equal(b.weights.view(torch.int16), split_master(a.master)[0].view(torch.int16))
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(split.state[b.key][key], fp32.state[a.key][key])
    # The parameters are views of the weights the update wrote.
    assert torch.equal(groups[0][0].detach().reshape(-1), split.flats[0].weights[: 3 * 700])


def test_split_masters_save_and_load_as_fp32_ones():
    from rgfusion.trainer.flat_adamw import split_master

    def optimizer(master: str) -> FlatAdamW:
        return FlatAdamW([{"params": g} for g in model(SIZES, seed=0)], precision="bf16", lr=1e-2, kernels=True,
                         master=master)

    fp32, split = optimizer("fp32"), optimizer("split")
    for a, b in zip(fp32.masters(), split.masters()):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    # Masters saved from either kind load into a split optimizer: its weights round them.
    values = [m * 1.5 for m in fp32.masters()]
    split.load_masters(values)
    for a, b in zip(values, split.masters()):
        assert torch.equal(a, b)
    assert torch.equal(split.flats[1].weights, split_master(torch.cat([v.reshape(-1) for v in values[4:]]))[0])
    for g in split.flats:
        for p in g.params:
            p.grad = torch.ones_like(p)
    split.step()
    state = split.state_dict()
    again = optimizer("split")
    again.load_state_dict(state)
    again.load_masters(split.masters())
    for a, b in zip(split.masters(), again.masters()):
        assert torch.equal(a, b)
    assert torch.equal(again.state[again.flats[0].key]["exp_avg"], split.state[split.flats[0].key]["exp_avg"])
    fp32.load_state_dict(state)  # moments and steps are the same either way


@pytest.mark.parametrize("kwargs,message", [(dict(precision="fp32", kernels=True), "fp32 weights"),
                                            (dict(precision="bf16", kernels=False), "no kernels"),
                                            (dict(master="fp16"), "'fp32' or 'split'")])
def test_split_masters_need_bf16_and_the_kernels(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlatAdamW([{"params": model(SIZES, seed=0)[0]}], lr=1e-2, **{"master": "split", **kwargs})


@pytest.mark.parametrize("case", ["clips", "under", "no limit", "non-finite", "loss not finite"])
def test_the_clip_kernel_is_torchs_clip(case):
    """TritonUpdate.conclude (one kernel) against the torch ops it replaced: the norm of the
    partial sums, the clip scale, whether to update, and each group's step count advanced by that."""
    update = TritonUpdate([[300, 5000], [70]], torch.device(DEVICE))
    gen = torch.Generator().manual_seed(7)
    partial = torch.rand(len(update.partial), generator=gen) * (0.001 if case == "under" else 10.0)
    if case == "non-finite":
        partial[1] = math.inf
    update.partial.copy_(partial)
    max_norm = math.inf if case == "no limit" else 2.0
    finite = torch.tensor(case != "loss not finite", device=DEVICE)
    steps = [torch.tensor(float(n), device=DEVICE) for n in (4, 9)]
    norm, scale, ok = update.conclude(max_norm, finite, steps)
    want = partial.double().sum().sqrt()
    go = bool(want.isfinite()) and case != "loss not finite"
    assert float(ok) == float(go) and [float(s) for s in steps] == [4 + go, 9 + go]
    torch.testing.assert_close(norm.cpu().double(), want.float().double(), rtol=1e-6, atol=0)
    if go:
        torch.testing.assert_close(float(scale), min(max_norm / (float(want) + 1e-6), 1.0), rtol=1e-6, atol=0)
        assert (float(scale) < 1) == (case == "clips")


def test_rounding_bits_are_even_and_independent():
    """The 16 random bits each moment takes are uniform (their top 8 bits over 256 buckets: the
    chi-square statistic's mean over 20 draws near its expectation of 255, against about 297 when
    the index went into the hash unspread), and uncorrelated between neighbours, between the two
    moments and between steps."""
    from rgfusion.trainer.flat_adamw import rounding_bits

    n = 1 << 20
    draws = [rounding_bits(n, torch.tensor(float(step)), salt) for step in range(1, 6) for salt in (0, 1)]
    halves = [h for b in draws for h in (b & 0xFFFF, b >> 16)]
    expected = n / 256
    chi = torch.tensor([((torch.bincount(h >> 8, minlength=256) - expected) ** 2 / expected).sum() for h in halves])
    assert 235 < chi.mean() < 280
    for a, b in [(halves[0][:-1], halves[0][1:]), (halves[0], halves[1]), (halves[0], halves[4])]:
        assert abs(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]) < 0.01


COMPILE_FOR_SM90 = r'''
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rgfusion.trainer import _triton_adamw_kernels as kernels

FLAGS = dict(GRAD=tl.bfloat16, HAS_WEIGHTS=True, SPLIT=False, ALIGNED=True, BLOCK=1024)
SCALARS = ("beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay")
moments, salt = sys.argv[1], int(sys.argv[2])
for fn in (kernels._adamw.fn, kernels._adamw_range.fn):
    kernel = getattr(kernels, fn.__name__)
    types, constants = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in FLAGS or (name == "salt" and salt == 1):  # the JIT passes an integer 1 as a constexpr
            types[name], constants[(i,)] = "constexpr", FLAGS.get(name, salt)
        elif name in SCALARS:
            types[name] = "fp32"
        elif name in ("salt", "lo", "hi"):
            types[name] = "i32"
        elif name in ("exp_avg", "exp_avg_sq"):
            types[name] = "*" + moments
        else:
            types[name] = "*i64" if name in ("table", "param", "start", "length", "flat") else "*fp32"
    triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constants), target=GPUTarget("cuda", 90, 32))
print("compiled")
'''


@pytest.mark.parametrize("moments,salt", [("bf16", 1), ("bf16", 2), ("fp32", 1)])
def test_the_update_kernels_compile_for_every_group_number(moments, salt):
    """The compiler, not the interpreter (a subprocess without TRITON_INTERPRET): Triton's JIT
    passes an integer argument equal to 1 as a constexpr, so the second group's ``salt`` reached
    the kernel as a Python int, which the interpreter never shows (an H200 run of session 22)."""
    done = run_compiler(["-c", COMPILE_FOR_SM90, moments, str(salt)], timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]
