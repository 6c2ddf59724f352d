"""Observability against real servers: every metric moves when its event is provoked, the
``/metrics`` output parses, events carry no parameters, and no secret shows up anywhere.

Fixtures (``pg_server``, ``pg_server_factory``) come from ``pgwarden.testing.plugin``; each
server's URL carries a random password, which every check below looks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgwarden import AsyncDatabase, Database, NotReady, Settings
from pgwarden.core.stats import ServedStats, problems
from pgwarden.exporters import snapshot
from pgwarden.exporters.prometheus import asgi_app, generate, register
from pgwarden.logs import JsonFormatter

PARAM = "card-4111-1111-1111-1111"  # a statement parameter that must never be logged


class Captured(logging.Handler):
    """Every record on the ``pgwarden`` logger, formatted as JSON and as plain text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(self.json.format(r)) for r in self.records if _event(r) == name]

    def text(self) -> str:
        plain = logging.Formatter("%(levelname)s %(name)s %(message)s")
        return "\n".join(plain.format(r) + "\n" + self.json.format(r) for r in self.records)


def _event(record: logging.LogRecord) -> str | None:
    value = getattr(record, "event", None)
    return value if isinstance(value, str) else None


@contextlib.contextmanager
def captured_logs() -> Iterator[Captured]:
    logger = logging.getLogger("pgwarden")
    handler = Captured()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def scrape(registry: CollectorRegistry, *secrets: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    """``{(sample name, sorted label items without pool): value}``; asserts no secret leaks."""
    body, _ = generate(registry)
    text = body.decode()
    for secret in secrets:
        assert secret not in text
    out: dict[tuple[str, tuple[Any, ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pool"))
            out[s.name, labels] = float(s.value)
    return out


def m(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def test_metrics_move_against_a_real_server(pg_server: Any) -> None:
    """Queries, errors, retries, slow queries, leaks, health checks and pool gauges, through
    the Prometheus collector, with the events they log and no secret anywhere."""
    registry = CollectorRegistry()
    settings = Settings(
        url=pg_server.url,
        application_name="obs-metrics",
        max_size=2,
        slow_query_threshold=0.05,
        leak_threshold=0.2,
    )

    async def main(logs: Captured) -> None:
        async with AsyncDatabase(settings) as db:
            register(db, registry)
            before = scrape(registry, pg_server.password)
            assert m(before, "pgwarden_state", state="new") == 1
            assert m(before, "pgwarden_queries_total") == 0

            for i in range(20):
                assert await db.fetchval("SELECT %s::int", [i]) == i
            with pytest.raises(psycopg.errors.DivisionByZero):
                await db.fetchval("SELECT 1 / 0")
            await db.fetchval("SELECT pg_sleep(0.08), %s::text", [PARAM])
            async with db.connection():
                await asyncio.sleep(0.35)  # held past leak_threshold
            assert (await db.health())["ok"]

            # Two callers sleeping fill the pool of 2; a third waits.
            sleepers = [asyncio.create_task(db.fetchval("SELECT pg_sleep(0.4)")) for _ in range(3)]
            await asyncio.sleep(0.2)
            busy = scrape(registry, pg_server.password)
            await asyncio.gather(*sleepers)

            # Terminated backends: the next statement meets a dead connection and is retried.
            assert pg_server.terminate_backends() >= 1
            assert await db.fetchval("SELECT 2") == 2
            after = scrape(registry, pg_server.password)

            assert m(after, "pgwarden_up") == 1
            assert m(after, "pgwarden_state", state="ready") == 1
            assert m(after, "pgwarden_breaker_state", state="closed") == 1
            assert m(after, "pgwarden_queries_total") >= 25
            assert m(after, "pgwarden_errors_total", kind="permanent") == 1
            assert m(after, "pgwarden_slow_queries_total") >= 1
            assert m(after, "pgwarden_leaked_connections_total") == 1
            assert m(after, "pgwarden_health_checks_total", result="passed") == 1
            assert m(after, "pgwarden_warmups_total", result="ok") == 1
            assert m(after, "pgwarden_connections_opened_total") >= 2
            retried = sum(v for (name, _), v in after.items() if name == "pgwarden_retries_total")
            lost = m(after, "pgwarden_pool_connections_lost_total") + sum(
                v for (name, _), v in after.items() if name == "pgwarden_connections_closed_total"
            )
            assert retried + lost >= 1
            assert m(after, "pgwarden_query_duration_seconds_count") == m(
                after, "pgwarden_queries_total"
            )
            assert m(after, "pgwarden_query_duration_seconds_bucket", le="0.05") < m(
                after, "pgwarden_query_duration_seconds_bucket", le="+Inf"
            )
            assert m(after, "pgwarden_acquire_wait_seconds_count") >= 25
            assert m(busy, "pgwarden_pool_connections", state="used") == 2
            assert m(busy, "pgwarden_pool_pending_requests") >= 1
            assert m(busy, "pgwarden_pool_utilization_ratio") == 1.0
            assert m(busy, "pgwarden_in_flight_operations") == 3
            # the real handle's stats() (listen section included) is the typed contract
            assert problems(db.stats()) == []
            assert problems(snapshot(db), ServedStats) == []
            assert m(after, "pgwarden_listen_connected") == 0  # nobody listens

    with captured_logs() as logs:
        asyncio.run(main(logs))

    (slow, *_) = logs.events("slow_query")
    assert slow["statement"] == "SELECT pg_sleep(?), %s::text"
    assert slow["level"] == "WARNING"
    assert slow["seconds"] >= 0.05
    (leak,) = logs.events("leak")
    assert "test_observability.py" in leak["site"]
    assert [e["ok"] for e in logs.events("warmup")] == [True]
    everything = logs.text()
    assert PARAM not in everything
    assert pg_server.password not in everything


def test_sync_handle_and_asgi_metrics_endpoint(pg_server: Any) -> None:
    registry = CollectorRegistry()
    with Database(Settings(url=pg_server.url, application_name="obs-sync")) as db:
        register(db, registry)
        for _ in range(5):
            db.fetchval("SELECT 1")
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
        asyncio.run(asgi_app(registry)(scope, receive, send))
    assert sent[0]["status"] == 200
    text = sent[1]["body"].decode()
    assert 'pgwarden_queries_total{pool="obs-sync"} 5.0' in text
    assert problems(db.stats()) == []  # the sync handle's too
    assert pg_server.password not in text
    assert list(text_string_to_metric_families(text))


def test_restart_counts_a_reconnect(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    registry = CollectorRegistry()

    async def main() -> None:
        async with AsyncDatabase(Settings(url=server.url, application_name="obs-restart")) as db:
            register(db, registry)
            assert await db.fetchval("SELECT 1") == 1
            before = scrape(registry, server.password)
            server.restart(mode="fast")
            assert await db.fetchval("SELECT 2", timeout=10) == 2
            after = scrape(registry, server.password)
        opened = "pgwarden_connections_opened_total"
        assert m(after, opened) > m(before, opened)
        failures = sum(
            v
            for (name, _), v in after.items()
            if name
            in (
                "pgwarden_retries_total",
                "pgwarden_errors_total",
                "pgwarden_connections_closed_total",
                "pgwarden_pool_connections_lost_total",
            )
        )
        assert failures >= 1  # the dead connection was noticed and replaced

    with captured_logs() as logs:
        asyncio.run(main())
    assert server.password not in logs.text()


def test_overload_is_counted(pg_server_factory: Any) -> None:
    server = pg_server_factory(settings={"max_connections": 5})
    registry = CollectorRegistry()
    held: list[psycopg.Connection[Any]] = []
    try:
        while True:  # take every slot, so the server answers 53300 too many clients
            try:
                held.append(psycopg.connect(server.url, autocommit=True))
            except psycopg.OperationalError:
                break
        assert held

        async def main() -> None:
            settings = Settings(
                url=server.url, application_name="obs-overload", ready_timeout=0.5, max_size=2
            )
            async with AsyncDatabase(settings) as db:
                register(db, registry)
                with pytest.raises(NotReady):
                    await db.ready()
                refused = scrape(registry, server.password)
                assert m(refused, "pgwarden_overload_events_total") >= 1
                assert m(refused, "pgwarden_connect_failures_total", kind="overload") >= 1
                assert m(refused, "pgwarden_warmups_total", result="failed") == 1
                assert m(refused, "pgwarden_state", state="ready") == 0
                for conn in held:
                    conn.close()
                held.clear()
                # NotReady is final for that warmup; a new one starts on the next call.
                assert await db.fetchval("SELECT 1", timeout=10) == 1

        with captured_logs() as logs:
            asyncio.run(main())
        assert server.password not in logs.text()
    finally:
        for conn in held:
            conn.close()


def test_breaker_transitions_are_counted(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    registry = CollectorRegistry()
    settings = Settings(
        url=server.url,
        application_name="obs-breaker",
        breaker_threshold=2,
        breaker_cooldown=0.2,
        connect_timeout=1,
        retry_attempts=1,
    )

    async def main(logs: Captured) -> None:
        async with AsyncDatabase(settings) as db:
            register(db, registry)
            assert await db.fetchval("SELECT 1") == 1
            server.stop(mode="immediate")
            give_up = time.monotonic() + 10
            while time.monotonic() < give_up:
                with contextlib.suppress(Exception):
                    await db.fetchval("SELECT 1", timeout=0.5)
                if db.stats()["breaker"] != "closed":
                    break
            down = scrape(registry, server.password)
            assert m(down, "pgwarden_breaker_transitions_total", **{"from": "closed"}, to="open")
            assert m(down, "pgwarden_breaker_state", state="closed") == 0
            assert m(down, "pgwarden_connect_failures_total", kind="nothing_ran") >= 2
            server.start()
            assert await db.fetchval("SELECT 3", timeout=10) == 3
            up = scrape(registry, server.password)
            assert m(up, "pgwarden_breaker_state", state="closed") == 1
            assert m(up, "pgwarden_breaker_transitions_total", **{"from": "half_open"}, to="closed")

    with captured_logs() as logs:
        asyncio.run(main(logs))
    assert [e["to"] for e in logs.events("breaker")][:1] == ["open"]
    assert server.password not in logs.text()


def test_otel_metrics_and_spans_against_a_real_server(pg_server: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pgwarden.exporters.otel import instrument, traced

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))

    collected: list[Any] = []

    async def main() -> None:
        async with AsyncDatabase(Settings(url=pg_server.url, application_name="obs-otel")) as db:
            inst = instrument(db, meters, tracers, spans=True)
            rows = await db.fetch(
                "SELECT n, 'literal-secret' AS s FROM generate_series(1, %s) n", [3]
            )
            assert len(rows) == 3
            with pytest.raises(psycopg.errors.DivisionByZero):
                await db.fetchval("SELECT 1 / (0 * %s::int)", [7])
            for _ in range(4):
                await db.fetchval("SELECT 1")
            collected.append(reader.get_metrics_data())
            inst.uninstrument()
            await db.fetchval("SELECT 1")  # no span any more
            await traced(db, tracers).execute("SELECT %s::text", [PARAM])  # one span

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["SELECT"] * 7
    ok, failed, *_, wrapped = (dict(s.attributes or {}) for s in spans)
    assert ok["db.system.name"] == "postgresql"
    assert ok["db.namespace"] == "postgres"
    assert ok["server.address"] == "127.0.0.1"
    assert ok["server.port"] == pg_server.port
    assert ok["db.query.text"] == "SELECT n, ? AS s FROM generate_series(?, %s) n"
    assert ok["db.response.returned_rows"] == 3
    assert failed["error.type"] == "22012"
    assert failed["db.response.status_code"] == "22012"
    assert spans[1].status.description == "22012"
    assert wrapped["db.query.text"] == "SELECT %s::text"
    dump = json.dumps([s.to_json() for s in spans])
    for secret in (PARAM, "literal-secret", pg_server.password):
        assert secret not in dump

    names: dict[str, Any] = {}
    for rm in collected[0].resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                names[metric.name] = metric.data.data_points
    duration = names["db.client.operation.duration"]
    assert sum(dp.count for dp in duration) == 5  # successes while instrumented
    assert names["db.client.connection.create_time"] or names["db.client.connection.wait_time"]
    states = {
        dp.attributes["db.client.connection.state"] for dp in names["db.client.connection.count"]
    }
    assert states == {"idle", "used"}
    assert all(
        dp.attributes["db.client.connection.pool.name"] == "obs-otel"
        for dp in names["db.client.connection.max"]
    )
    meters.shutdown()
    tracers.shutdown()


def test_dashboard_page_and_stats_hold_no_secret(pg_server: Any) -> None:
    from pgwarden.dashboard import app
    from pgwarden.dashboard._server import HTTPServer

    async def main() -> None:
        async with AsyncDatabase(
            Settings(url=pg_server.url, application_name="obs-dash", slow_query_threshold=0.01)
        ) as db:
            dash = app(db)
            try:
                await db.fetchval("SELECT pg_sleep(0.02), %s::text", [PARAM])
                async with HTTPServer(dash, port=0) as server:
                    loop = asyncio.get_running_loop()
                    page = await loop.run_in_executor(None, get, server.url)
                    raw = await loop.run_in_executor(None, get, server.url + "stats.json?history=1")
            finally:
                dash.close()
        payload = json.loads(raw)
        assert payload["stats"]["counters"]["queries"] == 1
        assert payload["stats"]["counters"]["slow_queries"] == 1
        assert [e["event"] for e in payload["events"]][-1] == "slow_query"
        assert payload["history"]
        for text in (page, raw):
            assert pg_server.password not in text
            assert PARAM not in text

    asyncio.run(main())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        body: bytes = response.read()
    return body.decode()
