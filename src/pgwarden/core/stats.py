"""The typed shape of ``db.stats()`` and ``db.histograms()`` (pure; stdlib only).

``db.stats()`` returns a plain dict; these ``TypedDict`` s say what is in it, so exporters, the
dashboard and the stress harness read it by name, with mypy checking every key, instead of
reaching into a handle's private attributes.  :data:`pgwarden.core.catalog.CATALOG` says
which metric each leaf becomes; ``tests/unit/test_catalog.py`` checks that the catalog, these
types and a real ``stats()`` agree.

Two parts depend on settings: with ``metrics=False`` the tracker's part is
``{"enabled": False}`` instead of ``counters``, ``histograms``, ``last_warmup_seconds`` and
``pool_limit``; that is why those keys are not required.  A dict read from another process
(the dashboard's ``stats.json``) may add ``ts``, ``name`` and ``buckets``
(:class:`ServedStats`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, TypedDict, Union

from pgwarden.core.histogram import Histogram

__all__ = [
    "Counters",
    "HealthChecks",
    "HistogramSummary",
    "Histograms",
    "Listen",
    "PoolGauges",
    "Retries",
    "ServedStats",
    "Stats",
    "TrackerStats",
    "Warmups",
    "problems",
]


class HistogramSummary(TypedDict):
    """One histogram in ``stats()["histograms"]`` (seconds; percentiles over its whole life)."""

    count: int
    sum: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float


class Retries(TypedDict):
    """``counters.retries``: the total, and counts by attempt number and by failure kind."""

    total: int
    by_attempt: dict[str, int]
    by_reason: dict[str, int]


class Warmups(TypedDict):
    """``counters.warmups``: readiness warmups by result."""

    ok: int
    failed: int


class HealthChecks(TypedDict):
    """``counters.health_checks``: health checks run (not cached answers) by result."""

    passed: int
    failed: int


class Counters(TypedDict):
    """``stats()["counters"]``: monotonic counts since the handle was made."""

    queries: int
    errors: dict[str, int]
    retries: Retries
    connections_opened: int
    connections_closed: dict[str, int]
    connect_failures: dict[str, int]
    acquire_timeouts: int
    warmups: Warmups
    overload_events: int
    breaker_transitions: dict[str, int]
    ambiguous_commits: dict[str, int]
    health_checks: HealthChecks
    slow_queries: int
    leaked_connections: int


class PoolGauges(TypedDict):
    """``stats()["pool"]``: the pool as it is now."""

    size: int
    idle: int
    in_use: int
    waiting: int
    max_size: int
    idle_max: int
    utilization: float
    limit: int
    configured_max: int
    connections_lost: int


class Listen(TypedDict):
    """``stats()["listen"]``: the handle's one LISTEN connection (``db.listen()``)."""

    channels: int
    subscribers: int
    connected: bool
    backend_pid: int | None
    in_outage: bool
    notifications_total: int
    gaps_total: int
    overflows_total: int
    reconnects_total: int
    connect_failures_total: int
    last_gap_at: float | None
    last_error: str | None


class TrackerStats(TypedDict, total=False):
    """What a :class:`~pgwarden.core.metrics.StatsTracker` contributes (absent when metrics
    are off, when ``enabled`` is False instead)."""

    enabled: bool
    counters: Counters
    histograms: dict[str, HistogramSummary]
    last_warmup_seconds: float | None
    pool_limit: int | None
    #: Added by the handle (``db.stats()``), not by ``HandleState.stats()``.
    listen: Listen
    #: With ``fleet_budget`` set only; not yet in the metric catalog.
    fleet: dict[str, Any]


class Stats(TrackerStats):
    """The whole of ``db.stats()``."""

    pool: PoolGauges
    state: str
    breaker: str
    pgbouncer: bool
    warmup_seconds: float | None
    in_flight: int
    retry_budget_tokens: float


class ServedStats(Stats, total=False):
    """:func:`pgwarden.exporters.snapshot`: ``stats()`` redacted, with the serving time, the
    pool label and cumulative ``[le, count]`` buckets per histogram (``le`` may be
    ``"+Inf"``)."""

    ts: float
    name: str
    buckets: dict[str, list[list[float | int | str]]]


#: ``db.histograms()``: the live histograms behind ``stats()["histograms"]``, by the same keys.
Histograms = Mapping[str, Histogram]


def problems(value: object, shape: Any = Stats, where: str = "stats") -> list[str]:
    """Where *value* disagrees with the TypedDict *shape* (default :class:`Stats`): missing
    required keys, unknown keys and values of the wrong type, each as ``"path: what"``.

    ``[]`` means it conforms.  Meant for a stats dict that crossed a process boundary (the
    dashboard's ``stats.json``) and for tests; ``int`` is accepted where ``float`` is
    declared, as JSON does.
    """
    origin = typing.get_origin(shape)
    if shape is Any:
        return []
    if origin in (Union, types.UnionType):
        options = typing.get_args(shape)
        if any(not problems(value, option, where) for option in options):
            return []
        return [f"{where}: {value!r} is none of {options}"]
    if shape is type(None):
        return [] if value is None else [f"{where}: {value!r} is not None"]
    if isinstance(shape, type) and typing.is_typeddict(shape):
        if not isinstance(value, Mapping):
            return [f"{where}: {type(value).__name__} is not a mapping"]
        hints = typing.get_type_hints(shape)
        required: frozenset[str] = getattr(shape, "__required_keys__", frozenset())
        out = [f"{where}.{key}: missing" for key in sorted(required - set(value))]
        for key, item in value.items():
            if key not in hints:
                out.append(f"{where}.{key}: not part of {shape.__name__}")
            else:
                out.extend(problems(item, hints[key], f"{where}.{key}"))
        return out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return [f"{where}: {type(value).__name__} is not a mapping"]
        key_type, item_type = typing.get_args(shape)
        out = []
        for key, item in value.items():
            out.extend(problems(key, key_type, f"{where}[{key!r}]"))
            out.extend(problems(item, item_type, f"{where}[{key!r}]"))
        return out
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__} is not a list"]
        (item_type,) = typing.get_args(shape)
        return [
            p for i, item in enumerate(value) for p in problems(item, item_type, f"{where}[{i}]")
        ]
    wanted: tuple[type, ...] = (int, float) if shape is float else (shape,)
    if isinstance(value, bool) and shape is not bool:
        return [f"{where}: {value!r} is a bool, not {shape.__name__}"]
    if not isinstance(value, wanted):
        return [f"{where}: {type(value).__name__} is not {getattr(shape, '__name__', shape)}"]
    return []
