"""What a deadline costs: reads and writes with and without one, against psycopg_pool.

For each path (direct to PostgreSQL over loopback; the same with a 0.5 ms round trip added
by the fault proxy, as to a database in the same zone; through PgBouncer in transaction
mode; direct to a second server that flushes the WAL at every commit) and each shell
(sync, async), one warm handle runs, alternately in the same rounds:

- ``read``: ``fetchval(SELECT)`` without a deadline, and with one (``timeout=5``);
- ``write``: ``execute(INSERT)`` without a deadline, and with one;
- ``write with a parameter``: ``execute(INSERT ... %s, (1,))``, the same two ways;
- psycopg_pool's best equivalent of each (``with pool.connection() as conn:
  conn.execute(...)``, autocommit), for scale.

The throwaway server runs with ``fsync=off``: a COMMIT flushes nothing, so a write whose
outcome is knowable (two round trips) shows as about twice a plain one (one round trip).
A managed server flushes the WAL at each commit; the "durable commit" path is a second
throwaway server with PostgreSQL's durable defaults (``fsync``, ``synchronous_commit``
and ``full_page_writes`` on, ``wal_sync_method`` left alone, ``wal_level=replica``). Each
server's settings are read back with ``SHOW`` and the text says which rows flush. Its data
directory must be on a disk: ``pgwarden.testing`` puts servers in ``/dev/shm`` (RAM, where
a flush is free) when it can, so this one goes under ``--durable-dir`` (default: the
system's temporary directory), and the run stops if that is a RAM file system.

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
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
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
#: The same write with a parameter, as applications send it: no longer one simple-query
#: message under a deadline, but the extended protocol in a pipeline.
WRITE_PARAMS = "INSERT INTO bench_deadline (v) VALUES (%s)"

DURABLE_PATH = "direct, durable commit (fsync=on)"
#: Over the throwaway server's defaults (fsync and full_page_writes off, wal_level minimal):
#: what PostgreSQL itself defaults to, so each commit waits for its WAL flush.
DURABLE_SETTINGS: dict[str, object] = {
    "fsync": True,
    "synchronous_commit": True,
    "full_page_writes": True,
    "wal_level": "replica",
}
COMMIT_SETTINGS = ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")

# (name, target): the bars, checked in the rendered table, row by row.
TARGETS = {
    "read_ratio": 1.15,  # read with a deadline / the same read without
    "write_ratio": 1.30,  # write with a deadline / the same write without
    "write_params_ratio": 1.30,  # the same, the write with a parameter
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
            "write_params": lambda: db.execute(WRITE_PARAMS, (1,)),
            "write_params_deadline": lambda: db.execute(WRITE_PARAMS, (1,), timeout=5.0),
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
                "write_params": lambda: db.execute(WRITE_PARAMS, (1,)),
                "write_params_deadline": lambda: db.execute(WRITE_PARAMS, (1,), timeout=5.0),
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
    out["write_params_ratio"] = costs["write_params_deadline"] / costs["write_params"]
    out["read_deadline_vs_pool"] = costs["read_deadline"] / costs["read_pool"]
    out["write_deadline_vs_pool"] = costs["write_deadline"] / costs["write_pool"]
    return out


def commit_settings(url: str) -> dict[str, str]:
    """The server's settings that decide what a COMMIT waits for, read with ``SHOW``."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        out: dict[str, str] = {}
        for name in COMMIT_SETTINGS:
            row = conn.execute(f"SHOW {name}").fetchone()
            out[name] = "?" if row is None else str(row[0])
    return out


RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def storage_of(path: Path) -> str:
    """``"<fstype> on <device>"`` of the mount holding *path* ("unknown" off Linux)."""
    best, found = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return found
    target = str(path.resolve())
    for fields in mounts:
        if len(fields) < 3:
            continue
        device, point, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, found = point, f"{fstype} on {device}"
    return found


def flushes_at_commit(settings: dict[str, str]) -> bool:
    """Whether a COMMIT waits for its WAL to reach a disk (no standbys here: every
    ``synchronous_commit`` but ``off`` waits for the local flush; on a RAM file system
    the flush is a no-op)."""
    in_ram = settings.get("data directory", "").startswith(RAM_FILESYSTEMS)
    return (
        settings.get("fsync") == "on" and settings.get("synchronous_commit") != "off" and not in_ram
    )


@contextmanager
def scratch_under(directory: str) -> Iterator[None]:
    """Make ``pgwarden.testing`` put the servers started inside under *directory*."""
    old = os.environ.get("PGWARDEN_TEST_TMPDIR")
    os.environ["PGWARDEN_TEST_TMPDIR"] = directory
    try:
        yield
    finally:
        if old is None:
            del os.environ["PGWARDEN_TEST_TMPDIR"]
        else:
            os.environ["PGWARDEN_TEST_TMPDIR"] = old


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


def _row_path(name: str) -> str:
    return name.split(", ", 1)[1]  # "sync, direct, ..." -> "direct, ..."


def _verdict(results: dict[str, dict[str, float]], key: str, what: str) -> list[str]:
    met = [n for n, r in results.items() if r[key] <= TARGETS[key]]
    missed = [n for n, r in results.items() if r[key] > TARGETS[key]]
    return [
        f"- {what} <= {TARGETS[key]} met in: " + ("; ".join(met) if met else "no row") + ".",
        "  Not met in: " + ("; ".join(missed) if missed else "no row") + ".",
    ]


def render(
    results: dict[str, dict[str, float]],
    machine: str,
    versions: str,
    quick: bool,
    commits: dict[str, dict[str, str]],
) -> str:
    """*commits*: each path's :func:`commit_settings`."""
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
        f"psycopg_pool) | write ratio (target <= {TARGETS['write_ratio']}) | write with a "
        "parameter µs (no deadline / deadline) | its ratio "
        f"(target <= {TARGETS['write_params_ratio']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['read']:.1f} / {r['read_deadline']:.1f} / {r['read_pool']:.1f} "
            f"| {r['read_ratio']:.3f} | {r['write']:.1f} / {r['write_deadline']:.1f} / "
            f"{r['write_pool']:.1f} | {r['write_ratio']:.3f} | {r['write_params']:.1f} / "
            f"{r['write_params_deadline']:.1f} | {r['write_params_ratio']:.3f} |"
        )
    lines += [
        "",
        "- **read**: `fetchval('SELECT 1')`; with a deadline, `timeout=5`.",
        "- **write**: `execute('INSERT ...')` into a one-column table; with a deadline the",
        "  outcome is knowable (a lost COMMIT is resolved by transaction id): two round",
        "  trips (`BEGIN` + marker + statement, then `COMMIT`) against one, and one commit",
        "  either way.",
        "- **write with a parameter**: `execute('INSERT ... %s', (1,))`; with a deadline",
        "  BEGIN, the marker and the statement go in one pipelined write (the extended",
        "  protocol), then `COMMIT`.",
        "- psycopg_pool: `with pool.connection() as conn: conn.execute(...)`, autocommit.",
    ]

    def shown(path: str) -> str:
        return ", ".join(f"{k}={v}" for k, v in commits[path].items())

    flushing = [n for n in results if flushes_at_commit(commits[_row_path(n)])]
    not_flushing = [n for n in results if not flushes_at_commit(commits[_row_path(n)])]
    lines += [
        "- **Flush at commit** (each commit waits for its WAL to reach a disk, as on a",
        "  managed server): " + ("; ".join(flushing) if flushing else "no row") + ".",
        "- **No flush** (`fsync=off`, or the data directory in RAM: a COMMIT costs its round",
        "  trip and no I/O, so a knowable write, two round trips against one, shows close to",
        "  2x): " + ("; ".join(not_flushing) if not_flushing else "no row") + ".",
        "- Each path's server, as read back from it:",
    ]
    for path in dict.fromkeys(_row_path(n) for n in results):
        lines.append(f"  - {path}: {shown(path)}")
    lines.append("- The targets apply to each row on its own (its two figures, one round set).")
    lines += _verdict(results, "read_ratio", "Read ratio")
    lines += _verdict(results, "write_ratio", "Write ratio")
    lines += _verdict(results, "write_params_ratio", "Write-with-a-parameter ratio")
    lines.append("")
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
    parser.add_argument(
        "--no-durable", action="store_true", help="skip the server that flushes at commit"
    )
    parser.add_argument(
        "--durable-dir",
        default=tempfile.gettempdir(),
        help="directory on a disk for the server that flushes at commit (default: %(default)s)",
    )
    parser.add_argument("--write", metavar="FILE", help="put the section into FILE")
    args = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    n = args.n if args.n is not None else (QUICK_N if args.quick else N)
    from importlib.metadata import version

    with ExitStack() as stack:
        urls: dict[str, str] = {}
        storage: dict[str, str] = {}  # path -> where its server's data directory is
        versions = f"psycopg {version('psycopg')}, psycopg_pool {version('psycopg-pool')}"
        if args.url:
            urls["direct"] = args.url
        else:
            from pgwarden.testing import PgBouncerServer, PostgresServer

            print("starting a throwaway PostgreSQL...", file=sys.stderr)
            server = stack.enter_context(PostgresServer())
            urls["direct"] = server.url
            storage["direct"] = storage_of(server.data_dir)
            versions += f", PostgreSQL {server.version}"
            if not args.no_latency:
                # Loopback makes a round trip cost about as much client CPU as a whole
                # statement; a managed database is a network hop away. The fault proxy
                # (a thread in this process) delays each direction by LATENCY.
                from pgwarden.testing import FaultProxy

                proxy = stack.enter_context(FaultProxy(server.host, server.port))
                proxy.set_latency(LATENCY)
                latency_path = f"direct, +{LATENCY * 2e3:.1f} ms round trip"
                urls[latency_path] = proxy.url_for(server.url)
                storage[latency_path] = storage["direct"]
            if not args.no_pgbouncer:
                bouncer = stack.enter_context(PgBouncerServer(server, default_pool_size=4))
                urls["PgBouncer (transaction mode)"] = bouncer.url
                storage["PgBouncer (transaction mode)"] = storage["direct"]
                versions += f", PgBouncer {bouncer.version}"
            if not args.no_durable:
                # A second throwaway server (same binaries, same start path) whose commits
                # wait for the WAL flush, with its data directory on a disk.
                where = storage_of(Path(args.durable_dir))
                if where.startswith(RAM_FILESYSTEMS):
                    raise SystemExit(
                        f"--durable-dir {args.durable_dir} is on {where}, where a flush is "
                        "free: give a directory on a disk (or --no-durable)"
                    )
                print("starting a throwaway PostgreSQL that flushes at commit...", file=sys.stderr)
                with scratch_under(args.durable_dir):
                    durable = stack.enter_context(PostgresServer(DURABLE_SETTINGS))
                urls[DURABLE_PATH] = durable.url
                storage[DURABLE_PATH] = storage_of(durable.data_dir)
        commits = {path: commit_settings(url) for path, url in urls.items()}
        for path, where in storage.items():
            commits[path]["data directory"] = where
        if DURABLE_PATH in commits and not flushes_at_commit(commits[DURABLE_PATH]):
            raise SystemExit(f"the durable server does not flush at commit: {commits}")
        results = run_all(urls, n, rounds)
    text = render(results, machine(), versions, args.quick, commits)
    print(text)
    if args.write:
        write_section(Path(args.write), text)
        print(f"wrote the section to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
