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

Not through psycopg's ``conn.pipeline()``: it flushes each command by itself, then the
Sync, then a flush request, so the server is woken three or four times for one round
trip, and on a loopback connection that cost about what the saved round trip did
(docs/decisions.md). Here psycopg's own pieces queue the statement (its conversion,
prepared statements and their maintenance, the pipeline's result routing); only the
sending differs.

Only when the dialect asks (``_first_statement``): a transaction's first statement, one
statement (text with no ``;``, since a pipeline is the extended protocol, which takes one
statement where psycopg's simple query would take several; and no COPY), through a cursor
of this module, on a connection not already in a pipeline. Everything else is psycopg's
own path. This module imports psycopg: the dialect loads it at its first connection.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import psycopg
from psycopg import errors
from psycopg.generators import send
from psycopg.pq import ConnStatus

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

_BAD = ConnStatus.BAD
# psycopg re-raises these without the generator's frames (as its cursors do).
_NO_TRACEBACK: Any = getattr(errors, "_NO_TRACEBACK", ())


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


def _with_begin(
    conn: Any, pipeline: Any, timeout: bytes, cursor: Any = None, *statement: Any
) -> Generator[Any, Any, None]:
    """psycopg's generator protocol: BEGIN, *timeout* (when not empty) and, with a
    *cursor*, its ``(query, params, prepare, binary)`` *statement*, then a Sync, sent in
    one write on *conn* (in pipeline mode, *pipeline* its psycopg pipeline object); then
    every answer read and routed as psycopg's pipeline does (the statement's results to
    its cursor, the first error raised once all are read)."""
    pgconn = conn.pgconn
    results = pipeline.result_queue
    failed: BaseException | None = None
    try:
        pgconn.send_query_params(conn._get_tx_start_command(), None)
        results.append(None)
        if timeout:
            pgconn.send_query_params(timeout, None)
            results.append(None)
        if cursor is not None:
            # psycopg's Cursor._execute_gen, less the sending: in pipeline mode none of
            # these steps waits, they queue (the statement, a PREPARE, a DEALLOCATE).
            query, params, prepare, binary = statement
            yield from cursor._start_query(query)
            converted = cursor._convert_query(query, params)
            yield from cursor._maybe_prepare_gen(converted, prepare=prepare, binary=binary)
            cursor._last_query = query
            yield from conn._prepared.maintain_gen(conn)
    except Exception as exc:  # a parameter psycopg cannot adapt: what was queued still goes
        failed = exc
    commands = pipeline.command_queue
    while commands:
        commands.popleft()()  # into libpq's buffer; nothing is written yet
    pgconn.pipeline_sync()
    results.append(None)
    yield from send(pgconn)  # the one write
    yield from pipeline._fetch_gen(flush=False)
    if failed is not None:
        raise failed


def _enter(conn: Any, pipeline: Any) -> None:
    """Put *conn* in pipeline mode under *pipeline* (its lock held by the caller)."""
    conn._check_connection_ok()
    conn.pgconn.enter_pipeline_mode()
    conn._pipeline = pipeline
    pipeline.level = 1


def _leave(conn: Any, pipeline: Any, failing: bool) -> None:
    """Out of pipeline mode. If libpq refuses (answers left unread: the wait was
    interrupted), the connection is in a state nothing can use, so it is closed: the
    dialect then discards it. *failing*: an exception is on its way already."""
    pipeline.level = 0
    conn._pipeline = None
    pgconn = conn.pgconn
    if pgconn.status == _BAD:
        return
    try:
        pgconn.exit_pipeline_mode()
    except psycopg.OperationalError:
        pgconn.finish()
        if not failing:
            raise


def _run(conn: Any, timeout: bytes, *statement: Any) -> None:
    """`_with_begin` on a sync *conn*, in pipeline mode for its length."""
    pipeline = psycopg.Pipeline(conn, _no_lock=True)
    with conn.lock:
        _enter(conn, pipeline)
        failing = True
        try:
            conn.wait(_with_begin(conn, pipeline, timeout, *statement))
            failing = False
        except _NO_TRACEBACK as exc:
            raise exc.with_traceback(None)  # noqa: B904 - itself, less our frames (as psycopg)
        finally:
            _leave(conn, pipeline, failing)


async def _run_async(conn: Any, timeout: bytes, *statement: Any) -> None:
    """`_run` for an asyncio connection."""
    pipeline = psycopg.AsyncPipeline(conn, _no_lock=True)
    async with conn.lock:
        _enter(conn, pipeline)
        failing = True
        try:
            await conn.wait(_with_begin(conn, pipeline, timeout, *statement))
            failing = False
        except _NO_TRACEBACK as exc:
            raise exc.with_traceback(None)  # noqa: B904 - itself, less our frames (as psycopg)
        finally:
            _leave(conn, pipeline, failing)


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
            _run(conn, timeout, self, query, params, prepare, binary)
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
            await _run_async(conn, timeout, self, query, params, prepare, binary)
        finally:
            conn._autocommit = False
        return self


def begin_with_timeout(conn: Any, timeout: bytes) -> None:
    """BEGIN and the transaction-local ``statement_timeout`` (*timeout*, from
    ``statement_timeout_command``) in one round trip, for a first statement that cannot
    go with them (sync); psycopg's path if *conn* cannot be switched in place."""
    if conn._pipeline is not None or not autocommit_in_place(conn, True):
        conn.execute(timeout, prepare=False)  # psycopg sends BEGIN, then this
        return
    try:
        _run(conn, timeout)
    finally:
        conn._autocommit = False


async def begin_with_timeout_async(conn: Any, timeout: bytes) -> None:
    """`begin_with_timeout` for an asyncio connection."""
    if conn._pipeline is not None or not autocommit_in_place(conn, True):
        await conn.execute(timeout, prepare=False)
        return
    try:
        await _run_async(conn, timeout)
    finally:
        conn._autocommit = False
