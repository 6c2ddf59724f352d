"""AdaptiveLimit: AIMD on the pool size (pure: time is an argument)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core.sizing import AdaptiveLimit


def test_starts_at_max() -> None:
    limit = AdaptiveLimit(10)
    assert limit.limit == 10
    assert limit.at_max
    assert limit.tick(1000.0) is None
    assert repr(limit) == "AdaptiveLimit(limit=10, max_size=10)"


def test_halves_on_overload_down_to_the_minimum() -> None:
    limit = AdaptiveLimit(20, quiet_period=5.0)  # debounce 1 s
    assert limit.on_overload(0.0) == 10
    assert limit.on_overload(1.0) == 5
    assert limit.on_overload(2.0) == 2
    assert limit.on_overload(3.0) == 1
    assert limit.on_overload(4.0) is None
    assert limit.limit == 1
    assert not limit.at_max


def test_min_limit_is_respected() -> None:
    limit = AdaptiveLimit(20, min_limit=4, quiet_period=5.0)
    assert limit.on_overload(0.0) == 10
    assert limit.on_overload(1.0) == 5
    assert limit.on_overload(2.0) == 4
    assert limit.on_overload(3.0) is None


def test_a_burst_counts_once() -> None:
    limit = AdaptiveLimit(20, quiet_period=5.0)
    results = [limit.on_overload(10.0 + i * 0.01) for i in range(20)]
    assert results[0] == 10
    assert results[1:] == [None] * 19
    assert limit.limit == 10
    assert limit.on_overload(11.0) == 5  # a second burst, after the debounce window


def test_explicit_debounce() -> None:
    limit = AdaptiveLimit(16, quiet_period=5.0, debounce=0.0)
    assert limit.on_overload(0.0) == 8
    assert limit.on_overload(0.0) == 4


def test_grows_by_one_per_quiet_period() -> None:
    limit = AdaptiveLimit(10, quiet_period=5.0)
    limit.on_overload(0.0)  # -> 5
    assert limit.tick(4.9) is None
    assert limit.tick(5.0) == 6
    assert limit.tick(9.9) is None
    assert limit.tick(10.0) == 7
    assert limit.tick(100.0) == 8  # one step per tick, however long the gap


def test_overload_restarts_the_quiet_period_even_when_debounced() -> None:
    limit = AdaptiveLimit(10, quiet_period=5.0)
    limit.on_overload(0.0)  # -> 5, decrease at 0
    assert limit.on_overload(0.5) is None  # debounced, but still an overload
    assert limit.tick(5.0) is None
    assert limit.tick(5.5) == 6


def test_overload_at_the_minimum_still_blocks_growth() -> None:
    limit = AdaptiveLimit(4, quiet_period=5.0)  # debounce 1 s
    assert limit.on_overload(0.0) == 2
    assert limit.on_overload(1.0) == 1
    assert limit.on_overload(3.0) is None  # at the minimum: no change, but an overload
    assert limit.tick(5.0) is None
    assert limit.tick(7.9) is None
    assert limit.tick(8.0) == 2


def test_never_above_max() -> None:
    limit = AdaptiveLimit(3, quiet_period=1.0)
    limit.on_overload(0.0)  # -> 1
    assert limit.tick(1.0) == 2
    assert limit.tick(2.0) == 3
    assert limit.tick(3.0) is None
    assert limit.at_max


def test_only_an_overload_lowers_the_limit() -> None:
    # An outage that is not an overload (the breaker opening and closing) leaves the limit
    # alone: ticks only ever grow it, however long the quiet spell.
    limit = AdaptiveLimit(8, quiet_period=1.0)
    for t in range(100):
        assert limit.tick(float(t)) is None
    assert limit.limit == 8
    assert limit.on_overload(100.0) == 4
    assert [limit.tick(100.0 + n) for n in range(1, 6)] == [5, 6, 7, 8, None]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0,), {}),
        ((5,), {"min_limit": 0}),
        ((5,), {"min_limit": 6}),
        ((5,), {"quiet_period": -1.0}),
        ((5,), {"quiet_period": float("inf")}),
        ((5,), {"debounce": -1.0}),
    ],
)
def test_rejects_bad_values(args: tuple[int], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        AdaptiveLimit(*args, **kwargs)  # type: ignore[arg-type]


@given(
    max_size=st.integers(min_value=1, max_value=100),
    min_fraction=st.floats(min_value=0.0, max_value=1.0),
    quiet_period=st.floats(min_value=0.0, max_value=10.0),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["overload", "tick"]),
            st.floats(min_value=-1.0, max_value=5.0),  # time may even step back
        ),
        max_size=200,
    ),
)
def test_limit_always_within_bounds(
    max_size: int,
    min_fraction: float,
    quiet_period: float,
    ops: list[tuple[str, float]],
) -> None:
    min_limit = max(1, int(max_size * min_fraction))
    limit = AdaptiveLimit(max_size, quiet_period=quiet_period, min_limit=min_limit)
    now = 0.0
    for op, dt in ops:
        now += dt
        before = limit.limit
        if op == "overload":
            new = limit.on_overload(now)
            assert new is None or new < before
        else:
            new = limit.tick(now)
            assert new is None or new == before + 1
        assert new is None or new == limit.limit
        assert min_limit <= limit.limit <= max_size


@given(n=st.integers(min_value=1, max_value=500), max_size=st.integers(1, 64))
def test_a_burst_within_the_debounce_window_halves_once(n: int, max_size: int) -> None:
    limit = AdaptiveLimit(max_size, quiet_period=5.0)
    for i in range(n):
        limit.on_overload(i * 0.999 / n)
    assert limit.limit == max(1, max_size // 2)
