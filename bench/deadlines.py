"""What a deadline costs: reads and writes with and without one, against psycopg_pool.

For each path (direct to PostgreSQL over loopback; the same with a 0.5 ms round trip added
by the fault proxy, as to a database in the same zone; through PgBouncer in transaction
mode) and each shell (sync, async), one warm handle runs, alternately in the same rounds:

- ``read``: ``fetchval(SELECT)`` without a deadline, and with one (``timeout=5``);
- ``write``: ``execute(INSERT)`` without a deadline, and with one;
- psycopg_pool's best equivalent of each (``with pool.connection() as conn:
  conn.execute(...)``, autocommit), for scale.

Each figure is the median over rounds of the mean per-call time in a round; a ratio
compares two figures of the same round set. Usage::

    python bench/deadlines.py [--quick] [--write docs/benchmarks.md]

``--write`` puts the section "Deadlines: what they cost" into FILE: it replaces that
section if FILE has it (keeping the old table under "Previous run") and appends it
otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

import pgwarden
from pgwarden import Settings

SECTION = "## Deadlines: what they cost"
ROUNDS = 7
QUICK_ROUNDS = 3
N = 1000
QUICK_N = 200
READ = "SELECT 1"
LATENCY = 0.00025  # seconds each way on the latency path: a 0.5 ms round trip
WRITE = "INSERT INTO bench_deadline (v) VALUES (1)"

# (name, target): the bars, checked in the rendered table.
TARGETS = {
    "read_ratio": 1.15,  # read with a deadline / the same read without
    "write_ratio": 1.30,  # write with a deadline / the same write without
}


def _kwargs(pooled: bool) -> dict[str, Any]:
    # Behind a transaction pooler, psycopg's server-side prepared statements would
    # land on other server connections (PgBouncer < 1.21): psycopg's own advice.
    return {"autocommit": True, "prepare_threshold": None} if pooled else {"autocommit": True}


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def sync_costs(url: str, n: int, rounds: int, pooled: bool) -> dict[str, float]:
    """Per-call µs of each sync variant, alternated over *rounds*."""
    with ExitStack() as stack:
        db = stack.enter_context(
            pgwarden.Database(Settings(url=url, max_size=2, application_name="bench-deadline"))
        )
        pool = stack.enter_context(
            ConnectionPool(url, min_size=1, max_size=2, kwargs=_kwargs(pooled), open=True)
        )
        pool.wait()
        db.ready()

        def pool_read() -> None:
            with pool.connection() as conn:
                conn.execute(READ).fetchone()

        def pool_write() -> None:
            with pool.connection() as conn:
                conn.execute(WRITE)

        variants: dict[str, Callable[[], object]] = {
            "read_pool": pool_read,
            "read": lambda: db.fetchval(READ),
            "read_deadline": lambda: db.fetchval(READ, timeout=5.0),
            "write_pool": pool_write,
            "write": lambda: db.execute(WRITE),
            "write_deadline": lambda: db.execute(WRITE, timeout=5.0),
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(rounds):
            # Alternate the order each round so drift does not favour one side.
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                fn = variants[name]
                for _ in range(n // 10):  # warm this variant's path
                    fn()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    return _medians(samples)


def async_costs(url: str, n: int, rounds: int, pooled: bool) -> dict[str, float]:
    """Per-call µs of each async variant, alternated over *rounds*."""

    async def main() -> dict[str, float]:
        db = pgwarden.AsyncDatabase(
            Settings(url=url, max_size=2, application_name="bench-deadline-async")
        )
        pool = AsyncConnectionPool(url, min_size=1, max_size=2, kwargs=_kwargs(pooled), open=False)
        await pool.open(wait=True)
        try:
            await db.ready()

            async def pool_read() -> None:
                async with pool.connection() as conn:
                    await (await conn.execute(READ)).fetchone()

            async def pool_write() -> None:
                async with pool.connection() as conn:
                    await conn.execute(WRITE)

            variants: dict[str, Callable[[], Awaitable[object]]] = {
                "read_pool": pool_read,
                "read": lambda: db.fetchval(READ),
                "read_deadline": lambda: db.fetchval(READ, timeout=5.0),
                "write_pool": pool_write,
                "write": lambda: db.execute(WRITE),
                "write_deadline": lambda: db.execute(WRITE, timeout=5.0),
            }
            samples: dict[str, list[float]] = {k: [] for k in variants}
            for r in range(rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    fn = variants[name]
                    for _ in range(n // 10):
                        await fn()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        await fn()
                    samples[name].append((time.perf_counter() - t0) / n)
            return _medians(samples)
        finally:
            await pool.close()
            await db.close()

    return asyncio.run(main())


def with_ratios(costs: dict[str, float]) -> dict[str, float]:
    out = dict(costs)
    out["read_ratio"] = costs["read_deadline"] / costs["read"]
    out["write_ratio"] = costs["write_deadline"] / costs["write"]
    out["read_deadline_vs_pool"] = costs["read_deadline"] / costs["read_pool"]
    out["write_deadline_vs_pool"] = costs["write_deadline"] / costs["write_pool"]
    return out


def run_all(urls: dict[str, str], n: int, rounds: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for path, url in urls.items():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_deadline (v int)")
        for shell, fn in (("sync", sync_costs), ("async", async_costs)):
            name = f"{shell}, {path}"
            print(f"running: {name}...", file=sys.stderr, flush=True)
            results[name] = with_ratios(fn(url, n, rounds, path.startswith("PgBouncer")))
            print("  " + format_row(results[name]), file=sys.stderr, flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE bench_deadline")
    return results


def format_row(r: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in r.items())


def render(results: dict[str, dict[str, float]], machine: str, versions: str, quick: bool) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Generated by `bench/deadlines.py` ({'QUICK, noisier; ' if quick else ''}"
        f"median of {QUICK_ROUNDS if quick else ROUNDS} alternated rounds).",
        f"- machine: {machine}",
        f"- {versions}",
        f"- date: {stamp}",
        "",
        "| path | read µs (no deadline / deadline / psycopg_pool) | read ratio "
        f"(target <= {TARGETS['read_ratio']}) | write µs (no deadline / deadline / "
        f"psycopg_pool) | write ratio (target <= {TARGETS['write_ratio']}) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['read']:.1f} / {r['read_deadline']:.1f} / {r['read_pool']:.1f} "
            f"| {r['read_ratio']:.3f} | {r['write']:.1f} / {r['write_deadline']:.1f} / "
            f"{r['write_pool']:.1f} | {r['write_ratio']:.3f} |"
        )
    lines += [
        "",
        "- **read**: `fetchval('SELECT 1')`; with a deadline, `timeout=5`.",
        "- **write**: `execute('INSERT ...')` into a one-column table; with a deadline the",
        "  outcome is knowable (a lost COMMIT is resolved by transaction id).",
        "- psycopg_pool: `with pool.connection() as conn: conn.execute(...)`, autocommit.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this section in *path* (up to the next ``## `` heading), keeping the
    replaced table under a "Previous run" heading; or append the section."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + section
    else:
        end = old.find("\n## ", start + len(SECTION))
        previous = old[start : end if end >= 0 else len(old)]
        tail = old[end + 1 :] if end >= 0 else ""
        # Keep only the latest run's table as "previous": drop an older carried one.
        previous = previous.split("\n### Previous run\n")[0]
        previous_body = previous[len(SECTION) :].strip("\n")
        carried = f"\n### Previous run\n\n{previous_body}\n"
        new = old[:start] + section + carried + ("\n" + tail if tail else "")
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--n", type=int, default=None, help="calls per variant per round")
    parser.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer path")
    parser.add_argument(
        "--no-latency", action="store_true", help="skip the path with network latency"
    )
    parser.add_argument("--write", metavar="FILE", help="put the section into FILE")
    args = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    n = args.n if args.n is not None else (QUICK_N if args.quick else N)
    from importlib.metadata import version

    with ExitStack() as stack:
        urls: dict[str, str] = {}
        versions = f"psycopg {version('psycopg')}, psycopg_pool {version('psycopg-pool')}"
        if args.url:
            urls["direct"] = args.url
        else:
            from pgwarden.testing import PgBouncerServer, PostgresServer

            print("starting a throwaway PostgreSQL...", file=sys.stderr)
            server = stack.enter_context(PostgresServer())
            urls["direct"] = server.url
            versions += f", PostgreSQL {server.version}"
            if not args.no_latency:
                # Loopback makes a round trip cost about as much client CPU as a whole
                # statement; a managed database is a network hop away. The fault proxy
                # (a thread in this process) delays each direction by LATENCY.
                from pgwarden.testing import FaultProxy

                proxy = stack.enter_context(FaultProxy(server.host, server.port))
                proxy.set_latency(LATENCY)
                urls[f"direct, +{LATENCY * 2e3:.1f} ms round trip"] = proxy.url_for(server.url)
            if not args.no_pgbouncer:
                bouncer = stack.enter_context(PgBouncerServer(server, default_pool_size=4))
                urls["PgBouncer (transaction mode)"] = bouncer.url
                versions += f", PgBouncer {bouncer.version}"
        results = run_all(urls, n, rounds)
    text = render(results, machine(), versions, args.quick)
    print(text)
    if args.write:
        write_section(Path(args.write), text)
        print(f"wrote the section to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
