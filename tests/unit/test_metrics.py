"""Pure tests of the metrics trackers."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.core.metrics import (
    OTEL_ATTRIBUTES,
    OTEL_NAMES,
    CloseReason,
    MetricsTracker,
    NoopTracker,
    StatsTracker,
    TeeTracker,
    pool_gauges,
)

TRACKER_METHODS = [
    name for name in dir(MetricsTracker) if not name.startswith("_") and name != "snapshot"
]


def drive(t: MetricsTracker) -> None:
    """Call every tracker method at least once, the way a shell would."""
    t.query(0.002)
    t.query(0.004)
    t.query_error("permanent")
    t.query_error("permanent")
    t.query_error("timeout")
    t.acquire(0.0001)
    t.connection_opened(0.03)
    t.connection_closed(CloseReason.IDLE)
    t.connection_closed("idle")
    t.connection_closed(CloseReason.BROKEN.value)
    t.connect_failed("overload")
    t.warmup(0.25, False)
    t.warmup(0.05, True)
    t.retry("stale", 1)
    t.retry("stale", 2)
    t.retry("nothing_ran", 1)
    t.overload()
    t.breaker_transition("closed", "open")
    t.breaker_transition("open", "half_open")
    t.ambiguous_commit("committed")
    t.health_check(True)
    t.health_check(False)
    t.health_check(True)
    t.slow_query()
    t.leaked_connection()
    t.limit_changed(7)
    t.limit_changed(5)


def roundtrip(value: object) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def test_protocol_is_implemented() -> None:
    assert len(TRACKER_METHODS) == 15
    for tracker in (NoopTracker(), StatsTracker(), TeeTracker(StatsTracker(), NoopTracker())):
        assert isinstance(tracker, MetricsTracker)
        for name in TRACKER_METHODS:
            assert callable(getattr(tracker, name))


def test_noop_does_nothing() -> None:
    t = NoopTracker()
    drive(t)
    assert t.snapshot() == {"enabled": False}
    assert not hasattr(t, "__dict__")


def test_stats_counters_move() -> None:
    t = StatsTracker()
    drive(t)
    snap = t.snapshot()
    c: Any = snap["counters"]
    assert c == {
        "queries": 2,
        "errors": {"permanent": 2, "timeout": 1},
        "retries": {
            "total": 3,
            "by_attempt": {"1": 2, "2": 1},
            "by_reason": {"stale": 2, "nothing_ran": 1},
        },
        "connections_opened": 1,
        "connections_closed": {"idle": 2, "broken": 1},
        "connect_failures": {"overload": 1},
        "warmups": {"ok": 1, "failed": 1},
        "overload_events": 1,
        "breaker_transitions": {"closed->open": 1, "open->half_open": 1},
        "ambiguous_commits": {"committed": 1},
        "health_checks": {"passed": 2, "failed": 1},
        "slow_queries": 1,
        "leaked_connections": 1,
    }
    assert snap["last_warmup_seconds"] == 0.05
    assert snap["pool_limit"] == 5
    h: Any = snap["histograms"]
    assert set(h) == {
        "acquire_wait_seconds",
        "query_duration_seconds",
        "connection_setup_seconds",
        "warmup_duration_seconds",
    }
    assert h["query_duration_seconds"]["count"] == 2
    assert h["query_duration_seconds"]["max"] == 0.004
    assert h["warmup_duration_seconds"]["count"] == 2
    assert h["acquire_wait_seconds"]["count"] == 1
    assert h["connection_setup_seconds"]["sum"] == 0.03


def test_stats_empty_snapshot() -> None:
    snap = StatsTracker().snapshot()
    assert roundtrip(snap) == snap
    assert snap["last_warmup_seconds"] is None
    assert snap["pool_limit"] is None
    c: Any = snap["counters"]
    assert c["queries"] == 0
    assert c["errors"] == {}


def test_snapshot_is_json_and_detached() -> None:
    t = StatsTracker()
    drive(t)
    snap = t.snapshot()
    assert roundtrip(snap) == snap
    c: Any = snap["counters"]
    c["errors"]["permanent"] = 99
    c["retries"]["by_attempt"].clear()
    again: Any = t.snapshot()["counters"]
    assert again["errors"]["permanent"] == 2
    assert again["retries"]["by_attempt"] == {"1": 2, "2": 1}


def test_enum_labels_are_reported_by_value() -> None:
    t = StatsTracker()
    t.connection_closed(CloseReason.FAILOVER)
    t.connection_closed("failover")
    t.breaker_transition(CloseReason.DRAIN, CloseReason.CLOSE)  # any str enum works as a label
    c: Any = t.snapshot()["counters"]
    assert c["connections_closed"] == {"failover": 2}
    assert c["breaker_transitions"] == {"drain->close": 1}
    assert json.dumps(c)


def test_close_reason_values() -> None:
    assert [r.value for r in CloseReason] == [
        "lifetime",
        "idle",
        "broken",
        "drain",
        "failover",
        "close",
    ]
    assert str(CloseReason.IDLE) == "idle"
    assert f"{CloseReason.IDLE}" == "idle"
    assert CloseReason("drain") is CloseReason.DRAIN


def test_histograms_are_exposed_for_exporters() -> None:
    t = StatsTracker()
    t.acquire(0.0007)
    assert t.histograms["acquire_wait_seconds"] is t.acquire_wait
    assert dict(t.acquire_wait.buckets())[0.001] == 1


def test_reset() -> None:
    t = StatsTracker()
    drive(t)
    t.reset()
    assert t.snapshot() == StatsTracker().snapshot()


class Recorder:
    """A user tracker that records every call, to check fan-out."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: object) -> None:
            self.calls.append((name, args))

        return record

    def snapshot(self) -> dict[str, object]:
        return {"calls": len(self.calls)}


class Boom:
    """A broken exporter: every tracker method raises."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object) -> None:
            raise RuntimeError(f"exporter bug in {name}")

        return fail

    def snapshot(self) -> dict[str, object]:
        raise RuntimeError("exporter bug in snapshot")


def test_tee_fans_out_to_every_tracker_in_order() -> None:
    order: list[str] = []

    class Named(Recorder):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def query(self, duration: float) -> None:
            order.append(self.name)

    p, a, b = Recorder(), Recorder(), Recorder()
    t = TeeTracker(p, a, b)
    drive(t)
    assert p.calls == a.calls == b.calls
    assert {name for name, _ in p.calls} == set(TRACKER_METHODS)
    assert ("breaker_transition", ("closed", "open")) in p.calls
    assert ("warmup", (0.05, True)) in a.calls
    TeeTracker(Named("primary"), Named("a"), Named("b"), Named("c")).query(0.1)
    assert order == ["primary", "a", "b", "c"]


def test_tee_snapshot_and_histograms_are_the_primarys() -> None:
    stats, extra = StatsTracker(), StatsTracker()
    t = TeeTracker(stats, extra)
    drive(t)
    assert t.snapshot() == stats.snapshot() == extra.snapshot()
    assert roundtrip(t.snapshot()) == t.snapshot()
    assert t.histograms == stats.histograms
    assert t.histograms["query_duration_seconds"] is stats.query_duration
    assert TeeTracker(NoopTracker(), stats).snapshot() == {"enabled": False}
    assert TeeTracker(NoopTracker(), stats).histograms == {}


def test_tee_swallows_extra_errors_but_not_the_primarys() -> None:
    stats, after = StatsTracker(), Recorder()
    t = TeeTracker(stats, Boom(), after)
    drive(t)  # every method of the extra raises; none escapes
    assert {name for name, _ in after.calls} == set(TRACKER_METHODS)  # later extras still run
    c: Any = t.snapshot()["counters"]
    assert c["queries"] == 2
    with pytest.raises(RuntimeError, match="query"):
        TeeTracker(Boom(), after).query(0.1)

    class Interrupting(NoopTracker):
        def query(self, duration: float) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # only Exception is swallowed
        TeeTracker(NoopTracker(), Interrupting()).query(0.1)


def test_tee_nests_like_repeated_attachment() -> None:
    stats, a, b = StatsTracker(), Recorder(), Recorder()
    once = TeeTracker(stats, a, b)
    twice = TeeTracker(TeeTracker(stats, a), b)  # what add_tracker() twice builds
    for t in (once, twice):
        assert t.primary is stats
        assert t.extras == (a, b)
        assert t.snapshot() == stats.snapshot()
    assert repr(once) == "<TeeTracker StatsTracker, Recorder, Recorder>"
    lonely = TeeTracker(stats)  # no extras: a pass-through
    lonely.query(0.1)
    assert lonely.extras == ()
    c: Any = stats.snapshot()["counters"]
    assert c["queries"] == 1


def test_tee_rejects_what_is_not_a_tracker() -> None:
    with pytest.raises(TypeError, match="MetricsTracker"):
        TeeTracker(StatsTracker(), object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MetricsTracker"):
        TeeTracker(object(), StatsTracker())  # type: ignore[arg-type]


def test_pool_gauges() -> None:
    g = pool_gauges(size=8, idle=3, in_use=5, waiting=2, max_size=10)
    assert g == {
        "size": 8,
        "idle": 3,
        "in_use": 5,
        "waiting": 2,
        "max_size": 10,
        "idle_max": 10,
        "utilization": 0.5,
    }
    assert pool_gauges(0, 0, 0, 0, 0)["utilization"] == 0.0
    assert roundtrip(g) == g


def test_otel_names() -> None:
    gauges = pool_gauges(1, 1, 0, 0, 1)
    histograms = StatsTracker().histograms
    reserved = {"acquire_timeouts", "connection_use_seconds"}
    for key, name in OTEL_NAMES.items():
        assert name.startswith(("db.client.connection.", "db.client.operation."))
        assert key in gauges or key in histograms or key in reserved
    assert OTEL_NAMES["waiting"] == "db.client.connection.pending_requests"
    assert OTEL_NAMES["query_duration_seconds"] == "db.client.operation.duration"
    assert {v for k, v in OTEL_NAMES.items() if k in OTEL_ATTRIBUTES} == {
        "db.client.connection.count"
    }
    assert set(OTEL_NAMES.values()) == {
        "db.client.connection.count",
        "db.client.connection.idle.max",
        "db.client.connection.max",
        "db.client.connection.pending_requests",
        "db.client.connection.timeouts",
        "db.client.connection.create_time",
        "db.client.connection.wait_time",
        "db.client.connection.use_time",
        "db.client.operation.duration",
    }


labels = st.sampled_from(["a", "b", "c", CloseReason.IDLE, CloseReason.BROKEN])


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("query_error"), labels),
            st.tuples(st.just("connection_closed"), labels),
            st.tuples(st.just("retry"), labels, st.integers(1, 5)),
            st.tuples(st.just("query"), st.floats(0, 100)),
        ),
        max_size=60,
    )
)
def test_counters_add_up(events: list[tuple[Any, ...]]) -> None:
    t = StatsTracker()
    for name, *args in events:
        getattr(t, name)(*args)
    snap = t.snapshot()
    assert roundtrip(snap) == snap
    c: Any = snap["counters"]
    names = [e[0] for e in events]
    assert sum(c["errors"].values()) == names.count("query_error")
    assert sum(c["connections_closed"].values()) == names.count("connection_closed")
    assert c["retries"]["total"] == names.count("retry")
    assert sum(c["retries"]["by_attempt"].values()) == names.count("retry")
    assert sum(c["retries"]["by_reason"].values()) == names.count("retry")
    assert c["queries"] == names.count("query")


@pytest.mark.parametrize("module", ["pgwarden.core.metrics", "pgwarden.core.histogram"])
def test_import_is_cheap(module: str) -> None:
    # Beyond the package itself, the module pulls in only light stdlib modules.
    code = (
        "import sys; import pgwarden.core; before = set(sys.modules); "
        f"import {module}; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = set(out.stdout.split())
    assert module in new
    for name in new:
        top = name.partition(".")[0]
        assert name.startswith("pgwarden.core.") or top in sys.stdlib_module_names, name
        assert top not in {"asyncio", "threading", "json", "psycopg", "psycopg_pool"}, name
