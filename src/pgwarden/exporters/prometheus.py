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
    Every family is one entry of :data:`pgwarden.core.catalog.CATALOG` (name, type, HELP,
    labels and where in ``stats()`` it is read), so nothing here names a metric.  Names
    follow Prometheus conventions (``pgwarden_`` prefix, base units, ``_seconds``,
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

from pgwarden.core.catalog import (
    CATALOG,
    Kind,
    MetricSpec,
    Shape,
    histogram_parts,
    prometheus_help,
    samples,
)
from pgwarden.exporters import StatsHandle, pool_name, stats_source

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

#: ``stats()`` histogram key -> (Prometheus name, HELP text), from the catalog.
HISTOGRAM_METRICS: dict[str, tuple[str, str]] = {
    spec.path[-1]: (spec.prometheus, prometheus_help(spec))
    for spec in CATALOG
    if spec.shape is Shape.HISTOGRAM
}


def _le(bound: float) -> str:
    """A bucket bound as Prometheus prints it (``+Inf``, ``0.0001``, ``2.5``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _family(spec: MetricSpec) -> Metric:
    """The empty family of one catalog entry (every series also carries ``pool``)."""
    doc = prometheus_help(spec)
    if spec.kind is Kind.INFO:  # its labels are the info's keys, given per sample
        return InfoMetricFamily(spec.prometheus.removesuffix("_info"), doc, labels=["pool"])
    labels = ["pool", *(label.name for label in spec.labels if label.name is not None)]
    if spec.kind is Kind.COUNTER:
        return CounterMetricFamily(spec.prometheus.removesuffix("_total"), doc, labels=labels)
    if spec.kind is Kind.HISTOGRAM:
        return HistogramMetricFamily(spec.prometheus, doc, labels=labels)
    return GaugeMetricFamily(spec.prometheus, doc, labels=labels)


class _Families:
    """Every metric family of one scrape, one per catalog entry, created empty (which is
    what ``describe`` needs)."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {spec.key: _family(spec) for spec in CATALOG}
        up = self.families["up"]
        assert isinstance(up, GaugeMetricFamily)
        self.up = up

    def all(self) -> list[Metric]:
        return list(self.families.values())

    def add(self, pool: str, snap: Mapping[str, Any]) -> None:
        """Add the samples of one pool's snapshot."""
        for spec in CATALOG:
            family: Any = self.families[spec.key]
            if spec.shape is Shape.HISTOGRAM:
                parts = histogram_parts(spec, snap)
                if parts is not None:
                    pairs, total = parts
                    buckets = [(_le(le), float(n)) for le, n in pairs]
                    family.add_metric([pool], buckets, sum_value=total)
            elif spec.kind is Kind.INFO:
                names = [label.name for label in spec.labels]
                for values, _ in samples(spec, snap):
                    family.add_metric([pool], dict(zip(names, values, strict=True)))
            else:
                for values, value in samples(spec, snap):
                    family.add_metric([pool, *values], value)


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
