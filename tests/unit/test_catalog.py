"""The metric catalog is the one source: the Prometheus collector, the OpenTelemetry
instruments, the dashboard, ``OTEL_NAMES``, docs/observability.md and the typed ``stats()``
contract all agree with it, and every metric leaf of a real ``stats()`` has an entry."""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pgwarden._handle.state import HandleState
from pgwarden.core import catalog
from pgwarden.core.catalog import CATALOG, Kind, Shape, markdown_tables, prometheus_help, samples
from pgwarden.core.listen import ListenBook
from pgwarden.core.metrics import OTEL_ATTRIBUTES, OTEL_NAMES, TRACKER_EVENTS, CloseReason
from pgwarden.core.stats import Stats, problems
from pgwarden.dashboard import _compact, history_paths
from pgwarden.dashboard._page import COUNTER_ROWS, PAGE
from pgwarden.exporters import snapshot
from pgwarden.exporters.otel import OTelTracker, instrument
from pgwarden.exporters.prometheus import PgwardenCollector, generate
from pgwarden.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
URL = "postgresql://app@127.0.0.1:1/orders"
BASE_ATTRIBUTES = {"db.system.name", "db.client.connection.pool.name"}
#: Leaves of stats() that are deliberately not metrics, and why.
NOT_METRICS = {
    ("enabled",): "metrics off: a flag, not a value",
    ("warmup_seconds",): "the same figure as last_warmup_seconds, kept for older readers",
    ("pool_limit",): "the tracker's view of pool.limit, which is exported",
    ("counters", "retries", "total"): "the sum of retries by reason",
    ("listen", "backend_pid"): "an identity, not a measure",
    ("listen", "last_gap_at"): "a timestamp",
    ("listen", "last_error"): "text",
}


class Handle:
    """A handle as the exporters see it: real ``HandleState.stats()`` plus the listen section
    the shell adds, ``histograms()`` and ``add_tracker()``."""

    def __init__(self) -> None:
        self.settings = Settings(url=URL, application_name="orders")
        self.state = HandleState(self.settings)
        self.listen = ListenBook()

    def stats(self) -> dict[str, Any]:
        snap = self.state.stats({"pool_size": 3, "pool_available": 1, "pool_max": 10})
        snap["listen"] = self.listen.stats()
        return snap

    def histograms(self) -> Mapping[str, Any]:
        return self.state.histograms()

    def add_tracker(self, extra: Any) -> Any:
        return self.state.add_tracker(extra)


def exercised(handle: Handle | None = None) -> Handle:
    """A handle whose tracker saw every event at least once."""
    handle = handle or Handle()
    t = handle.state.tracker
    t.query(0.01)
    t.query_error("stale")
    t.query_error("martian")  # outside the vocabulary: counted as other
    t.acquire(0.001)
    t.acquire_timeout()
    t.connection_used(0.02)
    t.connection_opened(0.005)
    t.connection_closed(CloseReason.IDLE)
    t.connect_failed("nothing_ran")
    t.warmup(0.01, True)
    t.warmup(0.02, False)
    t.retry("stale", 1)
    t.retry("stale", 7)
    t.overload()
    t.breaker_transition("closed", "open")
    t.ambiguous_commit("unknown")
    t.health_check(True)
    t.slow_query()
    t.leaked_connection()
    t.limit_changed(8)
    return handle


def leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, Mapping) and value and not (path[:1] == ("histograms",) and path[1:]):
        return [leaf for k, v in value.items() for leaf in leaves(v, (*path, str(k)))]
    return [path]


# --- the catalog itself --------------------------------------------------------------------


def test_entries_are_unique_and_well_formed() -> None:
    keys = [s.key for s in CATALOG]
    assert len(keys) == len(set(keys))
    names = [s.prometheus for s in CATALOG]
    assert len(names) == len(set(names))
    otel = [s.otel.name for s in CATALOG if s.otel is not None]
    assert len(otel) == len(set(otel))
    for spec in CATALOG:
        assert spec.help.endswith("."), spec.key
        assert not spec.help[0].islower(), spec.key
        assert spec.prometheus.startswith("pgwarden_"), spec.key
        assert spec.prometheus.endswith("_total") == (spec.kind is Kind.COUNTER), spec.key
        assert spec.prometheus.endswith("_seconds") == (spec.unit == "s"), spec.key
        if spec.shape is Shape.HISTOGRAM:
            assert spec.event in TRACKER_EVENTS, spec.key
        if spec.shape in (Shape.KEYS, Shape.ONE_HOT, Shape.FIELDS):
            assert len(spec.labels) == 1, spec.key
            assert spec.labels[0].values, spec.key
        if spec.shape is Shape.FIELDS:
            assert [v for v, _ in spec.fields] == list(spec.labels[0].values)
    assert tuple(r.value for r in CloseReason) == catalog.CLOSE_REASONS


def test_every_path_is_in_the_typed_contract() -> None:
    def resolve(shape: Any, path: tuple[str, ...]) -> Any:
        for key in path:
            origin = typing.get_origin(shape)
            if origin is dict:
                shape = typing.get_args(shape)[1]
                continue
            hints = typing.get_type_hints(shape)
            assert key in hints, f"{'.'.join(path)}: {key!r} is not in {shape.__name__}"
            shape = hints[key]
        return shape

    for spec in CATALOG:
        for path in (spec.path, spec.fallback or ()):
            if not path:
                continue
            if spec.shape is Shape.FIELDS:
                for _, field in spec.fields:
                    resolve(Stats, (*path, field))
            else:
                resolve(Stats, path)


def test_a_real_stats_conforms_and_every_metric_leaf_has_an_entry() -> None:
    stats = exercised().stats()
    assert problems(stats) == []
    off = Handle()
    off.state = HandleState(Settings(url=URL, metrics=False))
    assert problems(off.stats()) == []
    covered: set[tuple[str, ...]] = set()
    for spec in CATALOG:
        if spec.shape is Shape.FIELDS:
            covered.update((*spec.path, field) for _, field in spec.fields)
        elif spec.path:
            covered.add(spec.path)
    missing = [
        ".".join(leaf)
        for leaf in leaves(stats)
        if not any(leaf[: len(c)] == c for c in covered) and leaf not in NOT_METRICS
    ]
    assert missing == [], f"stats() leaves with no catalog entry: {missing}"


def test_problems_finds_what_disagrees() -> None:
    stats: dict[str, Any] = exercised().stats()
    stats["pool"]["surprise"] = 1
    stats["counters"]["queries"] = "many"
    del stats["state"]
    found = problems(stats)
    assert "stats.pool.surprise: not part of PoolGauges" in found
    assert "stats.counters.queries: str is not int" in found
    assert "stats.state: missing" in found


# --- Prometheus ----------------------------------------------------------------------------


def scrape(source: Any) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(PgwardenCollector(source, name="orders"))
    body, _ = generate(registry)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_prometheus_families_are_the_catalog() -> None:
    handle = exercised()
    families = scrape(lambda: snapshot(handle))
    expected = {spec.prometheus.removesuffix("_total"): spec for spec in CATALOG}
    assert set(families) == set(expected)
    for name, spec in expected.items():
        family = families[name]
        # the text format 0.0.4 has no info type: an info family is exposed as a gauge
        assert family.type == ("gauge" if spec.kind is Kind.INFO else str(spec.kind)), name
        assert family.documentation == prometheus_help(spec), name
        labels = {"pool", *(label.name for label in spec.labels if label.name)}
        for sample in family.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == labels | extra, (name, sample)


def test_prometheus_values_are_the_catalog_samples() -> None:
    handle = exercised()
    stats = snapshot(handle)
    families = scrape(lambda: stats)
    for spec in CATALOG:
        if spec.shape in (Shape.HISTOGRAM, Shape.INFO):
            continue
        family = families[spec.prometheus.removesuffix("_total")]
        names = [label.name for label in spec.labels]
        got = {
            tuple(s.labels[n] for n in names if n): s.value
            for s in family.samples
            if not s.name.endswith("_created")
        }
        assert got == dict(samples(spec, stats)), spec.key
    assert families["pgwarden_errors"].samples  # the labelled counters carry other too
    errors = {s.labels["kind"]: s.value for s in families["pgwarden_errors"].samples}
    assert errors["other"] == 1
    assert errors["stale"] == 1
    attempts = {s.labels["attempt"]: s.value for s in families["pgwarden_retry_attempts"].samples}
    assert attempts["1"] == 1
    assert attempts["5+"] == 1
    query = families["pgwarden_query_duration_seconds"]
    assert {s.name for s in query.samples} >= {
        "pgwarden_query_duration_seconds_bucket",
        "pgwarden_query_duration_seconds_count",
    }


# --- OpenTelemetry -------------------------------------------------------------------------


def test_otel_instruments_are_the_catalog_and_agree_with_prometheus() -> None:
    handle = exercised()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    inst = instrument(handle, provider, name="orders")
    try:
        tracker = inst.tracker
        assert isinstance(tracker, OTelTracker)
        for spec in CATALOG:  # every histogram's event, through the handle's tee
            if spec.event == "warmup":
                handle.state.tracker.warmup(0.01, True)
            elif spec.event == "acquire_timeout":
                pytest.fail("not a histogram event")
            elif spec.event is not None:
                getattr(handle.state.tracker, spec.event)(0.01)
        data = reader.get_metrics_data()
    finally:
        inst.uninstrument()
        provider.shutdown()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    expected = {spec.otel.name: spec for spec in CATALOG if spec.otel is not None}
    assert set(metrics) == set(expected)
    stats = handle.stats()
    for name, spec in expected.items():
        metric = metrics[name]
        assert metric.unit == spec.unit, name
        assert metric.description == spec.help, name
        attributes = [label.otel for label in spec.labels]
        points: list[Any] = list(metric.data.data_points)
        for point in points:
            assert set(point.attributes) == BASE_ATTRIBUTES | {a for a in attributes if a}, name
        if spec.shape is Shape.HISTOGRAM:
            assert sum(p.count for p in points) >= 1, name
            continue
        got = {tuple(str(p.attributes[a]) for a in attributes if a): p.value for p in points}
        assert got == dict(samples(spec, stats)), name


def test_otel_names_are_derived_from_the_catalog() -> None:
    assert catalog.otel_names() == OTEL_NAMES
    assert catalog.otel_attributes() == OTEL_ATTRIBUTES
    # the names of earlier releases, unchanged
    assert OTEL_NAMES["acquire_timeouts"] == "db.client.connection.timeouts"
    assert OTEL_NAMES["in_use"] == OTEL_NAMES["idle"] == "db.client.connection.count"
    assert OTEL_ATTRIBUTES["in_use"] == {"db.client.connection.state": "used"}


# --- the dashboard -------------------------------------------------------------------------


def test_dashboard_counter_rows_and_history_come_from_the_catalog() -> None:
    titled = [spec for spec in CATALOG if spec.dashboard]
    assert [row["title"] for row in COUNTER_ROWS] == [spec.dashboard for spec in titled]
    assert [row["path"] for row in COUNTER_ROWS] == [list(spec.path) for spec in titled]
    assert "const COUNTER_ROWS = [" in PAGE
    assert "__COUNTER_ROWS__" not in PAGE
    stats = snapshot(exercised())
    compact = _compact(stats)
    for path in history_paths():
        assert catalog.read(compact, path) == catalog.read(stats, path), path
    assert catalog.read(compact, ("pool", "size")) is None  # nothing the charts do not plot


def test_every_stats_field_the_page_reads_is_in_the_catalog() -> None:
    paths: set[tuple[str, ...]] = set()
    for spec in CATALOG:
        if spec.shape is Shape.FIELDS:
            paths.update((*spec.path, field) for _, field in spec.fields)
        elif spec.path:
            paths.update(spec.path[:i] for i in range(1, len(spec.path) + 1))
    script = PAGE[PAGE.index("<script>") :]
    read_fields: set[tuple[str, ...]] = {
        ("pool", f) for f in re.findall(r"\bpool\.([a-z_]+)", script)
    }
    read_fields |= {("counters", f) for f in re.findall(r"\bc\.([a-z_]+)", script)}
    read_fields |= {
        ("counters", "retries", f) for f in re.findall(r"\.retries \|\| \{\}\)\.([a-z_]+)", script)
    }
    read_fields |= {("histograms", k) for k in re.findall(r'"([a-z_]+_seconds)"', script)}
    assert read_fields, "the page reads no stats fields?"
    unknown = sorted(".".join(f) for f in read_fields - paths)
    assert unknown == [], f"the dashboard reads fields the catalog does not have: {unknown}"


# --- docs ----------------------------------------------------------------------------------


def test_observability_doc_tables_are_generated_from_the_catalog() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    for name, table in markdown_tables().items():
        match = re.search(
            rf"<!-- catalog:{name}:begin -->\n(.*?)<!-- catalog:{name}:end -->", doc, re.S
        )
        assert match, f"docs/observability.md lost its catalog:{name} markers"
        assert match.group(1) == table, (
            f"docs/observability.md's {name} table is out of date: "
            "run .venv/bin/python scripts/metrics_doc.py"
        )
    for spec in CATALOG:
        assert f"`{spec.prometheus}`" in doc, spec.key
