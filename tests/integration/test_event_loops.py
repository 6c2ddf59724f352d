"""One async handle across event loops: sequential ``asyncio.run()`` calls (a serverless
handler per invocation, a test framework's loop per test) keep working, and a handle
shared by two running loops is refused with a clear error.

psycopg_pool's async pool runs its growth and reconnection in tasks of the loop that
opened it; ``asyncio.run()`` cancels them when it ends. Before the handle followed the
loop, a second ``asyncio.run()`` got only the connections already idle: concurrent
calls queued behind them, and after a server restart no connection ever came back
(every call timed out).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pytest

import pgwarden
from pgwarden.testing import PostgresServer

CONCURRENT = 6
SLEEP = 0.2


def _handle(url: str) -> pgwarden.AsyncDatabase:
    return pgwarden.connect_async(
        url,
        application_name=f"pgw-loops-{uuid.uuid4().hex[:8]}",
        max_size=CONCURRENT,
        min_size=1,
    )


def _concurrently(db: pgwarden.AsyncDatabase) -> Callable[[], float]:
    async def run() -> float:
        started = time.monotonic()
        values = await asyncio.gather(
            *[db.fetchval("SELECT 1 FROM pg_sleep(%s)", [SLEEP]) for _ in range(CONCURRENT)]
        )
        assert values == [1] * CONCURRENT
        return time.monotonic() - started

    return lambda: asyncio.run(run())


def test_a_second_asyncio_run_gets_a_pool_that_grows(pg_url: str) -> None:
    db = _handle(pg_url)
    asyncio.run(db.ready(timeout=10))
    elapsed = _concurrently(db)()
    print(f"second loop: {CONCURRENT} concurrent {SLEEP}s sleeps in {elapsed:.3f}s")
    # Served one at a time (a pool that cannot grow) takes CONCURRENT * SLEEP = 1.2 s.
    assert elapsed < CONCURRENT * SLEEP * 0.75
    asyncio.run(db.close())


def test_a_later_asyncio_run_reconnects_after_a_restart(
    pg_server_factory: Callable[..., PostgresServer],
) -> None:
    server = pg_server_factory()
    db = _handle(server.url)
    asyncio.run(db.ready(timeout=10))
    _concurrently(db)()
    server.restart("fast")
    elapsed = _concurrently(db)()
    print(f"after a restart, in a new loop: {elapsed:.3f}s")
    asyncio.run(db.close())
    stats = db.stats()
    assert stats["state"] == "closed"


def test_close_from_a_new_loop_ends_the_old_loops_sessions(pg_server: PostgresServer) -> None:
    app = f"pgw-loops-close-{uuid.uuid4().hex[:8]}"
    db = pgwarden.connect_async(pg_server.url, application_name=app, min_size=2, max_size=4)
    asyncio.run(db.ready(timeout=10))

    def sessions() -> int:
        rows = pg_server.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
        )
        return int(rows[0][0])

    assert sessions() >= 1
    asyncio.run(asyncio.wait_for(db.close(), 5))
    give_up_at = time.monotonic() + 5
    while sessions() and time.monotonic() < give_up_at:
        time.sleep(0.02)
    assert sessions() == 0


def test_a_handle_used_by_two_running_loops_is_refused(pg_url: str) -> None:
    db = _handle(pg_url)
    release = threading.Event()
    first_ready = threading.Event()

    async def hold_the_first_loop() -> None:
        await db.fetchval("SELECT 1")
        first_ready.set()
        while not release.is_set():
            await asyncio.sleep(0.01)

    thread = threading.Thread(target=lambda: asyncio.run(hold_the_first_loop()))
    thread.start()
    try:
        assert first_ready.wait(10)
        with pytest.raises(RuntimeError, match="another event loop that is still running"):
            asyncio.run(db.fetchval("SELECT 1"))
    finally:
        release.set()
        thread.join(10)
    # The first loop has closed now: the handle follows the next one.
    assert asyncio.run(db.fetchval("SELECT 2")) == 2
    asyncio.run(db.close())


_RETURNS_WITHOUT_CLOSING = """
import asyncio, sys
import pgwarden

async def handler() -> None:
    db = pgwarden.connect_async(sys.argv[1], min_size=2, max_size=4)
    await db.ready(timeout=10)  # returns while the pool still connects its minimum
    print(await db.fetchval("SELECT 1"), flush=True)

asyncio.run(handler())
print("exited", flush=True)
"""


def test_asyncio_run_ends_when_the_handle_is_left_open(pg_url: str) -> None:
    # asyncio.run() cancels every task at exit; psycopg_pool's worker swallowed the
    # cancellation of a connect in progress, so the process never ended.
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _RETURNS_WITHOUT_CLOSING, pg_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    print(f"asyncio.run() with an open handle ended in {elapsed:.2f}s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "exited"]
