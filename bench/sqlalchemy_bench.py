"""SQLAlchemy on pgwarden's dialect against SQLAlchemy's QueuePool, measured in the same run.

Three engines on one throwaway PostgreSQL (pgwarden.testing) unless --url is given:

* ``pgwarden``: ``create_engine("postgresql+pgwarden://...")``, connections from pgwarden's
  shared handle, every setting its default;
* ``queuepool``: ``create_engine("postgresql+psycopg://...")``, SQLAlchemy's default
  QueuePool (``pool_size=5``, ``max_overflow=10``), no pre-ping;
* ``queuepool_pre_ping``: the same with ``pool_pre_ping=True`` (a round trip per checkout,
  what SQLAlchemy recommends against stale connections).

Three operations, each one caller in a loop, pool already warm:

* **checkout**: ``engine.raw_connection().close()`` (async: ``engine.connect()`` and
  ``get_raw_connection()``), a checkout and its return with nothing sent;
* **core**: ``with engine.connect() as conn: conn.execute(text("SELECT 1")).scalar_one()``;
* **orm**: ``with Session(engine) as session: session.get(Item, 1)`` (a new session each
  time, so the identity map never answers: one primary-key SELECT).

Both with a sync engine and with ``create_async_engine`` (``AsyncSession``). Every round
times each engine for ``--n`` operations, in an order that rotates from round to round
(so no engine always runs first or last); the figures are medians over the rounds, and the
ratios are pgwarden's median over each QueuePool median.

Below the table, what one checkout costs pgwarden itself: the handle's ``checkout()`` +
``release()`` (what the dialect does per SQLAlchemy checkout) against psycopg_pool's
``getconn()`` + ``putconn()`` on a pool of its own, timed alternately in the same way.

    python bench/sqlalchemy_bench.py                      # print the table
    python bench/sqlalchemy_bench.py --quick              # fewer rounds and operations
    python bench/sqlalchemy_bench.py --write docs/benchmarks.md

``--write`` puts the section "SQLAlchemy dialect vs QueuePool" into FILE: it replaces that
section if FILE has it and appends it otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import psycopg
import sqlalchemy
from sqlalchemy import Integer, Text, create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

# Rounds of each measurement; --quick lowers it (main() sets it once). Many short rounds
# rather than a few long ones: on a shared machine a burst of load then lands on one
# short round of every engine alike, and the median leaves it out.
ROUNDS = 15
QUICK_ROUNDS = 3
N = 1000
QUICK_N = 200

ENGINES = ("pgwarden", "queuepool", "queuepool_pre_ping")
SECTION = "## SQLAlchemy dialect vs QueuePool"
TABLE = "pgwarden_bench_items"
SELECT_ONE = text("SELECT 1")

TARGETS = {
    "vs_queuepool": "<= 1.00 (no slower than QueuePool without pre-ping)",
    "vs_pre_ping": "< 1.00 (faster than QueuePool with pre-ping)",
}


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)


def _url(url: str, driver: str) -> URL:
    return make_url(url).set(drivername=f"postgresql+{driver}")


def sync_engines(url: str) -> dict[str, Engine]:
    return {
        "pgwarden": create_engine(_url(url, "pgwarden")),
        "queuepool": create_engine(_url(url, "psycopg")),
        "queuepool_pre_ping": create_engine(_url(url, "psycopg"), pool_pre_ping=True),
    }


def async_engines(url: str) -> dict[str, AsyncEngine]:
    return {
        "pgwarden": create_async_engine(_url(url, "pgwarden")),
        "queuepool": create_async_engine(_url(url, "psycopg")),
        "queuepool_pre_ping": create_async_engine(_url(url, "psycopg"), pool_pre_ping=True),
    }


def _order(round_no: int) -> list[str]:
    """The engines, rotated by one place every round."""
    k = round_no % len(ENGINES)
    return [*ENGINES[k:], *ENGINES[:k]]


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians (µs per operation), their ratios, and the range of the per-round ratios
    (each round's pgwarden time over the same round's QueuePool time: how much the
    machine's noise moves a ratio)."""
    med = {name: statistics.median(values) for name, values in times.items()}
    ours = times["pgwarden"]
    plain = [a / b for a, b in zip(ours, times["queuepool"], strict=True)]
    ping = [a / b for a, b in zip(ours, times["queuepool_pre_ping"], strict=True)]
    return {
        "pgwarden_us": med["pgwarden"] * 1e6,
        "queuepool_us": med["queuepool"] * 1e6,
        "queuepool_pre_ping_us": med["queuepool_pre_ping"] * 1e6,
        "vs_queuepool": med["pgwarden"] / med["queuepool"],
        "vs_pre_ping": med["pgwarden"] / med["queuepool_pre_ping"],
        "vs_queuepool_min": min(plain),
        "vs_queuepool_max": max(plain),
        "vs_pre_ping_min": min(ping),
        "vs_pre_ping_max": max(ping),
    }


def _cpu_summary(cpu: dict[str, list[float]]) -> dict[str, float]:
    """The same for this process's CPU time (``time.thread_time``): what the client side
    costs, which a loaded machine inflates less than the wall clock (the server's work
    and the time spent descheduled are not in it)."""
    med = {name: statistics.median(values) for name, values in cpu.items()}
    plain = [a / b for a, b in zip(cpu["pgwarden"], cpu["queuepool"], strict=True)]
    return {
        "cpu_pgwarden_us": med["pgwarden"] * 1e6,
        "cpu_queuepool_us": med["queuepool"] * 1e6,
        "cpu_vs_queuepool": med["pgwarden"] / med["queuepool"],
        "cpu_vs_queuepool_min": min(plain),
        "cpu_vs_queuepool_max": max(plain),
    }


def measure_sync(engines: dict[str, Engine], n: int) -> dict[str, dict[str, float]]:
    def checkout(engine: Engine) -> None:
        engine.raw_connection().close()

    def core(engine: Engine) -> None:
        with engine.connect() as conn:
            conn.execute(SELECT_ONE).scalar_one()

    def orm(engine: Engine) -> None:
        with Session(engine) as session:
            item = session.get(Item, 1)
            assert item is not None

    out: dict[str, dict[str, float]] = {}
    for name, op in (("checkout", checkout), ("core", core), ("orm", orm)):
        for engine in engines.values():  # warm: the pool, the statement caches
            for _ in range(50):
                op(engine)
        times: dict[str, list[float]] = {e: [] for e in ENGINES}
        cpu: dict[str, list[float]] = {e: [] for e in ENGINES}
        for round_no in range(ROUNDS):
            for e in _order(round_no):
                engine = engines[e]
                c0 = time.thread_time()
                t0 = time.perf_counter()
                for _ in range(n):
                    op(engine)
                times[e].append((time.perf_counter() - t0) / n)
                cpu[e].append((time.thread_time() - c0) / n)
        out[name] = _summary(times) | _cpu_summary(cpu)
    return out


def measure_async(url: str, n: int) -> dict[str, dict[str, float]]:
    async def checkout(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await conn.get_raw_connection()  # the checkout, no statement

    async def core(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            (await conn.execute(SELECT_ONE)).scalar_one()

    async def orm(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session:
            item = await session.get(Item, 1)
            assert item is not None

    async def main() -> dict[str, dict[str, float]]:
        engines = async_engines(url)
        out: dict[str, dict[str, float]] = {}
        ops: tuple[tuple[str, Callable[[AsyncEngine], Awaitable[None]]], ...] = (
            ("checkout", checkout),
            ("core", core),
            ("orm", orm),
        )
        try:
            for name, op in ops:
                for engine in engines.values():
                    for _ in range(50):
                        await op(engine)
                times: dict[str, list[float]] = {e: [] for e in ENGINES}
                cpu: dict[str, list[float]] = {e: [] for e in ENGINES}
                for round_no in range(ROUNDS):
                    for e in _order(round_no):
                        engine = engines[e]
                        c0 = time.thread_time()
                        t0 = time.perf_counter()
                        for _ in range(n):
                            await op(engine)
                        times[e].append((time.perf_counter() - t0) / n)
                        cpu[e].append((time.thread_time() - c0) / n)
                out[name] = _summary(times) | _cpu_summary(cpu)
        finally:
            for engine in engines.values():
                await engine.dispose()
        return out

    return asyncio.run(main())


def measure_checkout(url: str, n: int) -> dict[str, dict[str, float]]:
    """µs per ``checkout()`` + ``release()`` of a pgwarden handle (SQLAlchemy's shape) and
    per ``getconn()`` + ``putconn()`` of a psycopg_pool pool, sync and asyncio."""
    import psycopg_pool
    from psycopg.rows import tuple_row

    import pgwarden

    def summary(times: dict[str, list[float]]) -> dict[str, float]:
        ours = statistics.median(times["checkout"])
        theirs = statistics.median(times["getconn"])
        return {"checkout_us": ours * 1e6, "getconn_us": theirs * 1e6, "ratio": ours / theirs}

    def sync() -> dict[str, float]:
        db = pgwarden.connect(url, application_name="sqlalchemy-bench-checkout")
        db.ready()
        pool = psycopg_pool.ConnectionPool(url, min_size=1, max_size=1, open=True)
        pool.wait()

        def checkout() -> None:
            db.checkout(autocommit=False, row_factory=tuple_row).release()

        def getconn() -> None:
            pool.putconn(pool.getconn())

        ops = {"checkout": checkout, "getconn": getconn}
        times: dict[str, list[float]] = {name: [] for name in ops}
        try:
            for op in ops.values():
                for _ in range(50):
                    op()
            for round_no in range(ROUNDS):
                for name in sorted(ops, reverse=bool(round_no % 2)):
                    op = ops[name]
                    t0 = time.perf_counter()
                    for _ in range(n):
                        op()
                    times[name].append((time.perf_counter() - t0) / n)
        finally:
            pool.close()
            db.close()
        return summary(times)

    async def asynchronous() -> dict[str, float]:
        db = pgwarden.connect_async(url, application_name="sqlalchemy-bench-checkout")
        await db.ready()
        pool = psycopg_pool.AsyncConnectionPool(url, min_size=1, max_size=1, open=False)
        await pool.open(wait=True)

        async def checkout() -> None:
            await (await db.checkout(autocommit=False, row_factory=tuple_row)).release()

        async def getconn() -> None:
            await pool.putconn(await pool.getconn())

        ops = {"checkout": checkout, "getconn": getconn}
        times: dict[str, list[float]] = {name: [] for name in ops}
        try:
            for op in ops.values():
                for _ in range(50):
                    await op()
            for round_no in range(ROUNDS):
                for name in sorted(ops, reverse=bool(round_no % 2)):
                    op = ops[name]
                    t0 = time.perf_counter()
                    for _ in range(n):
                        await op()
                    times[name].append((time.perf_counter() - t0) / n)
        finally:
            await pool.close()
            await db.close()
        return summary(times)

    return {"sync": sync(), "async": asyncio.run(asynchronous())}


def _prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (1, 'one')")


def _drop(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SQLAlchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__}, "
        f"pgwarden {_version('pgwarden')}, {platform.system()} {platform.release()}"
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def format_result(result: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in result.items())


def _verdict(result: dict[str, float]) -> str:
    a = "met" if result["vs_queuepool"] <= 1.0 else "not met"
    b = "met" if result["vs_pre_ping"] < 1.0 else "not met"
    return f"{a} / {b}"


def render(
    results: dict[str, dict[str, float]],
    *,
    checkouts: dict[str, dict[str, float]] | None = None,
    machine_text: str,
    version: str,
    n: int,
    quick: bool,
    load: tuple[str, str],
) -> str:
    lines = [
        SECTION,
        "",
        "Generated by `bench/sqlalchemy_bench.py`. Three engines on one throwaway server,",
        "measured in the same run: pgwarden's dialect (`postgresql+pgwarden://`, pgwarden's",
        "defaults), SQLAlchemy's default QueuePool over psycopg 3 without pre-ping, and the",
        f"same with `pool_pre_ping=True`. Median of {ROUNDS} rounds of {n} operations per",
        "engine, one caller, pool warm; the engines' order rotates every round. Ratios are",
        "pgwarden's median over QueuePool's (below 1: pgwarden is faster); in brackets, the",
        "range of the per-round ratios (one round's pgwarden time over the same round's).",
        "",
    ]
    if quick:
        lines += [
            f"**Quick run** (`--quick`: {ROUNDS} rounds of {n}): a smoke test, noisier than a",
            "full run; do not quote these figures.",
            "",
        ]
    lines += [
        f"- machine: {machine_text}",
        f"- server: PostgreSQL {version} (throwaway, fsync off), over loopback TCP",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- load average at start / end: {load[0]} / {load[1]}",
        "",
        "| benchmark | pgwarden µs | QueuePool µs | QueuePool + pre-ping µs "
        "| vs QueuePool | vs pre-ping | targets (<= 1.00 / < 1.00) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['pgwarden_us']:.1f} | {r['queuepool_us']:.1f} "
            f"| {r['queuepool_pre_ping_us']:.1f} "
            f"| {r['vs_queuepool']:.3f} ({r['vs_queuepool_min']:.2f}-{r['vs_queuepool_max']:.2f}) "
            f"| {r['vs_pre_ping']:.3f} ({r['vs_pre_ping_min']:.2f}-{r['vs_pre_ping_max']:.2f}) "
            f"| {_verdict(r)} |"
        )
    lines += [
        "",
        "Client CPU time per operation (this process's `time.thread_time()`, same rounds):",
        "the Python side of each engine, server work and descheduled time left out, so it",
        "moves less with the machine's load than the wall clock above.",
        "",
        "| benchmark | pgwarden CPU µs | QueuePool CPU µs | vs QueuePool (CPU) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['cpu_pgwarden_us']:.1f} | {r['cpu_queuepool_us']:.1f} "
            f"| {r['cpu_vs_queuepool']:.3f} "
            f"({r['cpu_vs_queuepool_min']:.2f}-{r['cpu_vs_queuepool_max']:.2f}) |"
        )
    lines += [
        "",
        "- **checkout**: a checkout and its return, no statement: sync",
        "  `engine.raw_connection().close()`; async `engine.connect()` and",
        "  `get_raw_connection()`. Nothing goes on the wire (no transaction began): what is",
        "  left is each pool's own hand-off, pgwarden's `checkout()` + `release()` included.",
        "- **core**: `with engine.connect() as conn: conn.execute(text('SELECT 1'))`; one",
        "  checkout, the statement, the return. On the wire QueuePool sends BEGIN, SELECT 1",
        "  and ROLLBACK (reset on return), three round trips; pgwarden's dialect sends BEGIN",
        "  with the SELECT (`pgwarden.sqlalchemy._begin`), two; pre-ping adds one (`;`) per",
        "  checkout. The ORM row is the same on the wire.",
        "- **orm**: `with Session(engine) as session: session.get(Item, 1)`; a new session",
        "  each time, so every call is a checkout and one primary-key SELECT.",
        "- **async**: the same through `create_async_engine` and `AsyncSession`",
        "  (SQLAlchemy's greenlet bridge on both sides).",
        "",
    ]
    if checkouts:
        lines += [
            "What one checkout costs pgwarden itself (the dialect's part of every SQLAlchemy",
            "checkout): the handle's `checkout()` + `release()`, against psycopg_pool's",
            "`getconn()` + `putconn()` on a pool of its own, alternately, same rounds:",
            "",
            "| | `checkout()` + `release()` µs | `getconn()` + `putconn()` µs | ratio |",
            "|---|---|---|---|",
        ]
        for name, r in checkouts.items():
            lines.append(
                f"| {name} | {r['checkout_us']:.1f} | {r['getconn_us']:.1f} | {r['ratio']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section in ``path`` (up to the next ``## `` heading), or
    append it."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + section
    else:
        end = old.find("\n## ", start + len(SECTION))
        tail = old[end + 1 :] if end >= 0 else ""
        new = old[:start] + section + ("\n" + tail if tail else "")
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    global ROUNDS
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"operations per engine per round (default {N}; quick {QUICK_N})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROUNDS} rounds of {QUICK_N} operations; noisier, and marked "
        "as such in the output",
    )
    parser.add_argument(
        "--write", metavar="FILE", help="put the results as a Markdown section into FILE"
    )
    args = parser.parse_args(argv)
    if args.quick:
        ROUNDS = QUICK_ROUNDS
    n: int = args.n if args.n is not None else (QUICK_N if args.quick else N)
    load_start = _loadavg()

    with ExitStack() as stack:
        url: str | None = args.url
        if url is None:
            from pgwarden.testing import PostgresServer

            print("starting a throwaway PostgreSQL...", file=sys.stderr)
            server = stack.enter_context(PostgresServer())
            url = server.url
            version = server.version
        else:
            version = "given by --url"
        _prepare(url)
        stack.callback(_drop, url)
        results: dict[str, dict[str, float]] = {}
        print("running: sync engines...", file=sys.stderr, flush=True)
        engines = sync_engines(url)
        try:
            for name, r in measure_sync(engines, n).items():
                results[f"sync {name}"] = r
                print(f"  sync {name}: {format_result(r)}", file=sys.stderr, flush=True)
        finally:
            for engine in engines.values():
                engine.dispose()
        print("running: asyncio engines...", file=sys.stderr, flush=True)
        for name, r in measure_async(url, n).items():
            results[f"async {name}"] = r
            print(f"  async {name}: {format_result(r)}", file=sys.stderr, flush=True)
        print("running: checkout() + release() vs getconn() + putconn()...", file=sys.stderr)
        checkouts = measure_checkout(url, n)
        for name, r in checkouts.items():
            print(f"  {name} checkout: {format_result(r)}", file=sys.stderr, flush=True)

    text_out = render(
        results,
        checkouts=checkouts,
        machine_text=machine(),
        version=version,
        n=n,
        quick=args.quick,
        load=(load_start, _loadavg()),
    )
    print(text_out)
    if args.write:
        write_section(Path(args.write), text_out)
        print(f"wrote the section to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
