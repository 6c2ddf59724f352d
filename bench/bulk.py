"""Bulk work: COPY in, pipelined executemany and streaming, against the bare drivers.

One warm pgwarden handle and one bare psycopg connection (asyncpg too, when it is
installed) on the same throwaway server run each variant alternately, in reversed
order every other round:

- ``copy_in``: 100,000 rows (int, text, float8) into an UNLOGGED table;
  ``db.copy_in(table, rows)`` against psycopg's ``cursor.copy()`` + ``write_row``
  in a transaction (and asyncpg's ``copy_records_to_table``);
- ``executemany``: 10,000 INSERTs; ``db.executemany`` against psycopg's
  ``cursor.executemany`` in a transaction (pipelined by psycopg itself) and
  asyncpg's ``executemany``;
- ``stream``: 200,000 rows in batches of 2,000; ``db.stream`` against a bare
  psycopg server-side cursor (``itersize`` 2,000, dict rows like pgwarden's) in a
  transaction, and asyncpg's ``cursor(prefetch=2000)``.

Both shells (sync, async) run. Each time is the median over rounds; a ratio is
the median over rounds of pgwarden's time divided by the peer's in that round. Usage::

    python bench/bulk.py [--quick] [--url URL] [--write docs/benchmarks.md]

``--write`` replaces the section "Bulk: COPY, executemany, streaming" in FILE (or
appends it).
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
from psycopg.rows import dict_row

import pgwarden
from pgwarden import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import put_section

SECTION = "## Bulk: COPY, executemany, streaming"
ROUNDS = 11
QUICK_ROUNDS = 3
COPY_ROWS = 100_000
MANY_ROWS = 10_000
STREAM_ROWS = 200_000
FETCH = 2000
TABLE = "bench_bulk"
INSERT = f"INSERT INTO {TABLE} (id, note, x) VALUES (%s, %s, %s)"
COPY = f"COPY {TABLE} (id, note, x) FROM STDIN"
STREAM = "SELECT g AS id, 'row ' || g AS note, g * 0.5 AS x FROM generate_series(1, %s) g"

# The bars: pgwarden / the peer, same run.
TARGETS = {"copy_in": 1.05, "executemany": 1.10, "stream": 1.10}

try:
    import asyncpg  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:  # optional: the bench says so and skips its columns
    asyncpg = None


def rows(n: int) -> list[tuple[int, str, float]]:
    return [(i, f"row {i}", i * 0.5) for i in range(n)]


def _summary(samples: dict[str, list[float]]) -> dict[str, float]:
    """Each variant's median time, and ``vs_<peer>``: the median over rounds of
    pgwarden's time divided by the peer's in the same round (a paired ratio, which
    drift on a shared machine moves less than a ratio of medians)."""
    out = {name: statistics.median(times) for name, times in samples.items()}
    ours = samples["pgwarden"]
    for peer, times in samples.items():
        if peer != "pgwarden":
            out[f"vs_{peer}"] = statistics.median(a / b for a, b in zip(ours, times, strict=True))
    return out


def _timed_rounds(
    variants: dict[str, Callable[[], Any]], before: Callable[[], Any], rounds: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            before()
            started = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - started)
    return _summary(samples)


async def _atimed_rounds(
    variants: dict[str, Callable[[], Awaitable[Any]]],
    before: Callable[[], Awaitable[Any]],
    rounds: int,
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            await before()
            started = time.perf_counter()
            await variants[name]()
            samples[name].append(time.perf_counter() - started)
    return _summary(samples)


def sync_costs(url: str, rounds: int, scale: float) -> dict[str, dict[str, float]]:
    copy_rows, many_rows = rows(int(COPY_ROWS * scale)), rows(int(MANY_ROWS * scale))
    stream_n = int(STREAM_ROWS * scale)
    out: dict[str, dict[str, float]] = {}
    with (
        pgwarden.Database(Settings(url=url, default_timeout=600)) as db,
        psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn,
    ):
        db.fetchval("SELECT 1")

        def truncate() -> None:
            conn.execute(f"TRUNCATE {TABLE}")

        def psycopg_copy() -> None:
            with conn.transaction(), conn.cursor() as cur, cur.copy(COPY) as copy:
                for row in copy_rows:
                    copy.write_row(row)

        out["copy_in"] = _timed_rounds(
            {"pgwarden": lambda: db.copy_in(TABLE, copy_rows), "psycopg": psycopg_copy},
            truncate,
            rounds,
        )

        def psycopg_many() -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(INSERT, many_rows)

        out["executemany"] = _timed_rounds(
            {"pgwarden": lambda: db.executemany(INSERT, many_rows), "psycopg": psycopg_many},
            truncate,
            rounds,
        )

        def pgwarden_stream() -> None:
            for _ in db.stream(STREAM, (stream_n,), fetch_size=FETCH):
                pass

        def psycopg_stream() -> None:
            with conn.transaction(), conn.cursor("bench_bare") as cur:
                cur.itersize = FETCH
                cur.execute(STREAM, (stream_n,))
                for _ in cur:
                    pass

        out["stream"] = _timed_rounds(
            {"pgwarden": pgwarden_stream, "psycopg": psycopg_stream}, lambda: None, rounds
        )
    return out


def async_costs(url: str, rounds: int, scale: float) -> dict[str, dict[str, float]]:
    copy_rows, many_rows = rows(int(COPY_ROWS * scale)), rows(int(MANY_ROWS * scale))
    stream_n = int(STREAM_ROWS * scale)

    async def main() -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        peer = None
        async with (
            pgwarden.AsyncDatabase(Settings(url=url, default_timeout=600)) as db,
            await psycopg.AsyncConnection.connect(
                url, autocommit=True, row_factory=dict_row
            ) as conn,
        ):
            await db.fetchval("SELECT 1")
            if asyncpg is not None:
                peer = await asyncpg.connect(url)
            try:

                async def truncate() -> None:
                    await conn.execute(f"TRUNCATE {TABLE}")

                async def nothing() -> None:
                    return None

                async def pgwarden_copy() -> None:
                    await db.copy_in(TABLE, copy_rows)

                async def psycopg_copy() -> None:
                    async with conn.transaction(), conn.cursor() as cur, cur.copy(COPY) as copy:
                        for row in copy_rows:
                            await copy.write_row(row)

                copies: dict[str, Callable[[], Awaitable[Any]]] = {
                    "pgwarden": pgwarden_copy,
                    "psycopg": psycopg_copy,
                }
                if peer is not None:

                    async def asyncpg_copy() -> None:
                        await peer.copy_records_to_table(
                            TABLE, records=copy_rows, columns=["id", "note", "x"]
                        )

                    copies["asyncpg"] = asyncpg_copy
                out["copy_in"] = await _atimed_rounds(copies, truncate, rounds)

                async def pgwarden_many() -> None:
                    await db.executemany(INSERT, many_rows)

                async def psycopg_many() -> None:
                    async with conn.transaction(), conn.cursor() as cur:
                        await cur.executemany(INSERT, many_rows)

                manies: dict[str, Callable[[], Awaitable[Any]]] = {
                    "pgwarden": pgwarden_many,
                    "psycopg": psycopg_many,
                }
                if peer is not None:
                    native = INSERT.replace("%s", "$1", 1).replace("%s", "$2", 1)
                    native = native.replace("%s", "$3", 1)

                    async def asyncpg_many() -> None:
                        async with peer.transaction():
                            await peer.executemany(native, many_rows)

                    manies["asyncpg"] = asyncpg_many
                out["executemany"] = await _atimed_rounds(manies, truncate, rounds)

                async def pgwarden_stream() -> None:
                    async for _ in db.stream(STREAM, (stream_n,), fetch_size=FETCH):
                        pass

                async def psycopg_stream() -> None:
                    async with conn.transaction(), conn.cursor("bench_bare") as cur:
                        cur.itersize = FETCH
                        await cur.execute(STREAM, (stream_n,))
                        async for _ in cur:
                            pass

                streams: dict[str, Callable[[], Awaitable[Any]]] = {
                    "pgwarden": pgwarden_stream,
                    "psycopg": psycopg_stream,
                }
                if peer is not None:
                    native_stream = STREAM.replace("%s", "$1")

                    async def asyncpg_stream() -> None:
                        async with peer.transaction():
                            async for _ in peer.cursor(native_stream, stream_n, prefetch=FETCH):
                                pass

                    streams["asyncpg"] = asyncpg_stream
                out["stream"] = await _atimed_rounds(streams, nothing, rounds)
            finally:
                if peer is not None:
                    await peer.close()
        return out

    return asyncio.run(main())


def render(
    results: dict[str, dict[str, dict[str, float]]], versions: str, quick: bool, scale: float
) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Generated by `bench/bulk.py` ({'QUICK, noisier; ' if quick else ''}median of "
        f"{QUICK_ROUNDS if quick else ROUNDS} alternated rounds; ratio: the median of "
        "pgwarden / peer per round).",
        f"- machine: {machine()}",
        f"- {versions}",
        f"- date: {stamp}",
        "",
        "| shell | work | pgwarden ms | psycopg ms | ratio vs psycopg (target) "
        "| asyncpg ms | ratio vs asyncpg |",
        "|---|---|---|---|---|---|---|",
    ]
    for shell, works in results.items():
        for work, t in works.items():
            ours, theirs = t["pgwarden"], t["psycopg"]
            apg, vs_apg = t.get("asyncpg"), t.get("vs_asyncpg")
            lines.append(
                f"| {shell} | {work} | {ours * 1e3:.1f} | {theirs * 1e3:.1f} "
                f"| {t['vs_psycopg']:.3f} (<= {TARGETS[work]}) "
                f"| {'-' if apg is None else f'{apg * 1e3:.1f}'} "
                f"| {'-' if vs_apg is None else f'{vs_apg:.3f}'} |"
            )
    lines += [
        "",
        f"- **copy_in**: {int(COPY_ROWS * scale):,} rows (int, text, float8); psycopg: "
        "`cursor.copy()` with `write_row` in a transaction; asyncpg: "
        "`copy_records_to_table` (binary).",
        f"- **executemany**: {int(MANY_ROWS * scale):,} INSERTs in one transaction; psycopg's "
        "`cursor.executemany` pipelines by itself (libpq >= 14), and pgwarden's runs it.",
        f"- **stream**: {int(STREAM_ROWS * scale):,} rows, {FETCH:,} per FETCH; psycopg: a bare "
        "server-side cursor with dict rows in a transaction; asyncpg: `cursor(prefetch=)`.",
        "",
    ]
    if asyncpg is None:
        lines.insert(-1, "- asyncpg is not installed: its columns were skipped.")
    return "\n".join(lines)


def machine() -> str:
    import os
    import platform

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a tenth the rows")
    parser.add_argument("--write", metavar="FILE", help="put the section into FILE")
    args = parser.parse_args(argv)
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    scale = 0.1 if args.quick else 1.0
    if asyncpg is None:
        print("asyncpg is not installed: skipping its comparisons", file=sys.stderr)
    from importlib.metadata import version

    versions = f"psycopg {version('psycopg')}"
    if asyncpg is not None:
        versions += f", asyncpg {asyncpg.__version__}"
    with ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            from pgwarden.testing import PostgresServer

            print("starting a throwaway PostgreSQL...", file=sys.stderr)
            server = stack.enter_context(PostgresServer())
            url = server.url
            versions += f", PostgreSQL {server.version}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(f"CREATE UNLOGGED TABLE {TABLE} (id int, note text, x float8)")
        results: dict[str, dict[str, dict[str, float]]] = {}
        for shell, fn in (("sync", sync_costs), ("async", async_costs)):
            print(f"running: {shell}...", file=sys.stderr, flush=True)
            results[shell] = fn(url, rounds, scale)
            for work, t in results[shell].items():
                ratios = ", ".join(
                    f"{key.replace('_', ' ')} {v:.3f}" for key, v in t.items() if key[:3] == "vs_"
                )
                print(f"  {work}: {ratios}", file=sys.stderr, flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {TABLE}")
    text = render(results, versions, args.quick, scale)
    print(text)
    if args.write:
        put_section(Path(args.write), text)
        print(f"wrote the section to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
