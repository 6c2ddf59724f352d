"""A fixed, log-bucketed latency histogram in seconds (pure; stdlib only).

Layout
    Every :class:`Histogram` shares one immutable bucket layout, :data:`BOUNDS`: 48 buckets
    per decade (each bound at most 4.92% above the previous one) from 10 µs to 120 s, with the
    :data:`PROMETHEUS_BOUNDS` inserted exactly.  Bucket ``i`` holds values ``v`` with
    ``BOUNDS[i-1] < v <= BOUNDS[i]`` (Prometheus ``le`` semantics); one more bucket holds
    everything above 120 s.  Values at or below 10 µs share the first bucket.

Cost
    :meth:`Histogram.record` is one C-level ``bisect`` over ~350 floats, one list increment, a
    float add and two comparisons: about 200 ns per call in CPython 3.11 (see
    ``bench/metrics_overhead.py``).  Memory is ~350 ints per histogram.

Accuracy
    :meth:`Histogram.percentile` returns the midpoint of the bucket holding the nearest-rank
    value, clamped to ``[min, max]``.  For a true percentile ``p`` with ``10 µs < p <= 120 s``
    the relative error is at most :data:`RELATIVE_ERROR` (< 2.5%).  For ``p <= 10 µs`` the
    absolute error is at most 5 µs.  Above 120 s the estimate is the largest value seen (exact
    for ``q=100``, an overestimate otherwise).  ``count``, ``sum``, ``min`` and ``max`` are exact.

Threads
    The histogram is lock-free on purpose.  ``counts[i] += 1`` and ``sum += v`` are
    read-modify-write sequences, so two threads recording at the same instant can lose one
    increment: rarely under the GIL (a thread switch must land between the load and the store),
    more often under free-threaded CPython.  These are statistics, not accounting: a lost sample
    in a million costs nothing, while a lock would cost more than the record itself.  A reader
    sees a snapshot that may be one sample behind; ``count`` is derived from the buckets, so
    ``count`` and the percentiles always agree with each other (``sum`` may differ by a sample).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate, pairwise

__all__ = [
    "BOUNDS",
    "MAX_TRACKED",
    "MIN_TRACKED",
    "PROMETHEUS_BOUNDS",
    "RELATIVE_ERROR",
    "Histogram",
]

#: Smallest and largest finite bucket bounds, in seconds.
MIN_TRACKED = 1e-5
MAX_TRACKED = 120.0

_PER_DECADE = 48

#: Export bounds (seconds) for Prometheus ``le`` buckets; ``+Inf`` is implied.  The 10, 25 and
#: 50 µs bounds resolve acquire waits from a warm pool (typically 5-30 µs, which a 100 µs first
#: bucket would hide entirely); the other sub-millisecond bounds resolve fast local queries;
#: 30 s and 60 s resolve acquire timeouts and slow connects.  Every bound is also a bound of
#: :data:`BOUNDS`, so exported counts are exact: 10 µs is the grid's first bound, and the
#: others that are not on the 48-per-decade grid (2.5e-05, 5e-05, 0.00025, ... 30.0, 60.0) are
#: inserted into it by :func:`_make_bounds`, keeping round ``le`` labels.
PROMETHEUS_BOUNDS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def _make_bounds() -> tuple[float, ...]:
    # Rounding to 6 significant digits keeps decade bounds exact (0.001, 1.0, 10.0) and makes
    # every bound print cleanly; it perturbs the growth factor by < 1e-5.  The export bounds
    # are then either equal to a grid bound (decades) or well inside a bucket, so a set union
    # suffices.
    bounds = {MAX_TRACKED, *PROMETHEUS_BOUNDS}
    k = 0
    while (bound := float(f"{MIN_TRACKED * 10.0 ** (k / _PER_DECADE):.6g}")) < MAX_TRACKED:
        bounds.add(bound)
        k += 1
    return tuple(sorted(bounds))


#: Upper bounds (seconds) of the finite buckets, strictly increasing.
BOUNDS: tuple[float, ...] = _make_bounds()

#: Worst-case relative error of :meth:`Histogram.percentile` for values in (10 µs, 120 s]:
#: half the widest bucket, relative to its lower bound.
RELATIVE_ERROR: float = max((hi - lo) / (2.0 * lo) for lo, hi in pairwise(BOUNDS))

_NBUCKETS = len(BOUNDS) + 1  # the last bucket is the overflow (> MAX_TRACKED)
_PROM_INDEX: tuple[int, ...] = tuple(BOUNDS.index(p) for p in PROMETHEUS_BOUNDS)
_BOUNDS_LIST: list[float] = list(BOUNDS)  # bisect on a list is a touch faster than on a tuple


class Histogram:
    """Latency histogram in seconds with O(1) :meth:`record` and bounded-error percentiles.

    Values must be durations: non-negative finite floats.  A negative value or NaN is recorded
    as ``0.0`` (a clock glitch must not poison ``sum``).  ``+inf`` lands in the overflow bucket.
    """

    __slots__ = ("_counts", "_max", "_min", "_sum")

    def __init__(self) -> None:
        self._counts: list[int] = [0] * _NBUCKETS
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0

    def record(self, value: float) -> None:
        """Add one sample.  O(1), allocation-free, lock-free (see the module docstring)."""
        if not value >= 0.0:  # also true for NaN
            value = 0.0
        self._counts[bisect_left(_BOUNDS_LIST, value)] += 1
        self._sum += value
        if value > self._max:
            self._max = value
        if value < self._min:
            self._min = value

    @property
    def count(self) -> int:
        """Number of samples recorded."""
        return sum(self._counts)

    @property
    def sum(self) -> float:
        """Sum of all samples, in seconds."""
        return self._sum

    @property
    def min(self) -> float:
        """Smallest sample, or ``0.0`` when empty."""
        return self._min if self._min != math.inf else 0.0

    @property
    def max(self) -> float:
        """Largest sample, or ``0.0`` when empty."""
        return self._max

    def percentile(self, q: float) -> float:
        """Estimate the ``q``-th percentile (nearest rank), ``0 <= q <= 100``.

        Returns ``0.0`` when empty; ``q=0`` and ``q=100`` return the exact min and max.  The
        error bound is documented in the module docstring.  Raises :class:`ValueError` for a
        ``q`` outside ``[0, 100]``.
        """
        return self._percentiles((q,))[0]

    def snapshot(self) -> dict[str, float]:
        """Plain, JSON-serialisable summary: count, sum, min, max, p50, p95, p99."""
        counts = list(self._counts)  # one consistent view for count and percentiles
        p50, p95, p99 = self._percentiles((50.0, 95.0, 99.0), counts)
        return {
            "count": sum(counts),
            "sum": self._sum,
            "min": self.min,
            "max": self._max,
            "p50": p50,
            "p95": p95,
            "p99": p99,
        }

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative ``(upper_bound, count)`` pairs for :data:`PROMETHEUS_BOUNDS` and ``+Inf``.

        Counts are exact (each export bound is also a bucket bound) and non-decreasing; the last
        pair is ``(math.inf, count)``.
        """
        cumulative = list(accumulate(self._counts))
        pairs = [(p, cumulative[i]) for p, i in zip(PROMETHEUS_BOUNDS, _PROM_INDEX, strict=True)]
        pairs.append((math.inf, cumulative[-1]))
        return pairs

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other`` into this histogram (``other`` is unchanged)."""
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=True)]
        self._sum += other._sum
        self._max = max(self._max, other._max)
        self._min = min(self._min, other._min)

    def reset(self) -> None:
        """Forget every sample.  A concurrent :meth:`record` may land before or after."""
        self._counts = [0] * _NBUCKETS
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0

    def _percentiles(self, qs: tuple[float, ...], counts: list[int] | None = None) -> list[float]:
        # One cumulative pass over the buckets answers every q; qs need not be sorted.
        for q in qs:
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"percentile must be within [0, 100], got {q!r}")
        if counts is None:
            counts = list(self._counts)
        total = sum(counts)
        if total == 0:
            return [0.0] * len(qs)
        lo_clamp, hi_clamp = self.min, self._max
        out = [0.0] * len(qs)
        pending: list[tuple[int, int]] = []  # (rank, position in qs)
        for pos, q in enumerate(qs):
            if q == 0.0:
                out[pos] = lo_clamp
            elif q == 100.0:
                out[pos] = hi_clamp
            else:
                pending.append((max(1, math.ceil(q / 100.0 * total)), pos))
        pending.sort(reverse=True)  # pop() yields the smallest rank first
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            while pending and pending[-1][0] <= seen:
                _, pos = pending.pop()
                if i == len(BOUNDS):  # overflow bucket: only the max is known
                    estimate = hi_clamp
                else:
                    estimate = ((BOUNDS[i - 1] if i else 0.0) + BOUNDS[i]) / 2.0
                out[pos] = min(max(estimate, lo_clamp), hi_clamp)
            if not pending:
                break
        return out

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"<Histogram count={s['count']} p50={s['p50']:.6g}s p99={s['p99']:.6g}s"
            f" max={s['max']:.6g}s>"
        )
