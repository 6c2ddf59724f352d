"""psycopg_pool's own log records about pgwarden's pools become pgwarden events (pure: no
server). Synthetic LogRecords, shaped like the ones psycopg_pool makes, go through the
`PoolLogBridge`; the real psycopg_pool source is read to check that every message it can log
has an event."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg import pq

from pgwarden._async.pool import CircuitOpen as AsyncCircuitOpen
from pgwarden._async.pool import PgwAsyncConnection, PgwAsyncPool
from pgwarden._sync.pool import CircuitOpen, PgwConnection, PgwPool
from pgwarden.logs import (
    EVENTS,
    POOL_GENERIC_EVENT,
    POOL_LOGGERS,
    POOL_MESSAGES,
    JsonFormatter,
    PoolLogBridge,
    route_pool_logs,
)

SECRET = "s3cr3t-Hunter2"
NAME = "pgwarden-4242"


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def only(self) -> logging.LogRecord:
        assert len(self.records) == 1, [r.getMessage() for r in self.records]
        return self.records[0]


@contextlib.contextmanager
def pgwarden_events(level: int = logging.DEBUG) -> Iterator[Events]:
    logger = logging.getLogger("pgwarden")
    handler = Events()
    previous = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


@pytest.fixture
def bridge() -> PoolLogBridge:
    bridge = PoolLogBridge()  # not installed: its filter() is called directly
    bridge.register(NAME, secrets=[SECRET, None, ""])
    return bridge


def record(msg: str, *args: Any, level: int = logging.WARNING, name: str = "psycopg.pool") -> Any:
    return logging.LogRecord(name, level, "/x/psycopg_pool/pool.py", 1, msg, args, None, "f")


class FakeConnection(PgwConnection):
    """A connection object without a server: what psycopg_pool passes as a record arg."""

    def __init__(self, status: str = "INTRANS", pid: int = 4711) -> None:
        self.pgconn = SimpleNamespace(status=pq.ConnStatus.BAD, backend_pid=pid)  # type: ignore[assignment]
        self._status = status

    def __repr__(self) -> str:
        return (
            f"<psycopg.Connection [{self._status}] (host=db.internal port=6432 user=alice "
            f"database={SECRET}) at 0x7f00>"
        )


class ForeignConnection(psycopg.Connection[Any]):
    def __init__(self) -> None:
        self.pgconn = SimpleNamespace(status=pq.ConnStatus.BAD, backend_pid=1)  # type: ignore[assignment]


class OurPool(PgwPool):
    def __del__(self) -> None:
        pass

    def call(self, fn: Callable[[], bool]) -> bool:
        return fn()

    def log_here(self, bridge: PoolLogBridge, rec: logging.LogRecord) -> bool:
        return bridge.filter(rec)


class UserPool(psycopg_pool.ConnectionPool[Any]):
    def __del__(self) -> None:
        pass

    def call(self, fn: Callable[[], bool]) -> bool:
        return fn()

    def log_here(self, bridge: PoolLogBridge, rec: logging.LogRecord) -> bool:
        return bridge.filter(rec)


def pool_object(cls: type[Any], name: str) -> Any:
    pool = object.__new__(cls)  # no __init__: no lock, no threads
    pool.name = name
    return pool


# --- the message table against psycopg_pool's source ------------------------------------------


def psycopg_pool_log_calls() -> list[tuple[str, str, int, str]]:
    """(file, level name, number of arguments, format string) of every logger call."""
    calls = []
    for path in sorted(Path(psycopg_pool.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logger"
            ):
                first = node.args[0]
                where = f"{path.name}:{node.lineno}: a log call without a literal message"
                assert isinstance(first, ast.Constant), where
                assert isinstance(first.value, str), where
                calls.append((path.name, node.func.attr, len(node.args) - 1, first.value))
    return calls


def test_every_psycopg_pool_log_message_has_an_event() -> None:
    calls = psycopg_pool_log_calls()
    assert len(calls) >= 60, calls  # psycopg-pool 3.3.0 and 3.3.3 both have 68
    demoted = set()
    for filename, level_name, nargs, template in calls:
        assert template in POOL_MESSAGES, f"{filename}: {template!r} has no pgwarden event"
        event, level, roles = POOL_MESSAGES[template]
        assert event in EVENTS
        assert event.startswith("pool_")
        assert len(roles) == nargs == len(re.findall(r"%[rsd]", template)), template
        source_level = logging.getLevelName(level_name.upper())
        if level != source_level:
            demoted.add((template, source_level, level))
    # The only departures: the three lines psycopg_pool logs on every getconn/putconn.
    assert demoted == {
        ("connection requested from %r", logging.INFO, logging.DEBUG),
        ("connection given by %r", logging.INFO, logging.DEBUG),
        ("returning connection to %r", logging.INFO, logging.DEBUG),
    }
    # psycopg_pool logs on these loggers and no other.
    for path in Path(psycopg_pool.__file__).parent.glob("*.py"):
        for found in re.findall(r"getLogger\(([^)]*)\)", path.read_text()):
            assert found in ('"psycopg.pool"', "__name__"), (path.name, found)
            if found == "__name__":
                assert f"psycopg_pool.{path.stem}" in POOL_LOGGERS


# --- translation ---------------------------------------------------------------------------


def test_a_named_pgwarden_pool_record_becomes_one_redacted_event(bridge: PoolLogBridge) -> None:
    error = psycopg.OperationalError(
        f'connection failed: FATAL: database "{SECRET}" is not currently accepting '
        f"connections (postgresql://alice:{SECRET}@db.internal/x password={SECRET})"
    )
    rec = record("error connecting in %r: %s", NAME, error)
    with pgwarden_events() as events:
        assert bridge.filter(rec) is False  # the original is dropped
    event = events.only()
    assert event.name == "pgwarden"
    assert event.levelno == logging.WARNING
    assert vars(event)["event"] == "pool_connect_failed"
    assert vars(event)["pool"] == NAME
    assert vars(event)["origin"] == "psycopg.pool"
    assert vars(event)["error_type"] == "OperationalError"
    assert event.getMessage().startswith(f"error connecting in '{NAME}': connection failed")
    assert event.created == rec.created
    assert event.funcName == "f"
    line = JsonFormatter().format(event)
    assert SECRET not in line
    assert SECRET not in event.getMessage()
    assert json.loads(line)["event"] == "pool_connect_failed"


def test_a_connection_argument_is_summarised_not_described(bridge: PoolLogBridge) -> None:
    conn = FakeConnection("INTRANS", pid=4711)
    with pgwarden_events() as events:
        assert bridge.filter(record("rolling back returned connection: %s", conn)) is False
    event = events.only()
    fields = vars(event)
    assert fields["event"] == "pool_returned_in_transaction"
    assert fields["connection_status"] == "INTRANS"
    assert fields["backend_pid"] == 4711
    assert fields["pool"] == NAME  # the only pgwarden pool name registered
    message = event.getMessage()
    assert message == "rolling back returned connection: <connection [INTRANS] pid=4711>"
    for detail in ("db.internal", "alice", "6432", SECRET):
        assert detail not in JsonFormatter().format(event)


@pytest.mark.parametrize("conn_class", [PgwConnection, PgwAsyncConnection])
def test_both_connection_classes_are_ours(bridge: PoolLogBridge, conn_class: type[Any]) -> None:
    conn = object.__new__(conn_class)
    assert bridge.owner(record("discarding closed connection: %s", conn)) == ""


def test_records_about_a_users_pool_pass_through_untouched(bridge: PoolLogBridge) -> None:
    user_pool = pool_object(UserPool, "pool-7")
    cases = [
        record("error connecting in %r: %s", "pool-7", psycopg.OperationalError("refused")),
        record("discarding closed connection: %s", ForeignConnection()),
        record("task run %s failed: %s: %s", SimpleNamespace(pool=weakref.ref(user_pool)), "E", 1),
        record("growing pool %r to %s", "pool-7", 2, level=logging.INFO),
        record("adding new connection to the pool", level=logging.INFO),  # no clue at all
    ]
    with pgwarden_events() as events:
        for rec in cases:
            before = dict(vars(rec))
            assert bridge.filter(rec) is True
            assert vars(rec) == before  # not even annotated
        # Emitted from inside the user's pool: the stack says whose it is.
        assert user_pool.log_here(bridge, record("not serving connection found broken")) is True
    assert events.records == []


def test_a_pgwarden_pool_found_on_the_stack(bridge: PoolLogBridge) -> None:
    ours = pool_object(OurPool, "pgwarden-99")  # a name never registered: the class decides
    with pgwarden_events() as events:
        assert ours.log_here(bridge, record("discarding expired connection", level=20)) is False
    event = events.only()
    assert vars(event)["event"] == "pool_connection_expired"
    assert vars(event)["pool"] == "pgwarden-99"
    assert event.levelno == logging.INFO


def test_the_nearest_pool_on_the_stack_decides(bridge: PoolLogBridge) -> None:
    ours = pool_object(OurPool, "pgwarden-99")
    user = pool_object(UserPool, "pool-8")
    rec = record("error resetting connection: %s", ValueError("x"))
    assert bridge.owner(rec) is None  # called from a test: no pool on the stack
    with pgwarden_events() as events:
        assert ours.call(lambda: user.log_here(bridge, rec)) is True
        assert user.call(lambda: ours.log_here(bridge, rec)) is False
    assert [vars(r)["pool"] for r in events.records] == ["pgwarden-99"]


def test_a_pool_task_argument_and_the_schedulers_bound_method(bridge: PoolLogBridge) -> None:
    ours = pool_object(OurPool, NAME)

    class Task:
        def __init__(self) -> None:
            self.pool = weakref.ref(ours)

        def tick(self) -> None:
            pass

    task = Task()
    error = RuntimeError("boom")
    with pgwarden_events() as events:
        assert (
            bridge.filter(record("task run %s failed: %s: %s", task, "RuntimeError", error))
            is False
        )
        assert (
            bridge.filter(record("scheduled task run %s failed: %s: %s", task.tick, "E", error))
            is False
        )
    first, second = events.records
    assert vars(first)["event"] == "pool_task_failed"
    assert vars(first)["task"] == "Task"
    assert vars(first)["error_type"] == "RuntimeError"
    assert vars(second)["event"] == "pool_scheduled_task_failed"


def test_the_worker_thread_name_is_the_last_clue(bridge: PoolLogBridge) -> None:
    verdicts: list[str | None] = []

    def in_thread() -> None:
        rec = record("scheduled task run %s failed: %s: %s", print, "E", ValueError("v"))
        verdicts.append(bridge.owner(rec))

    for name in (f"{NAME}-scheduler", f"{NAME}-worker-3", "pool-1-worker-0", "MainThread"):
        thread = threading.Thread(target=in_thread, name=name)
        thread.start()
        thread.join()
    assert verdicts == [NAME, NAME, None, None]


def test_a_worker_name_argument_is_a_clue(bridge: PoolLogBridge) -> None:
    assert bridge.owner(record("terminating working task %s", f"{NAME}-worker-0")) == NAME
    assert (
        bridge.owner(record("couldn't stop thread %r within %s seconds", "pool-2-worker-1", 5))
        is None
    )
    assert bridge.owner(record("terminating working task %s", "pgwarden-42424")) is None


@pytest.mark.parametrize("circuit_open", [CircuitOpen, AsyncCircuitOpen])
def test_circuit_open_refusals_are_dropped_without_an_event(
    bridge: PoolLogBridge, circuit_open: type[Exception]
) -> None:
    rec = record("error connecting in %r: %s", NAME, circuit_open("pgwarden: circuit open"))
    with pgwarden_events() as events:
        assert bridge.filter(rec) is False
    assert events.records == []


def test_per_call_chatter_is_debug_and_still_not_printed_raw(bridge: PoolLogBridge) -> None:
    rec = record("connection requested from %r", NAME, level=logging.INFO)
    with pgwarden_events(logging.INFO) as events:
        assert bridge.filter(rec) is False  # pgwarden's logger decides: not at INFO
    assert events.records == []
    with pgwarden_events(logging.DEBUG) as events:
        assert bridge.filter(rec) is False
    assert events.only().levelno == logging.DEBUG
    assert vars(events.only())["event"] == "pool_connection_requested"


def test_an_unknown_message_is_a_generic_event_at_its_level(bridge: PoolLogBridge) -> None:
    rec = record("new in 3.4: %r lost %s (%s)", NAME, 3, f"password={SECRET}", level=logging.ERROR)
    with pgwarden_events() as events:
        assert bridge.filter(rec) is False
    event = events.only()
    assert vars(event)["event"] == POOL_GENERIC_EVENT
    assert event.levelno == logging.ERROR
    assert vars(event)["pool"] == NAME
    assert SECRET not in event.getMessage()
    assert "lost 3" in event.getMessage()


def test_structured_fields_and_extras_carried_over(bridge: PoolLogBridge) -> None:
    rec = record("resizing %r to min_size=%s max_size=%s", NAME, 1, 6, level=logging.INFO)
    rec.request_id = "r-1"  # added by a user's filter before the bridge
    with pgwarden_events() as events:
        bridge.filter(rec)
    fields = vars(events.only())
    assert (fields["event"], fields["min_size"], fields["max_size"]) == ("pool_resizing", 1, 6)
    assert fields["request_id"] == "r-1"


def test_a_record_that_cannot_be_rendered_is_still_one_event(bridge: PoolLogBridge) -> None:
    rec = record("growing pool %r to %s", NAME, level=logging.INFO)  # one argument short
    with pgwarden_events() as events:
        assert bridge.filter(rec) is False
    event = events.only()
    assert vars(event)["event"] == POOL_GENERIC_EVENT
    assert event.getMessage() == "growing pool %r to %s"


# --- installation --------------------------------------------------------------------------


def bridges_on(logger_name: str) -> list[logging.Filter | Any]:
    return [
        f for f in logging.getLogger(logger_name).filters if getattr(f, "_pgwarden_pool_bridge", 0)
    ]


def test_installing_twice_installs_once_and_each_record_is_one_event() -> None:
    first = route_pool_logs("pgwarden-unit-a", secrets=[SECRET])
    second = route_pool_logs("pgwarden-unit-b")
    assert first is second
    for name in POOL_LOGGERS:
        assert bridges_on(name) == [first]
    assert {"pgwarden-unit-a", "pgwarden-unit-b"} <= first.pool_names
    with pgwarden_events() as events:
        logging.getLogger("psycopg.pool").warning(
            "error connecting in %r: %s", "pgwarden-unit-a", ValueError(SECRET)
        )
    assert [vars(r)["event"] for r in events.records] == ["pool_connect_failed"]
    assert SECRET not in events.records[0].getMessage()


def test_a_bridge_already_installed_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # As after importlib.reload(pgwarden.logs): the filter on the loggers is another object,
    # of another class object, and it is the one kept.
    import pgwarden.logs

    for name in POOL_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    monkeypatch.setattr(pgwarden.logs, "_BRIDGE", None)
    reloaded = type("PoolLogBridge", (PoolLogBridge,), {})()
    logging.getLogger(POOL_LOGGERS[0]).addFilter(reloaded)
    assert route_pool_logs("pgwarden-unit-c") is reloaded
    assert route_pool_logs("pgwarden-unit-d") is reloaded
    for name in POOL_LOGGERS:
        assert bridges_on(name) == [reloaded]
    assert {"pgwarden-unit-c", "pgwarden-unit-d"} <= reloaded.pool_names


def test_pgwarden_pools_register_their_name_and_password() -> None:
    class Observer:
        may_connect = True

    url = f"postgresql://alice:{SECRET}@db.internal:5432/app"
    PgwPool(url, observer=Observer(), name="pgwarden-unit-sync")  # type: ignore[arg-type]
    PgwAsyncPool(url, observer=Observer(), name="pgwarden-unit-async")  # type: ignore[arg-type]
    bridge = route_pool_logs("pgwarden-unit-e")
    assert {"pgwarden-unit-sync", "pgwarden-unit-async"} <= bridge.pool_names
    with pgwarden_events() as events:
        logging.getLogger("psycopg.pool").info(
            "connection failed check: %s", ValueError(f"echo {SECRET}")
        )
    assert events.records == []  # no clue: not ours (emitted from a test, not a pool)
    rec = record("growing pool %r to %s", "pgwarden-unit-sync", 2, level=logging.INFO)
    with pgwarden_events() as events:
        assert bridge.filter(rec) is False
    assert vars(events.only())["event"] == "pool_growing"
    assert vars(events.only())["size"] == 2


def test_importing_logs_imports_no_driver() -> None:
    code = (
        "import sys, pgwarden.logs\n"
        "print([m for m in ('psycopg', 'psycopg_pool', 'asyncio', 'pgwarden._handle.config')"
        " if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
