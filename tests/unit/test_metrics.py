"""Pure tests of the metrics trackers and the statement observers."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.core.metrics import (
    OTEL_ATTRIBUTES,
    OTEL_NAMES,
    TRACKER_EVENTS,
    CloseReason,
    MetricsTracker,
    NoopTracker,
    StatsTracker,
    TeeTracker,
    pool_gauges,
)
from pgwarden.core.tracing import (
    NOOP_STATEMENT_OBSERVER,
    OPERATIONS,
    NoopStatementObserver,
    StatementObserver,
    TeeStatementObserver,
    with_observer,
    without_observer,
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
    t.acquire_timeout()
    t.acquire_timeout()
    t.connection_used(0.25)
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
    assert len(TRACKER_METHODS) == 17
    assert sorted(TRACKER_EVENTS) == sorted(TRACKER_METHODS)
    assert TRACKER_EVENTS.index("acquire_timeout") < TRACKER_EVENTS.index("connection_used")
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
        "acquire_timeouts": 2,
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
        "connection_use_seconds",
        "query_duration_seconds",
        "connection_setup_seconds",
        "warmup_duration_seconds",
    }
    assert h["query_duration_seconds"]["count"] == 2
    assert h["query_duration_seconds"]["max"] == 0.004
    assert h["warmup_duration_seconds"]["count"] == 2
    assert h["acquire_wait_seconds"]["count"] == 1
    assert h["connection_setup_seconds"]["sum"] == 0.03
    assert h["connection_use_seconds"]["count"] == 1
    assert h["connection_use_seconds"]["max"] == 0.25


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
    assert t.histograms["connection_use_seconds"] is t.connection_use
    assert all(key.endswith("_seconds") for key in t.histograms)
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


def test_tee_methods_are_generated_from_the_protocol() -> None:
    for name in TRACKER_EVENTS:
        method = getattr(TeeTracker, name)
        spec = getattr(MetricsTracker, name)
        assert method.__qualname__ == f"TeeTracker.{name}"
        assert method.__doc__ == spec.__doc__
        assert inspect.signature(method) == inspect.signature(spec)
    stats, extra = StatsTracker(), Recorder()
    t = TeeTracker(stats, extra)
    t.warmup(duration=0.1, ok=True)  # keywords work: the protocol's parameter names
    t.breaker_transition(from_state="closed", to_state="open")
    t.acquire_timeout()
    t.connection_used(seconds=0.5)
    assert extra.calls == [
        ("warmup", (0.1, True)),
        ("breaker_transition", ("closed", "open")),
        ("acquire_timeout", ()),
        ("connection_used", (0.5,)),
    ]
    c: Any = stats.snapshot()["counters"]
    assert c["warmups"]["ok"] == 1
    assert c["acquire_timeouts"] == 1
    assert stats.connection_use.count == 1
    assert not hasattr(t, "__dict__")


def test_tee_methods_are_the_code_a_hand_written_one_would_be() -> None:
    # What keeps the generated fan-out as fast as the 15 hand copies it replaced: the same
    # bytecode, with no getattr or *args per event (timing it here would be flaky).
    class HandWritten:
        __slots__ = ("_extra", "_primary")

        def __init__(self, primary: MetricsTracker, extra: MetricsTracker) -> None:
            self._primary = primary
            self._extra = extra

        def query(self, duration: float) -> None:
            self._primary.query(duration)
            try:  # noqa: SIM105
                self._extra.query(duration)
            except Exception:  # noqa: S110
                pass

        def breaker_transition(self, from_state: str, to_state: str) -> None:
            self._primary.breaker_transition(from_state, to_state)
            try:  # noqa: SIM105
                self._extra.breaker_transition(from_state, to_state)
            except Exception:  # noqa: S110
                pass

    for name in ("query", "breaker_transition"):
        generated = getattr(TeeTracker, name).__code__
        by_hand = getattr(HandWritten, name).__code__
        assert generated.co_code == by_hand.co_code
        assert generated.co_names == by_hand.co_names
        assert generated.co_varnames == by_hand.co_varnames


def test_a_tracker_without_the_new_events_is_rejected_by_name() -> None:
    class Legacy:  # a structural tracker written before acquire_timeout and connection_used
        def __getattr__(self, name: str) -> Any:
            if name in ("acquire_timeout", "connection_used"):
                raise AttributeError(name)
            return lambda *args: None

        def snapshot(self) -> dict[str, object]:
            return {}

    with pytest.raises(TypeError, match=r"missing acquire_timeout, connection_used;.*NoopTracker"):
        TeeTracker(StatsTracker(), Legacy())

    class Subclassed(NoopTracker):  # the forward-compatible way: unknown events are ignored
        def query(self, duration: float) -> None:
            raise AssertionError("not called here")

    class Explicit(MetricsTracker):  # subclassing the protocol works the same way
        def snapshot(self) -> dict[str, object]:
            return {"explicit": True}

    for tracker in (Subclassed(), Explicit()):
        tee = TeeTracker(StatsTracker(), tracker)
        tee.acquire_timeout()
        tee.connection_used(0.1)
    Explicit().connection_used(0.1)  # the protocol's own no-op
    assert TeeTracker(Explicit()).snapshot() == {"explicit": True}


# --- statement observers ----------------------------------------------------------------------


class Observed:
    """A statement observer that records what it sees; its tokens are numbered."""

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


class Failing:
    """A broken observer: both methods raise."""

    def __init__(self, phase: str = "both") -> None:
        self.phase = phase
        self.calls = 0

    def statement_started(self, operation: str, query: object) -> object:
        self.calls += 1
        if self.phase in ("both", "started"):
            raise RuntimeError("observer bug at start")
        return "token"

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        self.calls += 1
        raise RuntimeError("observer bug at finish")


def run_statement(
    observer: StatementObserver,
    operation: str = "fetch",
    query: object = "SELECT 1",
    error: BaseException | None = None,
    rowcount: int | None = 1,
) -> None:
    """What the handle does around one attempt of one statement."""
    token = observer.statement_started(operation, query)
    observer.statement_finished(token, error, rowcount)


def test_noop_observer_is_cheap_and_empty() -> None:
    noop = NoopStatementObserver()
    assert isinstance(noop, StatementObserver)
    assert noop.statement_started("fetch", "SELECT 1") is None
    run_statement(noop)
    assert not hasattr(noop, "__dict__")
    assert isinstance(NOOP_STATEMENT_OBSERVER, NoopStatementObserver)
    assert OPERATIONS == ("fetch", "fetchrow", "fetchval", "execute", "executemany", "transaction")


def test_tee_observer_fans_out_with_each_observers_token() -> None:
    a, b = Observed(), Observed()
    tee = TeeStatementObserver(a, b)
    assert isinstance(tee, StatementObserver)
    assert tee.observers == (a, b)
    boom = ValueError("22012")
    first = tee.statement_started("fetch", "SELECT 1")
    second = tee.statement_started("execute", "UPDATE t SET x = 1")
    tee.statement_finished(second, None, 3)  # out of order: each token finds its own
    tee.statement_finished(first, boom, None)
    assert a.started == b.started == [("fetch", "SELECT 1"), ("execute", "UPDATE t SET x = 1")]
    assert a.finished == b.finished == [(2, None, 3), (1, boom, None)]
    tee.statement_finished("not ours", None, None)  # ignored
    tee.statement_finished(None, None, None)
    assert len(a.finished) == 2
    assert repr(tee) == "<TeeStatementObserver Observed, Observed>"


def test_tee_observer_flattens_and_drops_noops() -> None:
    a, b, c = Observed(), Observed(), Observed()
    nested = TeeStatementObserver(TeeStatementObserver(a, NoopStatementObserver()), b)
    assert TeeStatementObserver(nested, c).observers == (a, b, c)
    assert TeeStatementObserver().observers == ()
    run_statement(TeeStatementObserver())  # no observers: nothing to do, nothing fails
    with pytest.raises(TypeError, match="StatementObserver"):
        TeeStatementObserver(a, object())  # type: ignore[arg-type]


def test_a_failing_observer_never_fails_the_statement_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before, after = Observed(), Observed()
    bad = Failing()
    tee = TeeStatementObserver(before, bad, after)
    with caplog.at_level(logging.WARNING, logger="pgwarden"):
        for _ in range(3):
            run_statement(tee)
    assert len(before.finished) == len(after.finished) == 3  # the others still run
    assert bad.calls == 3  # started raised, so its finished is never called
    (record,) = caplog.records
    assert record.name == "pgwarden"
    assert record.levelno == logging.WARNING
    assert record.__dict__["event"] == "statement_observer_error"
    assert record.__dict__["observer"] == "Failing"
    assert record.__dict__["phase"] == "statement_started"
    assert record.exc_info is not None
    assert "SELECT" not in record.getMessage()

    caplog.clear()
    late = Failing("finished")
    tee = TeeStatementObserver(late)
    with caplog.at_level(logging.WARNING, logger="pgwarden"):
        run_statement(tee)
        run_statement(tee)
        rebuilt = with_observer(tee, Observed())  # the tee the handle builds on an add
        run_statement(rebuilt)
    assert late.calls == 6
    assert [r.__dict__["phase"] for r in caplog.records] == ["statement_finished"]

    class Interrupting(Observed):
        def statement_started(self, operation: str, query: object) -> object:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # only Exception is swallowed
        run_statement(TeeStatementObserver(Interrupting()))


def test_with_and_without_observer_are_what_add_and_remove_hold() -> None:
    a, b = Observed(), Observed()
    held: StatementObserver = NOOP_STATEMENT_OBSERVER
    tee = with_observer(held, a)
    assert tee.observers == (a,)
    tee = with_observer(with_observer(tee, b), a)  # the same observer twice: reported twice
    assert tee.observers == (a, b, a)
    held = tee
    token = held.statement_started("fetch", "SELECT 1")  # in flight across the removals
    held = without_observer(held, a)  # one occurrence, the last
    assert isinstance(held, TeeStatementObserver)
    assert held.observers == (a, b)
    assert without_observer(held, Observed()) is held  # not attached: unchanged
    held.statement_finished(token, None, 1)  # ends on the three that saw it start
    assert len(a.finished) == 2
    assert len(b.finished) == 1
    held = without_observer(without_observer(held, a), b)
    assert held is NOOP_STATEMENT_OBSERVER
    assert without_observer(a, a) is NOOP_STATEMENT_OBSERVER
    assert without_observer(b, a) is b


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
    counters: Any = StatsTracker().snapshot()["counters"]
    for key, name in OTEL_NAMES.items():
        assert name.startswith(("db.client.connection.", "db.client.operation."))
        assert key in gauges or key in histograms or key in counters, key
    assert OTEL_NAMES["acquire_timeouts"] == "db.client.connection.timeouts"
    assert OTEL_NAMES["connection_use_seconds"] == "db.client.connection.use_time"
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


@pytest.mark.parametrize(
    "module", ["pgwarden.core.metrics", "pgwarden.core.histogram", "pgwarden.core.tracing"]
)
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
