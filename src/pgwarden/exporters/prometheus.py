"""Prometheus exporter (extra ``prometheus``): a collector over ``stats()`` and ``/metrics`` apps.

    from pgwarden.exporters.prometheus import register, asgi_app
    register(db)                           # into prometheus_client's default REGISTRY
    app.mount("/metrics", asgi_app())      # or wsgi_app(), or metrics_handler()

Theory of operation
    :class:`PgwardenCollector` is a custom collector: nothing is recorded twice.  On every
    scrape it calls each source's ``stats()`` (a plain-dict snapshot that costs microseconds
    and does no I/O) and turns it into metric families.  Histograms are exported with real
    cumulative buckets read from the handle's own histograms
    (:data:`~pgwarden.core.histogram.PROMETHEUS_BOUNDS`, 10 µs to 60 s), so
    ``histogram_quantile()`` works across a fleet.  A scrape from another thread is fine: the
    snapshot is lock-free and at worst one sample behind.

Names and labels
    Names follow Prometheus conventions (``pgwarden_`` prefix, base units, ``_seconds``,
    ``_ratio``, counters end in ``_total``); each HELP text names the OpenTelemetry
    semantic-convention metric it corresponds to, where one exists (``db.client.connection.*``
    such as ``db.client.connection.timeouts`` and ``db.client.connection.use_time``,
    ``db.client.operation.duration``).  Every series carries ``pool``: the handle's
    ``application_name`` or the name given to :func:`register`.  The other labels come from
    fixed vocabularies (failure kinds, close reasons, lifecycle and breaker states, retry
    attempt capped at ``5+``); anything else is reported as ``other``.  No label ever holds
    SQL, parameters, a URL or a password.  Labelled counters are emitted for every known label
    value, at 0 until they move, so ``rate()`` and alerts see a series from the first scrape.

Only this module imports ``prometheus_client``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pgwarden.exporters import (
    AMBIGUOUS_OUTCOMES,
    BREAKER_STATES,
    CLOSE_REASONS,
    HISTOGRAMS,
    KINDS,
    MAX_ATTEMPT_LABEL,
    OTHER,
    STATES,
    StatsHandle,
    attempt_label,
    bounded,
    parse_buckets,
    pool_name,
    stats_source,
)

__all__ = [
    "HISTOGRAM_METRICS",
    "PgwardenCollector",
    "asgi_app",
    "generate",
    "metrics_handler",
    "register",
    "wsgi_app",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: ``stats()`` histogram key -> (Prometheus name, HELP text).
HISTOGRAM_METRICS: dict[str, tuple[str, str]] = {
    "acquire_wait_seconds": (
        "pgwarden_acquire_wait_seconds",
        "Time waiting to obtain a connection from the pool (OTel db.client.connection.wait_time).",
    ),
    "connection_use_seconds": (
        "pgwarden_connection_use_seconds",
        "Time a connection was held by one caller, checkout to return "
        "(OTel db.client.connection.use_time).",
    ),
    "query_duration_seconds": (
        "pgwarden_query_duration_seconds",
        "Duration of successful operations, acquire included (OTel db.client.operation.duration).",
    ),
    "connection_setup_seconds": (
        "pgwarden_connection_setup_seconds",
        "Time to establish a new server connection (OTel db.client.connection.create_time).",
    ),
    "warmup_duration_seconds": (
        "pgwarden_warmup_duration_seconds",
        "Duration of readiness warmups, failed ones included (no OTel equivalent).",
    ),
}

_RESULTS_WARMUP = ("ok", "failed")
_RESULTS_HEALTH = ("passed", "failed")
_ATTEMPTS = (*(str(n) for n in range(1, MAX_ATTEMPT_LABEL)), f"{MAX_ATTEMPT_LABEL}+")
_TRANSITIONS = tuple(
    (a, b) for a in BREAKER_STATES for b in BREAKER_STATES if a != b
)  # every ordered pair: 6 series


def _num(value: object) -> float:
    """A finite float from a stats value (``None``, junk and NaN become 0)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return 0.0


def _le(bound: float) -> str:
    """A bucket bound as Prometheus prints it (``+Inf``, ``0.0001``, ``2.5``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _by_vocabulary(
    counts: Mapping[str, Any], vocabulary: Iterable[str], *, label: Callable[[str], str] | None
) -> dict[str, float]:
    """Counts keyed by bounded label values: every vocabulary value (0 if absent), plus
    ``other`` when something outside it was counted."""
    out = {v: 0.0 for v in vocabulary}
    for key, n in counts.items():
        name = label(key) if label is not None else bounded(key, out)
        if name not in out:
            name = OTHER
        out[name] = out.get(name, 0.0) + _num(n)
    return out


class _Families:
    """Every metric family of one scrape, created empty (which is what ``describe`` needs)."""

    def __init__(self) -> None:
        p = ["pool"]
        self.up = GaugeMetricFamily(
            "pgwarden_up", "1 if the pool's stats could be read at this scrape, else 0.", labels=p
        )
        self.info = InfoMetricFamily(
            "pgwarden",
            "Static facts about the pool (PgBouncer detected, pgwarden version).",
            labels=p,
        )
        self.state = GaugeMetricFamily(
            "pgwarden_state",
            "Lifecycle state of the handle: 1 for the current state, 0 for the others.",
            labels=[*p, "state"],
        )
        self.breaker = GaugeMetricFamily(
            "pgwarden_breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
            labels=[*p, "state"],
        )
        self.connections = GaugeMetricFamily(
            "pgwarden_pool_connections",
            "Open connections by state, idle or used (OTel db.client.connection.count with "
            "db.client.connection.state).",
            labels=[*p, "state"],
        )
        self.size = GaugeMetricFamily(
            "pgwarden_pool_size", "Open connections, idle and used together.", labels=p
        )
        self.max = GaugeMetricFamily(
            "pgwarden_pool_max_connections",
            "Maximum connections the pool may open now (OTel db.client.connection.max).",
            labels=p,
        )
        self.idle_max = GaugeMetricFamily(
            "pgwarden_pool_idle_max_connections",
            "Maximum idle connections kept (OTel db.client.connection.idle.max).",
            labels=p,
        )
        self.pending = GaugeMetricFamily(
            "pgwarden_pool_pending_requests",
            "Callers waiting for a connection (OTel db.client.connection.pending_requests).",
            labels=p,
        )
        self.utilization = GaugeMetricFamily(
            "pgwarden_pool_utilization_ratio",
            "Used connections divided by the pool's current maximum (0..1).",
            labels=p,
        )
        self.limit = GaugeMetricFamily(
            "pgwarden_pool_limit_connections",
            "Connection limit chosen by adaptive sizing (lowered on server overload).",
            labels=p,
        )
        self.configured_max = GaugeMetricFamily(
            "pgwarden_pool_configured_max_connections",
            "Configured max_size: the limit adaptive sizing grows back to.",
            labels=p,
        )
        self.in_flight = GaugeMetricFamily(
            "pgwarden_in_flight_operations",
            "Operations (queries, transactions, borrowed connections) in progress.",
            labels=p,
        )
        self.budget = GaugeMetricFamily(
            "pgwarden_retry_budget_tokens",
            "Retries the retry budget would allow right now.",
            labels=p,
        )
        self.last_warmup = GaugeMetricFamily(
            "pgwarden_last_warmup_seconds",
            "Duration of the most recent successful warmup.",
            labels=p,
        )
        self.queries = CounterMetricFamily(
            "pgwarden_queries", "Operations that succeeded.", labels=p
        )
        self.errors = CounterMetricFamily(
            "pgwarden_errors",
            "Failed attempts by failure kind (before any retry decision).",
            labels=[*p, "kind"],
        )
        self.retries = CounterMetricFamily(
            "pgwarden_retries",
            "Retries by the failure kind that caused them.",
            labels=[*p, "reason"],
        )
        self.retry_attempts = CounterMetricFamily(
            "pgwarden_retry_attempts",
            f"Retries by attempt number (1 = first retry; {MAX_ATTEMPT_LABEL}+ groups the rest).",
            labels=[*p, "attempt"],
        )
        self.opened = CounterMetricFamily(
            "pgwarden_connections_opened", "Server connections established.", labels=p
        )
        self.closed = CounterMetricFamily(
            "pgwarden_connections_closed",
            "Pooled connections closed, by reason (lifetime, idle, broken, drain, failover, "
            "close).",
            labels=[*p, "reason"],
        )
        self.lost = CounterMetricFamily(
            "pgwarden_pool_connections_lost",
            "Connections the pool found broken (lost while idle or returned bad).",
            labels=p,
        )
        self.connect_failures = CounterMetricFamily(
            "pgwarden_connect_failures",
            "Failed attempts to open a connection, by failure kind.",
            labels=[*p, "kind"],
        )
        self.acquire_timeouts = CounterMetricFamily(
            "pgwarden_acquire_timeouts",
            "Callers that gave up waiting for a pooled connection: acquire timeout or deadline "
            "(OTel db.client.connection.timeouts).",
            labels=p,
        )
        self.warmups = CounterMetricFamily(
            "pgwarden_warmups",
            "Readiness warmups by result (ok, failed).",
            labels=[*p, "result"],
        )
        self.overloads = CounterMetricFamily(
            "pgwarden_overload_events",
            "Server or pooler overload reports (53300 too many clients, reserved slots, "
            "pooler full).",
            labels=p,
        )
        self.transitions = CounterMetricFamily(
            "pgwarden_breaker_transitions",
            "Circuit breaker transitions by from and to state.",
            labels=[*p, "from", "to"],
        )
        self.ambiguous = CounterMetricFamily(
            "pgwarden_ambiguous_commits",
            "COMMITs whose connection was lost, by resolved outcome.",
            labels=[*p, "outcome"],
        )
        self.health = CounterMetricFamily(
            "pgwarden_health_checks",
            "Health checks run (not cached), by result.",
            labels=[*p, "result"],
        )
        self.slow = CounterMetricFamily(
            "pgwarden_slow_queries",
            "Statements slower than slow_query_threshold.",
            labels=p,
        )
        self.leaked = CounterMetricFamily(
            "pgwarden_leaked_connections",
            "Connections held longer than leak_threshold (reported once per hold).",
            labels=p,
        )
        self.histograms = {
            key: HistogramMetricFamily(name, doc, labels=p)
            for key, (name, doc) in HISTOGRAM_METRICS.items()
        }

    def all(self) -> list[Metric]:
        fams: list[Metric] = [
            v for k, v in vars(self).items() if k != "histograms" and isinstance(v, Metric)
        ]
        return fams + list(self.histograms.values())

    def add(self, pool: str, snap: Mapping[str, Any]) -> None:
        """Add the samples of one pool's snapshot."""
        p = [pool]
        self.up.add_metric(p, 1.0)
        self.info.add_metric(
            p,
            {
                "pgbouncer": "true" if snap.get("pgbouncer") else "false",
                "version": _pgwarden_version(),
            },
        )
        state = str(snap.get("state", ""))
        for s in STATES:
            self.state.add_metric([pool, s], 1.0 if s == state else 0.0)
        breaker = str(snap.get("breaker", ""))
        for s in BREAKER_STATES:
            self.breaker.add_metric([pool, s], 1.0 if s == breaker else 0.0)

        g = _mapping(snap.get("pool"))
        self.connections.add_metric([pool, "idle"], _num(g.get("idle")))
        self.connections.add_metric([pool, "used"], _num(g.get("in_use")))
        self.size.add_metric(p, _num(g.get("size")))
        self.max.add_metric(p, _num(g.get("max_size")))
        self.idle_max.add_metric(p, _num(g.get("idle_max", g.get("max_size"))))
        self.pending.add_metric(p, _num(g.get("waiting")))
        self.utilization.add_metric(p, _num(g.get("utilization")))
        self.limit.add_metric(p, _num(g.get("limit", g.get("max_size"))))
        self.configured_max.add_metric(p, _num(g.get("configured_max", g.get("max_size"))))
        self.lost.add_metric(p, _num(g.get("connections_lost")))
        self.in_flight.add_metric(p, _num(snap.get("in_flight")))
        self.budget.add_metric(p, _num(snap.get("retry_budget_tokens")))
        last = snap.get("last_warmup_seconds")
        if isinstance(last, (int, float)) and math.isfinite(last):
            self.last_warmup.add_metric(p, float(last))

        c = _mapping(snap.get("counters"))
        self.queries.add_metric(p, _num(c.get("queries")))
        for kind, n in _by_vocabulary(_mapping(c.get("errors")), KINDS, label=None).items():
            self.errors.add_metric([pool, kind], n)
        r = _mapping(c.get("retries"))
        for reason, n in _by_vocabulary(_mapping(r.get("by_reason")), KINDS, label=None).items():
            self.retries.add_metric([pool, reason], n)
        by_attempt = _by_vocabulary(_mapping(r.get("by_attempt")), _ATTEMPTS, label=attempt_label)
        for attempt, n in by_attempt.items():
            self.retry_attempts.add_metric([pool, attempt], n)
        self.opened.add_metric(p, _num(c.get("connections_opened")))
        closed = _by_vocabulary(_mapping(c.get("connections_closed")), CLOSE_REASONS, label=None)
        for reason, n in closed.items():
            self.closed.add_metric([pool, reason], n)
        failures = _by_vocabulary(_mapping(c.get("connect_failures")), KINDS, label=None)
        for kind, n in failures.items():
            self.connect_failures.add_metric([pool, kind], n)
        self.acquire_timeouts.add_metric(p, _num(c.get("acquire_timeouts")))
        w = _mapping(c.get("warmups"))
        for result in _RESULTS_WARMUP:
            self.warmups.add_metric([pool, result], _num(w.get(result)))
        self.overloads.add_metric(p, _num(c.get("overload_events")))
        seen = {pair: 0.0 for pair in _TRANSITIONS}
        for key, n in _mapping(c.get("breaker_transitions")).items():
            src, _, dst = str(key).partition("->")
            pair = (bounded(src, BREAKER_STATES), bounded(dst, BREAKER_STATES))
            seen[pair] = seen.get(pair, 0.0) + _num(n)
        for (src, dst), n in seen.items():
            self.transitions.add_metric([pool, src, dst], n)
        ambiguous = _by_vocabulary(
            _mapping(c.get("ambiguous_commits")), AMBIGUOUS_OUTCOMES, label=None
        )
        for outcome, n in ambiguous.items():
            self.ambiguous.add_metric([pool, outcome], n)
        h = _mapping(c.get("health_checks"))
        for result in _RESULTS_HEALTH:
            self.health.add_metric([pool, result], _num(h.get(result)))
        self.slow.add_metric(p, _num(c.get("slow_queries")))
        self.leaked.add_metric(p, _num(c.get("leaked_connections")))

        hists = _mapping(snap.get("histograms"))
        buckets = _mapping(snap.get("buckets"))
        for key in HISTOGRAMS:
            summary = _mapping(hists.get(key))
            pairs = parse_buckets(buckets.get(key))
            if pairs is None:
                if not summary:
                    continue
                # No bucket detail (a plain stats dict): count and sum are still exact.
                pairs = [(math.inf, int(_num(summary.get("count"))))]
            self.histograms[key].add_metric(
                p,
                [(_le(le), float(n)) for le, n in pairs],
                sum_value=_num(summary.get("sum")),
            )


_VERSION: list[str] = []


def _pgwarden_version() -> str:
    if not _VERSION:
        import pgwarden

        _VERSION.append(str(pgwarden.__version__))
    return _VERSION[0]


class PgwardenCollector(Collector):
    """A Prometheus collector over one or more pgwarden handles (or stats callables).

    *source* is an :class:`~pgwarden.AsyncDatabase` / :class:`~pgwarden.Database`, a callable
    returning a ``stats()``-shaped dict (with ``buckets`` as :func:`pgwarden.exporters.snapshot`
    adds them, for real histogram buckets), or None to start empty and :meth:`add` later.
    *name* is the ``pool`` label (default: the handle's ``application_name``, or ``default``).
    A source whose stats cannot be read is reported as ``pgwarden_up{pool=...} 0``.
    """

    def __init__(self, source: object = None, *, name: str | None = None) -> None:
        self._lock = threading.Lock()
        self._sources: list[tuple[str, object, Callable[[], dict[str, Any]]]] = []
        if source is not None:
            self.add(source, name=name)

    @property
    def pools(self) -> list[str]:
        """The ``pool`` label values, one per source."""
        with self._lock:
            return [label for label, _, _ in self._sources]

    def add(self, source: object, *, name: str | None = None) -> str:
        """Collect *source* too; return its ``pool`` label.  Raises ``ValueError`` if another
        source already has that label (pass a distinct *name*)."""
        label = pool_name(source, name) if isinstance(source, StatsHandle) else None
        if label is None:
            label = pool_name(None, name)
        fn = stats_source(source, name=label)
        with self._lock:
            for existing, obj, _ in self._sources:
                if obj is source:
                    return existing
                if existing == label:
                    raise ValueError(
                        f"a pgwarden pool labelled {label!r} is already collected; "
                        "pass name=... to tell them apart"
                    )
            self._sources.append((label, source, fn))
        return label

    def remove(self, source: object) -> bool:
        """Stop collecting *source*; True if it was collected."""
        with self._lock:
            before = len(self._sources)
            self._sources = [s for s in self._sources if s[1] is not source]
            return len(self._sources) != before

    def describe(self) -> list[Metric]:
        """The metric families without samples (lets the registry detect name clashes)."""
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        fams = _Families()
        with self._lock:
            sources = list(self._sources)
        for label, _, fn in sources:
            try:
                snap = fn()
            except Exception:
                fams.up.add_metric([label], 0.0)
                continue
            fams.add(label, snap)
        yield from fams.all()


# One collector per registry, so several handles share the metric families.
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, PgwardenCollector] = (
    weakref.WeakKeyDictionary()
)
_COLLECTORS_LOCK = threading.Lock()


def register(
    source: object, registry: CollectorRegistry | None = None, *, name: str | None = None
) -> PgwardenCollector:
    """Export *source* (a handle or stats callable) through *registry* (default: the global
    ``prometheus_client.REGISTRY``).  Calling it again for another handle adds that handle to
    the same collector under its own ``pool`` label; for the same handle it does nothing."""
    reg = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(reg)
        if collector is None:
            collector = PgwardenCollector()
            collector.add(source, name=name)
            reg.register(collector)
            _COLLECTORS[reg] = collector
            return collector
    collector.add(source, name=name)
    return collector


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Remove the collector that :func:`register` put into *registry*, if any."""
    reg = REGISTRY if registry is None else registry
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.pop(reg, None)
    if collector is not None:
        reg.unregister(collector)


def generate(
    registry: CollectorRegistry | None = None, accept: str | None = None
) -> tuple[bytes, str]:
    """The exposition body and its content type, negotiated from an ``Accept`` header
    (OpenMetrics when asked for, else the Prometheus text format 0.0.4)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY if registry is None else registry), content_type


def metrics_handler(
    registry: CollectorRegistry | None = None,
) -> Callable[[str | None], tuple[bytes, str]]:
    """A framework-neutral handler: ``handler(accept_header) -> (body, content_type)``.

    For example in Flask: ``body, ctype = handler(request.headers.get("Accept"))``.
    """

    def handler(accept: str | None = None) -> tuple[bytes, str]:
        return generate(registry, accept)

    return handler


def asgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]:
    """A raw ASGI app serving the metrics on every path it is mounted at (GET and HEAD).

    Answers the ``lifespan`` protocol too, so it can run as a top-level app.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        accept = ",".join(
            v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"accept"
        )
        body, content_type = generate(registry, accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def wsgi_app(
    registry: CollectorRegistry | None = None,
) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
    """A WSGI app serving the metrics on every path it is mounted at (GET and HEAD)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")]
            )
            return [b""]
        body, content_type = generate(registry, environ.get("HTTP_ACCEPT"))
        start_response(
            "200 OK",
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b"" if method == "HEAD" else body]

    return app
