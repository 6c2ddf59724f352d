"""Cold-start storm: N fresh processes released together, time to each one's first row.

pgwarden (``pgwarden.connect`` + ``fetchval``), psycopg_pool (``ConnectionPool``, its own
``min_size=4``) and the naive client (``psycopg.connect`` per request) are measured in the
same run, each storm against a PostgreSQL with few slots, direct and behind a real PgBouncer
(transaction mode), client order rotated every round. Each worker process starts, reports
ready on a pipe and blocks on a second pipe; when all N are up the parent closes that pipe
and every worker is released at once. A worker then imports its client, connects and runs
REQUESTS reads (retrying a failed one after 10 ms, like a request loop would); it reports
when its first row arrived, from spawn and from release, by wall clock and CPU time.

Bytecode: the workers read compiled bytecode the way an installed package has it; this
script runs ``compileall`` on pgwarden, psycopg and psycopg_pool first.

    python bench/cold_start.py                       # 40 processes, 17 slots, 3 rounds
    python bench/cold_start.py --processes 20 --rounds 2
    python bench/cold_start.py --baseline-src /tmp/old/src   # + "pgwarden-baseline": that tree

``--baseline-src`` adds a fourth client, pgwarden imported from another source tree (an
earlier commit's ``src``), for before/after ratios measured in the same run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

# The worker's clock starts before any other import.
_WORKER_STARTED = time.time()

REQUESTS = 10
DEADLINE = 10.0
GIVE_UP = 30.0
CLIENTS = ("pgwarden", "psycopg_pool", "naive")
BASELINE = "pgwarden-baseline"


def _worker(client: str, url: str, ready_fd: int, release_fd: int, spawned: float) -> None:
    os.write(ready_fd, b".")
    os.close(ready_fd)
    os.read(release_fd, 1)  # EOF when the parent closes its end: everyone at once
    released = time.time()
    cpu_released = time.process_time()
    first: float | None = None
    cpu_first: float | None = None
    errors = 0
    done = 0
    give_up = released + GIVE_UP
    run, details = _client(client, url)
    while done < REQUESTS and time.time() < give_up:
        try:
            run()
        except Exception:
            errors += 1
            time.sleep(0.01)
            continue
        done += 1
        if first is None:
            first, cpu_first = time.time(), time.process_time()
            at_first_row = details()
    import json

    print(
        json.dumps(
            {
                "client": client,
                "spawn_to_release": released - spawned,
                "interpreter": _WORKER_STARTED - spawned,
                "release_to_first": None if first is None else first - released,
                "spawn_to_first": None if first is None else first - spawned,
                "cpu_to_first": cpu_first,
                "cpu_after_release": None if cpu_first is None else cpu_first - cpu_released,
                "errors": errors,
                "done": done,
                **(at_first_row if first is not None else {}),
            }
        ),
        flush=True,
    )
    os._exit(0)  # like a killed serverless instance; close() is not what is measured


def _client(client: str, url: str) -> tuple[Callable[[], None], Callable[[], dict[str, float]]]:
    """The client's request function (its imports and connect happen on the first call)
    and what it tells about its start (pgwarden: the warmup's seconds and failed connects)."""
    kwargs: dict[str, Any] = {
        "connect_timeout": 10,
        "options": f"-c statement_timeout={int(DEADLINE * 1000)}",
        "application_name": "cold-start",
    }
    if client in ("pgwarden", BASELINE):
        import pgwarden

        db = pgwarden.connect(url, max_size=4, application_name="cold-start")

        def run_pgwarden() -> None:
            with pgwarden.deadline(DEADLINE):
                db.fetchval("SELECT 1")

        def warmup() -> dict[str, float]:
            stats = db.stats()
            failures = stats["counters"]["connect_failures"]
            return {
                "warmup_seconds": float("nan")  # no warmup finished (not expected here)
                if stats["warmup_seconds"] is None
                else stats["warmup_seconds"],
                "connect_failures": float(sum(failures.values())),
            }

        return run_pgwarden, warmup
    if client == "psycopg_pool":
        state: list[object] = []

        def run_pool() -> None:
            if not state:
                from psycopg_pool import ConnectionPool

                state.append(
                    ConnectionPool(
                        url, min_size=4, max_size=4, timeout=DEADLINE, kwargs=kwargs, open=True
                    )
                )
            with state[0].connection() as conn:  # type: ignore[attr-defined]
                conn.execute("SELECT 1").fetchone()

        return run_pool, dict

    def run_naive() -> None:
        import psycopg

        with psycopg.connect(url, autocommit=True, **kwargs) as conn:
            conn.execute("SELECT 1").fetchone()

    return run_naive, dict


# -- the parent --------------------------------------------------------------------------


def _compile_bytecode(baseline_src: str | None) -> None:
    import compileall
    import importlib.util

    for name in ("pgwarden", "psycopg", "psycopg_pool"):
        spec = importlib.util.find_spec(name)
        assert spec is not None
        assert spec.submodule_search_locations
        for location in spec.submodule_search_locations:
            compileall.compile_dir(location, quiet=1)
    if baseline_src is not None:
        compileall.compile_dir(os.path.join(baseline_src, "pgwarden"), quiet=1)


def _storm(
    client: str, url: str, processes: int, baseline_src: str | None
) -> list[dict[str, object]]:
    import json
    import subprocess

    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if client == BASELINE and baseline_src is not None:
        env["PYTHONPATH"] = baseline_src  # ahead of the editable install's path entry
    procs = []
    for _ in range(processes):
        spawned = time.time()
        argv = [sys.executable, __file__, "--worker", client, url]
        argv += [str(ready_w), str(release_r), repr(spawned)]
        procs.append(
            subprocess.Popen(
                argv,
                env=env,
                pass_fds=(ready_w, release_r),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    os.close(ready_w)
    os.close(release_r)
    seen = 0
    while seen < processes:
        chunk = os.read(ready_r, processes)
        if not chunk:
            break
        seen += len(chunk)
    os.close(ready_r)
    os.close(release_w)  # release
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=GIVE_UP + 30)
        line = out.strip().splitlines()[-1] if out.strip() else ""
        results.append(json.loads(line) if line else {"client": client, "crashed": True})
    return results


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(results: list[dict[str, object]]) -> dict[str, float]:
    def col(name: str) -> list[float]:
        return [float(r[name]) for r in results if r.get(name) is not None]  # type: ignore[arg-type]

    return {
        "release_p50": _pct(col("release_to_first"), 0.5),
        "release_p95": _pct(col("release_to_first"), 0.95),
        "spawn_p50": _pct(col("spawn_to_first"), 0.5),
        "cpu_p50": _pct(col("cpu_to_first"), 0.5),
        "cpu_after_p50": _pct(col("cpu_after_release"), 0.5),
        "no_row": float(sum(1 for r in results if r.get("release_to_first") is None)),
        "errors": float(sum(int(r.get("errors", 0)) for r in results)),  # type: ignore[call-overload]
        "warmup_p50": _pct(col("warmup_seconds"), 0.5),
        "connect_failures": float(sum(col("connect_failures"))),
    }


def main() -> None:
    import argparse

    from pgwarden.testing import PgBouncerServer, PostgresServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=40)
    parser.add_argument("--max-connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="direct,pgbouncer")
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--baseline-src", help="also run pgwarden imported from this src tree")
    args = parser.parse_args()
    clients = args.clients.split(",")
    if args.baseline_src:
        clients.append(BASELINE)
    _compile_bytecode(args.baseline_src)
    slots = args.max_connections - 3  # superuser_reserved_connections
    print(
        f"# cold-start storm: {args.processes} processes, {slots} slots "
        f"(max_connections={args.max_connections}), {REQUESTS} reads each, "
        f"{args.rounds} rounds, order rotated; {os.cpu_count()} CPUs"
    )
    with PostgresServer({"max_connections": args.max_connections}) as pg:
        for target in args.targets.split(","):
            bouncer = None
            url = pg.url
            if target == "pgbouncer":
                bouncer = PgBouncerServer(pg, default_pool_size=slots - 2).start()
                url = bouncer.url
            per_round: dict[str, list[dict[str, float]]] = {c: [] for c in clients}
            try:
                for rnd in range(args.rounds):
                    order = clients[rnd % len(clients) :] + clients[: rnd % len(clients)]
                    for client in order:
                        time.sleep(1.0)  # let the previous storm's sessions end
                        storm = _storm(client, url, args.processes, args.baseline_src)
                        per_round[client].append(_summary(storm))
            finally:
                if bouncer is not None:
                    bouncer.close()
            _report(target, clients, per_round)


def _report(target: str, clients: list[str], per_round: dict[str, list[dict[str, float]]]) -> None:
    import statistics as st

    print(f"\n## {target}")
    print(
        "| client | release→first row p50 | p95 | spawn→first row p50 | CPU to first row p50 "
        "| CPU after release p50 | no row | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for client in clients:
        rows = per_round[client]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return st.median(r[key] for r in rows)

        print(
            f"| {client} | {med('release_p50'):.2f} s | {med('release_p95'):.2f} s "
            f"| {med('spawn_p50'):.2f} s | {med('cpu_p50') * 1000:.0f} ms "
            f"| {med('cpu_after_p50') * 1000:.0f} ms | {sum(r['no_row'] for r in rows):.0f} "
            f"| {sum(r['errors'] for r in rows):.0f} |"
        )
        if client in ("pgwarden", BASELINE):
            print(
                f"|   {client} warmup p50 {med('warmup_p50'):.2f} s, failed connects "
                f"(too many clients) {sum(r['connect_failures'] for r in rows):.0f} | | | | | | | |"
            )
    if "pgwarden" not in clients:
        return
    for peer in clients:
        if peer == "pgwarden":
            continue
        for key in ("release_p50", "spawn_p50", "cpu_p50"):
            ratios = [
                mine[key] / theirs[key]
                for mine, theirs in zip(per_round["pgwarden"], per_round[peer], strict=True)
            ]
            shown = ", ".join(f"{r:.2f}" for r in ratios)
            print(f"pgwarden/{peer} {key}: per round {shown}; median {st.median(ratios):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, name, target_url, ready, release, spawn_time = sys.argv
        _worker(name, target_url, int(ready), int(release), float(spawn_time))
    else:
        main()
