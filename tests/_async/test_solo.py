"""The solo connection: a handle whose calls do not overlap runs them on the warmup's
connection, without a pool, and builds the pool only when a call finds it lent.

Against a real server, which counts the sessions (``pg_stat_activity``): the pool never
holds more than ``max_size`` with the solo connection in it, a connection comes back in
the state the next caller expects, and ``max_idle``, ``max_lifetime``, a terminated
session and ``close()`` are handled as the pool would handle them.
"""

from __future__ import annotations

import time
from typing import Any

from pgwarden import AsyncDatabase, Settings

from ._compat import gather, run, sleep, spawn


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


def sessions(server: Any, app: str) -> int:
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
    )
    return int(rows[0][0])


def test_calls_one_at_a_time_share_the_warmup_connection(pg_server: Any) -> None:
    app = "pgw-solo-serial"

    async def main() -> None:
        async with make(pg_server.url, application_name=app) as db:
            pids = {await db.fetchval("SELECT pg_backend_pid()") for _ in range(50)}
            async with db.transaction() as tx:
                pids.add(await tx.fetchval("SELECT pg_backend_pid()"))
            assert len(pids) == 1
            assert db._connections.pool is None  # no pool was needed
            stats = db.stats()
            assert stats["counters"]["connections_opened"] == 1
            assert (stats["pool"]["size"], stats["pool"]["idle"]) == (1, 1)
            assert sessions(pg_server, app) == 1

    run(main)


def test_an_overlapping_call_builds_the_pool_within_max_size(pg_server: Any) -> None:
    app = "pgw-solo-overlap"

    async def main() -> None:
        async with make(pg_server.url, max_size=3, application_name=app) as db:
            first = await db.fetchval("SELECT pg_backend_pid()")
            async with db.connection() as conn:  # the solo connection, lent
                cur = await conn.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None
                assert row["pg_backend_pid"] == first
                assert db._connections.pool is None
                # Eight callers while it is lent: the pool is built, counting it.
                results = await gather(
                    *[spawn(db.fetchval, ("SELECT pg_sleep(0.05), %s::int", [i])) for i in range(8)]
                )
                assert len(results) == 8
                assert db._connections.pool is not None
                assert sessions(pg_server, app) <= 3
                assert db.stats()["pool"]["size"] <= 3
            # Back in the pool, not closed: a later call may still be served on it.
            pids = set(
                await gather(*[spawn(db.fetchval, ("SELECT pg_backend_pid()",)) for _ in range(20)])
            )
            assert sessions(pg_server, app) <= 3
            assert db.stats()["pool"]["size"] <= 3
            assert len(pids) <= 3
            assert db.stats()["counters"]["connections_opened"] <= 3

    run(main)


def test_a_consumer_transaction_left_open_is_rolled_back_on_return(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            await db.execute("DROP TABLE IF EXISTS solo_left_open")
            await db.execute("CREATE TABLE solo_left_open (v int)")
            try:
                async with db.connection() as conn:
                    await conn.set_autocommit(False)
                    await conn.execute("INSERT INTO solo_left_open VALUES (1)")
                    pid = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
                # Not committed: gone; the same session serves the next call, idle.
                assert await db.fetchval("SELECT count(*) FROM solo_left_open") == 0
                assert pid is not None
                assert await db.fetchval("SELECT pg_backend_pid()") == pid["pg_backend_pid"]
                assert db._connections.pool is None
            finally:
                await db.execute("DROP TABLE solo_left_open")

    run(main)


def test_the_solo_connection_closes_after_max_idle(pg_server: Any) -> None:
    app = "pgw-solo-idle"

    async def main() -> None:
        async with make(pg_server.url, max_idle=0.3, application_name=app) as db:
            assert await db.fetchval("SELECT 1") == 1
            assert sessions(pg_server, app) == 1
            deadline = time.monotonic() + 5.0
            while sessions(pg_server, app) and time.monotonic() < deadline:
                await sleep(0.1)  # the watchdog's coarse tick is 0.5 s
            assert sessions(pg_server, app) == 0
            assert db.stats()["counters"]["connections_closed"].get("idle") == 1
            assert await db.fetchval("SELECT 2") == 2  # the next call connects again
            assert sessions(pg_server, app) == 1

    run(main)


def test_a_solo_connection_in_use_is_not_closed_as_idle(pg_server: Any) -> None:
    """The idle watch is armed once, not per use: when it fires on a connection used
    since, it waits again from that last use instead of closing it."""

    async def main() -> None:
        async with make(pg_server.url, max_idle=0.8) as db:
            pids = set()
            stop = time.monotonic() + 2.5  # the watch fires several times meanwhile
            while time.monotonic() < stop:
                pids.add(await db.fetchval("SELECT pg_backend_pid()"))
                await sleep(0.1)
            assert len(pids) == 1
            assert db.stats()["counters"]["connections_closed"].get("idle", 0) == 0

    run(main)


def test_the_solo_connection_is_replaced_after_its_lifetime(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url, max_lifetime=0.5, lifetime_jitter=0.0) as db:
            first = await db.fetchval("SELECT pg_backend_pid()")
            await sleep(0.7)
            second = await db.fetchval("SELECT pg_backend_pid()")
            assert second != first
            assert db.stats()["counters"]["connections_closed"].get("lifetime") == 1

    run(main)


def test_a_terminated_solo_connection_is_never_handed_out(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            pid = await db.fetchval("SELECT pg_backend_pid()")
            pg_server.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await sleep(0.2)  # the server's goodbye reaches the socket
            assert await db.fetchval("SELECT pg_backend_pid()") != pid

    run(main)


def test_min_size_or_a_fleet_budget_builds_the_pool_at_warmup(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url, min_size=1) as db:
            await db.ready()
            assert db._connections.pool is not None

    run(main)


def test_close_while_lent_closes_it_on_return(pg_server: Any) -> None:
    app = "pgw-solo-close"

    async def main() -> None:
        db = make(pg_server.url, application_name=app)
        await db.ready()
        connections = db._connections
        lease = await connections.lease(None, explicit=False)
        await connections.close(1.0)  # what close() does once in-flight work is done
        assert sessions(pg_server, app) == 1  # lent: left to its caller
        await lease.release()
        assert lease.conn.closed
        assert sessions_settled(pg_server, app)
        await db.close()

    run(main)


def sessions_settled(server: Any, app: str) -> bool:
    """The server has seen the session end (its backend exits just after Terminate)."""
    deadline = time.monotonic() + 5.0
    while sessions(server, app) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sessions(server, app) == 0
