"""Fleet budget against real servers: real processes (``fleet_worker.py``), sync and async.

The figures the 30-process test measures are printed (``-s``) and written to
``FLEET_REAL_JSON`` when set, for ``bench/fleet_sim.py --check``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import pgwarden
from pgwarden import Settings
from pgwarden.core.fleet import FleetPolicy

WORKER = str(Path(__file__).with_name("fleet_worker.py"))
FLEET_LIKE = "%pgwarden:default:%"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}


_SPAWNED: list[subprocess.Popen[str]] = []


def _spawn(args: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, WORKER, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _SPAWNED.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    """A failed test must not leave its workers (and their pipes) to a later test, where
    the garbage collector's ResourceWarnings would fail whatever test is running."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def _fleet_connections(server: Any) -> int:
    rows = server.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (FLEET_LIKE,)
    )
    return int(rows[0][0])


def _results(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _app_role(server: Any, name: str, limit: int | None = None) -> str:
    clause = f" CONNECTION LIMIT {limit}" if limit is not None else ""
    server.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'pw'{clause}")
    return str(server.url_for(user=name, password="pw"))


def _run_waves(
    server: Any,
    url: str,
    *,
    budget: Any,
    waves: list[int],
    gap: float,
    run_for: float,
    interval: float,
    deadline: float,
) -> tuple[list[dict[str, Any]], int]:
    """Start ``waves[i]`` processes every *gap* seconds; all stop *run_for* seconds after
    the first; sample the fleet's connections on the server every 50 ms."""
    t0 = time.time()
    stop_at = t0 + run_for
    procs: list[subprocess.Popen[str]] = []
    peak, wave = 0, 0
    while True:
        if wave < len(waves) and time.time() - t0 >= wave * gap:
            for _ in range(waves[wave]):
                mode = "async" if len(procs) % 2 else "sync"
                procs.append(
                    _spawn(
                        dict(
                            url=url,
                            budget=budget,
                            interval=interval,
                            stop_at=stop_at,
                            deadline=deadline,
                            mode=mode,
                        )
                    )
                )
            wave += 1
        peak = max(peak, _fleet_connections(server))
        if wave == len(waves) and all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    return _results(procs), peak


@pytest.mark.slow
def test_thirty_processes_in_three_waves_share_max_connections_20(pg_server_factory: Any) -> None:
    server = pg_server_factory({"max_connections": 20})
    url = _app_role(server, "fleet_app")
    reserved = int(server.execute("SHOW superuser_reserved_connections")[0][0])
    budget = 20 - reserved
    interval, deadline = 1.0, 15.0
    results, peak = _run_waves(
        server,
        url,
        budget="server",
        waves=[10, 10, 10],
        gap=3.0,
        run_for=12.0,
        interval=interval,
        deadline=deadline,
    )
    firsts = [r["first_row"] - r["started"] for r in results if r["first_row"] is not None]
    zeros = [r["zero_max"] for r in results]
    gaps = [r["gap_max"] for r in results]
    figures = {
        "processes": len(results),
        "first_row_p50": round(statistics.median(firsts), 3),
        "first_row_max": round(max(firsts), 3),
        "peak_server_connections": peak,
        "budget": budget,
        "zero_max": max(zeros),
        "gap_max": max(gaps),
        "gaps": gaps,
        "overloads": sum(r["overloads"] for r in results),
        "interval": interval,
        "starts": [r["started"] for r in results],
        "first_rows": firsts,
    }
    print(
        "fleet real:",
        json.dumps({k: v for k, v in figures.items() if k not in ("starts", "first_rows", "gaps")}),
    )
    if os.environ.get("FLEET_REAL_JSON"):
        Path(os.environ["FLEET_REAL_JSON"]).write_text(json.dumps(figures))
    failed = [r["failures"] for r in results if r["failures"]]
    assert not failed, failed
    assert len(firsts) == 30
    assert max(firsts) < deadline
    assert peak <= budget
    # "No process at zero for more than one adjustment interval", measured strictly: the
    # longest gap between two rows of a process that wants one every ~30 ms. Turns are a
    # third of an interval, so a process rotated out is back within two turns when views
    # agree; while a wave arrives, views disagree for up to a sample interval and some
    # processes wait longer (docs/fleet.md gives the figures: up to 1.2-1.5 s on a quiet
    # machine). Bounded at three intervals: a shared 2-core machine under a load of 20+
    # delays processes by hundreds of ms. Without turns a process left out waits for a
    # holder to give up, up to its deadline.
    assert max(gaps) <= 3 * interval, sorted(gaps)
    # The test's own monitoring connection is outside the fleet and may be counted.
    assert {r["fleet"]["budget"] for r in results} <= {budget, budget - 1}


@pytest.mark.slow
def test_role_connection_limit_bounds_the_fleet(pg_server_factory: Any) -> None:
    server = pg_server_factory({"max_connections": 40})
    url = _app_role(server, "fleet_limited", limit=8)
    results, peak = _run_waves(
        server,
        url,
        budget="role",
        waves=[6, 6],
        gap=2.0,
        run_for=6.0,
        interval=0.5,
        deadline=15.0,
    )
    assert peak <= 8
    assert all(r["first_row"] is not None and not r["failures"] for r in results), results
    assert {r["fleet"]["budget"] for r in results} == {8}  # the monitor is another role
    assert "CONNECTION LIMIT 8" in results[0]["fleet"]["why"]


@pytest.mark.slow
def test_killed_processes_stop_counting_once_their_connections_go(
    pg_server_factory: Any, tmp_path: Path
) -> None:
    server = pg_server_factory({"max_connections": 30})
    url = _app_role(server, "fleet_kill")
    interval = 0.5
    stop_at = time.time() + 20
    procs, files = [], []
    for i in range(4):
        status = str(tmp_path / f"status{i}.json")
        files.append(status)
        procs.append(
            _spawn(
                dict(
                    url=url,
                    budget="server",
                    interval=interval,
                    stop_at=stop_at,
                    deadline=15.0,
                    mode="async" if i % 2 else "sync",
                    status_file=status,
                )
            )
        )

    def statuses() -> list[dict[str, Any] | None]:
        found: list[dict[str, Any] | None] = []
        for path in files:
            try:
                found.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError):
                found.append(None)
        return found

    give_up = time.time() + 15
    while time.time() < give_up:
        seen = statuses()
        if all(s is not None and s["instances"] == 4 for s in seen):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the four processes never saw each other: {statuses()}")
    for proc in procs[:2]:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    gone_at = time.time() + 10
    while _fleet_connections(server) > 0 and time.time() < gone_at:
        # The survivors' connections stay; wait until the dead ones' are gone.
        alive = server.execute(
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
            "WHERE application_name LIKE %s",
            (FLEET_LIKE,),
        )[0][0]
        if alive <= 2:
            break
        time.sleep(0.05)
    connections_gone = time.time()
    while time.time() < connections_gone + 8 * interval:
        seen = statuses()[2:]
        if all(s is not None and s["instances"] == 2 for s in seen):
            break
        time.sleep(0.05)
    counted_after = time.time() - connections_gone
    for proc in procs[2:]:
        proc.terminate()
        proc.communicate(timeout=30)
    assert all(s is not None and s["instances"] == 2 for s in statuses()[2:]), statuses()
    # A sample notices the connections gone (within one interval), the policy remembers an
    # absent peer for its ttl (it might be between turns), and the first sample after that
    # drops it; the status file is rewritten every 0.2 s.
    policy = FleetPolicy(instance_id="00000000", source="server", max_size=4, interval=interval)
    assert counted_after <= 2 * interval + policy.away_ttl(27, 4) + 0.3


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_turned_off_behind_pgbouncer_with_the_reason(pgbouncer: Any, mode: str) -> None:
    settings = Settings(url=pgbouncer.url, fleet_budget="server", fleet_interval=0.2)
    if mode == "async":
        import asyncio

        async def run() -> Mapping[str, Any]:
            db = pgwarden.AsyncDatabase(settings)
            try:
                assert await db.fetchval("SELECT 1") == 1
                give_up = time.monotonic() + 5
                while db.stats()["fleet"]["enabled"] and time.monotonic() < give_up:
                    await asyncio.sleep(0.05)
                return db.stats()
            finally:
                await db.close()

        stats = asyncio.run(run())
    else:
        db = pgwarden.Database(settings)
        try:
            assert db.fetchval("SELECT 1") == 1
            give_up = time.monotonic() + 5
            while db.stats()["fleet"]["enabled"] and time.monotonic() < give_up:
                time.sleep(0.05)
            stats = db.stats()
        finally:
            db.close()
    fleet = stats["fleet"]
    assert fleet["enabled"] is False
    assert "pgbouncer" in fleet["off_reason"]
    # Off means no cap: the pool is back to its configured size.
    assert fleet["cap"] is None
