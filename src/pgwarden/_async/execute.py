"""Single statements on the handle: ``fetch``, ``fetchrow``, ``fetchval``, ``execute``.

How each attempt is sent is `pgwarden.core.resend.StatementSafety`'s choice:

* **no explicit deadline**: the statement alone, in autocommit: one round
  trip. The lease's sever timer (``default_timeout``) still bounds it.
* **a read under an explicit deadline**: ``BEGIN READ ONLY``, a
  transaction-local ``statement_timeout`` of the time left, the statement and
  ``COMMIT``, in one pipelined round trip, so the server stops the statement
  at the deadline, refuses it if it writes, and no session state is left
  behind (safe behind PgBouncer).
* **a write under an explicit deadline**: BEGIN, the statement timeout, the
  transaction's id and the statement in one pipeline; then ``COMMIT``: two
  round trips, and a lost COMMIT is resolved by id (`AsyncTransactions.commit`).
* **a read sent again** after an attempt that may have run: inside ``BEGIN
  READ ONLY``, so a hidden write (a function that inserts) is refused by the
  server instead of running twice; it then raises `OutcomeUnknown`.

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
from pgwarden._handle.sql import Mode, Params, Query
from pgwarden._handle.state import HandleState
from pgwarden.core.classify import Phase, classify_failure, sqlstate_of
from pgwarden.core.resend import StatementSafety, Verdict, Wrap
from pgwarden.core.retry import RetryPolicy
from pgwarden.core.tracing import StatementObserver
from pgwarden.errors import OutcomeUnknown

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
        self,
        mode: Mode,
        query: Query,
        params: Params,
        timeout: float | None,
        idempotent: bool,
        write: bool | None = None,
    ) -> Any:
        state = self.state
        deadline, explicit = state.deadline_for(timeout)
        state.enter()
        seconds = acquire_wait = used = None
        try:
            if not state.fast_path:
                await self.warmup.wait(deadline)
            if write is None and state.statement_writes(query):
                write = True
            safety = StatementSafety(writes=write, idempotent=idempotent, explicit=explicit)
            policy = state.deadline_policy if explicit else state.statement_policy
            attempt = 1
            while True:
                lease = await self.connections.lease(deadline, explicit=explicit)
                wrap = safety.wrap()
                started = monotonic()
                token = self.observer.statement_started(mode.value, query)
                try:
                    result = await self._statement(
                        lease, mode, query, params, deadline if explicit else None, wrap
                    )
                except BaseException as exc:
                    self.observer.statement_finished(token, exc, None)
                    if not isinstance(exc, Exception):
                        await lease.release()
                        raise
                    lost = lease.lost
                    state.lease_returned(lease.acquire_wait, await lease.release())
                    await self._after_failure(
                        exc, safety, wrap, query, attempt, deadline, policy, lost
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

    async def _after_failure(
        self,
        exc: Exception,
        safety: StatementSafety,
        wrap: Wrap,
        query: Query,
        attempt: int,
        deadline: float | None,
        policy: RetryPolicy,
        lost: bool,
    ) -> None:
        """Return to send the statement again; raise otherwise."""
        state = self.state
        if isinstance(exc, OutcomeUnknown):
            # A COMMIT whose loss could not be resolved: counted as an ambiguous
            # commit already, and never turned into anything else (not even a
            # DeadlineExceeded): the caller must reconcile.
            raise exc
        sqlstate = sqlstate_of(exc)
        kind = classify_failure(exc, Phase.STATEMENT, connection_lost=lost)
        verdict = safety.after_failure(kind, sqlstate, wrap, exc)
        if wrap is Wrap.READ_ONLY and safety.writes:
            # The server refused it read-only: it writes. Not the database failing.
            state.learn_write(query)
            if verdict is Verdict.AS_WRITE:
                return  # nothing ran: send it again as a write, at once
            lost_error = safety.lost_error or exc
            raise state.outcome_unknown(
                lost_error,
                "a statement that reads as a read writes, and an earlier attempt was lost",
            ) from lost_error
        if verdict is Verdict.OUTCOME_UNKNOWN:
            state.failed(
                exc,
                Phase.STATEMENT,
                safety.retry_context(),
                attempt=attempt,
                deadline=deadline,
                policy=policy,
                operation="query",
                connection_lost=lost,
            )
            raise state.outcome_unknown(exc, "connection lost after the write was sent") from exc
        await after_failed_attempt(
            self.connections,
            exc,
            Phase.STATEMENT,
            safety.retry_context(),
            attempt=attempt,
            deadline=deadline,
            policy=policy,
            operation="query",
            connection_lost=lost,
        )

    async def _statement(
        self,
        lease: AsyncLease,
        mode: Mode,
        query: Query,
        params: Params,
        server_deadline: float | None,
        wrap: Wrap,
    ) -> Any:
        conn = lease.conn
        cur = cursor_for(conn, mode)
        if wrap is Wrap.NONE:
            await cur.execute(query, params)
            return await result_of(cur, mode)
        if wrap is Wrap.WRITE and server_deadline is not None:
            await self.transactions.write_under_deadline(lease, cur, query, params, server_deadline)
            return await result_of(cur, mode)
        # A failure inside the pipeline skips the COMMIT; the pool rolls the
        # connection back when it is returned (still under the lease's timer).
        async with conn.pipeline():
            await conn.execute(b"BEGIN READ ONLY" if wrap is Wrap.READ_ONLY else b"BEGIN")
            if server_deadline is not None:
                await set_statement_timeout(conn, server_deadline)
            await cur.execute(query, params)
            await conn.execute(b"COMMIT")
        return await result_of(cur, mode)


def _rows(result: Any) -> int | None:
    if isinstance(result, list):
        return len(result)
    return None if result is None else 1
