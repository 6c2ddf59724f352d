# WARNING: generated from src/pgwarden/_async/rows.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""`Rows`: a view of a handle with one row shape for every call (per-handle ``row=``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from pgwarden._handle.sql import Params, Query
from pgwarden._sync.stream import DEFAULT_FETCH_SIZE, Stream

if TYPE_CHECKING:
    from pgwarden._sync.database import Database

__all__ = ["Rows"]

RowT = TypeVar("RowT")


class Rows(Generic[RowT]):
    """`Database.fetch`, ``fetchrow`` and ``stream`` with ``row=`` fixed (see
    `Database.with_rows`); everything else is the handle's own."""

    __slots__ = ("db", "row")

    def __init__(self, db: Database, row: Callable[..., RowT]) -> None:
        self.db = db
        self.row = row

    def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> list[RowT]:
        return self.db.fetch(
            query, params, timeout=timeout, idempotent=idempotent, write=write, row=self.row
        )

    def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> RowT | None:
        return self.db.fetchrow(
            query, params, timeout=timeout, idempotent=idempotent, write=write, row=self.row
        )

    def stream(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        fetch_size: int = DEFAULT_FETCH_SIZE,
    ) -> Stream[RowT]:
        return self.db.stream(query, params, timeout=timeout, fetch_size=fetch_size, row=self.row)
