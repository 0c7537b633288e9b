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
gather: 30 bytes. Learning rate, step count, clip coefficient and the finite-norm flag live on
the device, so a step never waits for the host and can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FlatGroup:
    """One param group's parameters laid end to end: ``master`` (fp32) and, in bf16, ``weights``.
    Each parameter's data is a view into ``weights`` (in fp32, into ``master``: the parameters
    are the masters)."""

    params: list[nn.Parameter]
    master: Tensor
    weights: Tensor | None

    @classmethod
    def build(cls, params: list[nn.Parameter], *, bf16: bool) -> FlatGroup:
        master = torch.cat([p.detach().reshape(-1).float() for p in params])
        flat = cls(params, master, master.bfloat16() if bf16 else None)
        for p, d in zip(params, flat.views(master if flat.weights is None else flat.weights)):
            p.data = d
        return flat

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into this group's parameters' shapes, in order."""
        return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def grads(self) -> list[Tensor]:
        """The parameters' gradients; zeros for one that got none this step."""
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]


def adamw_update(grad: Tensor, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, weights: Tensor | None,
                 scale: Tensor, ok: Tensor, lr: Tensor, step: Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """torch.optim.AdamW's step over one group's flat buffers, in place, on the gradient times
    ``scale``; where ``ok`` is false, master and moments keep their values. ``step`` counts this
    update already. Then the weights take the new master. Pointwise over equal-length buffers,
    so inductor fuses it into one kernel."""
    g = grad.float() * scale
    m = exp_avg.lerp(g, 1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2 ** step).sqrt() + eps
    new = master * (1 - lr * weight_decay) - lr / (1 - beta1 ** step) * m / denom
    master.copy_(torch.where(ok, new, master))
    exp_avg.copy_(torch.where(ok, m, exp_avg))
    exp_avg_sq.copy_(torch.where(ok, v, exp_avg_sq))
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
    for grad, master, m, v, w, lr, step, hyper in zip(flats, masters, exp_avgs, exp_avg_sqs, weights, lrs, steps,
                                                       hypers):
        step.add_(ok)
        adamw_update(grad, master, m, v, w, scale, ok, lr, step, *hyper)
    return norm


class FlatAdamW(torch.optim.Optimizer):
    """AdamW with global-norm clipping over flat per-group buffers (see ``FlatGroup``).

    ``groups`` are param groups of model parameters (``params`` plus options such as ``lr`` and
    ``weight_decay``); building the optimizer moves the parameters into the flat buffers, and in
    bf16 casts them. ``param_groups`` hold one flat fp32 master each, so torch's schedulers and
    ``state_dict`` work as for any optimizer. ``step`` has no host sync and no branch on a tensor
    value; after the first call it allocates alike every step (CUDA-graph capturable). It runs
    as Triton kernels where ``kernels`` says (default: on CUDA with Triton; elsewhere Triton's
    interpreter), otherwise compiled where ``compiled`` says (default: on CUDA).
    """

    def __init__(self, groups: list[dict[str, Any]], *, precision: str = "bf16", lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 max_norm: float = math.inf, compiled: bool | None = None, kernels: bool | None = None) -> None:
        self.flats = [FlatGroup.build(g["params"], bf16=precision == "bf16") for g in groups]
        super().__init__([{**g, "params": [f.master]} for g, f in zip(groups, self.flats)],
                         {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        device = self.flats[0].master.device
        for f in self.flats:
            self.state[f.master] = {"step": torch.zeros((), device=device),
                                    **{k: torch.zeros_like(f.master) for k in MOMENTS}}
        # The learning rates the update reads: a device tensor changes without a recompile.
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in self.param_groups]
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self.max_norm = max_norm
        self.norm: Tensor | None = None
        if kernels is None:
            kernels = device.type == "cuda" and importlib.util.find_spec("triton") is not None
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
        states = [self.state[f.master] for f in self.flats]
        if finite is None:
            finite = self._finite
        self.norm = self._update(
            [f.grads() for f in self.flats], [f.master for f in self.flats], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [f.weights for f in self.flats], self.lrs, [s["step"] for s in states],
            [(*g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups], self.max_norm, finite)
        self.zero_grad()
        # What torch's LR schedulers check to warn of a schedule stepped before its optimizer;
        # set here too, as a captured step calls only this part.
        self._opt_called = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the model parameters' gradients: the next backward hands over fresh ones."""
        for f in self.flats:
            for p in f.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def masters(self) -> list[Tensor]:
        """Per-parameter views of the fp32 masters, in group order."""
        return [m for f in self.flats for m in f.views(f.master)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this optimizer's state, or torch.optim.AdamW's over the same groups (one entry per
        parameter: the native engine's before flat buffers). The values are copied into the
        existing buffers, which a compiled or captured step keeps reading."""
        own = [self.state[f.master] for f in self.flats]
        super().load_state_dict(self._per_group(state_dict))
        for f, buffers in zip(self.flats, own):
            loaded = self.state[f.master]
            for key, buffer in buffers.items():
                if loaded:
                    buffer.copy_(loaded[key])
                else:  # saved before the first step
                    buffer.zero_()
            self.state[f.master] = buffers

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
            sizes = [flat.master.numel()] if len(entries) == 1 else [p.numel() for p in flat.params]
            present = [e for e in entries if e is not None]
            if present:
                state[i] = {"step": present[0]["step"], **{
                    k: torch.cat([torch.zeros(n) if e is None else e[k].reshape(-1) for e, n in zip(entries, sizes)])
                    for k in MOMENTS}}
            groups.append({**group, "params": [i]})
        return {"state": state, "param_groups": groups}
