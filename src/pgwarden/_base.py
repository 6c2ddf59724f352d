"""What the async and sync handles share: every decision, none of the I/O.

`HandleCore` owns the pure policies (lifecycle, breaker, retry policy and
budget, adaptive limit, gap detector) and the bookkeeping around them. The
shells in ``_async/database.py`` and ``_sync/database.py`` (the latter
generated from the former) only perform I/O and ask this class what to do.

Theory of operation of one call::

    deadline = core.deadline_for(timeout)        # contextvar, per-call, default
    ensure ready (single-flight warmup)          # the "warmup guard"
    loop:
        core.admit()                             # breaker: fail fast when open
        acquire -> validate if idle > window      # stale connections never reach SQL
        execute (statement_timeout <= time left)
        on error: core.plan_retry(...)           # classify; retry only what is safe
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from time import monotonic
from typing import Any

from pgwarden._redact import redact, sanitize_sql
from pgwarden.core.breaker import Admission, BreakerState, CircuitBreaker
from pgwarden.core.classify import (
    FailureKind,
    Phase,
    RetryContext,
    classify,
    is_retryable,
    is_transaction_retryable,
    sqlstate_of,
)
from pgwarden.core.deadline import current_deadline, effective_deadline
from pgwarden.core.hygiene import GapDetector, jittered_lifetime
from pgwarden.core.lifecycle import Event, Lifecycle, State
from pgwarden.core.metrics import MetricsTracker, NoopTracker, StatsTracker, pool_gauges
from pgwarden.core.retry import RetryBudget, RetryPolicy
from pgwarden.core.sizing import AdaptiveLimit
from pgwarden.errors import DatabaseUnavailable, DeadlineExceeded, HandleClosed, NotReady
from pgwarden.settings import Settings

logger = logging.getLogger("pgwarden")

# A statement the server itself aborted by terminating the backend (admin or
# crash shutdown) never committed, even in autocommit: PostgreSQL commits an
# implicit transaction only at Sync, after which ReadyForQuery would have
# reached us first. So a write that failed this way is safe to re-run.
SERVER_ABORTED_SQLSTATES = frozenset({"57P01", "57P02"})

# Extra time past the deadline before the client severs a connection whose
# server stopped answering (blackhole). The server-side statement_timeout,
# set to the time left, normally ends the statement first and cleanly.
SEVER_GRACE = 0.05

# Below this much time left, another attempt cannot succeed; report the deadline.
MIN_ATTEMPT_SECONDS = 0.02

# With a deadline, the deadline bounds retries (and the budget bounds their
# rate); this cap only guards against a pathological loop.
DEADLINE_ATTEMPTS_CAP = 100


class HandleCore:
    """Policies and counters of one database handle; no I/O, no awaits."""

    def __init__(self, settings: Settings, tracker: MetricsTracker | None = None) -> None:
        if not settings.url:
            # libpq would fall back to PG* environment variables and a local
            # socket; that is legitimate, so an empty URL is allowed.
            pass
        self.settings = settings
        self.tracker: MetricsTracker = tracker or (
            StatsTracker() if settings.metrics else NoopTracker()
        )
        self.lifecycle = Lifecycle()
        self.breaker = CircuitBreaker(
            threshold=settings.breaker_threshold,
            cooldown=settings.breaker_cooldown,
            max_cooldown=settings.breaker_max_cooldown,
            min_outage=settings.breaker_min_outage,
        )
        self.retry_policy = RetryPolicy(
            attempts=settings.retry_attempts,
            base_delay=settings.retry_base_delay,
            max_delay=settings.retry_max_delay,
        )
        # A caller with a deadline has said how long it will wait: retries run
        # until the deadline (at the budget's rate), not to a fixed count.
        self.deadline_policy = dataclasses.replace(
            self.retry_policy, attempts=DEADLINE_ATTEMPTS_CAP
        )
        self.budget = RetryBudget(
            ratio=settings.retry_budget_ratio, min_per_second=settings.retry_budget_floor
        )
        self.limit = AdaptiveLimit(settings.max_size, quiet_period=settings.sizing_quiet_period)
        self.gap = GapDetector(threshold=settings.gap_threshold)
        self.rng = random.Random()
        self.max_lifetime = jittered_lifetime(
            settings.max_lifetime, settings.lifetime_jitter, self.rng.random()
        )
        self.pgbouncer = settings.pgbouncer == "on"
        self.last_connect_error: BaseException | None = None
        self.warmup_seconds: float | None = None
        self.failover_drains = 0
        self.draining_for_failover = False
        self.pid = os.getpid()
        self._password = _password_of(settings.url)
        self.applied_limit = settings.max_size
        # Requests not yet credited to the retry budget (settled lazily, so the
        # hot path only increments an integer).
        self.unbilled_requests = 0
        # True while nothing needs attention: READY, breaker closed, pool limit
        # at its configured maximum. The hot path checks only this flag.
        self.fast_path = False

    def refresh_fast_path(self) -> None:
        self.fast_path = (
            self.lifecycle.state is State.READY
            and self.breaker.state is BreakerState.CLOSED
            and self.limit.limit == self.applied_limit == self.settings.max_size
        )

    def fire(self, event: Event) -> State:
        """Fire a lifecycle event (raising on an illegal one) and refresh the fast path."""
        state = self.lifecycle.fire(event)
        self.refresh_fast_path()
        return state

    def try_fire(self, event: Event) -> State | None:
        state = self.lifecycle.try_fire(event)
        self.refresh_fast_path()
        return state

    def settle_budget(self, now: float) -> None:
        count, self.unbilled_requests = self.unbilled_requests, 0
        self.budget.on_requests(count, now)

    def add_tracker(self, extra: MetricsTracker) -> Callable[[], None]:
        """Report every metrics event to *extra* too; ``stats()`` keeps its shape.

        Returns ``remove()``, which detaches *extra* again if nothing else was
        attached after it.
        """
        from pgwarden.core.metrics import TeeTracker

        current = self.tracker
        tee = TeeTracker(current, extra)
        self.tracker = tee

        def remove() -> None:
            if self.tracker is tee:
                self.tracker = current

        return remove

    # --- configuration for psycopg / psycopg_pool ----------------------------------------------
    @property
    def conninfo(self) -> str:
        return self.settings.url or ""

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every new psycopg connection."""
        s = self.settings
        from psycopg.rows import dict_row

        return {
            "autocommit": True,
            "row_factory": dict_row,
            "prepare_threshold": None if self.pgbouncer else s.prepare_threshold,
            "connect_timeout": max(1, math.ceil(s.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": s.keepalives_idle,
            "keepalives_interval": s.keepalives_interval,
            "keepalives_count": s.keepalives_count,
            "tcp_user_timeout": s.tcp_user_timeout,
            "application_name": s.application_name,
        }

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the psycopg_pool pool (besides conninfo and kwargs)."""
        s = self.settings
        return {
            "min_size": s.min_size,
            "max_size": self.limit.limit,
            "timeout": s.acquire_timeout,
            "max_lifetime": self.max_lifetime,
            "max_idle": s.max_idle,
            # The pool keeps reconnecting in the background for this long after
            # an outage; the breaker decides whether callers wait for it.
            "reconnect_timeout": max(s.ready_timeout, 60.0),
            "name": f"pgwarden-{os.getpid()}",
        }

    # --- secrets -------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return redact(text, self._password)

    def describe_error(self, exc: BaseException) -> str:
        return self.redact(f"{type(exc).__name__}: {exc}".strip())

    # --- lifecycle -----------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.lifecycle.state

    def check_accepting(self) -> None:
        if self.lifecycle.state in (State.CLOSING, State.CLOSED):
            raise HandleClosed(
                f"the database handle for {self.settings.safe_url} is "
                f"{self.lifecycle.state.value.lower()}: it accepts no new work"
            )

    def deadline_for(self, timeout: float | None) -> float | None:
        """The absolute (monotonic) deadline of a call with per-call *timeout*."""
        if timeout is None and self.settings.default_timeout is None:
            ctx = current_deadline()
            return None if ctx is None else ctx.expires_at
        return effective_deadline(monotonic(), timeout, self.settings.default_timeout)

    # --- pool observer callbacks ---------------------------------------------------------------
    def on_connect_ok(self, setup_seconds: float) -> None:
        self.tracker.connection_opened(setup_seconds)
        before = self.breaker.state
        self._breaker_event(before, self.breaker.on_success(monotonic()))

    def on_connect_failed(self, exc: BaseException, *, feed_breaker: bool = True) -> FailureKind:
        """Record a failed connection attempt (pool growth, breaker probe, warmup).

        The warmup passes ``feed_breaker=False``: it is already the single
        shared attempt, bounded by ``ready_timeout``, so it needs no breaker.
        """
        kind = classify(exc, Phase.CONNECT)
        self.last_connect_error = exc
        self.tracker.connect_failed(kind.value)
        now = monotonic()
        if kind is FailureKind.OVERLOAD:
            self.on_overload(now)
        # Overload is not an outage: the server is up and says "fewer, please".
        # AIMD sizing answers it; opening the breaker would fail callers that a
        # connection freed a moment later could serve.
        if feed_breaker and kind is FailureKind.NOTHING_RAN:
            before = self.breaker.state
            self._breaker_event(before, self.breaker.on_failure(now))
        return kind

    def on_overload(self, now: float) -> None:
        self.tracker.overload()
        if self.lifecycle.state is State.READY:
            self.try_fire(Event.FAULT_OBSERVED)
        if not self.settings.adaptive_sizing:
            return
        new_limit = self.limit.on_overload(now)
        self.refresh_fast_path()
        if new_limit is not None:
            self.tracker.limit_changed(new_limit)
            logger.warning(
                "server overloaded (too many connections): local pool limit lowered to %d",
                new_limit,
                extra={"event": "overload", "pool_limit": new_limit},
            )

    def wanted_limit(self, now: float) -> int | None:
        """The pool limit to apply now, if it differs from the applied one."""
        if self.settings.adaptive_sizing and self.limit.limit < self.settings.max_size:
            grown = self.limit.tick(now)
            self.refresh_fast_path()
            if grown is not None:
                self.tracker.limit_changed(grown)
        wanted = self.limit.limit
        if wanted >= self.settings.max_size and self.lifecycle.state is State.DEGRADED:
            self.try_fire(Event.RECOVERED)
        return None if wanted == self.applied_limit else wanted

    def _breaker_event(self, before: BreakerState, new_state: BreakerState | None) -> None:
        if new_state is None or new_state is before:
            return
        self.tracker.breaker_transition(before.value, new_state.value)
        cause = self.describe_error(self.last_connect_error) if self.last_connect_error else ""
        logger.warning(
            "circuit breaker %s -> %s%s",
            before.value,
            new_state.value,
            f" ({cause})" if new_state is BreakerState.OPEN and cause else "",
            extra={"event": "breaker", "from": before.value, "to": new_state.value},
        )
        if new_state is BreakerState.CLOSED and self.settings.adaptive_sizing:
            # Ramp capacity back up instead of reconnecting everything at once.
            start = max(1, self.settings.max_size // 4)
            self.limit.ramp_from(start, monotonic())
        self._sync_lifecycle_with_breaker(new_state)
        self.refresh_fast_path()

    def _sync_lifecycle_with_breaker(self, new_state: BreakerState) -> None:
        state = self.lifecycle.state
        # While WARMING the warmup owns the state; it does not feed the breaker.
        if new_state is BreakerState.OPEN and state in (State.READY, State.DEGRADED):
            self.try_fire(Event.BREAKER_OPENED)
        elif new_state is BreakerState.CLOSED and state is State.OPEN:
            self.try_fire(Event.BREAKER_CLOSED)

    # --- admission -----------------------------------------------------------------------------
    def admit(self) -> bool:
        """Ask the breaker; raise `DatabaseUnavailable` when it is open.

        Returns True when this caller is the single half-open probe.
        """
        if self.breaker.state is BreakerState.CLOSED:
            return False
        now = monotonic()
        verdict = self.breaker.admit(now)
        if verdict is Admission.ALLOW:
            return False
        if verdict is Admission.PROBE:
            return True
        error = DatabaseUnavailable(
            f"database at {self.settings.safe_url} is unavailable (circuit open after "
            f"repeated connection failures; next probe in {self.breaker.retry_after(now):.2f}s)",
            retry_after=self.breaker.retry_after(now),
        )
        if self.last_connect_error is not None:
            error.__cause__ = _RedactedCause(self.describe_error(self.last_connect_error))
        raise error

    # --- retries -------------------------------------------------------------------------------
    def classify_failure(
        self, exc: BaseException, phase: Phase, *, in_transaction: bool
    ) -> FailureKind:
        kind = classify(exc, phase)
        if (
            kind is FailureKind.LOST
            and not in_transaction
            and sqlstate_of(exc) in SERVER_ABORTED_SQLSTATES
        ):
            kind = FailureKind.STALE
        return kind

    def plan_retry(
        self,
        exc: BaseException,
        kind: FailureKind,
        ctx: RetryContext,
        *,
        attempt: int,
        deadline: float | None,
        operation: str,
        policy: RetryPolicy | None = None,
    ) -> float | BaseException | None:
        """Decide what follows a failed attempt.

        ``ctx.in_transaction`` asks whether a whole transaction function may be
        re-run (`run_transaction`), not a statement inside one. Returns the
        seconds to sleep before the next attempt; or an exception
        the caller raises ``from exc``; or None, meaning re-raise *exc* as is
        (permanent errors keep their psycopg type).
        """
        self.tracker.query_error(kind.value)
        now = monotonic()
        if kind is FailureKind.OVERLOAD:
            self.on_overload(now)
        if kind is FailureKind.TIMEOUT and deadline is not None and now >= deadline - 0.01:
            return self.deadline_error(exc, operation)
        if ctx.in_transaction:
            retryable = is_transaction_retryable(kind)
        else:
            retryable = is_retryable(kind, ctx)
        if not retryable:
            if deadline is not None and now >= deadline:
                return self.deadline_error(exc, operation)
            return None
        if policy is None:
            policy = self.retry_policy if deadline is None else self.deadline_policy
        if attempt >= policy.attempts:
            return None
        delay = policy.backoff(attempt, self.rng.random())
        if deadline is not None:
            left = deadline - now
            if left < MIN_ATTEMPT_SECONDS:
                return self.deadline_error(exc, operation)
            # Never sleep past the deadline: keep half of what is left for the attempt.
            delay = min(delay, left / 2)
        self.settle_budget(now)
        if not self.budget.try_spend(now):
            logger.warning(
                "retry budget exhausted: not retrying %s after %s",
                operation,
                kind.value,
                extra={"event": "retry_budget_exhausted", "reason": kind.value},
            )
            return None
        self.tracker.retry(kind.value, attempt)
        logger.info(
            "retrying %s (attempt %d of %d) after %s: %s",
            operation,
            attempt + 1,
            policy.attempts,
            kind.value,
            self.describe_error(exc),
            extra={"event": "retry", "reason": kind.value, "attempt": attempt + 1},
        )
        return delay

    def deadline_error(self, exc: BaseException | None, operation: str) -> DeadlineExceeded:
        last = self.describe_error(exc) if exc is not None else "no attempt completed"
        return DeadlineExceeded(f"deadline exceeded during {operation} ({last})", last_error=exc)

    def not_ready_error(self, exc: BaseException | None, elapsed: float) -> NotReady:
        cause = self.describe_error(exc) if exc is not None else "no attempt completed"
        return NotReady(
            f"database at {self.settings.safe_url} not ready after {elapsed:.2f}s: {cause}"
        )

    # --- events --------------------------------------------------------------------------------
    def on_slow_query(self, query: object, seconds: float) -> None:
        self.tracker.slow_query()
        statement = sanitize_sql(query)
        logger.warning(
            "slow query (%.3fs): %s",
            seconds,
            statement,
            extra={"event": "slow_query", "seconds": round(seconds, 6), "statement": statement},
        )

    def on_leak(self, site: str, held_since: float) -> None:
        """A connection has been held past ``leak_threshold`` (reported once per hold)."""
        self.tracker.leaked_connection()
        held = monotonic() - held_since
        logger.warning(
            "connection held for %.1fs (leak threshold %.1fs), acquired at %s",
            held,
            self.settings.leak_threshold,
            site,
            extra={"event": "leak", "held_seconds": round(held, 3), "site": site},
        )

    def health_report(
        self, ok: bool, latency: float, error: BaseException | None, pool: Mapping[str, int] | None
    ) -> dict[str, Any]:
        self.tracker.health_check(ok)
        stats = self.stats(pool)
        return {
            "ok": ok,
            "state": stats["state"],
            "breaker": stats["breaker"],
            "latency_ms": round(latency * 1000, 3),
            "error": None if error is None else self.describe_error(error),
            "pool": stats["pool"],
            "pgbouncer": self.pgbouncer,
        }

    # --- stats ---------------------------------------------------------------------------------
    def stats(self, pool_stats: Mapping[str, int] | None) -> dict[str, Any]:
        """The plain-dict snapshot behind ``db.stats()``."""
        snap = dict(self.tracker.snapshot())
        p = pool_stats or {}
        size = int(p.get("pool_size", 0))
        idle = int(p.get("pool_available", 0))
        gauges: dict[str, Any] = dict(
            pool_gauges(
                size=size,
                idle=idle,
                in_use=max(0, size - idle),
                waiting=int(p.get("requests_waiting", 0)),
                max_size=int(p.get("pool_max", self.limit.limit)),
            )
        )
        gauges["limit"] = self.limit.limit
        gauges["configured_max"] = self.settings.max_size
        gauges["connections_lost"] = int(p.get("connections_lost", 0)) + int(
            p.get("returns_bad", 0)
        )
        snap["pool"] = gauges
        snap["state"] = self.lifecycle.state.value
        snap["breaker"] = self.breaker.state.value
        snap["pgbouncer"] = self.pgbouncer
        snap["warmup_seconds"] = self.warmup_seconds
        self.settle_budget(monotonic())
        snap["retry_budget_tokens"] = round(self.budget.tokens(monotonic()), 3)
        return snap


class _RedactedCause(Exception):
    """Stands in for a cause whose text might carry secrets."""


def _password_of(url: str | None) -> str | None:
    if not url:
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict

        value = conninfo_to_dict(url).get("password")
    except Exception:  # an unparsable URL fails later with a clear message
        return None
    return str(value) if value else None


def call_site() -> str:
    """``file:line in function`` of the first caller outside pgwarden and contextlib."""
    import sys

    frame = sys._getframe(1)
    package_dir = os.path.dirname(__file__)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(package_dir) and "contextlib" not in filename:
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"
