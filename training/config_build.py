"""Plain YAML/CLI values to the typed config dataclasses, and back, with one-line errors.

``build(cls, d, where)``: a dataclass from a dict, every value coerced to its field's type hint (``coerce``: tuples
of a fixed length, optional fields, ``bool`` only from true/false words, no YAML booleans as numbers) and unknown
keys refused naming the valid ones. ``plain``: the inverse for ``dataclasses.asdict`` (lists for tuples).
``within``: whether a number satisfies a range rule such as ``> 0`` or ``in [0, 1)``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from dtop_export.errors import DToPError


def within(value: float, rule: str) -> bool:
    """Whether a finite ``value`` satisfies a range rule (``> 0``, ``in [0, 1)``); NaN and infinities never do."""
    import math

    if not math.isfinite(value):
        return False
    if rule.startswith("in "):
        lo, hi = (float(x) for x in rule[4:-1].split(","))
        return (lo <= value if rule[3] == "[" else lo < value) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise DToPError(f"config section {where or '(top level)'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise DToPError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, hint, where + name)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise DToPError(f"config key {key} cannot be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if args and Ellipsis not in args:  # a fixed length, such as augment.scale's (lo, hi)
            if len(value) != len(args):
                raise DToPError(f"config key {key} must hold {len(args)} values, got {len(value)}: {list(value)}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        return tuple(coerce(v, elem, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise DToPError(f"config key {key} must be a mapping")
        return dict(value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint in (int, float) and isinstance(value, bool):  # YAML's true/false are ints to Python
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise DToPError(f"config key {key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value
