"""Python in a process of its own that compiles Triton kernels with Triton's compiler (for sm_90
here, no GPU needed), not through the interpreter tests/conftest.py sets for a machine without a
GPU: what only the compiler rejects or specialises shows there (not a test module itself)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_compiler(args: list[str], timeout: float, check: bool = False) -> subprocess.CompletedProcess:
    """``python args...`` without TRITON_INTERPRET, its output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=check)
