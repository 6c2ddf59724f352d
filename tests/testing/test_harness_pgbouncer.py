"""PgBouncerServer against real PgBouncer and PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgwarden.testing import PgBouncerServer, PostgresServer, ServerUnavailable

pytestmark = pytest.mark.pgbouncer

Factory = Callable[..., PgBouncerServer]


def hammer(url: str, clients: int, iterations: int, **connect_kwargs: Any) -> list[Exception]:
    """Run the same parametrised query ``iterations`` times on each of ``clients``
    concurrent connections; return the errors."""
    failures: list[Exception] = []
    barrier = threading.Barrier(clients)

    def client() -> None:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5, **connect_kwargs) as c:
                barrier.wait(10)
                for i in range(iterations):
                    assert c.execute("SELECT %s::int + 1", [i]).fetchone() == (i + 1,)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_psycopg_connects_through_pgbouncer(pgbouncer: PgBouncerServer) -> None:
    assert pgbouncer.url == (
        f"postgresql://postgres:{pgbouncer.password}@127.0.0.1:{pgbouncer.port}/postgres"
    )
    with psycopg.connect(pgbouncer.url, prepare_threshold=None, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert pgbouncer.version.startswith("1.")


def test_prepare_threshold_none_works_under_concurrency(pgbouncer_factory: Factory) -> None:
    bouncer = pgbouncer_factory(default_pool_size=2)
    assert hammer(bouncer.url, clients=8, iterations=20, prepare_threshold=None) == []


def test_default_prepare_threshold_fails_under_concurrency(pgbouncer_factory: Factory) -> None:
    # psycopg prepares a query after 5 executions, as "_pg3_0" on every connection. In
    # transaction mode PgBouncer 1.18 shares server connections, so a second client's
    # "_pg3_0" collides ('prepared statement "_pg3_0" already exists', 42P05), or a
    # client's Bind lands where it was never prepared ('... does not exist', 26000).
    bouncer = pgbouncer_factory(default_pool_size=1)
    failures = hammer(bouncer.url, clients=4, iterations=12)
    assert failures, "expected prepared-statement errors through transaction pooling"
    for exc in failures:
        assert isinstance(
            exc, (errors.DuplicatePreparedStatement, errors.InvalidSqlStatementName)
        ) or 'prepared statement "_pg3_' in str(exc), repr(exc)


def test_query_wait_timeout_is_applied(pgbouncer_factory: Factory) -> None:
    bouncer = pgbouncer_factory(default_pool_size=1, query_wait_timeout=1)
    holder = psycopg.connect(bouncer.url, prepare_threshold=None, connect_timeout=5)
    try:
        holder.execute("SELECT 1")  # open transaction: holds the only server connection
        with psycopg.connect(bouncer.url, prepare_threshold=None, autocommit=True) as waiter:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
                waiter.execute("SELECT 1")
            assert 0.9 <= time.monotonic() - started < 10
    finally:
        holder.close()


def test_restart_breaks_clients_and_keeps_the_port(pgbouncer_factory: Factory) -> None:
    bouncer = pgbouncer_factory()
    port = bouncer.port
    conn = psycopg.connect(bouncer.url, prepare_threshold=None, autocommit=True)
    try:
        conn.execute("SELECT 1")
        bouncer.restart()
        assert bouncer.port == port
        assert bouncer.is_running()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(bouncer.url, prepare_threshold=None) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_close_leaves_no_process_and_no_directory(pg_server: PostgresServer) -> None:
    with PgBouncerServer(pg_server, extra={"server_login_retry": 2}) as bouncer:
        pid, base = bouncer.pid, bouncer.base_dir
        assert pid is not None
        assert base.is_dir()
        assert "server_login_retry = 2" in (base / "pgbouncer.ini").read_text()
    assert not base.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    bouncer.close()  # idempotent


def test_missing_pgbouncer_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = PostgresServer()  # never started: nothing to clean up
    with pytest.raises(ServerUnavailable, match="PgBouncer"):
        PgBouncerServer(server, binary=tmp_path / "pgbouncer")
    monkeypatch.setenv("PGWARDEN_TEST_PGBOUNCER", str(tmp_path / "pgbouncer"))
    with pytest.raises(ServerUnavailable, match="PGWARDEN_TEST_PGBOUNCER"):
        PgBouncerServer(server)
