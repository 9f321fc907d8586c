"""Reading YAML and JSON at the edge: strict parsing (a key given twice is refused), and typed dataclasses built from
mappings with every unknown key, missing key and wrong type named. specs.py, plan.py and results.py build on this."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from planner.errors import FILE, SpecError

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(source: str, path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(source, path, value, args[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=path + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(source, path, f"expected a list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):  # tuple[int, int] is a pair, tuple[X, ...] any length
            raise SpecError(source, path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(source, f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise SpecError(source, path, f"expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALARS and (type(value) is not tp):
        raise SpecError(source, path, f"expected {_SCALARS[tp]}, got {value!r}")
    if tp is float and not math.isfinite(value):  # YAML .nan/.inf and JSON NaN/Infinity parse as floats
        raise SpecError(source, path, f"expected a finite number, got {value!r}")
    return value


def from_dict(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Build dataclass cls from a mapping: rejects unknown keys, missing keys and wrong types."""
    if not isinstance(data, dict):
        raise SpecError(source, prefix.rstrip(".") or "(top level)", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(source, prefix + unknown[0], f"unknown key; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(source, prefix + name, "missing; this field is required")
            continue
        kwargs[name] = _convert(source, prefix + name, data[name], hints[name])
    return cls(**kwargs)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int | None):
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML lets the last one win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_positive(source: str, obj: Any, names: list[str]) -> None:
    """Refuse a zero or negative value of any of `names`, naming the field (a spec's sizes, rates and counts)."""
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise SpecError(source, n, f"must be positive, got {v}")


def _json_pairs(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise _DuplicateKey(k, None)
    return dict(pairs)


def read_text(path: Path) -> str:
    """A file's text, as UTF-8; a SpecError naming the file when it cannot be read or is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpecError(str(path), FILE, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(str(path), FILE, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") from None


def parse_mapping_text(text: str, source: str, is_json: bool) -> Any:
    """JSON or YAML text to Python objects; a key given twice in one mapping is refused, naming it."""
    try:
        return json.loads(text, object_pairs_hook=_json_pairs) if is_json else yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        where = f" (line {e.line})" if e.line else ""
        raise SpecError(source, str(e.key), f"given twice{where}; keep one (the last one would silently win)") from None


def read_mapping(path: Path) -> dict:
    text = read_text(path)
    try:
        data = parse_mapping_text(text, str(path), path.suffix == ".json")
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else (f" at line {e.lineno}" if hasattr(e, "lineno") else "")
        raise SpecError(str(path), FILE, f"malformed {'JSON' if path.suffix == '.json' else 'YAML'}{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), "(top level)", "expected a mapping of field: value")
    return data
