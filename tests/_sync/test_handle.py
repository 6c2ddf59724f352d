# WARNING: generated from tests/_async/test_handle.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""Core behaviour of Database against a real PostgreSQL (and PgBouncer)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

import pgwarden
from pgwarden import Database, HandleClosed, NotReady, Settings
from pgwarden.core.lifecycle import State

from ._compat import gather, run, sleep, spawn


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def count_app_connections(server: Any, app: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
    )
    return int(rows[0][0])


def test_query_api_returns_dict_rows_and_values(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            assert db.state is State.NEW  # construction did no I/O
            rows = db.fetch("SELECT 1 AS a, 'x' AS b UNION ALL SELECT 2, 'y' ORDER BY 1")
            assert rows == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
            assert db.fetchrow("SELECT 1 AS a WHERE false") is None
            assert db.fetchrow("SELECT %s::int AS n", [5]) == {"n": 5}
            assert db.fetchval("SELECT %s::text", ["v"]) == "v"
            db.execute("CREATE TEMP TABLE IF NOT EXISTS t_api (id int)")
            db.execute("DROP TABLE IF EXISTS api_rows")
            db.execute("CREATE TABLE api_rows (id int primary key)")
            assert db.executemany("INSERT INTO api_rows VALUES (%s)", [(1,), (2,), (3,)]) == 3
            assert db.execute("DELETE FROM api_rows WHERE id > %s", [1]) == 2
            db.execute("DROP TABLE api_rows")

    run(main)


def test_connection_is_a_dict_row_connection(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db, db.connection() as conn:
            cur = conn.execute("SELECT 3 AS x")
            assert cur.fetchone() == {"x": 3}

    run(main)


def test_transaction_commits_and_rolls_back(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            db.execute("DROP TABLE IF EXISTS tx_rows")
            db.execute("CREATE TABLE tx_rows (id int)")
            with db.transaction() as tx:
                tx.execute("INSERT INTO tx_rows VALUES (1)")
                assert tx.fetchval("SELECT count(*) FROM tx_rows") == 1

            def failing_transaction() -> None:
                with db.transaction() as tx:
                    tx.execute("INSERT INTO tx_rows VALUES (2)")
                    raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                failing_transaction()
            assert db.fetchval("SELECT count(*) FROM tx_rows") == 1
            with db.transaction(isolation="serializable", readonly=True) as tx:
                assert tx.fetchval("SHOW transaction_isolation") == "serializable"
                assert tx.fetchval("SHOW transaction_read_only") == "on"
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    tx.execute("INSERT INTO tx_rows VALUES (3)")
            # the session is not left with transaction options
            assert db.fetchval("SHOW transaction_read_only") == "off"
            db.execute("DROP TABLE tx_rows")

    run(main)


def test_200_cold_callers_share_one_warmup(pg_server: Any) -> None:
    app = "pgw-cold-200"

    def main() -> None:
        with make(pg_server.url, max_size=8, application_name=app) as db:
            results = gather(*[spawn(db.fetchval, ("SELECT %s::int", [i])) for i in range(200)])
            assert results == list(range(200))
            stats = db.stats()
            assert stats["counters"]["warmups"] == {"ok": 1, "failed": 0}
            assert stats["counters"]["connections_opened"] <= 8
            assert count_app_connections(pg_server, app) <= 8

    run(main)


def test_transaction_started_during_warmup_waits_for_it(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            seen: list[State] = []

            def in_tx() -> None:
                with db.transaction() as tx:
                    seen.append(db.state)
                    tx.execute("SELECT 1")

            gather(spawn(db.ready), spawn(in_tx), spawn(in_tx))
            assert seen == [State.READY, State.READY]
            assert db.stats()["counters"]["warmups"]["ok"] == 1

    run(main)


def test_server_reachable_one_second_late_is_served(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    server.stop()
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:

        def main() -> float:
            with make(server.url, ready_timeout=15) as db:
                t0 = time.monotonic()
                assert db.fetchval("SELECT 42") == 42
                return time.monotonic() - t0

        elapsed = run(main)
        assert 0.8 <= elapsed < 10
    finally:
        starter.join()


def test_ready_timeout_gives_every_waiter_the_same_clear_error(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    url = server.url
    server.stop()

    def main() -> list[BaseException]:
        with make(url, ready_timeout=0.6) as db:
            outcomes = gather(
                *[spawn(db.fetchval, ("SELECT 1",)) for _ in range(20)], return_exceptions=True
            )
            assert db.stats()["counters"]["warmups"]["failed"] == 1
            return [o for o in outcomes if isinstance(o, BaseException)]

    errors = run(main)
    assert len(errors) == 20
    assert all(isinstance(e, NotReady) for e in errors)
    assert server.password not in str(errors[0])


def test_no_stale_connection_reaches_a_caller_after_terminate(pg_server: Any) -> None:
    def main() -> None:
        # retry_attempts=1: no retries, so only validation can keep callers whole.
        with make(pg_server.url, retry_attempts=1, max_size=4) as db:
            gather(*[spawn(db.fetchval, ("SELECT pg_sleep(0.05)",)) for _ in range(4)])
            killed = pg_server.terminate_backends()
            assert killed >= 1
            sleep(1.2)  # past the 1 s validation window
            for _ in range(10):
                assert db.fetchval("SELECT 1") == 1
            closed = db.stats()["counters"]["connections_closed"]
            assert sum(closed.values()) + db.stats()["pool"]["connections_lost"] >= 1

    run(main)


def test_queries_succeed_after_restart(pg_server_factory: Any) -> None:
    server = pg_server_factory()

    def main() -> None:
        with make(server.url) as db:
            assert db.fetchval("SELECT 1") == 1
            server.restart(mode="fast")
            assert db.fetchval("SELECT 2", timeout=10) == 2

    run(main)


def test_close_drains_work_in_flight_and_refuses_new(pg_server: Any) -> None:
    def main() -> None:
        db = make(pg_server.url)
        db.ready()
        slow = spawn(db.fetchval, ("SELECT 'done' FROM pg_sleep(0.5)",))
        sleep(0.1)
        closing = spawn(db.close, (5,))
        sleep(0.05)
        with pytest.raises(HandleClosed):
            db.fetchval("SELECT 1")
        assert gather(slow) == ["done"]
        gather(closing)
        assert db.state is State.CLOSED
        with pytest.raises(HandleClosed):
            db.fetchval("SELECT 1")

    run(main)


def test_registry_returns_one_handle_per_settings(pg_server: Any) -> None:
    a = pgwarden.connect(pg_server.url, max_size=3)
    b = pgwarden.connect(pg_server.url, max_size=3)
    c = pgwarden.connect(pg_server.url, max_size=4)
    assert a is b
    assert a is not c
    # sync and async handles are distinct
    async_handle: object = pgwarden.connect_async(pg_server.url, max_size=3)
    assert async_handle is not a


@pytest.mark.pgbouncer
def test_prepared_statements_through_pgbouncer_under_concurrency(pgbouncer: Any) -> None:
    def main() -> None:
        with make(pgbouncer.url, max_size=6) as db:
            db.ready()
            assert db.stats()["pgbouncer"] is True

            def worker(n: int) -> None:
                for i in range(30):
                    assert db.fetchval("SELECT %s::int + %s::int", [n, i]) == n + i

            gather(*[spawn(worker, (n,)) for n in range(12)])
            assert db.stats()["counters"]["errors"] == {}

    run(main)


def test_direct_server_is_not_detected_as_pgbouncer(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            db.ready()
            assert db.stats()["pgbouncer"] is False

    run(main)


def test_close_during_warmup_and_twice_is_safe(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    url = server.url
    server.stop()

    def main() -> None:
        db = make(url, ready_timeout=5)
        warming = spawn(db.fetchval, ("SELECT 1",))
        sleep(0.2)
        gather(spawn(db.close, (0.5,)), spawn(db.close, (0.5,)))
        assert db.state is State.CLOSED
        with pytest.raises((HandleClosed, NotReady)):
            gather(warming)

    run(main)
