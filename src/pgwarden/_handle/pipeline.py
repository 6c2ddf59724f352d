"""Several commands and statements sent in one write, in libpq's pipeline mode.

psycopg's ``conn.pipeline()`` flushes each command by itself, then the Sync, then a
flush request: one round trip costs three or four writes, and the server is woken for
each (docs/decisions.md, "One write, not four"). `one_write` queues every step the way
psycopg's pipeline does (its conversion of parameters, prepared statements and their
upkeep, its routing of each result to its cursor), then writes them and a Sync at once,
and reads every answer before returning. Only the sending differs from psycopg's own
path, so what the caller sees afterwards (rows, ``rowcount``, the transaction's status,
the first error raised) is what ``conn.pipeline()`` would give.

This module holds the protocol, no I/O: the shells (`pgwarden._async.pipelined` and
its generated sync twin) run it with the connection's own wait, so a deadline that
shuts the connection's socket bounds it as it bounds any statement. Loaded by the first
call that pipelines (a write with parameters under a deadline, a savepoint with a
deadline), not by a first query.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from psycopg import errors
from psycopg.generators import send
from psycopg.pq import ConnStatus

__all__ = ["NO_TRACEBACK", "Step", "enter", "leave", "one_write"]

#: One step: a command whose answer nobody reads (``BEGIN``, ``SET ...``: bytes, no
#: parameters), or a cursor's statement, ``(cursor, query, params, prepare, binary)``
#: as psycopg's ``Cursor.execute`` takes them, whose results go to that cursor.
Step = bytes | tuple[Any, Any, Any, Any, Any]

#: psycopg re-raises these without the generator's frames (as its cursors do).
NO_TRACEBACK: Any = getattr(errors, "_NO_TRACEBACK", ())

_BAD = ConnStatus.BAD


def one_write(conn: Any, pipeline: Any, steps: Sequence[Step]) -> Generator[Any, Any, None]:
    """psycopg's generator protocol: every step of *steps*, in order, then a Sync, sent
    in one write on *conn* (in pipeline mode under *pipeline*, its psycopg pipeline
    object); then every answer read and routed as psycopg's pipeline does, the first
    error raised once all are read.

    A step that fails before anything is sent (a parameter psycopg cannot adapt) stops
    the queuing; what was queued before it still goes, with its Sync, as in psycopg's
    ``conn.pipeline()``, and then its error is raised."""
    pgconn = conn.pgconn
    commands = pipeline.command_queue
    results = pipeline.result_queue
    failed: BaseException | None = None
    try:
        for step in steps:
            if isinstance(step, bytes):
                # After what a cursor queued before it: the server runs them in order.
                while commands:
                    commands.popleft()()
                pgconn.send_query_params(step, None)
                results.append(None)
                continue
            # psycopg's Cursor._execute_gen, less the sending: in pipeline mode none of
            # these steps waits, they queue (the statement, a PREPARE, a DEALLOCATE).
            cursor, query, params, prepare, binary = step
            yield from cursor._start_query(query)
            converted = cursor._convert_query(query, params)
            yield from cursor._maybe_prepare_gen(converted, prepare=prepare, binary=binary)
            cursor._last_query = query
            yield from conn._prepared.maintain_gen(conn)
    except Exception as exc:
        failed = exc
    while commands:
        commands.popleft()()  # into libpq's buffer; nothing is written yet
    pgconn.pipeline_sync()
    results.append(None)
    yield from send(pgconn)  # the one write
    yield from pipeline._fetch_gen(flush=False)
    if failed is not None:
        raise failed


def enter(conn: Any, pipeline: Any) -> None:
    """Put *conn* in pipeline mode under *pipeline* (the caller holds its lock)."""
    conn._check_connection_ok()
    conn.pgconn.enter_pipeline_mode()
    conn._pipeline = pipeline
    pipeline.level = 1


def leave(conn: Any, pipeline: Any, failing: bool) -> None:
    """Out of pipeline mode. If libpq refuses (answers left unread: the wait was
    interrupted), the connection is in a state nothing can use, so it is closed, and
    its owner discards it. *failing*: an exception is on its way already (it wins)."""
    pipeline.level = 0
    conn._pipeline = None
    pgconn = conn.pgconn
    if pgconn.status == _BAD:
        return
    try:
        pgconn.exit_pipeline_mode()
    except errors.OperationalError:
        pgconn.finish()
        if not failing:
            raise
