"""Row shapes: what one result row is built into (pure logic, no I/O).

A *shape* is ``dict`` (column name to value, the default), ``tuple`` (the values
in column order), or any class (or callable) that takes the columns as keyword
arguments: a dataclass, a Pydantic model, an attrs class, a ``NamedTuple``.

A class is checked against the result's columns once per result, before its
first row is built: a column it has no parameter for, or a required parameter
no column fills, is a `RowShapeError` naming the column. A class whose
signature cannot be read (some C types), or which takes ``**kwargs``, is not
checked; its own errors surface when a row is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RowShape", "RowShapeError", "row_maker"]

#: ``dict``, ``tuple``, or a callable taking the columns as keyword arguments.
RowShape = Callable[..., Any]

RowMaker = Callable[[Sequence[Any]], Any]


class RowShapeError(TypeError):
    """A row shape (class) that does not fit the result's columns."""


def row_maker(shape: RowShape, names: Sequence[str]) -> RowMaker:
    """A function building one row of *shape* from the values of columns *names*.

    Raises `RowShapeError` when *shape* cannot take these columns (see the module).
    """
    if shape is dict:
        keys = tuple(names)
        return lambda values: dict(zip(keys, values, strict=False))
    if shape is tuple:
        return tuple
    if not callable(shape):
        raise RowShapeError(f"row= must be dict, tuple or a class, not {shape!r}")
    keys = tuple(names)
    _check_fits(shape, keys)
    return lambda values: shape(**dict(zip(keys, values, strict=False)))


def _check_fits(shape: RowShape, names: tuple[str, ...]) -> None:
    label = getattr(shape, "__qualname__", repr(shape))
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise RowShapeError(
                f"the result has two columns named {name!r}; {label} needs distinct "
                "names (alias one of them with AS)"
            )
        seen.add(name)
    accepted = _parameters(shape)
    if accepted is None:
        return
    takes, required = accepted
    extra = [name for name in names if name not in takes]
    if extra:
        raise RowShapeError(
            f"{label} has no field for column {extra[0]!r} (columns: {', '.join(names)}; "
            f"fields: {', '.join(sorted(takes)) or 'none'})"
        )
    missing = [name for name in required if name not in seen]
    if missing:
        raise RowShapeError(
            f"no column for {label}'s required field {missing[0]!r} (columns: {', '.join(names)})"
        )


def _parameters(shape: RowShape) -> tuple[frozenset[str], list[str]] | None:
    """(the keyword names *shape* takes, those it requires); None: it takes any."""
    if dataclasses.is_dataclass(shape) and isinstance(shape, type):
        fields = [f for f in dataclasses.fields(shape) if f.init]
        needed = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return frozenset(f.name for f in fields), needed
    try:
        signature = inspect.signature(shape)
    except (TypeError, ValueError):
        return None  # no readable signature: the class's own errors will say
    takes: set[str] = set()
    required: list[str] = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            takes.add(parameter.name)
            if parameter.default is inspect.Parameter.empty:
                required.append(parameter.name)
    return frozenset(takes), required
