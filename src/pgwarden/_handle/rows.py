"""Row shapes as psycopg row factories (`pgwarden.core.rows` holds the logic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg.rows import RowFactory, dict_row, tuple_row

from pgwarden.core.rows import RowShape, RowShapeError, row_maker

__all__ = ["row_factory"]


def row_factory(shape: RowShape | None) -> RowFactory[Any]:
    """The psycopg row factory building rows of *shape* (None: dicts).

    A class that does not fit a result's columns fails when the result's first
    row is built, not when the result arrives: a cursor also carries results
    pgwarden reads itself (a transaction's id) with a row factory of its own.
    """
    if shape is None or shape is dict:
        return dict_row
    if shape is tuple:
        return tuple_row

    def factory(cursor: Any) -> Any:
        description = cursor.description
        if description is None:
            return _no_result
        try:
            return row_maker(shape, [column.name for column in description])
        except RowShapeError as exc:
            error = exc

            def refuse(values: Sequence[Any]) -> Any:
                raise error

            return refuse

    return factory


def _no_result(values: Sequence[Any]) -> Any:
    raise RowShapeError("the statement returned no rows to shape")
