"""Deadlines: context-scoped, nested ones only tighten; timeouts in milliseconds."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core.deadline import (
    MAX_STATEMENT_TIMEOUT_MS,
    Deadline,
    current_deadline,
    deadline,
    effective_deadline,
    statement_timeout_ms,
)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_deadline_value() -> None:
    d = Deadline(10.0)
    assert d.remaining(7.5) == 2.5
    assert d.remaining(11.0) == 0.0
    assert not d.expired(9.99)
    assert d.expired(10.0)


def test_no_deadline_outside_a_scope() -> None:
    assert current_deadline() is None


def test_scope_sets_and_restores() -> None:
    clock = FakeClock(100.0)
    with deadline(2.5, clock=clock) as d:
        assert d == Deadline(102.5)
        assert current_deadline() == d
    assert current_deadline() is None
    assert clock.reads == 1  # the one sanctioned clock read


def test_scope_restores_on_exception() -> None:
    with pytest.raises(KeyError), deadline(1.0, clock=FakeClock()):
        raise KeyError("x")
    assert current_deadline() is None


def test_inner_later_deadline_cannot_extend_the_outer_one() -> None:
    clock = FakeClock(0.0)
    with deadline(1.0, clock=clock) as outer:
        with deadline(10.0, clock=clock) as inner:
            assert inner is outer
            assert current_deadline() == Deadline(1.0)
        assert current_deadline() == outer


def test_inner_earlier_deadline_wins_and_outer_comes_back() -> None:
    clock = FakeClock(0.0)
    with deadline(10.0, clock=clock) as outer:
        clock.now = 2.0
        with deadline(1.0, clock=clock) as inner:
            assert inner == Deadline(3.0)
            assert current_deadline() == inner
        assert current_deadline() == outer == Deadline(10.0)


def test_zero_negative_and_infinite() -> None:
    clock = FakeClock(5.0)
    with deadline(0, clock=clock) as d:
        assert d.expired(5.0)
    with deadline(-3, clock=clock) as d:
        assert d.expired(4.0)
    with deadline(math.inf, clock=clock) as d:
        assert not d.expired(1e300)
        assert statement_timeout_ms(d.remaining(5.0)) == MAX_STATEMENT_TIMEOUT_MS


def test_nan_is_rejected() -> None:
    with pytest.raises(ValueError, match="nan"):
        deadline(math.nan)


def test_a_scope_is_single_use() -> None:
    scope = deadline(1.0, clock=FakeClock())
    with scope, pytest.raises(RuntimeError, match="twice"):
        scope.__enter__()
    assert current_deadline() is None


def test_default_clock_is_monotonic() -> None:
    import time

    before = time.monotonic()
    with deadline(5.0) as d:
        assert before + 5.0 <= d.expires_at <= time.monotonic() + 5.0


def test_deadline_follows_tasks_and_does_not_leak_between_them() -> None:
    async def observe() -> Deadline | None:
        await asyncio.sleep(0)
        return current_deadline()

    async def scoped(seconds: float) -> Deadline | None:
        with deadline(seconds, clock=lambda: 0.0):
            await asyncio.sleep(0)
            return await observe()

    async def main() -> None:
        # Each task copies the context it was created in.
        with deadline(3.0, clock=lambda: 0.0):
            child = asyncio.create_task(observe())
        assert await child == Deadline(3.0)
        # Concurrent tasks with their own deadlines do not see each other's.
        a, b, c = await asyncio.gather(scoped(1.0), scoped(2.0), observe())
        assert (a, b, c) == (Deadline(1.0), Deadline(2.0), None)
        assert current_deadline() is None

    asyncio.run(main())


# --- effective_deadline --------------------------------------------------------------------------


def test_effective_nothing_given() -> None:
    assert effective_deadline(10.0, None, None) is None


def test_effective_default_is_a_fallback() -> None:
    assert effective_deadline(10.0, None, 30.0) == 40.0
    assert effective_deadline(10.0, 60.0, 30.0) == 70.0  # an explicit timeout beats it


def test_effective_default_does_not_cap_a_context_deadline() -> None:
    with deadline(60.0, clock=lambda: 10.0):
        assert effective_deadline(10.0, None, 30.0) == 70.0


def test_effective_earliest_explicit_bound_wins() -> None:
    with deadline(5.0, clock=lambda: 10.0):
        assert effective_deadline(10.0, 2.0, 30.0) == 12.0
        assert effective_deadline(10.0, 9.0, 1.0) == 15.0
        assert effective_deadline(10.0, None, None) == 15.0


@given(
    nest=st.lists(st.floats(min_value=-10.0, max_value=1e4), min_size=1, max_size=8),
    timeout=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1e4)),
)
def test_nesting_always_yields_the_earliest(nest: list[float], timeout: float | None) -> None:
    clock = FakeClock(0.0)

    def enter(depth: int) -> None:
        if depth == len(nest):
            expected = min(nest)
            assert current_deadline() == Deadline(expected)
            if timeout is not None:
                expected = min(expected, timeout)
            assert effective_deadline(0.0, timeout, 99.0) == expected
            return
        outer = current_deadline()
        with deadline(nest[depth], clock=clock) as d:
            assert d.expires_at == min(nest[: depth + 1])
            enter(depth + 1)
        assert current_deadline() == outer

    enter(0)
    assert current_deadline() is None


# --- statement_timeout_ms ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (2.5, 2500),
        (2.3, 2300),  # not 2301: float noise is not a millisecond
        (0.0001, 1),
        (0.0015, 2),
        (0.0, 1),
        (-5.0, 1),
        (1e12, MAX_STATEMENT_TIMEOUT_MS),
    ],
)
def test_statement_timeout_ms(remaining: float, expected: int) -> None:
    assert statement_timeout_ms(remaining) == expected


def test_statement_timeout_floor() -> None:
    assert statement_timeout_ms(0.001, floor_ms=50) == 50
    with pytest.raises(ValueError, match="floor_ms"):
        statement_timeout_ms(1.0, floor_ms=0)
    with pytest.raises(ValueError, match="nan"):
        statement_timeout_ms(math.nan)


@given(
    remaining=st.floats(allow_nan=False),
    floor_ms=st.integers(min_value=1, max_value=10_000),
)
def test_statement_timeout_bounds(remaining: float, floor_ms: int) -> None:
    ms = statement_timeout_ms(remaining, floor_ms=floor_ms)
    assert isinstance(ms, int)
    assert 1 <= ms <= MAX_STATEMENT_TIMEOUT_MS
    assert ms >= min(floor_ms, MAX_STATEMENT_TIMEOUT_MS)
    if 0 < remaining < 1e6 and ms > floor_ms:
        # Never cut the caller short by more than float noise, never pad by a whole ms.
        assert remaining * 1000 - 1e-6 <= ms < remaining * 1000 + 1
