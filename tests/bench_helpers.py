"""The benchmark scripts as modules, for the tests of tests/test_gpu_bench_smoke.py and
tests/test_gpu.py (not a test module itself)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """A script of benchmarks/ (no package) as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through it
    spec.loader.exec_module(module)
    return module


def record_flat_adamw(bench, monkeypatch) -> list:
    """The FlatAdamW optimizers gpu_bench (``bench``) builds from now on, in order: real ones,
    recorded for the test to read their state."""
    made = []

    class Recorded(bench.FlatAdamW):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bench, "FlatAdamW", Recorded)
    return made
