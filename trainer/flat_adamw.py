"""AdamW over flat per-group buffers: clipping and the whole update in a few kernels, no host syncs.

A bf16 step of the native engine spent ~56 bytes of memory traffic per parameter and dozens of
kernel launches on the optimizer alone: bf16 gradients copied up into fp32 master gradients, a
foreach norm, a clip multiply, fused AdamW, the masters copied back down, the master gradients
zeroed. Here each param group's fp32 masters, moments and (in bf16) the weights the model
computes with lie end to end in flat buffers; each ``param.data`` is a view into them. The
gradients stay autograd's own tensors: backward hands its fresh gradient over without a copy,
whereas accumulating into a preallocated flat buffer cost one add kernel per parameter (0.8 ms
per step on an H100, benchmarks/RESULTS.md). The update gathers them into one flat gradient per
group, takes the global norm, and one pointwise pass per group reads gradient, master and moments
and writes master, moments and bf16 weights: 34 bytes per parameter in bf16, compiled as one
graph on CUDA. On CUDA with Triton the kernels of flat_adamw_triton.py do the same without the
gather: 30 bytes, 28 with bf16 gradients. With ``master="split"`` (Triton kernels only) the fp32
master is not a buffer of its own: the bf16 weights hold its upper half, rounded, and an int16
buffer what the rounding removed, exactly (``split_master``): 26 bytes, the update being the
last, serial part of a step. With ``moments="bf16"`` the moments are bf16, rounded
stochastically from the fp32 arithmetic (``round_stochastic``): 8 bytes less. Learning rate,
step count, clip coefficient and the finite-norm flag live on the device, so a step never waits
for the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rgfusion.configs import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")
MOMENT_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class FlatGroup:
    """One param group's parameters laid end to end: ``master`` (fp32) and, in bf16, ``weights``.
    Each parameter's data is a view into ``weights`` (in fp32, into ``master``: the parameters
    are the masters). Split (``low`` set, ``master`` None): the master is ``weights`` and ``low``
    together, see ``split_master``."""

    params: list[nn.Parameter]
    master: Tensor | None
    weights: Tensor | None
    low: Tensor | None = None

    @classmethod
    def build(cls, params: list[nn.Parameter], *, bf16: bool, split: bool = False) -> FlatGroup:
        master = torch.cat([p.detach().reshape(-1).float() for p in params])
        if split:
            flat = cls(params, None, *split_master(master))
        else:
            flat = cls(params, master, master.bfloat16() if bf16 else None)
        for p, d in zip(params, flat.views(master if flat.weights is None else flat.weights)):
            p.data = d
        return flat

    @property
    def key(self) -> Tensor:
        """The buffer the optimizer's param group holds and keys its state by: the fp32 master, or
        the split master's low bits."""
        return self.master if self.low is None else self.low

    def master_values(self) -> Tensor:
        """The fp32 masters end to end: the buffer itself, or the split one joined (a copy)."""
        return self.master if self.low is None else join_master(self.weights, self.low)

    def load_master(self, values: Tensor) -> None:
        """Set the masters (and, split, the weights they round to) from fp32 ``values`` end to end."""
        if self.low is None:
            self.master.copy_(values)
        else:
            weights, low = split_master(values.to(self.low.device))
            self.weights.copy_(weights)
            self.low.copy_(low)

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into this group's parameters' shapes, in order."""
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def grads(self) -> list[Tensor]:
        """The parameters' gradients; zeros for one that got none this step."""
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]


def split_master(x: Tensor, chunk: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` as (bf16 weights, int16 low bits) that hold it exactly: the weights are ``x``
    rounded to bf16, half away from zero, and the low bits what that removed, in units of the
    fp32 last place (-2^15 … 2^15 - 1). Round-half-to-even, torch's cast, would need one value
    more at the ties it rounds down; the two roundings differ only there, one value in 65,536.
    ``chunk`` elements at a time: the int64 arithmetic takes 24 bytes an element, which for a
    whole BERT group raised the H200 row's peak memory by 0.85 GiB (session 22)."""
    flat = x.detach().float().contiguous().view(-1)
    weights, low = torch.empty_like(flat, dtype=torch.bfloat16), torch.empty_like(flat, dtype=torch.int16)
    for at in range(0, flat.numel(), chunk):
        bits = flat[at:at + chunk].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        high = (bits + 0x8000) >> 16  # NaNs aside, at most 0xFFFF
        weights[at:at + chunk] = _signed(high, 16).to(torch.int16).view(torch.bfloat16)
        low[at:at + chunk] = bits - (high << 16)
    return weights.view(x.shape), low.view(x.shape)


def join_master(weights: Tensor, low: Tensor) -> Tensor:
    """The fp32 values ``split_master`` split into ``weights`` and ``low``."""
    bits = (((weights.view(torch.int16).to(torch.int64) & 0xFFFF) << 16) + low.to(torch.int64)) & 0xFFFFFFFF
    return _signed(bits, 32).to(torch.int32).view(torch.float32)


# Multipliers of lowbias32 (C. Wellons' integer hash search), and one that spreads the step.
HASH = (0x7FEB352D, 0x846CA68B)
GOLDEN = 0x9E3779B9


def mul32(x: Tensor, c: int) -> Tensor:
    """``x * c`` modulo 2^32 for uint32 values held in int64, in 16-bit halves so no product
    overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """lowbias32, a bijection of uint32 (held in int64) whose output bits each flip with about
    half of any input change: the kernels' hash too (``_mix``)."""
    x = mul32(x ^ (x >> 16), HASH[0])
    x = mul32(x ^ (x >> 15), HASH[1])
    return x ^ (x >> 16)


def rounding_bits(n: int, step: Tensor, salt: int) -> Tensor:
    """32 random bits for each of a group's ``n`` elements, in int64: a hash of the element's
    index and of the step count and group (``salt``), so every step draws anew, on the device,
    with no generator state to save or to capture."""
    seed = mix32((step.to(torch.int64) * GOLDEN + salt) & 0xFFFFFFFF)
    # The index spread first: neighbouring indices xor-ed straight into the seed left the hash's
    # 16-bit halves measurably uneven (tests/test_adamw_kernels.py).
    return mix32(mul32(torch.arange(n, device=step.device), GOLDEN) ^ seed)


def round_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` to bf16, away from zero with the probability of what the cut removes (the low
    16 bits of its pattern over 2^16), given 16 random ``bits`` per element: unbiased, so a moment
    that moves by less than half a bf16 step per update (the second moment's 0.1% at beta2 =
    0.999 does) still moves on average, where rounding to the nearest would freeze it."""
    pattern = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return _signed((pattern + bits) >> 16, 16).to(torch.int16).view(torch.bfloat16)


def _signed(unsigned: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit integers (in int64) as the signed ones of the same bit pattern."""
    return torch.where(unsigned >= 1 << (bits - 1), unsigned - (1 << bits), unsigned)


def adamw_update(grad: Tensor, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, weights: Tensor | None,
                 scale: Tensor, ok: Tensor, lr: Tensor, step: Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float, salt: int = 0) -> None:
    """torch.optim.AdamW's step over one group's flat buffers, in place, on the gradient times
    ``scale``; where ``ok`` is false, master and moments keep their values. ``step`` counts this
    update already. Then the weights take the new master. Moments in bf16 are computed in fp32
    and stored rounded stochastically (``round_stochastic``; ``salt``: the group's number).
    Pointwise over equal-length buffers, so inductor fuses it into one kernel."""
    g = grad.float() * scale
    m0, v0 = exp_avg.float(), exp_avg_sq.float()
    m = m0.lerp(g, 1 - beta1)
    v = v0 * beta2 + g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2 ** step).sqrt() + eps
    new = master * (1 - lr * weight_decay) - lr / (1 - beta1 ** step) * m / denom
    master.copy_(torch.where(ok, new, master))
    m, v = torch.where(ok, m, m0), torch.where(ok, v, v0)
    if exp_avg.dtype == torch.bfloat16:  # a kept bf16 value has no low bits: it rounds to itself
        bits = rounding_bits(m.numel(), step, salt)
        m, v = round_stochastic(m, bits & 0xFFFF), round_stochastic(v, bits >> 16)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if weights is not None:
        weights.copy_(master)


def clip_and_update(grads: list[list[Tensor]], masters: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], weights: list[Tensor | None], lrs: list[Tensor], steps: list[Tensor],
                    hypers: list[tuple[float, float, float, float]], max_norm: float, finite: Tensor) -> Tensor:
    """Clip by the global L2 norm of all groups' gradients (``grads``: per group, per parameter)
    as ``nn.utils.clip_grad_norm_`` does, then ``adamw_update`` each group (``hypers``: beta1,
    beta2, eps, weight decay). A non-finite norm, or a false ``finite`` (0-d bool), skips the
    update and does not count the step, as fused AdamW with ``found_inf`` does. Returns the norm
    before clipping."""
    flats = [torch.cat([g.reshape(-1) for g in group]) for group in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in flats]))
    ok = norm.isfinite() & finite
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for salt, (grad, master, m, v, w, lr, step, hyper) in enumerate(zip(flats, masters, exp_avgs, exp_avg_sqs,
                                                                        weights, lrs, steps, hypers)):
        step.add_(ok)
        adamw_update(grad, master, m, v, w, scale, ok, lr, step, *hyper, salt=salt)
    return norm


class FlatAdamW(torch.optim.Optimizer):
    """AdamW with global-norm clipping over flat per-group buffers (see ``FlatGroup``).

    ``groups`` are param groups of model parameters (``params`` plus options such as ``lr`` and
    ``weight_decay``); building the optimizer moves the parameters into the flat buffers, and in
    bf16 casts them. ``param_groups`` hold one flat buffer each (the fp32 master, or split, its low
    bits), so torch's schedulers and ``state_dict`` work as for any optimizer. ``step`` has no host
    sync and no branch on a tensor value; after the first call it allocates alike every step
    (CUDA-graph capturable). It runs as Triton kernels where ``kernels`` says (default: on CUDA
    with Triton; elsewhere Triton's interpreter), otherwise compiled where ``compiled`` says
    (default: on CUDA). ``master``: "fp32", a buffer of its own, or "split" (bf16 and the Triton
    kernels only), see ``FlatGroup``. ``moments``: "fp32" or "bf16", rounded stochastically
    (``adamw_update``): 8 bytes less memory traffic per parameter in the update.
    """

    def __init__(self, groups: list[dict[str, Any]], *, precision: str = "bf16", lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_norm: float = math.inf, compiled: bool | None = None, kernels: bool | None = None,
                 master: str = "fp32", moments: str = "fp32") -> None:
        device = next(iter(groups[0]["params"])).device
        if kernels is None:
            kernels = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        if master not in ("fp32", "split"):
            raise ValueError(f"master must be 'fp32' or 'split', not {master!r}")
        if master == "split" and not (precision == "bf16" and kernels):  # a ConfigError: the CLI's one-line reason
            raise ConfigError("optim.master 'split' needs bf16 weights and FlatAdamW's Triton kernels (CUDA); "
                             f"this run has {precision} weights{'' if kernels else ' and no kernels'}")
        if moments not in MOMENT_TYPES:
            raise ValueError(f"moments must be 'fp32' or 'bf16', not {moments!r}")
        self.flats = [FlatGroup.build(g["params"], bf16=precision == "bf16", split=master == "split") for g in groups]
        super().__init__([{**g, "params": [f.key]} for g, f in zip(groups, self.flats)],
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for f in self.flats:
            self.state[f.key] = {"step": torch.zeros((), device=device),
                                 **{k: torch.zeros(f.key.numel(), device=device, dtype=MOMENT_TYPES[moments])
                                    for k in MOMENTS}}
        # The learning rates the update reads: a device tensor changes without a recompile.
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in self.param_groups]
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self.max_norm = max_norm
        self.norm: Tensor | None = None
        self.gathered: list[Tensor] | None = None  # gather's flat gradients, one per group
        if kernels:
            from rgfusion.trainer.flat_adamw_triton import TritonUpdate

            self._update = TritonUpdate([[p.numel() for p in f.params] for f in self.flats], device)
        elif device.type == "cuda" if compiled is None else compiled:
            # Static shapes: the parameters never change size, and one symbol per gradient
            # dimension would slow compilation and every call's guards.
            self._update = torch.compile(clip_and_update, fullgraph=True)
        else:
            self._update = clip_and_update

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        """Clip, update every group and drop the gradients; ``norm`` is the norm before clipping."""
        self.load_lrs()
        self.update()

    def load_lrs(self) -> None:
        """The groups' learning rates (the scheduler's values) into the device tensors ``update``
        reads. Outside a captured graph: inside, the fill's value would be recorded once."""
        for lr, group in zip(self.lrs, self.param_groups):
            lr.fill_(group["lr"])  # no host sync

    @torch.no_grad()
    def update(self, finite: Tensor | None = None) -> None:
        """``step`` without loading the learning rates: the part a CUDA graph can replay. A false
        ``finite`` (a 0-d bool on the device, e.g. the loss's) skips the update like a
        non-finite gradient norm does."""
        states = [self.state[f.key] for f in self.flats]
        if finite is None:
            finite = self._finite
        # Split, the kernels take the low bits where the master would be (flat_adamw_triton.py).
        self.norm = self._update(
            [f.grads() for f in self.flats], [f.key for f in self.flats], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [f.weights for f in self.flats], self.lrs, [s["step"] for s in states],
            [(*g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups], self.max_norm, finite)
        self.zero_grad()
        # What torch's LR schedulers check to warn of a schedule stepped before its optimizer;
        # set here too, as a captured step calls only this part.
        self._opt_called = True

    @torch.no_grad()
    def gather(self, groups: Iterable[int]) -> None:
        """A pipelined update's first part (trainer/update_pipeline.py), on the current stream: the
        gradients of the groups numbered ``groups`` copied into flat buffers of their own, their
        sums of squares taken, and then dropped. Every group is gathered once before ``conclude``."""
        kernels = self._kernels("gather")
        if self.gathered is None:  # before any capture: a replay's update reads them after the next forward began
            self.gathered = [torch.zeros_like(f.key, dtype=f.params[0].dtype) for f in self.flats]
        for i in groups:
            kernels.gather(i, self.flats[i].grads(), self.gathered[i])
            for p in self.flats[i].params:
                p.grad = None

    @torch.no_grad()
    def conclude(self, finite: Tensor | None = None) -> None:
        """After every group's ``gather``: the norm, the clip scale and whether to update, and the
        step counts, for ``apply_range``. ``finite`` as in ``update``."""
        self.norm, *self._scale_ok = self._kernels("conclude").conclude(
            self.max_norm, self._finite if finite is None else finite, [self.state[f.key]["step"] for f in self.flats])
        self._opt_called = True

    @torch.no_grad()
    def apply_range(self, i: int, lo: int, hi: int) -> None:
        """AdamW on elements ``lo:hi`` of group ``i``'s flat buffers with the gradients ``gather``
        copied and the scale ``conclude`` took, on the current stream."""
        f, state = self.flats[i], self.state[self.flats[i].key]
        self._kernels("apply_range").update_range(
            i, self.gathered[i], lo, hi, f.key, state["exp_avg"], state["exp_avg_sq"], f.weights, self.lrs[i],
            state["step"], (*self.param_groups[i]["betas"], self.param_groups[i]["eps"],
                            self.param_groups[i]["weight_decay"]), *self._scale_ok)

    def _kernels(self, what: str):
        from rgfusion.trainer.flat_adamw_triton import TritonUpdate

        if not isinstance(self._update, TritonUpdate):
            raise ValueError(f"FlatAdamW.{what} needs the Triton kernels")
        return self._update

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the model parameters' gradients: the next backward hands over fresh ones."""
        for f in self.flats:
            for p in f.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def masters(self) -> list[Tensor]:
        """The fp32 masters per parameter, in group order: views of the buffers, or split, copies."""
        return [m for f in self.flats for m in f.views(f.master_values())]

    @torch.no_grad()
    def load_masters(self, values: list[Tensor]) -> None:
        """Set the masters from fp32 ``values`` shaped as ``masters()``; split, the weights too."""
        per_parameter = iter(values)
        for f in self.flats:
            f.load_master(torch.cat([next(per_parameter).reshape(-1) for _ in f.params]).float())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this optimizer's state, or torch.optim.AdamW's over the same groups (one entry per
        parameter: the native engine's before flat buffers). The values are copied into the
        existing buffers, which a compiled or captured step keeps reading."""
        own = [self.state[f.key] for f in self.flats]
        super().load_state_dict(self._per_group(state_dict))
        for f, buffers in zip(self.flats, own):
            loaded = self.state[f.key]
            for key, buffer in buffers.items():
                if loaded:
                    buffer.copy_(loaded[key])
                else:  # saved before the first step
                    buffer.zero_()
            self.state[f.key] = buffers

    def _per_group(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with one state entry per group, its moments laid end to end as the flat
        buffers are (a parameter without state has zero moments)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.flats):
            raise ValueError(f"the saved optimizer has {len(saved_groups)} param groups, this one {len(self.flats)}")
        state, groups = {}, []
        for i, (group, flat) in enumerate(zip(saved_groups, self.flats)):
            entries = [state_dict["state"].get(k) for k in group["params"]]
            if len(entries) not in (1, len(flat.params)):
                raise ValueError(f"saved param group {i} has {len(entries)} parameters, this one "
                                 f"{len(flat.params)}")
            sizes = [flat.key.numel()] if len(entries) == 1 else [p.numel() for p in flat.params]
            present = [e for e in entries if e is not None]
            if present:
                state[i] = {"step": present[0]["step"], **{
                    k: torch.cat([torch.zeros(n) if e is None else e[k].reshape(-1) for e, n in zip(entries, sizes)])
                    for k in MOMENTS}}
            groups.append({**group, "params": [i]})
        return {"state": state, "param_groups": groups}
