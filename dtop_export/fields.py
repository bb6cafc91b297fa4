"""Types of the values a file hands to a config dataclass, checked against its fields' hints, with one-line errors.

A checkpoint's ``config`` and ``preprocess`` sections are plain values that ``to_dict`` wrote; a file edited by hand
or by another tool can hold a string where a number belongs, which would fail far from the file (a ``TypeError``
in the model's constructor, a ``ZeroDivisionError`` in a resize). :func:`check_field_types` names the field instead.
Strict: no coercion (``"4"`` is not an int, ``true`` is not a number); lists stand for tuples.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from dtop_export.errors import DToPError


def check_field_types(cls: type, values: dict[str, Any]) -> None:
    """Raise :class:`DToPError` naming the first of ``values`` whose value does not fit its field's type hint."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and not fits(values[f.name], hints[f.name]):
            raise DToPError(f"field {f.name} is {values[f.name]!r}: not a valid {_name(hints[f.name])}")


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (bool, int, float, str, Literal, tuple[...], dict, Optional, Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if args and Ellipsis not in args:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return all(fits(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
