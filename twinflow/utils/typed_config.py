"""Typed configuration: dataclasses filled from YAML / dicts / ``key=value`` overrides.

Every config in the project is a (nested) dataclass. Loading is strict: an unknown key, a value of the
wrong type or a missing required field raises :class:`ConfigError` naming the full dotted key.

One generic rule for numbers: every ``float`` value (also inside lists and tuples) must be finite. NaN
is never accepted; a field whose meaning allows infinity says so with ``field(metadata=ALLOW_INF)``.
Per-key ranges live in each dataclass's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key or file."""


ALLOW_INF = {"allow_inf": True}
"""``field(metadata=ALLOW_INF)``: this float field accepts +/-inf (NaN is never accepted)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, allow_inf: bool = False) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    select = getattr(tp, "select_config_type", None)
    if select is not None:
        # A section whose dataclass depends on its content (``model``: chosen by ``model.family``).
        tp = select(value, key)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}': null is not allowed (expected {_type_name(tp)})")
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:
            return _convert(value, candidates[0], key, allow_inf)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, allow_inf)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", allow_inf) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]", allow_inf) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        args = get_args(tp)
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{key}.<key>", allow_inf): _convert(v, args[1], f"{key}.{k}", allow_inf) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where "1e-4" (no dot) is a string; users mean a number.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return _finite(float(value), key, allow_inf)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}': cannot interpret {value!r} as {_type_name(tp)}")


def _join_key(section: str, key: str) -> str:
    """``model.lora`` + ``lora.rank`` -> ``model.lora.rank`` (a key already naming the section's tail)."""
    head, tail = section.split("."), key.split(".")
    for k in range(min(len(head), len(tail) - 1), 0, -1):
        if head[-k:] == tail[:k]:
            return ".".join(head + tail[k:])
    return f"{section}.{key}"


def _finite(value: float, key: str, allow_inf: bool) -> float:
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and type errors raise :class:`ConfigError`."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise ConfigError(f"unknown config key(s) {close}; valid keys under '{prefix or '<root>'}' are: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, bool(f.metadata.get("allow_inf")))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key}' is required")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        # A nested section's own check names its keys relative to it ('lora.rank'): name them in full.
        section = prefix.rstrip(".")
        if section and f"'{section}" not in str(e):
            named, n = re.subn(r"(config key )'([^']+)'", lambda m: f"{m.group(1)}'{_join_key(section, m.group(2))}'", str(e))
            raise ConfigError(named if n else f"config section '{section}': {e}") from e
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (lists instead of tuples), suitable for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested dict (the dataclass check happens later)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)
