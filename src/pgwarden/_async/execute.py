"""Single statements on the handle: ``fetch``, ``fetchrow``, ``fetchval``, ``execute``.

Three ways to run one statement, chosen by the call:

* **no explicit deadline**: the statement alone, in autocommit: one round
  trip. The lease's sever timer (``default_timeout``) still bounds it.
* **a read under an explicit deadline**: ``BEGIN``, a transaction-local
  ``statement_timeout`` of the time left, the statement and ``COMMIT``, in one
  pipelined round trip, so the server itself stops the statement at the
  deadline and no session state is left behind (safe behind PgBouncer).
* **a write under an explicit deadline**: the same, plus the transaction's id,
  in one pipeline; then ``COMMIT``: two round trips, and a lost COMMIT is
  resolved by id (`AsyncTransactions.commit`).

Failures go to `HandleState.failed`, the one retry decision.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from pgwarden._async.acquire import AsyncConnections, AsyncLease
from pgwarden._async.retrying import after_failed_attempt
from pgwarden._async.transaction import (
    AsyncTransactions,
    cursor_for,
    result_of,
    set_statement_timeout,
)
from pgwarden._async.warmup import AsyncWarmup
from pgwarden._handle.sql import Mode, Params, Query, query_is_write
from pgwarden._handle.state import HandleState
from pgwarden.core.classify import Phase, RetryContext
from pgwarden.core.tracing import StatementObserver

__all__ = ["AsyncStatements"]


class AsyncStatements:
    def __init__(
        self,
        state: HandleState,
        connections: AsyncConnections,
        warmup: AsyncWarmup,
        transactions: AsyncTransactions,
    ) -> None:
        self.state = state
        self.connections = connections
        self.warmup = warmup
        self.transactions = transactions
        self.observer: StatementObserver = transactions.observer

    async def run(
        self, mode: Mode, query: Query, params: Params, timeout: float | None, idempotent: bool
    ) -> Any:
        state = self.state
        deadline, explicit = state.deadline_for(timeout)
        state.enter()
        seconds = acquire_wait = used = None
        try:
            if not state.fast_path:
                await self.warmup.wait(deadline)
            ctx = RetryContext(is_write=query_is_write(query), idempotent=idempotent)
            policy = state.deadline_policy if explicit else state.statement_policy
            attempt = 1
            while True:
                lease = await self.connections.lease(deadline, explicit=explicit)
                started = monotonic()
                token = self.observer.statement_started(mode.value, query)
                try:
                    result = await self._statement(
                        lease, mode, query, params, deadline if explicit else None, ctx.is_write
                    )
                except BaseException as exc:
                    self.observer.statement_finished(token, exc, None)
                    if not isinstance(exc, Exception):
                        await lease.release()
                        raise
                    lost = lease.lost
                    state.lease_returned(lease.acquire_wait, await lease.release())
                    await after_failed_attempt(
                        self.connections,
                        exc,
                        Phase.STATEMENT,
                        ctx,
                        attempt=attempt,
                        deadline=deadline,
                        policy=policy,
                        operation="query",
                        connection_lost=lost,
                    )
                    attempt += 1
                    continue
                finished = monotonic()
                self.observer.statement_finished(
                    token, None, result if mode is Mode.COUNT else _rows(result)
                )
                used = await lease.release()
                acquire_wait = lease.acquire_wait
                seconds = finished - started
                return result
        finally:
            state.leave(query=query, seconds=seconds, acquire_wait=acquire_wait, used=used)

    async def _statement(
        self,
        lease: AsyncLease,
        mode: Mode,
        query: Query,
        params: Params,
        server_deadline: float | None,
        is_write: bool,
    ) -> Any:
        conn = lease.conn
        cur = cursor_for(conn, mode)
        if server_deadline is None:
            await cur.execute(query, params)
            return await result_of(cur, mode)
        if is_write:
            await self.transactions.write_under_deadline(lease, cur, query, params, server_deadline)
            return await result_of(cur, mode)
        # A failure inside the pipeline skips the COMMIT; the pool rolls the
        # connection back when it is returned (still under the lease's timer).
        async with conn.pipeline():
            await conn.execute(b"BEGIN")
            await set_statement_timeout(conn, server_deadline)
            await cur.execute(query, params)
            await conn.execute(b"COMMIT")
        return await result_of(cur, mode)


def _rows(result: Any) -> int | None:
    if isinstance(result, list):
        return len(result)
    return None if result is None else 1
