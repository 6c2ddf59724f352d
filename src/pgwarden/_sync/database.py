# WARNING: generated from src/pgwarden/_async/database.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""`Database`: the threaded handle's public methods, each delegating to one part.

=================== ===============================================================
module              owns
=================== ===============================================================
``warmup.py``       readiness: the single shared warmup
``acquire.py``      the pool, admission (breaker), acquire, validation, and the
                    lease that bounds every byte by the call's deadline
``execute.py``      single statements (fetch, fetchrow, fetchval, execute)
``transaction.py``  transaction(), run_transaction(), COMMIT, commit resolution
``retrying.py``     carrying out a retry decision
``pool.py``         the one seam to psycopg_pool's internals
=================== ===============================================================

All mutable state and every decision belong to `HandleState`
(``pgwarden/_handle/state.py``). The sync `Database` is generated from these
files by ``scripts/async_to_sync.py``; asyncio specifics live in ``_compat.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import monotonic
from typing import Any, TypeVar

from pgwarden._handle.config import call_site
from pgwarden._handle.sql import ManyParams, Mode, Params, Query
from pgwarden._handle.state import HandleState, HealthMark
from pgwarden._sync._compat import SingleFlight, WaitTimeout, on_signals, sleep
from pgwarden._sync.acquire import Checkout, Connections
from pgwarden._sync.execute import Statements
from pgwarden._sync.transaction import Transaction, Transactions
from pgwarden._sync.warmup import Warmup
from pgwarden.core.breaker import BreakerState
from pgwarden.core.classify import FailureKind, Phase, RetryContext
from pgwarden.core.histogram import Histogram
from pgwarden.core.lifecycle import Event, State
from pgwarden.core.metrics import MetricsTracker
from pgwarden.core.retry import RetryPolicy
from pgwarden.core.tracing import StatementObserver, with_observer, without_observer
from pgwarden.errors import DeadlineExceeded
from pgwarden.settings import Settings

__all__ = ["Checkout", "Database", "Transaction"]

T = TypeVar("T")

# The health check's own deadline ends this long before the caller's bound
# (``health_timeout``), so that its outcome, with its own error, reaches the caller
# within the bound: a silent server's socket is severed SEVER_GRACE past a deadline.
HEALTH_MARGIN = 0.1

#: What `Database.statement_started` returns: the observer that saw the start, its
#: token, the statement and when it was sent (opaque to integrations).
StatementMark = tuple[StatementObserver, object, object, float]

# report_failure counts and classifies; nobody retries on its verdict.
_REPORT_ONLY = RetryPolicy(attempts=1)


class Database:
    """One shared, self-healing handle to PostgreSQL (threads).

    Create it with `pgwarden.connect()`; construction does no I/O. Every
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
        self._connections = Connections(state, self.adapters)
        self._warmup = Warmup(state, self._connections)
        self._transactions = Transactions(state, self._connections, self._warmup)
        self._statements = Statements(state, self._connections, self._warmup, self._transactions)
        self._health_flight: SingleFlight[dict[str, Any]] = SingleFlight()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.settings.safe_url} {self._state.state.value}>"

    # --- readiness -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The lifecycle state (NEW, WARMING, READY, DEGRADED, OPEN, CLOSING, CLOSED)."""
        return self._state.state

    def ready(self, timeout: float | None = None) -> None:
        """Wait until the database answered a real round trip (and the probe query).

        Single-flight: however many callers arrive at once, one warmup runs and
        all of them get its outcome. Connect failures are retried with backoff
        until ``ready_timeout``; then every waiter gets the same `NotReady`.
        Permanent failures (bad password, unknown database) are raised at once.
        *timeout* bounds this caller's wait (`DeadlineExceeded`), not the warmup.
        """
        deadline, _ = self._state.deadline_for(timeout)
        self._warmup.wait(deadline if timeout is not None else None)

    # --- the query API -------------------------------------------------------------------------
    def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> list[dict[str, Any]]:
        """All rows as dicts.

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
        result: list[dict[str, Any]] = self._statements.run(
            Mode.ROWS, query, params, timeout, idempotent, write
        )
        return result

    def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        result: dict[str, Any] | None = self._statements.run(
            Mode.ROW, query, params, timeout, idempotent, write
        )
        return result

    def fetchval(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        write: bool | None = None,
    ) -> Any:
        """The first column of the first row, or None when there is no row."""
        return self._statements.run(Mode.VALUE, query, params, timeout, idempotent, write)

    def execute(
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
        result: int = self._statements.run(Mode.COUNT, query, params, timeout, idempotent, write)
        return result

    def executemany(
        self,
        query: Query,
        params_seq: Iterable[ManyParams],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> int:
        """Run *query* once per parameter set, atomically (in one transaction)."""
        return self._transactions.executemany(
            query, list(params_seq), timeout=timeout, idempotent=idempotent
        )

    # --- transactions --------------------------------------------------------------------------
    @contextmanager
    def transaction(
        self,
        *,
        isolation: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Transaction]:
        """A transaction on one connection: commit on success, roll back on error.

        Waits for readiness before BEGIN (the "transaction guard"). Statements
        inside are never retried one by one; use `run_transaction` to re-run
        the whole body on conflicts and lost connections. A connection lost
        before COMMIT raises `NotCommitted`; one lost during COMMIT is resolved
        by transaction id (`AmbiguousCommitError` only if that fails).
        """
        with self._transactions.transaction(isolation, readonly, timeout) as tx:
            yield tx

    def run_transaction(
        self,
        fn: Callable[[Transaction], T],
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
        return self._transactions.run_transaction(
            fn, isolation=isolation, readonly=readonly, timeout=timeout, attempts=attempts
        )

    # --- escape hatch --------------------------------------------------------------------------
    @contextmanager
    def connection(self, *, timeout: float | None = None) -> Iterator[Any]:
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
                self._warmup.wait(deadline)
            lease = self._connections.lease(deadline, explicit=explicit)
            if not explicit:
                lease.rearm(None)
            with self._connections.held(lease, call_site()):
                yield lease.conn
        finally:
            state.leave()

    def checkout(
        self,
        *,
        timeout: float | None = None,
        autocommit: bool = True,
        row_factory: Any = None,
    ) -> Checkout:
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
        deadline, explicit = state.deadline_for(timeout)
        state.enter()
        try:
            if not state.fast_path:
                self._warmup.wait(deadline)
            lease = self._connections.lease(deadline, explicit=explicit)
        except BaseException:
            state.leave()
            raise
        if not explicit:
            lease.rearm(None)
        try:
            return self._connections.lend(
                lease,
                call_site(),
                deadline if explicit else None,
                autocommit=autocommit,
                row_factory=row_factory,
            )
        except BaseException:
            state.lease_returned(lease.acquire_wait, lease.release())
            state.leave()
            raise

    # --- for integrations that send SQL on a checkout themselves (an ORM) ------------------------
    def statement_started(self, operation: str, query: object) -> StatementMark:
        """Call right before sending *query* on a connection from `checkout`; pass what it
        returns to `statement_finished`. The handle's statement observers are told
        (*operation*: a short name for them, such as ``"sqlalchemy"``)."""
        observer = self._statements.observer
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
        observer.statement_finished(token, error, rowcount)
        if error is None:
            self._state.statement_timed(query, finished - started)

    def report_failure(
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
        self._connections.after_failure(kind)
        return kind

    def deadline_error(
        self, exc: BaseException | None = None, *, during: str = "statement"
    ) -> DeadlineExceeded:
        """The `DeadlineExceeded` the handle raises when a caller's deadline ran out
        *during* something (``"statement"``), with *exc* as ``last_error`` (redacted in
        place: no password in its message); for an integration to raise instead of a
        driver's timeout or lost-connection error."""
        return self._state.deadline_error(exc, during)

    # --- health, stats, shutdown ---------------------------------------------------------------
    def health(self) -> dict[str, Any]:
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
            return self._health_flight.run(self._check_health, wait)
        except WaitTimeout:
            if down is not None:
                return self._health_report(False, 0.0, down)
            return self._health_report(
                False, monotonic() - entered, state.health_timeout_error(bound)
            )

    def _check_health(self) -> dict[str, Any]:
        mark = self._state.health_check_began()
        started = monotonic()
        bound = self.settings.health_timeout
        deadline = started + max(bound - HEALTH_MARGIN, bound / 2)
        error: BaseException | None = None
        try:
            self._warmup.wait(deadline)
            lease = self._connections.lease(deadline, explicit=True, internal=True)
            try:
                lease.conn.execute("SELECT 1")
            finally:
                lease.release()
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

    def stats(self) -> dict[str, Any]:
        """A plain-dict snapshot of every gauge, counter and histogram."""
        return self._state.stats(self._connections.pool_stats())

    def histograms(self) -> Mapping[str, Histogram]:
        """The live histograms behind `stats()` (empty when metrics are off)."""
        return self._state.histograms()

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, wait up to *timeout* for work in flight, then close."""
        state = self._state
        if state.state is State.CLOSED:
            return
        if state.state is not State.CLOSING:
            state.fire(Event.CLOSE_REQUESTED)
        give_up_at = monotonic() + timeout
        while state.inflight > 0 and monotonic() < give_up_at:
            sleep(0.01)
        self._connections.close(give_up_at - monotonic())
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

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
