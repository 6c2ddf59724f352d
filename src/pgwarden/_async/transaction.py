"""Transactions: ``transaction()``, ``run_transaction()``, COMMIT and commit resolution.

A transaction holds one lease from BEGIN to the pool's reset after COMMIT or
ROLLBACK, so all of it is under the call's deadline. BEGIN is retried on a
fresh connection when it fails before anything ran. A connection lost before
COMMIT was sent raises `NotCommitted` (the server rolls back); a connection
lost *during* COMMIT is resolved by ``txid_status()`` on another connection,
within the same deadline, through an internal lease that bypasses the public
API and its metrics (`pgwarden.core.commit` says what the answer means).

What a plain ``transaction()`` costs: BEGIN (pipelined with the statement
timeout when there is an explicit deadline), your statements, and before
COMMIT one ``txid_current_if_assigned()`` query when ``resolve_commits`` is
on and the transaction is not read-only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from time import monotonic
from typing import Any, TypeVar

import psycopg
from psycopg.rows import tuple_row

from pgwarden._async._compat import sleep
from pgwarden._async.acquire import AsyncConnections, AsyncLease
from pgwarden._async.pool import PgwAsyncConnection
from pgwarden._async.retrying import after_failed_attempt
from pgwarden._async.warmup import AsyncWarmup
from pgwarden._handle.config import call_site
from pgwarden._handle.sql import (
    MARKER,
    MARKER_IF_ASSIGNED,
    RESOLVE,
    SET_STATEMENT_TIMEOUT,
    ManyParams,
    Mode,
    Params,
    Query,
    begin_statement,
    statement_timeout_args,
)
from pgwarden._handle.state import HandleState
from pgwarden.core.classify import (
    FailureKind,
    Phase,
    RetryContext,
    classify_failure,
    sqlstate_of,
)
from pgwarden.core.commit import RESOLVE_POLL_SECONDS, CommitOutcome, commit_outcome
from pgwarden.core.tracing import NOOP_STATEMENT_OBSERVER, StatementObserver
from pgwarden.errors import AmbiguousCommitError, NotCommitted

__all__ = [
    "AsyncTransaction",
    "AsyncTransactions",
    "cursor_for",
    "result_of",
    "set_statement_timeout",
]

T = TypeVar("T")

# What identifies a transaction for commit resolution: (txid or None, server start).
_TxMarker = tuple[Any, Any]

# BEGIN runs before the user's work: a failure there ran nothing of theirs.
_BEGIN_CONTEXT = RetryContext(is_write=False)
# run_transaction re-runs the whole function; the function vouches for itself.
_WHOLE_CONTEXT = RetryContext(is_write=True, idempotent=True)

# Commit resolution asks for at most this long (within the call's deadline).
RESOLVE_FOR_AT_LEAST = 2.0


async def set_statement_timeout(conn: PgwAsyncConnection, deadline: float) -> None:
    """Set a transaction-local ``statement_timeout`` of the time left before *deadline*
    (inside BEGIN ... COMMIT; pipelined with what it bounds)."""
    await conn.execute(SET_STATEMENT_TIMEOUT, statement_timeout_args(deadline - monotonic()))


class AsyncTransaction:
    """Statements inside one transaction. Never retried one by one.

    Each statement is reported to the handle's statement observers (operation
    ``transaction``), as the handle's own query methods are.
    """

    __slots__ = ("_observer", "connection")

    def __init__(
        self, connection: PgwAsyncConnection, observer: StatementObserver | None = None
    ) -> None:
        self.connection = connection
        self._observer = observer or NOOP_STATEMENT_OBSERVER

    async def _run(self, mode: Mode, query: Query, params: Params) -> Any:
        token = self._observer.statement_started("transaction", query)
        try:
            cur = cursor_for(self.connection, mode)
            await cur.execute(query, params)
            result = await result_of(cur, mode)
        except BaseException as exc:
            self._observer.statement_finished(token, exc, None)
            raise
        self._observer.statement_finished(token, None, cur.rowcount)
        return result

    async def fetch(self, query: Query, params: Params = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._run(Mode.ROWS, query, params)
        return rows

    async def fetchrow(self, query: Query, params: Params = None) -> dict[str, Any] | None:
        row: dict[str, Any] | None = await self._run(Mode.ROW, query, params)
        return row

    async def fetchval(self, query: Query, params: Params = None) -> Any:
        return await self._run(Mode.VALUE, query, params)

    async def execute(self, query: Query, params: Params = None) -> int:
        count: int = await self._run(Mode.COUNT, query, params)
        return count

    async def executemany(self, query: Query, params_seq: Iterable[ManyParams]) -> int:
        token = self._observer.statement_started("executemany", query)
        cur = self.connection.cursor()
        try:
            await cur.executemany(query, params_seq)
        except BaseException as exc:
            self._observer.statement_finished(token, exc, None)
            raise
        self._observer.statement_finished(token, None, cur.rowcount)
        return cur.rowcount


async def result_of(cur: Any, mode: Mode) -> Any:
    """What a query method returns, from its cursor."""
    if mode is Mode.ROWS:
        return await cur.fetchall()
    if mode is Mode.ROW:
        return await cur.fetchone()
    if mode is Mode.VALUE:
        row = await cur.fetchone()
        return None if row is None else row[0]
    return cur.rowcount


def cursor_for(conn: PgwAsyncConnection, mode: Mode) -> Any:
    """A cursor whose rows suit *mode*: tuples for a single value, else dicts."""
    return conn.cursor(row_factory=tuple_row) if mode is Mode.VALUE else conn.cursor()


class AsyncTransactions:
    def __init__(
        self, state: HandleState, connections: AsyncConnections, warmup: AsyncWarmup
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.connections = connections
        self.warmup = warmup
        self.observer: StatementObserver = NOOP_STATEMENT_OBSERVER

    # --- transaction() -----------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(
        self, isolation: str | None, readonly: bool, timeout: float | None
    ) -> AsyncIterator[AsyncTransaction]:
        deadline, explicit = self.state.deadline_for(timeout)
        async with self._begin(isolation, readonly, deadline, explicit) as tx:
            yield tx

    @asynccontextmanager
    async def _begin(
        self, isolation: str | None, readonly: bool, deadline: float | None, explicit: bool
    ) -> AsyncIterator[AsyncTransaction]:
        state = self.state
        begin = begin_statement(isolation, readonly)
        state.enter()
        try:
            if not state.fast_path:
                await self.warmup.wait(deadline)
            lease = await self._begin_on_fresh_lease(begin, deadline, explicit)
            async with self.connections.held(lease, call_site()):
                conn = lease.conn
                try:
                    yield AsyncTransaction(conn, self.observer)
                except BaseException as exc:
                    await _rollback_quietly(conn)
                    if lease.severed:
                        raise state.deadline_error(exc, "transaction") from exc
                    if _lost_before_commit(exc, lease):
                        raise NotCommitted(
                            "connection lost before COMMIT; nothing was committed "
                            f"({state.describe_error(exc)})"
                        ) from exc
                    raise
                await self.commit(lease, readonly=readonly, deadline=deadline)
        finally:
            state.leave()

    async def _begin_on_fresh_lease(
        self, begin: bytes, deadline: float | None, explicit: bool
    ) -> AsyncLease:
        """Acquire and BEGIN, retrying failures that happen before anything ran."""
        state = self.state
        attempt = 1
        while True:
            lease = await self.connections.lease(deadline, explicit=explicit)
            conn = lease.conn
            try:
                if explicit and deadline is not None:
                    async with conn.pipeline():
                        await conn.execute(begin)
                        await set_statement_timeout(conn, deadline)
                else:
                    await conn.execute(begin)
                return lease
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: give the connection back
                    await lease.release()
                    raise
                lost = lease.lost
                state.lease_returned(lease.acquire_wait, await lease.release())
                await after_failed_attempt(
                    self.connections,
                    exc,
                    Phase.FIRST_USE,
                    _BEGIN_CONTEXT,
                    attempt=attempt,
                    deadline=deadline,
                    policy=state.deadline_policy if explicit else state.statement_policy,
                    operation="BEGIN",
                    connection_lost=lost,
                )
                attempt += 1

    # --- run_transaction() ---------------------------------------------------------------------
    async def run_transaction(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        isolation: str | None,
        readonly: bool,
        timeout: float | None,
        attempts: int | None,
    ) -> T:
        state = self.state
        deadline, explicit = state.deadline_for(timeout)
        limit = attempts if attempts is not None else max(self.settings.retry_attempts, 5)
        policy = dataclasses.replace(state.statement_policy, attempts=limit)
        attempt = 1
        while True:
            try:
                async with self._begin(isolation, readonly, deadline, explicit) as tx:
                    result = await fn(tx)
                return result
            except Exception as exc:
                await after_failed_attempt(
                    self.connections,
                    exc,
                    Phase.STATEMENT,
                    _WHOLE_CONTEXT,
                    attempt=attempt,
                    deadline=deadline,
                    policy=policy,
                    operation="transaction",
                    whole_transaction=True,
                )
                attempt += 1

    async def executemany(
        self,
        query: Query,
        rows: list[ManyParams],
        *,
        timeout: float | None,
        idempotent: bool,
    ) -> int:
        async def body(tx: AsyncTransaction) -> int:
            return await tx.executemany(query, rows)

        return await self.run_transaction(
            body,
            isolation=None,
            readonly=False,
            timeout=timeout,
            attempts=None if idempotent else 1,
        )

    # --- a single write under a deadline -------------------------------------------------------
    async def write_under_deadline(
        self, lease: AsyncLease, cur: Any, query: Query, params: Params, deadline: float
    ) -> None:
        """A write whose outcome is always knowable, in two round trips: BEGIN, the
        statement timeout, the transaction id and the statement in one pipeline;
        then COMMIT, resolved by id if the connection is lost during it."""
        conn = lease.conn
        marker_cur = conn.cursor()
        try:
            async with conn.pipeline():
                await conn.execute(b"BEGIN")
                await set_statement_timeout(conn, deadline)
                await marker_cur.execute(MARKER)
                await cur.execute(query, params)
        except psycopg.Error as exc:
            if _lost_before_commit(exc, lease):
                raise NotCommitted(
                    "connection lost before COMMIT; nothing was committed "
                    f"({self.state.describe_error(exc)})"
                ) from exc
            raise
        marker = _marker(await marker_cur.fetchone())
        await self.commit(lease, readonly=False, deadline=deadline, marker=marker)

    # --- COMMIT and its resolution -------------------------------------------------------------
    async def commit(
        self,
        lease: AsyncLease,
        *,
        readonly: bool,
        deadline: float | None,
        marker: _TxMarker | None = None,
    ) -> None:
        """COMMIT; if the connection is lost meanwhile, resolve the outcome by txid.

        *marker* is the transaction's id and server start time when the caller
        already fetched them.
        """
        conn = lease.conn
        resolve = self.settings.resolve_commits and not readonly
        if resolve and marker is None:
            # txid NULL when the transaction wrote nothing: nothing to resolve then.
            cur = await conn.execute(MARKER_IF_ASSIGNED)
            marker = _marker(await cur.fetchone())
        try:
            await conn.execute(b"COMMIT")
        except psycopg.OperationalError as exc:
            kind = classify_failure(exc, Phase.COMMIT, connection_lost=lease.lost)
            if kind is not FailureKind.LOST_COMMIT:
                raise  # a server-side commit failure (e.g. deferred constraint): not ambiguous
            if readonly:
                return  # a read-only transaction changed nothing; its fate does not matter
            await self._resolve(exc, marker, resolve=resolve, deadline=deadline)

    async def _resolve(
        self,
        exc: psycopg.OperationalError,
        marker: _TxMarker | None,
        *,
        resolve: bool,
        deadline: float | None,
    ) -> None:
        state = self.state
        if not resolve:
            state.ambiguous_commit("unknown")
            raise AmbiguousCommitError(
                "connection lost during COMMIT and commit resolution is off; "
                f"the outcome is unknown ({state.describe_error(exc)})"
            ) from exc
        if marker is None or marker[0] is None:
            # Nothing was written, so there is nothing whose fate is unknown.
            state.ambiguous_commit("committed")
            return
        txid, started = marker
        outcome = await self._ask(txid, started, deadline)
        state.ambiguous_commit(outcome.value)
        if outcome is CommitOutcome.COMMITTED:
            return
        if outcome is CommitOutcome.ABORTED:
            raise NotCommitted(
                "connection lost during COMMIT; the transaction was rolled back "
                f"({state.describe_error(exc)})"
            ) from exc
        raise AmbiguousCommitError(
            f"connection lost during COMMIT and txid {txid} could not be resolved "
            f"({state.describe_error(exc)})",
            txid=txid,
        ) from exc

    async def _ask(self, txid: Any, started: Any, deadline: float | None) -> CommitOutcome:
        """``txid_status()`` on another connection until it answers for good, within
        the deadline (an internal lease: not a user query, not in the metrics)."""
        until = monotonic() + max(self.settings.connect_timeout, RESOLVE_FOR_AT_LEAST)
        if deadline is not None and deadline < until:
            until = deadline
        while monotonic() < until:
            try:
                lease = await self.connections.lease(until, explicit=True)
            except Exception:
                return CommitOutcome.UNKNOWN  # no connection before the deadline
            try:
                cur = await lease.conn.execute(RESOLVE, (txid,))
                row = await cur.fetchone()
            except psycopg.Error:
                row = None
            finally:
                await lease.release()
            if row is not None:
                outcome = commit_outcome(row["status"], started, row["started"])
                if outcome is not CommitOutcome.IN_PROGRESS:
                    return outcome
            # 'in progress' (the old backend has not finished) or no answer: ask again.
            await sleep(max(0.0, min(RESOLVE_POLL_SECONDS, until - monotonic())))
        return CommitOutcome.UNKNOWN


def _marker(row: dict[str, Any] | None) -> _TxMarker | None:
    return None if row is None else (row["txid"], row["started"])


def _lost_before_commit(exc: BaseException, lease: AsyncLease) -> bool:
    """A psycopg error on a connection that is now gone, with no SQLSTATE from the
    server: the connection died before COMMIT was sent, so the server rolled back."""
    return isinstance(exc, psycopg.OperationalError) and lease.lost and sqlstate_of(exc) is None


async def _rollback_quietly(conn: PgwAsyncConnection) -> None:
    if conn.closed or conn.broken:
        return
    # On failure the pool discards a connection left in a bad state.
    with suppress(psycopg.Error):
        await conn.execute(b"ROLLBACK")
