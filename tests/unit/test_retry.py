"""RetryPolicy, RetryBudget and decide() (pure: time and randomness are arguments)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pgwarden.core.classify import FailureKind, RetryContext
from pgwarden.core.retry import (
    MIN_ATTEMPT_SECONDS,
    Decision,
    GiveUp,
    GiveUpReason,
    Raise,
    RetryBudget,
    RetryPolicy,
    Sleep,
    decide,
)

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
    changed = policy.with_attempts(5)
    assert (changed.attempts, changed.base_delay, changed.max_delay) == (5, 0.05, 2.0)
    assert policy.attempts == 3


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
    with pytest.raises(ValueError, match="retry_number"):
        RetryPolicy().cap(0)


@given(policy=policies, n=st.integers(min_value=1, max_value=200), rand=unit)
def test_backoff_within_zero_and_cap(policy: RetryPolicy, n: int, rand: float) -> None:
    delay = policy.backoff(n, rand)
    assert 0.0 <= delay <= policy.cap(n) <= policy.max_delay
    assert policy.cap(n) <= policy.cap(n + 1)


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


# --- decide() ------------------------------------------------------------------------------------

K = FailureKind


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


CONTEXTS: dict[str, RetryContext] = {
    "read": RetryContext(is_write=False),
    "write": RetryContext(is_write=True),
    "idempotent": RetryContext(is_write=True, idempotent=True),
    "read in transaction": RetryContext(is_write=False, in_transaction=True),
    "idempotent in transaction": RetryContext(is_write=True, idempotent=True, in_transaction=True),
}

# Written out independently of classify's own tables: (read, write, idempotent write), for a
# single statement outside a transaction block.
STATEMENT_RETRYABLE: dict[FailureKind, tuple[bool, bool, bool]] = {
    K.NOTHING_RAN: (True, True, True),
    K.OVERLOAD: (True, True, True),
    K.STALE: (True, True, True),
    K.LOST: (True, False, True),
    K.LOST_COMMIT: (False, False, False),
    K.CONFLICT: (True, True, True),
    K.FAILOVER: (True, True, True),
    K.PERMANENT: (False, False, False),
    K.TIMEOUT: (False, False, False),
}
# Re-running a whole transaction function: whatever the statements inside were.
TRANSACTION_RETRYABLE: dict[FailureKind, bool] = {
    K.NOTHING_RAN: True,
    K.OVERLOAD: True,
    K.STALE: True,
    K.LOST: True,
    K.LOST_COMMIT: False,
    K.CONFLICT: True,
    K.FAILOVER: True,
    K.PERMANENT: False,
    K.TIMEOUT: False,
}
RETRYABLE_KINDS = [k for k, v in TRANSACTION_RETRYABLE.items() if v]
NEVER_RETRYABLE_KINDS = [k for k, v in TRANSACTION_RETRYABLE.items() if not v]

POLICY = RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0)
READ = CONTEXTS["read"]
WRITE = CONTEXTS["write"]


def expected_retryable(kind: FailureKind, ctx_name: str, whole_transaction: bool) -> bool:
    if whole_transaction:
        return TRANSACTION_RETRYABLE[kind]
    ctx = CONTEXTS[ctx_name]
    if ctx.in_transaction:
        return False
    read, write, idempotent_write = STATEMENT_RETRYABLE[kind]
    if not ctx.is_write:
        return read
    return idempotent_write if ctx.idempotent else write


def full_budget() -> RetryBudget:
    return RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=20.0)


def budget_with(tokens: int, now: float) -> RetryBudget:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, max_tokens=20.0)
    budget.on_requests(tokens, now)
    assert budget.tokens(now) == tokens
    return budget


def decide_at(
    clock: FakeClock,
    kind: FailureKind,
    ctx: RetryContext = READ,
    *,
    attempt: int = 1,
    policy: RetryPolicy = POLICY,
    deadline: float | None = None,
    rand: float = 0.5,
    budget: RetryBudget | None = None,
    whole_transaction: bool = False,
) -> Decision:
    return decide(
        kind,
        ctx,
        attempt=attempt,
        policy=policy,
        now=clock(),
        deadline=deadline,
        rand=rand,
        budget=budget,
        whole_transaction=whole_transaction,
    )


def test_the_tables_cover_every_kind() -> None:
    assert set(STATEMENT_RETRYABLE) == set(FailureKind) == set(TRANSACTION_RETRYABLE)


@pytest.mark.parametrize("whole_transaction", [False, True], ids=["statement", "transaction"])
@pytest.mark.parametrize("ctx_name", list(CONTEXTS))
@pytest.mark.parametrize("kind", list(FailureKind), ids=[k.value for k in FailureKind])
@pytest.mark.parametrize("with_deadline", [False, True], ids=["no-deadline", "deadline"])
def test_decide_table(
    kind: FailureKind, ctx_name: str, whole_transaction: bool, with_deadline: bool
) -> None:
    clock = FakeClock()
    tokens = 3
    budget = budget_with(tokens, clock())
    deadline = clock() + 60.0 if with_deadline else None
    decision = decide_at(
        clock,
        kind,
        CONTEXTS[ctx_name],
        attempt=2,
        deadline=deadline,
        rand=0.5,
        budget=budget,
        whole_transaction=whole_transaction,
    )
    if expected_retryable(kind, ctx_name, whole_transaction):
        assert decision == Sleep(POLICY.backoff(2, 0.5), 2)
        assert budget.tokens(clock()) == tokens - 1
    else:
        assert decision == Raise()
        assert budget.tokens(clock()) == tokens  # a Raise spends no budget


@pytest.mark.parametrize("kind", RETRYABLE_KINDS)
def test_attempts_exhausted(kind: FailureKind) -> None:
    clock = FakeClock()
    budget = budget_with(5, clock())
    policy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0)
    ctx = CONTEXTS["idempotent"]
    assert decide_at(clock, kind, ctx, attempt=1, policy=policy, budget=budget) == Sleep(0.05, 1)
    assert decide_at(clock, kind, ctx, attempt=2, policy=policy, budget=budget) == Sleep(0.1, 2)
    assert budget.tokens(clock()) == 3
    for attempt in (3, 4, 100):
        decision = decide_at(clock, kind, ctx, attempt=attempt, policy=policy, budget=budget)
        assert decision == GiveUp(GiveUpReason.ATTEMPTS)
    assert budget.tokens(clock()) == 3  # giving up spends nothing


def test_one_attempt_means_no_retries() -> None:
    decision = decide_at(FakeClock(), K.NOTHING_RAN, policy=RetryPolicy(attempts=1))
    assert decision == GiveUp(GiveUpReason.ATTEMPTS)


def test_out_of_attempts_but_not_retryable_raises_as_is() -> None:
    clock = FakeClock()
    assert decide_at(clock, K.PERMANENT, attempt=POLICY.attempts) == Raise()
    assert decide_at(clock, K.LOST, WRITE, attempt=POLICY.attempts) == Raise()


def test_attempts_are_checked_before_the_deadline() -> None:
    # Documented order: step 2 (attempts) before step 3 (time left).
    clock = FakeClock()
    decision = decide_at(clock, K.STALE, attempt=POLICY.attempts, deadline=clock() - 1.0)
    assert decision == GiveUp(GiveUpReason.ATTEMPTS)


@pytest.mark.parametrize("kind", RETRYABLE_KINDS)
@pytest.mark.parametrize(
    "left",
    [-5.0, 0.0, MIN_ATTEMPT_SECONDS / 2, MIN_ATTEMPT_SECONDS * 0.999],
    ids=["long-past", "at-deadline", "half-min", "just-under-min"],
)
def test_deadline_passed_retryable_gives_up(kind: FailureKind, left: float) -> None:
    clock = FakeClock()
    budget = budget_with(2, clock())
    decision = decide_at(clock, kind, READ, deadline=clock() + left, budget=budget)
    assert decision == GiveUp(GiveUpReason.DEADLINE)
    assert budget.tokens(clock()) == 2


def test_exactly_the_minimum_left_still_retries_within_it() -> None:
    clock = FakeClock(0.0)
    deadline = MIN_ATTEMPT_SECONDS
    decision = decide_at(clock, K.STALE, deadline=deadline, rand=0.99)
    assert isinstance(decision, Sleep)
    assert decision.seconds == pytest.approx(MIN_ATTEMPT_SECONDS / 2)


NON_RETRYABLE_CASES = [
    (K.PERMANENT, READ, False),
    (K.TIMEOUT, READ, False),
    (K.LOST_COMMIT, WRITE, False),
    (K.LOST, WRITE, False),
    (K.CONFLICT, CONTEXTS["read in transaction"], False),
    (K.PERMANENT, READ, True),
    (K.LOST_COMMIT, READ, True),
]


@pytest.mark.parametrize(("kind", "ctx", "whole_transaction"), NON_RETRYABLE_CASES)
def test_deadline_passed_non_retryable_gives_up_on_the_deadline(
    kind: FailureKind, ctx: RetryContext, whole_transaction: bool
) -> None:
    # A failure after the deadline is the deadline's doing (a severed connection, say).
    clock = FakeClock()
    budget = budget_with(2, clock())
    passed: list[float | None] = [clock(), clock() - 3.0]
    for deadline in passed:
        decision = decide_at(
            clock, kind, ctx, deadline=deadline, budget=budget, whole_transaction=whole_transaction
        )
        assert decision == GiveUp(GiveUpReason.DEADLINE)
    # Before the deadline, and without one: the failure itself.
    ahead: list[float | None] = [clock() + 5.0, None]
    for deadline in ahead:
        decision = decide_at(
            clock, kind, ctx, deadline=deadline, budget=budget, whole_transaction=whole_transaction
        )
        assert decision == Raise()
    assert budget.tokens(clock()) == 2


@pytest.mark.parametrize("whole_transaction", [False, True])
def test_statement_timeout_at_the_deadline_is_the_deadline(whole_transaction: bool) -> None:
    clock = FakeClock()
    deadline = clock() + 0.005  # statement_timeout fired server-side a few ms early
    decision = decide_at(
        clock, K.TIMEOUT, WRITE, deadline=deadline, whole_transaction=whole_transaction
    )
    assert decision == GiveUp(GiveUpReason.DEADLINE)
    # Well before the deadline it is an ordinary timeout (lock_timeout, a cancel): raise it.
    decision = decide_at(
        clock, K.TIMEOUT, WRITE, deadline=clock() + 0.5, whole_transaction=whole_transaction
    )
    assert decision == Raise()
    assert decide_at(clock, K.TIMEOUT, WRITE, deadline=None) == Raise()


def test_only_a_timeout_gets_the_slack_before_the_deadline() -> None:
    clock = FakeClock()
    assert decide_at(clock, K.PERMANENT, deadline=clock() + 0.005) == Raise()
    assert decide_at(clock, K.LOST, WRITE, deadline=clock() + 0.005) == Raise()


@pytest.mark.parametrize(
    ("left", "expected"),
    [(100.0, 9.0), (18.0, 9.0), (10.0, 5.0), (1.0, 0.5), (0.05, 0.025)],
)
def test_sleep_never_exceeds_half_the_time_left(left: float, expected: float) -> None:
    clock = FakeClock()
    policy = RetryPolicy(attempts=5, base_delay=10.0, max_delay=10.0)
    decision = decide_at(clock, K.NOTHING_RAN, policy=policy, deadline=clock() + left, rand=0.9)
    assert isinstance(decision, Sleep)
    assert decision.seconds == pytest.approx(expected)
    assert decision.seconds <= left / 2


@pytest.mark.parametrize("kind", RETRYABLE_KINDS)
def test_budget_exhausted_gives_up(kind: FailureKind) -> None:
    clock = FakeClock()
    budget = budget_with(1, clock())
    assert decide_at(clock, kind, budget=budget) == Sleep(POLICY.backoff(1, 0.5), 1)
    assert decide_at(clock, kind, budget=budget) == GiveUp(GiveUpReason.BUDGET)
    assert budget.tokens(clock()) == 0


def test_budget_is_not_spent_unless_a_retry_follows() -> None:
    clock = FakeClock()
    budget = budget_with(1, clock())
    assert decide_at(clock, K.PERMANENT, budget=budget) == Raise()
    assert decide_at(clock, K.LOST, WRITE, budget=budget) == Raise()
    assert decide_at(clock, K.STALE, attempt=99, budget=budget) == GiveUp(GiveUpReason.ATTEMPTS)
    assert decide_at(clock, K.STALE, deadline=clock(), budget=budget) == GiveUp(
        GiveUpReason.DEADLINE
    )
    assert budget.tokens(clock()) == 1
    assert isinstance(decide_at(clock, K.STALE, budget=budget), Sleep)
    assert budget.tokens(clock()) == 0


def test_no_budget_means_no_limit() -> None:
    clock = FakeClock()
    for _ in range(50):
        assert isinstance(decide_at(clock, K.NOTHING_RAN, budget=None), Sleep)


def test_the_budget_refills_on_the_clock_it_is_given() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=2.0, max_tokens=20.0)
    assert isinstance(decide_at(clock, K.STALE, budget=budget), Sleep)
    assert isinstance(decide_at(clock, K.STALE, budget=budget), Sleep)
    assert decide_at(clock, K.STALE, budget=budget) == GiveUp(GiveUpReason.BUDGET)
    clock.advance(0.5)  # earns one token at 2/s
    assert isinstance(decide_at(clock, K.STALE, budget=budget), Sleep)


@pytest.mark.parametrize("attempt", [0, -1, -100])
@pytest.mark.parametrize("kind", [K.NOTHING_RAN, K.PERMANENT])
def test_attempt_below_one_raises(attempt: int, kind: FailureKind) -> None:
    with pytest.raises(ValueError, match="attempt must be at least 1"):
        decide_at(FakeClock(), kind, attempt=attempt)


@pytest.mark.parametrize("rand", [-0.1, 1.5, math.nan])
def test_decide_rejects_a_bad_random_draw_when_it_would_sleep(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        decide_at(FakeClock(), K.NOTHING_RAN, rand=rand)


def test_decisions_are_values() -> None:
    assert Sleep(0.25, 2) == Sleep(0.25, 2)
    assert GiveUp(GiveUpReason.BUDGET) != GiveUp(GiveUpReason.DEADLINE)
    assert Raise() == Raise()
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sleep(0.1, 1).seconds = 0.0  # type: ignore[misc]
    assert {r.value for r in GiveUpReason} == {"attempts", "deadline", "budget"}


@given(
    kind=st.sampled_from(FailureKind),
    ctx_name=st.sampled_from(list(CONTEXTS)),
    whole_transaction=st.booleans(),
    attempt=st.integers(min_value=1, max_value=200),
    policy=policies,
    now=st.floats(min_value=-1e6, max_value=1e6),
    left=st.one_of(st.none(), st.floats(min_value=-10.0, max_value=100.0)),
    rand=unit,
    tokens=st.integers(min_value=0, max_value=3),
)
def test_a_sleep_always_ends_before_the_deadline(
    kind: FailureKind,
    ctx_name: str,
    whole_transaction: bool,
    attempt: int,
    policy: RetryPolicy,
    now: float,
    left: float | None,
    rand: float,
    tokens: int,
) -> None:
    deadline = None if left is None else now + left
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, max_tokens=20.0)
    budget.on_requests(tokens, now)
    decision = decide(
        kind,
        CONTEXTS[ctx_name],
        attempt=attempt,
        policy=policy,
        now=now,
        deadline=deadline,
        rand=rand,
        budget=budget,
        whole_transaction=whole_transaction,
    )
    retryable = expected_retryable(kind, ctx_name, whole_transaction)
    spent = tokens - budget.tokens(now)
    if isinstance(decision, Sleep):
        assert retryable
        assert spent == pytest.approx(1.0)
        assert decision.retry_number == attempt
        assert 0.0 <= decision.seconds <= policy.cap(attempt)
        if deadline is not None:
            assert now + decision.seconds < deadline
            # Half the time left is still there for the next attempt.
            assert deadline - (now + decision.seconds) >= (deadline - now) / 2 - 1e-9
            assert deadline - (now + decision.seconds) >= MIN_ATTEMPT_SECONDS / 2 - 1e-9
    else:
        assert spent == 0
        if isinstance(decision, Raise):
            assert not retryable
        elif decision.reason is GiveUpReason.ATTEMPTS:
            assert retryable
            assert attempt >= policy.attempts
        elif decision.reason is GiveUpReason.BUDGET:
            assert retryable
            assert tokens == 0
        else:
            assert deadline is not None
            assert deadline - now < MIN_ATTEMPT_SECONDS


@given(
    kind=st.sampled_from(RETRYABLE_KINDS),
    policy=policies,
    budget_seconds=st.one_of(st.none(), st.floats(min_value=0.0, max_value=60.0)),
    durations=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=20, max_size=20),
    rands=st.lists(unit, min_size=20, max_size=20),
)
def test_whole_retry_sequence_on_a_fake_clock(
    kind: FailureKind,
    policy: RetryPolicy,
    budget_seconds: float | None,
    durations: list[float],
    rands: list[float],
) -> None:
    clock = FakeClock(500.0)
    start = clock()
    deadline = None if budget_seconds is None else start + budget_seconds
    decision: Decision = Raise()
    attempts = 0
    for duration, rand in zip(durations, rands, strict=True):
        attempts += 1
        clock.advance(duration)  # the attempt itself, which fails
        decision = decide_at(
            clock, kind, READ, attempt=attempts, policy=policy, deadline=deadline, rand=rand
        )
        if not isinstance(decision, Sleep):
            break
        assert decision.retry_number == attempts
        if deadline is not None:
            assert clock() + decision.seconds < deadline
        clock.advance(decision.seconds)
    assert attempts <= policy.attempts
    assert isinstance(decision, (Sleep, GiveUp))  # a retryable kind is never raised as is
    if isinstance(decision, GiveUp):
        assert decision.reason in (GiveUpReason.ATTEMPTS, GiveUpReason.DEADLINE)
        if decision.reason is GiveUpReason.ATTEMPTS:
            assert attempts == policy.attempts


@given(policy=policies, rands=st.lists(unit, min_size=13, max_size=13))
def test_without_a_deadline_every_attempt_is_used(policy: RetryPolicy, rands: list[float]) -> None:
    clock = FakeClock()
    for attempt in itertools.count(1):
        decision = decide_at(clock, K.STALE, attempt=attempt, policy=policy, rand=rands[attempt])
        if not isinstance(decision, Sleep):
            break
        clock.advance(decision.seconds)
    assert decision == GiveUp(GiveUpReason.ATTEMPTS)
    assert attempt == policy.attempts
