"""Triton kernels of FlatAdamW's update on CUDA (trainer/flat_adamw.py): the gradients' sum of
squares and AdamW over a param group's flat buffers, reading each parameter's gradient where
autograd left it.

The gradients are fresh tensors each step, so the kernels take their addresses from a device
table and cut the work into chunks of at most BLOCK elements of one parameter (each kernel its
own BLOCK). Chunk ``c`` covers elements ``start[c]:start[c] + length[c]`` of parameter
``param[c]``, at ``flat[c]`` in the group's buffers. Where the launch says ALIGNED, every chunk
starts and ends on a multiple of ALIGN elements, which, with gradients that start on 16 bytes,
lets the compiler load and store whole 16-byte vectors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rgfusion.trainer.flat_adamw import GOLDEN, HASH

# flat_adamw's hash constants as the kernels read them: torch's update and the kernels draw the same bits.
_HASH0, _HASH1, _GOLDEN = tl.constexpr(HASH[0]), tl.constexpr(HASH[1]), tl.constexpr(GOLDEN)

# Elements and warps per program, of AdamW's kernel and of the sums of squares' (benchmarks/adamw_bench.py).
UPDATE, SUMS = (1024, 4), (32768, 8)
ALIGN = 8  # elements: a 16-byte vector of bf16


@triton.jit
def _chunk(table, param, start, length, c, ALIGNED: tl.constexpr):
    """Chunk ``c``'s gradient address (an integer), first element and length."""
    address = tl.load(table + tl.load(param + c))
    first = tl.load(start + c)
    count = tl.load(length + c)
    if ALIGNED:
        first = tl.multiple_of(first, 8)
        count = tl.multiple_of(count, 8)
    return address, first, count


@triton.jit
def _gradient(address, first, count, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """The chunk's gradient in fp32, zero past its end, and the mask of its elements. Every
    gradient starts on 16 bytes (flat_adamw_triton.readable sees to it)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < count
    base = tl.multiple_of(address.to(tl.pointer_type(GRAD)), 16)
    g = tl.load(base + first + offs, mask=mask, other=0.0)
    return g.to(tl.float32), mask


@triton.jit
def _sum_squares(table, param, start, length, flat, partial, gathered, GRAD: tl.constexpr, ALIGNED: tl.constexpr,
                 GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """``partial[c]``: the sum of chunk ``c``'s squared gradient elements. GATHER: the chunk is
    also copied to its place in the group's flat ``gathered`` gradient."""
    c = tl.program_id(0)
    address, first, count = _chunk(table, param, start, length, c, ALIGNED)
    g, mask = _gradient(address, first, count, GRAD, BLOCK)
    tl.store(partial + c, tl.sum(g * g))
    if GATHER:
        at = tl.load(flat + c)
        if ALIGNED:
            at = tl.multiple_of(at, 8)
        tl.store(gathered + at + tl.arange(0, BLOCK), g.to(gathered.dtype.element_ty), mask=mask)


@triton.jit
def _conclude(partial, n, finite_ptr, steps, n_steps, out, max_norm, BLOCK: tl.constexpr):
    """The clip from the ``n`` partial sums of squares, in one program where torch took a dozen
    small kernels at the end of the step: ``out`` = (the global norm, the clip scale, 1 where the
    update goes ahead: a finite norm and a true ``finite``), and each group's step count (the
    float32 at each address of ``steps``) advanced where it does."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial + offs, mask=offs < n, other=0.0)
    norm = tl.sqrt(tl.sum(acc))
    ok = ((norm < float("inf")) & (tl.load(finite_ptr) != 0)).to(tl.float32)  # NaN < inf is false
    tl.store(out, norm)
    tl.store(out + 1, tl.minimum(max_norm / (norm + 1e-6), 1.0))
    tl.store(out + 2, ok)
    for i in range(n_steps):
        step = tl.load(steps + i).to(tl.pointer_type(tl.float32))
        tl.store(step, tl.load(step) + ok)


@triton.jit
def _join(high, low):
    """flat_adamw.join_master: the fp32 value of bf16 ``high`` and int16 ``low``."""
    bits = (high.to(tl.uint16, bitcast=True).to(tl.uint32) << 16) + low.to(tl.int32).to(tl.uint32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split(x):
    """flat_adamw.split_master: fp32 ``x`` as bf16 rounded half away from zero and the int16 rest."""
    bits = x.to(tl.uint32, bitcast=True)
    high = (bits + 0x8000) >> 16
    low = (bits - (high << 16)).to(tl.int32, bitcast=True).to(tl.int16)
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True), low


@triton.jit
def _mul32(x, c: tl.constexpr):
    """``x * c`` modulo 2^32, ``x`` uint32: the constant typed so that nothing widens."""
    return x * tl.full((), c, tl.uint32)


@triton.jit
def _mix(x):
    """flat_adamw.mix32 on uint32 ``x``."""
    x = _mul32(x ^ (x >> 16), _HASH0)
    x = _mul32(x ^ (x >> 15), _HASH1)
    return x ^ (x >> 16)


@triton.jit
def _rounding_bits(at, step, salt):
    """flat_adamw.rounding_bits of elements ``at`` (uint32) at ``step`` (float32) in group ``salt``."""
    seed = _mix(_mul32(step.to(tl.uint32), _GOLDEN) + tl.cast(salt, tl.uint32))  # a salt of 1 comes as a constexpr
    return _mix(_mul32(at.to(tl.uint32), _GOLDEN) ^ seed)


@triton.jit
def _round_stochastic(x, bits):
    """flat_adamw.round_stochastic: fp32 ``x`` to bf16 with 16 random ``bits`` (uint32)."""
    high = (x.to(tl.uint32, bitcast=True) + bits) >> 16
    return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw(table, param, start, length, flat, master, exp_avg, exp_avg_sq, weights, scale_ptr, ok_ptr, lr_ptr,
           step_ptr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, salt, GRAD: tl.constexpr,
           HAS_WEIGHTS: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """flat_adamw.adamw_update on chunk ``c`` (see ``_step``)."""
    c = tl.program_id(0)
    address, first, count = _chunk(table, param, start, length, c, ALIGNED)
    g, mask = _gradient(address, first, count, GRAD, BLOCK)
    at = tl.load(flat + c)
    if ALIGNED:
        at = tl.multiple_of(at, 8)
    _step(g, at + tl.arange(0, BLOCK), mask, master, exp_avg, exp_avg_sq, weights, scale_ptr, ok_ptr, lr_ptr,
          step_ptr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, salt, HAS_WEIGHTS, SPLIT)


@triton.jit
def _adamw_range(gathered, lo, hi, master, exp_avg, exp_avg_sq, weights, scale_ptr, ok_ptr, lr_ptr, step_ptr,
                 beta1, beta2, log_beta1, log_beta2, eps, weight_decay, salt, HAS_WEIGHTS: tl.constexpr,
                 SPLIT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """flat_adamw.adamw_update on elements ``lo:hi`` of a group's buffers, the gradient read from
    its flat ``gathered`` copy (``_sum_squares`` with GATHER). ALIGNED: ``lo`` is a multiple of 8."""
    if ALIGNED:
        lo = tl.multiple_of(lo, 8)
    at = lo + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = at < hi
    g = tl.load(gathered + at, mask=mask, other=0.0).to(tl.float32)
    _step(g, at, mask, master, exp_avg, exp_avg_sq, weights, scale_ptr, ok_ptr, lr_ptr, step_ptr, beta1, beta2,
          log_beta1, log_beta2, eps, weight_decay, salt, HAS_WEIGHTS, SPLIT)


@triton.jit
def _step(g, at, mask, master, exp_avg, exp_avg_sq, weights, scale_ptr, ok_ptr, lr_ptr, step_ptr, beta1, beta2,
          log_beta1, log_beta2, eps, weight_decay, salt, HAS_WEIGHTS: tl.constexpr, SPLIT: tl.constexpr):
    """AdamW on the gradient ``g`` (fp32) of elements ``at`` times ``scale``, master and moments
    kept where ``ok`` is false, then the bf16 weights rounded from the master. SPLIT: ``master``
    holds the master's low bits beside the weights (flat_adamw.split_master). ``log_beta*`` are
    the betas' natural logarithms: ``beta ** step`` as one exp. Moments in bf16 are rounded
    stochastically with the bits of flat_adamw.rounding_bits (``salt``: the group's number)."""
    if SPLIT:
        w = _join(tl.load(weights + at, mask=mask), tl.load(master + at, mask=mask))
    else:
        w = tl.load(master + at, mask=mask)
    m0 = tl.load(exp_avg + at, mask=mask).to(tl.float32)
    v0 = tl.load(exp_avg_sq + at, mask=mask).to(tl.float32)
    g = g * tl.load(scale_ptr)
    lr = tl.load(lr_ptr)
    step = tl.load(step_ptr)
    m = m0 + (1 - beta1) * (g - m0)  # torch.lerp's form for a weight below one half
    v = v0 * beta2 + g * g * (1 - beta2)
    denom = tl.sqrt(v) / tl.sqrt(1 - tl.exp(step * log_beta2)) + eps
    new = w * (1 - lr * weight_decay) - lr / (1 - tl.exp(step * log_beta1)) * m / denom
    ok = tl.load(ok_ptr) != 0
    new = tl.where(ok, new, w)
    m = tl.where(ok, m, m0)
    v = tl.where(ok, v, v0)
    if exp_avg.dtype.element_ty == tl.bfloat16:
        bits = _rounding_bits(at, step, salt)
        tl.store(exp_avg + at, _round_stochastic(m, bits & 0xFFFF), mask=mask)
        tl.store(exp_avg_sq + at, _round_stochastic(v, bits >> 16), mask=mask)
    else:
        tl.store(exp_avg + at, m, mask=mask)
        tl.store(exp_avg_sq + at, v, mask=mask)
    if SPLIT:
        high, low = _split(new)
        tl.store(weights + at, high, mask=mask)
        tl.store(master + at, low, mask=mask)
    else:
        tl.store(master + at, new, mask=mask)
        if HAS_WEIGHTS:
            tl.store(weights + at, new.to(weights.dtype.element_ty), mask=mask)
