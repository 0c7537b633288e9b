"""The Triton kernels behind :mod:`trainer.model.triton_attention` and their custom operators.

Imported on first use only: it imports Triton. The operators are ``torch.library.triton_op``s,
so torch.compile sees the kernels themselves instead of breaking the graph around them.

Tiling follows FlashAttention-2: a forward program holds one block of queries and runs an
online softmax over blocks of keys. The backward holds one block of keys and loops over the
queries in tiles (key and value gradients, and the bias gradient, each score computed once
there). With more than one key block a first pass, one program per query block, gives the query
gradient and the row sums dO·O that the second pass needs. One block of keys needs no first pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.random import uint_to_uniform_float

from .triton_attention import block_size


@triton.jit
def _row_block(ptr, b, col, s_b, s_t, rows, D: tl.constexpr):
    """Addresses of the (len(rows), D) block at column ``col`` of batch entry ``b``."""
    return ptr + b * s_b + rows[:, None] * s_t + col + tl.arange(0, D)[None, :]


@triton.jit
def _rows(ptr, b, col, s_b, s_t, rows, n, D: tl.constexpr):
    """That block's values; rows ≥ n are zero."""
    return tl.load(_row_block(ptr, b, col, s_b, s_t, rows, D), mask=(rows < n)[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, value, b, col, s_b, s_t, rows, n, D: tl.constexpr):
    tl.store(_row_block(ptr, b, col, s_b, s_t, rows, D), value.to(ptr.dtype.element_ty), mask=(rows < n)[:, None])


@triton.jit
def _mm(a, b, EXACT: tl.constexpr):
    """a·b; float32 inputs multiply in full float32, not TF32."""
    if EXACT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _program(N_BLOCKS, scale, p_drop, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
             SELF: tl.constexpr):
    """This program's batch·head, batch entry, head, its block's row indices, its head's query,
    key and value columns, and the float arguments in float32.

    One grid axis: the second holds at most 65,535, fewer than the captions × heads of an
    evaluation batch. A head's blocks are neighbours, so the keys and values they all read are
    still in L2."""
    pid = tl.program_id(0)
    bh = pid // N_BLOCKS
    h = bh % H
    q_col, k_col, v_col = _columns(h, H, D, SELF)
    index = (pid % N_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
    return bh, bh // H, h, index, q_col, k_col, v_col, _f32(scale), _f32(p_drop)


@triton.jit
def _stop(n, BLOCK: tl.constexpr, FITS: tl.constexpr):
    """End of a loop over ``n`` rows in blocks. When they fit in one block the bound is a
    constant: the loop then folds away, and a thread needs about half the registers (211 against
    108 for BERT's forward at sm_90, benchmarks/kernel_resources.py), so twice the programs fit
    on an SM."""
    if FITS:
        return BLOCK
    return n


@triton.jit
def _f32(x):
    """A float argument in float32: compiled by inductor, Python floats arrive as float64, which
    would make the arithmetic around them float64 too."""
    return tl.cast(x, tl.float32)


@triton.jit
def _columns(h, H: tl.constexpr, D: tl.constexpr, SELF: tl.constexpr):
    """Columns of head ``h``'s query, key and value: one (…, 3·H·D) product, or a query product
    and a (…, 2·H·D) key-value product."""
    if SELF:
        return h * D, (H + h) * D, (2 * H + h) * D
    return h * D, h * D, (H + h) * D


@triton.jit
def _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, keys, NQ, NK, scale,
            HAS_BIAS: tl.constexpr, EXACT: tl.constexpr):
    """q·kᵀ·scale + bias of one tile; keys ≥ NK get -inf."""
    s = _mm(q, tl.trans(k), EXACT) * scale
    if HAS_BIAS:
        # Padding query rows read 0, not -inf: a row of -inf would make NaNs that reach real gradients.
        ptr = bias + b * sb_b + h * sb_h + rows[:, None] * sb_i + keys[None, :] * sb_j
        s += tl.load(ptr, mask=(rows < NQ)[:, None] & (keys < NK)[None, :], other=0.0).to(tl.float32)
    return tl.where((keys < NK)[None, :], s, float("-inf"))


@triton.jit
def _keep(seed_ptr, bh, rows, first_key, NQ, NK, p_drop, KEYS: tl.constexpr):
    """Dropout's keep mask of the ``KEYS`` keys from ``first_key`` (a multiple of 4) on: a Philox
    stream keyed by the call's seed and each score's place, whatever the tiling. Each Philox call
    gives four numbers, for four neighbouring keys; tl.rand uses one per call, and its ten rounds
    per score were most of the arithmetic of a tile. (Eight keys per call, on 16 bits each, was
    no faster: benchmarks/RESULTS.md, session 17.)"""
    quads = first_key // 4 + tl.arange(0, KEYS // 4)
    offsets = (bh * NQ + rows[:, None]) * tl.cdiv(NK, 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr).to(tl.uint32), offsets)
    # Interleaved, key 4i + j takes number j of call i.
    return uint_to_uniform_float(tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))) >= p_drop


@triton.jit
def _forward(q_src, kv_src, bias, seed_ptr, out, lse, NQ, NK, NQP, N_BLOCKS, s_qb, s_qt, s_kb, s_kt,
             sb_b, sb_h, sb_i, sb_j, s_ob, s_ot, scale, p_drop, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
             KEY_BLOCK: tl.constexpr, SELF: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
             KEYS_FIT: tl.constexpr, EXACT: tl.constexpr):
    """BLOCK queries over keys in tiles of KEY_BLOCK (KEYS_FIT: all keys in one)."""
    bh, b, h, rows, q_col, k_col, v_col, scale, p_drop = _program(N_BLOCKS, scale, p_drop, H, D, BLOCK, SELF)
    q = _rows(q_src, b, q_col, s_qb, s_qt, rows, NQ, D)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, D), tl.float32)
    for start in range(0, _stop(NK, KEY_BLOCK, KEYS_FIT), KEY_BLOCK):
        keys = start + tl.arange(0, KEY_BLOCK)
        k = _rows(kv_src, b, k_col, s_kb, s_kt, keys, NK, D)
        v = _rows(kv_src, b, v_col, s_kb, s_kt, keys, NK, D)
        s = _scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, keys, NQ, NK, scale, HAS_BIAS, EXACT)
        # The first block holds key 0, so the running maximum is finite from there on.
        m_new = tl.maximum(m, tl.max(s, 1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(s - m_new[:, None])
        total = total * rescale + tl.sum(e, 1)
        if DROPOUT:
            e = tl.where(_keep(seed_ptr, bh, rows, start, NQ, NK, p_drop, KEY_BLOCK), e, 0.0)
        acc = acc * rescale[:, None] + _mm(e.to(v.dtype), v, EXACT)
        m = m_new
    tl.store(lse + bh * NQP + rows, m + tl.log(total))
    if DROPOUT:
        total = total * (1.0 - p_drop)
    _store_rows(out, acc / total[:, None], b, h * D, s_ob, s_ot, rows, NQ, D)


@triton.jit
def _backward_query(q_src, kv_src, bias, seed_ptr, lse, delta, out, dout, dq, NQ, NK, NQP, N_BLOCKS,
                    s_qb, s_qt, s_kb, s_kt, sb_b, sb_h, sb_i, sb_j, s_ob, s_ot, s_gb, s_gt, scale, p_drop,
                    H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr,
                    SELF: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, KEYS_FIT: tl.constexpr,
                    EXACT: tl.constexpr):
    """First pass with several key blocks: one block of queries' gradient and dO·O row sums, over
    keys in tiles of KEY_BLOCK (KEYS_FIT: all in one)."""
    bh, b, h, rows, q_col, k_col, v_col, scale, p_drop = _program(N_BLOCKS, scale, p_drop, H, D, BLOCK, SELF)
    q = _rows(q_src, b, q_col, s_qb, s_qt, rows, NQ, D)
    do = _rows(dout, b, h * D, s_ob, s_ot, rows, NQ, D)
    # Σⱼ Pᵢⱼ dPᵢⱼ: the output already holds the dropout that dP carries.
    dl = tl.sum(do.to(tl.float32) * _rows(out, b, h * D, s_ob, s_ot, rows, NQ, D).to(tl.float32), 1)
    tl.store(delta + bh * NQP + rows, dl)
    row_lse = tl.load(lse + bh * NQP + rows)
    acc = tl.zeros((BLOCK, D), tl.float32)
    for start in range(0, _stop(NK, KEY_BLOCK, KEYS_FIT), KEY_BLOCK):
        keys = start + tl.arange(0, KEY_BLOCK)
        k = _rows(kv_src, b, k_col, s_kb, s_kt, keys, NK, D)
        v = _rows(kv_src, b, v_col, s_kb, s_kt, keys, NK, D)
        p = tl.exp(_scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, keys, NQ, NK, scale, HAS_BIAS, EXACT)
                   - row_lse[:, None])
        dp = _mm(do, tl.trans(v), EXACT)
        if DROPOUT:
            dp = tl.where(_keep(seed_ptr, bh, rows, start, NQ, NK, p_drop, KEY_BLOCK), dp / (1.0 - p_drop), 0.0)
        acc += _mm((p * (dp - dl[:, None]) * scale).to(k.dtype), k, EXACT)
    _store_rows(dq, acc, b, q_col, s_gb, s_gt, rows, NQ, D)


@triton.jit
def _backward_key(q_src, kv_src, bias, seed_ptr, lse, delta, dout, dq, dkv, dbias, NQ, NK, NQP, N_BLOCKS,
                  s_qb, s_qt, s_kb, s_kt, sb_b, sb_h, sb_i, sb_j, s_ob, s_ot, s_gb, s_gt, s_vb, s_vt, scale, p_drop,
                  H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, SELF: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
                  KEYS_FIT: tl.constexpr, QUERIES_FIT: tl.constexpr, EXACT: tl.constexpr):
    """One block of BLOCK keys, over the queries in tiles of ROWS: its key and value gradients and
    its columns of the bias gradient. KEYS_FIT (every key in this one block): the row sums and the
    query gradient too."""
    bh, b, h, keys, q_col, k_col, v_col, scale, p_drop = _program(N_BLOCKS, scale, p_drop, H, D, BLOCK, SELF)
    k = _rows(kv_src, b, k_col, s_kb, s_kt, keys, NK, D)
    v = _rows(kv_src, b, v_col, s_kb, s_kt, keys, NK, D)
    dk = tl.zeros((BLOCK, D), tl.float32)
    dv = tl.zeros((BLOCK, D), tl.float32)
    for start in range(0, _stop(NQ, ROWS, QUERIES_FIT), ROWS):
        rows = start + tl.arange(0, ROWS)
        q = _rows(q_src, b, q_col, s_qb, s_qt, rows, NQ, D)
        do = _rows(dout, b, h * D, s_ob, s_ot, rows, NQ, D)
        p = tl.exp(_scores(q, k, bias, b, h, sb_b, sb_h, sb_i, sb_j, rows, keys, NQ, NK, scale, HAS_BIAS, EXACT)
                   - tl.load(lse + bh * NQP + rows)[:, None])
        dp = _mm(do, tl.trans(v), EXACT)
        if DROPOUT:
            keep = _keep(seed_ptr, bh, rows, tl.program_id(0) % N_BLOCKS * BLOCK, NQ, NK, p_drop, BLOCK)
            dropped = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            dropped = p
        dv += _mm(tl.trans(dropped.to(do.dtype)), do, EXACT)
        if KEYS_FIT:
            ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        else:
            ds = p * (dp - tl.load(delta + bh * NQP + rows)[:, None])
        if BIAS_GRAD:  # dbias is (B, H, NQ, NK), contiguous
            ptr = dbias + (bh * NQ + rows[:, None]) * NK + keys[None, :]
            tl.store(ptr, ds.to(dbias.dtype.element_ty), mask=(rows < NQ)[:, None] & (keys < NK)[None, :])
        ds = (ds * scale).to(q.dtype)
        if KEYS_FIT:
            _store_rows(dq, _mm(ds, k, EXACT), b, q_col, s_gb, s_gt, rows, NQ, D)
        dk += _mm(tl.trans(ds), q, EXACT)
    _store_rows(dkv, dk, b, k_col, s_vb, s_vt, keys, NK, D)
    _store_rows(dkv, dv, b, v_col, s_vb, s_vt, keys, NK, D)


@dataclass
class Launch:
    """Launch options of every kernel; benchmarks/attention_bench.py sweeps them at the step's shapes."""

    num_warps: int = 4
    num_stages: int = 3
    block: int | None = None  # rows per tile; None: block_size()'s choice
    forward_keys: int | None = None  # keys per tile of the forward alone; None: forward_key_block()'s choice
    query_pass_keys: int | None = None  # keys per tile of the backward's query pass; None: query_pass_key_block()'s
    # Rows per tile and warps of the forward alone (None: ``block``'s, ``num_warps``): at sm_90 a
    # tile of 64 rows takes Hopper's warpgroup products, which 32 rows cannot.
    forward_rows: int | None = None
    forward_warps: int | None = None
    # The most keys a program of the backward's key pass holds whole when they span more than two
    # row tiles (None: row tiles), and its warps (None: ``num_warps``). The graph's 85 keys in one
    # block of 128 need no query pass: each score is computed once a step.
    key_pass_keys: int | None = None
    key_pass_warps: int | None = None


LAUNCH = Launch()


def _bias_strides(bias: Tensor | None) -> list[int]:
    if bias is None:
        return [0, 0, 0, 0]
    # A size-1 dimension broadcasts: stride 0 reads its one entry for every index.
    return [0 if n == 1 else s for n, s in zip(bias.shape, bias.stride())]


def whole_key_block(keys: int, block: int, most: int) -> int:
    """All ``keys`` in one tile when they span more than two row tiles of ``block`` and ``most``
    holds them; else tiles of ``block``."""
    whole = triton.next_power_of_2(keys)
    return whole if keys > 2 * block and whole <= most else block


def forward_key_block(keys: int, block: int) -> int:
    """Keys per tile of the forward, whose query tiles hold ``block`` rows. Keys over more than two
    such tiles (the graph's 85 nodes) take one tile of at most 128: the loop over key tiles and
    its rescaling fold away, and the graph's forward took 97 µs alone on an H200 instead of 125.
    Keys over two tiles (CGF's 36 and 49) lost with one tile of 128: 63 and 48 µs against 51 and
    39 (benchmarks/RESULTS.md, session 17)."""
    return whole_key_block(keys, block, 128)


def query_pass_key_block(keys: int, block: int) -> int:
    """Keys per tile of the backward's query pass: all of them in one tile of up to 64 (CGF's 36
    and 49 keys: 39.7 and 37.4 µs alone on an H200 against 45.8 and 40.2 in row-sized tiles), else
    the row tiles (the graph's 85 keys: 89 µs against 112 in 64-key and 122 in one 128-key tile;
    benchmarks/RESULTS.md, session 18)."""
    whole = triton.next_power_of_2(keys)
    return whole if whole <= 64 else block


class _Shape:
    """Sizes and compile-time arguments of one call; ``kv`` None: ``q`` is a fused (B, T, 3·H·D) product."""

    def __init__(self, q: Tensor, kv: Tensor | None, bias: Tensor | None, heads: int, dropout_p: float) -> None:
        self.self_attention = kv is None
        self.kv = q if kv is None else kv
        self.B, self.nq = q.shape[:2]
        self.nk = self.kv.shape[1]
        self.D = self.kv.shape[-1] // ((3 if kv is None else 2) * heads)
        self.block = LAUNCH.block or block_size(max(self.nq, self.nk), self.D)
        self.forward_rows = LAUNCH.forward_rows or self.block
        # Row sums padded to whole tiles of the forward's and of the backward's (powers of two).
        padded = max(self.block, self.forward_rows)
        self.nqp = triton.cdiv(self.nq, padded) * padded
        self.key_pass_keys = whole_key_block(self.nk, self.block, LAUNCH.key_pass_keys or 0)
        self.keys_fit, self.queries_fit = self.nk <= self.key_pass_keys, self.nq <= self.block
        self.forward_keys = LAUNCH.forward_keys or forward_key_block(self.nk, self.forward_rows)
        self.query_pass_keys = LAUNCH.query_pass_keys or query_pass_key_block(self.nk, self.block)
        self.meta = dict(H=heads, D=self.D, BLOCK=self.block, SELF=self.self_attention, HAS_BIAS=bias is not None,
                         DROPOUT=dropout_p > 0, EXACT=q.dtype == torch.float32,
                         num_warps=LAUNCH.num_warps, num_stages=LAUNCH.num_stages)

    def blocks(self, n: int) -> int:
        return triton.cdiv(n, self.block)

    def grid(self, n: int) -> tuple[int]:
        """Programs over ``n`` rows (queries or keys): one per block and head."""
        return (self.blocks(n) * self.B * self.meta["H"],)

    def forward_launch(self) -> tuple[tuple[int], int, dict]:
        """The forward's grid, its query tiles per head, and its compile-time arguments. Its tiles
        cover every padded row: the backward reads their row sums."""
        tiles = self.nqp // self.forward_rows
        meta = {**self.meta, "BLOCK": self.forward_rows, "num_warps": LAUNCH.forward_warps or LAUNCH.num_warps,
                "KEY_BLOCK": self.forward_keys, "KEYS_FIT": self.nk <= self.forward_keys}
        return (tiles * self.B * self.meta["H"],), tiles, meta

    def key_pass_launch(self) -> tuple[tuple[int], int, dict]:
        """The key pass's grid, its key blocks per head, and its compile-time arguments: query tiles
        of the row tile's size, so the row sums' padding holds."""
        blocks = triton.cdiv(self.nk, self.key_pass_keys)
        meta = {**self.meta, "BLOCK": self.key_pass_keys, "ROWS": self.block, "KEYS_FIT": self.keys_fit,
                "QUERIES_FIT": self.queries_fit, "num_warps": LAUNCH.key_pass_warps or LAUNCH.num_warps}
        return (blocks * self.B * self.meta["H"],), blocks, meta


def register() -> SimpleNamespace:
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op("rgfusion::short_attention", mutates_args=())
    def attention(q: Tensor, kv: Tensor | None, bias: Tensor | None, seed: Tensor | None, heads: int,
                  dropout_p: float) -> tuple[Tensor, Tensor]:
        s = _Shape(q, kv, bias, heads, dropout_p)
        out = q.new_empty(s.B, s.nq, heads * s.D)
        lse = torch.empty(s.B * heads, s.nqp, device=q.device, dtype=torch.float32)
        grid, tiles, meta = s.forward_launch()
        wrap_triton(_forward)[grid](
            q, s.kv, q if bias is None else bias, q if seed is None else seed, out, lse, s.nq, s.nk, s.nqp,
            tiles, q.stride(0), q.stride(1), s.kv.stride(0), s.kv.stride(1), *_bias_strides(bias),
            out.stride(0), out.stride(1), s.D ** -0.5, dropout_p, **meta)
        return out, lse

    @triton_op("rgfusion::short_attention_backward", mutates_args=())
    def backward_op(grad: Tensor, q: Tensor, kv: Tensor | None, bias: Tensor | None, seed: Tensor | None,
                    out: Tensor, lse: Tensor, heads: int, dropout_p: float,
                    bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        s = _Shape(q, kv, bias, heads, dropout_p)
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dkv = dq if kv is None else torch.empty(kv.shape, device=q.device, dtype=kv.dtype)
        dbias = torch.empty((s.B, heads, s.nq, s.nk) if bias_grad else (0,), device=q.device,
                            dtype=q.dtype if bias is None else bias.dtype)
        delta = torch.empty_like(lse)
        common = (q, s.kv, q if bias is None else bias, q if seed is None else seed, lse, delta)
        strides = (q.stride(0), q.stride(1), s.kv.stride(0), s.kv.stride(1), *_bias_strides(bias), grad.stride(0),
                   grad.stride(1), dq.stride(0), dq.stride(1))
        if not s.keys_fit:
            wrap_triton(_backward_query)[s.grid(s.nq)](*common, out, grad, dq, s.nq, s.nk, s.nqp, s.blocks(s.nq),
                                                       *strides, s.D ** -0.5, dropout_p, KEY_BLOCK=s.query_pass_keys,
                                                       KEYS_FIT=s.nk <= s.query_pass_keys, **s.meta)
        grid, blocks, meta = s.key_pass_launch()
        wrap_triton(_backward_key)[grid](
            *common, grad, dq, dkv, dbias, s.nq, s.nk, s.nqp, blocks, *strides, dkv.stride(0), dkv.stride(1),
            s.D ** -0.5, dropout_p, BIAS_GRAD=bias_grad, **meta)
        return dq, (dkv if kv is not None else dq.new_empty(0)), dbias

    def setup_context(ctx, inputs, output) -> None:
        q, kv, bias, seed, heads, dropout_p = inputs
        ctx.save_for_backward(q, kv, bias, seed, *output)
        ctx.heads, ctx.dropout_p = heads, dropout_p

    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
        q, kv, bias, seed, out, lse = ctx.saved_tensors
        # In the output's layout: the kernels read both at the same strides.
        grad_out = grad_out.contiguous()
        bias_grad = ctx.needs_input_grad[2]
        dq, dkv, dbias = backward_op(grad_out, q, kv, bias, seed, out, lse, ctx.heads, ctx.dropout_p, bias_grad)
        return (dq, dkv if kv is not None else None, dbias.sum_to_size(bias.shape) if bias_grad else None,
                None, None, None)

    register_autograd(attention, backward, setup_context=setup_context)
    return SimpleNamespace(attention=attention, backward=backward_op)
