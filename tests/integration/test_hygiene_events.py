"""Connection hygiene after a pause, shutdown hooks, slow-query and leak events."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from typing import Any

import pytest

from pgwarden import AsyncDatabase, Database, Settings


def test_pause_triggers_one_pass_check_of_idle_connections(pg_server: Any) -> None:
    async def main() -> None:
        # Validation would never run (window 1 h) and there are no retries:
        # only the gap detector can keep the dead connections from callers.
        db = AsyncDatabase(
            Settings(url=pg_server.url, validation_window=3600, gap_threshold=0.3, retry_attempts=1)
        )
        async with db:
            await asyncio.gather(*(db.fetchval("SELECT pg_sleep(0.05)") for _ in range(4)))
            assert await asyncio.to_thread(pg_server.terminate_backends) >= 1
            await asyncio.sleep(0.5)  # the "frozen instance" gap
            for _ in range(8):
                assert await db.fetchval("SELECT 1") == 1

    asyncio.run(main())


def test_slow_query_event_has_no_parameters(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "param-secret-value"
    with (
        caplog.at_level(logging.WARNING, logger="pgwarden"),
        Database(Settings(url=pg_server.url, slow_query_threshold=0.05)) as db,
    ):
        db.fetchval("SELECT %s::text FROM pg_sleep(0.1)", [secret])
        stats = db.stats()
    events = [r for r in caplog.records if getattr(r, "event", None) == "slow_query"]
    assert len(events) == 1
    assert secret not in caplog.text
    assert "pg_sleep(?)" in events[0].getMessage()
    assert stats["counters"]["slow_queries"] == 1


def test_leaked_connection_is_reported_once_with_call_site(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> Mapping[str, Any]:
        async with AsyncDatabase(Settings(url=pg_server.url, leak_threshold=0.2)) as db:
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
                await asyncio.sleep(0.5)
            return db.stats()

    with caplog.at_level(logging.WARNING, logger="pgwarden"):
        stats = asyncio.run(main())
    leaks = [r for r in caplog.records if getattr(r, "event", None) == "leak"]
    assert len(leaks) == 1
    assert "test_hygiene_events.py" in leaks[0].getMessage()
    assert stats["counters"]["leaked_connections"] == 1


def test_health_is_cached_and_single_flight(pg_server: Any) -> None:
    async def main() -> None:
        async with AsyncDatabase(Settings(url=pg_server.url, health_interval=60)) as db:
            reports = await asyncio.gather(*(db.health() for _ in range(20)))
            assert all(r["ok"] for r in reports)
            again = await db.health()
            assert again is reports[0]
            checks = db.stats()["counters"]["health_checks"]
            assert checks == {"passed": 1, "failed": 0}

    asyncio.run(main())


def _run(code: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_sigterm_drains_then_chains_to_previous_handler(pg_server: Any) -> None:
    code = """
        import logging, os, signal, sys, threading, time
        import pgwarden
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        db = pgwarden.connect()
        db.install_signal_handlers(timeout=5)
        out = []
        worker = threading.Thread(
            target=lambda: out.append(db.fetchval("SELECT 'drained' FROM pg_sleep(0.4)")))
        worker.start()
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        worker.join()
        print(out, seen, db.state.value)
    """
    done = _run(code, pg_server.url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['drained'] [15] closed"


def test_sync_handle_closes_at_interpreter_exit(pg_server: Any) -> None:
    code = """
        import logging, sys
        import pgwarden
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        assert pgwarden.connect().fetchval("SELECT 1") == 1
    """
    started = time.monotonic()
    done = _run(code, pg_server.url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "closed (0 operation(s) still in flight" in done.stderr
    assert time.monotonic() - started < 30
