"""Transactions: ``transaction()``, ``run_transaction()``, savepoints, COMMIT, its resolution.

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

Nesting. While a transaction of this handle is open in the current asyncio
task (threads: the current thread), ``transaction()`` and ``run_transaction()``
do not take a second connection: they run in a SAVEPOINT on the open one
(``pgw_sp_1``, ``pgw_sp_2``, ... per outermost transaction). An exception
rolls back to the savepoint only and is re-raised; a normal exit releases it;
only the outermost COMMIT commits. Which transaction is open is kept in a
context variable per handle, together with the task (thread) that opened it:
a task created inside a transaction inherits the variable (asyncio copies the
context), but is not its owner, so it opens a transaction of its own on
another connection instead of sharing one connection between two tasks.
(So does a coroutine that ``asyncio.wait_for`` runs as a task of its own on
Python < 3.12.) A child awaited while its parent holds the pool's last
connection therefore waits for a connection, as any other caller does. A
nested call is part of the open one: it waits for no readiness and is not a
call of its own in ``in_flight`` or for the retry budget.

A savepoint cannot change what BEGIN fixed: a nested call asking for another
``isolation`` than the open transaction's, or for ``readonly=True`` inside a
read-write transaction, raises ValueError before doing anything; a nested
call without ``readonly`` inside a read-only one is read-only too. A nested
call's deadline never extends the open transaction's; an explicit shorter one
(``timeout=``, ``pgwarden.deadline()``) is enforced by a ``statement_timeout``
set inside the savepoint and restored when it is released: the statement is
cancelled (a nested ``run_transaction()`` then raises `DeadlineExceeded`) and
the open transaction goes on.

``server_deadlines=False`` (for RDS Proxy, which may pin a session that changes a
setting): no ``statement_timeout`` is ever sent. The lease sends a cancel request
at the transaction's deadline (then severs the socket), is told before COMMIT to
stop cancelling (a cancel reaching a COMMIT that waits for a synchronous standby
makes it report a success the standby may not have), and a transaction whose
deadline passed before COMMIT is never committed. Statements raise the deadline
error without I/O once a deadline passed; a nested call's shorter deadline
sends a cancel request of its own (`_ClientDeadlines`).

A nested ``run_transaction()`` re-runs its function in a fresh savepoint only
after a deadlock (40P01): the server aborted just the statement that waited,
and rolling back to the savepoint releases the locks the function took (a
deadlock on locks taken before the savepoint recurs, and after the nested
attempts it reaches the outer level). Everything else propagates to the outer
level: a serialization failure (40001) would fail again on the same snapshot,
a lock timeout (55P03) is a timeout, and a lost connection took the whole
transaction with it; an outer ``run_transaction()`` re-runs the whole
function.

What is counted. ``run_transaction()`` counts (``errors``), and may re-run,
only the database failing: psycopg's errors, connection and timeout errors
from the network, and `NotCommitted`. Any other exception from the function
(``ValueError("insufficient funds")``) propagates at once, uncounted and not
re-run; so do pgwarden's verdicts (`DatabaseUnusable`: the breaker is open,
the deadline passed, ...; `OutcomeUnknown`, counted as an ambiguous commit),
a failure a nested call already counted, and a write refused (25006) by a
transaction the caller asked to be read-only (not a failover).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar, overload

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, tuple_row

from pgwarden._async._compat import Background, Watchdog, sleep
from pgwarden._async.acquire import CANCEL_TIMEOUT, SEVER_GRACE, AsyncConnections, AsyncLease
from pgwarden._async.connection import PgwAsyncConnection
from pgwarden._handle import deferred
from pgwarden._handle.config import call_site_ref
from pgwarden._handle.sql import (
    MARKER,
    MARKER_IF_ASSIGNED,
    RESOLVE,
    RESOLVE_CHECKPOINT,
    SET_STATEMENT_TIMEOUT,
    ManyParams,
    Mode,
    Params,
    Query,
    begin_statement,
    statement_timeout_command,
)
from pgwarden._handle.state import HandleState
from pgwarden.core.failures import FailureKind, Phase, RetryContext, sqlstate_of
from pgwarden.core.retry import MIN_ATTEMPT_SECONDS, RetryPolicy, deadline_ran_out
from pgwarden.core.tracing import NOOP_STATEMENT_OBSERVER, StatementObserver
from pgwarden.errors import AmbiguousCommitError, DatabaseUnusable, NotCommitted, OutcomeUnknown

if TYPE_CHECKING:
    from pgwarden._async.copy import CopySink, CopySource, copy_in_on, copy_out_on
    from pgwarden._async.pipelined import send_together
    from pgwarden._async.retrying import after_failed_attempt
    from pgwarden._async.warmup import AsyncWarmup
    from pgwarden._handle.rows import row_factory
    from pgwarden.core.classify import classify_failure
    from pgwarden.core.commit import CommitOutcome, Marker, ServerView
    from pgwarden.core.rows import RowShape
else:
    # Called by what a first query does not do (COPY, a row shape, a retry, a
    # write's COMMIT, a failure): imported by their first call (`deferred`), as is
    # commit resolution by its first lost COMMIT.
    classify_failure = deferred("pgwarden.core.classify", "classify_failure", globals())
    copy_in_on = deferred("pgwarden._async.copy", "copy_in_on", globals())
    copy_out_on = deferred("pgwarden._async.copy", "copy_out_on", globals())
    after_failed_attempt = deferred("pgwarden._async.retrying", "after_failed_attempt", globals())
    row_factory = deferred("pgwarden._handle.rows", "row_factory", globals())
    Marker = deferred("pgwarden.core.commit", "Marker", globals())
    send_together = deferred("pgwarden._async.pipelined", "send_together", globals())

if True:  # ASYNC
    from asyncio import current_task as _current_owner
else:
    from threading import current_thread as _current_owner

__all__ = [
    "QUERY_CANCELED",
    "AsyncTransaction",
    "AsyncTransactions",
    "cursor_for",
    "query_bytes",
    "result_of",
    "rollback_quietly",
    "statement_timeout_until",
]

T = TypeVar("T")
RowT = TypeVar("RowT")

# BEGIN runs before the user's work: a failure there ran nothing of theirs.
_BEGIN_CONTEXT = RetryContext(is_write=False)
# run_transaction re-runs the whole function; the function vouches for itself.
_WHOLE_CONTEXT = RetryContext(is_write=True, idempotent=True)

# Commit resolution asks for at most this long (within the call's deadline).
RESOLVE_FOR_AT_LEAST = 2.0

# A nested run_transaction re-runs its savepoint after a deadlock only: the
# server aborted the waiting statement, and rolling back to the savepoint
# releases what the function locked. 40001 would fail again on the same snapshot.
DEADLOCK_DETECTED = "40P01"
# statement_timeout fired: at a nested call's own deadline, it is DeadlineExceeded.
QUERY_CANCELED = "57014"
# A write refused by a transaction the caller asked to be read-only: their own
# doing, not a failover (BEGIN READ ONLY refuses it on a primary too).
READ_ONLY_SQL_TRANSACTION = "25006"

# What run_transaction counts and may re-run: the database failing. Anything
# else the function raises is the caller's own and propagates at once.
_DATABASE_FAILURES = (psycopg.Error, NotCommitted, ConnectionError, TimeoutError)
# pgwarden's verdicts, already made (and counted where they are made).
_VERDICTS = (DatabaseUnusable, OutcomeUnknown)
# Set on an exception a nested run_transaction counted, so no outer level counts it again.
_COUNTED = "_pgwarden_counted"


def statement_timeout_until(deadline: float) -> bytes:
    """The command that sets a transaction-local ``statement_timeout`` of the time left
    before *deadline* (inside BEGIN ... COMMIT; sent in one write with what it bounds)."""
    return statement_timeout_command(deadline - monotonic())


def query_bytes(conn: PgwAsyncConnection, query: Query) -> bytes:
    """*query* as the bytes psycopg would send for it without parameters."""
    if isinstance(query, bytes):
        return query
    if isinstance(query, str):
        return query.encode(conn.info.encoding)
    return query.as_bytes(conn)


class _ClientDeadlines:
    """The deadlines of one transaction kept by the client alone (``server_deadlines=False``).

    Nothing is sent to the server for them. Every statement of the transaction
    (its query methods, ``executemany``, COPY, SAVEPOINT) raises the deadline
    error without I/O once the innermost deadline has passed; one running at the
    outermost deadline is stopped by the lease's cancel request (then its sever);
    one running at a nested call's shorter deadline by a cancel request of its own.
    A nested cancel that no statement is known to have consumed (the statement
    ended as it was sent) could still stop a later statement, or the COMMIT: the
    connection is closed then, and the transaction ends as `NotCommitted`.
    """

    __slots__ = ("_expired", "_nested", "_watchdog", "busy", "until")

    def __init__(
        self, watchdog: Watchdog, until: float | None, expired: Callable[[], Exception]
    ) -> None:
        self._watchdog = watchdog
        self._expired = expired  # the caller's deadline error, made when raised
        self._nested: _NestedCancel | None = None
        #: The innermost deadline in force (None: only the default_timeout backstop).
        self.until = until
        #: A statement of the transaction is on the wire (read from the timer).
        self.busy = False

    async def run(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send()`` if the deadline has not passed, marked as on the wire."""
        until = self.until
        if until is not None and monotonic() >= until:
            raise self._expired()
        self.busy = True
        try:
            return await send()
        except psycopg.errors.QueryCanceled:
            nested = self._nested
            if nested is not None and nested.sent is not None:
                nested.consumed = True  # the server used the request on this statement
            raise
        finally:
            self.busy = False

    @asynccontextmanager
    async def within(self, conn: PgwAsyncConnection, deadline: float) -> AsyncIterator[None]:
        """A nested call's shorter *deadline*, for as long as the block runs."""
        outer, previous = self.until, self._nested
        self.until = deadline if outer is None else min(outer, deadline)
        cancel = self._nested = _NestedCancel(conn)
        timer = self._watchdog.arm(deadline, self._at_nested_deadline, cancel)
        try:
            yield
        finally:
            self._watchdog.disarm(timer)
            self.until, self._nested = outer, previous
            await cancel.settle(deadline + SEVER_GRACE)

    def _at_nested_deadline(self, cancel: _NestedCancel) -> None:
        # A timer callback. Between statements there is nothing to stop (and a
        # cancel would only linger): the next statement raises without I/O instead.
        cancel.fire(lambda: self.busy)


class _NestedCancel:
    """The cancel request of one nested deadline, if its timer sent one."""

    __slots__ = ("_ended", "_lock", "conn", "consumed", "sent")

    def __init__(self, conn: PgwAsyncConnection) -> None:
        self.conn = conn
        self.sent: Background | None = None
        self.consumed = False
        self._ended = False
        # The timer (a thread in the sync shell) and the block's end decide under it
        # whether a request goes out, so none can leave after `settle` looked.
        self._lock = threading.Lock()

    def fire(self, busy: Callable[[], bool]) -> None:
        """At the deadline: send the request if the block still runs a statement."""
        with self._lock:
            if not self._ended and busy():
                self.sent = Background(self.send)

    async def send(self) -> None:
        try:
            await self.conn.cancel_safe(timeout=CANCEL_TIMEOUT)
        except Exception:  # it could not arrive: the statement runs to the outer bound
            return

    async def settle(self, until: float) -> None:
        """Once the block is over: close the connection unless the request was
        used up by the statement it stopped (else it may stop a later one)."""
        with self._lock:
            self._ended = True
            sent = self.sent
        if sent is None:
            return
        settled = self.consumed and await sent.wait(until - monotonic())
        if not settled and not (self.conn.closed or self.conn.broken):
            await self.conn.close()


class AsyncTransaction:
    """Statements inside one transaction. Never retried one by one.

    Each statement is reported to the handle's statement observers (operation
    ``transaction``), as the handle's own query methods are.
    """

    __slots__ = ("_client", "_names", "_observer", "connection")

    def __init__(
        self,
        connection: PgwAsyncConnection,
        observer: StatementObserver | None = None,
        client: _ClientDeadlines | None = None,
    ) -> None:
        self.connection = connection
        self._observer = observer or NOOP_STATEMENT_OBSERVER
        self._names = itertools.count(1)  # savepoint numbers, shared by every nested level
        # server_deadlines=False: the deadlines are kept here, none is sent (None: sent).
        self._client = client

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[AsyncTransaction]:
        """A SAVEPOINT in this transaction: an exception inside rolls back to it
        (and is re-raised), a normal exit releases it. Yields this transaction."""
        async with self._savepoint(None):
            yield self

    @asynccontextmanager
    async def _savepoint(self, deadline: float | None) -> AsyncIterator[None]:
        """A savepoint; with *deadline*, a ``statement_timeout`` of the time left
        inside it, restored to the enclosing level's on release (on rollback the
        server restores it itself). With the deadlines kept by the client, nothing
        is sent for *deadline*: see `_ClientDeadlines`."""
        conn = self.connection
        name = b'"pgw_sp_%d"' % next(self._names)  # our own name: nothing to escape
        restore: str | None = None
        client = self._client
        if client is not None:
            # Outside the try: a SAVEPOINT that failed (or was not sent) has nothing
            # to roll back to, and the enclosing level fails in turn.
            await client.run(lambda: conn.execute(b"SAVEPOINT " + name))
        try:
            if client is not None:
                if deadline is not None:
                    async with client.within(conn, deadline):
                        yield
                else:
                    yield
            elif deadline is None:
                await conn.execute(b"SAVEPOINT " + name)
                yield
            else:
                cur = conn.cursor(row_factory=tuple_row)
                await send_together(
                    conn,
                    b"SAVEPOINT " + name,
                    (cur, b"SELECT current_setting('statement_timeout')", None, None, None),
                    statement_timeout_until(deadline),
                )
                row = await cur.fetchone()
                restore = None if row is None else row[0]
                yield
        except BaseException:
            await _rollback_to_quietly(conn, name)
            raise
        if restore is None:
            await conn.execute(b"RELEASE SAVEPOINT " + name)
        else:
            # A SET LOCAL made inside a savepoint outlives its RELEASE: put it back.
            await send_together(
                conn,
                b"RELEASE SAVEPOINT " + name,
                (conn.cursor(), SET_STATEMENT_TIMEOUT, (restore,), None, None),
            )

    async def _run(
        self, mode: Mode, query: Query, params: Params, row: RowShape | None = None
    ) -> Any:
        if self._client is not None:
            return await self._client.run(lambda: self._send(mode, query, params, row))
        return await self._send(mode, query, params, row)

    async def _send(
        self, mode: Mode, query: Query, params: Params, row: RowShape | None = None
    ) -> Any:
        token = self._observer.statement_started("transaction", query)
        try:
            cur = cursor_for(self.connection, mode, row)
            await cur.execute(query, params)
            result = await result_of(cur, mode)
        except BaseException as exc:
            self._observer.statement_finished(token, exc, None)
            raise
        self._observer.statement_finished(token, None, cur.rowcount)
        return result

    @overload
    async def fetch(
        self, query: Query, params: Params = None, *, row: type[dict[Any, Any]] | None = None
    ) -> list[dict[str, Any]]: ...
    @overload
    async def fetch(
        self, query: Query, params: Params = None, *, row: Callable[..., RowT]
    ) -> list[RowT]: ...
    async def fetch(
        self, query: Query, params: Params = None, *, row: RowShape | None = None
    ) -> list[Any]:
        """All rows, each a *row* (dict, tuple or a class: docs/queries.md)."""
        rows: list[Any] = await self._run(Mode.ROWS, query, params, row)
        return rows

    @overload
    async def fetchrow(
        self, query: Query, params: Params = None, *, row: type[dict[Any, Any]] | None = None
    ) -> dict[str, Any] | None: ...
    @overload
    async def fetchrow(
        self, query: Query, params: Params = None, *, row: Callable[..., RowT]
    ) -> RowT | None: ...
    async def fetchrow(
        self, query: Query, params: Params = None, *, row: RowShape | None = None
    ) -> Any:
        """The first row as a *row* (see `fetch`), or None."""
        return await self._run(Mode.ROW, query, params, row)

    async def fetchval(self, query: Query, params: Params = None) -> Any:
        """The first column of the first row, or None when there is no row."""
        return await self._run(Mode.VALUE, query, params)

    async def execute(self, query: Query, params: Params = None) -> int:
        """Run a statement in the transaction; the number of rows it affected."""
        count: int = await self._run(Mode.COUNT, query, params)
        return count

    async def executemany(self, query: Query, params_seq: Iterable[ManyParams]) -> int:
        """Run *query* once per parameter set in *params_seq*; the rows affected in all."""
        if self._client is not None:
            return await self._client.run(lambda: self._send_many(query, params_seq))
        return await self._send_many(query, params_seq)

    async def _send_many(self, query: Query, params_seq: Iterable[ManyParams]) -> int:
        token = self._observer.statement_started("executemany", query)
        cur = self.connection.cursor()
        try:
            await cur.executemany(query, params_seq)
        except BaseException as exc:
            self._observer.statement_finished(token, exc, None)
            raise
        self._observer.statement_finished(token, None, cur.rowcount)
        return cur.rowcount

    async def copy_in(
        self,
        table: str | sql.Composable,
        source: CopySource,
        *,
        columns: Sequence[str] | None = None,
        format: str = "text",
    ) -> int:
        """COPY *source* into *table* inside this transaction; the rows copied.

        *source*: rows (sequences of values in *columns* order), or a file (or
        bytes) holding COPY data in *format* (``text``, ``csv``, ``binary``). A
        source that raises aborts the COPY: the server keeps none of its rows.
        Inside ``run_transaction`` a re-run sends *source* again: pass one that
        can be iterated twice (a list, not a generator) if re-runs may happen.
        """
        conn, observer = self.connection, self._observer
        if self._client is not None:
            return await self._client.run(
                lambda: copy_in_on(conn, observer, table, source, columns, format)
            )
        return await copy_in_on(conn, observer, table, source, columns, format)

    async def copy_out(
        self, query: Query, sink: CopySink, params: Params = None, *, format: str = "text"
    ) -> int:
        """COPY the rows of *query* into *sink* (a binary or text file) in *format*;
        the rows copied."""
        conn, observer = self.connection, self._observer
        if self._client is not None:
            return await self._client.run(
                lambda: copy_out_on(conn, observer, query, sink, params, format)
            )
        return await copy_out_on(conn, observer, query, sink, params, format)


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


def cursor_for(conn: PgwAsyncConnection, mode: Mode, row: RowShape | None = None) -> Any:
    """A cursor whose rows suit *mode*: tuples for a single value, else *row*
    (None: the connection's dicts)."""
    if mode is Mode.VALUE:
        return conn.cursor(row_factory=tuple_row)
    if row is None or mode is Mode.COUNT:
        return conn.cursor()
    return conn.cursor(row_factory=row_factory(row))


class _Open:
    """The transaction open on one handle in one task (thread): what nested calls share."""

    __slots__ = ("deadline", "explicit", "isolation", "lease", "owner", "readonly", "tx")

    def __init__(
        self,
        tx: AsyncTransaction,
        lease: AsyncLease,
        isolation: str | None,
        readonly: bool,
        deadline: float | None,
        explicit: bool,
    ) -> None:
        self.owner = _current_owner()
        self.tx = tx
        self.lease = lease
        self.isolation = isolation  # None: the server's default, asked for when needed
        self.readonly = readonly
        self.deadline = deadline
        self.explicit = explicit

    async def check(self, isolation: str | None, readonly: bool) -> None:
        """ValueError if a call nested in this transaction asks for what a savepoint
        cannot give: another isolation level, or read-only in a read-write one."""
        begin_statement(isolation, readonly)  # a bad level: the same error as outside
        if readonly and not self.readonly:
            raise ValueError(
                "readonly=True inside a read-write transaction: a savepoint cannot make "
                "it read-only; open the read-only transaction outside the other one"
            )
        if isolation is None or isolation == self.isolation:
            return
        if self.isolation is None:
            cur = await self.tx.connection.execute(b"SHOW transaction_isolation")
            row = await cur.fetchone()
            self.isolation = None if row is None else str(row["transaction_isolation"])
            if isolation == self.isolation:
                return
        raise ValueError(
            f"isolation={isolation!r} inside a {self.isolation} transaction: a savepoint "
            "cannot change the isolation level; pass it to the outermost transaction"
        )

    def bounds(self, deadline: float | None, explicit: bool) -> tuple[float | None, float | None]:
        """``(deadline, server_deadline)`` of a nested call whose own bound is
        *deadline*: never later than this transaction's; *server_deadline* is
        set when the call's explicit bound is the earlier (None: inherit)."""
        outer = self.deadline
        if not explicit or deadline is None:
            return outer, None
        if outer is not None and deadline >= outer:
            if self.explicit:
                return outer, None  # this transaction's statement_timeout already bounds it
            deadline = outer  # only the client backstop bounds it: let the server too
        return deadline, deadline


class AsyncTransactions:
    def __init__(
        self, state: HandleState, connections: AsyncConnections, warmup: AsyncWarmup
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.connections = connections
        self.warmup = warmup
        self.observer: StatementObserver = NOOP_STATEMENT_OBSERVER
        # The transaction open in the current task (thread), for nested calls.
        self._open: ContextVar[_Open | None] = ContextVar("pgwarden_transaction", default=None)

    def _open_here(self) -> _Open | None:
        """The transaction this task (thread) has open, if any. One inherited from
        the task that created this one is not ours: using it would put two tasks
        on one connection at once."""
        frame = self._open.get()
        if frame is None or frame.owner is not _current_owner():
            return None
        return frame

    # --- transaction() -----------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(
        self, isolation: str | None, readonly: bool, timeout: float | None
    ) -> AsyncIterator[AsyncTransaction]:
        frame = self._open_here()
        if frame is not None:
            await frame.check(isolation, readonly)
            _, server_deadline = frame.bounds(*self.state.deadline_for(timeout))
            async with frame.tx._savepoint(server_deadline):
                yield frame.tx
            return
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
            async with self.connections.held(lease, call_site_ref()):
                conn = lease.conn
                client = None
                if not self.settings.server_deadlines:
                    client = _ClientDeadlines(
                        self.connections.watchdog,
                        deadline if explicit else None,
                        lambda: state.deadline_error(None, "transaction"),
                    )
                tx = AsyncTransaction(conn, self.observer, client)
                try:
                    token = self._open.set(
                        _Open(tx, lease, isolation, readonly, deadline, explicit)
                    )
                    try:
                        yield tx
                    finally:
                        self._open.reset(token)
                except BaseException as exc:
                    if lease.cancel_sent and isinstance(exc, psycopg.errors.QueryCanceled):
                        lease.cancel_consumed = True  # the deadline's cancel stopped it
                    await rollback_quietly(conn)
                    if not readonly and sqlstate_of(exc) == READ_ONLY_SQL_TRANSACTION:
                        await self.connections.read_only_server(lease)
                    if lease.severed or (
                        explicit
                        and isinstance(exc, psycopg.errors.QueryCanceled)
                        and deadline_ran_out(FailureKind.TIMEOUT, monotonic(), deadline)
                    ):
                        # The deadline ended it (client sever, the server's
                        # statement timeout or the client's cancel at the deadline):
                        # the same error as every other entry point gives for a deadline.
                        raise state.deadline_error(exc, "transaction") from exc
                    if _lost_before_commit(exc, lease):
                        raise NotCommitted(
                            "connection lost before COMMIT; nothing was committed "
                            f"({state.describe_error(exc)})"
                        ) from exc
                    raise
                if not lease.stop_cancelling():
                    # The deadline passed and its cancel is on its way (it could reach
                    # the COMMIT): never COMMIT now. The release closes the connection
                    # (the cancel was not consumed), so the server rolls back.
                    raise state.deadline_error(None, "transaction")
                if lease.lost:
                    # Closed before COMMIT (a nested call's cancel not known to be used
                    # up closes it, _ClientDeadlines): the server rolled back.
                    raise NotCommitted("connection lost before COMMIT; nothing was committed")
                await self.commit(lease, readonly=readonly, deadline=deadline)
        finally:
            state.leave()

    async def _begin_on_fresh_lease(
        self, begin: bytes, deadline: float | None, explicit: bool
    ) -> AsyncLease:
        """Acquire and BEGIN, retrying failures that happen before anything ran."""
        state = self.state
        bounded = explicit and deadline is not None
        # server_deadlines=False: no statement_timeout; the lease cancels at the deadline.
        on_server = bounded and self.settings.server_deadlines
        attempt = 1
        while True:
            lease = await self.connections.lease(
                deadline, explicit=explicit, cancel=bounded and not on_server
            )
            conn = lease.conn
            try:
                if on_server and deadline is not None:
                    await send_together(conn, begin, statement_timeout_until(deadline))
                else:
                    await conn.execute(begin)
                return lease
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: give the connection back
                    await lease.release()
                    raise
                if lease.cancel_sent and isinstance(exc, psycopg.errors.QueryCanceled):
                    lease.cancel_consumed = True
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
        """``fn(tx)`` in a transaction, re-run whole on the failures that certainly
        did not commit; inside an open transaction, in a savepoint (`_run_nested`)."""
        state = self.state
        policy = self._policy(attempts)
        frame = self._open_here()
        if frame is not None:
            return await self._run_nested(frame, fn, isolation, readonly, timeout, policy)
        deadline, explicit = state.deadline_for(timeout)
        attempt = 1
        while True:
            try:
                async with self._begin(isolation, readonly, deadline, explicit) as tx:
                    result = await fn(tx)
                return result
            except Exception as exc:
                if not _database_failure(exc, readonly=readonly):
                    raise
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

    def _policy(self, attempts: int | None) -> RetryPolicy:
        # Conflicts are expected under contention: at least 5 attempts by default.
        limit = attempts if attempts is not None else max(self.settings.retry_attempts, 5)
        return self.state.statement_policy.with_attempts(limit)

    async def _run_nested(
        self,
        frame: _Open,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        isolation: str | None,
        readonly: bool,
        timeout: float | None,
        policy: RetryPolicy,
    ) -> T:
        """``fn(tx)`` in a savepoint of the open transaction, re-run in a new one
        after a deadlock while attempts and time are left. A statement timeout at
        the call's own (shorter) deadline is `DeadlineExceeded`. Everything else,
        and the last deadlock, propagates uncounted, for the outer level to decide."""
        await frame.check(isolation, readonly)
        deadline, server_deadline = frame.bounds(*self.state.deadline_for(timeout))
        tx = frame.tx
        attempt = 1
        while True:
            try:
                async with tx._savepoint(server_deadline):
                    result = await fn(tx)
                return result
            except Exception as exc:
                if frame.lease.lost or not _database_failure(exc, readonly=frame.readonly):
                    raise
                sqlstate = sqlstate_of(exc)
                rerun = (
                    sqlstate == DEADLOCK_DETECTED
                    and attempt < policy.attempts
                    and (deadline is None or deadline - monotonic() >= MIN_ATTEMPT_SECONDS)
                )
                # Our own statement_timeout fired: decide() makes it DeadlineExceeded.
                timed_out = (
                    sqlstate == QUERY_CANCELED
                    and server_deadline is not None
                    and monotonic() >= server_deadline
                )
                if not (rerun or timed_out):
                    raise
                try:
                    await after_failed_attempt(
                        self.connections,
                        exc,
                        Phase.STATEMENT,
                        _WHOLE_CONTEXT,
                        attempt=attempt,
                        deadline=deadline,
                        policy=policy,
                        operation="savepoint",
                        whole_transaction=True,
                    )
                except Exception as raised:  # counted here: the outer level must not again
                    _mark_counted(raised)
                    raise
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

    async def copy_in(
        self,
        table: str | sql.Composable,
        source: CopySource,
        *,
        columns: Sequence[str] | None,
        format: str,
        timeout: float | None,
    ) -> int:
        """COPY in, in a transaction of its own: a write, so never re-run once it
        may have reached the server (BEGIN is retried: nothing of it ran yet)."""

        async def body(tx: AsyncTransaction) -> int:
            return await tx.copy_in(table, source, columns=columns, format=format)

        return await self.run_transaction(
            body, isolation=None, readonly=False, timeout=timeout, attempts=1
        )

    async def copy_out(
        self,
        query: Query,
        sink: CopySink,
        params: Params,
        *,
        format: str,
        timeout: float | None,
    ) -> int:
        """COPY out, in a read-only transaction of its own; not re-run once it may
        have written to *sink* (BEGIN is retried: nothing reached *sink* yet)."""

        async def body(tx: AsyncTransaction) -> int:
            return await tx.copy_out(query, sink, params, format=format)

        return await self.run_transaction(
            body, isolation=None, readonly=True, timeout=timeout, attempts=1
        )

    # --- a single write under a deadline -------------------------------------------------------
    async def write_under_deadline(
        self, lease: AsyncLease, cur: Any, query: Query, params: Params, deadline: float
    ) -> None:
        """A write whose outcome is always knowable, in two round trips: BEGIN, the
        transaction's id and the statement; then COMMIT, resolved by id if the
        connection is lost during it. The deadline is the lease's (a cancel sent
        at the deadline), so nothing is sent for it; *cur* is left on the
        statement's first result."""
        conn = lease.conn
        try:
            if params is None:
                # One message, like the statement alone (several statements in one
                # string work as without a deadline).
                await cur.execute(b"BEGIN;" + MARKER + b";\n" + query_bytes(conn, query))
                cur.nextset()  # past BEGIN, to the marker
                marker = _marker(await _fetch_marker(cur))
                cur.nextset()  # to the statement's first result
            else:
                marker_cur = conn.cursor()
                await send_together(
                    conn,
                    b"BEGIN",
                    (marker_cur, MARKER, None, None, None),
                    (cur, query, params, None, None),
                )
                marker = _marker(await marker_cur.fetchone())
        except psycopg.Error as exc:
            if _lost_before_commit(exc, lease):
                raise NotCommitted(
                    "connection lost before COMMIT; nothing was committed "
                    f"({self.state.describe_error(exc)})"
                ) from exc
            raise
        if not lease.stop_cancelling():
            # The deadline passed and its cancel is on its way: never COMMIT now.
            raise NotCommitted("the deadline passed before COMMIT; nothing was committed")
        await self.commit(lease, readonly=False, deadline=deadline, marker=marker)

    # --- COMMIT and its resolution -------------------------------------------------------------
    async def commit(
        self,
        lease: AsyncLease,
        *,
        readonly: bool,
        deadline: float | None,
        marker: Marker | None = None,
    ) -> None:
        """COMMIT; if the connection is lost meanwhile, resolve the outcome by txid.
        A read-write transaction aborted by a failed statement is rolled back and raises
        ``InFailedSqlTransaction`` (25P02) instead of "committing" (a silent ROLLBACK).

        *marker* is the transaction's id and server run when the caller already
        fetched them.
        """
        conn = lease.conn
        if conn.pgconn.transaction_status == TransactionStatus.INERROR:
            # A statement failed and the caller caught its error inside the block: the
            # server would answer this COMMIT with a ROLLBACK and no error, a lost write
            # that looks committed. Say so instead, whatever resolve_commits is (a
            # read-only transaction had nothing to commit: it just ends).
            await rollback_quietly(conn)
            if readonly:
                return
            raise psycopg.errors.InFailedSqlTransaction(
                "the transaction was aborted by an earlier failed statement (its error was "
                "caught inside the transaction block); it was rolled back, nothing was committed"
            )
        resolve = self.settings.resolve_commits and not readonly
        if resolve and marker is None:
            # txid NULL when the transaction wrote nothing: nothing to resolve then.
            cur = await conn.execute(MARKER_IF_ASSIGNED)
            marker = _marker(await cur.fetchone())
        try:
            # psycopg's own COMMIT: the same message, without a cursor's work.
            await conn.commit()
        except psycopg.OperationalError as exc:
            kind = classify_failure(exc, Phase.COMMIT, connection_lost=lease.lost)
            if kind is not FailureKind.LOST_COMMIT:
                raise  # a server-side commit failure (e.g. deferred constraint): not ambiguous
            if readonly:
                return  # a read-only transaction changed nothing; its fate does not matter
            await self.resolve_lost_commit(exc, marker, resolve=resolve, deadline=deadline)

    async def resolve_lost_commit(
        self,
        exc: BaseException,
        marker: Marker | None,
        *,
        resolve: bool,
        deadline: float | None,
        setting: str = "resolve_commits",
    ) -> None:
        """End a COMMIT whose connection was lost (*exc*): return if it committed or
        wrote nothing, raise `NotCommitted` if it certainly did not commit,
        `AmbiguousCommitError` if resolution is off (*setting* names the switch in
        the message) or nothing could tell within the deadline. Asks the server on
        another connection (`pgwarden.core.commit`); counted in ``ambiguous_commits``.
        Used by ``transaction()`` and by the SQLAlchemy dialect."""
        from pgwarden.core.commit import Verdict, lost_commit_verdict  # after a loss only

        state = self.state
        verdict = lost_commit_verdict(resolve=resolve, marker=marker)
        if verdict is Verdict.ASK and marker is not None:
            outcome = await self._ask(marker, deadline)
            verdict = lost_commit_verdict(resolve=resolve, marker=marker, outcome=outcome)
        state.ambiguous_commit(verdict.value)
        if verdict is Verdict.COMMITTED:
            return
        if verdict is Verdict.ABORTED:
            raise NotCommitted(
                "connection lost during COMMIT; the transaction was rolled back "
                f"({state.describe_error(exc)})"
            ) from exc
        if not resolve:
            raise AmbiguousCommitError(
                f"connection lost during COMMIT and commit resolution is off ({setting}); "
                f"the outcome is unknown ({state.describe_error(exc)})"
            ) from exc
        txid = None if marker is None else marker.txid
        raise AmbiguousCommitError(
            f"connection lost during COMMIT and txid {txid} could not be resolved "
            f"({state.describe_error(exc)})",
            txid=txid,
        ) from exc

    async def _ask(self, marker: Marker, deadline: float | None) -> CommitOutcome:
        """Ask another connection what became of *marker*'s transaction until the
        answer is final, within the deadline (an internal lease: not a user query,
        not in the metrics). UNKNOWN if no final answer came in time."""
        from pgwarden.core.commit import RESOLVE_POLL_SECONDS, CommitOutcome, commit_outcome

        until = monotonic() + max(self.settings.connect_timeout, RESOLVE_FOR_AT_LEAST)
        if deadline is not None and deadline < until:
            until = deadline
        while monotonic() < until:
            try:
                lease = await self.connections.lease(until, explicit=True)
            except Exception:
                return CommitOutcome.UNKNOWN  # no connection before the deadline
            try:
                view = await _server_view(lease.conn, marker)
            except psycopg.Error:
                view = None
            finally:
                await lease.release()
            if view is not None:
                outcome = commit_outcome(marker, view)
                if outcome is not CommitOutcome.IN_PROGRESS:
                    return outcome
            # Not final ('in progress', a standby) or no answer: ask again.
            await sleep(max(0.0, min(RESOLVE_POLL_SECONDS, until - monotonic())))
        return CommitOutcome.UNKNOWN


async def _server_view(conn: PgwAsyncConnection, marker: Marker) -> ServerView | None:
    """What the server says now about *marker*'s transaction: ``RESOLVE``, then the
    latest checkpoint when it may matter (a restart is possible) and can be read."""
    from pgwarden.core.commit import (
        Checkpoint,
        ServerView,
        full_xid,
        restarted_since,
        timeline_of_wal_file,
    )

    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(RESOLVE, {"txid": marker.txid})
    row = await cur.fetchone()
    if row is None:
        return None
    view = ServerView(
        in_recovery=bool(row["in_recovery"]),
        started=row["started"],
        stats_reset=row["stats_reset"],
        xmax=int(row["xmax"]),
        status=row["status"],
        committed_at=row["committed_at"],
        walwriter_started=row["walwriter_started"],
        wal_level=row["wal_level"],
    )
    if view.in_recovery or not row["checkpoint_readable"]:
        return view
    if restarted_since(marker, view) is False:
        return view  # the same run: the status is the truth, no checkpoint needed
    await cur.execute(RESOLVE_CHECKPOINT)
    point = await cur.fetchone()
    if point is None:
        return view
    return dataclasses.replace(
        view,
        timeline=timeline_of_wal_file(point["wal_file"]),
        checkpoint=Checkpoint(
            next_xid=full_xid(point["next_xid"]),
            oldest_active_xid=int(point["oldest_active_xid"]),
            timeline=int(point["timeline_id"]),
        ),
    )


async def _fetch_marker(cur: Any) -> dict[str, Any] | None:
    """The marker row from *cur*'s current result, as a dict whatever *cur*'s rows."""
    row_factory = cur.row_factory
    cur.row_factory = dict_row
    try:
        row: dict[str, Any] | None = await cur.fetchone()
    finally:
        cur.row_factory = row_factory
    return row


def _marker(row: dict[str, Any] | None) -> Marker | None:
    return None if row is None else Marker(row["txid"], row["started"], row["stats_reset"])


def _database_failure(exc: Exception, *, readonly: bool) -> bool:
    """Is *exc* the database failing this attempt, for run_transaction to count and
    perhaps re-run? Not the caller's own exceptions, not pgwarden's verdicts, not a
    failure already counted, not a write the caller's read-only transaction refused."""
    if isinstance(exc, _VERDICTS) or getattr(exc, _COUNTED, False):
        return False
    if readonly and sqlstate_of(exc) == READ_ONLY_SQL_TRANSACTION:
        return False
    return isinstance(exc, _DATABASE_FAILURES)


def _mark_counted(exc: BaseException) -> None:
    with suppress(Exception):  # an exception class that refuses attributes: count it twice
        setattr(exc, _COUNTED, True)


def _lost_before_commit(exc: BaseException, lease: AsyncLease) -> bool:
    """A psycopg error on a connection that is now gone, before COMMIT was sent:
    the server rolled the transaction back. With or without a SQLSTATE (a backend
    the server terminated says 57P01 on its way out; a dead socket says nothing)."""
    return isinstance(exc, psycopg.OperationalError) and lease.lost


async def rollback_quietly(conn: PgwAsyncConnection) -> None:
    """Roll back an open transaction now (under the caller's lease timer), so the
    connection goes back to the pool clean instead of being rolled back there with
    a warning. A failing ROLLBACK leaves the connection broken: the pool discards it."""
    if conn.closed or conn.broken or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    with suppress(psycopg.Error):
        await conn.execute(b"ROLLBACK")


async def _rollback_to_quietly(conn: PgwAsyncConnection, name: bytes) -> None:
    """Undo a savepoint's work and drop it; if that fails, the enclosing level
    finds its transaction aborted (or its connection gone) and fails in turn."""
    if conn.closed or conn.broken:
        return
    with suppress(psycopg.Error):
        await conn.execute(b"ROLLBACK TO SAVEPOINT " + name + b"; RELEASE SAVEPOINT " + name)
