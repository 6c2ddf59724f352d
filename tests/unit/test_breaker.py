"""CircuitBreaker (pure: time is an argument)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core.breaker import Admission, BreakerState, CircuitBreaker

A = Admission
S = BreakerState


def opened(threshold: int = 3, cooldown: float = 2.0, max_cooldown: float = 30.0) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=threshold, cooldown=cooldown, max_cooldown=max_cooldown)
    for _ in range(threshold - 1):
        assert breaker.on_failure(0.0) is None
    assert breaker.on_failure(0.0) is S.OPEN
    return breaker


def state_of(breaker: CircuitBreaker) -> BreakerState:
    # A function call, so that mypy does not narrow the property across calls.
    return breaker.state


def test_defaults() -> None:
    breaker = CircuitBreaker()
    assert (breaker.threshold, breaker.base_cooldown, breaker.max_cooldown) == (5, 2.0, 30.0)
    assert breaker.probe_timeout == 30.0
    assert breaker.state is S.CLOSED
    assert breaker.admit(0.0) is A.ALLOW
    assert breaker.retry_after(0.0) == 0.0


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=3)
    assert breaker.on_failure(1.0) is None
    assert breaker.on_failure(1.0) is None
    assert breaker.consecutive_failures == 2
    assert breaker.admit(1.0) is A.ALLOW
    assert breaker.on_failure(1.0) is S.OPEN
    assert breaker.state is S.OPEN
    assert breaker.transitions == 1


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(threshold=3)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    assert breaker.on_success(0.0) is None
    assert breaker.consecutive_failures == 0
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    assert breaker.state is S.CLOSED


def test_rejects_during_cooldown_then_one_probe() -> None:
    breaker = opened(cooldown=2.0)
    assert breaker.admit(1.99) is A.REJECT
    assert breaker.retry_after(1.5) == pytest.approx(0.5)
    assert state_of(breaker) is S.OPEN  # the cooldown passing alone changes nothing
    assert breaker.admit(2.0) is A.PROBE
    assert state_of(breaker) is S.HALF_OPEN
    assert breaker.admit(2.0) is A.REJECT
    assert breaker.admit(3.0) is A.REJECT


def test_probe_success_closes_and_resets_cooldown() -> None:
    breaker = opened(cooldown=2.0)
    assert breaker.admit(2.0) is A.PROBE
    assert breaker.on_failure(2.0) is S.OPEN
    assert breaker.cooldown == 4.0
    assert breaker.admit(5.9) is A.REJECT
    assert breaker.admit(6.1) is A.PROBE
    assert breaker.on_success(6.2) is S.CLOSED
    assert breaker.state is S.CLOSED
    assert breaker.cooldown == 2.0
    assert breaker.consecutive_failures == 0
    assert breaker.admit(6.2) is A.ALLOW


def test_failed_probe_doubles_cooldown_up_to_the_cap() -> None:
    breaker = opened(cooldown=2.0, max_cooldown=10.0)
    now = 0.0
    cooldowns = []
    for _ in range(5):
        now += breaker.cooldown
        assert breaker.admit(now) is A.PROBE
        assert breaker.on_failure(now) is S.OPEN
        cooldowns.append(breaker.cooldown)
        assert breaker.admit(now + breaker.cooldown - 0.01) is A.REJECT
    assert cooldowns == [4.0, 8.0, 10.0, 10.0, 10.0]


def test_reopening_after_close_starts_from_the_base_cooldown() -> None:
    breaker = opened(threshold=1, cooldown=1.0)
    breaker.admit(1.0)
    breaker.on_failure(1.0)
    assert breaker.cooldown == 2.0
    breaker.admit(3.0)
    breaker.on_success(3.0)
    assert breaker.on_failure(4.0) is S.OPEN
    assert breaker.cooldown == 1.0


def test_stragglers_are_ignored_while_open() -> None:
    breaker = opened()
    assert breaker.on_success(0.5) is None
    assert breaker.on_failure(0.5) is None
    assert breaker.state is S.OPEN
    assert breaker.retry_after(0.5) == pytest.approx(1.5)  # the failure did not extend it


def test_lost_probe_is_replaced_after_probe_timeout() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, max_cooldown=4.0, probe_timeout=10.0)
    breaker.on_failure(0.0)
    assert breaker.admit(1.0) is A.PROBE
    assert breaker.admit(10.9) is A.REJECT
    assert breaker.admit(11.0) is A.PROBE
    assert breaker.admit(11.0) is A.REJECT


def test_abandoned_probe_lets_the_next_caller_probe_at_once() -> None:
    breaker = opened(cooldown=2.0)
    assert breaker.admit(2.0) is A.PROBE
    assert breaker.abandon_probe(2.5) is S.OPEN
    assert breaker.cooldown == 2.0
    assert breaker.retry_after(2.5) == 0.0
    assert breaker.admit(2.5) is A.PROBE
    assert breaker.abandon_probe(2.5) is S.OPEN
    assert breaker.abandon_probe(2.5) is None  # not half-open any more


def test_retry_after_while_probing_is_an_estimate() -> None:
    breaker = opened(cooldown=2.0)
    breaker.admit(2.0)
    assert breaker.retry_after(2.0) == 2.0


def test_threshold_one() -> None:
    breaker = CircuitBreaker(threshold=1)
    assert breaker.on_failure(0.0) is S.OPEN


def test_transitions_are_counted() -> None:
    breaker = opened()  # CLOSED -> OPEN
    breaker.admit(2.0)  # -> HALF_OPEN
    breaker.on_failure(2.0)  # -> OPEN
    breaker.admit(6.0)  # -> HALF_OPEN
    breaker.on_success(6.0)  # -> CLOSED
    assert breaker.transitions == 5


def test_repr() -> None:
    assert "state=closed" in repr(CircuitBreaker())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0},
        {"cooldown": -1.0},
        {"cooldown": 5.0, "max_cooldown": 1.0},
        {"max_cooldown": float("inf")},
        {"probe_timeout": 0.0},
    ],
)
def test_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "success", "failure", "abandon"]),
        st.floats(min_value=0.0, max_value=5.0),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    max_size=200,
)


@given(
    ops=ops,
    threshold=st.integers(min_value=1, max_value=5),
    cooldown=st.floats(min_value=0.0, max_value=5.0),
    extra=st.floats(min_value=0.0, max_value=30.0),
    probe_timeout=st.floats(min_value=0.1, max_value=40.0),
)
def test_breaker_invariants(
    ops: list[tuple[str, float, float]],
    threshold: int,
    cooldown: float,
    extra: float,
    probe_timeout: float,
) -> None:
    breaker = CircuitBreaker(
        threshold=threshold,
        cooldown=cooldown,
        max_cooldown=cooldown + extra,
        probe_timeout=probe_timeout,
    )
    now = 0.0
    probe_since: float | None = None  # when the probe in flight was admitted
    opened_at: float | None = None
    wait = 0.0  # the jittered wait before the next probe, as last opened
    for op, dt, rand in ops:
        now += dt
        before = breaker.state
        if op == "admit":
            verdict = breaker.admit(now)
            if before is S.CLOSED:
                assert verdict is A.ALLOW
            else:
                assert verdict is not A.ALLOW
            if before is S.OPEN and opened_at is not None and now - opened_at < wait:
                assert verdict is A.REJECT, "admitted while the cooldown runs"
            if verdict is A.PROBE:
                # Never two probes at once, unless the first was presumed lost.
                if probe_since is not None:
                    assert now - probe_since >= probe_timeout
                probe_since = now
                assert breaker.state is S.HALF_OPEN
        elif op in ("success", "failure", "abandon"):
            if op == "success":
                new = breaker.on_success(now)
            elif op == "failure":
                new = breaker.on_failure(now, rand)
            else:
                new = breaker.abandon_probe(now)
            if before is S.HALF_OPEN:
                probe_since = None
            if new is S.OPEN and op == "failure":
                opened_at = now
                wait = breaker.cooldown * (0.5 + rand / 2)
                assert breaker.retry_after(now) == pytest.approx(wait)
                slack = 1e-9 * max(1.0, now)  # retry_after is computed from absolute times
                assert 0.5 * breaker.cooldown - slack <= breaker.retry_after(now)
                assert breaker.retry_after(now) <= breaker.cooldown + slack
            if new is S.OPEN and op == "abandon":
                opened_at = None  # may probe at once
            assert new is None or new is breaker.state
            if new is None:
                assert breaker.state is before
        assert breaker.base_cooldown <= breaker.cooldown <= breaker.max_cooldown
        assert breaker.retry_after(now) >= 0.0
        if breaker.state is S.CLOSED:
            assert breaker.consecutive_failures < threshold
            assert breaker.retry_after(now) == 0.0


# --- jitter ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_opening_waits_a_jittered_part_of_the_cooldown(rand: float) -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=2.0, max_cooldown=30.0)
    assert breaker.on_failure(10.0, rand) is None
    assert breaker.on_failure(10.0, rand) is S.OPEN
    wait = 2.0 * (0.5 + rand / 2)
    assert 1.0 <= wait <= 2.0
    assert breaker.cooldown == 2.0  # the cooldown itself is not jittered
    assert breaker.retry_after(10.0) == pytest.approx(wait)
    assert breaker.retry_after(10.0 + wait / 2) == pytest.approx(wait / 2)
    assert breaker.admit(10.0 + wait - 1e-6) is A.REJECT
    assert breaker.retry_after(10.0 + wait) == 0.0
    assert breaker.admit(10.0 + wait) is A.PROBE


@pytest.mark.parametrize("rand", [0.0, 0.5, 1.0])
def test_a_failed_probe_jitters_the_doubled_cooldown(rand: float) -> None:
    breaker = opened(cooldown=2.0, max_cooldown=5.0)  # opened with rand=1.0: waits 2.0
    assert breaker.admit(2.0) is A.PROBE
    assert breaker.on_failure(2.0, rand) is S.OPEN
    assert breaker.cooldown == 4.0
    wait = 4.0 * (0.5 + rand / 2)
    assert breaker.retry_after(2.0) == pytest.approx(wait)
    assert breaker.admit(2.0 + wait - 1e-6) is A.REJECT
    assert breaker.admit(2.0 + wait) is A.PROBE
    assert breaker.on_failure(2.0 + wait, rand) is S.OPEN
    assert breaker.cooldown == 5.0  # capped; the jitter applies below the cap
    assert breaker.retry_after(2.0 + wait) == pytest.approx(5.0 * (0.5 + rand / 2))


def test_default_rand_waits_exactly_the_cooldown() -> None:
    breaker = opened(cooldown=2.0)
    assert breaker.retry_after(0.0) == 2.0
    assert breaker.admit(1.999) is A.REJECT
    assert breaker.admit(2.0) is A.PROBE


def test_probe_success_after_a_short_wait_resets_the_cooldown() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=2.0, max_cooldown=30.0)
    assert breaker.on_failure(0.0, 0.0) is S.OPEN
    assert breaker.admit(1.0) is A.PROBE  # half the cooldown
    assert breaker.on_success(1.0) is S.CLOSED
    assert breaker.cooldown == 2.0
    assert breaker.retry_after(1.0) == 0.0


def test_abandoned_probe_after_a_jittered_wait_may_probe_at_once() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=2.0, max_cooldown=30.0)
    breaker.on_failure(0.0, 0.2)  # waits 1.2
    assert breaker.admit(1.2) is A.PROBE
    assert breaker.abandon_probe(1.5) is S.OPEN
    assert breaker.retry_after(1.5) == 0.0
    assert breaker.admit(1.5) is A.PROBE


@pytest.mark.parametrize("rand", [-0.01, 1.0001, 2.0, math.nan, math.inf, -math.inf])
def test_rand_out_of_range_raises_and_changes_nothing(rand: float) -> None:
    breaker = CircuitBreaker(threshold=1)
    with pytest.raises(ValueError, match="rand must be in"):
        breaker.on_failure(0.0, rand)
    assert breaker.state is S.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.transitions == 0
    # Also when the failure would be the probe's.
    breaker.on_failure(0.0)
    breaker.admit(5.0)
    with pytest.raises(ValueError, match="rand must be in"):
        breaker.on_failure(5.0, rand)
    assert state_of(breaker) is S.HALF_OPEN


@given(
    threshold=st.integers(min_value=1, max_value=5),
    # (cooldown=0 with max_cooldown=0 leaves the default probe_timeout at 0, which is refused)
    cooldown=st.floats(min_value=1e-3, max_value=60.0),
    extra=st.floats(min_value=0.0, max_value=60.0),
    probes=st.integers(min_value=0, max_value=8),
    rands=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=14, max_size=14),
    start=st.floats(min_value=0.0, max_value=1e6),
)
def test_every_wait_is_between_half_and_all_of_the_cooldown(
    threshold: int,
    cooldown: float,
    extra: float,
    probes: int,
    rands: list[float],
    start: float,
) -> None:
    breaker = CircuitBreaker(threshold=threshold, cooldown=cooldown, max_cooldown=cooldown + extra)
    now = start
    draws = iter(rands)
    for _ in range(threshold):
        breaker.on_failure(now, next(draws))
    assert breaker.state is S.OPEN
    for _ in range(probes + 1):
        wait = breaker.retry_after(now)
        slack = 1e-9 * max(1.0, now)
        assert 0.5 * breaker.cooldown - slack <= wait <= breaker.cooldown + slack
        if wait > 1e-6:
            assert breaker.admit(now + wait * 0.999) is A.REJECT
        # retry_after is consistent with admit: once it has run out, a probe is admitted.
        now += wait
        assert breaker.retry_after(now) <= slack
        verdict = breaker.admit(now + slack)
        assert verdict is A.PROBE
        assert breaker.retry_after(now) == breaker.cooldown  # the in-flight estimate
        assert breaker.on_failure(now, next(draws)) is S.OPEN
