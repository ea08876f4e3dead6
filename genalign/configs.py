"""Typed configs: dataclasses with one help line per field, loaded from YAML and validated.

Everything here runs before any model loads, so a wrong key or value fails in
milliseconds with an error that names it:

    ConfigError: configs/x.yaml: unknown key 'train.lerning_rate' (did you mean 'learning_rate'?)

Sections that pick one of several classes (a policy ``type``, an algorithm ``name``) are
*tagged*: the tag value selects the dataclass from a plain dict, then that class validates
the remaining keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def opt(default: Any = dataclasses.MISSING, help: str = "", **bounds: Any) -> Any:
    """A dataclass field with a help line. Mutable defaults may be passed as a ``field``.

    ``bounds`` are checked when a config loads: ``gt``/``ge``/``lt``/``le`` (numbers, or every
    item of a list of numbers), ``min_items`` (lists). Every float must be finite.
    """
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"opt(): unknown bounds {sorted(unknown)}")
    meta = {"help": help, **bounds}
    if isinstance(default, dataclasses.Field):
        return dataclasses.field(default=default.default, default_factory=default.default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_COMPARE = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
            "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}
BOUNDS = (*_COMPARE, "min_items")


def _check_bounds(meta: Mapping[str, Any], value: Any, path: str) -> None:
    """The field's declared bounds (``opt(..., gt=0)``) hold for ``value`` (None: unset, skipped)."""
    if value is None:
        return
    if "min_items" in meta and isinstance(value, (list, tuple)) and len(value) < meta["min_items"]:
        raise ConfigError(f"'{path}' needs at least {meta['min_items']} item(s), got {list(value)}")
    items = value if isinstance(value, (list, tuple)) else [value]
    for name, (symbol, ok) in _COMPARE.items():
        if name not in meta:
            continue
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not ok(item, meta[name]):
                raise ConfigError(f"'{path}' must be {symbol} {meta[name]}, got {value!r}")


def tagged(choices: Mapping[str, type], tag: str, default: str | list | None = None, help: str = "") -> Any:
    """A field holding one of ``choices``' dataclasses (or a list of them), selected by ``tag``."""
    meta = {"help": help, "choices": choices, "tag": tag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: [choices[d]() for d in default], metadata=meta)
    if default is None:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(default_factory=lambda: choices[default](), metadata=meta)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_value(tp: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{path}': {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{path}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_check_value(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {type(value).__name__}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _check_value(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{path}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"'{path}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{path}': unsupported config type {tp}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{path or '<root>'}' must be a mapping of keys for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{_join(path, key)}'{_suggest(str(key), list(fields))}")
    values = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{sub}'")
            continue
        if "choices" in f.metadata and get_origin(hints[name]) is list:
            if not isinstance(data[name], list):
                raise ConfigError(f"'{sub}' must be a list of mappings, each with a '{f.metadata['tag']}' key")
            values[name] = [_from_tagged(f.metadata["choices"], f.metadata["tag"], d, f"{sub}.{i}") for i, d in enumerate(data[name])]
        elif "choices" in f.metadata:
            raw, tag = data[name], f.metadata["tag"]
            if isinstance(raw, Mapping) and tag not in raw and f.default_factory is not dataclasses.MISSING:
                raw = {tag: getattr(f.default_factory(), tag), **raw}  # partial override of the default choice
            values[name] = _from_tagged(f.metadata["choices"], tag, raw, sub)
        else:
            values[name] = _check_value(hints[name], data[name], sub)
            _check_bounds(f.metadata, values[name], sub)
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError:
            raise
        except (ValueError, OSError) as e:
            raise ConfigError(f"'{path or '<root>'}': {e}") from None
    return obj


def _from_tagged(choices: Mapping[str, type], tag: str, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping) or tag not in data:
        raise ConfigError(f"'{path}' needs a '{tag}' key, one of {sorted(choices)}")
    kind = data[tag]
    if kind not in choices:
        raise ConfigError(f"'{path}.{tag}': unknown {tag} {kind!r}; choose one of {sorted(choices)}")
    return from_dict(choices[kind], data, path)


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a raw config mapping.

    With the config class ``cls``, an override that switches a tagged section to another class
    (``prompts.source=list``, ``policy.type=consistency``) drops that section's keys the new
    class does not have but the old one had; keys neither class has stay, so typos still fail.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML (quote lists as one argument)") from None
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, parts[: i + 1])]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, parts)] = value
        else:
            if cls is not None and isinstance(node, dict) and node.get(last, value) != value:
                _drop_foreign_keys(node, _tagged_choices(cls, parts), last, node[last], value)
            node[last] = value
    return data


def _tagged_choices(cls: type, parts: list[str]) -> Mapping[str, type] | None:
    """The choices of the tagged section whose tag key is ``parts`` (e.g. prompts.source), else None."""
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    for i, part in enumerate(parts[:-1]):
        f = fields.get(part)
        if f is None:
            return None
        if "choices" in f.metadata:
            rest = parts[i + 1 :]
            if get_origin(hints[part]) is list:  # a list of tagged entries: key.<index>.<tag>
                rest = rest[1:] if rest and rest[0].isdigit() else ["", ""]
            return f.metadata["choices"] if rest == [f.metadata["tag"]] else None
        if not dataclasses.is_dataclass(hints[part]):
            return None
        hints, fields = typing.get_type_hints(hints[part]), {g.name: g for g in dataclasses.fields(hints[part])}
    return None


def _drop_foreign_keys(node: dict, choices: Mapping[str, type] | None, tag: str, old: Any, new: Any) -> None:
    if not choices or old not in choices or new not in choices:
        return
    old_keys = {f.name for f in dataclasses.fields(choices[old])}
    new_keys = {f.name for f in dataclasses.fields(choices[new])}
    for key in list(node):
        if key != tag and key in old_keys and key not in new_keys:
            del node[key]


def _list_index(node: list, part: str, parts: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key '{'.'.join(parts)}': '{part}' is not an index of a list of {len(node)}")
    return int(part)


def load_config(cls: type, path: str | None, overrides: list[str] | None = None) -> Any:
    """Read YAML ``path`` (or nothing), apply overrides, validate into ``cls``."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [], cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)


def describe(cls: type, indent: str = "") -> str:
    """Help text for every field of ``cls`` (used by ``genalign train --help-config``)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "…"
        lines.append(f"{indent}{f.name}: {f.metadata.get('help', '')} [default: {default}]")
        hint = typing.get_type_hints(cls)[f.name]
        if "choices" in f.metadata:
            for name, sub in f.metadata["choices"].items():
                lines.append(f"{indent}  when {f.metadata['tag']} = {name}:")
                lines.append(describe(sub, indent + "    "))
        elif dataclasses.is_dataclass(hint):
            lines.append(describe(hint, indent + "  "))
    return "\n".join(lines)
