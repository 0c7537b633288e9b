"""Typed configuration: dataclasses per component, YAML recipes, dotted overrides.

Every component owns a small ``@dataclass`` config. A recipe is a YAML file whose
top-level keys name the components; ``load(RunConfig, path, overrides)`` builds the
typed tree and fails with one line naming the offending key and file.

A recipe may start with ``base: other.yaml`` (relative to itself, or a name under this
package) to inherit and override another recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A recipe or override that does not fit the typed config."""


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path as given, or a name relative to the packaged ``configs/`` folder."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / p, RECIPES_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's mapping with its ``base:`` chain merged in (child wins)."""
    p = resolve_recipe(path).resolve()
    if p in _seen:
        raise ConfigError(f"{p}: circular 'base:' chain")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (p.parent / base) if (p.parent / base).is_file() else base
    return deep_merge(read_recipe(base_path, _seen + (p,)), raw)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` with the value parsed as YAML (so 1e-4, true, [1,2] keep their types)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any] | None, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(hints[name], value, source, prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}") from None
    return obj


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' may not be null")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        return _float_text(value, source, key)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _float_text(text: str, source: str, key: str) -> float:
    # YAML 1.1 reads 2e-4 (no dot in the mantissa) as a string; people write it anyway.
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{source}: '{key}' must be a number, got {text!r}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Typed config from an optional recipe plus ``key=value`` overrides."""
    tree = read_recipe(path) if path is not None else {}
    source = str(resolve_recipe(path)) if path is not None else "<defaults>"
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    if overrides:
        source += " (with --set overrides)"
    return from_dict(cls, tree, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested mapping of a config (YAML/JSON friendly)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` for MLflow params and diffs."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
