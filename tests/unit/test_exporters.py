"""Exporters, structured logs and the dashboard app, without a database.

A fake handle backed by a real :class:`StatsTracker` stands in for ``AsyncDatabase``: the
exporters only use its public surface, ``settings``, ``stats()``, ``histograms()``,
``add_tracker()`` and ``add_statement_observer()``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgwarden.core.histogram import Histogram
from pgwarden.core.metrics import MetricsTracker, StatsTracker, TeeTracker, pool_gauges
from pgwarden.core.tracing import (
    NOOP_STATEMENT_OBSERVER,
    StatementObserver,
    with_observer,
    without_observer,
)
from pgwarden.exporters import (
    HISTOGRAMS,
    attach_statement_observer,
    attach_tracker,
    attempt_label,
    bounded,
    histograms_of,
    parse_buckets,
    pool_name,
    snapshot,
    stats_source,
)
from pgwarden.exporters.prometheus import (
    PgwardenCollector,
    asgi_app,
    generate,
    metrics_handler,
    register,
    unregister,
    wsgi_app,
)
from pgwarden.logs import EventBuffer, JsonFormatter, configure_json_logging, record_to_dict
from pgwarden.settings import Settings

SECRET = "s3cr3t-Pa55word"
URL = f"postgresql://app:{SECRET}@db.internal:5432/orders"


class FakeHandle:
    """What the exporters see of a handle: ``settings``, ``stats()``, ``histograms()``,
    ``add_tracker()`` and ``add_statement_observer()``, built the way the handle builds them.

    ``tracker`` and ``observer`` are what the handle calls on each metrics event and around
    each statement; :meth:`run` reports one statement attempt as the handle does.
    """

    def __init__(self, app: str = "orders-api", tracker: MetricsTracker | None = None) -> None:
        self.settings = SimpleNamespace(url=URL, application_name=app, max_size=10)
        self.tracker: MetricsTracker = tracker if tracker is not None else StatsTracker()
        self.observer: StatementObserver = NOOP_STATEMENT_OBSERVER
        self.state = "ready"
        self.breaker = "closed"

    def add_tracker(self, extra: MetricsTracker) -> Callable[[], None]:
        current = self.tracker
        tee = TeeTracker(current, extra)
        self.tracker = tee

        def remove() -> None:
            if self.tracker is tee:
                self.tracker = current

        return remove

    def add_statement_observer(self, observer: StatementObserver) -> Callable[[], None]:
        self.observer = with_observer(self.observer, observer)
        attached = [True]

        def remove() -> None:
            if attached.pop() if attached else False:
                self.observer = without_observer(self.observer, observer)

        return remove

    def histograms(self) -> Mapping[str, Histogram]:
        found = getattr(self.tracker, "histograms", None)  # a StatsTracker's, or a tee's primary's
        return found if isinstance(found, Mapping) else {}

    def run(
        self,
        operation: str,
        query: object,
        *,
        error: BaseException | None = None,
        rowcount: int | None = None,
    ) -> None:
        """One attempt of one statement, reported the way the handle reports it."""
        token = self.observer.statement_started(operation, query)
        self.observer.statement_finished(token, error, rowcount)

    def stats(self) -> dict[str, Any]:
        snap: dict[str, Any] = dict(self.tracker.snapshot())
        snap["pool"] = dict(pool_gauges(size=4, idle=1, in_use=3, waiting=2, max_size=10))
        snap["pool"].update(limit=10, configured_max=10, connections_lost=1)
        snap.update(
            state=self.state,
            breaker=self.breaker,
            pgbouncer=False,
            warmup_seconds=0.01,
            retry_budget_tokens=3.5,
            in_flight=3,
        )
        return snap


def busy_handle() -> FakeHandle:
    h = FakeHandle()
    t = h.tracker
    for i in range(100):
        t.query(0.001 * (i + 1))  # 1 ms .. 100 ms
        t.acquire(0.00002)
        t.connection_used(0.002)
    t.acquire_timeout()
    t.acquire_timeout()
    t.query_error("permanent")
    t.query_error("stale")
    t.query_error("made-up-kind")  # must surface as kind="other", not as itself
    t.retry("stale", 1)
    t.retry("stale", 2)
    t.retry("overload", 9)  # attempt 9 -> "5+"
    t.connection_opened(0.004)
    t.connection_closed("broken")
    t.connect_failed("overload")
    t.overload()
    t.breaker_transition("closed", "open")
    t.breaker_transition("open", "half_open")
    t.ambiguous_commit("committed")
    t.health_check(True)
    t.slow_query()
    t.leaked_connection()
    t.warmup(0.02, True)
    return h


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    body, ctype = generate(registry)
    assert ctype.startswith("text/plain")
    text = body.decode()
    assert SECRET not in text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], sample: str, **labels: str) -> float:
    family = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in fams:
            family = sample[: -len(suffix)]
    found = [
        s.value
        for s in fams[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample, labels, found)
    return float(found[0])


# --- shared helpers ---------------------------------------------------------------------------


def test_bounded_labels_and_attempts() -> None:
    assert bounded("stale", ("stale", "lost")) == "stale"
    assert bounded("SELECT * FROM secrets", ("stale",)) == "other"
    assert [attempt_label(n) for n in (1, 4, 5, 12, 0, "x")] == [
        "1",
        "4",
        "5+",
        "5+",
        *2 * ["other"],
    ]


def test_pool_name_is_redacted_and_bounded() -> None:
    assert pool_name(FakeHandle()) == "orders-api"
    assert pool_name(FakeHandle(app="")) == "default"
    assert pool_name(None, "x" * 500) == "x" * 64
    assert SECRET not in pool_name(FakeHandle(app=f"app {URL}"))


def test_snapshot_adds_buckets_and_redacts() -> None:
    h = busy_handle()
    h.breaker = URL  # a secret smuggled into any string is masked
    snap = snapshot(h)
    assert SECRET not in json.dumps(snap)
    assert snap["name"] == "orders-api"
    buckets = parse_buckets(snap["buckets"]["query_duration_seconds"])
    assert buckets is not None
    assert buckets[-1] == (math.inf, 100)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)
    assert json.loads(json.dumps(snap)) == snap  # JSON-safe (no inf)
    assert parse_buckets([[0.1, 1]]) is None  # no +Inf bucket: rejected
    assert parse_buckets("junk") is None


def test_stats_source_accepts_handles_callables_and_dicts() -> None:
    assert "buckets" in stats_source(busy_handle())()
    assert stats_source(lambda: {"counters": {"queries": 1}})() == {"counters": {"queries": 1}}
    assert stats_source({"state": "ready"})() == {"state": "ready"}
    with pytest.raises(TypeError):
        stats_source(42)
    with pytest.raises(TypeError):
        stats_source(lambda: [1, 2])()


def test_attach_tracker_uses_add_tracker_and_keeps_stats() -> None:
    class Boom(StatsTracker):
        def query(self, duration: float) -> None:
            raise RuntimeError("exporter bug")

    original = StatsTracker()
    h = FakeHandle(tracker=original)
    extra = Boom()
    detach = attach_tracker(h, extra)
    tee = h.tracker
    assert isinstance(tee, TeeTracker)
    assert tee.primary is original
    assert tee.extras == (extra,)
    tee.query(0.01)  # the extra raises; the query must not
    tee.acquire(0.001)
    assert h.stats()["counters"]["queries"] == 1  # the handle's own shape
    assert extra.acquire_wait.count == 1
    assert histograms_of(h)["query_duration_seconds"] is original.query_duration
    detach()
    assert h.tracker is original
    detach()  # a second detach is harmless
    assert h.tracker is original


def test_attach_tracker_needs_add_tracker() -> None:
    legacy = SimpleNamespace(stats=dict)  # stats() but no add_tracker
    with pytest.raises(TypeError, match="add_tracker"):
        attach_tracker(legacy, StatsTracker())
    with pytest.raises(TypeError, match="add_tracker"):
        attach_tracker(object(), StatsTracker())


class Seen:
    """A statement observer that records the statements it is told about."""

    def __init__(self) -> None:
        self.started: list[tuple[str, object]] = []
        self.finished: list[tuple[object, BaseException | None, int | None]] = []

    def statement_started(self, operation: str, query: object) -> object:
        self.started.append((operation, query))
        return len(self.started)

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        self.finished.append((token, error, rowcount))


def test_attach_statement_observer_uses_add_statement_observer() -> None:
    h = FakeHandle()
    seen = Seen()
    remove = attach_statement_observer(h, seen)
    h.run("fetch", "SELECT 1", rowcount=1)
    assert seen.started == [("fetch", "SELECT 1")]
    assert seen.finished == [(1, None, 1)]
    remove()
    remove()  # a second remove is harmless
    assert h.observer is NOOP_STATEMENT_OBSERVER
    h.run("fetch", "SELECT 2")
    assert len(seen.started) == 1
    with pytest.raises(TypeError, match="add_statement_observer"):
        attach_statement_observer(SimpleNamespace(stats=dict), seen)


def test_histograms_of_uses_only_the_public_histograms() -> None:
    h = busy_handle()
    assert histograms_of(h) == h.histograms()
    assert set(histograms_of(h)) == set(HISTOGRAMS)
    assert histograms_of(h)["connection_use_seconds"].count == 100
    private_only = SimpleNamespace(_core=SimpleNamespace(tracker=StatsTracker()))
    assert histograms_of(private_only) == {}  # private attributes are not read
    assert histograms_of(SimpleNamespace(histograms=lambda: {"x": 1})) == {}
    assert histograms_of(SimpleNamespace(histograms=StatsTracker().histograms)) == {}
    assert histograms_of(lambda: {}) == {}
    assert histograms_of(FakeHandle(tracker=TeeTracker(StatsTracker()))) != {}


def test_attach_tracker_to_a_real_handle() -> None:
    """The real handle's public surface (needs ``histograms()`` and ``add_statement_observer``
    on ``AsyncDatabase``).  No I/O: nothing connects until a statement runs."""
    from pgwarden import AsyncDatabase

    db = AsyncDatabase(Settings(url=URL, application_name="real"))
    before = db.stats()
    hists = db.histograms()
    assert set(hists) >= set(HISTOGRAMS)
    assert all(isinstance(h, Histogram) for h in hists.values())
    assert histograms_of(db) == hists
    extra = StatsTracker()
    detach = attach_tracker(db, extra)
    assert db.stats().keys() == before.keys()  # attaching keeps stats() the handle's own
    assert db.histograms()["query_duration_seconds"] is hists["query_duration_seconds"]
    hists["query_duration_seconds"].record(0.002)  # live: stats() reads these very objects
    after = db.stats()
    assert after["histograms"]["query_duration_seconds"]["count"] == 1
    assert snapshot(db)["buckets"]["query_duration_seconds"][-1] == ["+Inf", 1]
    assert extra.query_duration.count == 0  # the extra only sees events, not the primary
    detach()
    detach()
    assert db.stats().keys() == before.keys()
    remove = db.add_statement_observer(NOOP_STATEMENT_OBSERVER)
    remove()
    remove()


# --- Prometheus -------------------------------------------------------------------------------


def test_collector_exports_every_metric_with_bounded_labels() -> None:
    registry = CollectorRegistry()
    registry.register(PgwardenCollector(busy_handle()))
    fams = scrape(registry)
    pool = {"pool": "orders-api"}
    assert value(fams, "pgwarden_up", **pool) == 1
    assert value(fams, "pgwarden_queries_total", **pool) == 100
    assert value(fams, "pgwarden_errors_total", kind="stale", **pool) == 1
    assert value(fams, "pgwarden_errors_total", kind="other", **pool) == 1
    assert value(fams, "pgwarden_errors_total", kind="timeout", **pool) == 0  # pre-populated
    assert value(fams, "pgwarden_retries_total", reason="stale", **pool) == 2
    assert value(fams, "pgwarden_retry_attempts_total", attempt="5+", **pool) == 1
    assert value(fams, "pgwarden_connections_closed_total", reason="broken", **pool) == 1
    assert value(fams, "pgwarden_connect_failures_total", kind="overload", **pool) == 1
    assert value(fams, "pgwarden_overload_events_total", **pool) == 1
    assert value(fams, "pgwarden_breaker_transitions_total", **{"from": "closed"}, to="open") == 1
    assert value(fams, "pgwarden_ambiguous_commits_total", outcome="committed") == 1
    assert value(fams, "pgwarden_health_checks_total", result="passed") == 1
    assert value(fams, "pgwarden_slow_queries_total") == 1
    assert value(fams, "pgwarden_leaked_connections_total") == 1
    assert value(fams, "pgwarden_warmups_total", result="ok") == 1
    assert value(fams, "pgwarden_pool_connections", state="used") == 3
    assert value(fams, "pgwarden_pool_connections", state="idle") == 1
    assert value(fams, "pgwarden_pool_pending_requests") == 2
    assert value(fams, "pgwarden_pool_utilization_ratio") == pytest.approx(0.3)
    assert value(fams, "pgwarden_pool_max_connections") == 10
    assert value(fams, "pgwarden_state", state="ready") == 1
    assert value(fams, "pgwarden_state", state="open") == 0
    assert value(fams, "pgwarden_breaker_state", state="closed") == 1
    assert value(fams, "pgwarden_info", pgbouncer="false") == 1
    # real buckets: 100 samples of 1..100 ms
    assert value(fams, "pgwarden_query_duration_seconds_bucket", le="0.01") == 10
    assert value(fams, "pgwarden_query_duration_seconds_bucket", le="0.05") == 50
    assert value(fams, "pgwarden_query_duration_seconds_bucket", le="+Inf") == 100
    assert value(fams, "pgwarden_query_duration_seconds_count") == 100
    assert value(fams, "pgwarden_query_duration_seconds_sum") == pytest.approx(5.05)
    assert fams["pgwarden_acquire_wait_seconds"].type == "histogram"
    # 100 acquire waits of 20 µs: resolved below the 100 µs bucket
    assert value(fams, "pgwarden_acquire_wait_seconds_bucket", le="1e-05") == 0
    assert value(fams, "pgwarden_acquire_wait_seconds_bucket", le="2.5e-05") == 100
    assert value(fams, "pgwarden_acquire_timeouts_total", **pool) == 2
    # 100 connections held for 2 ms each (OTel db.client.connection.use_time)
    assert fams["pgwarden_connection_use_seconds"].type == "histogram"
    assert value(fams, "pgwarden_connection_use_seconds_bucket", le="0.001") == 0
    assert value(fams, "pgwarden_connection_use_seconds_bucket", le="0.0025") == 100
    assert value(fams, "pgwarden_connection_use_seconds_sum") == pytest.approx(0.2)
    assert "db.client.connection.timeouts" in fams["pgwarden_acquire_timeouts"].documentation
    assert "db.client.connection.use_time" in fams["pgwarden_connection_use_seconds"].documentation
    # every label value is from a fixed vocabulary (or the pool name)
    for fam in fams.values():
        for s in fam.samples:
            for key, val in s.labels.items():
                assert key in {
                    "pool",
                    "kind",
                    "reason",
                    "attempt",
                    "state",
                    "result",
                    "from",
                    "to",
                    "outcome",
                    "le",
                    "pgbouncer",
                    "version",
                }, key
                assert len(val) <= 64
                assert "SELECT" not in val


def test_describe_matches_collect_and_unreadable_source_is_down() -> None:
    collector = PgwardenCollector(busy_handle())
    described = {m.name for m in collector.describe()}
    collected = {m.name for m in collector.collect()}
    assert described == collected

    def broken() -> dict[str, Any]:
        raise OSError("stats endpoint down")

    registry = CollectorRegistry()
    registry.register(PgwardenCollector(broken, name="remote"))
    fams = scrape(registry)
    assert value(fams, "pgwarden_up", pool="remote") == 0
    assert not fams["pgwarden_queries"].samples


def test_plain_stats_dict_gives_count_and_sum_only() -> None:
    stats = busy_handle().stats()  # no "buckets" key: a plain db.stats()
    registry = CollectorRegistry()
    registry.register(PgwardenCollector(lambda: stats, name="plain"))
    fams = scrape(registry)
    buckets = [
        s for s in fams["pgwarden_query_duration_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert [s.labels["le"] for s in buckets] == ["+Inf"]
    assert value(fams, "pgwarden_query_duration_seconds_count", pool="plain") == 100


def test_register_shares_one_collector_per_registry() -> None:
    registry = CollectorRegistry()
    a, b = busy_handle(), FakeHandle(app="billing")
    first = register(a, registry)
    assert register(b, registry) is first
    assert register(a, registry) is first  # same handle again: no-op
    assert first.pools == ["orders-api", "billing"]
    with pytest.raises(ValueError, match="already collected"):
        register(FakeHandle(app="billing"), registry)
    assert register(FakeHandle(app="billing"), registry, name="billing-2") is first
    fams = scrape(registry)
    assert value(fams, "pgwarden_up", pool="billing") == 1
    assert value(fams, "pgwarden_up", pool="billing-2") == 1
    assert first.remove(b)
    assert not first.remove(b)
    unregister(registry)
    assert "pgwarden_up" not in scrape(registry)


def test_metrics_apps_serve_the_registry() -> None:
    registry = CollectorRegistry()
    register(busy_handle(), registry)
    body, ctype = metrics_handler(registry)("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")

    status: list[str] = []
    out = wsgi_app(registry)(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"},
        lambda s, headers: status.append(s),
    )
    assert status == ["200 OK"]
    assert b"pgwarden_queries_total" in out[0]
    wsgi_app(registry)({"REQUEST_METHOD": "POST"}, lambda s, headers: status.append(s))
    assert status[-1].startswith("405")

    sent = run_asgi(asgi_app(registry), "/metrics")
    assert sent[0]["status"] == 200
    assert b"pgwarden_up" in sent[1]["body"]
    assert run_asgi(asgi_app(registry), "/metrics", method="DELETE")[0]["status"] == 405
    assert run_lifespan(asgi_app(registry)) == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


def run_asgi(
    app: Any, path: str, method: str = "GET", query: bytes = b"", root_path: str = ""
) -> list[MutableMapping[str, Any]]:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "query_string": query,
        "headers": [(b"accept", b"*/*")],
    }
    asyncio.run(app(scope, receive, send))
    return sent


def run_lifespan(app: Any) -> list[str]:
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> MutableMapping[str, Any]:
        await asyncio.sleep(0)
        return next(messages)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    asyncio.run(app({"type": "lifespan"}, receive, send))
    return sent


# --- OpenTelemetry ----------------------------------------------------------------------------


def test_otel_instruments_follow_semantic_conventions() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from pgwarden.exporters.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    h = busy_handle()
    inst = instrument(h, meter_provider=provider)
    h.tracker.query(0.25)  # recorded by the OTel histogram from now on
    h.tracker.acquire(0.002)
    h.tracker.connection_used(0.04)
    h.tracker.acquire_timeout()
    points = otel_points(reader)
    pool = {"db.client.connection.pool.name": "orders-api"}
    assert points["db.client.connection.count", "idle"] == 1
    assert points["db.client.connection.count", "used"] == 3
    assert points["db.client.connection.max", None] == 10
    assert points["db.client.connection.pending_requests", None] == 2
    assert points["pgwarden.operations", None] == 101
    assert points["pgwarden.errors", "other"] == 1
    assert points["pgwarden.retry.attempts", "5+"] == 1
    assert points["db.client.operation.duration", None] == (1, 0.25)  # (count, sum)
    assert points["db.client.connection.wait_time", None] == (1, 0.002)
    assert points["db.client.connection.use_time", None] == (1, 0.04)
    assert points["db.client.connection.timeouts", None] == 3
    assert all(attrs.items() >= pool.items() for attrs in ATTRS)
    assert h.stats()["counters"]["queries"] == 101  # stats() unchanged by the tee
    inst.uninstrument()
    assert not inst.active
    assert h.tracker.__class__ is StatsTracker
    assert inst.spans is None
    observables_only = instrument(FakeHandle(app="lean"), meter_provider=provider, histograms=False)
    assert observables_only.tracker is None
    assert observables_only.handle.tracker.__class__ is StatsTracker
    provider.shutdown()


ATTRS: list[dict[str, Any]] = []


def otel_points(reader: Any) -> dict[tuple[str, Any], Any]:
    """``{(metric, distinguishing attribute or None): value or (count, sum)}``."""
    data = reader.get_metrics_data()
    out: dict[tuple[str, Any], Any] = {}
    ATTRS.clear()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for dp in metric.data.data_points:
                    attrs = dict(dp.attributes or {})
                    ATTRS.append(attrs)
                    extra = [
                        v
                        for k, v in attrs.items()
                        if k not in ("db.client.connection.pool.name", "db.system.name")
                    ]
                    key = (metric.name, extra[0] if extra else None)
                    if hasattr(dp, "bucket_counts"):
                        out[key] = (dp.count, pytest.approx(dp.sum))
                    else:
                        out[key] = dp.value
    return out


def test_query_attributes_sanitise_statements() -> None:
    from psycopg import sql

    from pgwarden.exporters.otel import query_attributes

    attrs = query_attributes("select * from users where email = 'bob@example.com' and id = 42")
    assert attrs == {
        "db.query.text": "select * from users where email = ? and id = ?",
        "db.operation.name": "SELECT",
    }
    composed = sql.SQL("UPDATE t SET a = {} WHERE b = %s").format(sql.Literal("hunter2"))
    attrs = query_attributes(composed)
    assert "hunter2" not in attrs["db.query.text"]
    assert attrs["db.operation.name"] == "UPDATE"
    assert "db.operation.name" not in query_attributes("  frobnicate")


# --- OpenTelemetry spans ----------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[Any]:
    """``(tracer_provider, exporter)``: an SDK provider recording into memory."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


def span_dump(finished: Any) -> str:
    return json.dumps([s.to_json() for s in finished])


def test_instrument_spans_come_from_the_statement_observer(spans: Any) -> None:
    import psycopg.errors
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.trace import SpanKind, StatusCode

    from pgwarden.exporters.otel import OTelStatementObserver, instrument

    tracer_provider, exporter = spans
    meters = MeterProvider()
    h = FakeHandle()
    inst = instrument(h, meters, tracer_provider, spans=True)
    assert isinstance(inst.spans, OTelStatementObserver)
    h.run("fetch", "SELECT n, 'literal-secret' FROM t WHERE id > 42", rowcount=3)
    h.run("fetchval", "SELECT 1 / (0 * %s::int)", error=psycopg.errors.DivisionByZero())
    h.run("execute", "UPDATE t SET seen = true WHERE id = %s", rowcount=5)
    h.run("fetchrow", "insert into t values (%s) returning id", rowcount=1)
    h.run("execute", "SELECT pg_sleep(%s)", error=ConnectionResetError("peer went away"))
    h.run("transaction", None, rowcount=None)
    ok, failed, update, insert, lost, bare = exporter.get_finished_spans()
    assert [s.name for s in (ok, failed, update, insert, lost, bare)] == [
        "SELECT",
        "SELECT",
        "UPDATE",
        "INSERT",
        "SELECT",
        "postgresql",
    ]
    assert {s.kind for s in (ok, failed, update, bare)} == {SpanKind.CLIENT}
    attrs = dict(ok.attributes or {})
    assert attrs == {
        "db.system.name": "postgresql",
        "db.namespace": "orders",
        "server.address": "db.internal",
        "server.port": 5432,
        "db.query.text": "SELECT n, ? FROM t WHERE id > ?",
        "db.operation.name": "SELECT",
        "db.response.returned_rows": 3,
    }
    assert ok.status.status_code is StatusCode.UNSET
    bad = dict(failed.attributes or {})
    assert bad["error.type"] == "22012"
    assert bad["db.response.status_code"] == "22012"
    assert "db.response.returned_rows" not in bad
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "22012"
    assert not failed.events  # no exception event: its message could quote row values
    # execute's row count is rows affected, not returned: not recorded as returned_rows
    assert "db.response.returned_rows" not in dict(update.attributes or {})
    assert dict(insert.attributes or {})["db.response.returned_rows"] == 1
    no_sqlstate = dict(lost.attributes or {})
    assert no_sqlstate["error.type"] == "ConnectionResetError"
    assert "db.response.status_code" not in no_sqlstate
    assert "db.query.text" not in dict(bare.attributes or {})  # no statement text known
    dump = span_dump(exporter.get_finished_spans())
    for secret in (SECRET, "literal-secret", "peer went away"):
        assert secret not in dump
    inst.uninstrument()
    inst.uninstrument()  # twice is harmless
    assert h.observer is NOOP_STATEMENT_OBSERVER
    h.run("fetch", "SELECT 2", rowcount=1)
    assert len(exporter.get_finished_spans()) == 6
    meters.shutdown()


def test_one_span_per_attempt_under_the_callers_span(spans: Any) -> None:
    import psycopg.errors

    from pgwarden.exporters.otel import OTelStatementObserver

    tracer_provider, exporter = spans
    h = FakeHandle()
    remove = h.add_statement_observer(OTelStatementObserver(h, tracer_provider))
    tracer = tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("handle request") as parent:
        # a retried read: the first attempt lost its connection, the second succeeded
        h.run("fetch", "SELECT * FROM po", error=psycopg.errors.AdminShutdown())
        h.run("fetch", "SELECT * FROM po", rowcount=2)
    first, second, request = exporter.get_finished_spans()
    assert request.name == "handle request"
    assert dict(first.attributes or {})["error.type"] == "57P01"
    assert dict(second.attributes or {})["db.response.returned_rows"] == 2
    for span in (first, second):
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.context.trace_id == parent.get_span_context().trace_id
    observer = OTelStatementObserver(h, tracer_provider)
    token = observer.statement_started("fetch", "SELECT 1")
    observer.statement_finished(token, None, 1)
    observer.statement_finished(token, None, 1)  # a second finish does not end it twice
    observer.statement_finished("not a token", None, None)
    assert len(exporter.get_finished_spans()) == 4
    remove()


def test_a_broken_tracer_never_fails_the_statement(spans: Any) -> None:
    from pgwarden.exporters.otel import OTelStatementObserver

    tracer_provider, exporter = spans

    class Broken(OTelStatementObserver):
        def statement_started(self, operation: str, query: object) -> object:
            raise RuntimeError("SDK bug")

    h = FakeHandle()
    h.add_statement_observer(Broken(h, tracer_provider))
    good = Seen()
    h.add_statement_observer(good)
    h.run("fetch", "SELECT 1", rowcount=1)  # does not raise
    assert len(good.finished) == 1
    assert exporter.get_finished_spans() == ()


def test_instrument_spans_need_add_statement_observer() -> None:
    from pgwarden.exporters.otel import instrument, traced

    class StatsOnly:
        settings = SimpleNamespace(url=URL, application_name="stats-only")

        def stats(self) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match="add_statement_observer"):
        instrument(StatsOnly(), spans=True)
    with pytest.raises(TypeError, match="add_statement_observer"):
        traced(StatsOnly())


class AsyncFake(FakeHandle):
    """A fake handle with async query methods that report their statement as the handle does."""

    async def fetch(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        self.run("fetch", query, rowcount=2)
        return [{"n": 1}, {"n": 2}]

    async def execute(self, query: str, params: Any = None) -> int:
        await asyncio.sleep(0)
        self.run("execute", query, rowcount=1)
        return 1

    async def run_transaction(self, fn: Callable[[AsyncFake], Any]) -> Any:
        return await fn(self)

    def transaction(self) -> Any:
        handle = self

        class Tx:
            async def __aenter__(self) -> AsyncFake:
                return handle

            async def __aexit__(self, *exc: object) -> None:
                handle.run("transaction", "COMMIT")

        return Tx()


def test_traced_wrapper_traces_only_calls_through_it(spans: Any) -> None:
    from pgwarden.exporters.otel import traced

    tracer_provider, exporter = spans
    h = AsyncFake()

    async def body(tx: AsyncFake) -> int:
        return await tx.execute("UPDATE a SET x = 1")

    async def main() -> None:
        tdb = traced(h, tracer_provider)
        assert await tdb.fetch("SELECT 1") == [{"n": 1}, {"n": 2}]
        await h.fetch("SELECT 2")  # the handle itself is untouched
        assert await tdb.run_transaction(body) == 1
        async with tdb.transaction() as tx:
            await tx.execute("INSERT INTO b VALUES (1)")
        await h.execute("DELETE FROM c")  # after the block: not traced
        # concurrent callers: only the wrapper's statements get spans
        await asyncio.gather(
            *(tdb.fetch(f"SELECT {i}") for i in range(3)),
            *(h.fetch("SELECT 'raw'") for _ in range(3)),
        )
        assert tdb.stats() == h.stats()  # everything else is the handle's
        assert repr(tdb).startswith("<traced ")
        again = traced(h, tracer_provider)
        await again.execute("TRUNCATE d")

    asyncio.run(main())
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == [
        "SELECT",
        "UPDATE",
        "INSERT",
        "COMMIT",
        "SELECT",
        "SELECT",
        "SELECT",
        "TRUNCATE",
    ]
    texts = [dict(s.attributes or {})["db.query.text"] for s in exporter.get_finished_spans()]
    assert "SELECT ?" in texts  # the concurrent wrapper calls; never the raw ones
    assert all("raw" not in t and "SELECT 2" not in t for t in texts)
    # one observer on the handle however many wrappers
    tee = h.observer
    assert len(getattr(tee, "observers", ())) == 1


def test_traced_wrapper_of_a_sync_handle(spans: Any) -> None:
    from pgwarden.exporters.otel import traced

    tracer_provider, exporter = spans

    class SyncFake(FakeHandle):
        def fetchval(self, query: str, params: Any = None) -> int:
            self.run("fetchval", query, rowcount=1)
            return 1

        def __enter__(self) -> SyncFake:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    h = SyncFake()
    with traced(h, tracer_provider) as tdb:
        assert tdb.fetchval("SELECT 1") == 1
        h.fetchval("SELECT 2")
    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["db.response.returned_rows"] == 1


# --- structured logs --------------------------------------------------------------------------


def make_record(msg: str, *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("pgwarden")
    exc_info = None
    if exc:
        try:
            raise ConnectionError(f"could not connect to {URL}")
        except ConnectionError:
            exc_info = sys.exc_info()
    return logger.makeRecord(
        "pgwarden", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )


def test_json_formatter_writes_one_redacted_object_per_line() -> None:
    record = make_record(
        "retrying query after %s: connect to %s failed",
        "stale",
        URL,
        exc=True,
        event="retry",
        reason="stale",
        attempt=2,
        params=["card-4242"],
        password="hunter2",
        dsn=f"host=db password={SECRET} dbname=x",
        nested={"url": URL, "parameters": [1]},
        when=math.inf,
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert list(data)[:5] == ["ts", "level", "logger", "message", "event"]
    assert data["ts"].endswith("Z")
    assert data["level"] == "WARNING"
    assert data["logger"] == "pgwarden"
    assert data["event"] == "retry"
    assert data["reason"] == "stale"
    assert data["attempt"] == 2
    assert "params" not in data
    assert "parameters" not in data["nested"]
    assert data["password"] == "***"
    assert data["when"] is None
    assert data["exception"]["type"] == "ConnectionError"
    for secret in (SECRET, "hunter2", "card-4242"):
        assert secret not in line
    assert "postgresql://app:***@db.internal:5432/orders" in data["message"]
    plain = json.loads(JsonFormatter(secrets=["orders"]).format(make_record("db orders")))
    assert plain["event"] is None
    assert plain["message"] == "db ***"


def test_configure_json_logging_replaces_its_own_handler() -> None:
    stream = io.StringIO()
    name = "pgwarden.test-json"
    logger = logging.getLogger(name)
    try:
        configure_json_logging(stream=stream, logger=name)
        configure_json_logging("DEBUG", stream=stream, logger=name)
        assert len(logger.handlers) == 1
        assert logger.level == logging.DEBUG
        logger.info("hello %s", URL, extra={"event": "warmup", "ok": True})
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["ok"] is True
        assert SECRET not in line
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def test_event_buffer_is_a_ring_with_sequence_numbers() -> None:
    buffer = EventBuffer(3, secrets=[SECRET])
    for i in range(5):
        buffer.handle(make_record("event %d " + SECRET, i, event="retry", attempt=i))
    buffer.handle(make_record("not an event"))
    events = buffer.events()
    assert [e["attempt"] for e in events] == [2, 3, 4]
    assert [e["seq"] for e in events] == [3, 4, 5]
    assert [e["seq"] for e in buffer.events(since=4)] == [5]
    assert buffer.events(limit=1)[0]["seq"] == 5
    assert SECRET not in json.dumps(events)
    logger = logging.getLogger("pgwarden")
    assert logger.level == logging.NOTSET
    buffer.install()
    try:
        assert logger.level == logging.INFO
        assert buffer in logger.handlers
    finally:
        buffer.uninstall()
    assert logger.level == logging.NOTSET
    assert buffer not in logger.handlers
    assert record_to_dict(make_record("x", level="clash"))["extra_level"] == "clash"


# --- dashboard --------------------------------------------------------------------------------


@pytest.fixture
def dashboard() -> Iterator[Any]:
    from pgwarden.dashboard import app

    dash = app(busy_handle())
    try:
        yield dash
    finally:
        dash.close()


def test_dashboard_page_is_self_contained(dashboard: Any) -> None:
    start, body = run_asgi(dashboard, "/")
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/html")
    assert b"default-src 'none'" in headers[b"content-security-policy"]
    page = body["body"].decode()
    assert "<script>" in page
    assert "<svg" in page
    for external in ("http://", "https://", "//cdn", "src=", "@import", "url("):
        assert external not in page, external
    assert run_asgi(dashboard, "/nope")[0]["status"] == 404
    assert run_asgi(dashboard, "/", method="POST")[0]["status"] == 405
    redirect = run_asgi(dashboard, "/pgw", root_path="/pgw")[0]
    assert redirect["status"] == 308
    assert dict(redirect["headers"])[b"location"] == b"/pgw/"
    assert run_asgi(dashboard, "/pgw/stats.json", root_path="/pgw")[0]["status"] == 200


def test_dashboard_stats_json_is_redacted_with_history_and_events(dashboard: Any) -> None:
    logging.getLogger("pgwarden").warning(
        "slow query (%.3fs): %s to %s",
        1.5,
        "SELECT ?",
        URL,
        extra={"event": "slow_query", "seconds": 1.5, "statement": "SELECT ?"},
    )
    _, body = run_asgi(dashboard, "/stats.json", query=b"history=1")
    payload = json.loads(body["body"])
    assert SECRET not in body["body"].decode()
    assert payload["source"] == "handle"
    assert payload["name"] == "orders-api"
    assert payload["error"] is None
    assert payload["stats"]["counters"]["queries"] == 100
    assert "query_duration_seconds" in payload["stats"]["buckets"]
    assert len(payload["history"]) == 1
    (event,) = [e for e in payload["events"] if e["event"] == "slow_query"]
    assert event["statement"] == "SELECT ?"
    assert event["level"] == "WARNING"
    _, body = run_asgi(dashboard, "/events.json", query=b"since=0")
    assert [e["event"] for e in json.loads(body["body"])] == ["slow_query"]


def test_dashboard_sources_and_errors() -> None:
    from pgwarden.dashboard import app

    async def async_source() -> dict[str, Any]:
        return {"state": "ready", "note": URL}

    for source in (async_source, lambda: {"state": "ready", "note": URL}, {"state": "ready"}):
        dash = app(source, capture_events=False)
        payload = json.loads(run_asgi(dash, "/stats.json")[1]["body"])
        assert payload["stats"]["state"] == "ready"
        assert SECRET not in json.dumps(payload)

    def broken() -> dict[str, Any]:
        raise RuntimeError(f"cannot reach {URL}")

    payload = json.loads(run_asgi(app(broken, capture_events=False), "/stats.json")[1]["body"])
    assert payload["stats"] is None
    assert "RuntimeError" in payload["error"]
    assert SECRET not in payload["error"]
    with pytest.raises(ValueError, match="http"):
        app(f"ftp://u:{SECRET}@x/stats.json")
    with pytest.raises(TypeError):
        app(42)


def test_http_server_serves_an_url_source_chain() -> None:
    """A dashboard whose source is another dashboard's stats.json, both over the stdlib
    server: the remote stats and events come through, redacted."""
    from pgwarden.dashboard import app
    from pgwarden.dashboard._server import HTTPServer

    async def main() -> None:
        upstream = app(busy_handle())
        async with HTTPServer(upstream, port=0) as first:
            logging.getLogger("pgwarden").warning("breaker", extra={"event": "breaker"})
            remote = app(first.url + "stats.json", capture_events=False)
            async with HTTPServer(remote, port=0) as second:
                loop = asyncio.get_running_loop()
                raw = await loop.run_in_executor(None, fetch, second.url + "stats.json")
                page = await loop.run_in_executor(None, fetch, second.url)
                bad = await loop.run_in_executor(None, raw_request, second.port, b"BREW /\r\n\r\n")
            payload = json.loads(raw)
            assert payload["source"] == "url"
            assert payload["stats"]["counters"]["queries"] == 100
            assert [e["event"] for e in payload["events"]] == ["breaker"]
            assert b"<svg" in page.encode()
            assert bad.startswith(b"HTTP/1.1 400")
        upstream.close()
        # the upstream is gone: the page reports it instead of failing
        payload = await remote.payload()
        assert payload["stats"] is None
        assert "cannot read" in payload["error"]

    asyncio.run(main())


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        body: bytes = response.read()
    return body.decode()


def raw_request(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


# --- import cost ------------------------------------------------------------------------------


def test_import_pgwarden_loads_no_exporter_library() -> None:
    code = (
        "import sys, pgwarden, pgwarden.logs, pgwarden.exporters, pgwarden.dashboard\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('prometheus_client', 'opentelemetry', 'psycopg', 'psycopg_pool'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout
