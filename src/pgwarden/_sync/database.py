# WARNING: generated from src/pgwarden/_async/database.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""`Database`: the threaded handle. The sync `Database` is generated from this file.

Only I/O lives here; every decision is `HandleCore`'s (``_base.py``). Keep it
convertible by ``scripts/async_to_sync.py``: asyncio specifics belong in
``_compat.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import monotonic, time
from typing import Any, TypeVar

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed
from psycopg_pool import PoolTimeout

from pgwarden._base import MIN_ATTEMPT_SECONDS, SEVER_GRACE, HandleCore, call_site
from pgwarden._pool_base import has_pending_input
from pgwarden._sync._compat import (
    Lock,
    SingleFlight,
    Watchdog,
    on_signals,
    sever,
    sleep,
    spawn,
)
from pgwarden._sync.pool import PgwConnection, PgwPool
from pgwarden.core.breaker import BreakerState
from pgwarden.core.classify import FailureKind, Phase, RetryContext, is_write_sql, sqlstate_of
from pgwarden.core.deadline import statement_timeout_ms
from pgwarden.core.hygiene import needs_validation
from pgwarden.core.lifecycle import Event, State
from pgwarden.core.metrics import MetricsTracker
from pgwarden.core.retry import RetryPolicy
from pgwarden.errors import AmbiguousCommitError, DatabaseUnavailable, HandleClosed
from pgwarden.settings import Settings

__all__ = ["Database", "Transaction"]

logger = logging.getLogger("pgwarden")

T = TypeVar("T")
Query = str | bytes | SQL | Composed
Params = Sequence[Any] | Mapping[str, Any] | None
ManyParams = Sequence[Any] | Mapping[str, Any]

# What a statement returns: all rows, one row, one value, or the row count.
_ROWS, _ROW, _VALUE, _COUNT = 0, 1, 2, 3
_TX_CONFLICT = (FailureKind.CONFLICT,)
_ISOLATION = {
    None: "",
    "read committed": " ISOLATION LEVEL READ COMMITTED",
    "repeatable read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


class Database:
    """One shared, self-healing handle to PostgreSQL (threads).

    Create it with `pgwarden.connect()`; construction does no I/O. Every
    query method waits for readiness first, retries only what is safe within
    the caller's deadline, and raises permanent errors unchanged.
    """

    def __init__(self, settings: Settings, *, tracker: MetricsTracker | None = None) -> None:
        self._core = HandleCore(settings, tracker)
        self.settings = settings
        self._pool: PgwPool | None = None
        self._warmup: SingleFlight[None] = SingleFlight()
        self._checker: SingleFlight[None] = SingleFlight()
        self._resize_lock = Lock()
        self._watchdog = Watchdog()
        self._inflight = 0
        self._health_flight: SingleFlight[dict[str, Any]] = SingleFlight()
        self._health_cache: tuple[float, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.settings.safe_url} {self._core.state.value}>"

    # --- readiness -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The lifecycle state (NEW, WARMING, READY, DEGRADED, OPEN, CLOSING, CLOSED)."""
        return self._core.state

    def ready(self, timeout: float | None = None) -> None:
        """Wait until the database answered a real round trip (and the probe query).

        Single-flight: however many callers arrive at once, one warmup runs and
        all of them get its outcome. Connect failures are retried with backoff
        until ``ready_timeout`` (or *timeout*); then every waiter gets the same
        `NotReady`. Permanent failures (bad password, unknown database) are
        raised at once.
        """
        self._core.check_accepting()
        if self._core.state not in (State.NEW, State.WARMING):
            return
        self._warmup.run(lambda: self._do_warmup(timeout))

    def _do_warmup(self, timeout: float | None) -> None:
        core = self._core
        if core.state not in (State.NEW, State.WARMING):
            return
        core.fire(Event.WARMUP_STARTED)
        started = monotonic()
        give_up_at = started + (timeout if timeout is not None else self.settings.ready_timeout)
        attempt = 0
        last_error: BaseException | None = None
        while True:
            attempt += 1
            try:
                conn = self._connect_direct(give_up_at)
                try:
                    self._probe_round_trip(conn)
                except BaseException:
                    conn.close()
                    raise
            except (psycopg.Error, OSError) as exc:
                last_error = exc
                kind = core.on_connect_failed(exc, feed_breaker=False)
                now = monotonic()
                # Back off, but never past ready_timeout: the last sleep is
                # shortened so one more attempt fits.
                delay = min(
                    core.retry_policy.backoff(min(attempt, 8), core.rng.random()),
                    (give_up_at - now) / 2,
                )
                if kind is FailureKind.PERMANENT or give_up_at - now < MIN_ATTEMPT_SECONDS:
                    core.try_fire(Event.WARMUP_FAILED)  # lost a race with close()
                    core.tracker.warmup(now - started, False)
                    error = core.not_ready_error(exc, now - started)
                    logger.error("%s", error, extra={"event": "warmup", "ok": False})
                    if kind is FailureKind.PERMANENT:
                        raise error from _permanent_cause(exc, core)
                    raise error from None
                logger.info(
                    "warmup attempt %d failed (%s); retrying in %.3fs",
                    attempt,
                    core.describe_error(exc),
                    delay,
                    extra={"event": "warmup_retry", "attempt": attempt},
                )
                sleep(delay)
                core.check_accepting()  # close() stops a warmup that is still retrying
                continue
            break
        if core.state is not State.WARMING:
            # close() arrived while we were connecting: do not open a pool now.
            conn.close()
            core.check_accepting()
            return
        pool = self._ensure_pool()
        pool.open(wait=False)
        pool.adopt(conn)
        elapsed = monotonic() - started
        core.warmup_seconds = elapsed
        core.tracker.warmup(elapsed, True)
        core.fire(Event.WARMUP_SUCCEEDED)
        logger.info(
            "ready in %.3fs after %d attempt(s)%s",
            elapsed,
            attempt,
            " (PgBouncer detected)" if core.pgbouncer else "",
            extra={"event": "warmup", "ok": True, "seconds": elapsed, "attempts": attempt},
        )
        del last_error

    def _connect_direct(self, give_up_at: float) -> PgwConnection:
        """Open one connection outside the pool, reporting the outcome to the core."""
        kwargs = self._core.connect_kwargs()
        left = give_up_at - monotonic()
        kwargs["connect_timeout"] = max(1, min(kwargs["connect_timeout"], int(left + 0.999)))
        started = monotonic()
        conn = PgwConnection.connect(self._core.conninfo, **kwargs)
        self._core.on_connect_ok(monotonic() - started)
        return conn

    def _probe_round_trip(self, conn: PgwConnection) -> None:
        """Phase 1: a real round trip; PgBouncer detection; phase 2: the probe query."""
        core = self._core
        cur = conn.execute("SELECT 1")
        cur.fetchone()
        if self.settings.pgbouncer == "auto" and not core.pgbouncer:
            core.pgbouncer = _looks_like_pgbouncer(conn)
            if core.pgbouncer:
                conn.prepare_threshold = None
        if self.settings.probe_query:
            conn.execute(self.settings.probe_query)
        conn.last_used = monotonic()

    def _ensure_pool(self) -> PgwPool:
        if self._pool is None:
            self._pool = PgwPool(
                self._core.conninfo,
                observer=self,
                kwargs=self._core.connect_kwargs(),
                **self._core.pool_kwargs(),
            )
        return self._pool

    # pool observer (called by PgwPool)
    def on_connect_ok(self, setup_seconds: float) -> None:
        self._core.on_connect_ok(setup_seconds)

    def on_connect_failed(self, exc: BaseException) -> Any:
        return self._core.on_connect_failed(exc)

    def on_connection_closed(self, reason: str) -> None:
        self._core.tracker.connection_closed(reason)

    def may_connect(self) -> bool:
        return self._core.breaker.state is BreakerState.CLOSED

    # --- the query API -------------------------------------------------------------------------
    def fetch(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> list[dict[str, Any]]:
        """All rows as dicts. Retried when safe (reads; writes only if *idempotent*)."""
        result: list[dict[str, Any]] = self._run(_ROWS, query, params, timeout, idempotent)
        return result

    def fetchrow(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        result: dict[str, Any] | None = self._run(_ROW, query, params, timeout, idempotent)
        return result

    def fetchval(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """The first column of the first row, or None when there is no row."""
        return self._run(_VALUE, query, params, timeout, idempotent)

    def execute(
        self,
        query: Query,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> int:
        """Run a statement; return its rowcount. Once a write reached the server it is
        not re-run unless the caller passes ``idempotent=True``."""
        result: int = self._run(_COUNT, query, params, timeout, idempotent)
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
        rows = list(params_seq)

        def body(tx: Transaction) -> int:
            cur = tx.connection.cursor()
            cur.executemany(query, rows)
            return cur.rowcount

        return self.run_transaction(
            body, timeout=timeout, attempts=None if idempotent else 1, _is_write=True
        )

    def _run(
        self, mode: int, query: Query, params: Params, timeout: float | None, idempotent: bool
    ) -> Any:
        core = self._core
        deadline = core.deadline_for(timeout)
        if not core.fast_path:
            self._wait_until_usable(deadline)
        core.unbilled_requests += 1
        self._inflight += 1
        attempt = 1
        try:
            while True:
                started = monotonic()
                conn = self._acquire(deadline, started)
                try:
                    result = self._statement(conn, mode, query, params, deadline)
                except Exception as exc:
                    self._release(conn)
                    kind = _failure_kind(core, exc)
                    ctx = RetryContext(
                        is_write=_is_write(query), idempotent=idempotent, in_transaction=False
                    )
                    self._back_off(exc, kind, ctx, attempt, deadline, "query")
                    attempt += 1
                    continue
                finished = monotonic()
                conn.last_used = finished
                self._release(conn)
                core.tracker.query(finished - started)
                if finished - started > self.settings.slow_query_threshold:
                    core.on_slow_query(query, finished - started)
                return result
        finally:
            self._inflight -= 1

    def _statement(
        self,
        conn: PgwConnection,
        mode: int,
        query: Query,
        params: Params,
        deadline: float | None,
    ) -> Any:
        if deadline is None:
            cur = conn.cursor(row_factory=tuple_row) if mode == _VALUE else conn.cursor()
            cur.execute(query, params)
            return _result(cur, mode)
        # Bound the statement on both sides: the server cancels it when the
        # time left runs out, and the watchdog severs the socket shortly after
        # in case the server cannot answer at all (a blackholed network).
        token = self._watchdog.arm(deadline + SEVER_GRACE, sever, conn.fileno())
        if _is_write(query):
            try:
                return self._write_in_transaction(conn, mode, query, params, deadline)
            finally:
                self._watchdog.disarm(token)
        try:
            ms = statement_timeout_ms(deadline - monotonic())
            cur = conn.cursor(row_factory=tuple_row) if mode == _VALUE else conn.cursor()
            # One pipelined round trip: a transaction-local timeout leaves no
            # session state behind (safe behind PgBouncer). If the statement
            # fails the COMMIT is skipped and the pool rolls the connection back.
            try:
                with conn.pipeline():
                    conn.execute(b"BEGIN")
                    conn.execute(_SET_TIMEOUT, (str(ms),))
                    cur.execute(query, params)
                    conn.execute(b"COMMIT")
            except psycopg.Error as exc:
                if (conn.broken or conn.closed) and sqlstate_of(exc) is None:
                    # Leaving pipeline mode on a dead connection raises its own
                    # errors ("cannot exit pipeline mode while busy"); what
                    # happened is that the connection was lost mid-statement.
                    raise psycopg.OperationalError(
                        f"connection is lost during a pipelined statement ({exc})"
                    ) from exc
                raise
            return _result(cur, mode)
        finally:
            self._watchdog.disarm(token)

    def _write_in_transaction(
        self,
        conn: PgwConnection,
        mode: int,
        query: Query,
        params: Params,
        deadline: float,
    ) -> Any:
        """A write under a deadline, in an explicit transaction whose fate is knowable.

        A lost connection before COMMIT means nothing committed (safe to re-run);
        a lost COMMIT is resolved by txid. Costs three round trips instead of the
        read path's one pipelined trip; a blind retry of a write costs more.
        """
        ms = statement_timeout_ms(deadline - monotonic())
        begin = f"BEGIN; SET LOCAL statement_timeout = {ms}; {_MARKER_QUERY}".encode()
        try:
            cur = conn.execute(begin)
            while cur.nextset():
                pass  # the last result set holds the marker
            marker = _marker(cur.fetchone())
            stmt = conn.cursor(row_factory=tuple_row) if mode == _VALUE else conn.cursor()
            stmt.execute(query, params)
            result = _result(stmt, mode)
        except psycopg.OperationalError as exc:
            if (conn.broken or conn.closed) and sqlstate_of(exc) is None:
                raise _NotCommitted(
                    f"connection lost before COMMIT; nothing was committed ({exc})"
                ) from exc
            raise
        self._commit(conn, readonly=False, marker=marker)
        return result

    # --- connections ---------------------------------------------------------------------------
    def _wait_until_usable(self, deadline: float | None) -> None:
        """The slow path before a call: refuse when closing, wait for readiness."""
        core = self._core
        core.check_accepting()
        if core.state in (State.NEW, State.WARMING):
            remaining = None if deadline is None else max(0.001, deadline - monotonic())
            timeout = (
                remaining
                if remaining is not None and remaining < self.settings.ready_timeout
                else None
            )
            self.ready(timeout)

    def _pool_or_closed(self) -> PgwPool:
        pool = self._pool
        if pool is None:
            raise HandleClosed(f"the database handle for {self.settings.safe_url} is not open")
        return pool

    def _acquire(self, deadline: float | None, now: float) -> PgwConnection:
        """A connection that is usable as far as can be known without sending SQL."""
        core = self._core
        if not core.fast_path:
            self._admit(deadline)
            wanted = core.wanted_limit(now)
            if wanted is not None:
                self._apply_limit(wanted)
        pool = self._pool
        if pool is None:
            pool = self._pool_or_closed()
        if core.gap.observe(now, time()):
            # A long pause (frozen serverless instance): check every idle
            # connection in one pass before handing any out.
            self._check_pool()
        window = self.settings.validation_window
        for _ in range(self.settings.max_size + 2):
            conn = self._getconn(pool, deadline, now)
            last_used = conn.last_used
            fresh = last_used == 0.0 or not needs_validation(monotonic() - last_used, window)
            if fresh and not has_pending_input(conn):
                return conn
            # Idle past the window, or the server already said something (it
            # ended the session): a cheap round trip tells before any SQL is sent.
            try:
                conn.execute("")
            except psycopg.Error:
                core.tracker.connection_closed("broken")
                self._release(conn)
                spawn(self._check_pool)
                continue
            return conn
        raise psycopg.OperationalError("no usable connection: every pooled connection was stale")

    def _getconn(self, pool: PgwPool, deadline: float | None, started: float) -> PgwConnection:
        """`pool.getconn` in slices, so a breaker that opens meanwhile ends the wait."""
        core = self._core
        limit = self.settings.acquire_timeout
        end = started + limit if deadline is None else min(deadline, started + limit)
        while True:
            left = end - monotonic()
            if left <= 0:
                if deadline is not None and deadline <= end:
                    raise core.deadline_error(core.last_connect_error, "acquire")
                raise PoolTimeout(
                    f"no connection within {monotonic() - started:.2f}s"
                    + (
                        f"; last connect error: {core.describe_error(core.last_connect_error)}"
                        if core.last_connect_error is not None
                        else ""
                    )
                )
            try:
                conn = pool.getconn(left if left < 0.25 else 0.25)
            except PoolTimeout:
                self._admit(deadline)
                continue
            core.tracker.acquire(monotonic() - started)
            return conn

    def _admit(self, deadline: float | None) -> None:
        """Pass the breaker, waiting for its next probe if the deadline allows."""
        core = self._core
        while True:
            try:
                is_probe = core.admit()
            except DatabaseUnavailable as err:
                wait = err.retry_after or 0.0
                if deadline is None or monotonic() + wait >= deadline:
                    raise
                sleep(wait + 0.001)
                continue
            if not is_probe:
                return
            try:
                conn = self._connect_direct(monotonic() + self.settings.connect_timeout)
            except (psycopg.Error, OSError) as exc:
                core.on_connect_failed(exc)
                continue
            except BaseException:
                core.breaker.abandon_probe(monotonic())
                raise
            self._pool_or_closed().adopt(conn)
            return

    def _release(self, conn: PgwConnection) -> None:
        pool = self._pool
        if pool is None:
            conn.close()
            return
        pool.putconn(conn)

    def _back_off(
        self,
        exc: Exception,
        kind: FailureKind,
        ctx: RetryContext,
        attempt: int,
        deadline: float | None,
        operation: str,
        policy: RetryPolicy | None = None,
    ) -> None:
        """After failed attempt *attempt*: housekeeping, then sleep before the next
        one, or raise (*exc* itself, or `DeadlineExceeded` from it) when not retrying."""
        plan = self._core.plan_retry(
            exc, kind, ctx, attempt=attempt, deadline=deadline, operation=operation, policy=policy
        )
        self._after_failure(kind)
        if plan is None:
            raise exc
        if isinstance(plan, BaseException):
            raise plan from exc
        sleep(plan)

    def _after_failure(self, kind: FailureKind) -> None:
        """Housekeeping after a failed attempt, whether or not it is retried."""
        if kind in (FailureKind.STALE, FailureKind.LOST, FailureKind.LOST_COMMIT):
            # One broken connection usually means a restart or a failover:
            # check the idle ones now rather than fail on them one by one.
            if not self._checker.running:
                logger.info(
                    "connection lost (%s): checking idle connections, reconnecting",
                    kind.value,
                    extra={"event": "reconnect", "reason": kind.value},
                )
            self._check_pool()
        elif kind is FailureKind.FAILOVER:
            self._drain_for_failover()

    def _check_pool(self) -> None:
        pool = self._pool
        if pool is not None and not pool.closed:
            self._checker.run(pool.check)

    def _drain_for_failover(self) -> None:
        pool = self._pool
        if pool is None:
            return
        logger.warning(
            "server is read-only (failover): draining every connection and reconnecting",
            extra={"event": "reconnect", "reason": "failover"},
        )
        pool.failover_drain = True
        try:
            pool.drain()
        finally:
            pool.failover_drain = False

    def _apply_limit(self, wanted: int) -> None:
        with self._resize_lock:
            pool = self._pool
            if pool is None or self._core.applied_limit == wanted:
                return
            pool.resize(min(self.settings.min_size, wanted), wanted)
            self._core.applied_limit = wanted
            self._core.refresh_fast_path()

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
        the whole body on conflicts and lost connections.
        """
        deadline = self._core.deadline_for(timeout)
        with self._begin(isolation, readonly, deadline) as tx:
            yield tx

    def run_transaction(
        self,
        fn: Callable[[Transaction], T],
        *,
        isolation: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        attempts: int | None = None,
        _is_write: bool = True,
    ) -> T:
        """Run ``fn(tx)`` in a transaction, re-running the whole function on
        serialization failures and deadlocks (40001, 40P01), on a connection lost
        before COMMIT, and on a COMMIT whose loss resolved as aborted.

        *attempts* defaults to ``max(retry_attempts, 5)``: conflicts are expected
        under contention. Every re-run is inside the deadline and the retry budget.
        """
        core = self._core
        deadline = core.deadline_for(timeout)
        limit = attempts if attempts is not None else max(self.settings.retry_attempts, 5)
        policy = dataclasses.replace(core.retry_policy, attempts=limit)
        attempt = 1
        while True:
            try:
                with self._begin(isolation, readonly, deadline) as tx:
                    result = fn(tx)
                return result
            except Exception as exc:
                kind = _failure_kind(core, exc)
                ctx = RetryContext(is_write=_is_write, idempotent=True, in_transaction=True)
                self._back_off(exc, kind, ctx, attempt, deadline, "transaction", policy)
                attempt += 1

    @contextmanager
    def _begin(
        self, isolation: str | None, readonly: bool, deadline: float | None
    ) -> Iterator[Transaction]:
        core = self._core
        if isolation not in _ISOLATION:
            raise ValueError(
                f"isolation must be one of {sorted(k for k in _ISOLATION if k)}, not {isolation!r}"
            )
        if not core.fast_path:
            self._wait_until_usable(deadline)
        core.unbilled_requests += 1
        begin = "BEGIN" + _ISOLATION[isolation] + (" READ ONLY" if readonly else "")
        if deadline is not None:
            begin += (
                f"; SET LOCAL statement_timeout = {statement_timeout_ms(deadline - monotonic())}"
            )
        conn = self._begin_on_fresh_connection(begin, deadline)
        token = None
        if deadline is not None:
            token = self._watchdog.arm(deadline + SEVER_GRACE, sever, conn.fileno())
        leak = self._watch_for_leak()
        self._inflight += 1
        tx = Transaction(conn)
        try:
            try:
                yield tx
            except BaseException:
                _rollback_quietly(conn)
                raise
            self._commit(conn, readonly=readonly)
        finally:
            self._inflight -= 1
            self._watchdog.disarm(leak)
            if token is not None:
                self._watchdog.disarm(token)
            conn.last_used = monotonic()
            self._release(conn)

    def _begin_on_fresh_connection(self, begin: str, deadline: float | None) -> PgwConnection:
        """Acquire and BEGIN, retrying failures that happen before anything ran."""
        core = self._core
        attempt = 1
        while True:
            conn = self._acquire(deadline, monotonic())
            try:
                conn.execute(begin.encode())
                return conn
            except Exception as exc:
                self._release(conn)
                kind = core.classify_failure(exc, Phase.FIRST_USE, in_transaction=False)
                ctx = RetryContext(is_write=False, idempotent=False, in_transaction=False)
                self._back_off(exc, kind, ctx, attempt, deadline, "BEGIN")
                attempt += 1

    def _commit(
        self, conn: PgwConnection, *, readonly: bool, marker: _TxMarker | None = None
    ) -> None:
        """COMMIT; if the connection is lost meanwhile, resolve the outcome by txid.

        *marker* is the transaction's id and server start time when the caller
        already fetched them.
        """
        resolve = self.settings.resolve_commits and not readonly
        if resolve and marker is None:
            # txid NULL when the transaction wrote nothing: nothing to resolve then.
            cur = conn.execute(_MARKER_IF_ASSIGNED)
            marker = _marker(cur.fetchone())
        try:
            conn.execute(b"COMMIT")
        except psycopg.OperationalError as exc:
            if not conn.broken and not conn.closed:
                raise  # a server-side commit failure (e.g. deferred constraint): not ambiguous
            if readonly:
                return  # a read-only transaction changed nothing; its fate does not matter
            self._resolve_commit(exc, marker, resolve=resolve)

    def _resolve_commit(
        self, exc: psycopg.OperationalError, marker: _TxMarker | None, *, resolve: bool
    ) -> None:
        core = self._core
        if not resolve:
            core.tracker.ambiguous_commit("unknown")
            raise AmbiguousCommitError(
                "connection lost during COMMIT and commit resolution is off; "
                f"the outcome is unknown ({core.describe_error(exc)})"
            ) from exc
        if marker is None or marker[0] is None:
            # Nothing was written, so there is nothing whose fate is unknown.
            core.tracker.ambiguous_commit("committed")
            return
        txid, started = marker
        status = None
        give_up_at = monotonic() + max(self.settings.connect_timeout, 2.0)
        while monotonic() < give_up_at:
            try:
                row = self.fetchrow(_RESOLVE, (txid,), timeout=give_up_at - monotonic())
            except Exception:
                row = None
            status = None if row is None else row["status"]
            if status == "committed" and row is not None and row["started"] != started:
                # The server restarted since the txid was assigned. After a
                # crash, an id whose transaction never reached the WAL is handed
                # out again, so "committed" may describe someone else's work.
                # "aborted" stays trustworthy: a durable commit keeps its id.
                status = "unknown"
                break
            if status in ("committed", "aborted"):
                break
            # 'in progress': the old backend has not finished; ask again shortly.
            sleep(0.05)
        if status == "committed":
            core.tracker.ambiguous_commit("committed")
            logger.warning(
                "connection lost during COMMIT; resolved by txid: committed",
                extra={"event": "ambiguous_commit", "outcome": "committed"},
            )
            return
        if status == "aborted":
            core.tracker.ambiguous_commit("aborted")
            logger.warning(
                "connection lost during COMMIT; resolved by txid: aborted",
                extra={"event": "ambiguous_commit", "outcome": "aborted"},
            )
            raise _NotCommitted(
                f"connection lost during COMMIT; the transaction was rolled back "
                f"({core.describe_error(exc)})"
            ) from exc
        core.tracker.ambiguous_commit("unknown")
        raise AmbiguousCommitError(
            f"connection lost during COMMIT and txid {txid} could not be resolved "
            f"({core.describe_error(exc)})",
            txid=txid,
        ) from exc

    # --- escape hatch --------------------------------------------------------------------------
    @contextmanager
    def connection(self, *, timeout: float | None = None) -> Iterator[Any]:
        """The raw psycopg connection (autocommit, dict rows), returned to the pool after.

        No retries happen inside; leave it in autocommit or end your transaction.
        """
        deadline = self._core.deadline_for(timeout)
        if not self._core.fast_path:
            self._wait_until_usable(deadline)
        conn = self._acquire(deadline, monotonic())
        leak = self._watch_for_leak()
        self._inflight += 1
        try:
            yield conn
        finally:
            self._inflight -= 1
            self._watchdog.disarm(leak)
            conn.last_used = monotonic()
            self._release(conn)

    def _watch_for_leak(self) -> Any:
        """Report once if the caller holds this connection past ``leak_threshold``."""
        now = monotonic()
        return self._watchdog.arm(
            now + self.settings.leak_threshold, self._core.on_leak, call_site(), now
        )

    # --- health, stats, shutdown ---------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """A health report (ok, state, breaker, latency, error, pool), from one real
        round trip. Cached for ``health_interval`` and single-flight, so a busy
        health endpoint costs the database at most one query per interval."""
        cached = self._health_cache
        if cached is not None and monotonic() - cached[0] < self.settings.health_interval:
            return cached[1]
        return self._health_flight.run(self._check_health)

    def _check_health(self) -> dict[str, Any]:
        started = monotonic()
        error: BaseException | None = None
        try:
            self.fetchval("SELECT 1", timeout=self.settings.connect_timeout)
        except Exception as exc:
            error = exc
        pool = self._pool
        report = self._core.health_report(
            error is None, monotonic() - started, error, pool.get_stats() if pool else None
        )
        self._health_cache = (monotonic(), report)
        return report

    def stats(self) -> dict[str, Any]:
        """A plain-dict snapshot of every gauge, counter and histogram."""
        pool = self._pool
        snap = self._core.stats(pool.get_stats() if pool is not None else None)
        snap["in_flight"] = self._inflight
        return snap

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, wait up to *timeout* for work in flight, then close."""
        core = self._core
        if core.state is State.CLOSED:
            return
        if core.state is not State.CLOSING:
            core.fire(Event.CLOSE_REQUESTED)
        give_up_at = monotonic() + timeout
        while self._inflight > 0 and monotonic() < give_up_at:
            sleep(0.01)
        pool = self._pool
        if pool is not None:
            pool.close(timeout=max(0.0, give_up_at - monotonic()))
        self._watchdog.close()
        core.try_fire(Event.CLOSED)  # a concurrent close() may have finished first
        logger.info(
            "closed (%d operation(s) still in flight were cut off)",
            self._inflight,
            extra={"event": "closed", "cut_off": self._inflight},
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
        return self._core.add_tracker(tracker)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's pool without touching its sockets.

        The tracker (and any exporter attached to it) is kept; its counters
        include the parent's history up to the fork.
        """
        self._core = HandleCore(self.settings, self._core.tracker)
        self._pool = None
        self._warmup = SingleFlight()
        self._checker = SingleFlight()
        self._resize_lock = Lock()
        self._watchdog = Watchdog()
        self._inflight = 0
        self._health_flight = SingleFlight()
        self._health_cache = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Transaction:
    """Statements inside one transaction. Never retried one by one."""

    __slots__ = ("connection",)

    def __init__(self, connection: PgwConnection) -> None:
        self.connection = connection

    def fetch(self, query: Query, params: Params = None) -> list[dict[str, Any]]:
        cur = self.connection.execute(query, params)
        return cur.fetchall()

    def fetchrow(self, query: Query, params: Params = None) -> dict[str, Any] | None:
        cur = self.connection.execute(query, params)
        return cur.fetchone()

    def fetchval(self, query: Query, params: Params = None) -> Any:
        cur = self.connection.cursor(row_factory=tuple_row)
        cur.execute(query, params)
        row = cur.fetchone()
        return None if row is None else row[0]

    def execute(self, query: Query, params: Params = None) -> int:
        cur = self.connection.execute(query, params)
        return cur.rowcount

    def executemany(self, query: Query, params_seq: Iterable[ManyParams]) -> int:
        cur = self.connection.cursor()
        cur.executemany(query, params_seq)
        return cur.rowcount


class _NotCommitted(psycopg.OperationalError):
    """The connection was lost, and the work certainly did not commit: COMMIT was
    never sent, or txid_status() says the transaction aborted. Safe to re-run."""


_SET_TIMEOUT = b"SELECT set_config('statement_timeout', %s, true)"

# What identifies a transaction for commit resolution: its id, and the server's
# start time (an id seen before a crash restart may be handed out again).
_TxMarker = tuple[int | None, Any]
_MARKER_QUERY = "SELECT txid_current() AS txid, pg_postmaster_start_time() AS started"
_MARKER_IF_ASSIGNED = (
    b"SELECT txid_current_if_assigned() AS txid, pg_postmaster_start_time() AS started"
)
_RESOLVE = "SELECT txid_status(%s) AS status, pg_postmaster_start_time() AS started"


def _marker(row: dict[str, Any] | None) -> _TxMarker | None:
    return None if row is None else (row["txid"], row["started"])


def _result(cur: Any, mode: int) -> Any:
    if mode == _ROWS:
        return cur.fetchall()
    if mode == _ROW:
        return cur.fetchone()
    if mode == _VALUE:
        row = cur.fetchone()
        return None if row is None else row[0]
    return cur.rowcount


def _rollback_quietly(conn: PgwConnection) -> None:
    if conn.closed or conn.broken:
        return
    # On failure the pool discards a connection left in a bad state.
    with contextlib.suppress(psycopg.Error):
        conn.execute(b"ROLLBACK")


def _looks_like_pgbouncer(conn: PgwConnection) -> bool:
    """True when a pooler sits between us and PostgreSQL.

    The client learns a backend pid from BackendKeyData at startup. PostgreSQL
    sends its own pid; PgBouncer sends a made-up key of its own, so it differs
    from what ``pg_backend_pid()`` returns on the server that runs the query.
    """
    cur = conn.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    server_pid = None if row is None else next(iter(row.values()))
    return bool(server_pid is not None and server_pid != conn.info.backend_pid)


def _is_write(query: Query) -> bool:
    if isinstance(query, str):
        return is_write_sql(query)
    if isinstance(query, bytes):
        return is_write_sql(query.decode(errors="replace"))
    return True  # a composed query: assume the worst


def _failure_kind(core: HandleCore, exc: BaseException) -> FailureKind:
    if isinstance(exc, _NotCommitted):
        return FailureKind.NOTHING_RAN
    return core.classify_failure(exc, Phase.STATEMENT, in_transaction=False)


def _permanent_cause(exc: BaseException, core: HandleCore) -> BaseException:
    """The psycopg error with secrets redacted from its text, for ``__cause__``."""
    return type(exc)(core.describe_error(exc)) if isinstance(exc, psycopg.Error) else exc
