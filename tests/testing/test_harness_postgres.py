"""PostgresServer against real PostgreSQL: auth, settings, restarts, termination, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from pgwarden.testing import PostgresServer, ServerStartError, ServerUnavailable, StopMode

Factory = Callable[..., PostgresServer]


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_url_password_and_properties(pg_server: PostgresServer) -> None:
    assert pg_server.url == (
        f"postgresql://postgres:{pg_server.password}@127.0.0.1:{pg_server.port}/postgres"
    )
    assert (pg_server.host, pg_server.user, pg_server.dbname) == (
        "127.0.0.1",
        "postgres",
        "postgres",
    )
    assert pg_server.data_dir.is_dir()
    assert pg_server.socket_dir.parent == pg_server.base_dir
    with psycopg.connect(pg_server.url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_server.url_for(password="wrong"), connect_timeout=5)
    assert PostgresServer().password != pg_server.password  # random per server


def test_execute_and_url_for(pg_server: PostgresServer) -> None:
    assert pg_server.execute("SELECT %s::int + 1", [41]) == [(42,)]
    assert pg_server.execute("CREATE DATABASE harness_other") == []
    try:
        with psycopg.connect(pg_server.url_for("harness_other")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("harness_other",)
    finally:
        pg_server.execute("DROP DATABASE harness_other")
    assert pg_server.url_for(user="app").startswith("postgresql://app@127.0.0.1:")


def test_settings_overrides_are_applied(pg_server_factory: Factory) -> None:
    server = pg_server_factory({"max_connections": 20, "idle_session_timeout": "2s"})
    with psycopg.connect(server.url) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("20",)
        assert conn.execute("SHOW idle_session_timeout").fetchone() == ("2s",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)  # a fast default
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    assert server.timings["initdb"] == 0.0  # the template was cached: copied, not initdb'd


def test_set_config_reloads_and_reports_pending_restart(pg_server: PostgresServer) -> None:
    try:
        assert pg_server.set_config(statement_timeout="1234ms") == []
        with psycopg.connect(pg_server.url) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert pg_server.set_config(max_connections=50) == ["max_connections"]
    finally:
        pg_server.set_config(statement_timeout=None, max_connections=None)
    with psycopg.connect(pg_server.url) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_breaks_open_connections_and_keeps_the_port(
    pg_server_factory: Factory, mode: StopMode
) -> None:
    server = pg_server_factory()
    port, pid = server.port, server.pid
    conn = psycopg.connect(server.url, autocommit=True)
    try:
        conn.execute("SELECT 1")
        server.restart(mode)
        assert server.is_running()
        assert server.port == port
        assert server.pid != pid
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(server.url) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
    if mode == "immediate":
        assert "not properly shut down" in server.log_tail(100)  # crash recovery ran


def test_stop_then_start(pg_server_factory: Factory) -> None:
    server = pg_server_factory()
    server.stop()
    assert not server.is_running()
    assert server.pid is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)
    server.start()
    assert server.execute("SELECT 1") == [(1,)]


def test_terminate_backends_breaks_idle_connections(pg_server: PostgresServer) -> None:
    conn = psycopg.connect(pg_server.url, autocommit=True)
    try:
        conn.execute("SELECT 1")
        assert pg_server.terminate_backends() >= 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    assert pg_server.execute("SELECT 1") == [(1,)]


def test_close_leaves_no_process_and_no_directory() -> None:
    with PostgresServer() as server:
        pid, base = server.pid, server.base_dir
        assert pid is not None
        assert alive(pid)
        assert base.is_dir()
        assert "ready to accept connections" in server.log_tail()
    assert not alive(pid)
    assert not base.exists()
    server.close()  # idempotent
    assert not server.is_running()
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_bad_setting_is_a_start_error_with_the_log(pg_server_factory: Factory) -> None:
    with pytest.raises(ServerStartError, match="max_connections"):
        pg_server_factory({"max_connections": "lots"})
    with pytest.raises(ValueError, match="setting name"):
        PostgresServer({"no such; name": 1})


def test_missing_binaries_are_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ServerUnavailable, match="initdb"):
        PostgresServer(bindir=tmp_path)
    monkeypatch.setenv("PGWARDEN_TEST_PG_BINDIR", str(tmp_path / "missing"))
    with pytest.raises(ServerUnavailable, match="PGWARDEN_TEST_PG_BINDIR"):
        PostgresServer()


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pgwarden.testing import PostgresServer
    server = PostgresServer().start()
    print(server.pid, server.base_dir, flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    """
)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_a_killed_parent_leaves_nothing_behind(signame: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, signame], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode < 0, proc.stderr
    pid_text, base_text = proc.stdout.split()
    pid, base = int(pid_text), Path(base_text)
    # SIGTERM: the handler cleans up before dying; SIGKILL: the watchdog does.
    assert wait_until(lambda: not alive(pid), 15), f"postmaster {pid} survived {signame}"
    assert wait_until(lambda: not base.exists(), 15), f"{base} survived {signame}"
