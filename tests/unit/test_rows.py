"""Row shapes (pure logic): which classes fit which columns, and the errors that say why not."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest

from pgwarden.core.rows import RowShapeError, row_maker


@dataclasses.dataclass
class Item:
    id: int
    tags: list[str] = dataclasses.field(default_factory=list)
    computed: int = dataclasses.field(init=False, default=0)


class Point(NamedTuple):
    x: int
    y: int = 0


class Loose:
    def __init__(self, **columns: Any) -> None:
        self.columns = columns


def test_dict_and_tuple_shapes() -> None:
    assert row_maker(dict, ["a", "b"])((1, 2)) == {"a": 1, "b": 2}
    assert row_maker(tuple, ["a", "b"])([1, 2]) == (1, 2)


def test_classes_are_built_by_keyword_with_defaults_filled() -> None:
    assert row_maker(Item, ["id"])((3,)) == Item(3)
    assert row_maker(Item, ["tags", "id"])((["t"], 4)) == Item(4, ["t"])
    assert row_maker(Point, ["y", "x"])((2, 1)) == Point(1, 2)
    assert row_maker(Loose, ["anything"])((5,)).columns == {"anything": 5}


def test_a_column_without_a_field_is_named() -> None:
    with pytest.raises(RowShapeError, match="Item has no field for column 'computed'"):
        row_maker(Item, ["id", "computed"])  # init=False: not a constructor argument
    with pytest.raises(RowShapeError, match="Point has no field for column 'z'"):
        row_maker(Point, ["x", "z"])


def test_a_required_field_without_a_column_is_named() -> None:
    with pytest.raises(RowShapeError, match="required field 'id'"):
        row_maker(Item, ["tags"])
    with pytest.raises(RowShapeError, match="required field 'x'"):
        row_maker(Point, ["y"])


def test_duplicate_columns_and_bad_shapes_are_refused() -> None:
    with pytest.raises(RowShapeError, match="two columns named 'x'"):
        row_maker(Point, ["x", "x"])
    with pytest.raises(RowShapeError, match="dict, tuple or a class"):
        row_maker(42, ["x"])  # type: ignore[arg-type]

    # positional-only parameters cannot be filled by name
    def positional(a: int, /) -> int:
        return a

    with pytest.raises(RowShapeError, match="no field for column 'a'"):
        row_maker(positional, ["a"])
