"""Overload from a fleet: more processes x pool size than the server allows.

Five real processes, each with ``max_size=10``, against ``max_connections=20``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pgwarden import AsyncDatabase, Settings

    url, seconds, tail = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])

    async def main():
        # max_idle is short so that, once the storm is over, idle connections
        # go back to the server and the shrunken pools have room to grow again.
        db = AsyncDatabase(Settings(url=url, max_size=10, sizing_quiet_period=0.5,
                                    max_idle=0.5, acquire_timeout=20))
        failures, ok, limits = [], 0, []
        stop_at = time.monotonic() + seconds

        async def caller():
            nonlocal ok
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    await db.fetchval("SELECT 1 FROM pg_sleep(0.02)", timeout=15)
                    ok += 1
                except Exception as exc:
                    left = 15 - (time.monotonic() - started)
                    failures.append([type(exc).__name__, str(exc)[:200], left])

        async def sampler():
            while time.monotonic() < stop_at + tail:
                limits.append(db.stats()["pool"]["limit"])
                await asyncio.sleep(0.1)

        async def tail_load():
            # During and after the storm, one light caller, so the limit can grow back.
            while time.monotonic() < stop_at + tail:
                await db.fetchval("SELECT 1", timeout=15)
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller() for _ in range(20)), sampler(), tail_load())
        stats = db.stats()
        await db.close()
        print(json.dumps({"ok": ok, "failures": failures, "limits": limits,
                          "overload": stats["counters"]["overload_events"]}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_fleet_over_max_connections_shrinks_then_recovers(pg_server_factory: Any) -> None:
    server = pg_server_factory({"max_connections": 20})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, server.url, "4", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(5)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    with_deadline_left = [f for r in results for f in r["failures"] if f[2] > 0.05]
    assert with_deadline_left == []
    assert sum(r["ok"] for r in results) > 200
    assert sum(r["overload"] for r in results) >= 1, "no overload was counted"
    shrunk = [r["limits"] for r in results if min(r["limits"]) < 10]
    assert shrunk, "no pool lowered its limit"
    # After the storm every process kept a light load: each pool that shrank grew back.
    for limits in shrunk:
        assert min(limits) < max(limits[-5:]), limits
