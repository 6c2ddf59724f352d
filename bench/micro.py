"""Micro-benchmarks of pgwarden against psycopg_pool, measured in the same run.

Every figure is a ratio against psycopg_pool (or bare psycopg) measured
alternately in the same process, because these machines are shared and noisy.
It starts its own throwaway PostgreSQL (pgwarden.testing) unless --url is given.

    python bench/micro.py                       # print the table
    python bench/micro.py --quick               # fewer rounds and queries: a smoke run
    python bench/micro.py --write docs/benchmarks.md

Next to the steady hot path (`fetchval("SELECT 1")`, no deadline, sync and async) it
reports what the handle's lock costs per call: a `threading.Lock` round trip
(acquire + release) measured uncontended and contended by 2 threads, times
LOCK_ROUND_TRIPS_PER_CALL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgwarden import AsyncDatabase, Database, Settings

# Rounds of each alternating measurement; --quick lowers it (main() sets it once).
ROUNDS = 7
QUICK_ROUNDS = 3

# How many times one steady hot-path call (fetchval, no deadline, the fast path)
# takes the handle's lock (HandleState._lock): enter() and leave() (acquire wait,
# use time and duration are recorded inside leave()). The sync shell also takes the
# watchdog's condition lock twice (arm and disarm of the backstop timer).
LOCK_ROUND_TRIPS_PER_CALL = 2

# Acquire/release pairs per lock-cost round (per thread when contended).
LOCK_PAIRS = 1_000_000
QUICK_LOCK_PAIRS = 100_000


def best_ratio(
    ours: Callable[[], float], theirs: Callable[[], float]
) -> tuple[float, float, float]:
    """Alternate the two measurements ROUNDS times; compare their medians."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(ROUNDS):
        b.append(theirs())
        a.append(ours())
    ma, mb = statistics.median(a), statistics.median(b)
    return ma, mb, ma / mb


def _empty_loop(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    return time.perf_counter() - t0


def _lock_pairs(lock: threading.Lock, n: int) -> None:
    for _ in range(n):
        with lock:  # what HandleState does: `with self._lock:`
            pass


def _uncontended(n: int) -> float:
    lock = threading.Lock()
    t0 = time.perf_counter()
    _lock_pairs(lock, n)
    return time.perf_counter() - t0


def _contended(n: int, threads: int = 2) -> float:
    """Wall time for *threads* threads doing *n* pairs each on one shared lock."""
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)

    def worker() -> None:
        start.wait()
        _lock_pairs(lock, n)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def lock_costs(pairs: int) -> dict[str, float]:
    """What one `threading.Lock` round trip costs, uncontended and with 2 threads.

    Both are per acquire/release pair with the bare loop's cost subtracted. The
    contended figure is the whole run's wall time over all pairs of both threads
    (under the GIL they run one at a time, so that is the cost per pair including
    the contention: blocking, GIL hand-offs); it is a worst case, both threads doing
    nothing but taking the lock, where a real call holds it for a few bookkeeping
    steps between long waits on the socket.
    """
    alone: list[float] = []
    shared: list[float] = []
    for _ in range(ROUNDS):
        alone.append(max(0.0, _uncontended(pairs) - _empty_loop(pairs)) / pairs)
        shared.append(max(0.0, _contended(pairs) - _empty_loop(2 * pairs)) / (2 * pairs))
    a, c = statistics.median(alone), statistics.median(shared)
    return {
        "uncontended_us": a * 1e6,
        "contended_2_threads_us": c * 1e6,
        "contended_ratio": c / a if a else float("nan"),
        "round_trips_per_call": LOCK_ROUND_TRIPS_PER_CALL,
    }


def _lock_per_call(
    lock: dict[str, float], ours_us: float, theirs_us: float, *, contended: bool
) -> dict[str, float]:
    """The lock's cost in one hot-path call: absolute, as a share of the whole call
    (*ours_us*) and as a share of what pgwarden adds over psycopg_pool (nan when it
    adds nothing measurable)."""
    per_call = LOCK_ROUND_TRIPS_PER_CALL * lock["uncontended_us"]
    overhead = ours_us - theirs_us
    out = {
        "lock_us_per_call": per_call,
        "lock_pct_of_call": 100 * per_call / ours_us,
        "lock_pct_of_overhead": 100 * per_call / overhead if overhead > 0 else float("nan"),
    }
    if contended:
        out["lock_contended_us_per_call"] = (
            LOCK_ROUND_TRIPS_PER_CALL * lock["contended_2_threads_us"]
        )
    return out


def sync_latency(url: str, n: int, lock: dict[str, float]) -> dict[str, float]:
    pool = ConnectionPool(url, min_size=1, max_size=4, open=True, kwargs={"autocommit": True})
    # The defaults: a call that sets no deadline still has default_timeout's backstop
    # (a sever timer armed per call), and that is the steady hot path users get.
    db = Database(Settings(url=url, max_size=4))
    db.fetchval("SELECT 1")
    pool.wait()

    def theirs() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with pool.connection() as conn:
                conn.execute("SELECT 1").fetchone()
        return (time.perf_counter() - t0) / n

    def ours() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            db.fetchval("SELECT 1")
        return (time.perf_counter() - t0) / n

    try:
        a, b, r = best_ratio(ours, theirs)
    finally:
        db.close()
        pool.close()
    result = {"pgwarden_us": a * 1e6, "psycopg_pool_us": b * 1e6, "ratio": r}
    # The sync shell shares its lock with psycopg_pool's worker threads and with
    # the application's other threads, so it can be contended.
    return result | _lock_per_call(lock, a * 1e6, b * 1e6, contended=True)


def async_latency(url: str, n: int, lock: dict[str, float]) -> dict[str, float]:
    async def main() -> dict[str, float]:
        pool = AsyncConnectionPool(
            url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True)
        db = AsyncDatabase(Settings(url=url, max_size=4))
        await db.fetchval("SELECT 1")
        a: list[float] = []
        b: list[float] = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            for _ in range(n):
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT 1")
                    await cur.fetchone()
            b.append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            for _ in range(n):
                await db.fetchval("SELECT 1")
            a.append((time.perf_counter() - t0) / n)
        await db.close()
        await pool.close()
        ma, mb = statistics.median(a), statistics.median(b)
        result = {"pgwarden_us": ma * 1e6, "psycopg_pool_us": mb * 1e6, "ratio": ma / mb}
        # Under asyncio the lock is taken on the loop's thread and never held
        # across an await: uncontended.
        return result | _lock_per_call(lock, ma * 1e6, mb * 1e6, contended=False)

    return asyncio.run(main())


def async_throughput(url: str, tasks: int, per_task: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        pool = AsyncConnectionPool(
            url, min_size=tasks, max_size=tasks, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True)
        db = AsyncDatabase(Settings(url=url, min_size=tasks, max_size=tasks))
        await asyncio.gather(*(db.fetchval("SELECT 1") for _ in range(tasks)))

        async def theirs_worker() -> None:
            for _ in range(per_task):
                async with pool.connection() as conn:
                    cur = await conn.execute("SELECT 1")
                    await cur.fetchone()

        async def ours_worker() -> None:
            for _ in range(per_task):
                await db.fetchval("SELECT 1")

        a: list[float] = []
        b: list[float] = []
        total = tasks * per_task
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            await asyncio.gather(*(theirs_worker() for _ in range(tasks)))
            b.append(total / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            await asyncio.gather(*(ours_worker() for _ in range(tasks)))
            a.append(total / (time.perf_counter() - t0))
        await db.close()
        await pool.close()
        ma, mb = statistics.median(a), statistics.median(b)
        return {"pgwarden_qps": ma, "psycopg_pool_qps": mb, "ratio": ma / mb}

    return asyncio.run(main())


def transaction_costs(url: str, n: int) -> dict[str, float]:
    """What commit resolution and deadlines cost per call (pgwarden against itself)."""
    with ExitStack() as stack:
        on = stack.enter_context(Database(Settings(url=url, max_size=2, application_name="a")))
        off = stack.enter_context(
            Database(Settings(url=url, max_size=2, resolve_commits=False, application_name="b"))
        )
        on.execute("CREATE TABLE IF NOT EXISTS bench_tx (id int)")

        def body(tx: Any) -> None:
            tx.execute("INSERT INTO bench_tx VALUES (1)")

        def timed(fn: Callable[[], object]) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                return (time.perf_counter() - t0) / n

            return run

        resolve, plain, resolve_ratio = best_ratio(
            timed(lambda: on.run_transaction(body)), timed(lambda: off.run_transaction(body))
        )
        with_deadline, without, deadline_ratio = best_ratio(
            timed(lambda: on.fetchval("SELECT 1", timeout=5.0)),
            timed(lambda: on.fetchval("SELECT 1")),
        )
        on.execute("DROP TABLE bench_tx")
    return {
        "tx_resolve_us": resolve * 1e6,
        "tx_no_resolve_us": plain * 1e6,
        "resolve_ratio": resolve_ratio,
        "fetchval_deadline_us": with_deadline * 1e6,
        "fetchval_no_deadline_us": without * 1e6,
        "deadline_ratio": deadline_ratio,
    }


def checkout_costs(url: str, n: int) -> dict[str, float]:
    """What lending a connection costs: the handle's ``checkout()`` + ``release()`` (what
    the SQLAlchemy dialect and the Django backend do per checkout) against psycopg_pool's
    ``getconn()`` + ``putconn()``, sync and async, no deadline, pool warm."""
    pool = ConnectionPool(url, min_size=1, max_size=4, open=True, kwargs={"autocommit": True})
    db = Database(Settings(url=url, max_size=4))
    db.fetchval("SELECT 1")
    pool.wait()

    def theirs() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pool.putconn(pool.getconn())
        return (time.perf_counter() - t0) / n

    def ours() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            db.checkout().release()
        return (time.perf_counter() - t0) / n

    def ours_transactional() -> float:  # the ORMs' shape: autocommit off, then restored
        t0 = time.perf_counter()
        for _ in range(n):
            db.checkout(autocommit=False).release()
        return (time.perf_counter() - t0) / n

    try:
        sync_ours, sync_theirs, sync_ratio = best_ratio(ours, theirs)
        tx_ours, _, tx_ratio = best_ratio(ours_transactional, theirs)
    finally:
        db.close()
        pool.close()

    async def main() -> tuple[float, float]:
        apool = AsyncConnectionPool(
            url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await apool.open(wait=True)
        adb = AsyncDatabase(Settings(url=url, max_size=4))
        await adb.fetchval("SELECT 1")
        a: list[float] = []
        b: list[float] = []
        try:
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                for _ in range(n):
                    await apool.putconn(await apool.getconn())
                b.append((time.perf_counter() - t0) / n)
                t0 = time.perf_counter()
                for _ in range(n):
                    await (await adb.checkout()).release()
                a.append((time.perf_counter() - t0) / n)
        finally:
            await adb.close()
            await apool.close()
        return statistics.median(a), statistics.median(b)

    async_ours, async_theirs = asyncio.run(main())
    return {
        "sync_pgwarden_us": sync_ours * 1e6,
        "sync_psycopg_pool_us": sync_theirs * 1e6,
        "sync_ratio": sync_ratio,
        "sync_autocommit_off_us": tx_ours * 1e6,
        "sync_autocommit_off_ratio": tx_ratio,
        "async_pgwarden_us": async_ours * 1e6,
        "async_psycopg_pool_us": async_theirs * 1e6,
        "async_ratio": async_ours / async_theirs,
    }


def _run_python(code: str, env: dict[str, str]) -> float:
    """Run *code* in a fresh interpreter; return the CPU time (user + system, every thread)
    of the whole process, in seconds.

    CPU time, not wall time: on a shared machine a child's wall time also counts whatever
    else ran meanwhile, and a serverless fleet pays for CPU.
    """
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return usage.ru_utime + usage.ru_stime


def _python_output(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


# The two sides of the cold start: import, connect, one row.
COLD_BARE = (
    "import os, psycopg\n"
    "c = psycopg.connect(os.environ['DATABASE_URL'], autocommit=True)\n"
    "assert c.execute('SELECT 1').fetchone() == (1,)\n"
)
COLD_PGWARDEN = "import pgwarden\nassert pgwarden.connect().fetchval('SELECT 1') == 1\n"


def _loaded_after_psycopg(code: str, env: dict[str, str]) -> set[str]:
    """The modules *code* adds to sys.modules in a fresh interpreter after `import psycopg`."""
    probe = (
        "import sys, psycopg\nbefore = set(sys.modules)\n"
        + code
        + "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    return set(_python_output(probe, env).split())


def _import_cpu(modules: list[str], env: dict[str, str], *, preloaded: list[str]) -> float:
    """CPU seconds a fresh interpreter spends importing *modules* once *preloaded* are."""
    code = (
        f"import importlib, time\nfor name in {preloaded!r}:\n    importlib.import_module(name)\n"
        "start = time.process_time()\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        "print(time.process_time() - start)\n"
    )
    return float(_python_output(code, env))


def cold_start(url: str, runs: int) -> dict[str, float]:
    # Installed packages (psycopg) ship compiled bytecode; compile ours too so the
    # comparison is like for like even where PYTHONDONTWRITEBYTECODE is set.
    import compileall

    import pgwarden

    compileall.compile_dir(os.path.dirname(pgwarden.__file__), quiet=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["DATABASE_URL"] = url
    ours, bare = [], []
    for i in range(runs):
        # Alternate which side runs first, so neither always inherits the other's warm caches.
        if i % 2 == 0:
            bare.append(_run_python(COLD_BARE, env))
            ours.append(_run_python(COLD_PGWARDEN, env))
        else:
            ours.append(_run_python(COLD_PGWARDEN, env))
            bare.append(_run_python(COLD_BARE, env))
    ma, mb = statistics.median(ours), statistics.median(bare)
    # What pgwarden's first query imports beyond psycopg and beyond what bare psycopg's own
    # first query imports (nothing, with psycopg 3.3), timed once those are loaded.
    bare_loads = _loaded_after_psycopg(COLD_BARE, env)
    modules = sorted(_loaded_after_psycopg(COLD_PGWARDEN, env) - bare_loads)
    baseline = ["psycopg", *sorted(bare_loads)]
    over_psycopg = [_import_cpu(modules, env, preloaded=baseline) for _ in range(runs)]
    import_pgwarden = [_import_cpu(["pgwarden"], env, preloaded=[]) for _ in range(runs)]
    return {
        "pgwarden_cpu_ms": ma * 1e3,
        "psycopg_cpu_ms": mb * 1e3,
        "ratio": ma / mb,
        "first_query_import_over_psycopg_ms": statistics.median(over_psycopg) * 1e3,
        "first_query_modules": len(modules),
        "import_pgwarden_ms": statistics.median(import_pgwarden) * 1e3,
        "runs": runs,
    }


def readiness_200(url: str, max_size: int) -> dict[str, float]:
    async def one_connect_and_probe() -> float:
        t0 = time.perf_counter()
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await (await conn.execute("SELECT 1")).fetchone()
        elapsed = time.perf_counter() - t0
        await conn.close()
        return elapsed

    async def cold_ready() -> tuple[float, int]:
        db = AsyncDatabase(Settings(url=url, max_size=max_size, application_name="pgw-bench-200"))
        t0 = time.perf_counter()
        await asyncio.gather(*(db.ready() for _ in range(200)))
        elapsed = time.perf_counter() - t0
        opened = db.stats()["counters"]["connections_opened"]
        await db.close()
        return elapsed, int(opened)

    async def main() -> dict[str, float]:
        base: list[float] = []
        ready: list[float] = []
        opened = 0
        for _ in range(ROUNDS):
            base.append(await one_connect_and_probe())
            elapsed, n = await cold_ready()
            ready.append(elapsed)
            opened = max(opened, n)
        mb, ma = statistics.median(base), statistics.median(ready)
        return {
            "ready_ms": ma * 1e3,
            "connect_probe_ms": mb * 1e3,
            "ratio": ma / mb,
            "max_connections_opened": opened,
            "max_size": max_size,
        }

    return asyncio.run(main())


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
        f"psycopg {psycopg.__version__}, psycopg_pool {psycopg_pool.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument(
        "--n", type=int, default=None, help="queries per latency round (default 2000; quick 200)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROUNDS} rounds, 200 queries a round, fewer cold starts; "
        "noisier, and marked as such in the output",
    )
    parser.add_argument("--write", metavar="FILE", help="write the results as Markdown")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="run only the rows whose name contains TEXT (e.g. 'checkout'); not with --write",
    )
    args = parser.parse_args(argv)
    if args.only and args.write:
        parser.error("--only writes no file: the page holds every row")
    if args.quick:
        ROUNDS = QUICK_ROUNDS
    n: int = args.n if args.n is not None else (200 if args.quick else 2000)
    pairs = QUICK_LOCK_PAIRS if args.quick else LOCK_PAIRS
    cold_runs = 5 if args.quick else 21

    with ExitStack() as stack:
        url = args.url
        if url is None:
            from pgwarden.testing import PostgresServer

            print("starting a throwaway PostgreSQL...", file=sys.stderr)
            server = stack.enter_context(PostgresServer())
            url = server.url
            version = server.version
        else:
            version = "given by --url"
        results: dict[str, dict[str, Any]] = {}
        # The lock row runs first: the hot-path rows add its per-call figures.
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (LOCK_ROW, lambda: lock_costs(pairs)),
            ("sync fetchval latency", lambda: sync_latency(url, n, results[LOCK_ROW])),
            ("async fetchval latency", lambda: async_latency(url, n, results[LOCK_ROW])),
            ("async throughput, 16 tasks", lambda: async_throughput(url, 16, n // 4)),
            (CHECKOUT_ROW, lambda: checkout_costs(url, n * 5)),
            ("cold start (fresh interpreter)", lambda: cold_start(url, cold_runs)),
            ("readiness, 200 cold callers", lambda: readiness_200(url, 10)),
            ("costs: commit resolution, deadlines", lambda: transaction_costs(url, n // 4)),
        ]
        if args.only:
            steps = [(name, step) for name, step in steps if args.only in name]
            names = [name for name, _ in steps]
            if LOCK_ROW not in names and any(n.endswith("fetchval latency") for n in names):
                steps.insert(0, (LOCK_ROW, lambda: lock_costs(pairs)))
        for name, step in steps:
            print(f"running: {name}...", file=sys.stderr, flush=True)
            results[name] = step()
            print(f"  {format_result(results[name])}", file=sys.stderr, flush=True)

    # The figures the file holds now are carried forward under "Previous run".
    previous = previous_figures(Path(args.write)) if args.write else []
    text = render(results, machine(), version, quick=args.quick, n=n, previous=previous)
    print(text)
    if args.write:
        # The other benchmarks' sections (and hand-written ones) stay; each writer
        # replaces only its own (bench/sections.py).
        from sections import other_sections

        path = Path(args.write)
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        kept = other_sections(old, {PREVIOUS_HEADING, NOTES[0]})
        path.write_text(text.rstrip("\n") + "\n" + ("\n" + kept if kept else ""), "utf-8")
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def format_result(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
    )


LOCK_ROW = "lock round trip (threading.Lock)"
CHECKOUT_ROW = "checkout + release (integrations)"

TARGETS = {
    LOCK_ROW: "measured (no target); x round_trips_per_call in the rows below",
    "sync fetchval latency": "ratio <= 1.10",
    "async fetchval latency": "ratio <= 1.10",
    "async throughput, 16 tasks": "ratio >= 0.95",
    CHECKOUT_ROW: "measured (no target): the integrations' fixed cost per checkout",
    "cold start (fresh interpreter)": "ratio <= 1.10; first query imports < 10 ms over psycopg",
    "readiness, 200 cold callers": "ratio <= 2.0; opened <= max_size",
    "costs: commit resolution, deadlines": "measured and documented (no target)",
}


def render(
    results: dict[str, dict[str, Any]],
    machine_text: str,
    version: str,
    *,
    quick: bool = False,
    n: int = 2000,
    previous: Sequence[str] = (),
) -> str:
    """The Markdown page; *previous* (from `previous_figures`) goes under PREVIOUS_HEADING."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/micro.py`). Every ratio compares pgwarden with",
        "psycopg_pool (or bare psycopg for cold start) measured alternately in the same run,",
        f"median of {ROUNDS} rounds, `SELECT 1` over loopback.",
        "",
    ]
    if quick:
        lines += [
            f"**Quick run** (`--quick`: {ROUNDS} rounds of {n} queries): a smoke test,",
            "noisier than `make bench`; do not quote these figures.",
            "",
        ]
    lines += [
        f"- machine: {machine_text}",
        f"- server: PostgreSQL {version} (throwaway, fsync off)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| benchmark | result | target |",
        "|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(f"| {name} | {format_result(result)} | {TARGETS.get(name, '')} |")
    if previous:
        lines += [
            "",
            PREVIOUS_HEADING,
            "",
            "The figures this file held before this run, kept for comparison (another machine",
            "or another load: compare the ratios, not the absolute times).",
            "",
            *previous,
        ]
    lines += ["", *NOTES, ""]
    return "\n".join(lines)


PREVIOUS_HEADING = "## Previous run"


def previous_figures(path: Path) -> list[str]:
    """The figures of the run that wrote *path* (by `render`): its quick-run mark, machine,
    server and date lines and its table; [] when there is no such file or table.

    Only that run's own table is taken, not the run before it, so one run is carried.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    # render()'s figures come before any "## " section (other benchmarks write their own).
    head = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    starts = ("**Quick run**", "- machine:")
    begin = next((i for i, line in enumerate(lines[:head]) if line.startswith(starts)), None)
    if begin is None:
        return []
    figures: list[str] = []
    in_table = False
    for line in lines[begin:]:
        if line.startswith("|"):
            in_table = True
        elif in_table or line.startswith("## "):
            break
        figures.append(line)
    return figures if in_table else []


NOTES = [
    "## What each row measures",
    "",
    "- **lock round trip**: one `with threading.Lock():` (acquire and release), bare loop",
    "  subtracted; `uncontended_us` with one thread, `contended_2_threads_us` with two threads",
    "  doing nothing but taking the same lock (the whole run's wall time over all their pairs:",
    "  a worst case). `round_trips_per_call` is how often one steady `fetchval` takes the",
    "  handle's lock (`LOCK_ROUND_TRIPS_PER_CALL` in `bench/micro.py`). The fetchval rows",
    "  multiply the two: `lock_us_per_call` (and, sync, `lock_contended_us_per_call`);",
    "  `lock_pct_of_call` is its uncontended share of pgwarden's whole call, and",
    "  `lock_pct_of_overhead` its share of what pgwarden adds over psycopg_pool (`nan` when",
    "  pgwarden was not slower).",
    "- **fetchval latency**: one `SELECT 1` per call, one caller, pool already warm.",
    "  psycopg_pool's side is its best equivalent:",
    "  `with pool.connection() as conn: conn.execute(...).fetchone()`.",
    "  pgwarden's side includes readiness guard, breaker check, retry bookkeeping, idle validation",
    "  decision, the default stats tracker (counters and histograms) and the gap detector.",
    "- **throughput, 16 tasks**: 16 asyncio tasks sharing a pool of 16, queries per second.",
    "- **checkout + release**: `db.checkout().release()` (what the SQLAlchemy dialect and the",
    "  Django backend do per connection checkout) against psycopg_pool's",
    "  `pool.putconn(pool.getconn())`, no SQL, pool warm, 5x the latency rows' count per",
    "  round. pgwarden's side includes the in-flight count, the waiter gauge, the idle poll",
    "  (validation without a round trip), the leak watch, the shape restored on return and",
    "  the acquire-wait and use-time histograms; `sync_autocommit_off_*` lends it with",
    "  `autocommit=False` (the ORMs' shape), which costs two `set_autocommit()` calls.",
    "- **cold start**: a fresh interpreter imports, connects and reads one row: bare psycopg",
    "  (`psycopg.connect(url, autocommit=True).execute('SELECT 1').fetchone()`) against",
    "  `pgwarden.connect().fetchval('SELECT 1')`. `*_cpu_ms` is the CPU time (user + system,",
    "  every thread, from `os.wait4`) of the whole child process, median of the runs, the two",
    "  sides alternated (bare first on even runs, pgwarden first on odd ones); `ratio` is",
    "  pgwarden's median over psycopg's. `first_query_import_over_psycopg_ms` is what the",
    "  first query imports beyond `import psycopg`: probe children list the",
    "  `first_query_modules` that pgwarden's first query adds to `sys.modules` after",
    "  `import psycopg` and bare psycopg's first query does not (it adds none), then fresh",
    "  children import psycopg and time (`time.process_time`) importing those modules, median",
    "  of the runs; measured inside one process, it is not the difference of two noisy",
    "  process totals. `import_pgwarden_ms` is `import pgwarden` alone in a fresh interpreter",
    "  (no driver: mostly the standard library that psycopg loads too, typing, dataclasses, re).",
    "  Bytecode is compiled first for both sides (`compileall` on pgwarden's package, as a",
    "  wheel install leaves it; psycopg's is compiled at install).",
    "- **readiness, 200 cold callers**: 200 concurrent `ready()` on a new handle, against one",
    "  bare connect plus `SELECT 1`; `max_connections_opened` counts the connections",
    "  the warmup opened.",
    "- **costs**: pgwarden against itself. `resolve_ratio` is a one-insert `run_transaction` with",
    "  commit resolution (one extra `txid_current_if_assigned()` round trip) against without.",
    "  `deadline_ratio` is `fetchval` with a per-call timeout (pipelined BEGIN, SET LOCAL",
    "  statement_timeout, statement, COMMIT) against without.",
    "",
    "Shared machines are noisy: single runs of the latency rows have varied by about 5-10%.",
    "The fault behaviour (restarts, kills, overload, blackholes) is proven by the test suite,",
    "not here; `pgwarden stress` compares clients under those faults (docs/stress.md).",
]


if __name__ == "__main__":
    sys.exit(main())
