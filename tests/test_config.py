"""The typed config loader: recipes, base chains, overrides and one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from rgfusion.configs import ConfigError, flatten, load, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"
    layers: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    path: Optional[str] = None
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_recipe_and_overrides(tmp_path):
    p = write(tmp_path, "r.yaml", "steps: 5\ninner:\n  lr: 2\n")
    cfg = load(Outer, p, ["inner.mode=b", "path=/data", "inner.layers=[3]"])
    assert cfg == Outer(steps=5, path="/data", inner=Inner(lr=2.0, mode="b", layers=[3]))
    assert isinstance(cfg.inner.lr, float)
    assert flatten(to_dict(cfg))["inner.lr"] == 2.0


def test_exponent_without_dot_is_a_float(tmp_path):
    p = write(tmp_path, "r.yaml", "inner:\n  lr: 1e-3\n")
    assert load(Outer, p, ["inner.lr=2e-4"]).inner.lr == 2e-4
    assert load(Outer, p).inner.lr == 1e-3


def test_base_chain_child_wins(tmp_path):
    write(tmp_path, "base.yaml", "steps: 5\ninner:\n  lr: 2\n  mode: b\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ninner:\n  lr: 3\n")
    cfg = load(Outer, child)
    assert (cfg.steps, cfg.inner.lr, cfg.inner.mode) == (5, 3.0, "b")


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("inner:\n  lrr: 1\n", [], "unknown key 'inner.lrr'"),
        ("steps: many\n", [], "'steps' must be an integer"),
        ("inner:\n  mode: c\n", [], "'inner.mode' must be one of"),
        ("", ["inner.layers=3"], "'inner.layers' must be a list"),
        ("", ["nope=1"], "unknown key 'nope'"),
        ("steps: true\n", [], "'steps' must be an integer"),
        ("inner:\n  lr: fast\n", [], "'inner.lr' must be a number"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, overrides, needle):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load(Outer, p, overrides)
    assert needle in str(e.value)
    assert "bad.yaml" in str(e.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(Outer, tmp_path / "absent.yaml")
