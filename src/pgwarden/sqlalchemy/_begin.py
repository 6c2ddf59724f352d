"""A transaction's BEGIN sent with its first statement: one round trip, not two.

psycopg, outside autocommit, sends ``BEGIN`` by itself before a transaction's first
statement and waits for its answer; in a pipeline too (it syncs after ``BEGIN`` to know
the transaction began). So every SQLAlchemy transaction pays a round trip for ``BEGIN``
alone, and with QueuePool a checkout + ``SELECT 1`` is three (BEGIN, SELECT, the ROLLBACK
on return). The dialect's cursors send psycopg's own ``BEGIN`` text (the connection's
isolation level, read-only and deferrable modes), the deadline's transaction-local
``statement_timeout`` when there is one, and the statement in one pipeline, and end it
before returning, so what the caller sees afterwards (rows, ``rowcount``,
``description``, the transaction's status, the error a statement raises) is what
psycopg's own path gives.

Only when the dialect asks (``_first_statement``): a transaction's first statement, one
statement (text with no ``;``, since a pipeline is the extended protocol, which takes one
statement where psycopg's simple query would take several; and no COPY), through a cursor
of this module. Everything else is psycopg's own path. This module imports psycopg: the
dialect loads it at its first connection.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden._handle.shape import autocommit_in_place

# The attribute of a lent psycopg connection that holds the dialect's record of it
# (`_Lent`), whose ``begin`` is what the dialect asked the next statement to send first:
# None (nothing), ``b""`` (BEGIN) or a timeout command (BEGIN and the timeout).
from pgwarden.sqlalchemy.dialect import _LENT as LENT

__all__ = [
    "AsyncBeginCursor",
    "BeginCursor",
    "begin_with_timeout",
    "begin_with_timeout_async",
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
    connection is no longer idle outside autocommit (another cursor began since), or
    cannot be switched to autocommit in place. On a non-None answer the connection is
    in autocommit: the caller sends its own BEGIN and must switch it back."""
    lent: Any = getattr(conn, LENT, None)
    begin = None if lent is None else lent.begin
    if begin is None:
        return None
    lent.begin = None
    if conn._autocommit or not autocommit_in_place(conn, True):
        return None
    return begin  # type: ignore[no-any-return]


def _queue(conn: Any, timeout: bytes) -> None:
    """Queue psycopg's own BEGIN text and *timeout* (when not empty) on *conn*'s pipeline:
    psycopg's command queue, as for its own COMMIT, so they cost no I/O of their own
    and go out with the statement; their errors are raised with its results."""
    conn.wait(conn._exec_command(conn._get_tx_start_command()))
    if timeout:
        conn.wait(conn._exec_command(timeout))


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
            with conn.pipeline():
                _queue(conn, timeout)
                super().execute(query, params, prepare=prepare, binary=binary)
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
            async with conn.pipeline():
                await _queue_async(conn, timeout)
                await super().execute(query, params, prepare=prepare, binary=binary)
        finally:
            conn._autocommit = False
        return self


async def _queue_async(conn: Any, timeout: bytes) -> None:
    """`_queue` for an asyncio connection."""
    await conn.wait(conn._exec_command(conn._get_tx_start_command()))
    if timeout:
        await conn.wait(conn._exec_command(timeout))


def begin_with_timeout(conn: Any, timeout: bytes) -> None:
    """BEGIN and the transaction-local ``statement_timeout`` (*timeout*, from
    ``statement_timeout_command``) in one round trip, for a first statement that cannot
    go with them (sync); psycopg's path if *conn* cannot be switched in place."""
    if not autocommit_in_place(conn, True):
        conn.execute(timeout, prepare=False)  # psycopg sends BEGIN, then this
        return
    try:
        with conn.pipeline():
            _queue(conn, timeout)
    finally:
        conn._autocommit = False


async def begin_with_timeout_async(conn: Any, timeout: bytes) -> None:
    """`begin_with_timeout` for an asyncio connection."""
    if not autocommit_in_place(conn, True):
        await conn.execute(timeout, prepare=False)
        return
    try:
        async with conn.pipeline():
            await _queue_async(conn, timeout)
    finally:
        conn._autocommit = False
