# WARNING: generated from tests/_async/test_client_deadlines.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""``server_deadlines=False``: deadlines kept by the client alone (real server, direct
and through PgBouncer).

Under it pgwarden sends no ``statement_timeout`` (no ``set_config``, no ``SET``) for a
deadline, so a proxy that pins sessions on setting changes (RDS Proxy) has nothing to
pin on. What must still hold: every statement of a transaction or stream under a
deadline ends by it (a cancel request stops a running one; one sent after the deadline
raises without I/O), a transaction whose deadline passed is never committed, and a
nested call's shorter deadline stops its statement while the enclosing transaction goes
on. What the server received is read from its own log (``log_statement=all``): a
statement observer sees only the caller's statements, not pgwarden's.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import psycopg
import pytest

from pgwarden import Database, DeadlineExceeded, Settings

from ._compat import run, sleep

pytestmark = pytest.mark.timeout(60)

DEADLINE = 0.4
SLACK = 0.25  # a call ends within its deadline plus this (a cancel is a few ms locally)
SLEEP = "SELECT pg_sleep(30)"

# What the server log shows of a SET or set_config, whatever the protocol.
SET_SENT = re.compile(
    r"(statement|execute [^:]*): .*\bset_config\b|(statement|execute [^:]*): \s*SET\b", re.I
)


@pytest.fixture(params=["direct", "pgbouncer"])
def url(request: pytest.FixtureRequest, pg_server: Any) -> str:
    if request.param == "direct":
        return str(pg_server.url)
    return str(request.getfixturevalue("pgbouncer").url)


@pytest.fixture
def table(pg_server: Any) -> Iterator[str]:
    name = "cdl_" + uuid.uuid4().hex[:10]
    pg_server.execute(f"CREATE TABLE {name} (id int primary key)")
    yield name
    pg_server.execute(f"DROP TABLE IF EXISTS {name}")


def make(url: str, app: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, application_name=app, server_deadlines=False, **overrides))


def sleeping(pg_server: Any, app: str) -> int:
    rows = pg_server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
        f"AND state = 'active' AND application_name = '{app}'"
    )
    return int(rows[0][0])


def stopped_soon(pg_server: Any, app: str) -> bool:
    """No pg_sleep(30) of the test still runs on the server within 1 s."""
    give_up = time.monotonic() + 1.0
    while time.monotonic() < give_up:
        if sleeping(pg_server, app) == 0:
            return True
        time.sleep(0.01)
    return False


def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings().server_deadlines is True
    env = {"PGWARDEN_SERVER_DEADLINES": "false"}
    assert Settings.from_env(env).server_deadlines is False


def test_nothing_is_set_on_the_server(pg_server_factory: Any, pgbouncer_factory: Any) -> None:
    """The same work under deadlines with the setting on (the control: the log does show
    set_config) and off (no set_config, no SET), direct and through PgBouncer."""
    server = pg_server_factory({"log_statement": "all"})
    server.execute("CREATE TABLE cdl_log (id int primary key)")
    bouncer = pgbouncer_factory(server)

    def work(url: str, server_deadlines: bool, mark: str) -> None:
        settings = Settings(url=url, application_name="pgw-cdl", server_deadlines=server_deadlines)
        with Database(settings) as db:
            db.fetchval(f"SELECT '{mark}-start'")
            db.fetchval("SELECT 1", timeout=5)
            db.execute(
                "INSERT INTO cdl_log VALUES (%s) ON CONFLICT DO NOTHING", [len(mark)], timeout=5
            )
            with db.transaction(timeout=5) as tx:
                tx.fetchval("SELECT 2")
                with db.transaction(timeout=2) as inner:  # a savepoint, shorter
                    inner.fetchval("SELECT 3")

            def body(tx: Any) -> Any:
                return tx.fetchval("SELECT 4")

            db.run_transaction(body, timeout=5)
            with db.stream(
                "SELECT g FROM generate_series(1, 5) g", timeout=5, fetch_size=2
            ) as rows:
                assert [r["g"] for r in rows] == [1, 2, 3, 4, 5]
            db.fetchval(f"SELECT '{mark}-end'")

    def sent_between(mark: str) -> list[str]:
        for _ in range(100):
            log: str = server.log_path.read_text(errors="replace")
            if f"{mark}-end" in log:
                break
            time.sleep(0.05)
        window = log.rsplit(f"{mark}-start", 1)[1].split(f"{mark}-end", 1)[0]
        return window.splitlines()

    for name, url in (("direct", server.url), ("pgbouncer", bouncer.url)):
        run(partial(work, str(url), True, f"on-{name}"))
        run(partial(work, str(url), False, f"off-{name}"))
        on = [line for line in sent_between(f"on-{name}") if "set_config" in line]
        assert on, f"{name}: the log shows no set_config even with server deadlines"
        off = sent_between(f"off-{name}")
        assert any("SELECT 4" in line for line in off), f"{name}: the log missed the work"
        if name == "direct":
            assert [line for line in off if SET_SENT.search(line)] == []
        else:
            # PgBouncer may SET its own tracked parameters on server connections: only
            # pgwarden's set_config is ours to judge.
            assert [line for line in off if "set_config" in line] == []


def test_a_statement_in_a_transaction_is_stopped_at_the_deadline(url: str, pg_server: Any) -> None:
    app = "pgw-cdl-tx"

    def main() -> tuple[float, BaseException | None, int, int]:
        with make(url, app, max_size=1) as db:
            before = db.fetchval("SELECT pg_backend_pid()")
            started = time.monotonic()

            def sleep_in_transaction() -> None:
                with db.transaction(timeout=DEADLINE) as tx:
                    tx.execute("SELECT 1")
                    tx.execute(SLEEP)

            with pytest.raises(DeadlineExceeded) as caught:
                sleep_in_transaction()
            elapsed = time.monotonic() - started
            after = db.fetchval("SELECT pg_backend_pid()")
            return elapsed, caught.value.last_error, before, after

    elapsed, last_error, before, after = run(main)
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + SLACK
    # The server stopped it (a cancel request), not the sever: QueryCanceled.
    assert isinstance(last_error, psycopg.errors.QueryCanceled)
    assert stopped_soon(pg_server, app)
    if url == pg_server.url:
        assert after == before  # the cancel was consumed: the connection serves again


def test_a_deadline_passed_before_commit_commits_nothing(
    url: str, pg_server: Any, table: str
) -> None:
    """The caller's own code outlives the deadline: the next statement raises without
    I/O, and a transaction that reaches its end after the deadline is not committed."""

    def main() -> tuple[float, float]:
        with make(url, "pgw-cdl-late", max_size=2) as db:

            def statement_too_late() -> None:
                with db.transaction(timeout=DEADLINE) as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (1)")
                    sleep(DEADLINE + 0.1)
                    tx.execute(f"INSERT INTO {table} VALUES (2)")

            def commit_too_late() -> None:
                with db.transaction(timeout=DEADLINE) as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (3)")
                    sleep(DEADLINE + 0.1)

            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                statement_too_late()
            statement_after = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                commit_too_late()
            commit_after = time.monotonic() - started
            assert db.fetchval("SELECT 1", timeout=2) == 1  # the handle serves again
            return statement_after, commit_after

    statement_after, commit_after = run(main)
    assert statement_after < DEADLINE + 0.1 + SLACK
    assert commit_after < DEADLINE + 0.1 + SLACK
    assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(0,)]


@pytest.mark.parametrize("outer", [10.0, None], ids=["outer-deadline", "outer-backstop"])
def test_a_nested_deadline_stops_its_statement_and_the_transaction_goes_on(
    url: str, pg_server: Any, table: str, outer: float | None
) -> None:
    app = "pgw-cdl-nested"

    def main() -> tuple[float, float, BaseException | None]:
        with make(url, app, max_size=1) as db:
            with db.transaction(timeout=outer) as tx:
                tx.execute(f"INSERT INTO {table} VALUES (1)")

                def slow(inner: Any) -> None:
                    inner.execute(f"INSERT INTO {table} VALUES (2)")
                    inner.execute(SLEEP)

                started = time.monotonic()
                with pytest.raises(DeadlineExceeded) as caught:
                    db.run_transaction(slow, timeout=DEADLINE)
                running = time.monotonic() - started
                tx.execute(f"INSERT INTO {table} VALUES (3)")
                started = time.monotonic()

                def idle_past_deadline() -> None:
                    with db.transaction(timeout=0.2) as inner:
                        inner.execute(f"INSERT INTO {table} VALUES (4)")
                        sleep(0.3)
                        inner.execute(f"INSERT INTO {table} VALUES (5)")

                # Its deadline passes between statements: the next one raises without I/O.
                with pytest.raises(DeadlineExceeded):
                    idle_past_deadline()
                idle = time.monotonic() - started
                tx.execute(f"INSERT INTO {table} VALUES (6)")
            return running, idle, caught.value.last_error

    running, idle, last_error = run(main)
    assert DEADLINE - 0.05 <= running < DEADLINE + SLACK
    assert isinstance(last_error, psycopg.errors.QueryCanceled)
    assert idle < 0.3 + SLACK
    assert stopped_soon(pg_server, app)
    rows = pg_server.execute(f"SELECT id FROM {table} ORDER BY id")
    assert rows == [(1,), (3,), (6,)]  # the savepoints' rows rolled back, the rest committed


def test_a_stream_fetch_is_stopped_at_the_deadline(url: str, pg_server: Any) -> None:
    app = "pgw-cdl-stream"
    query = "SELECT g, pg_sleep(CASE WHEN g = 3 THEN 30 ELSE 0 END) FROM generate_series(1, 5) g"

    def main() -> tuple[float, list[int], BaseException | None]:
        with make(url, app, max_size=1) as db:
            got: list[int] = []
            started = time.monotonic()

            def consume() -> None:
                with db.stream(query, timeout=DEADLINE, fetch_size=1) as rows:
                    for row in rows:
                        got.append(row["g"])

            with pytest.raises(DeadlineExceeded) as caught:
                consume()
            elapsed = time.monotonic() - started
            assert db.fetchval("SELECT 1", timeout=2) == 1
            return elapsed, got, caught.value.last_error

    elapsed, got, last_error = run(main)
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + SLACK
    assert got == [1, 2]
    assert isinstance(last_error, psycopg.errors.QueryCanceled)
    assert stopped_soon(pg_server, app)
