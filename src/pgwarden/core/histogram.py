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
from itertools import accumulate

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


# fmt: off
#: Upper bounds (seconds) of the finite buckets, strictly increasing.
#:
#: Exactly ``_make_bounds()``, written out: computing the 355 bounds took ~0.6 ms of every
#: cold start (the histograms are built with the handle). Change the layout in
#: :func:`_make_bounds` and paste ``_make_bounds()`` here; the same goes for
#: :data:`RELATIVE_ERROR` and ``_PROM_INDEX`` below.
BOUNDS: tuple[float, ...] = (
    1e-05, 1.04914e-05, 1.10069e-05, 1.15478e-05, 1.21153e-05, 1.27106e-05, 1.33352e-05,
    1.39905e-05, 1.4678e-05, 1.53993e-05, 1.6156e-05, 1.69499e-05, 1.77828e-05, 1.86566e-05,
    1.95734e-05, 2.05353e-05, 2.15443e-05, 2.2603e-05, 2.37137e-05, 2.4879e-05, 2.5e-05,
    2.61016e-05, 2.73842e-05, 2.87298e-05, 3.01416e-05, 3.16228e-05, 3.31767e-05, 3.4807e-05,
    3.65174e-05, 3.83119e-05, 4.01945e-05, 4.21697e-05, 4.42419e-05, 4.64159e-05, 4.86968e-05,
    5e-05, 5.10897e-05, 5.36002e-05, 5.62341e-05, 5.89975e-05, 6.18966e-05, 6.49382e-05,
    6.81292e-05, 7.14771e-05, 7.49894e-05, 7.86744e-05, 8.25404e-05, 8.65964e-05, 9.08518e-05,
    9.53162e-05, 0.0001, 0.000104914, 0.000110069, 0.000115478, 0.000121153, 0.000127106,
    0.000133352, 0.000139905, 0.00014678, 0.000153993, 0.00016156, 0.000169499, 0.000177828,
    0.000186566, 0.000195734, 0.000205353, 0.000215443, 0.00022603, 0.000237137, 0.00024879,
    0.00025, 0.000261016, 0.000273842, 0.000287298, 0.000301416, 0.000316228, 0.000331767,
    0.00034807, 0.000365174, 0.000383119, 0.000401945, 0.000421697, 0.000442419, 0.000464159,
    0.000486968, 0.0005, 0.000510897, 0.000536002, 0.000562341, 0.000589975, 0.000618966,
    0.000649382, 0.000681292, 0.000714771, 0.000749894, 0.000786744, 0.000825404, 0.000865964,
    0.000908518, 0.000953162, 0.001, 0.00104914, 0.00110069, 0.00115478, 0.00121153, 0.00127106,
    0.00133352, 0.00139905, 0.0014678, 0.00153993, 0.0016156, 0.00169499, 0.00177828,
    0.00186566, 0.00195734, 0.00205353, 0.00215443, 0.0022603, 0.00237137, 0.0024879, 0.0025,
    0.00261016, 0.00273842, 0.00287298, 0.00301416, 0.00316228, 0.00331767, 0.0034807,
    0.00365174, 0.00383119, 0.00401945, 0.00421697, 0.00442419, 0.00464159, 0.00486968, 0.005,
    0.00510897, 0.00536002, 0.00562341, 0.00589975, 0.00618966, 0.00649382, 0.00681292,
    0.00714771, 0.00749894, 0.00786744, 0.00825404, 0.00865964, 0.00908518, 0.00953162, 0.01,
    0.0104914, 0.0110069, 0.0115478, 0.0121153, 0.0127106, 0.0133352, 0.0139905, 0.014678,
    0.0153993, 0.016156, 0.0169499, 0.0177828, 0.0186566, 0.0195734, 0.0205353, 0.0215443,
    0.022603, 0.0237137, 0.024879, 0.025, 0.0261016, 0.0273842, 0.0287298, 0.0301416, 0.0316228,
    0.0331767, 0.034807, 0.0365174, 0.0383119, 0.0401945, 0.0421697, 0.0442419, 0.0464159,
    0.0486968, 0.05, 0.0510897, 0.0536002, 0.0562341, 0.0589975, 0.0618966, 0.0649382,
    0.0681292, 0.0714771, 0.0749894, 0.0786744, 0.0825404, 0.0865964, 0.0908518, 0.0953162, 0.1,
    0.104914, 0.110069, 0.115478, 0.121153, 0.127106, 0.133352, 0.139905, 0.14678, 0.153993,
    0.16156, 0.169499, 0.177828, 0.186566, 0.195734, 0.205353, 0.215443, 0.22603, 0.237137,
    0.24879, 0.25, 0.261016, 0.273842, 0.287298, 0.301416, 0.316228, 0.331767, 0.34807,
    0.365174, 0.383119, 0.401945, 0.421697, 0.442419, 0.464159, 0.486968, 0.5, 0.510897,
    0.536002, 0.562341, 0.589975, 0.618966, 0.649382, 0.681292, 0.714771, 0.749894, 0.786744,
    0.825404, 0.865964, 0.908518, 0.953162, 1.0, 1.04914, 1.10069, 1.15478, 1.21153, 1.27106,
    1.33352, 1.39905, 1.4678, 1.53993, 1.6156, 1.69499, 1.77828, 1.86566, 1.95734, 2.05353,
    2.15443, 2.2603, 2.37137, 2.4879, 2.5, 2.61016, 2.73842, 2.87298, 3.01416, 3.16228, 3.31767,
    3.4807, 3.65174, 3.83119, 4.01945, 4.21697, 4.42419, 4.64159, 4.86968, 5.0, 5.10897,
    5.36002, 5.62341, 5.89975, 6.18966, 6.49382, 6.81292, 7.14771, 7.49894, 7.86744, 8.25404,
    8.65964, 9.08518, 9.53162, 10.0, 10.4914, 11.0069, 11.5478, 12.1153, 12.7106, 13.3352,
    13.9905, 14.678, 15.3993, 16.156, 16.9499, 17.7828, 18.6566, 19.5734, 20.5353, 21.5443,
    22.603, 23.7137, 24.879, 26.1016, 27.3842, 28.7298, 30.0, 30.1416, 31.6228, 33.1767, 34.807,
    36.5174, 38.3119, 40.1945, 42.1697, 44.2419, 46.4159, 48.6968, 51.0897, 53.6002, 56.2341,
    58.9975, 60.0, 61.8966, 64.9382, 68.1292, 71.4771, 74.9894, 78.6744, 82.5404, 86.5964,
    90.8518, 95.3162, 100.0, 104.914, 110.069, 115.478, 120.0,
)
# fmt: on

#: Worst-case relative error of :meth:`Histogram.percentile` for values in (10 µs, 120 s]:
#: half the widest bucket, relative to its lower bound:
#: ``max((hi - lo) / (2.0 * lo) for lo, hi in pairwise(BOUNDS))``, written out.
RELATIVE_ERROR: float = 0.024571779906129347

_NBUCKETS = len(BOUNDS) + 1  # the last bucket is the overflow (> MAX_TRACKED)
# fmt: off
#: ``tuple(BOUNDS.index(p) for p in PROMETHEUS_BOUNDS)``, written out.
_PROM_INDEX: tuple[int, ...] = (
    0, 20, 35, 50, 70, 85, 100, 120, 135, 150, 170, 185, 200, 220, 235, 250, 270, 285, 300, 323,
    339,
)
# fmt: on
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
