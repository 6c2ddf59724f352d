"""``stream()``: the rows of one query, a bounded batch at a time, from a server-side cursor.

A stream is one read-only transaction on one connection: ``BEGIN READ ONLY``,
``DECLARE`` (psycopg's server-side cursor), then ``FETCH FORWARD fetch_size``
whenever the consumer has used up the rows it has, and ``COMMIT`` at the end (or
when the consumer stops early). At most *fetch_size* rows are held in the client
at once, whatever the size of the result. A cursor that lives only inside its
transaction is safe behind PgBouncer's transaction mode: the transaction pins
one server connection from BEGIN to COMMIT.

Deadlines. An explicit deadline (``timeout=`` or ``pgwarden.deadline()``) bounds
the whole stream, the consumer's own time between rows included: it is sent as
the transaction's ``statement_timeout`` and the lease severs the connection when
it passes; a fetch after it raises `DeadlineExceeded` without I/O. With
``server_deadlines=False`` nothing is sent for it: the lease sends a cancel
request at the deadline instead (a FETCH running then is stopped), then severs
the socket if that did not help. Without one,
``default_timeout`` bounds each fetch (and the opening) instead of the whole:
how long a stream lasts is the consumer's choice.

Retries. Opening (BEGIN, DECLARE, the first batch) is re-run on a fresh
connection after a failure that the retry policy allows for a read: no row was
handed out yet. After the first row, a failure ends the stream with the error.

Metrics. One statement (operation ``stream``) per opening attempt for the
observers, with the number of rows delivered; the query histogram gets the time
spent waiting for the server, not the consumer's time.
"""

from __future__ import annotations

import itertools
from time import monotonic
from typing import Any, Generic, TypeVar

import psycopg

from pgwarden._async.acquire import AsyncLease
from pgwarden._async.retrying import after_failed_attempt
from pgwarden._async.transaction import AsyncTransactions, rollback_quietly
from pgwarden._handle.config import call_site_ref
from pgwarden._handle.rows import row_factory
from pgwarden._handle.sql import DEFAULT_FETCH_SIZE, Params, Query
from pgwarden.core.failures import FailureKind, Phase, RetryContext
from pgwarden.core.retry import RetryPolicy, deadline_ran_out
from pgwarden.core.rows import RowShape

__all__ = ["DEFAULT_FETCH_SIZE", "AsyncStream"]

RowT = TypeVar("RowT")


_BEGIN_READ_ONLY = b"BEGIN READ ONLY"
# Re-running the opening re-runs a read-only transaction whole: safe.
_OPEN_CONTEXT = RetryContext(is_write=False)
# After the first row a failure is counted, never retried.
_NO_RETRY = RetryPolicy(attempts=1)
_names = itertools.count(1)


class AsyncStream(Generic[RowT]):
    """An iterator over the rows of one query (see the module for the contract).

    Iterate it (``async for row in db.stream(...)``); the transaction ends when
    the rows do. To stop early, use it as a context manager
    (``async with db.stream(...) as rows:``) or call ``aclose()``: until then its
    connection stays out of the pool.
    """

    def __init__(
        self,
        transactions: AsyncTransactions,
        query: Query,
        params: Params,
        shape: RowShape | None,
        fetch_size: int,
        timeout: float | None,
    ) -> None:
        if fetch_size < 1:
            raise ValueError(f"fetch_size must be >= 1, not {fetch_size}")
        self._transactions = transactions
        self._state = transactions.state
        self._query = query
        self._params = params
        self._factory = row_factory(shape)
        self._fetch_size = fetch_size
        # The call is this one: its deadline counts from here, in the caller's context.
        self._deadline, self._explicit = self._state.deadline_for(timeout)
        self._lease: AsyncLease | None = None
        self._cursor: Any = None
        self._batch: Any = iter(())
        self._token: object = None
        self._leak: Any = None
        self._delivered = 0
        self._waited = 0.0
        self._entered = False
        self._done = False

    @property
    def rows_delivered(self) -> int:
        """How many rows the consumer has been handed so far."""
        return self._delivered

    async def __aenter__(self) -> AsyncStream[RowT]:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        await self._finish(exc)

    def __aiter__(self) -> AsyncStream[RowT]:
        return self

    async def __anext__(self) -> RowT:
        for row in self._batch:
            self._delivered += 1
            return row  # type: ignore[no-any-return]
        if self._done:
            raise StopAsyncIteration
        rows = await self._fetch() if self._lease is not None else await self._open()
        if not rows:
            await self._finish(None)
            raise StopAsyncIteration
        self._batch = iter(rows)
        self._delivered += 1
        return next(self._batch)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """End the stream now (COMMIT the read-only transaction, return the connection)."""
        await self._finish(None)

    async def _open(self) -> list[Any]:
        """BEGIN READ ONLY, DECLARE and the first batch, re-run while nothing was handed out."""
        state = self._state
        transactions = self._transactions
        connections = transactions.connections
        deadline, explicit = self._deadline, self._explicit
        policy = state.deadline_policy if explicit else state.statement_policy
        state.enter()
        self._entered = True
        try:
            if not state.fast_path:
                await transactions.warmup.wait(deadline)
            attempt = 1
            while True:
                lease = await transactions._begin_on_fresh_lease(
                    _BEGIN_READ_ONLY, deadline, explicit
                )
                self._token = transactions.observer.statement_started("stream", self._query)
                started = monotonic()
                cursor: Any = None
                try:
                    cursor = lease.conn.cursor(
                        f"pgw_stream_{next(_names)}", row_factory=self._factory
                    )
                    await cursor.execute(self._query, self._params)
                    rows: list[Any] = await cursor.fetchmany(self._fetch_size)
                except BaseException as exc:
                    transactions.observer.statement_finished(self._token, exc, None)
                    _note_cancel(lease, exc)
                    await rollback_quietly(lease.conn)
                    if cursor is not None:
                        await cursor.close()  # no I/O once the transaction ended
                    lost = lease.lost
                    used = await lease.release()
                    if not isinstance(exc, Exception):
                        raise
                    state.lease_returned(lease.acquire_wait, used)
                    if self._deadline_ended(exc, lease):
                        raise state.deadline_error(exc, "stream") from exc
                    await after_failed_attempt(
                        connections,
                        exc,
                        Phase.STATEMENT,
                        _OPEN_CONTEXT,
                        attempt=attempt,
                        deadline=deadline,
                        policy=policy,
                        operation="stream",
                        connection_lost=lost,
                        whole_transaction=True,
                    )
                    attempt += 1
                    continue
                self._waited += monotonic() - started
                self._lease, self._cursor = lease, cursor
                now = monotonic()
                self._leak = connections.watchdog.arm(
                    now + state.settings.leak_threshold, state.leaked, call_site_ref(), now
                )
                return rows
        except BaseException:
            self._done = True
            self._entered = False
            state.leave()
            raise

    async def _fetch(self) -> list[Any]:
        lease = self._lease
        assert lease is not None
        if self._explicit:
            if self._deadline is not None and monotonic() >= self._deadline:
                error = self._state.deadline_error(None, "stream")
                await self._finish(error)
                raise error
        elif self._state.settings.default_timeout is not None:
            lease.rearm(monotonic() + self._state.settings.default_timeout)
        started = monotonic()
        try:
            rows: list[Any] = await self._cursor.fetchmany(self._fetch_size)
        except BaseException as exc:
            raised: BaseException = exc
            _note_cancel(lease, exc)
            if isinstance(exc, Exception):
                if self._deadline_ended(exc, lease):
                    raised = self._state.deadline_error(exc, "stream")
                # Counted and acted on (a failover drains the pool), never re-sent:
                # rows were handed out already.
                kind, _ = self._state.failed(
                    exc,
                    Phase.STATEMENT,
                    _OPEN_CONTEXT,
                    attempt=1,
                    deadline=self._deadline,
                    policy=_NO_RETRY,
                    operation="stream",
                    connection_lost=lease.lost,
                )
                await self._transactions.connections.after_failure(kind)
            await self._finish(exc)
            if raised is exc:
                raise
            raise raised from exc
        self._waited += monotonic() - started
        return rows

    def _deadline_ended(self, exc: Exception, lease: AsyncLease) -> bool:
        """The deadline ended it: the client severed the socket, or the server's
        statement timeout fired at an explicit deadline."""
        return lease.severed or (
            self._explicit
            and isinstance(exc, psycopg.errors.QueryCanceled)
            and deadline_ran_out(FailureKind.TIMEOUT, monotonic(), self._deadline)
        )

    async def _finish(self, exc: BaseException | None) -> None:
        """COMMIT (or roll back after *exc*), return the connection, report the call."""
        if self._done:
            return
        self._done = True
        self._batch = iter(())
        lease, state = self._lease, self._state
        if lease is None:
            return  # never opened (or the opening failed and reported itself)
        self._lease = None
        transactions = self._transactions
        used: float | None = None
        try:
            try:
                # A read-only COMMIT changes nothing: after a cancel went out at
                # the deadline (server_deadlines=False), rolling back is the same.
                if exc is None and not lease.lost and lease.stop_cancelling():
                    await transactions.commit(lease, readonly=True, deadline=self._deadline)
                else:
                    await rollback_quietly(lease.conn)
            except BaseException as failed:
                exc = failed
                raise
            finally:
                await self._cursor.close()  # no I/O once the transaction ended
                transactions.connections.watchdog.disarm(self._leak)
                used = await lease.release()
        finally:
            transactions.observer.statement_finished(self._token, exc, self._delivered)
            if exc is None:
                state.leave(
                    query=self._query,
                    seconds=self._waited,
                    acquire_wait=lease.acquire_wait,
                    used=used,
                )
            else:
                if used is not None:
                    state.lease_returned(lease.acquire_wait, used)
                state.leave()


def _note_cancel(lease: AsyncLease, exc: BaseException) -> None:
    """The deadline's cancel request stopped the statement: it is used up, so the
    connection may serve again (`AsyncLease.release`)."""
    if lease.cancel_sent and isinstance(exc, psycopg.errors.QueryCanceled):
        lease.cancel_consumed = True
