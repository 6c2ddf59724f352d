"""Pure tests of the log-bucketed latency histogram."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.core.histogram import (
    BOUNDS,
    MAX_TRACKED,
    MIN_TRACKED,
    PROMETHEUS_BOUNDS,
    RELATIVE_ERROR,
    Histogram,
)


def exact_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, the definition Histogram.percentile estimates."""
    ordered = sorted(values)
    if q == 0:
        return ordered[0]
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def filled(values: list[float]) -> Histogram:
    h = Histogram()
    for v in values:
        h.record(v)
    return h


def assert_within_bound(estimate: float, exact: float) -> None:
    if MIN_TRACKED < exact <= MAX_TRACKED:
        assert abs(estimate - exact) <= RELATIVE_ERROR * exact * (1 + 1e-9), (estimate, exact)
    elif exact <= MIN_TRACKED:
        assert abs(estimate - exact) <= MIN_TRACKED / 2 + 1e-15, (estimate, exact)
    else:
        assert estimate > MAX_TRACKED, (estimate, exact)


def test_layout() -> None:
    assert list(BOUNDS) == sorted(set(BOUNDS))
    assert BOUNDS[0] == MIN_TRACKED
    assert BOUNDS[-1] == MAX_TRACKED
    assert set(PROMETHEUS_BOUNDS) <= set(BOUNDS)
    assert 0.02 < RELATIVE_ERROR < 0.025
    assert len(BOUNDS) < 400


def test_empty() -> None:
    h = Histogram()
    assert h.count == 0
    assert h.sum == 0.0
    assert h.min == 0.0
    assert h.max == 0.0
    assert h.percentile(50) == 0.0
    assert h.snapshot() == {
        "count": 0,
        "sum": 0.0,
        "min": 0.0,
        "max": 0.0,
        "p50": 0.0,
        "p95": 0.0,
        "p99": 0.0,
    }
    assert h.buckets()[-1] == (math.inf, 0)


def test_exact_aggregates() -> None:
    h = filled([0.002, 0.001, 0.5, 3.0])
    assert h.count == 4
    assert h.sum == pytest.approx(3.503)
    assert h.min == 0.001
    assert h.max == 3.0
    assert h.percentile(0) == 0.001
    assert h.percentile(100) == 3.0


def test_single_value_is_exact() -> None:
    # Clamping to [min, max] makes every percentile of one sample exact.
    h = filled([0.0123])
    for q in (1, 50, 99.9):
        assert h.percentile(q) == 0.0123


@pytest.mark.parametrize("q", [-0.1, 100.5, math.nan])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        Histogram().percentile(q)


def test_bad_values_record_as_zero() -> None:
    h = filled([-1.0, math.nan])
    assert h.count == 2
    assert h.sum == 0.0
    assert h.min == 0.0
    assert h.max == 0.0


def test_overflow_reports_max() -> None:
    h = filled([500.0, 1000.0])
    assert h.percentile(50) == 1000.0
    assert h.buckets()[-2] == (60.0, 0)
    assert h.buckets()[-1] == (math.inf, 2)


def test_buckets_are_cumulative_and_exact_on_bounds() -> None:
    # A value equal to a bound belongs to that bound's `le` bucket.
    h = filled([0.001, 0.0010001, 0.0025, 10.0, 11.0])
    got = dict(h.buckets())
    assert got[0.0005] == 0
    assert got[0.001] == 1
    assert got[0.0025] == 3
    assert got[10.0] == 4
    assert got[30.0] == 5
    assert got[math.inf] == 5
    counts = [c for _, c in h.buckets()]
    assert counts == sorted(counts)


def test_sub_100us_export_buckets_resolve_acquire_waits() -> None:
    # Acquire waits from a warm pool take 5-30 µs; they must not all land in one bucket.
    assert PROMETHEUS_BOUNDS[:4] == (1e-05, 2.5e-05, 5e-05, 0.0001)
    h = filled([0.000005, 0.00001, 0.000012, 0.00002, 0.000025, 0.00003, 0.00005, 0.00007])
    got = dict(h.buckets())
    assert got[1e-05] == 2  # 5 µs and exactly 10 µs
    assert got[2.5e-05] == 5  # ... 12, 20 and exactly 25 µs
    assert got[5e-05] == 7  # ... 30 and exactly 50 µs
    assert got[0.0001] == 8


def test_snapshot_is_json() -> None:
    h = filled([random.uniform(0, 1) for _ in range(100)])
    snap = h.snapshot()
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap
    assert set(snap) == {"count", "sum", "min", "max", "p50", "p95", "p99"}
    assert snap["min"] <= snap["p50"] <= snap["p95"] <= snap["p99"] <= snap["max"]


def test_merge_and_reset() -> None:
    a = filled([0.001, 0.002])
    b = filled([0.5, 0.0001])
    a.merge(b)
    assert a.count == 4
    assert a.min == 0.0001
    assert a.max == 0.5
    assert a.sum == pytest.approx(0.5031)
    assert b.count == 2
    a.merge(Histogram())
    assert a.min == 0.0001
    a.reset()
    assert a.snapshot() == Histogram().snapshot()


def test_percentiles_on_lognormal_data() -> None:
    rng = random.Random(1234)
    values = [rng.lognormvariate(-5, 1.5) for _ in range(20_000)]
    h = filled(values)
    for q in (1, 10, 25, 50, 75, 90, 95, 99, 99.9):
        assert_within_bound(h.percentile(q), exact_percentile(values, q))


durations = st.one_of(
    st.floats(min_value=0.0, max_value=200.0, allow_nan=False),
    st.floats(min_value=1e-6, max_value=1e-2),
)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(durations, min_size=1, max_size=300),
    q=st.floats(min_value=0.0, max_value=100.0),
)
def test_percentile_error_is_bounded(values: list[float], q: float) -> None:
    h = filled(values)
    assert_within_bound(h.percentile(q), exact_percentile(values, q))
    assert h.count == len(values)
    assert h.min == min(values)
    assert h.max == max(values)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(durations, max_size=200))
def test_buckets_match_exact_counts(values: list[float]) -> None:
    h = filled(values)
    for bound, count in h.buckets():
        assert count == sum(1 for v in values if v <= bound)


@settings(max_examples=100, deadline=None)
@given(a=st.lists(durations, max_size=100), b=st.lists(durations, max_size=100))
def test_merge_equals_recording_everything(a: list[float], b: list[float]) -> None:
    merged = filled(a)
    merged.merge(filled(b))
    direct = filled(a + b)
    assert merged.buckets() == direct.buckets()
    assert merged.count == direct.count
    assert merged.min == direct.min
    assert merged.max == direct.max
    assert merged.percentile(50) == direct.percentile(50)


def test_error_bound_holds_at_every_bucket_edge() -> None:
    # The worst cases sit just above a bucket's lower bound and exactly on its upper bound.
    for lo, hi in itertools.pairwise(BOUNDS):
        for x in (math.nextafter(lo, math.inf), hi):
            h = filled([0.0, x, 1000.0])
            assert_within_bound(h.percentile(50), x)


def test_written_out_bounds_match_their_generator() -> None:
    """BOUNDS, RELATIVE_ERROR and _PROM_INDEX are literals (cheaper to import than to
    compute); they must stay exactly what `_make_bounds` gives."""
    from itertools import pairwise

    from pgwarden.core import histogram

    bounds = histogram._make_bounds()
    assert bounds == histogram.BOUNDS
    assert max((hi - lo) / (2.0 * lo) for lo, hi in pairwise(bounds)) == histogram.RELATIVE_ERROR
    assert tuple(bounds.index(p) for p in histogram.PROMETHEUS_BOUNDS) == histogram._PROM_INDEX
