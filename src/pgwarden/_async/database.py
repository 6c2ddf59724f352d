"""`AsyncDatabase`: the asyncio handle's public methods, each delegating to one part.

=================== ===============================================================
module              owns
=================== ===============================================================
``warmup.py``       readiness: the single shared warmup
``acquire.py``      the pool, admission (breaker), acquire, validation, and the
                    lease that bounds every byte by the call's deadline
``execute.py``      single statements (fetch, fetchrow, fetchval, execute)
``transaction.py``  transaction(), run_transaction(), COMMIT, commit resolution
``stream.py``       stream(): a server-side cursor in a read-only transaction
``copy.py``         COPY in and out on a transaction's connection
``rows.py``         with_rows(): the per-handle row shape
``retrying.py``     carrying out a retry decision
``pool.py``         the one seam to psycopg_pool's internals
=================== ===============================================================

All mutable state and every decision belong to `HandleState`
(``pgwarden/_handle/state.py``). The sync `Database` is generated from these
files by ``scripts/async_to_sync.py``; asyncio specifics live in ``_compat.py``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from psycopg import sql

from pgwarden._async._compat import SingleFlight, WaitTimeout, on_signals, sleep
from pgwarden._async.acquire import AsyncCheckout, AsyncConnections
from pgwarden._async.execute import AsyncStatements
from pgwarden._async.transaction import AsyncTransaction, AsyncTransactions
from pgwarden._async.warmup import AsyncWarmup
from pgwarden._handle import deferred
from pgwarden._handle.config import call_site_ref
from pgwarden._handle.shape import autocommit_in_place
from pgwarden._handle.sql import DEFAULT_FETCH_SIZE, ManyParams, Mode, Params, Query
from pgwarden._handle.state import HandleState, HealthMark
from pgwarden.core.breaker import BreakerState
from pgwarden.core.deadline import current_deadline
from pgwarden.core.failures import FailureKind, Phase, RetryContext
from pgwarden.core.histogram import Histogram
from pgwarden.core.lifecycle import Event, State
from pgwarden.core.metrics import MetricsTracker
from pgwarden.core.retry import RetryPolicy
from pgwarden.core.tracing import (
    NoopStatementObserver,
    StatementObserver,
    with_observer,
    without_observer,
)
from pgwarden.errors import DeadlineExceeded
from pgwarden.settings import Settings

if TYPE_CHECKING:
    from pgwarden._async.copy import CopySink, CopySource
    from pgwarden._async.listen import Callback, Listener, Subscription
    from pgwarden._async.retrying import act_on
    from pgwarden._async.rows import AsyncRows
    from pgwarden._async.stream import AsyncStream
    from pgwarden.core.commit import Marker
    from pgwarden.core.rows import RowShape
    from pgwarden.core.stats import Stats
else:
    # What a first query does not use is imported by its first call (`deferred`):
    # the stream and row-shape views by stream() and with_rows(), carrying out a
    # retry decision by the first rerun_after_failure().
    AsyncStream = deferred("pgwarden._async.stream", "AsyncStream", globals())
    AsyncRows = deferred("pgwarden._async.rows", "AsyncRows", globals())
    act_on = deferred("pgwarden._async.retrying", "act_on", globals())

__all__ = ["AsyncCheckout", "AsyncDatabase", "AsyncRows", "AsyncStream", "AsyncTransaction"]

T = TypeVar("T")
RowT = TypeVar("RowT")

# The health check's own deadline ends this long before the caller's bound
# (``health_timeout``), so that its outcome, with its own error, reaches the caller
# within the bound: a silent server's socket is severed SEVER_GRACE past a deadline.
HEALTH_MARGIN = 0.1

#: What `AsyncDatabase.statement_started` returns: the observer that saw the start, its
#: token, the statement and when it was sent (opaque to integrations).
StatementMark = tuple[StatementObserver, object, object, float]

# report_failure counts and classifies; nobody retries on its verdict.
_REPORT_ONLY = RetryPolicy(attempts=1)

# rerun_after_failure: a whole transaction function vouches for itself (as
# run_transaction's); a single statement outside a transaction is sent again only
# when it certainly did not run.
_WHOLE_UNIT = RetryContext(is_write=True, idempotent=True)
_SINGLE_STATEMENT = RetryContext(is_write=True, in_transaction=False)
_RESENDABLE = frozenset({FailureKind.NOTHING_RAN, FailureKind.STALE})


class AsyncDatabase:
    """One shared, self-healing handle to PostgreSQL (asyncio).

    Create it with `pgwarden.connect_async()`; construction does no I/O. Every
    query method waits for readiness first, retries only what is safe within
    the caller's deadline, and raises permanent errors unchanged.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracker: MetricsTracker | None = None,
        adapters: Any = None,
    ) -> None:
        self.settings = settings
        #: A consumer's psycopg ``AdaptersMap`` (an ORM's JSON and HSTORE adapters)
        #: that every connection of this handle starts from; None for psycopg's.
        self.adapters = adapters
        self._build(HandleState(settings, tracker))

    def _build(self, state: HandleState) -> None:
        self._state = state
        self._connections = AsyncConnections(state, self.adapters)
        self._warmup = AsyncWarmup(state, self._connections)
        self._transactions = AsyncTransactions(state, self._connections, self._warmup)
        self._statements = AsyncStatements(
            state, self._connections, self._warmup, self._transactions
        )
        self._health_flight: SingleFlight[dict[str, Any]] = SingleFlight()
        previous: Listener | None = getattr(self, "_listener", None)
        if previous is not None:
            previous.forget()  # a snapshot reset ends its subscriptions; a fork: nothing
        # Made by the first listen(): a handle that never listens does not import the
        # listener (~3 ms of a cold start's first query).
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()
        self._connections.failover_hooks.append(self._listener_check_soon)

    def _listening(self) -> Listener:
        """The handle's listener, made on first use (one per handle, under its lock)."""
        with self._listener_lock:
            if self._listener is None:
                from pgwarden._async.listen import Listener

                self._listener = Listener(self._state, self._connections.watchdog)
            return self._listener

    def _listener_check_soon(self) -> None:
        listener = self._listener
        if listener is not None:
            listener.check_soon()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.settings.safe_url} {self._state.state.value}>"

    # --- readiness -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The lifecycle state (NEW, WARMING, READY, DEGRADED, OPEN, CLOSING, CLOSED)."""
        return self._state.state

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until the database answered a real round trip (and the probe query).

        Single-flight: however many callers arrive at once, one warmup runs and
        all of them get its outcome. Connect failures are retried with backoff
        until ``ready_timeout``; then every waiter gets the same `NotReady`.
        Permanent failures (bad password, unknown database) are raised at once.
        *timeout* bounds this caller's wait (`DeadlineExceeded`), not the warmup.
        """
        deadline, _ = self._state.deadline_for(timeout)
        await self._warmup.wait(deadline if timeout is not None else None)

    # --- the query API -------------------------------------------------------------------------
    @overload
    async def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: type[dict[Any, Any]] | None = None,
    ) -> list[dict[str, Any]]: ...
    @overload
    async def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: Callable[..., RowT],
    ) -> list[RowT]: ...
    async def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: RowShape | None = None,
    ) -> list[Any]:
        """All rows, as dicts or as *row*: ``tuple``, or a class built from the
        columns as keyword arguments (a dataclass, Pydantic, attrs; a column it has
        no field for is a `RowShapeError`). The same *row* applies to `fetchrow`.

        Sent again after a failure only when it cannot have written: nothing
        reached the server, or the server proved it a read, or the caller said
        so. *write*: None (the default) decides by the SQL text, and a read by
        text that may have run is re-sent only inside ``BEGIN READ ONLY`` (a
        hidden write such as ``SELECT add_row()`` is then refused and raises
        `OutcomeUnknown`); True: it writes (never re-sent once it may have
        run; under a deadline its COMMIT is resolved by id); False: the caller
        vouches it writes nothing. *idempotent*: running it twice is harmless,
        so it is re-sent like a read. The same arguments apply to `fetchrow`,
        `fetchval` and `execute`.
        """
        result: list[Any] = await self._statements.run(
            Mode.ROWS, query, params, timeout, idempotent, write, row
        )
        return result

    @overload
    async def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: type[dict[Any, Any]] | None = None,
    ) -> dict[str, Any] | None: ...
    @overload
    async def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: Callable[..., RowT],
    ) -> RowT | None: ...
    async def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
        row: RowShape | None = None,
    ) -> Any:
        """The first row as a dict (or *row*, see `fetch`), or None."""
        return await self._statements.run(Mode.ROW, query, params, timeout, idempotent, write, row)

    async def fetchval(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> Any:
        """The first column of the first row, or None when there is no row."""
        return await self._statements.run(Mode.VALUE, query, params, timeout, idempotent, write)

    async def execute(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> int:
        """Run a statement; return its rowcount. A write that may have reached the
        server is never sent again unless ``idempotent=True``; if its connection
        is lost after it was sent, `OutcomeUnknown` (see `fetch` for *write*)."""
        result: int = await self._statements.run(
            Mode.COUNT, query, params, timeout, idempotent, write
        )
        return result

    async def executemany(
        self,
        query: Query,
        params_seq: Iterable[ManyParams],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> int:
        """Run *query* once per parameter set, atomically (in one transaction)."""
        return await self._transactions.executemany(
            query, list(params_seq), timeout=timeout, idempotent=idempotent
        )

    @overload
    def stream(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        fetch_size: int = DEFAULT_FETCH_SIZE,
        row: type[dict[Any, Any]] | None = None,
    ) -> AsyncStream[dict[str, Any]]: ...
    @overload
    def stream(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        fetch_size: int = DEFAULT_FETCH_SIZE,
        row: Callable[..., RowT],
    ) -> AsyncStream[RowT]: ...
    def stream(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        fetch_size: int = DEFAULT_FETCH_SIZE,
        row: RowShape | None = None,
    ) -> AsyncStream[Any]:
        """The rows of *query* (a SELECT), *fetch_size* at a time from a server-side
        cursor in a read-only transaction: ``async for row in db.stream(q):``.

        An explicit deadline bounds the whole stream; without one ``default_timeout``
        bounds each fetch. Use ``async with db.stream(q) as rows:`` when you may stop
        early. Retried only before the first row (docs/queries.md).
        """
        return AsyncStream(self._transactions, query, params, row, fetch_size, timeout)

    def with_rows(self, row: Callable[..., RowT]) -> AsyncRows[RowT]:
        """A view of this handle whose `fetch`, `fetchrow` and `stream` build *row*
        (the per-handle row shape; the pool, readiness and metrics are this handle's)."""
        return AsyncRows(self, row)

    async def copy_in(
        self,
        table: str | sql.Composable,
        source: CopySource,
        *,
        columns: Sequence[str] | None = None,
        format: str = "text",
        timeout: float | None = None,
    ) -> int:
        """COPY *source* into *table*, in a transaction; returns the rows copied.

        *source*: rows (sequences in *columns* order) or a file (or bytes) of COPY
        data in *format* (``text``, ``csv``, ``binary``). A write: re-sent only when
        nothing reached the server; a source that fails mid-way leaves no rows.
        Inside ``run_transaction`` use ``tx.copy_in``.
        """
        return await self._transactions.copy_in(
            table, source, columns=columns, format=format, timeout=timeout
        )

    async def copy_out(
        self,
        query: Query,
        sink: CopySink,
        params: Params = None,
        *,
        format: str = "text",
        timeout: float | None = None,
    ) -> int:
        """COPY the rows of *query* (a SELECT, or ``TABLE name``) into *sink* (a binary
        or text file) in *format*; returns the rows copied. Not re-run once it may have
        written to *sink*."""
        return await self._transactions.copy_out(
            query, sink, params, format=format, timeout=timeout
        )

    # --- transactions --------------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(
        self,
        *,
        isolation: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[AsyncTransaction]:
        """A transaction on one connection: commit on success, roll back on error.

        Waits for readiness before BEGIN (the "transaction guard"). Statements
        inside are never retried one by one; use `run_transaction` to re-run
        the whole body on conflicts and lost connections. A connection lost
        before COMMIT raises `NotCommitted`; one lost during COMMIT is resolved
        by transaction id (`AmbiguousCommitError` only if that fails).
        """
        async with self._transactions.transaction(isolation, readonly, timeout) as tx:
            yield tx

    async def run_transaction(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        isolation: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        attempts: int | None = None,
    ) -> T:
        """Run ``fn(tx)`` in a transaction, re-running the whole function on
        serialization failures and deadlocks (40001, 40P01), on a connection lost
        before COMMIT, and on a COMMIT whose loss resolved as aborted.

        *attempts* defaults to ``max(retry_attempts, 5)``: conflicts are expected
        under contention. Every re-run is inside the deadline and the retry budget.
        """
        return await self._transactions.run_transaction(
            fn, isolation=isolation, readonly=readonly, timeout=timeout, attempts=attempts
        )

    # --- escape hatch --------------------------------------------------------------------------
    @asynccontextmanager
    async def connection(self, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """The raw psycopg connection (autocommit, dict rows), returned to the pool after.

        No retries happen inside; leave it in autocommit or end your transaction.
        An explicit deadline (*timeout* or ``pgwarden.deadline()``) also bounds
        what you do with it (the socket is shut down when it passes);
        ``default_timeout`` bounds only getting the connection.
        """
        state = self._state
        deadline, explicit = state.deadline_for(timeout)
        state.enter()
        try:
            if not state.fast_path:
                await self._warmup.wait(deadline)
            lease = await self._connections.lease(deadline, explicit=explicit, lent=True)
            if not explicit:
                lease.rearm(None)  # the backstop bounded getting it (if it made a round trip)
            async with self._connections.held(lease, call_site_ref()):
                yield lease.conn
        finally:
            state.leave()

    async def checkout(
        self,
        *,
        timeout: float | None = None,
        autocommit: bool = True,
        row_factory: Any = None,
    ) -> AsyncCheckout:
        """Lend a pooled connection to a consumer (an ORM, a framework) until it
        calls ``release()`` or ``discard()``: the building block of integrations.

        Like `connection`, it waits for readiness, passes the breaker and is
        validated pgwarden's way; it is counted in flight and watched for leaks
        until released. *autocommit* and *row_factory* (default: dict rows) shape
        it for the consumer; ``release()`` rolls back whatever is open and puts
        pgwarden's shape back. An explicit deadline (*timeout* or
        ``pgwarden.deadline()``) bounds every byte until release (the socket is
        shut down when it passes; ``checkout.deadline`` says when, for a
        server-side timeout); ``default_timeout`` bounds only getting it.
        """
        state = self._state
        # One clock reading for the deadline, the freeze check and the acquire wait.
        started: float | None = state.enter()
        try:
            deadline, explicit = state.deadline_for(timeout, started)
            if not state.fast_path:
                await self._warmup.wait(deadline)
                started = None  # the acquire wait begins after the warmup's
            lease = await self._connections.lease(
                deadline, explicit=explicit, lent=True, started=started
            )
        except BaseException:
            state.leave()
            raise
        try:
            conn = lease.conn
            if not autocommit and conn.autocommit and not autocommit_in_place(conn, False):
                await conn.set_autocommit(False)  # idle: no round trip
            # Without an explicit deadline, lend() ends the default_timeout backstop.
            return self._connections.lend(
                lease, call_site_ref(), deadline if explicit else None, row_factory=row_factory
            )
        except BaseException:
            if not lease.conn.autocommit:
                # Shaped for the consumer and never lent: not back into the pool like this
                # (pgwarden's next statement on it would run in a transaction nobody ends).
                await lease.conn.close()
            state.lease_returned(lease.acquire_wait, await lease.release())
            state.leave()
            raise

    # --- for integrations that send SQL on a checkout themselves (an ORM) ------------------------
    def statement_started(self, operation: str, query: object) -> StatementMark:
        """Call right before sending *query* on a connection from `checkout`; pass what it
        returns to `statement_finished`. The handle's statement observers are told
        (*operation*: a short name for them, such as ``"sqlalchemy"``)."""
        observer = self._statements.observer
        if type(observer) is NoopStatementObserver:  # nothing to tell: skip two calls
            return observer, None, query, monotonic()
        return observer, observer.statement_started(operation, query), query, monotonic()

    def statement_finished(
        self,
        mark: StatementMark,
        error: BaseException | None = None,
        rowcount: int | None = None,
    ) -> None:
        """The statement *mark* came from ended, with *error* (None: it succeeded) and
        *rowcount* (None: unknown). The observers are told; a success is counted like the
        handle's own statements: ``queries``, the query-duration histogram and, past
        ``slow_query_threshold``, a ``slow_query`` event. Report a failure with
        `report_failure` (which counts it by kind)."""
        finished = monotonic()
        observer, token, query, started = mark
        if type(observer) is not NoopStatementObserver:
            observer.statement_finished(token, error, rowcount)
        if error is None:
            self._state.statement_timed(query, finished - started)

    async def report_failure(
        self,
        exc: BaseException,
        *,
        phase: Phase = Phase.STATEMENT,
        connection_lost: bool = False,
        in_transaction: bool = True,
        counted: bool = True,
        operation: str = "checkout",
    ) -> FailureKind:
        """A failure an integration saw on a connection from `checkout`, handled as the
        handle handles its own: classified (SQLSTATE and message texts; *connection_lost*:
        the connection is broken or closed; *phase*: ``Phase.COMMIT`` for a COMMIT),
        counted by kind in ``stats()["counters"]["errors"]`` unless *counted* is False (a
        caller that counts its attempts itself), and acted on: overload shrinks the pool,
        a read-only server (a failover) drains it. Nothing is retried. Returns the kind;
        the connection is useless after ``STALE``, ``LOST``, ``LOST_COMMIT`` and
        ``FAILOVER``."""
        kind, _ = self._state.failed(
            exc,
            phase,
            RetryContext(is_write=True, in_transaction=in_transaction),
            attempt=1,
            deadline=None,
            policy=_REPORT_ONLY,
            operation=operation,
            connection_lost=connection_lost,
            user_call=counted,
        )
        await self._connections.after_failure(kind)
        return kind

    async def rerun_after_failure(
        self,
        exc: BaseException,
        *,
        attempt: int,
        deadline: float | None,
        cause: BaseException | None = None,
        attempts: int | None = None,
        whole_transaction: bool = True,
        connection_lost: bool = False,
        reported: bool = False,
        operation: str | None = None,
    ) -> FailureKind:
        """Should a unit of work an integration runs itself be run again after attempt
        *attempt* (1 for the first) failed with *exc*? Returns the failure's kind, after
        sleeping the backoff, when it should; raises otherwise: *exc* itself, or
        `DeadlineExceeded` from it when the time ran out (an `OutcomeUnknown` is raised
        as it is). *cause* is the driver's error inside *exc* (a framework's wrapper):
        classified instead of *exc* (default: *exc*).

        The failure is counted by kind (``stats()["counters"]["errors"]``, the retry
        budget) and decided by the handle's own rules, within *deadline* (monotonic; None:
        no bound) and the retry budget, with the handle's backoff. *whole_transaction*:
        the unit is a whole transaction function re-run from its start (it vouches for
        itself, as `run_transaction`), for up to *attempts* attempts (default
        ``max(retry_attempts, 5)``); False: one statement outside a transaction, sent
        again only when it certainly did not run (``NOTHING_RAN``, ``STALE``), as often
        as the handle's single statements are. A read-only server (a failover) drains
        the pool unless *reported* (it went through `report_failure` already, which
        did). *operation* names the unit in a `DeadlineExceeded` (default
        ``"transaction"``, or ``"statement"``)."""
        state = self._state
        if whole_transaction:
            limit = attempts if attempts is not None else max(self.settings.retry_attempts, 5)
            ctx = _WHOLE_UNIT
            policy = state.statement_policy.with_attempts(limit)
        else:
            ctx = _SINGLE_STATEMENT
            # As the handle's own statements: under an explicit deadline, as many
            # attempts as fit in it (a pooler that cannot log in for a second is waited out).
            explicit = current_deadline() is not None
            policy = state.deadline_policy if explicit else state.statement_policy
        if operation is None:
            operation = "transaction" if whole_transaction else "statement"
        kind, decision = state.failed(
            exc if cause is None else cause,
            Phase.STATEMENT,
            ctx,
            attempt=attempt,
            deadline=deadline,
            policy=policy,
            operation=operation,
            connection_lost=connection_lost,
            whole_transaction=whole_transaction,
        )
        if not reported:
            await self._connections.after_failure(kind)
        if not whole_transaction and kind not in _RESENDABLE:
            raise exc  # it may have run: only the caller can know whether to send it again
        await act_on(state, decision, exc, operation)  # sleeps, or raises
        return kind

    async def resolve_lost_commit(
        self,
        exc: BaseException,
        marker: Marker | None,
        *,
        resolve: bool | None = None,
        deadline: float | None = None,
        setting: str = "resolve_commits",
    ) -> None:
        """End a COMMIT an integration sent whose connection was lost (*exc*), as the
        handle ends its own: return if it committed (or wrote nothing), raise
        `NotCommitted` if it certainly did not commit, `AmbiguousCommitError` when
        resolution is off (*resolve*, default ``resolve_commits``; *setting* names the
        switch in the message) or nothing could tell by *deadline* (monotonic; None: no
        bound but the handle's own). *marker* is the transaction's `Marker`, read before
        the COMMIT (``txid_current_if_assigned()``); None when it wrote nothing. The
        server is asked on another connection; counted in ``ambiguous_commits``."""
        if resolve is None:
            resolve = bool(self.settings.resolve_commits)
        await self._transactions.resolve_lost_commit(
            exc, marker, resolve=resolve, deadline=deadline, setting=setting
        )

    def deadline_error(
        self, exc: BaseException | None = None, *, during: str = "statement"
    ) -> DeadlineExceeded:
        """The `DeadlineExceeded` the handle raises when a caller's deadline ran out
        *during* something (``"statement"``), with *exc* as ``last_error`` (redacted in
        place: no password in its message); for an integration to raise instead of a
        driver's timeout or lost-connection error."""
        return self._state.deadline_error(exc, during)

    # --- LISTEN/NOTIFY -------------------------------------------------------------------------
    def listen(
        self, *channels: str, callback: Callback[None] | None = None, timeout: float | None = None
    ) -> Subscription:
        """A subscription to *channels* on the handle's one listener connection (not
        from the pool), re-established after a restart, a kill or a failover.

        ``async with db.listen("orders") as sub: async for event in sub:`` yields
        `Notification` (channel, payload, pid) and, after each outage, one `Gap`
        (channels, since, reason): notifications may have been missed, re-read the
        state. With *callback*, each event is passed to it on the listener instead
        (``async with db.listen("orders", callback=fn):``). Opening returns once
        every channel is LISTENed, within *timeout* (default ``connect_timeout +
        ready_timeout``). See docs/listen.md.
        """
        return self._listening().subscription(channels, callback, timeout)

    # --- health, stats, shutdown ---------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """A health report (ok, state, breaker, latency, error, pool), within
        ``health_timeout`` whatever the database does (readiness, acquire and the
        round trip all fit in it).

        A known outage is reported at once, without waiting: an open breaker, or a
        last connect attempt that failed with no success since (its error, redacted).
        Otherwise one real round trip decides; its report is cached for
        ``health_interval`` and computed single-flight, so a busy health endpoint
        costs the database at most one query per interval. A connect failure, a
        connection found lost or a query failing as lost/stale/nothing ran/failover
        after the cached check began makes it stale: the next call checks again.
        """
        entered = monotonic()
        state = self._state
        if state.breaker_state is not BreakerState.CLOSED:
            return self._health_report(False, 0.0, state.last_connect_error)
        cached = state.cached_health()
        if cached is not None:
            return cached
        bound = self.settings.health_timeout
        down = state.known_down()
        # Known down: answer now, and let the check run on in the background
        # (single-flight) so that a recovery is seen even if nothing else connects.
        wait = 0.0 if down is not None else bound - (monotonic() - entered)
        try:
            return await self._health_flight.run(self._check_health, wait)
        except WaitTimeout:
            if down is not None:
                return self._health_report(False, 0.0, down)
            return self._health_report(
                False, monotonic() - entered, state.health_timeout_error(bound)
            )

    async def _check_health(self) -> dict[str, Any]:
        mark = self._state.health_check_began()
        started = monotonic()
        bound = self.settings.health_timeout
        deadline = started + max(bound - HEALTH_MARGIN, bound / 2)
        error: BaseException | None = None
        try:
            await self._warmup.wait(deadline)
            lease = await self._connections.lease(deadline, explicit=True, internal=True)
            try:
                await lease.conn.execute("SELECT 1")
            finally:
                await lease.release()
        except Exception as exc:
            error = exc
        return self._health_report(error is None, monotonic() - started, error, began=mark)

    def _health_report(
        self,
        ok: bool,
        latency: float,
        error: BaseException | None,
        *,
        began: HealthMark | None = None,
    ) -> dict[str, Any]:
        """Count and build a report; one from a round trip that *began* is cached."""
        state = self._state
        report = state.health_report(ok, latency, error, self._connections.pool_stats())
        state.health_checked(ok, report, began)
        return report

    def stats(self) -> Stats:
        """A plain-dict snapshot of every gauge, counter and histogram, shaped as
        `pgwarden.core.stats.Stats` (a TypedDict: the contract exporters read)."""
        snapshot = self._state.stats(self._connections.pool_stats())
        listener = self._listener
        if listener is None:
            from pgwarden.core.listen import ListenBook

            snapshot["listen"] = ListenBook().stats()
        else:
            snapshot["listen"] = listener.stats()
        return cast("Stats", snapshot)

    def histograms(self) -> Mapping[str, Histogram]:
        """The live histograms behind `stats()` (empty when metrics are off)."""
        return self._state.histograms()

    async def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, wait up to *timeout* for work in flight, then close."""
        state = self._state
        if state.state is State.CLOSED:
            return
        if state.state is not State.CLOSING:
            state.fire(Event.CLOSE_REQUESTED)
        give_up_at = monotonic() + timeout
        listener = self._listener
        if listener is not None:
            await listener.close(timeout)  # ends every subscription now
        while state.inflight > 0 and monotonic() < give_up_at:
            await sleep(0.01)
        await self._connections.close(give_up_at - monotonic())
        state.try_fire(Event.CLOSED)  # a concurrent close() may have finished first
        state.log(
            logging.INFO,
            "closed (%d operation(s) still in flight were cut off)",
            state.inflight,
            event="closed",
            cut_off=state.inflight,
        )

    def install_signal_handlers(
        self, signals: Sequence[int] | None = None, *, timeout: float = 5.0
    ) -> None:
        """On SIGTERM/SIGINT (or *signals*): drain with `close(timeout)`, then call the
        handler that was installed before. Never exits the process by itself."""
        on_signals(signals, lambda: self.close(timeout))

    def add_tracker(self, tracker: MetricsTracker) -> Callable[[], None]:
        """Also report every metrics event to *tracker* (an exporter's); returns
        ``remove()``. ``stats()`` is unchanged; a failing extra tracker never fails
        a query."""
        return self._state.add_tracker(tracker)

    def add_statement_observer(self, observer: StatementObserver) -> Callable[[], None]:
        """Tell *observer* about every statement the handle's query methods send (one
        ``statement_started``/``statement_finished`` pair per attempt; pgwarden's
        own probes are not reported). Returns ``remove()``."""
        removed = False
        self._set_observer(with_observer(self._transactions.observer, observer))

        def remove() -> None:
            nonlocal removed
            if not removed:
                removed = True
                self._set_observer(without_observer(self._transactions.observer, observer))

        return remove

    def _set_observer(self, observer: StatementObserver) -> None:
        self._transactions.observer = self._statements.observer = observer

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pool without touching its sockets.

        The tracker (and any exporter attached to it) is kept; its counters
        include the parent's history up to the fork. Statement observers are kept.
        """
        observer = self._transactions.observer
        self._build(HandleState(self.settings, self._state.tracker))
        self._set_observer(observer)

    async def __aenter__(self) -> AsyncDatabase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
