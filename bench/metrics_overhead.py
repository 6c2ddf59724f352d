"""Per-call cost of the metrics hot path: ``python bench/metrics_overhead.py [--number N]``.

Prints ns/op for ``NoopTracker.query`` (metrics off), ``StatsTracker.query`` (metrics on),
``Histogram.record`` alone, an empty call as the floor, and ``TeeTracker`` (what
``db.add_tracker()`` installs): with no-op trackers it is the fan-out's own cost, with one
and two extras; with stats as the primary it is what a handle pays once an exporter is
attached, before the exporter's own work.  Each figure is the best of several
repeats with the loop overhead of an empty ``for`` subtracted, so it is the cost the shell pays
per event.  Numbers are machine-dependent; compare them with each other, not across machines.
"""

from __future__ import annotations

import argparse
import platform
import random
import timeit
from collections.abc import Callable

from pgwarden.core.histogram import Histogram
from pgwarden.core.metrics import NoopTracker, StatsTracker, TeeTracker

_VALUES = [random.Random(42).lognormvariate(-6.0, 2.0) for _ in range(1000)]


def _loop(fn: Callable[[float], object]) -> None:
    for v in _VALUES:
        fn(v)


def _empty(fn: Callable[[float], object]) -> None:
    for _v in _VALUES:
        pass


def _nothing(value: float) -> None:
    pass


def ns_per_op(fn: Callable[[float], object], number: int, repeat: int = 7) -> float:
    """Best-of-``repeat`` nanoseconds per ``fn(value)`` call, loop overhead removed."""
    calls = number * len(_VALUES)
    best = min(timeit.repeat(lambda: _loop(fn), number=number, repeat=repeat))
    floor = min(timeit.repeat(lambda: _empty(fn), number=number, repeat=repeat))
    return max(0.0, best - floor) / calls * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--number", type=int, default=300, help="loops of 1000 calls per repeat")
    args = parser.parse_args()

    stats, noop = StatsTracker(), NoopTracker()
    cases: list[tuple[str, Callable[[float], object]]] = [
        ("empty function call", _nothing),
        ("NoopTracker.query", noop.query),
        ("Histogram.record", Histogram().record),
        ("StatsTracker.query", stats.query),
        ("TeeTracker(Noop, Noop).query", TeeTracker(noop, noop).query),
        ("TeeTracker(Noop, Noop, Noop).query", TeeTracker(noop, noop, noop).query),
        ("TeeTracker(Stats, Noop).query", TeeTracker(stats, noop).query),
    ]
    print(f"{platform.python_implementation()} {platform.python_version()}")
    for name, fn in cases:
        print(f"{name:<38} {ns_per_op(fn, args.number):8.1f} ns/op")


if __name__ == "__main__":
    main()
