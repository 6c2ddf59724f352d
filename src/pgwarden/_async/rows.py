"""`AsyncRows`: a view of a handle with one row shape for every call (per-handle ``row=``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from pgwarden._async.stream import DEFAULT_FETCH_SIZE, AsyncStream
from pgwarden._handle.sql import Params, Query

if TYPE_CHECKING:
    from pgwarden._async.database import AsyncDatabase

__all__ = ["AsyncRows"]

RowT = TypeVar("RowT")


class AsyncRows(Generic[RowT]):
    """`AsyncDatabase.fetch`, ``fetchrow`` and ``stream`` with ``row=`` fixed (see
    `AsyncDatabase.with_rows`); everything else is the handle's own."""

    __slots__ = ("db", "row")

    def __init__(self, db: AsyncDatabase, row: Callable[..., RowT]) -> None:
        self.db = db
        self.row = row

    async def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> list[RowT]:
        return await self.db.fetch(
            query, params, timeout=timeout, idempotent=idempotent, write=write, row=self.row
        )

    async def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> RowT | None:
        return await self.db.fetchrow(
            query, params, timeout=timeout, idempotent=idempotent, write=write, row=self.row
        )

    def stream(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        fetch_size: int = DEFAULT_FETCH_SIZE,
    ) -> AsyncStream[RowT]:
        return self.db.stream(query, params, timeout=timeout, fetch_size=fetch_size, row=self.row)
