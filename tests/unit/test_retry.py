"""RetryPolicy and RetryBudget (pure: time and randomness are arguments)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pgwarden.core.retry import RetryBudget, RetryPolicy

unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
policies = st.builds(
    RetryPolicy,
    attempts=st.integers(min_value=1, max_value=12),
    base_delay=st.floats(min_value=0.0, max_value=5.0),
    max_delay=st.floats(min_value=0.0, max_value=30.0),
)

# --- RetryPolicy ---------------------------------------------------------------------------------


def test_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.base_delay, policy.max_delay) == (3, 0.05, 2.0)


def test_is_immutable() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 5  # type: ignore[misc]
    assert dataclasses.replace(policy, attempts=5).attempts == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"base_delay": -0.1},
        {"max_delay": -1.0},
        {"base_delay": math.nan},
        {"max_delay": math.inf},
    ],
)
def test_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_is_full_jitter_over_a_doubling_capped_window() -> None:
    policy = RetryPolicy(base_delay=0.05, max_delay=2.0)
    assert [policy.cap(n) for n in range(1, 9)] == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    )
    assert policy.backoff(1, 0.0) == 0.0
    assert policy.backoff(1, 0.5) == pytest.approx(0.025)
    assert policy.backoff(3, 0.5) == pytest.approx(0.1)
    assert policy.backoff(10, 0.999) == pytest.approx(1.998)


def test_backoff_huge_retry_number_does_not_overflow() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=7.0)
    assert policy.cap(10_000) == 7.0
    assert policy.backoff(10**9, 0.5) == 3.5


@pytest.mark.parametrize("rand", [-0.1, 1.5, math.nan])
def test_backoff_rejects_bad_rand(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        RetryPolicy().backoff(1, rand)


def test_retry_number_starts_at_one() -> None:
    with pytest.raises(ValueError, match="retry_number"):
        RetryPolicy().backoff(0, 0.5)
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy().next_delay(0, now=0.0, deadline=None, rand=0.5)


def test_next_delay_gives_up_after_the_last_attempt() -> None:
    policy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0)
    assert policy.next_delay(1, now=0.0, deadline=None, rand=0.5) == pytest.approx(0.05)
    assert policy.next_delay(2, now=0.0, deadline=None, rand=0.5) == pytest.approx(0.1)
    assert policy.next_delay(3, now=0.0, deadline=None, rand=0.5) is None
    assert policy.next_delay(7, now=0.0, deadline=None, rand=0.5) is None


def test_one_attempt_means_no_retries() -> None:
    assert RetryPolicy(attempts=1).next_delay(1, now=0.0, deadline=None, rand=0.0) is None


def test_next_delay_never_sleeps_into_the_deadline() -> None:
    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=1.0)
    # 0.5 s sleep would end at 10.5 < 11: fine.
    assert policy.next_delay(1, now=10.0, deadline=11.0, rand=0.5) == pytest.approx(0.5)
    # Ending exactly at the deadline leaves no time for the attempt: give up.
    assert policy.next_delay(1, now=10.5, deadline=11.0, rand=0.5) is None
    # Past the deadline: give up even with a zero sleep.
    assert policy.next_delay(1, now=11.0, deadline=11.0, rand=0.0) is None
    assert policy.next_delay(1, now=12.0, deadline=11.0, rand=0.0) is None


@given(policy=policies, n=st.integers(min_value=1, max_value=200), rand=unit)
def test_backoff_within_zero_and_cap(policy: RetryPolicy, n: int, rand: float) -> None:
    delay = policy.backoff(n, rand)
    assert 0.0 <= delay <= policy.cap(n) <= policy.max_delay
    assert policy.cap(n) <= policy.cap(n + 1)


@given(
    policy=policies,
    start=st.floats(min_value=0.0, max_value=1e6),
    budget=st.one_of(st.none(), st.floats(min_value=0.0, max_value=60.0)),
    durations=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=20, max_size=20),
    rands=st.lists(unit, min_size=20, max_size=20),
)
def test_whole_retry_sequence_respects_attempts_and_deadline(
    policy: RetryPolicy,
    start: float,
    budget: float | None,
    durations: list[float],
    rands: list[float],
) -> None:
    deadline = None if budget is None else start + budget
    now = start
    attempts = 0
    slept = 0.0
    for duration, rand in zip(durations, rands, strict=True):
        attempts += 1
        now += duration  # the attempt itself, which fails
        delay = policy.next_delay(attempts, now=now, deadline=deadline, rand=rand)
        if delay is None:
            break
        assert delay >= 0.0
        if deadline is not None:
            assert now + delay < deadline
        now += delay
        slept += delay
    assert attempts <= policy.attempts
    if deadline is not None:
        assert slept <= deadline - start


@given(policy=policies, rands=st.lists(unit, min_size=13, max_size=13))
def test_without_failures_taking_time_attempts_are_used_up(
    policy: RetryPolicy, rands: list[float]
) -> None:
    attempts = 1
    while policy.next_delay(attempts, now=0.0, deadline=None, rand=rands[attempts]) is not None:
        attempts += 1
    assert attempts == policy.attempts


# --- RetryBudget ----------------------------------------------------------------------------------


def test_budget_starts_with_one_second_of_floor() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=2.0, max_tokens=20.0)
    assert budget.tokens(0.0) == 2.0
    assert budget.try_spend(0.0)
    assert budget.try_spend(0.0)
    assert not budget.try_spend(0.0)


def test_budget_earns_ratio_per_request() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0.0, max_tokens=20.0)
    assert budget.tokens(0.0) == 0.0
    for _ in range(9):
        budget.on_request(0.0)
    assert not budget.try_spend(0.0)
    budget.on_request(0.0)
    assert budget.try_spend(0.0)
    assert budget.tokens(0.0) == pytest.approx(0.0, abs=1e-9)


def test_budget_floor_refills_over_time_and_is_capped() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=2.0, max_tokens=5.0)
    assert budget.tokens(100.0) == 2.0  # the first observation anchors the clock
    assert budget.tokens(100.5) == pytest.approx(3.0)
    assert budget.tokens(1000.0) == 5.0
    for _ in range(5):
        assert budget.try_spend(1000.0)
    assert not budget.try_spend(1000.0)
    assert budget.try_spend(1000.5)


def test_budget_clock_going_backwards_earns_nothing() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, max_tokens=10.0)
    budget.tokens(50.0)
    assert budget.try_spend(50.0)
    assert budget.tokens(10.0) == 0.0
    assert budget.tokens(50.0) == 0.0
    assert budget.tokens(51.0) == pytest.approx(1.0)


def test_budget_stops_a_retry_storm() -> None:
    # The database is down: every request fails and would like 2 retries.
    budget = RetryBudget()
    retries = 0
    for i in range(10_000):
        now = i * 0.001  # 1000 requests per second for 10 s
        budget.on_request(now)
        for _ in range(2):
            if budget.try_spend(now):
                retries += 1
    # ~10% of requests plus 2/s of floor plus the initial 2, instead of 20,000.
    assert retries <= 0.1 * 10_000 + 2.0 * 10 + 2 + 1
    assert retries >= 0.1 * 10_000


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"min_per_second": -1.0}, {"max_tokens": 0.5}, {"ratio": math.inf}],
)
def test_budget_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryBudget(**kwargs)


def test_budget_repr() -> None:
    assert "tokens=2.00" in repr(RetryBudget())


@given(
    ratio=st.floats(min_value=0.0, max_value=1.0),
    floor=st.floats(min_value=0.0, max_value=10.0),
    max_tokens=st.floats(min_value=1.0, max_value=50.0),
    ops=st.lists(
        st.tuples(st.sampled_from(["request", "retry", "peek"]), st.floats(0.0, 2.0)),
        max_size=300,
    ),
    start=st.floats(min_value=-1e6, max_value=1e6),
)
def test_budget_never_grants_more_than_earned(
    ratio: float,
    floor: float,
    max_tokens: float,
    ops: list[tuple[str, float]],
    start: float,
) -> None:
    budget = RetryBudget(ratio=ratio, min_per_second=floor, max_tokens=max_tokens)
    initial = budget.tokens(start)
    assert initial == min(floor, max_tokens)
    now = start
    requests = retries = 0
    for op, dt in ops:
        now += dt
        if op == "request":
            budget.on_request(now)
            requests += 1
        elif op == "retry":
            retries += budget.try_spend(now)
        tokens = budget.tokens(now)
        assert 0.0 <= tokens <= max_tokens
        allowed = initial + ratio * requests + floor * (now - start)
        assert retries <= allowed + 1e-6


@given(seed=st.integers(min_value=0, max_value=2**32))
def test_policy_with_a_seeded_random(seed: int) -> None:
    # The shells pass rng.random(); the same seed gives the same schedule.
    policy = RetryPolicy(attempts=6)
    first = [policy.backoff(n, random.Random(seed).random()) for n in range(1, 6)]
    second = [policy.backoff(n, random.Random(seed).random()) for n in range(1, 6)]
    assert first == second
    assume(all(d > 0 for d in first))
    assert all(0 < d <= policy.max_delay for d in first)
