"""HandleState: the one lock-guarded owner of a handle's mutable state (no I/O).

Most tests run on a fake clock with a seeded generator. The two thread tests at the end use
the real monotonic clock and check that the lock makes the breaker's check-then-act atomic and
that no in-flight update is lost.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest

import pgwarden
from pgwarden import Settings
from pgwarden._handle.state import (
    CONNECT_BOUND_FACTOR,
    CONNECT_BOUND_FLOOR,
    DEADLINE_ATTEMPTS_CAP,
    EXPLORE_AFTER_TIMEOUTS,
    FIRST_CONNECT_BOUND,
    LEARNED_WRITES_MAX,
    HandleState,
)
from pgwarden._handle.waits import WaitTimeout
from pgwarden.core.breaker import Admission, BreakerState
from pgwarden.core.classify import FailureKind, Phase, RetryContext
from pgwarden.core.lifecycle import Event, IllegalTransition, State
from pgwarden.core.metrics import StatsTracker, TeeTracker
from pgwarden.core.retry import Decision, GiveUp, GiveUpReason, Raise, RetryPolicy, Sleep
from pgwarden.errors import HandleClosed

A = Admission
B = BreakerState
K = FailureKind
T = TypeVar("T")

SECRET = "pw-s3cret"
URL = f"postgresql://app:{SECRET}@db.internal:5432/orders"
READ = RetryContext(is_write=False)
WRITE = RetryContext(is_write=True)


class DriverError(Exception):
    """Shaped like a psycopg error (a ``sqlstate`` attribute), without importing one."""

    def __init__(self, message: str = "", sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def refused() -> OSError:
    return OSError("connection refused")


def link_down() -> DriverError:
    return DriverError("", "08006")


def too_many() -> DriverError:
    return DriverError("FATAL:  sorry, too many clients already", "53300")


def conflict() -> DriverError:
    return DriverError("could not serialize access due to concurrent update", "40001")


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def lifecycle(state: HandleState) -> State:
    # Function calls, so that mypy does not narrow the properties across calls.
    return state.state


def breaker_of(state: HandleState) -> BreakerState:
    return state.breaker_state


class Handle:
    """A HandleState on a fake monotonic and wall clock with a seeded generator."""

    def __init__(self, **overrides: Any) -> None:
        self.settings = Settings(url=URL, **overrides)
        self.clock = FakeClock(100.0)
        self.wall = FakeClock(1.7e9)
        self.state = HandleState(
            self.settings, clock=self.clock, wall_clock=self.wall, rng=random.Random(1234)
        )

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def ready(self) -> None:
        assert self.state.start_warmup()
        self.state.warmup_finished(0.01, 1, None)
        assert lifecycle(self.state) is State.READY

    def open_breaker(self, make_exc: Callable[[], BaseException] = refused) -> None:
        """Report connect failures, spanning breaker_min_outage, until the breaker opens."""
        for _ in range(100):
            assert self.state.connect_failed(make_exc()) is K.NOTHING_RAN
            if breaker_of(self.state) is B.OPEN:
                return
            self.advance(self.settings.breaker_min_outage / 2)
        raise AssertionError("the breaker never opened")

    def probe(self) -> None:
        """Wait out the open breaker and take its probe."""
        verdict, retry_after = self.state.admit()
        assert verdict is A.REJECT
        self.advance(retry_after)
        assert self.state.admit()[0] is A.PROBE

    def fail(
        self,
        exc: BaseException,
        ctx: RetryContext = READ,
        *,
        phase: Phase = Phase.STATEMENT,
        attempt: int = 1,
        deadline: float | None = None,
        policy: RetryPolicy | None = None,
        connection_lost: bool = False,
        whole_transaction: bool = False,
        user_call: bool = True,
    ) -> tuple[FailureKind, Decision]:
        return self.state.failed(
            exc,
            phase,
            ctx,
            attempt=attempt,
            deadline=deadline,
            policy=policy or self.state.statement_policy,
            operation="query",
            connection_lost=connection_lost,
            whole_transaction=whole_transaction,
            user_call=user_call,
        )

    def counters(self) -> dict[str, Any]:
        counters: dict[str, Any] = self.state.stats(None)["counters"]
        return counters


@pytest.fixture
def h() -> Handle:
    return Handle(breaker_threshold=3, breaker_min_outage=1.0)


# --- construction and the fast path ------------------------------------------------------------


def test_a_new_state_is_not_on_the_fast_path() -> None:
    state = Handle().state
    assert lifecycle(state) is State.NEW
    assert breaker_of(state) is B.CLOSED
    assert state.may_connect
    assert not state.fast_path
    assert state.inflight == 0
    assert state.applied_limit == 10
    assert state.last_connect_error is None
    assert state.validate_before == 0.0


def test_warmup_reaches_ready_and_the_fast_path(caplog: pytest.LogCaptureFixture) -> None:
    handle = Handle()
    state = handle.state
    assert state.start_warmup()
    assert lifecycle(state) is State.WARMING
    assert not state.start_warmup()  # one warmup at a time
    caplog.set_level(logging.INFO, logger="pgwarden")
    state.warmup_finished(0.5, 3, None)
    assert lifecycle(state) is State.READY
    assert state.fast_path
    assert not state.start_warmup()  # already warm
    stats = state.stats(None)
    assert stats["warmup_seconds"] == 0.5
    assert stats["counters"]["warmups"] == {"ok": 1, "failed": 0}
    assert "ready in 0.500s after 3 attempt(s)" in caplog.text


def test_a_failed_warmup_goes_back_to_new() -> None:
    handle = Handle()
    state = handle.state
    assert state.start_warmup()
    state.warmup_finished(1.0, 2, RuntimeError("no server"))
    assert lifecycle(state) is State.NEW
    assert not state.fast_path
    assert handle.counters()["warmups"] == {"ok": 0, "failed": 1}
    assert state.start_warmup()  # the next call warms again


def test_lifecycle_events_through_the_state() -> None:
    handle = Handle()
    state = handle.state
    with pytest.raises(IllegalTransition):
        state.fire(Event.WARMUP_SUCCEEDED)
    assert state.try_fire(Event.WARMUP_SUCCEEDED) is None
    handle.ready()
    assert state.fire(Event.FAULT_OBSERVED) is State.DEGRADED
    assert not state.fast_path
    assert state.fire(Event.RECOVERED) is State.READY
    assert state.fast_path
    state.check_accepting()
    assert state.fire(Event.CLOSE_REQUESTED) is State.CLOSING
    assert not state.fast_path
    assert not state.start_warmup()
    with pytest.raises(HandleClosed, match="closing: it accepts no new work") as info:
        state.check_accepting()
    assert SECRET not in str(info.value)


def test_max_lifetime_is_jittered_by_the_generator() -> None:
    settings = Settings(url=URL)

    def lifetime(seed: int) -> float:
        return HandleState(settings, rng=random.Random(seed)).max_lifetime

    assert lifetime(7) == lifetime(7)
    lifetimes = {lifetime(seed) for seed in range(30)}
    assert len(lifetimes) == 30
    assert all(1800 * 0.8 <= t <= 1800 for t in lifetimes)


def test_retry_policies_come_from_the_settings() -> None:
    state = Handle(retry_attempts=4, retry_base_delay=0.1, retry_max_delay=3.0).state
    assert state.statement_policy == RetryPolicy(attempts=4, base_delay=0.1, max_delay=3.0)
    assert state.deadline_policy == RetryPolicy(
        attempts=DEADLINE_ATTEMPTS_CAP, base_delay=0.1, max_delay=3.0
    )
    assert state.warmup_policy == state.deadline_policy


# --- the breaker ----------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_failures_spanning_min_outage(h: Handle) -> None:
    h.ready()
    state = h.state
    # Three at once (every pooled connection noticing one restart) are one blip.
    for _ in range(3):
        assert state.connect_failed(refused()) is K.NOTHING_RAN
    assert breaker_of(state) is B.CLOSED
    h.advance(0.5)
    assert state.connect_failed(link_down()) is K.NOTHING_RAN
    assert breaker_of(state) is B.CLOSED
    h.advance(0.5)  # the failures now span min_outage
    assert state.connect_failed(refused()) is K.NOTHING_RAN
    assert breaker_of(state) is B.OPEN
    assert lifecycle(state) is State.OPEN
    assert not state.fast_path
    assert not state.may_connect
    verdict, retry_after = state.admit()
    assert verdict is A.REJECT
    assert 0.5 * 0.25 <= retry_after <= 0.25  # the jittered cooldown
    counters = h.counters()
    assert counters["connect_failures"] == {"nothing_ran": 5}
    assert counters["breaker_transitions"] == {"closed->open": 1}
    assert isinstance(state.last_connect_error, OSError)


def test_a_connect_success_resets_the_count(h: Handle) -> None:
    state = h.state
    for _ in range(2):
        state.connect_failed(refused())
        h.advance(1.0)
    state.connect_succeeded(0.01)
    for _ in range(2):
        state.connect_failed(refused())
        h.advance(1.0)
    assert breaker_of(state) is B.CLOSED


@pytest.mark.parametrize(
    ("make_exc", "kind", "feed_breaker"),
    [
        (too_many, K.OVERLOAD, True),
        (
            lambda: DriverError('password authentication failed for user "app"', "28P01"),
            K.PERMANENT,
            True,
        ),
        (refused, K.NOTHING_RAN, False),
    ],
    ids=["overload", "permanent", "warmup"],
)
def test_only_an_outage_feeds_the_breaker(
    h: Handle, make_exc: Callable[[], BaseException], kind: FailureKind, feed_breaker: bool
) -> None:
    for _ in range(10):
        assert h.state.connect_failed(make_exc(), feed_breaker=feed_breaker) is kind
        h.advance(1.0)
    assert breaker_of(h.state) is B.CLOSED
    assert h.counters()["connect_failures"] == {kind.value: 10}


def test_admit_gives_exactly_one_probe(h: Handle) -> None:
    h.ready()
    h.open_breaker()
    state = h.state
    verdict, retry_after = state.admit()
    assert verdict is A.REJECT
    h.advance(retry_after * 0.99)
    assert state.admit()[0] is A.REJECT
    h.advance(retry_after * 0.01 + 1e-9)
    assert state.admit() == (A.PROBE, 0.25)  # the in-flight estimate is the cooldown
    assert breaker_of(state) is B.HALF_OPEN
    assert not state.may_connect  # the pool's workers stay off while probing
    for _ in range(50):
        assert state.admit() == (A.REJECT, 0.25)
        h.advance(0.001)
    # The probe never got to try: the next caller may probe at once.
    state.abandon_probe()
    assert breaker_of(state) is B.OPEN
    assert state.admit()[0] is A.PROBE
    assert state.admit()[0] is A.REJECT


def test_probe_success_closes_the_breaker_and_the_lifecycle_follows(
    h: Handle, caplog: pytest.LogCaptureFixture
) -> None:
    h.ready()
    state = h.state
    h.open_breaker()
    assert lifecycle(state) is State.OPEN
    h.probe()
    caplog.set_level(logging.WARNING, logger="pgwarden")
    state.connect_succeeded(0.02)
    assert breaker_of(state) is B.CLOSED
    assert state.may_connect
    assert lifecycle(state) is State.DEGRADED  # serving, not yet at full strength
    assert not state.fast_path
    # The outage was not an overload: the limit was never lowered, so nothing to ramp.
    assert state.wanted_limit() is None
    assert lifecycle(state) is State.READY
    assert state.fast_path
    stats = state.stats(None)
    assert stats["pool"]["limit"] == 10
    assert stats["breaker"] == "closed"
    assert stats["state"] == "ready"
    assert stats["counters"]["breaker_transitions"] == {"closed->open": 1, "half_open->closed": 1}
    assert stats["counters"]["connections_opened"] == 1
    assert "circuit breaker half_open -> closed" in caplog.text


def test_failed_probe_reopens_with_a_longer_wait(h: Handle) -> None:
    h.ready()
    state = h.state
    h.open_breaker()
    h.probe()
    assert state.connect_failed(refused()) is K.NOTHING_RAN
    assert breaker_of(state) is B.OPEN
    assert lifecycle(state) is State.OPEN
    verdict, retry_after = state.admit()
    assert verdict is A.REJECT
    assert 0.5 * 0.4 <= retry_after <= 0.4  # doubled from 0.25, capped at 0.4
    assert h.counters()["breaker_transitions"] == {"closed->open": 1, "half_open->open": 1}


@pytest.mark.parametrize("warming", [False, True], ids=["new", "warming"])
def test_before_ready_the_breaker_leaves_the_lifecycle_alone(h: Handle, warming: bool) -> None:
    # While NEW or WARMING the warmup owns the state; the pool's failures still open the
    # breaker, and a warmup that succeeds meanwhile does not put the handle on the fast path.
    if warming:
        assert h.state.start_warmup()
    before = h.state.state
    h.open_breaker()
    assert lifecycle(h.state) is before
    if warming:
        h.state.warmup_finished(0.1, 1, None)
        assert lifecycle(h.state) is State.READY
        assert not h.state.fast_path


def test_breaker_log_names_the_cause_without_the_password(
    h: Handle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgwarden")
    h.open_breaker(lambda: OSError(f"connection refused by {URL}"))
    assert "circuit breaker closed -> open (OSError: connection refused by" in caplog.text
    assert SECRET not in caplog.text


def test_unavailable_error_carries_a_redacted_cause(h: Handle) -> None:
    h.open_breaker(lambda: OSError(f"connection refused: password={SECRET}"))
    error = h.state.unavailable_error(0.3)
    assert error.retry_after == 0.3
    assert "next probe in 0.30s" in str(error)
    assert "db.internal" in str(error)
    assert SECRET not in str(error)
    assert type(error.__cause__) is OSError  # the original error, not a stand-in
    assert "connection refused" in str(error.__cause__)
    assert SECRET not in str(error.__cause__)


def test_connect_bound_is_learnt_from_connects() -> None:
    state = Handle(connect_timeout=5.0).state
    assert state.connect_bound() == (FIRST_CONNECT_BOUND, False)  # nothing learnt yet
    state.connect_succeeded(0.01)
    assert state.connect_bound() == (CONNECT_BOUND_FLOOR, False)  # 10 x 10 ms, floored
    for _ in range(40):
        state.connect_succeeded(0.1)
    seconds, explorer = state.connect_bound()
    assert seconds == pytest.approx(CONNECT_BOUND_FACTOR * 0.1, rel=1e-3)
    assert not explorer
    for _ in range(40):
        state.connect_succeeded(2.0)
    assert state.connect_bound() == (5.0, False)  # never above connect_timeout


def test_first_connect_bound_never_exceeds_connect_timeout() -> None:
    assert Handle(connect_timeout=0.5).state.connect_bound() == (0.5, False)


def test_after_a_long_run_of_timeouts_one_explorer_gets_the_full_connect_timeout() -> None:
    handle = Handle(connect_timeout=2.0)
    state = handle.state
    state.connect_succeeded(0.01)
    short = state.connect_bound()
    assert short == (CONNECT_BOUND_FLOOR, False)
    assert state.connect_failed(WaitTimeout()) is K.NOTHING_RAN
    handle.advance(EXPLORE_AFTER_TIMEOUTS * 2.0 - 0.1)
    state.connect_failed(WaitTimeout())
    assert state.connect_bound() == short  # not long enough yet
    handle.advance(0.1)
    assert state.connect_bound() == (2.0, True)
    assert state.connect_bound() == short  # one explorer at a time
    state.connect_failed(WaitTimeout(), explorer=True)
    assert state.connect_bound() == (2.0, True)  # still timing out: explore again
    state.connect_succeeded(1.5, explorer=True)
    assert state.connect_bound()[1] is False  # a success ends the run of timeouts
    # Any other failure ends it too.
    state.connect_failed(WaitTimeout())
    handle.advance(10.0)
    state.connect_failed(refused())
    assert state.connect_bound()[1] is False


# --- overload and the pool limit ------------------------------------------------------------------


def test_overload_lowers_the_limit_and_turns_off_the_fast_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = Handle(max_size=10, sizing_quiet_period=5.0)
    handle.ready()
    state = handle.state
    assert state.fast_path
    caplog.set_level(logging.WARNING, logger="pgwarden")
    assert state.connect_failed(too_many()) is K.OVERLOAD
    assert breaker_of(state) is B.CLOSED  # overload is not an outage
    assert lifecycle(state) is State.DEGRADED
    assert not state.fast_path
    assert "local pool limit lowered to 5" in caplog.text
    assert state.wanted_limit() == 5
    state.limit_applied(5)
    assert state.applied_limit == 5
    assert state.wanted_limit() is None
    handle.advance(0.5)
    assert state.connect_failed(too_many()) is K.OVERLOAD  # within the debounce window
    assert state.wanted_limit() is None
    stats = state.stats(None)
    assert stats["pool"]["limit"] == 5
    assert stats["pool"]["configured_max"] == 10
    assert stats["counters"]["overload_events"] == 2
    assert stats["counters"]["connect_failures"] == {"overload": 2}
    # One step per quiet period back to the maximum; then READY and the fast path again.
    applied = []
    for _ in range(10):
        handle.advance(5.0)
        wanted = state.wanted_limit()
        if wanted is not None:
            applied.append(wanted)
            state.limit_applied(wanted)
    assert applied == [6, 7, 8, 9, 10]
    assert lifecycle(state) is State.READY
    assert state.fast_path


def test_a_statement_overload_lowers_the_limit_too() -> None:
    handle = Handle(max_size=8)
    handle.ready()
    kind, decision = handle.fail(too_many())
    assert kind is K.OVERLOAD
    assert isinstance(decision, Sleep)
    assert handle.state.wanted_limit() == 4
    assert not handle.state.fast_path


def test_overload_without_adaptive_sizing_keeps_the_limit() -> None:
    handle = Handle(adaptive_sizing=False)
    handle.ready()
    state = handle.state
    state.connect_failed(too_many())
    assert lifecycle(state) is State.DEGRADED
    assert not state.fast_path
    assert state.wanted_limit() is None  # nothing to apply, and nothing to wait for
    assert lifecycle(state) is State.READY
    assert state.fast_path


def test_a_lower_applied_limit_keeps_the_fast_path_off() -> None:
    handle = Handle(max_size=6)
    handle.ready()
    handle.state.limit_applied(3)
    assert not handle.state.fast_path
    assert handle.state.wanted_limit() == 6
    handle.state.limit_applied(6)
    assert handle.state.fast_path


# --- deadlines ------------------------------------------------------------------------------------


def test_deadline_for_default_timeout_is_a_backstop() -> None:
    handle = Handle(default_timeout=30.0)
    now = handle.clock()
    assert handle.state.deadline_for(None) == (now + 30.0, False)


def test_deadline_for_explicit_timeout() -> None:
    handle = Handle(default_timeout=30.0)
    now = handle.clock()
    assert handle.state.deadline_for(2.0) == (now + 2.0, True)
    assert handle.state.deadline_for(60.0) == (now + 60.0, True)  # not capped by the default
    assert handle.state.deadline_for(0.0) == (now, True)


def test_deadline_for_inside_a_deadline_context() -> None:
    handle = Handle(default_timeout=30.0)
    state, now = handle.state, handle.clock()
    with pgwarden.deadline(5.0, clock=handle.clock):
        assert state.deadline_for(None) == (now + 5.0, True)
        assert state.deadline_for(2.0) == (now + 2.0, True)  # the earlier bound wins
        assert state.deadline_for(10.0) == (now + 5.0, True)
        with pgwarden.deadline(60.0, clock=handle.clock):  # nested: can only tighten
            assert state.deadline_for(None) == (now + 5.0, True)
    with pgwarden.deadline(60.0, clock=handle.clock):  # longer than the default: allowed
        assert state.deadline_for(None) == (now + 60.0, True)
    assert state.deadline_for(None) == (now + 30.0, False)


def test_deadline_for_without_a_default() -> None:
    handle = Handle(default_timeout=None)
    state, now = handle.state, handle.clock()
    assert state.deadline_for(None) == (None, False)
    assert state.deadline_for(1.5) == (now + 1.5, True)
    with pgwarden.deadline(3.0, clock=handle.clock):
        assert state.deadline_for(None) == (now + 3.0, True)


# --- failed() -------------------------------------------------------------------------------------


def test_failed_counts_query_errors_only_for_user_calls() -> None:
    handle = Handle()
    expected = Sleep(handle_backoff(handle, 1), 1)
    assert handle.fail(conflict()) == (K.CONFLICT, expected)
    counters = handle.counters()
    assert counters["errors"] == {"conflict": 1}
    assert counters["retries"] == {
        "total": 1,
        "by_attempt": {"1": 1},
        "by_reason": {"conflict": 1},
    }
    # The warmup and other internal attempts are not user errors or user retries.
    kind, decision = handle.fail(conflict(), user_call=False)
    assert kind is K.CONFLICT
    assert isinstance(decision, Sleep)
    assert handle.counters()["errors"] == {"conflict": 1}
    assert handle.counters()["retries"]["total"] == 1


def handle_backoff(handle: Handle, attempt: int) -> float:
    """The backoff the handle's generator will draw next (without drawing it)."""
    twin = random.Random()
    twin.setstate(handle.state._rng.getstate())
    return handle.state.statement_policy.backoff(attempt, twin.random())


def test_only_user_calls_spend_the_retry_budget() -> None:
    handle = Handle(retry_budget_floor=0.0)  # no tokens until requests earn them
    for _ in range(20):
        assert isinstance(handle.fail(conflict(), user_call=False)[1], Sleep)
    assert handle.fail(conflict()) == (K.CONFLICT, GiveUp(GiveUpReason.BUDGET))
    assert handle.counters()["errors"] == {"conflict": 1}
    assert handle.counters()["retries"]["total"] == 0
    for _ in range(10):  # ten requests at ratio 0.1 earn one retry
        handle.state.enter()
        handle.state.leave()
    assert isinstance(handle.fail(conflict())[1], Sleep)
    assert handle.fail(conflict())[1] == GiveUp(GiveUpReason.BUDGET)


def test_failed_logs_retries_and_an_exhausted_budget(caplog: pytest.LogCaptureFixture) -> None:
    handle = Handle(retry_budget_floor=1.0)
    caplog.set_level(logging.INFO, logger="pgwarden")
    exc = DriverError(f"could not serialize access (url {URL})", "40001")
    assert isinstance(handle.fail(exc, attempt=1)[1], Sleep)
    assert handle.fail(exc, attempt=1)[1] == GiveUp(GiveUpReason.BUDGET)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("retrying query (attempt 2) after conflict: DriverError") for m in messages
    )
    assert "retry budget exhausted: not retrying query after conflict" in messages
    assert SECRET not in caplog.text
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["retry", "retry_budget_exhausted"]


@pytest.mark.parametrize(
    ("exc", "ctx", "lost", "expected"),
    [
        (DriverError("terminating connection", "57P01"), WRITE, False, (K.STALE, "sleep")),
        (
            DriverError("terminating connection", "57P01"),
            RetryContext(is_write=True, in_transaction=True),
            False,
            (K.LOST, "raise"),
        ),
        (DriverError("something odd"), READ, True, (K.LOST, "sleep")),
        (DriverError("something odd"), WRITE, True, (K.LOST, "raise")),
        (DriverError("something odd"), READ, False, (K.PERMANENT, "raise")),
    ],
    ids=["admin-shutdown", "admin-shutdown-in-tx", "lost-read", "lost-write", "unknown"],
)
def test_failed_classifies_with_what_the_shell_saw(
    exc: BaseException, ctx: RetryContext, lost: bool, expected: tuple[FailureKind, str]
) -> None:
    kind, decision = Handle().fail(exc, ctx, connection_lost=lost)
    shape = "sleep" if isinstance(decision, Sleep) else "raise" if decision == Raise() else "?"
    assert (kind, shape) == expected


def test_failed_gives_up_at_the_deadline_and_after_the_attempts() -> None:
    handle = Handle()
    now = handle.clock()
    assert handle.fail(conflict(), deadline=now)[1] == GiveUp(GiveUpReason.DEADLINE)
    assert handle.fail(DriverError("bad", "42601"), deadline=now - 1)[1] == GiveUp(
        GiveUpReason.DEADLINE
    )
    attempts = handle.state.statement_policy.attempts
    assert handle.fail(conflict(), attempt=attempts)[1] == GiveUp(GiveUpReason.ATTEMPTS)
    # A whole transaction is re-run for a conflict even though its statements were not.
    in_tx = RetryContext(is_write=True, in_transaction=True)
    assert handle.fail(conflict(), in_tx)[1] == Raise()
    assert isinstance(handle.fail(conflict(), in_tx, whole_transaction=True)[1], Sleep)


# --- enter / leave and events -----------------------------------------------------------------


def test_enter_and_leave_count_in_flight() -> None:
    state = Handle().state
    state.enter()
    state.enter()
    assert state.inflight == 2
    assert state.stats(None)["in_flight"] == 2
    state.leave()
    state.leave()
    assert state.inflight == 0


def test_a_frozen_process_validates_every_connection() -> None:
    handle = Handle(gap_threshold=10.0)
    state = handle.state
    state.enter()
    state.leave()
    handle.advance(5.0)
    state.enter()
    state.leave()
    assert state.validate_before == 0.0
    handle.advance(11.0)  # nothing ran for longer than gap_threshold
    state.enter()
    state.leave()
    assert state.validate_before == handle.clock()
    # The wall clock alone jumping (a suspended VM: monotonic time stood still) counts too.
    handle.clock.advance(1.0)
    handle.wall.advance(3600.0)
    state.enter()
    state.leave()
    assert state.validate_before == handle.clock()


def test_leave_records_queries_and_slow_ones_without_literals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = Handle(slow_query_threshold=1.0)
    state = handle.state
    caplog.set_level(logging.WARNING, logger="pgwarden")
    state.enter()
    state.leave(query="SELECT 1", seconds=0.01, acquire_wait=0.001, used=0.02)
    state.enter()
    state.leave(query="SELECT * FROM t WHERE token = 'tok-123'", seconds=2.5)
    counters = handle.counters()
    assert counters["queries"] == 2
    assert counters["slow_queries"] == 1
    assert "slow query (2.500s)" in caplog.text
    assert "tok-123" not in caplog.text
    histograms = state.stats(None)["histograms"]
    assert histograms["acquire_wait_seconds"]["count"] == 1
    assert histograms["connection_use_seconds"]["count"] == 1


# --- stats() --------------------------------------------------------------------------------------

STATS_KEYS = {
    "counters",
    "histograms",
    "last_warmup_seconds",
    "pool_limit",
    "pool",
    "state",
    "breaker",
    "pgbouncer",
    "warmup_seconds",
    "in_flight",
    "retry_budget_tokens",
}
POOL_KEYS = {
    "size",
    "idle",
    "in_use",
    "waiting",
    "max_size",
    "idle_max",
    "utilization",
    "limit",
    "configured_max",
    "connections_lost",
}


def test_stats_shape_without_a_pool() -> None:
    stats = Handle().state.stats(None)
    assert set(stats) == STATS_KEYS
    assert set(stats["pool"]) == POOL_KEYS
    assert stats["pool"] == {
        "size": 0,
        "idle": 0,
        "in_use": 0,
        "waiting": 0,
        "max_size": 10,
        "idle_max": 10,
        "utilization": 0.0,
        "limit": 10,
        "configured_max": 10,
        "connections_lost": 0,
    }
    assert (stats["state"], stats["breaker"], stats["pgbouncer"]) == ("new", "closed", False)
    assert stats["warmup_seconds"] is None
    assert stats["in_flight"] == 0
    assert stats["retry_budget_tokens"] == 2.0  # one second of the floor to start with


def test_stats_shape_with_pool_stats() -> None:
    pool_stats = {
        "pool_size": 4,
        "pool_available": 1,
        "requests_waiting": 2,
        "pool_max": 8,
        "connections_lost": 1,
        "returns_bad": 2,
    }
    stats = Handle(pgbouncer="on").state.stats(pool_stats)
    assert set(stats) == STATS_KEYS
    pool = stats["pool"]
    # waiting is pgwarden's own count of callers, not psycopg_pool's requests_waiting (2).
    assert (pool["size"], pool["idle"], pool["in_use"], pool["waiting"]) == (4, 1, 3, 0)
    assert (pool["max_size"], pool["utilization"]) == (8, 3 / 8)
    assert pool["connections_lost"] == 3
    assert stats["pgbouncer"] is True


def test_stats_does_not_spend_the_retry_budget() -> None:
    handle = Handle(retry_budget_floor=0.0)  # tokens only from requests: exact arithmetic
    state = handle.state
    assert state.stats(None)["retry_budget_tokens"] == 0.0
    for _ in range(10):
        state.enter()
        state.leave()
    for _ in range(100):
        assert state.stats(None)["retry_budget_tokens"] == 1.0  # shown, not spent
        handle.advance(1.0)
    assert isinstance(handle.fail(conflict())[1], Sleep)
    assert state.stats(None)["retry_budget_tokens"] == 0.0
    assert handle.fail(conflict())[1] == GiveUp(GiveUpReason.BUDGET)


def _retries_granted(read_stats_first: bool) -> int:
    handle = Handle()
    if read_stats_first:
        handle.state.stats(None)  # a metrics scrape at start-up
    handle.advance(10.0)  # ten quiet seconds
    granted = 0
    for _ in range(30):
        handle.state.enter()
        granted += isinstance(handle.fail(conflict())[1], Sleep)
        handle.state.leave()
    return granted


def test_stats_does_not_change_what_retries_may_do() -> None:
    assert _retries_granted(read_stats_first=True) == _retries_granted(read_stats_first=False)


def test_add_tracker_reports_to_both_and_keeps_the_stats_shape() -> None:
    handle = Handle()
    state = handle.state
    primary = state.tracker
    extra = StatsTracker()
    before = state.stats(None)
    remove = state.add_tracker(extra)
    assert isinstance(state.tracker, TeeTracker)
    state.enter()
    state.leave(seconds=0.01)
    state.connect_failed(refused())
    assert extra.snapshot()["counters"]["queries"] == 1  # type: ignore[index]
    after = state.stats(None)
    assert after.keys() == before.keys()
    assert after["counters"]["queries"] == 1
    assert after["counters"]["connect_failures"] == {"nothing_ran": 1}
    remove()
    assert state.tracker is primary
    remove()  # harmless twice
    assert state.tracker is primary


def test_metrics_off_installs_a_noop_tracker() -> None:
    state = Handle(metrics=False).state
    state.enter()
    state.leave(seconds=0.5)
    assert state.histograms() == {}
    assert set(state.stats(None)) >= {"pool", "state", "breaker", "in_flight"}


def test_histograms_are_the_live_stats_histograms() -> None:
    state = Handle().state
    state.add_tracker(StatsTracker())  # through a tee as well
    histograms = state.histograms()
    assert set(histograms) >= {"query_duration_seconds", "acquire_wait_seconds"}
    state.enter()
    state.leave(seconds=0.01)
    assert histograms["query_duration_seconds"].count == 1


# --- thread safety ------------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads every 10 µs instead of every 5 ms: many more interleavings."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(targets: list[Callable[[], None]]) -> None:
    """Start all targets together, join them, and re-raise the first failure in any."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                target()
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a thread is stuck"
    if errors:
        raise errors[0]


class NumberedClock:
    """The real monotonic clock, numbering its reads and noting the breaker state at each.

    ``admit()``, ``connect_failed()`` and ``connect_succeeded()`` each read the clock exactly
    once, inside the state's lock, right before the breaker acts (each call checks that it read
    it once). A read's number is therefore the operation's place in the lock order, and the
    breaker state noted at the read is the state that operation found: sorting the operations
    by it replays exactly what the breaker saw, whatever the threads interleaved.
    """

    def __init__(self) -> None:
        self.state: HandleState | None = None
        self.seen: dict[int, tuple[float, BreakerState | None]] = {}
        self._numbers = itertools.count()
        self._local = threading.local()

    def __call__(self) -> float:
        now = time.monotonic()
        state = self.state
        if state is None:
            return now  # HandleState's own construction (it anchors the retry budget)
        number = next(self._numbers)
        self.seen[number] = (now, state.breaker_state)
        self._local.reads = self.reads() + 1
        self._local.last = number
        return now

    def reads(self) -> int:
        reads: int = getattr(self._local, "reads", 0)
        return reads

    def numbered(self, call: Callable[[], T]) -> tuple[int, T]:
        """Run *call* (one state operation) and return its number and result."""
        before = self.reads()
        result = call()
        assert self.reads() == before + 1, "each operation reads the clock exactly once"
        last: int = self._local.last
        return last, result


Record = tuple[int, str, object]


def replay_probes(
    clock: NumberedClock, records: list[Record], probe_timeout: float
) -> dict[str, int]:
    """Replay the operations in lock order and check the single-probe rule.

    A probe is outstanding from the PROBE until an outcome is reported while the breaker is
    half open: by the probe itself or by any concurrent connect (the breaker takes any outcome
    in HALF_OPEN as the probe's). A second PROBE while one is outstanding is allowed only once
    ``probe_timeout`` has passed (the first is then presumed lost).
    """
    records.sort()
    numbers = [number for number, _, _ in records]
    assert numbers == list(range(len(records))), "a clock read belongs to no recorded call"
    outstanding = 0
    granted_at = 0.0
    tally = dict.fromkeys(["probes", "answered", "presumed_lost", "rejected"], 0)
    for number, op, result in records:
        now, before = clock.seen[number]
        assert (before is B.HALF_OPEN) == (outstanding == 1), (number, op, before, outstanding)
        if op == "admit":
            if before is B.CLOSED:
                assert result is A.ALLOW
            elif result is A.PROBE:
                if before is B.HALF_OPEN:
                    assert now - granted_at >= probe_timeout, "two probes outstanding"
                    tally["presumed_lost"] += 1
                else:
                    assert before is B.OPEN
                outstanding = 1
                granted_at = now
                tally["probes"] += 1
            else:
                assert result is A.REJECT
                tally["rejected"] += 1
        elif before is B.HALF_OPEN:
            outstanding = 0
            tally["answered"] += 1
        assert 0 <= outstanding <= 1
    return tally


def test_one_probe_at_a_time_under_concurrency(
    busy_switching: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pgwarden")  # thousands of breaker transitions
    settings = Settings(
        url=URL,
        breaker_cooldown=0.001,
        breaker_max_cooldown=0.002,
        # Settings refuses 0 ("must be > 0"); a nanosecond is as good as none.
        breaker_min_outage=1e-9,
    )
    clock = NumberedClock()
    state = HandleState(settings, clock=clock, rng=random.Random(99))
    clock.state = state
    probe_timeout = max(settings.breaker_max_cooldown, settings.breaker_cooldown)
    stop = time.monotonic() + 1.0
    recorded: list[list[Record]] = []

    def report(rng: random.Random, log: list[Record], success_rate: float) -> None:
        if rng.random() < success_rate:
            number, _ = clock.numbered(lambda: state.connect_succeeded(0.001))
            log.append((number, "success", None))
        else:
            exc = link_down() if rng.random() < 0.5 else refused()
            number, kind = clock.numbered(lambda: state.connect_failed(exc))
            assert kind is K.NOTHING_RAN
            log.append((number, "failure", kind))

    def prober(seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            log: list[Record] = []
            recorded.append(log)
            while time.monotonic() < stop:
                number, (verdict, retry_after) = clock.numbered(state.admit)
                assert retry_after >= 0.0
                log.append((number, "admit", verdict))
                if verdict is A.PROBE:
                    time.sleep(rng.random() * 2e-4)  # the probe connects
                    report(rng, log, success_rate=0.5)

        return run

    def reporter(seed: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            log: list[Record] = []
            recorded.append(log)
            while time.monotonic() < stop:
                report(rng, log, success_rate=0.3)  # the pool's workers, mostly failing
                time.sleep(0)

        return run

    run_threads([prober(i) for i in range(8)] + [reporter(100 + i) for i in range(4)])
    records = [record for log in recorded for record in log]
    tally = replay_probes(clock, records, probe_timeout)
    # The run exercised what it claims to: many probes, answered by their own prober and by
    # concurrent connects, and many callers turned away.
    assert tally["probes"] >= 20, tally
    assert tally["answered"] >= 20, tally
    assert tally["rejected"] >= 100, tally


def test_enter_and_leave_from_many_threads_lose_no_update(busy_switching: None) -> None:
    # Note: on a GIL build of CPython 3.11 an attribute ``+= 1`` is not interrupted between
    # its bytecodes, so this passes even without the lock; it guards free-threaded builds
    # and future refactors (a read-modify-write split by a call would lose updates here).
    threads, rounds = 16, 10_000
    # Requests are also credited to the retry budget; with no floor and a small ratio the
    # shown tokens count every enter() exactly (to 0.001 token, i.e. 10 requests).
    state = HandleState(
        Settings(url=URL, retry_budget_floor=0.0, retry_budget_ratio=1e-4), rng=random.Random(3)
    )
    inside = threading.Barrier(threads + 1)
    checked = threading.Barrier(threads + 1)

    def worker() -> None:
        state.enter()
        inside.wait()  # everybody is in flight at once
        checked.wait()
        state.leave()
        for _ in range(rounds):
            state.enter()
            state.leave()

    def main() -> None:
        inside.wait()
        assert state.inflight == threads
        checked.wait()

    run_threads([worker] * threads + [main])
    assert state.inflight == 0
    stats = state.stats(None)
    assert stats["in_flight"] == 0
    requests = threads * (rounds + 1)
    assert stats["retry_budget_tokens"] == round(1e-4 * requests, 3)


def test_redacted_cause_keeps_the_psycopg_error_its_sqlstate_and_diag(h: Handle) -> None:
    exc = psycopg.errors.InvalidPassword(f"password authentication failed; password={SECRET}")
    cause = h.state.redacted_cause(exc)
    assert cause is exc
    assert type(cause) is psycopg.errors.InvalidPassword
    assert cause.sqlstate == "28P01"
    assert cause.diag is not None
    assert SECRET not in str(cause)
    assert SECRET not in repr(cause)
    assert "password authentication failed" in str(cause)


def test_a_learnt_write_is_sent_as_a_write_and_the_set_is_bounded(h: Handle) -> None:
    state = h.state
    assert not state.statement_writes("SELECT add_row(1)")
    state.learn_write("SELECT add_row(1)")
    assert state.statement_writes("SELECT add_row(1)")
    assert not state.statement_writes("SELECT 1")
    for i in range(LEARNED_WRITES_MAX + 10):
        state.learn_write(f"SELECT f{i}()")
    assert len(state._learned_writes) == LEARNED_WRITES_MAX
