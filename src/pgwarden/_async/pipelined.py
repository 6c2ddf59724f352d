"""`pgwarden._handle.pipeline.one_write` on a connection: several steps, one round trip.

The shell around the protocol: pipeline mode for the length of one write and its
answers, under the connection's lock. Used by pgwarden's own statements that go in a
pipeline (a write with parameters under a deadline, a savepoint's timeout, BEGIN with
its timeout) and by the SQLAlchemy dialect's first statement.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgwarden._handle.pipeline import NO_TRACEBACK, Step, enter, leave, one_write
from pgwarden._handle.shape import autocommit_in_place

__all__ = ["begin_with", "send_together"]


async def send_together(conn: Any, *steps: Step) -> None:
    """Send *steps* (see `pgwarden._handle.pipeline.Step`) in one write and read every
    answer: each statement's results are on its cursor afterwards, and the first
    error is raised once all are read. On a connection already in a pipeline of its
    own, they join it through psycopg's own path (and are synced there)."""
    if conn._pipeline is not None:
        async with conn.pipeline():
            await _one_by_one(conn, steps)
        return
    pipeline: Any
    if True:  # ASYNC
        pipeline = psycopg.AsyncPipeline(conn, _no_lock=True)
    else:
        pipeline = psycopg.Pipeline(conn, _no_lock=True)
    async with conn.lock:
        enter(conn, pipeline)
        failing = True
        try:
            await conn.wait(one_write(conn, pipeline, steps))
            failing = False
        except NO_TRACEBACK as exc:
            raise exc.with_traceback(None)  # noqa: B904 - itself, less our frames (as psycopg)
        finally:
            leave(conn, pipeline, failing)


async def begin_with(conn: Any, *steps: Step) -> None:
    """Begin a transaction on *conn* (idle, outside autocommit) with *steps* in the same
    write: psycopg's own BEGIN text (the connection's isolation level, read-only and
    deferrable modes), then *steps*, one round trip where psycopg would take one for
    BEGIN alone (in a pipeline too: it syncs after BEGIN). The transaction is then
    psycopg's, as if it had begun it. A connection that cannot be switched to autocommit
    in place (not idle, in a pipeline) takes psycopg's own path: it sends BEGIN by
    itself before the first step."""
    if not autocommit_in_place(conn, True):
        await _one_by_one(conn, steps)
        return
    try:
        await send_together(conn, conn._get_tx_start_command(), *steps)
    finally:
        conn._autocommit = False  # the transaction is psycopg's from here on


async def _one_by_one(conn: Any, steps: tuple[Step, ...]) -> None:
    """*steps* through psycopg's own path, each on its own."""
    for step in steps:
        if isinstance(step, bytes):
            await conn.execute(step, prepare=False)
        else:
            cursor, query, params, prepare, binary = step
            await cursor.execute(query, params, prepare=prepare, binary=binary)
