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

from pgwarden._async.pipelined import send_together as send_together_async
from pgwarden._handle.pipeline import Step
from pgwarden._handle.shape import autocommit_in_place
from pgwarden._sync.pipelined import send_together

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
    answer the connection is in autocommit: the caller sends its own BEGIN and must
    switch it back."""
    lent: Any = getattr(conn, LENT, None)
    begin = None if lent is None else lent.begin
    if begin is None:
        return None
    lent.begin = None
    if conn._autocommit or conn._pipeline is not None or not autocommit_in_place(conn, True):
        return None
    return begin  # type: ignore[no-any-return]


def _steps(conn: Any, timeout: bytes, *statement: Any) -> tuple[Step, ...]:
    """BEGIN (psycopg's own text: the isolation level, read-only and deferrable modes),
    *timeout* when not empty, and the cursor's *statement* when there is one."""
    begin: bytes = conn._get_tx_start_command()
    if timeout:
        return (begin, timeout, statement) if statement else (begin, timeout)
    return (begin, statement) if statement else (begin,)


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
        try:
            send_together(conn, *_steps(conn, timeout, self, query, params, prepare, binary))
        finally:
            conn._autocommit = False  # the transaction is psycopg's from here on
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
        try:
            await send_together_async(
                conn, *_steps(conn, timeout, self, query, params, prepare, binary)
            )
        finally:
            conn._autocommit = False
        return self
