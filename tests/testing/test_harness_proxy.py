"""FaultProxy against real PostgreSQL: every fault takes effect, and heal() undoes it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgwarden.testing import FaultProxy, PostgresServer
from pgwarden.testing._binaries import free_port

pytestmark = pytest.mark.proxy


@pytest.fixture
def url(fault_proxy: FaultProxy, pg_server: PostgresServer) -> str:
    return fault_proxy.url_for(pg_server.url)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, connect_timeout=2, autocommit=True, **kwargs)


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def talk(host: str, port: int) -> bytes:
    """Send an SSLRequest on a raw socket and return the first byte of the answer."""
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")
        return raw.recv(1)


def test_forwards_and_counts_connections(fault_proxy: FaultProxy, url: str) -> None:
    assert fault_proxy.connections == 0
    with connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert fault_proxy.connections == 1
    assert wait_until(lambda: fault_proxy.connections == 0, 5)


def test_latency_delays_each_round_trip(fault_proxy: FaultProxy, url: str) -> None:
    with connect(url) as conn:
        conn.execute("SELECT 1")
        fault_proxy.set_latency(0.2)
        started = time.monotonic()
        conn.execute("SELECT 1")
        slow = time.monotonic() - started
        fault_proxy.heal()
        started = time.monotonic()
        conn.execute("SELECT 1")
        fast = time.monotonic() - started
    assert 0.35 <= slow < 5  # 0.2 s each way
    assert fast < slow


def test_blackhole_holds_queries_until_healed(fault_proxy: FaultProxy, url: str) -> None:
    outcome: list[object] = []

    def query(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        try:
            outcome.append(conn.execute("SELECT 42").fetchone())
        except Exception as exc:
            outcome.append(exc)

    with connect(url) as conn:
        fault_proxy.blackhole()
        worker = threading.Thread(target=query, args=(conn,))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
        assert outcome == []
        # New connections are accepted but never answered: the client's timeout fires.
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            connect(url)
        assert time.monotonic() - started < 10
        fault_proxy.heal()
        worker.join(5)
    assert outcome == [(42,)]


def test_reset_sends_rst_until_healed(fault_proxy: FaultProxy, url: str) -> None:
    conn = connect(url)
    try:
        fault_proxy.reset()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with pytest.raises(ConnectionResetError):  # a real RST, not an orderly close
        talk(fault_proxy.host, fault_proxy.port)
    with pytest.raises(psycopg.OperationalError):
        connect(url)
    fault_proxy.heal()
    with connect(url) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_refuse_then_heal_on_the_same_port(fault_proxy: FaultProxy, url: str) -> None:
    port = fault_proxy.port
    with connect(url) as survivor:
        fault_proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((fault_proxy.host, port), timeout=5).close()
        with pytest.raises(psycopg.OperationalError, match="refused"):
            connect(url)
        assert survivor.execute("SELECT 1").fetchone() == (1,)  # open ones carry on
    fault_proxy.heal()
    assert fault_proxy.port == port
    with connect(url) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_drop_connections_breaks_open_ones_only(fault_proxy: FaultProxy, url: str) -> None:
    conn = connect(url)
    try:
        fault_proxy.drop_connections()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with connect(url) as fresh:  # no heal() needed
        assert fresh.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(("when", "applied"), [("before", 0), ("after", 1)])
def test_cut_on_commit(
    pg_server: PostgresServer, fault_proxy: FaultProxy, url: str, when: Any, applied: int
) -> None:
    table = f"harness_cut_{when}"
    pg_server.execute(f"CREATE TABLE {table} (x int)")
    try:
        conn = psycopg.connect(url, connect_timeout=2)
        try:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
            fault_proxy.cut_on(b"COMMIT", when=when)
            with pytest.raises(psycopg.OperationalError):
                conn.commit()  # the client cannot tell whether it committed...
        finally:
            conn.close()
        # ...but the server can: "before" never reached it, "after" was executed.
        assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(applied,)]
        with psycopg.connect(url, connect_timeout=2) as again:  # the cut was one-shot
            again.execute(f"INSERT INTO {table} VALUES (2)")
        assert pg_server.execute(f"SELECT count(*) FROM {table} WHERE x = 2") == [(1,)]
    finally:
        pg_server.execute(f"DROP TABLE {table}")


def test_unreachable_target_resets_the_client() -> None:
    with FaultProxy("127.0.0.1", free_port()) as proxy, pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://u@127.0.0.1:{proxy.port}/db", connect_timeout=2)


def test_url_for_rewrites_only_host_and_port() -> None:
    with FaultProxy("db.example", 5432) as proxy:
        url = "postgresql://u:p%40ss@db.example:6543/app?sslmode=disable&port=1&host=x"
        assert (
            proxy.url_for(url)
            == f"postgresql://u:p%40ss@127.0.0.1:{proxy.port}/app?sslmode=disable"
        )
        rewritten = conninfo_to_dict(proxy.url_for("host=db.example port=6543 dbname=app user=u"))
        assert rewritten == {
            "host": "127.0.0.1",
            "port": str(proxy.port),
            "dbname": "app",
            "user": "u",
        }


def test_async_clients_and_threads_can_drive_it(fault_proxy: FaultProxy, url: str) -> None:
    async def main() -> float:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            fault_proxy.set_latency(0.1)  # control calls are safe from a running loop
            started = time.monotonic()
            await conn.execute("SELECT 1")
            return time.monotonic() - started

    assert asyncio.run(main()) >= 0.15
    threads = [threading.Thread(target=fault_proxy.heal) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert fault_proxy.mode == "normal"


def test_close_is_idempotent_and_final(pg_server: PostgresServer) -> None:
    proxy = FaultProxy(pg_server.host, pg_server.port).start()
    conn = connect(proxy.url_for(pg_server.url))
    try:
        proxy.close()
        proxy.close()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with pytest.raises(RuntimeError):
        proxy.set_latency(1)
    with pytest.raises(RuntimeError):
        proxy.start()


class Query(threading.Thread):
    """Run one statement on *conn* in a daemon thread; ``outcome`` holds its result or error."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]], sql: str) -> None:
        super().__init__(daemon=True)
        self.conn, self.sql = conn, sql
        self.outcome: list[object] = []

    def run(self) -> None:
        try:
            self.outcome.append(self.conn.execute(self.sql.encode()).fetchone())
        except Exception as exc:
            self.outcome.append(exc)


def pid_of(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def backend_query(server: PostgresServer, pid: int) -> str | None:
    rows = server.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
    return rows[0][0] if rows else None


def test_swallow_silences_open_connections_for_good(
    pg_server: PostgresServer, fault_proxy: FaultProxy, url: str
) -> None:
    first, second = connect(url), connect(url)
    try:
        pids = [pid_of(first), pid_of(second)]
        fault_proxy.swallow()
        assert fault_proxy.mode == "swallow"
        before_heal = Query(first, "SELECT 42")
        before_heal.start()
        before_heal.join(0.5)
        assert before_heal.is_alive(), before_heal.outcome  # times out: no answer
        # Client-to-server: the server never saw it (its last statement is the old one).
        assert backend_query(pg_server, pids[0]) == "SELECT pg_backend_pid()"
        assert any(b"SELECT 42" in chunk for chunk in fault_proxy.swallowed)
        # Server-to-client: the server ends the second session; the client hears nothing.
        pg_server.execute("SELECT pg_terminate_backend(%s)", [pids[1]])
        assert wait_until(lambda: backend_query(pg_server, pids[1]) is None, 5)
        fault_proxy.heal()
        assert fault_proxy.mode == "normal"
        before_heal.join(0.5)
        assert before_heal.is_alive(), before_heal.outcome  # unlike blackhole: nothing flows
        after_heal = Query(second, "SELECT 43")
        after_heal.start()
        after_heal.join(0.5)
        assert after_heal.is_alive(), after_heal.outcome  # no error either: never closed
        # Neither reset() nor drop_connections() ends a swallowed connection.
        fault_proxy.drop_connections()
        fault_proxy.reset()
        fault_proxy.heal()
        after_heal.join(0.3)
        assert after_heal.is_alive(), after_heal.outcome
        assert fault_proxy.connections >= 2
        with connect(url) as fresh:  # connections made after heal() work normally
            assert fresh.execute("SELECT 1").fetchone() == (1,)
        # Only close() ends them; the blocked clients then see the connection go.
        fault_proxy.close()
        for query in (before_heal, after_heal):
            query.join(5)
            assert not query.is_alive()
            assert isinstance(query.outcome[0], psycopg.OperationalError), query.outcome
    finally:
        first.close()
        second.close()


def test_swallow_accepts_new_connections_and_never_answers(
    pg_server: PostgresServer, fault_proxy: FaultProxy, url: str
) -> None:
    fault_proxy.refuse()
    fault_proxy.swallow()  # also listens again
    assert fault_proxy.mode == "swallow"
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="timeout"):
        connect(url)  # the TCP connect succeeds; the startup never completes
    assert 1.5 < time.monotonic() - started < 10
    with socket.create_connection((fault_proxy.host, fault_proxy.port), timeout=5) as raw:
        raw.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # SSLRequest: a server answers one byte
        raw.settimeout(0.3)
        with pytest.raises(TimeoutError):
            raw.recv(1)
        fault_proxy.heal()
        raw.settimeout(0.5)
        with pytest.raises(TimeoutError):  # still silent after heal(), and not closed
            raw.recv(1)
        assert fault_proxy.swallowed.count(b"\0\0\0\x08\x04\xd2\x16\x2f") >= 2
        with connect(url) as fresh:  # a connection made after heal() works
            assert fresh.execute("SELECT 1").fetchone() == (1,)
        assert talk(fault_proxy.host, fault_proxy.port) in (b"S", b"N")


def test_swallow_can_be_driven_from_a_loop_and_threads(fault_proxy: FaultProxy, url: str) -> None:
    async def main() -> str:
        fault_proxy.swallow()  # control calls are safe from a running loop
        return fault_proxy.mode

    assert asyncio.run(main()) == "swallow"
    threads = [
        threading.Thread(target=fault_proxy.swallow if i % 2 else fault_proxy.heal)
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    fault_proxy.heal()
    assert fault_proxy.mode == "normal"
    with connect(url) as fresh:
        assert fresh.execute("SELECT 1").fetchone() == (1,)
