"""One fleet member for the fleet budget tests (run as ``python fleet_worker.py``).

Arguments: a JSON object with ``url``, ``budget``, ``interval``, ``stop_at`` (wall
time to stop, at least three intervals after the first row), ``deadline`` (seconds
for the first row), ``mode`` ("async"/"sync").
Prints one JSON line: when the first row came, the longest gap between two rows
after it (``gap_max``: the process wants a row every ~30 ms, so a long gap is time
spent without a connection), the longest run of 50 ms samples at pool size 0
(``zero_max``; psycopg_pool counts a connection being attempted), and failures
(type names only).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import pgwarden
from pgwarden import Settings


def main() -> None:
    args = json.loads(sys.argv[1])
    started = time.time()
    settings = Settings(
        url=args["url"],
        fleet_budget=args["budget"],
        fleet_interval=args["interval"],
        max_size=args.get("max_size", 4),
        application_name="fleetworker",
        ready_timeout=args["deadline"],
    )
    result: dict[str, Any] = {
        "started": started,
        "first_row": None,
        "failures": [],
        "ok": 0,
        "gap_max": 0.0,
    }
    sizes: list[tuple[float, int]] = []
    if args["mode"] == "async":
        asyncio.run(_run_async(settings, args, result, sizes))
    else:
        _run_sync(settings, args, result, sizes)
    result["zero_max"] = _longest_zero(sizes, result["first_row"])
    print(json.dumps(result))


def _row(result: dict[str, Any]) -> None:
    now = time.time()
    result["ok"] += 1
    result["gap_max"] = round(max(result["gap_max"], now - result["last_row"]), 3)
    result["last_row"] = now


def _longest_zero(sizes: list[tuple[float, int]], first: float | None) -> float:
    """The longest run of samples with no pooled connection, after the first row."""
    longest, since = 0.0, None
    for at, size in sizes:
        if first is None or at < first:
            continue
        if size == 0:
            since = at if since is None else since
            longest = max(longest, at - since)
        else:
            since = None
    return round(longest, 3)


async def _run_async(
    settings: Settings, args: dict[str, Any], result: dict[str, Any], sizes: list[tuple[float, int]]
) -> None:
    db = pgwarden.AsyncDatabase(settings)
    done = False

    async def watch() -> None:
        while not done:
            sizes.append((time.time(), db.stats()["pool"]["size"]))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch())
    reporter = asyncio.ensure_future(_report_async(db, args, lambda: done))
    try:
        await db.fetchval("SELECT 1", timeout=args["deadline"])
        result["first_row"] = result["last_row"] = time.time()
        # At least a few samples after the first row, however late it came.
        stop_at = max(args["stop_at"], result["first_row"] + 3 * args["interval"])
        while time.time() < stop_at:
            try:
                await db.fetchval("SELECT 1 FROM pg_sleep(0.01)", timeout=args["deadline"])
                _row(result)
            except Exception as exc:
                result["failures"].append(type(exc).__name__)
            await asyncio.sleep(0.02)
    except Exception as exc:
        result["failures"].append(type(exc).__name__)
    finally:
        done = True
        await watcher
        await reporter
        stats = db.stats()
        result["fleet"] = stats.get("fleet")
        result["overloads"] = stats["counters"]["overload_events"]
        await db.close()


def _write_status(db: Any, args: dict[str, Any]) -> None:
    """The fleet section of stats(), for a test watching the process from outside."""
    path = args.get("status_file")
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(db.stats().get("fleet"), f)
        os.replace(path + ".tmp", path)


async def _report_async(db: Any, args: dict[str, Any], finished: Any) -> None:
    while not finished():
        _write_status(db, args)
        await asyncio.sleep(0.2)


def _run_sync(
    settings: Settings, args: dict[str, Any], result: dict[str, Any], sizes: list[tuple[float, int]]
) -> None:
    db = pgwarden.Database(settings)
    done = threading.Event()

    def watch() -> None:
        ticks = 0
        while not done.is_set():
            sizes.append((time.time(), db.stats()["pool"]["size"]))
            ticks += 1
            if ticks % 4 == 0:
                _write_status(db, args)
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        db.fetchval("SELECT 1", timeout=args["deadline"])
        result["first_row"] = result["last_row"] = time.time()
        # At least a few samples after the first row, however late it came.
        stop_at = max(args["stop_at"], result["first_row"] + 3 * args["interval"])
        while time.time() < stop_at:
            try:
                db.fetchval("SELECT 1 FROM pg_sleep(0.01)", timeout=args["deadline"])
                _row(result)
            except Exception as exc:
                result["failures"].append(type(exc).__name__)
            time.sleep(0.02)
    except Exception as exc:
        result["failures"].append(type(exc).__name__)
    finally:
        done.set()
        watcher.join()
        stats = db.stats()
        result["fleet"] = stats.get("fleet")
        result["overloads"] = stats["counters"]["overload_events"]
        db.close()


if __name__ == "__main__":
    main()
