"""A transaction's BEGIN sent with its first statement: one round trip, not two.

psycopg, outside autocommit, sends ``BEGIN`` by itself before a transaction's first
statement and waits for its answer; in a pipeline too (it syncs after ``BEGIN`` to know
the transaction began). So every SQLAlchemy transaction pays a round trip for ``BEGIN``
alone, and with QueuePool a checkout + ``SELECT 1`` is three (BEGIN, SELECT, the ROLLBACK
on return). The dialect's cursors send psycopg's own ``BEGIN`` text (the connection's
isolation level, read-only and deferrable modes), the deadline's transaction-local
``statement_timeout`` when there is one, the statement and a Sync in libpq's pipeline
mode, in one write, and read the answers before returning, so what the caller sees
afterwards (rows, ``rowcount``, ``description``, the transaction's status, the error a
statement raises) is what psycopg's own path gives.

Not through psycopg's ``conn.pipeline()``, which writes each command apart: through
`pgwarden._handle.pipeline`, which has psycopg's own pieces queue the statement (its
conversion, prepared statements and their maintenance, the pipeline's result routing)
and sends everything in one write (docs/decisions.md).

Only when the dialect asks (``_first_statement``): a transaction's first statement, one
statement (text with no ``;``, since a pipeline is the extended protocol, which takes one
statement where psycopg's simple query would take several; and no COPY), through a cursor
of this module, on a connection not already in a pipeline. Everything else is psycopg's
own path. This module imports psycopg: the dialect loads it at its first connection.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden._async.pipelined import begin_with as begin_with_async
from pgwarden._handle.pipeline import Step
from pgwarden._handle.shape import autocommit_in_place
from pgwarden._sync.pipelined import begin_with

# The attribute of a lent psycopg connection that holds the dialect's record of it
# (`_Lent`), whose ``begin`` is what the dialect asked the next statement to send first:
# None (nothing), ``b""`` (BEGIN) or a timeout command (BEGIN and the timeout).
from pgwarden.sqlalchemy.dialect import _LENT as LENT

__all__ = [
    "AsyncBeginCursor",
    "BeginCursor",
    "cursor_class",
]


def cursor_class(*, asyncio: bool) -> type | None:
    """The cursor class a lent connection gets: None when this libpq has no pipeline
    mode (older than 14), and psycopg's own path is the only one."""
    if not psycopg.Pipeline.is_supported():
        return None
    return AsyncBeginCursor if asyncio else BeginCursor


def _claim(conn: Any) -> bytes | None:
    """What the dialect asked of this statement (see `LENT`), cleared; None also when the
    connection is no longer idle outside autocommit (another cursor began since), is in
    a pipeline of its own, or cannot be switched to autocommit in place. On a non-None
    answer the connection is in autocommit: the caller's `begin_with` sends BEGIN and
    switches it back."""
    lent: Any = getattr(conn, LENT, None)
    begin = None if lent is None else lent.begin
    if begin is None:
        return None
    lent.begin = None
    if conn._autocommit or conn._pipeline is not None or not autocommit_in_place(conn, True):
        return None
    return begin  # type: ignore[no-any-return]


def _steps(timeout: bytes, statement: Step) -> tuple[Step, ...]:
    """What goes after BEGIN: *timeout* when not empty, then the cursor's *statement*."""
    return (timeout, statement) if timeout else (statement,)


class BeginCursor(psycopg.Cursor[Any]):
    """psycopg's cursor; a statement the dialect marked goes with BEGIN (sync)."""

    __slots__ = ()

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: Any = None
    ) -> BeginCursor:
        conn = self._conn
        timeout = _claim(conn)
        if timeout is None:
            return super().execute(query, params, prepare=prepare, binary=binary)
        # `_claim` switched it to autocommit in place: `begin_with` sends BEGIN, then
        # hands the transaction back to psycopg.
        begin_with(conn, *_steps(timeout, (self, query, params, prepare, binary)))
        return self


class AsyncBeginCursor(psycopg.AsyncCursor[Any]):
    """psycopg's cursor; a statement the dialect marked goes with BEGIN (asyncio)."""

    __slots__ = ()

    async def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: Any = None
    ) -> AsyncBeginCursor:
        conn = self._conn
        timeout = _claim(conn)
        if timeout is None:
            return await super().execute(query, params, prepare=prepare, binary=binary)
        await begin_with_async(conn, *_steps(timeout, (self, query, params, prepare, binary)))
        return self
