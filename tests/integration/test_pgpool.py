"""pgwarden behind a real pgpool-II: detection, its real errors classified, and a restart.

pgpool-II (Debian's 4.3) runs in ``raw`` mode in front of a throwaway PostgreSQL (see
:class:`pgwarden.testing.PgpoolServer`). Its errors are provoked for real, with plain
psycopg, and each check names the message fragment and SQLSTATE it expects, so a test
that provoked some other failure fails instead of passing by luck.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgwarden import AsyncDatabase, Settings
from pgwarden.core.classify import (
    FailureKind,
    Phase,
    classify,
    classify_with_reason,
    server_refused_slots,
)
from pgwarden.testing import FaultProxy, PgBouncerServer, PgpoolServer, PostgresServer

pytestmark = pytest.mark.pgpool

K = FailureKind
Factory = Callable[..., PgpoolServer]


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


def failure(action: Callable[[], object]) -> psycopg.Error:
    try:
        action()
    except psycopg.Error as exc:
        return exc
    raise AssertionError("expected a psycopg error")


# --- the harness ----------------------------------------------------------------------------------


def test_pgpool_server_restarts_on_its_port_and_cleans_up(pgpool_factory: Factory) -> None:
    pool = pgpool_factory(num_init_children=2)
    port, root, first_pid = pool.port, pool.base_dir, pool.pid
    assert pool.url.endswith(f"@127.0.0.1:{port}/postgres")
    pool.restart()
    assert (pool.port, pool.is_running()) == (port, True)
    assert pool.pid != first_pid
    with psycopg.connect(pool.url, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    main_pid = pool.pid
    assert main_pid is not None
    children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    assert len(children) >= 2  # its child processes (2 for clients, and its workers)
    pool.close()
    assert not pool.is_running()
    assert not root.exists()
    for pid in [main_pid, *map(int, children)]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- detection ----------------------------------------------------------------------------------


def test_pgwarden_knows_it_is_behind_pgpool(
    pgpool: PgpoolServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with make(pgpool.url, max_size=3) as db:
            with caplog.at_level(logging.INFO, logger="pgwarden"):
                await db.ready()
            assert db._state.pooler == "pgpool"
            assert db._state.pgbouncer is False  # session pooling: prepares stay on
            # Prepared statements work through pgpool-II (one backend per client).
            for i in range(8):
                assert await db.fetchval("SELECT %s::int + 1", [i]) == i + 1
            assert db.stats()["counters"]["errors"] == {}
        warmups = [r for r in caplog.records if getattr(r, "event", None) == "warmup"]
        assert [getattr(r, "pooler", None) for r in warmups] == ["pgpool"]
        assert "(pgpool-II detected)" in warmups[0].getMessage()

    asyncio.run(main())
    assert pgpool.version.startswith("4.")


def test_a_direct_server_is_not_asked_for_pgpool(
    pg_server_factory: Callable[..., PostgresServer],
) -> None:
    server = pg_server_factory()  # its own log: relayed handles elsewhere do ask

    async def main() -> None:
        async with make(server.url, max_size=2) as db:
            await db.ready()
            assert db._state.pooler is None

    asyncio.run(main())
    # The pgpool-II question is only asked through a relay: no error in the server log.
    assert "pool_version" not in server.log_tail(500)


def test_a_plain_relay_is_asked_once_and_is_no_pooler(
    pg_server_factory: Callable[..., PostgresServer],
    fault_proxy_factory: Callable[..., FaultProxy],
) -> None:
    server = pg_server_factory()
    proxy = fault_proxy_factory(server.host, server.port)

    async def main() -> None:
        async with make(proxy.url_for(server.url), max_size=2) as db:
            assert await db.fetchval("SELECT 1") == 1
            assert db._state.pooler is None

    asyncio.run(main())
    asked = [
        line
        for line in server.log_tail(500).splitlines()
        if "STATEMENT:  SHOW pool_version" in line
    ]
    assert len(asked) == 1, asked
    assert "pgwarden: is this pgpool-II?" in asked[0]  # the log says why


def test_pgbouncer_is_still_told_apart(pgbouncer: PgBouncerServer) -> None:
    async def main() -> None:
        async with make(pgbouncer.url, max_size=2) as db:
            await db.ready()
            assert db._state.pooler == "pgbouncer"

    asyncio.run(main())


# --- pgpool-II's real errors ----------------------------------------------------------------------


def test_backend_down_and_backend_died_are_transient(
    pg_server_factory: Callable[..., PostgresServer], pgpool_factory: Factory
) -> None:
    server = pg_server_factory()
    pool = pgpool_factory(server)
    conn = psycopg.connect(pool.url, autocommit=True, connect_timeout=5)
    try:
        conn.execute("SELECT 1")
        # The backend behind an idle client dies: pgpool-II says so with XX000.
        assert server.terminate_backends() >= 1
        died = failure(lambda: conn.execute("SELECT 1"))
        assert died.sqlstate == "XX000"
        assert "unable to read data from DB node 0" in str(died)
        assert "EOF encountered with backend" in str(died)
        assert classify(died, Phase.FIRST_USE) is K.STALE
        assert classify(died, Phase.STATEMENT) is K.LOST
    finally:
        conn.close()
    # The server is down: pgpool-II cannot open a backend for a new client.
    server.stop()
    down = failure(lambda: psycopg.connect(pool.url, connect_timeout=5).close())
    assert down.sqlstate is None  # a refused login: libpq's text only
    assert "failed to create a backend 0 connection" in str(down)
    kind, reason = classify_with_reason(down, Phase.CONNECT)
    assert kind is K.NOTHING_RAN, reason
    assert pool.is_running()


def test_num_init_children_exhausted(pgpool_factory: Factory) -> None:
    # reserved_connections=1 of 3 children: the third client is refused with pgpool-II's
    # own 53300, which libpq reads only without SSL negotiation.
    pool = pgpool_factory(num_init_children=3, reserved_connections=1)
    held: list[psycopg.Connection[Any]] = []
    try:
        held.append(psycopg.connect(pool.url, connect_timeout=5))
        deadline = time.monotonic() + 10
        while True:  # a child counts a client it just finished with for a moment
            try:
                held.append(psycopg.connect(pool.url, connect_timeout=5))
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        plain = failure(lambda: psycopg.connect(pool.url, sslmode="disable", connect_timeout=5))
        assert "Sorry, too many clients already" in str(plain)
        assert classify(plain, Phase.CONNECT) is K.OVERLOAD
        assert server_refused_slots(plain) is False  # pgpool-II's slots: shrinking helps
        negotiated = failure(lambda: psycopg.connect(pool.url, connect_timeout=5))
        assert "server sent an error response during SSL exchange" in str(negotiated)
        assert classify(negotiated, Phase.CONNECT) is K.OVERLOAD
        assert server_refused_slots(negotiated) is False
    finally:
        for conn in held:
            conn.close()


def test_a_full_server_behind_pgpool_is_waited_for(
    pg_server_factory: Callable[..., PostgresServer], pgpool_factory: Factory
) -> None:
    # PostgreSQL refuses pgpool-II's own login before authentication (53300), and
    # pgpool-II passes that on in the old protocol's format: libpq reads no reason.
    server = pg_server_factory({"max_connections": 4, "superuser_reserved_connections": 0})
    pool = pgpool_factory(server, num_init_children=2)
    held: list[psycopg.Connection[Any]] = []
    full: psycopg.Error | None = None
    try:
        while full is None:
            try:
                held.append(psycopg.connect(server.url, connect_timeout=5))
            except psycopg.OperationalError as exc:
                full = exc
        assert "too many clients already" in str(full)
        refused = failure(lambda: psycopg.connect(pool.url, connect_timeout=5))
        assert refused.sqlstate is None
        assert str(refused).rstrip().endswith("failed:")
        kind, reason = classify_with_reason(refused, Phase.CONNECT)
        assert (kind, reason) == (K.NOTHING_RAN, "text <no reason>")

        async def main() -> float:
            async with make(pool.url, max_size=2, ready_timeout=10) as db:
                started = time.monotonic()
                warming = asyncio.ensure_future(db.fetchval("SELECT 1"))
                await asyncio.sleep(0.5)
                assert not warming.done()  # retried, not given up as permanent
                for conn in held:
                    await asyncio.to_thread(conn.close)
                held.clear()
                assert await warming == 1
                return time.monotonic() - started

        assert asyncio.run(main()) < 10
    finally:
        for conn in held:
            conn.close()


def test_without_reserved_connections_a_client_waits_in_the_queue(
    pgpool_factory: Factory,
) -> None:
    pool = pgpool_factory(num_init_children=1)
    holder = psycopg.connect(pool.url, connect_timeout=5)
    try:
        started = time.monotonic()
        queued = failure(lambda: psycopg.connect(pool.url, connect_timeout=2))
        assert isinstance(queued, psycopg.errors.ConnectionTimeout)
        assert time.monotonic() - started >= 1.5
        assert classify(queued, Phase.CONNECT) is K.NOTHING_RAN
    finally:
        holder.close()


# --- the PostgreSQL behind pgpool-II restarts under load ---------------------------------------


def test_calls_recover_when_the_server_behind_pgpool_restarts(
    pg_server_factory: Callable[..., PostgresServer], pgpool_factory: Factory
) -> None:
    # Two readers on four pooled connections. A statement in flight at the restart gets
    # the server's 57P01 through pgpool-II, or pgpool-II's own XX000 "unable to read
    # data from DB node 0" (which pgwarden once took for permanent); an idle connection
    # is closed by pgpool-II (its child exits) and replaced without an error.
    server = pg_server_factory()
    pool = pgpool_factory(server, num_init_children=8)
    failures: list[str] = []
    done_at: list[float] = []

    async def main() -> None:
        async with make(pool.url, max_size=4, min_size=4) as db:
            await db.ready()
            stop_at = time.monotonic() + 4.0

            async def reader() -> None:
                while time.monotonic() < stop_at:
                    try:
                        assert await db.fetchval("SELECT 1", timeout=8) == 1
                    except Exception as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    else:
                        done_at.append(time.monotonic())
                    await asyncio.sleep(0.005)

            async def restart() -> float:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(server.restart, "fast")
                return time.monotonic()

            restarted_at, *_ = await asyncio.gather(restart(), reader(), reader())
            assert failures == []
            assert [t for t in done_at if t > restarted_at], "no call succeeded after the restart"
            counters = db.stats()["counters"]
            # Whatever the restart was seen as, it was retried through: the server's 57P01
            # (stale), pgpool-II's "unable to read data" (lost: a read, sent again) or
            # "failed to create a backend" (nothing ran), never as permanent. (Connections
            # told of the shutdown while idle are replaced without an error at all.)
            assert set(counters["errors"]) <= {"stale", "nothing_ran", "lost"}, counters

    asyncio.run(main())
