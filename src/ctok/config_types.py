"""Config values checked against the annotations of the dataclass they fill.

One checker serves the YAML run configs (:mod:`ctok.training.config`) and the checkpoints'
config.json files (:mod:`ctok.models.base`), so a wrong value gets the same message everywhere:
the key, the type expected and the value found (``config key 'image_size' must be an integer, got
'thirty-two'``), not an error from deep inside the model that is built from it.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union


def check_value(key: str, value: Any, kind: Any, *, text_numbers: bool = False) -> Any:
    """``value`` checked against the annotation ``kind``; raises ValueError naming ``key``, the
    expected type and the value. Returns the value as the field should hold it (a float for an int
    given to a float field, a tuple for a list given to a tuple field).

    ``text_numbers``: accept a number written as text for a float field, as YAML 1.1 reads ``1e-4``.
    Supported annotations: bool, int, float, str, Any, Literal, tuple/list of them, and unions with
    None; another annotation raises TypeError (a schema error, not the user's).
    """
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, option, text_numbers=text_numbers)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"config key {key!r} must have {len(args)} entries, got {len(value)}")
            return tuple(check_value(f"{key}[{i}]", v, a, text_numbers=text_numbers)
                         for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(check_value(f"{key}[{i}]", v, item, text_numbers=text_numbers) for i, v in enumerate(value))
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if kind is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept it, since that is how people write rates.
        if text_numbers and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    raise TypeError(f"config schema type {kind!r} of {key!r} is not supported")


def is_plain(kind: Any) -> bool:
    """Whether :func:`check_value` supports the annotation ``kind`` (nested types included)."""
    if kind in (bool, int, float, str, Any, type(None)):
        return True
    origin = typing.get_origin(kind)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, tuple, list):
        return all(a is Ellipsis or is_plain(a) for a in typing.get_args(kind))
    return False
