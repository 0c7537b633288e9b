"""Which tensors each Triton kernel writes, as torch.compile's analysis reads them off the kernel.

Inductor treats every tensor that analysis says a user kernel writes as mutated: a model input
gets copied, and a parameter fails the compile ("a leaf Variable that requires grad is being used
in an in-place operation", an H200 run of session 12). The analysis takes every tensor passed to
a helper as written once a stored-to address depends on that helper's result, so it can go wrong
without any kernel writing out of bounds; a kernel that fails to compile counts as writing every
tensor. It needs Triton's compiler, not its interpreter: the check runs in a subprocess, which
compiles to Triton's IR for sm_90 (no GPU needed), so it also catches what only the compiler
rejects (a global that is not a constexpr runs in the interpreter).
"""

from __future__ import annotations

import json

import pytest
from triton_compiler import run_compiler

pytest.importorskip("triton")

SCRIPT = r'''
import inspect, json
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors


class Sm90:  # the analysis asks the active driver for its target; there is no GPU here
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


triton.runtime.driver.set_active(Sm90())
from rgfusion.trainer.model import _triton_attention_kernels as att, _triton_geometry_kernels as geo
from rgfusion.trainer.model import _triton_gelu_kernels as gelu

q, bias = torch.rand(4, 85, 3 * 8 * 128), torch.rand(4, 8, 85, 85)
shape = att._Shape(q, None, bias, 8, 0.1)
constants = {k: v for k, v in shape.meta.items() if k not in ("num_warps", "num_stages")}
constants.update(KEYS_FIT=False, QUERIES_FIT=False, BIAS_GRAD=True, KEY_BLOCK=shape.forward_keys)
boxes, w1, w2 = torch.rand(2, 11, 4), torch.rand(2, 16, 5), torch.rand(2, 8, 16)
constants.update({k: v for k, v in geo._meta(boxes, w1, w2, torch.bfloat16, "backward").items()
                  if k not in ("num_warps", "num_stages")})
constants.update({k: v for k, v in gelu.LAUNCH.meta.items() if k != "num_warps"})
tensors = {"boxes": boxes, "adj": torch.ones(2, 11, 11, dtype=torch.bool), "w1": w1, "w2": w2}
tensors.update({name: torch.empty(8, dtype=torch.bfloat16) for name in ("h", "act", "d_pre")})


def argument(name):
    if name in constants:
        return constants[name]
    if name in tensors:
        return tensors[name]
    if name in ("scale", "p_drop", "fill"):
        return 0.1
    if name in ("q_src", "kv_src"):
        return q
    if name == "bias":
        return bias
    if name in ("seed_ptr", "out", "lse", "delta", "dout", "dq", "dkv", "dbias", "b1", "b2", "grad", "shares",
                "out0", "out1", "out2", "out3", "grad0", "grad1", "grad2", "grad3"):
        return torch.empty(8)
    return 7  # sizes and strides


writes = {}
kernels = ((att, ("_forward", "_backward_query", "_backward_key")), (geo, ("_forward", "_backward")),
           (gelu, ("_forward", "_backward")))
for module, names in kernels:
    for name in names:
        kernel = getattr(module, name)
        kwargs = {p: argument(p) for p in inspect.signature(kernel.fn).parameters}
        accessed = identify_accessed_tensors(kernel, kwargs, {})
        writes[f"{module.__name__.rsplit('_', 2)[-2]}.{name}"] = sorted(d.name for d in accessed.read_writes.writes)
print(json.dumps(writes))
'''


def test_each_kernel_writes_only_its_outputs():
    run = run_compiler(["-c", SCRIPT], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "attention._forward": ["lse", "out"],
        "attention._backward_query": ["delta", "dq"],
        "attention._backward_key": ["dbias", "dkv"],
        "geometry._forward": ["out0", "out1"],  # two layers: the slots past them are never written
        "geometry._backward": ["shares"],
        "gelu._forward": ["act"],
        "gelu._backward": ["d_pre", "shares"],
    }
