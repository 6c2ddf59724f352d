"""`HandleState`: the one owner of a handle's mutable state, behind one lock.

Lifecycle, circuit breaker, adaptive limit, retry budget and policies, gap
detector, in-flight count, the applied pool limit and the metrics tracker all
live here, and nothing else changes them. The shells (``_async``, and the
generated ``_sync``) ask typed questions (`admit`, `failed`, `wanted_limit`)
and report typed events (`connect_succeeded`, `connect_failed`, `leave`);
they never reach into the parts.

Why one lock, also under asyncio: the sync shell runs on application threads
*and* on psycopg_pool's worker threads (which report connect outcomes), and a
breaker that checks then acts must not be entered twice. An uncontended
``threading.Lock`` costs about 0.1 µs a round trip; a call takes two or three
(`enter`, `leave`, and `admit` off the fast path). Under asyncio it is never
contended and never held across an await.

Log records are collected while the lock is held and written after it is
released, so a slow log handler never holds up another thread.

Theory of operation of one call::

    deadline, explicit = state.deadline_for(timeout)
    state.enter()                                   # in-flight +1, gap check
    if not state.fast_path: wait for readiness; state.admit() (breaker)
    lease = acquire(deadline)                       # every byte under the deadline
    run the statement
    on error: kind, decision = state.failed(...)    # Sleep | Raise | GiveUp
    state.leave(...)                                # metrics, in-flight -1
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from time import monotonic, time
from typing import TYPE_CHECKING, Any, Final

from pgwarden._handle import deferred
from pgwarden._handle.config import password_of
from pgwarden._handle.waits import WaitTimeout
from pgwarden._redact import redact, sanitize_sql
from pgwarden.core.breaker import Admission, BreakerState, CircuitBreaker
from pgwarden.core.deadline import current_deadline, effective_deadline
from pgwarden.core.failures import FailureKind, Phase, RetryContext, sqlstate_of
from pgwarden.core.histogram import Histogram
from pgwarden.core.hygiene import GapDetector, jittered_lifetime
from pgwarden.core.lifecycle import Event, Lifecycle, State, accepts_work
from pgwarden.core.metrics import (
    MetricsTracker,
    NoopTracker,
    StatsTracker,
    TeeTracker,
    pool_gauges,
)
from pgwarden.core.prepared import lost_prepared_statement
from pgwarden.core.retry import Decision, GiveUp, GiveUpReason, RetryBudget, RetryPolicy, Sleep
from pgwarden.core.sizing import AdaptiveLimit, overload_shrinks
from pgwarden.core.sqltext import query_is_write
from pgwarden.errors import (
    DatabaseUnavailable,
    DeadlineExceeded,
    HandleClosed,
    NotReady,
    OutcomeUnknown,
)
from pgwarden.settings import Settings

if TYPE_CHECKING:
    from pgwarden._handle.sql import Query
    from pgwarden.core.classify import classify_failure, server_refused_slots
    from pgwarden.core.fleet import FleetPolicy
else:
    # The classifier's rules are needed by the first failure, not before.
    classify_failure = deferred("pgwarden.core.classify", "classify_failure", globals())
    server_refused_slots = deferred("pgwarden.core.classify", "server_refused_slots", globals())

__all__ = ["DEADLINE_ATTEMPTS_CAP", "HandleState"]

logger = logging.getLogger("pgwarden")

# With a deadline, the deadline bounds retries (and the budget bounds their
# rate); this cap only guards against a pathological loop.
DEADLINE_ATTEMPTS_CAP = 100

# A connect may take this many times the usual connect setup time before it
# counts as failed (clamped to [CONNECT_BOUND_FLOOR, connect_timeout]). While
# the network is silent, an attempt that hangs for connect_timeout would still
# be hanging when the network heals; a bound learnt from this server's own
# connects keeps attempts short, so one starts soon after it heals.
CONNECT_BOUND_FACTOR = 10.0
CONNECT_BOUND_FLOOR = 0.25
# Before any connect succeeded there is nothing to learn from: the first
# attempts (the warmup's) get this long, which covers TLS and SCRAM to a
# remote managed server; the explorer below covers a slower one.
FIRST_CONNECT_BOUND = 1.0
# After short attempts have timed out for this many connect_timeouts in a row,
# one attempt at a time (the "explorer") gets the full connect_timeout, so a
# server that became slow to accept is not refused forever.
EXPLORE_AFTER_TIMEOUTS = 2.0

# Statements learnt to write are remembered up to this many (then no more are
# learnt; each unlearnt one costs one refused read-only attempt per call).
LEARNED_WRITES_MAX = 1024

_LogRecord = tuple[int, str, tuple[Any, ...], dict[str, Any]]

_POOLER_NOTES = {"pgbouncer": " (PgBouncer detected)", "pgpool": " (pgpool-II detected)"}


class HandleState:
    """Policies and counters of one database handle; no I/O, thread-safe.

    *clock* and *rng* are for tests (a fake clock, a seeded generator).
    """

    def __init__(
        self,
        settings: Settings,
        tracker: MetricsTracker | None = None,
        *,
        clock: Callable[[], float] = monotonic,
        wall_clock: Callable[[], float] = time,
        rng: random.Random | None = None,
    ) -> None:
        s = settings
        self.settings = s
        self._lock = threading.Lock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._tracker: MetricsTracker = tracker or (StatsTracker() if s.metrics else NoopTracker())
        self._lifecycle = Lifecycle()
        self._breaker = CircuitBreaker(
            threshold=s.breaker_threshold,
            cooldown=s.breaker_cooldown,
            max_cooldown=s.breaker_max_cooldown,
            min_outage=s.breaker_min_outage,
        )
        #: Statements without an explicit deadline: a fixed number of attempts.
        self.statement_policy = RetryPolicy(
            attempts=s.retry_attempts, base_delay=s.retry_base_delay, max_delay=s.retry_max_delay
        )
        #: A caller with a deadline has said how long it will wait: retries run
        #: until the deadline (at the budget's rate), not to a fixed count.
        self.deadline_policy = self.statement_policy.with_attempts(DEADLINE_ATTEMPTS_CAP)
        #: The warmup retries until ready_timeout; it is the one shared
        #: attempt of every waiter, so it spends no retry budget.
        self.warmup_policy = self.deadline_policy
        self._budget = RetryBudget(ratio=s.retry_budget_ratio, min_per_second=s.retry_budget_floor)
        # Anchor the bucket's clock now: otherwise whichever call reads it first
        # (a stats() scrape, say) would decide when tokens start to trickle in.
        self._budget.tokens(clock())
        self._limit = AdaptiveLimit(s.max_size, quiet_period=s.sizing_quiet_period)
        self._gap = GapDetector(threshold=s.gap_threshold)
        self.max_lifetime = jittered_lifetime(s.max_lifetime, s.lifetime_jitter, self._rng.random())
        self._password = password_of(s.url)
        self._pgbouncer = s.pgbouncer == "on"
        self._pgpool = False
        #: True once a pooler lost one of psycopg's prepared statements (opted in with
        #: ``pooler_prepared_statements``): the pool hands out every connection with
        #: ``prepare_threshold=None`` from then on. Read without the lock.
        self.prepares_off = False
        self._last_connect_error: BaseException | None = None
        self._warmup_seconds: float | None = None
        self._applied_limit = s.max_size
        self._unsettled_requests = 0  # credited to the budget when a retry is considered
        self._inflight = 0
        self._typical_connect: float | None = None
        self._timing_out_since: float | None = None  # consecutive bounded timeouts began
        self._explorer_busy = False
        #: Connections last used before this monotonic time are validated with
        #: a round trip before use (set when the process was frozen).
        self.validate_before = 0.0
        #: True while nothing needs attention: READY, breaker closed, pool limit
        #: at its configured maximum. The hot path reads only this flag.
        self.fast_path = False
        #: Statements that read as reads by their text but that the server
        #: refused read-only (they write). Replaced whole, under the lock, so
        #: the hot path reads one immutable set without locking.
        self._learned_writes: frozenset[str | bytes] = frozenset()
        #: The fleet budget's view and this process's share (None: no fleet_budget). A
        #: new HandleState after fork gets a new random instance id.
        self._fleet: FleetPolicy | None = None
        self._fleet_cap: int | None = None  # the cap last applied by the sampler
        if s.fleet_budget is not None:
            # Imported here: a handle without a fleet budget does not pay for it (cold start;
            # secrets brings hashlib and hmac, ~1.5 ms).
            import secrets

            from pgwarden.core.fleet import FleetPolicy

            self._fleet = FleetPolicy(
                instance_id=secrets.token_hex(4),
                source=s.fleet_budget,
                max_size=s.max_size,
                interval=s.fleet_interval,
            )
            # A newcomer holds one connection until its first sample gives it a share.
            self._fleet_cap = self._applied_limit = 1
        self._init_truthful_health()

    # --- plain reads (atomic attribute reads; no lock needed) -------------------------------
    @property
    def state(self) -> State:
        return self._lifecycle.state

    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state

    @property
    def pgbouncer(self) -> bool:
        return self._pgbouncer

    @property
    def pooler(self) -> str | None:
        """The pooler detected (or declared) in front of the server: ``"pgbouncer"``
        (a transaction pooler: PgBouncer itself, or one that hands out its own backend
        keys the same way), ``"pgpool"`` (pgpool-II), or None."""
        if self._pgbouncer:
            return "pgbouncer"
        return "pgpool" if self._pgpool else None

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def last_connect_error(self) -> BaseException | None:
        return self._last_connect_error

    @property
    def applied_limit(self) -> int:
        return self._applied_limit

    @property
    def may_connect(self) -> bool:
        """May the pool's own workers connect? Only while the breaker is closed;
        otherwise the breaker's single probe is the only attempt."""
        return self._breaker.state is BreakerState.CLOSED

    # --- calls -------------------------------------------------------------------------------
    def deadline_for(
        self, timeout: float | None, now: float | None = None
    ) -> tuple[float | None, bool]:
        """``(deadline, explicit)`` of a call with per-call *timeout*, starting at *now*
        (the handle's clock, read here when None).

        *explicit* is True when the caller set a bound (``timeout=`` or
        ``pgwarden.deadline()``); the server then also gets it as
        ``statement_timeout``. Otherwise the bound is ``default_timeout``, a
        client-side backstop (None only when the user set it to None).
        """
        ctx = current_deadline()
        if now is None:
            now = self._clock()
        if timeout is None and ctx is None:
            default = self.settings.default_timeout
            return (None if default is None else now + default), False
        return effective_deadline(now, timeout, None), True

    def enter(self) -> float:
        """A call starts: count it in flight and for the retry budget; notice a freeze.
        Returns the handle's clock reading it began at (for a caller's own timings)."""
        mono, wall = self._clock(), self._wall_clock()
        with self._lock:
            self._inflight += 1
            self._unsettled_requests += 1
            if self._gap.observe(mono, wall):
                # A frozen or suspended process: every idle connection may have
                # died meanwhile, so each gets a round trip before its next use.
                self.validate_before = mono
        return mono

    def leave(
        self,
        *,
        query: object = None,
        seconds: float | None = None,
        acquire_wait: float | None = None,
        used: float | None = None,
    ) -> None:
        """A call ends (however it ended). *seconds*: the successful statement's
        duration (for the query histogram and the slow-query event);
        *acquire_wait* and *used*: its last lease's, when not reported yet."""
        slow: float | None = None  # a slow query's duration, logged outside the lock
        with self._lock:
            self._inflight -= 1
            tracker = self._tracker
            if acquire_wait is not None:
                tracker.acquire(acquire_wait)
            if used is not None:
                tracker.connection_used(used)
            if seconds is not None:
                tracker.query(seconds)
                if seconds > self.settings.slow_query_threshold:
                    tracker.slow_query()
                    slow = seconds
        if slow is not None:
            _flush([_slow_query_log(query, slow)])

    def statement_timed(self, query: object, seconds: float) -> None:
        """A statement a consumer sent on a checked-out connection (an ORM's) succeeded
        in *seconds*: counted in the query histogram and, past the threshold, as a slow
        query, exactly like the duration `leave` gets (nothing else changes)."""
        with self._lock:
            self._tracker.query(seconds)
            slow = seconds > self.settings.slow_query_threshold
            if slow:
                self._tracker.slow_query()
        if slow:
            _flush([_slow_query_log(query, seconds)])

    def lease_returned(self, acquire_wait: float, used: float) -> None:
        """A user's lease went back to the pool: how long it waited and was held."""
        with self._lock:
            self._tracker.acquire(acquire_wait)
            self._tracker.connection_used(used)

    def acquire_timed_out(self) -> None:
        with self._lock:
            self._tracker.acquire_timeout()

    # --- admission (the breaker) ---------------------------------------------------------------
    def admit(self) -> tuple[Admission, float]:
        """Ask the breaker: ``(ALLOW | PROBE | REJECT, seconds until it may admit again)``.

        Exactly one caller at a time gets PROBE, and it must report the outcome
        (`connect_succeeded` / `connect_failed`, or `abandon_probe`)."""
        with self._lock:
            now = self._clock()
            verdict = self._breaker.admit(now)
            return verdict, self._breaker.retry_after(now)

    def abandon_probe(self) -> None:
        """The probe never got to try (cancelled, out of time before connecting)."""
        with self._lock:
            self._breaker.abandon_probe(self._clock())

    def unavailable_error(self, retry_after: float) -> DatabaseUnavailable:
        error = DatabaseUnavailable(
            f"database at {self.settings.safe_url} is unavailable (circuit open after "
            f"repeated connection failures; next probe in {retry_after:.2f}s)",
            retry_after=retry_after,
        )
        last = self._last_connect_error
        if last is not None:
            error.__cause__ = self.redacted_cause(last)
        return error

    # --- connects ----------------------------------------------------------------------------
    def connect_bound(self) -> tuple[float, bool]:
        """``(seconds, explorer)``: how long the next connect attempt may take.

        Normally a bound learnt from this server's connects (see
        `CONNECT_BOUND_FACTOR`); the explorer, one attempt at a time after a
        long run of timeouts, gets the full ``connect_timeout``. The caller
        passes *explorer* back to `connect_succeeded` / `connect_failed`.
        """
        limit = self.settings.connect_timeout
        with self._lock:
            typical = self._typical_connect
            since = self._timing_out_since
            if (
                since is not None
                and not self._explorer_busy
                and self._clock() - since >= EXPLORE_AFTER_TIMEOUTS * limit
            ):
                self._explorer_busy = True
                return limit, True
            if typical is None:
                return min(limit, FIRST_CONNECT_BOUND), False
            return min(limit, max(CONNECT_BOUND_FLOOR, CONNECT_BOUND_FACTOR * typical)), False

    def connect_succeeded(self, setup_seconds: float, *, explorer: bool = False) -> None:
        logs: list[_LogRecord] = []
        with self._lock:
            self._timing_out_since = None
            if explorer:
                self._explorer_busy = False
            self._saw_connect(None)
            self._tracker.connection_opened(setup_seconds)
            typical = self._typical_connect
            self._typical_connect = (
                setup_seconds if typical is None else 0.8 * typical + 0.2 * setup_seconds
            )
            before = self._breaker.state
            self._breaker_moved(before, self._breaker.on_success(self._clock()), logs)
        _flush(logs)

    def connect_failed(
        self,
        exc: BaseException,
        *,
        feed_breaker: bool = True,
        explorer: bool = False,
        cut_short: bool = False,
    ) -> FailureKind:
        """Record a failed connection attempt (pool growth, breaker probe, warmup).

        The warmup passes ``feed_breaker=False``: it is already the single
        shared attempt, bounded by ``ready_timeout``, so it needs no breaker.
        *cut_short*: the attempt had less time than the learnt connect bound (a
        probe bounded by its caller's nearly spent deadline); running out of that
        time says nothing about the server, so such a timeout does not count
        against it (the caller abandons the probe instead, `abandon_probe`).
        """
        kind = classify_failure(exc, Phase.CONNECT)
        # Kept and handed out later (causes, last_error, health): redact it once, now.
        self.redacted_cause(exc)
        logs: list[_LogRecord] = []
        with self._lock:
            now = self._clock()
            if explorer:
                self._explorer_busy = False
            if isinstance(exc, WaitTimeout):
                if self._timing_out_since is None:
                    self._timing_out_since = now
            else:
                self._timing_out_since = None
            self._last_connect_error = exc
            self._saw_connect(exc, kind)
            self._tracker.connect_failed(kind.value)
            if kind is FailureKind.OVERLOAD:
                self._overloaded(now, logs, exc)
            # Overload is not an outage: the server is up and says "fewer,
            # please". AIMD sizing answers it; opening the breaker would fail
            # callers that a connection freed a moment later could serve.
            inconclusive = cut_short and isinstance(exc, WaitTimeout)
            if feed_breaker and kind is FailureKind.NOTHING_RAN and not inconclusive:
                before = self._breaker.state
                moved = self._breaker.on_failure(now, self._rng.random())
                self._breaker_moved(before, moved, logs)
        _flush(logs)
        return kind

    # --- failures and the retry decision -----------------------------------------------------
    def failed(
        self,
        exc: BaseException,
        phase: Phase,
        ctx: RetryContext,
        *,
        attempt: int,
        deadline: float | None,
        policy: RetryPolicy,
        operation: str,
        connection_lost: bool = False,
        whole_transaction: bool = False,
        user_call: bool = True,
    ) -> tuple[FailureKind, Decision]:
        """Classify a failed attempt and decide what follows (`decide`).

        Counts the error (for user calls), reacts to overload (AIMD), spends
        retry budget for user calls, and logs the retry or the exhausted budget.
        """
        from pgwarden.core.retry import decide

        kind = classify_failure(
            exc, phase, connection_lost=connection_lost, in_transaction=ctx.in_transaction
        )
        logs: list[_LogRecord] = []
        if kind is FailureKind.PERMANENT and self._lost_prepared(exc):
            # The pooler refused psycopg's Parse or Bind: the statement never ran.
            kind = FailureKind.NOTHING_RAN
            self._fall_back_from_prepares(exc, logs)
        with self._lock:
            now = self._clock()
            self._saw_failure(kind)
            if user_call:
                self._tracker.query_error(kind.value)
            if kind is FailureKind.OVERLOAD:
                self._overloaded(now, logs, exc)
            budget = None
            if user_call:
                self._budget.on_requests(self._unsettled_requests, now)
                self._unsettled_requests = 0
                budget = self._budget
            decision = decide(
                kind,
                ctx,
                attempt=attempt,
                policy=policy,
                now=now,
                deadline=deadline,
                rand=self._rng.random(),
                budget=budget,
                whole_transaction=whole_transaction,
            )
            if isinstance(decision, Sleep):
                if user_call:
                    self._tracker.retry(kind.value, attempt)
                logs.append(
                    (
                        logging.INFO,
                        "retrying %s (attempt %d) after %s: %s",
                        (operation, attempt + 1, kind.value, self.describe_error(exc)),
                        {"event": "retry", "reason": kind.value, "attempt": attempt + 1},
                    )
                )
            elif isinstance(decision, GiveUp) and decision.reason is GiveUpReason.BUDGET:
                logs.append(
                    (
                        logging.WARNING,
                        "retry budget exhausted: not retrying %s after %s",
                        (operation, kind.value),
                        {"event": "retry_budget_exhausted", "reason": kind.value},
                    )
                )
        _flush(logs)
        return kind, decision

    def _overloaded(self, now: float, logs: list[_LogRecord], exc: BaseException) -> None:
        self._tracker.overload()
        if self._lifecycle.state is State.READY:
            self._lifecycle.try_fire(Event.FAULT_OBSERVED)
        # Behind a pooler, the server's own 53300 says the pooler's server connections
        # are full: back off (the retry's delay), but this process's share is not it.
        shrink = overload_shrinks(
            server_refused=server_refused_slots(exc), behind_pooler=self.pooler is not None
        )
        if shrink and self.settings.adaptive_sizing:
            new_limit = self._limit.on_overload(now)
            if new_limit is not None:
                self._tracker.limit_changed(new_limit)
                logs.append(
                    (
                        logging.WARNING,
                        "server overloaded (too many connections): local pool limit lowered to %d",
                        (new_limit,),
                        {"event": "overload", "pool_limit": new_limit},
                    )
                )
        self._refresh_fast_path()

    # --- fleet budget ------------------------------------------------------------------------
    @property
    def application_name(self) -> str:
        """Every connection's ``application_name``: with a fleet budget, the fleet mark."""
        fleet = self._fleet
        if fleet is None:
            return self.settings.application_name
        from pgwarden.core.fleet import member_name

        return member_name(
            self.settings.application_name, self.settings.fleet_tag, fleet.instance_id
        )

    @property
    def fleet_enabled(self) -> bool:
        fleet = self._fleet
        return fleet is not None and fleet.off is None

    def fleet_pattern(self) -> str:
        from pgwarden.core.fleet import member_pattern

        return member_pattern(self.settings.fleet_tag)

    def fleet_observed(self, row: Mapping[str, object]) -> None:
        """The sampler's row. Turns the fleet off behind a pooler (its connections, not
        this fleet's, are what pg_stat_activity shows)."""
        with self._lock:
            fleet = self._fleet
            if fleet is None or fleet.off is not None:
                return
            if self.pooler is not None:
                self._fleet_off(fleet, f"behind {self.pooler}: pg_stat_activity shows the pooler")
                return
            from pgwarden.core.fleet import FleetSample

            sample = FleetSample.from_row(row, self.settings.fleet_tag)
            if sample.members.get(fleet.instance_id, 0) == 0:
                # The sampling connection itself is missing from the view: something
                # between us and the server renames or multiplexes connections.
                self._fleet_off(
                    fleet, "pg_stat_activity does not show this process's connection (a pooler?)"
                )
                return
            fleet.observe(self._wall_clock(), sample)

    def fleet_pooler_seen(self) -> None:
        """Called once readiness is known: behind a pooler the fleet turns itself off."""
        with self._lock:
            fleet = self._fleet
            if fleet is not None and fleet.off is None and self.pooler is not None:
                self._fleet_off(fleet, f"behind {self.pooler}: pg_stat_activity shows the pooler")

    def _fleet_off(self, fleet: FleetPolicy, why: str) -> None:
        fleet.turn_off(why)
        self._fleet_cap = None
        self._refresh_fast_path()
        self.log(logging.WARNING, "fleet budget off: %s", why, event="fleet_off", reason=why)

    def fleet_cap(self) -> tuple[int | None, float]:
        """``(cap now, seconds until it may change)``; records the cap as applied. The
        cap is None when there is no fleet budget or it is off."""
        with self._lock:
            fleet = self._fleet
            if fleet is None or fleet.off is not None:
                self._fleet_cap = None
                self._refresh_fast_path()
                return None, fleet.interval if fleet is not None else 1.0
            wall = self._wall_clock()
            cap = fleet.cap(wall)
            self._fleet_cap = cap
            self._refresh_fast_path()
            return cap, fleet.turn_ends(wall) - wall

    def fleet_wait(self, deadline: float | None) -> float:
        """Seconds a caller waits for this process's next turn when its share is zero;
        at most half of the time left to *deadline*, so the call still fits in it."""
        with self._lock:
            fleet = self._fleet
            if fleet is None or fleet.off is not None or self._fleet_cap != 0:
                return 0.0
            wall = self._wall_clock()
            on = fleet.next_on(wall)
            wait = fleet.interval if on is None else max(0.0, on - wall)
        if deadline is not None:
            wait = min(wait, max(0.0, (deadline - self._clock()) / 2))
        return wait

    # --- sizing ------------------------------------------------------------------------------
    def wanted_limit(self) -> int | None:
        """The pool limit to apply now, if it differs from the applied one."""
        with self._lock:
            limit = self._limit
            if self.settings.adaptive_sizing and limit.limit < self.settings.max_size:
                grown = limit.tick(self._clock())
                if grown is not None:
                    self._tracker.limit_changed(grown)
            wanted = limit.limit
            if wanted >= self.settings.max_size and self._lifecycle.state is State.DEGRADED:
                self._lifecycle.try_fire(Event.RECOVERED)
            if self._fleet_cap is not None:
                # The fleet's share caps the adaptive limit; the pool keeps room for one
                # (a caller past its wait for a turn still gets a connection).
                wanted = max(1, min(wanted, self._fleet_cap))
            self._refresh_fast_path()
            return None if wanted == self._applied_limit else wanted

    def limit_applied(self, limit: int) -> None:
        with self._lock:
            self._applied_limit = limit
            self._refresh_fast_path()

    # --- breaker and lifecycle -----------------------------------------------------------------
    def _breaker_moved(
        self, before: BreakerState, new_state: BreakerState | None, logs: list[_LogRecord]
    ) -> None:
        if new_state is None or new_state is before:
            return
        self._tracker.breaker_transition(before.value, new_state.value)
        last = self._last_connect_error
        cause = self.describe_error(last) if last is not None else ""
        logs.append(
            (
                logging.WARNING,
                "circuit breaker %s -> %s%s",
                (
                    before.value,
                    new_state.value,
                    f" ({cause})" if new_state is BreakerState.OPEN and cause else "",
                ),
                {"event": "breaker", "from": before.value, "to": new_state.value},
            )
        )
        state = self._lifecycle.state
        # While WARMING the warmup owns the state; it does not feed the breaker.
        if new_state is BreakerState.OPEN and state in (State.READY, State.DEGRADED):
            self._lifecycle.try_fire(Event.BREAKER_OPENED)
        elif new_state is BreakerState.CLOSED and state is State.OPEN:
            self._lifecycle.try_fire(Event.BREAKER_CLOSED)
        self._refresh_fast_path()

    def _refresh_fast_path(self) -> None:
        target = self.settings.max_size
        if self._fleet_cap is not None:
            target = max(1, min(target, self._fleet_cap))
        self.fast_path = (
            self._lifecycle.state is State.READY
            and self._breaker.state is BreakerState.CLOSED
            and self._limit.limit == self.settings.max_size
            and self._applied_limit == target
            and self._fleet_cap != 0
        )

    def fire(self, event: Event) -> State:
        """Fire a lifecycle event (raising on an illegal one)."""
        with self._lock:
            state = self._lifecycle.fire(event)
            self._refresh_fast_path()
            return state

    def try_fire(self, event: Event) -> State | None:
        """Fire *event* if legal now (events that may lose a race with close())."""
        with self._lock:
            state = self._lifecycle.try_fire(event)
            self._refresh_fast_path()
            return state

    def check_accepting(self) -> None:
        state = self._lifecycle.state
        if not accepts_work(state):
            raise HandleClosed(
                f"the database handle for {self.settings.safe_url} is "
                f"{state.value.lower()}: it accepts no new work"
            )

    def start_warmup(self) -> bool:
        """NEW -> WARMING; False when another warmup already finished (or close() won)."""
        with self._lock:
            if self._lifecycle.state is not State.NEW:
                return False
            self._lifecycle.fire(Event.WARMUP_STARTED)
            self._refresh_fast_path()
            return True

    def warmup_finished(self, seconds: float, attempts: int, error: BaseException | None) -> None:
        logs: list[_LogRecord] = []
        with self._lock:
            self._tracker.warmup(seconds, error is None)
            if error is None:
                self._warmup_seconds = seconds
                self._lifecycle.try_fire(Event.WARMUP_SUCCEEDED)
                logs.append(
                    (
                        logging.INFO,
                        "ready in %.3fs after %d attempt(s)%s",
                        (seconds, attempts, _POOLER_NOTES.get(self.pooler or "", "")),
                        {
                            "event": "warmup",
                            "ok": True,
                            "seconds": seconds,
                            "attempts": attempts,
                            "pooler": self.pooler,
                        },
                    )
                )
            else:
                self._lifecycle.try_fire(Event.WARMUP_FAILED)
                logs.append((logging.ERROR, "%s", (error,), {"event": "warmup", "ok": False}))
            self._refresh_fast_path()
        _flush(logs)

    def warmup_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        logger.info(
            "warmup attempt %d failed (%s); retrying in %.3fs",
            attempt,
            self.describe_error(exc),
            delay,
            extra={"event": "warmup_retry", "attempt": attempt},
        )

    def set_pgbouncer(self, detected: bool) -> None:
        with self._lock:
            self._pgbouncer = detected

    def set_pgpool(self, detected: bool) -> None:
        with self._lock:
            self._pgpool = detected

    # --- prepared statements behind a pooler ---------------------------------------------------
    def _lost_prepared(self, exc: BaseException) -> bool:
        s = self.settings
        return lost_prepared_statement(
            sqlstate_of(exc),
            configured=s.prepare_threshold,
            pgbouncer=self._pgbouncer,
            opted_in=s.pooler_prepared_statements,
        )

    def _fall_back_from_prepares(self, exc: BaseException, logs: list[_LogRecord]) -> None:
        with self._lock:
            if self.prepares_off:
                return
            self.prepares_off = True
        logs.append(
            (
                logging.WARNING,
                "the pooler lost a prepared statement (%s): pooler_prepared_statements is on, "
                "but it does not track them (PgBouncer < 1.21, or max_prepared_statements = 0); "
                "this handle's connections run unprepared from now on",
                (sqlstate_of(exc),),
                {"event": "prepared_statements_off", "sqlstate": sqlstate_of(exc)},
            )
        )

    # --- events that are only counted and logged -------------------------------------------------
    def connection_closed(self, reason: str) -> None:
        with self._lock:
            self._tracker.connection_closed(reason)
            self._saw_close(reason)

    def ambiguous_commit(self, outcome: str) -> None:
        with self._lock:
            self._tracker.ambiguous_commit(outcome)
        if outcome in ("committed", "aborted"):
            logger.warning(
                "connection lost during COMMIT; resolved by txid: %s",
                outcome,
                extra={"event": "ambiguous_commit", "outcome": outcome},
            )

    def leaked(self, site: object, held_since: float) -> None:
        """A connection has been held past ``leak_threshold`` (reported once per hold);
        *site*: where it was acquired, as ``str(site)`` gives it (formatted only here)."""
        site = str(site)
        with self._lock:
            self._tracker.leaked_connection()
        held = self._clock() - held_since
        logger.warning(
            "connection held for %.1fs (leak threshold %.1fs), acquired at %s",
            held,
            self.settings.leak_threshold,
            site,
            extra={"event": "leak", "held_seconds": round(held, 3), "site": site},
        )

    def log(self, level: int, message: str, *args: Any, **extra: Any) -> None:
        """One handle event on the ``pgwarden`` logger (text redacted by the caller)."""
        logger.log(level, message, *args, extra=extra)

    # --- what a statement may do -------------------------------------------------------------
    def statement_writes(self, query: Query) -> bool:
        """May *query* change data? By its text (`query_is_write`), or because the
        server refused it in a read-only transaction before (`learn_write`)."""
        return query_is_write(query) or query in self._learned_writes

    def learn_write(self, query: Query) -> None:
        """The server refused *query* read-only: send it as a write from now on."""
        if not isinstance(query, (str, bytes)):
            return  # composed queries are always sent as writes
        with self._lock:
            if query in self._learned_writes or len(self._learned_writes) >= LEARNED_WRITES_MAX:
                return
            self._learned_writes = self._learned_writes | {query}
        logger.info(
            "a statement that reads as a read writes (refused read-only); sent as a write "
            "from now on: %s",
            sanitize_sql(query, 120),
            extra={"event": "hidden_write"},
        )

    def outcome_unknown(self, exc: BaseException, why: str) -> OutcomeUnknown:
        """The error for a write that may or may not have happened (never re-sent)."""
        return OutcomeUnknown(
            f"{why}; it may or may not have taken effect and was not sent again "
            f"({self.describe_error(exc)})"
        )

    # --- errors and secrets --------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return redact(text, self._password)

    def describe_error(self, exc: BaseException) -> str:
        return self.redact(f"{type(exc).__name__}: {exc}".strip())

    def redacted_cause(self, exc: BaseException) -> BaseException:
        """*exc* itself, for ``__cause__``, with secrets redacted in place: a
        psycopg error keeps its type, ``sqlstate`` and ``diag``; its message is
        redacted and its ``pgconn`` (which holds the conninfo) dropped."""
        args = exc.args
        redacted = tuple(self.redact(a) if isinstance(a, str) else a for a in args)
        if redacted != args:
            exc.args = redacted
        if getattr(exc, "_pgconn", None) is not None:
            # psycopg keeps the failed connection's PGconn, whose repr and info
            # carry the conninfo, password included; psycopg drops it when
            # pickling an error for the same reason.
            exc._pgconn = None  # type: ignore[attr-defined]
        return exc

    def deadline_error(
        self,
        exc: BaseException | None,
        operation: str,
        cls: type[DeadlineExceeded] = DeadlineExceeded,
    ) -> DeadlineExceeded:
        last = self.describe_error(exc) if exc is not None else "no attempt completed"
        if exc is not None:
            self.redacted_cause(exc)  # it becomes last_error and usually __cause__
        return cls(f"deadline exceeded during {operation} ({last})", last_error=exc)

    def not_ready_error(self, exc: BaseException | None, elapsed: float) -> NotReady:
        cause = self.describe_error(exc) if exc is not None else "no attempt completed"
        return NotReady(
            f"database at {self.settings.safe_url} not ready after {elapsed:.2f}s: {cause}"
        )

    # --- trackers and stats --------------------------------------------------------------------
    def add_tracker(self, extra: MetricsTracker) -> Callable[[], None]:
        """Report every metrics event to *extra* too; ``stats()`` keeps its shape.

        Returns ``remove()``, which detaches *extra* again if nothing else was
        attached after it.
        """
        with self._lock:
            current = self._tracker
            tee = TeeTracker(current, extra)
            self._tracker = tee

        def remove() -> None:
            with self._lock:
                if self._tracker is tee:
                    self._tracker = current

        return remove

    @property
    def tracker(self) -> MetricsTracker:
        return self._tracker

    def histograms(self) -> Mapping[str, Histogram]:
        """The live histograms behind ``stats()`` (empty when metrics are off): those of
        the tracker whose snapshot ``stats()`` shows (a tee's primary), by their
        ``stats()["histograms"]`` key (``pgwarden.core.stats.Histograms``)."""
        tracker = self._tracker
        if isinstance(tracker, TeeTracker):
            tracker = tracker.primary
        found = getattr(tracker, "histograms", None)  # a StatsTracker's, or a custom one's
        if not isinstance(found, Mapping):
            return {}
        return {key: h for key, h in found.items() if isinstance(h, Histogram)}

    def stats(self, pool_stats: Mapping[str, int] | None) -> dict[str, Any]:
        """The plain-dict snapshot behind ``db.stats()``."""
        with self._lock:
            now = self._clock()
            snap = dict(self._tracker.snapshot())
            p = pool_stats or {}
            size = int(p.get("pool_size", 0))
            idle = int(p.get("pool_available", 0))
            gauges: dict[str, Any] = dict(
                pool_gauges(
                    size=size,
                    idle=idle,
                    in_use=max(0, size - idle),
                    # Our own count: psycopg_pool's requests_waiting also counts
                    # every getconn() slice that timed out (see `wait_started`).
                    waiting=self._waiting(now),
                    max_size=int(p.get("pool_max", self._limit.limit)),
                )
            )
            gauges["limit"] = self._limit.limit
            gauges["configured_max"] = self.settings.max_size
            gauges["connections_lost"] = int(p.get("connections_lost", 0)) + int(
                p.get("returns_bad", 0)
            )
            snap["pool"] = gauges
            snap["state"] = self._lifecycle.state.value
            snap["breaker"] = self._breaker.state.value
            snap["pgbouncer"] = self._pgbouncer
            snap["warmup_seconds"] = self._warmup_seconds
            snap["in_flight"] = self._inflight
            # Reading the bucket refills it by the time elapsed but credits no
            # requests: stats() observes, it does not change what retries may do.
            if self._fleet is not None:
                snap["fleet"] = self._fleet.snapshot(self._wall_clock())
            snap["retry_budget_tokens"] = round(
                min(
                    self._budget.max_tokens,
                    self._budget.tokens(now) + self._budget.ratio * self._unsettled_requests,
                ),
                3,
            )
            return snap

    def health_report(
        self,
        ok: bool,
        latency: float,
        error: BaseException | None,
        pool_stats: Mapping[str, int] | None,
    ) -> dict[str, Any]:
        stats = self.stats(pool_stats)
        return {
            "ok": ok,
            "state": stats["state"],
            "breaker": stats["breaker"],
            "latency_ms": round(latency * 1000, 3),
            "error": None if error is None else self.describe_error(error),
            "pool": stats["pool"],
            "pgbouncer": self._pgbouncer,
        }

    # --- truthful health: waiters and failure freshness ----------------------------------------
    #: A caller counts in the ``waiting`` gauge once it has waited this long for a
    #: pooled connection, so a checkout served at once never shows, even when a
    #: scrape lands in the middle of it or its thread is preempted there. The shell's
    #: first getconn slice lasts this long and registers no one (`wait_started` comes
    #: after it), so a checkout served at once takes no lock for the gauge either.
    WAITING_GRACE = 0.01
    #: Query failures that say the server or the network is gone (not a statement's
    #: own error): seen after a health round trip began, they make its report stale.
    OUTAGE_KINDS = frozenset(
        {FailureKind.LOST, FailureKind.STALE, FailureKind.NOTHING_RAN, FailureKind.FAILOVER}
    )

    def _init_truthful_health(self) -> None:
        # Callers waiting for a pooled connection: token -> when their acquire began.
        # Under the lock like everything else here; only callers not served within
        # WAITING_GRACE are registered, so a checkout served at once never touches it.
        self._waiters: dict[object, float] = {}
        # Events are counted, not timed, so recording one reads no clock; a
        # health round trip notes the counts when it begins.
        self._failures_seen = 0  # connect failures, connections found broken, outage kinds
        self._connects_ok = 0
        #: The last connect attempt failed with this (not overload), none succeeded since;
        #: ``_down_at``: the failure count just after it.
        self._connect_down: BaseException | None = None
        self._down_at = 0
        self._health_cache: tuple[HealthMark, dict[str, Any]] | None = None
        self._passed_at = -1  # failure count when the latest passing round trip began

    def wait_started(self, since: float) -> object:
        """A caller starts waiting for a pooled connection (its acquire began at
        monotonic *since*); returns the token for `wait_ended`."""
        token = object()
        with self._lock:
            self._waiters[token] = since
        return token

    def wait_ended(self, token: object) -> None:
        """The caller of *token* got its connection or gave up (call it in a ``finally``)."""
        with self._lock:
            self._waiters.pop(token, None)

    def _waiting(self, now: float) -> int:
        """Callers that have waited at least `WAITING_GRACE` (called with the lock held)."""
        cutoff = now - self.WAITING_GRACE
        return sum(1 for since in self._waiters.values() if since <= cutoff)

    # Recorders, called with the lock held by the methods that see the events.
    def _saw_connect(self, exc: BaseException | None, kind: FailureKind | None = None) -> None:
        """A connect attempt succeeded (*exc* None) or failed."""
        if exc is None:
            self._connects_ok += 1
            self._connect_down = None
            return
        self._failures_seen += 1
        # Overload is a server that is up and full: its existing connections may
        # well answer, so only a round trip can tell.
        self._connect_down = None if kind is FailureKind.OVERLOAD else exc
        self._down_at = self._failures_seen

    def _saw_failure(self, kind: FailureKind) -> None:
        """A statement (or the warmup) failed with *kind*."""
        if kind in self.OUTAGE_KINDS:
            self._failures_seen += 1

    def _saw_close(self, reason: str) -> None:
        """A pooled connection was closed for *reason* (a `CloseReason` value)."""
        from pgwarden.core.metrics import CloseReason

        if reason == CloseReason.BROKEN.value:
            self._failures_seen += 1

    def health_check_began(self) -> HealthMark:
        """A health round trip begins: pass the mark to `health_checked`."""
        with self._lock:
            return HealthMark(self._clock(), self._failures_seen, self._connects_ok)

    def cached_health(self) -> dict[str, Any] | None:
        """The last health round trip's report while it still tells the truth: younger
        than ``health_interval``, no failure (connect, lost connection, outage query
        failure) seen since it began, and, if it failed, no connect succeeded since."""
        with self._lock:
            entry = self._health_cache
            if entry is None:
                return None
            mark, report = entry
            if (
                self._clock() - mark.at >= self.settings.health_interval
                or self._failures_seen != mark.failures
                or (not report["ok"] and self._connects_ok != mark.connects)
            ):
                return None
            return report

    def known_down(self) -> BaseException | None:
        """The error health() reports at once, without a round trip: the last connect
        attempt failed (not by overload), no connect succeeded since, and no health
        round trip passed after it. None when only a round trip can tell."""
        with self._lock:
            exc = self._connect_down
            if exc is None or self._passed_at >= self._down_at:
                return None
            return exc

    def health_checked(
        self, ok: bool, report: dict[str, Any] | None = None, began: HealthMark | None = None
    ) -> None:
        """A health report was made; one from a round trip that *began* (the mark of
        `health_check_began`) becomes the cached answer (`cached_health`)."""
        with self._lock:
            self._tracker.health_check(ok)
            if report is None or began is None:
                return
            cached = self._health_cache
            if cached is None or began.at >= cached[0].at:
                self._health_cache = (began, report)
            if ok and began.failures > self._passed_at:
                self._passed_at = began.failures

    def health_timeout_error(self, bound: float) -> DeadlineExceeded:
        return DeadlineExceeded(f"the health check did not finish within {bound:.2f}s")


class HealthMark:
    """When a health round trip began, and the event counts then (`HandleState`).

    Immutable (``Final``). A plain class with ``__slots__``: a NamedTuple cost ~0.2 ms
    to define at import and a frozen dataclass more (it compiles five methods), and
    nothing compares, hashes or unpacks a mark.
    """

    __slots__ = ("at", "connects", "failures")
    at: Final[float]
    failures: Final[int]
    connects: Final[int]

    def __init__(self, at: float, failures: int, connects: int) -> None:
        self.at = at
        self.failures = failures
        self.connects = connects

    def __repr__(self) -> str:
        return f"HealthMark(at={self.at!r}, failures={self.failures!r}, connects={self.connects!r})"


def _slow_query_log(query: object, seconds: float) -> _LogRecord:
    statement = sanitize_sql(query)
    return (
        logging.WARNING,
        "slow query (%.3fs): %s",
        (seconds, statement),
        {"event": "slow_query", "seconds": round(seconds, 6), "statement": statement},
    )


def _flush(logs: list[_LogRecord]) -> None:
    for level, message, args, extra in logs:
        logger.log(level, message, *args, extra=extra)
