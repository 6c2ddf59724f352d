"""Truthful health and the waiting gauge, in HandleState (no server).

The waiting gauge is pgwarden's own count of callers waiting for a pooled connection
(psycopg_pool's ``requests_waiting`` also counts every ``getconn()`` slice that timed
out). Health freshness: a failure seen after a cached check began makes it stale, and a
connect that failed with no success since is reported at once.
"""

from __future__ import annotations

import asyncio
import random
import threading
from time import monotonic
from typing import Any

import pytest
from psycopg_pool import PoolTimeout

from pgwarden import AcquireTimeout, Settings, SettingsError
from pgwarden._async.acquire import AsyncConnections
from pgwarden._handle.state import HandleState, HealthMark
from pgwarden.core.classify import FailureKind, Phase, RetryContext

K = FailureKind
SECRET = "pw-s3cret"
URL = f"postgresql://app:{SECRET}@db.internal:5432/orders"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Driver(Exception):
    """Shaped like a psycopg error (a ``sqlstate`` attribute)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def refused() -> OSError:
    return OSError(f"connection to postgresql://app:{SECRET}@db.internal refused")


def too_many() -> Driver:
    return Driver("FATAL:  sorry, too many clients already", "53300")


def make(**overrides: Any) -> tuple[HandleState, FakeClock]:
    clock = FakeClock(100.0)
    state = HandleState(Settings(url=URL, **overrides), clock=clock, rng=random.Random(7))
    return state, clock


def waiting(state: HandleState) -> int:
    return int(state.stats(None)["pool"]["waiting"])


def report(state: HandleState, ok: bool, began: HealthMark | None = None) -> dict[str, Any]:
    """What the shell does after a round trip that began at *began* (default: now)."""
    mark = state.health_check_began() if began is None else began
    made = state.health_report(ok, 0.001, None if ok else refused(), None)
    state.health_checked(ok, made, mark)
    return made


def query_failure(state: HandleState, exc: BaseException, **kw: Any) -> FailureKind:
    kind, _ = state.failed(
        exc,
        Phase.STATEMENT,
        RetryContext(is_write=False),
        attempt=1,
        deadline=None,
        policy=state.statement_policy,
        operation="query",
        **kw,
    )
    return kind


# --- the waiting gauge -----------------------------------------------------------------------


def test_waiting_counts_callers_past_the_grace_only() -> None:
    state, clock = make()
    grace = state.WAITING_GRACE
    early = state.wait_started(clock())
    clock.advance(grace * 0.6)
    fresh = state.wait_started(clock())  # e.g. a checkout being served at once
    assert waiting(state) == 0
    clock.advance(grace * 0.6)
    assert waiting(state) == 1
    clock.advance(grace * 0.6)
    assert waiting(state) == 2
    state.wait_ended(early)
    state.wait_ended(fresh)
    assert waiting(state) == 0


def test_waiting_never_goes_negative() -> None:
    state, clock = make()
    token = state.wait_started(clock() - 1)
    state.wait_ended(token)
    state.wait_ended(token)  # a second end of the same wait is harmless
    state.wait_ended(object())  # and so is an unknown token
    assert waiting(state) == 0
    again = state.wait_started(clock() - 1)
    assert waiting(state) == 1
    state.wait_ended(again)
    assert waiting(state) == 0


def test_waiting_ignores_psycopg_pools_dead_queue_entries() -> None:
    state, clock = make()
    token = state.wait_started(clock() - 1)
    pool_stats = {"pool_size": 2, "pool_available": 0, "requests_waiting": 80, "pool_max": 2}
    assert state.stats(pool_stats)["pool"]["waiting"] == 1
    state.wait_ended(token)


def test_waiting_is_exact_under_threads() -> None:
    state = HandleState(Settings(url=URL))  # the real clock
    barrier = threading.Barrier(8)
    peak: list[int] = []

    def caller() -> None:
        barrier.wait()
        for _ in range(2000):
            token = state.wait_started(monotonic() - 1)
            try:
                peak.append(waiting(state)) if len(peak) < 50 else None
            finally:
                state.wait_ended(token)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert waiting(state) == 0
    assert peak
    assert max(peak) <= 8


class FakePool:
    """``getconn(timeout)`` that never has a connection (or hands one out after *after*)."""

    Timeout = PoolTimeout  # what `PgwAsyncPool.getconn` raises, as the handle reads it

    def __init__(self, after: float | None = None) -> None:
        self.after = after
        self.calls = 0
        self.started = monotonic()

    async def getconn(self, timeout: float) -> Any:
        self.calls += 1
        if self.after is not None and monotonic() - self.started >= self.after:
            return object()
        await asyncio.sleep(timeout)
        raise PoolTimeout("no connection")


def test_getconn_counts_one_waiter_and_uncounts_it_on_cancel_timeout_and_success() -> None:
    async def main() -> None:
        state, _ = make(acquire_timeout=2.0)
        state._clock = monotonic  # the shell's clock; the fake one is for the other tests
        connections = AsyncConnections(state)

        def getconn(pool: Any, deadline: float | None = None, counted: bool = True) -> Any:
            return connections._getconn(
                pool, deadline, deadline is not None, monotonic(), counted=counted
            )

        # Cancelled while waiting (several slices in).
        task = asyncio.ensure_future(getconn(FakePool()))
        await asyncio.sleep(0.3)
        assert waiting(state) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiting(state) == 0

        # Gave up: out of time.
        pool = FakePool()
        with pytest.raises(AcquireTimeout):
            await getconn(pool, monotonic() + 0.4)
        assert pool.calls >= 2  # it did wait in slices
        assert waiting(state) == 0

        # Got one after a wait; and an internal (uncounted) wait never shows.
        got = asyncio.ensure_future(getconn(FakePool(after=0.3)))
        hidden = asyncio.ensure_future(getconn(FakePool(after=0.3), counted=False))
        await asyncio.sleep(0.1)
        assert waiting(state) == 1
        await asyncio.gather(got, hidden)
        assert waiting(state) == 0

    asyncio.run(main())


# --- health freshness ------------------------------------------------------------------------


def test_a_cached_report_lasts_the_interval_without_news() -> None:
    state, clock = make(health_interval=5.0)
    assert state.cached_health() is None
    made = report(state, True)
    clock.advance(4.9)
    assert state.cached_health() is made
    clock.advance(0.2)
    assert state.cached_health() is None


def test_a_connect_failure_after_the_check_began_makes_it_stale() -> None:
    state, clock = make(health_interval=60.0)
    state.connect_failed(refused())  # before the check: old news
    clock.advance(1)
    made = report(state, True)
    clock.advance(1)
    assert state.cached_health() is made
    state.connect_failed(refused())
    assert state.cached_health() is None


def test_a_failure_during_the_check_makes_its_own_report_stale() -> None:
    state, clock = make(health_interval=60.0)
    began = state.health_check_began()
    state.connect_failed(refused())  # seen while the check ran
    clock.advance(0.5)
    report(state, False, began)
    assert state.cached_health() is None


@pytest.mark.parametrize(
    ("exc", "stale"),
    [
        (Driver("terminating connection due to administrator command", "57P01"), True),
        (Driver("the database system is shutting down", "57P03"), True),
        (Driver("cannot execute UPDATE in a read-only transaction", "25006"), True),
        (Driver("could not serialize access", "40001"), False),
        (Driver('relation "nope" does not exist', "42P01"), False),
        (Driver("canceling statement due to statement timeout", "57014"), False),
    ],
)
def test_only_outage_query_failures_make_the_report_stale(exc: Exception, stale: bool) -> None:
    state, clock = make(health_interval=60.0)
    made = report(state, True)
    clock.advance(0.1)
    kind = query_failure(state, exc)
    assert (kind in state.OUTAGE_KINDS) is stale
    assert (state.cached_health() is None) is stale
    if not stale:
        assert state.cached_health() is made


def test_a_lost_connection_makes_the_report_stale() -> None:
    state, clock = make(health_interval=60.0)
    made = report(state, True)
    clock.advance(0.1)
    query_failure(state, Driver("server closed the connection unexpectedly"), connection_lost=True)
    assert state.cached_health() is None

    state, clock = make(health_interval=60.0)
    made = report(state, True)
    clock.advance(0.1)
    for reason in ("idle", "lifetime", "drain", "close"):
        state.connection_closed(reason)
    assert state.cached_health() is made
    state.connection_closed("broken")
    assert state.cached_health() is None


def test_a_failed_report_goes_stale_when_a_connect_succeeds() -> None:
    state, clock = make(health_interval=60.0)
    failed = report(state, False)
    clock.advance(0.1)
    assert state.cached_health() is failed
    state.connect_succeeded(0.01)
    assert state.cached_health() is None
    # ...but a passing report does not: a success is no news for it.
    passed = report(state, True)
    clock.advance(0.1)
    state.connect_succeeded(0.01)
    assert state.cached_health() is passed


def test_known_down_until_a_connect_succeeds() -> None:
    state, clock = make()
    assert state.known_down() is None
    state.connect_failed(refused())
    down = state.known_down()
    assert isinstance(down, OSError)
    # The report built from it carries the redacted error, never the password.
    made = state.health_report(False, 0.0, down, None)
    assert made["ok"] is False
    assert "refused" in made["error"]
    assert SECRET not in repr(made)
    clock.advance(1)
    state.connect_succeeded(0.01)
    assert state.known_down() is None


def test_overload_is_not_known_down() -> None:
    state, _ = make()
    state.connect_failed(refused())
    assert state.connect_failed(too_many()) is K.OVERLOAD
    assert state.known_down() is None  # the server is up and full: a round trip tells


def test_a_passing_round_trip_after_the_failure_ends_known_down() -> None:
    state, clock = make()
    state.connect_failed(refused())
    clock.advance(0.1)
    report(state, True)  # an existing connection still answered
    assert state.known_down() is None
    clock.advance(0.1)
    state.connect_failed(refused())  # a newer failure: down again
    assert state.known_down() is not None
    clock.advance(0.1)
    report(state, False)  # a failing round trip does not clear it
    assert state.known_down() is not None


def test_health_checked_counts_every_report_and_keeps_the_newest() -> None:
    state, clock = make(health_interval=60.0)
    older = state.health_check_began()
    clock.advance(1)
    newer = report(state, True)
    report(state, True, older)  # an older check finishing late does not replace it
    clock.advance(2)
    assert state.cached_health() is newer
    state.health_checked(False)  # a report without a round trip is only counted
    assert state.cached_health() is newer
    assert state.stats(None)["counters"]["health_checks"] == {"passed": 2, "failed": 1}


def test_health_timeout_setting() -> None:
    assert Settings().health_timeout == 1.0
    assert Settings.from_env({"PGWARDEN_HEALTH_TIMEOUT": "0.5"}).health_timeout == 0.5
    for bad in (0, -1.0, True):
        with pytest.raises(SettingsError, match="health_timeout"):
            Settings(health_timeout=bad)
