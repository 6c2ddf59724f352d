"""Django's ORM on ``pgwarden.django`` against Django's own pool and persistent connections.

Three databases on one throwaway PostgreSQL (pgwarden.testing) unless --url is given, all
the same server and table, measured in the same run:

* ``pgwarden``: ``ENGINE: "pgwarden.django"``, every pgwarden setting its default;
* ``native_pool``: Django's PostgreSQL backend with its psycopg pool (``OPTIONS["pool"]:
  True``, psycopg_pool's defaults, ``CONN_MAX_AGE=0`` as Django requires with it);
* ``persistent``: Django's backend without a pool, ``CONN_MAX_AGE=None`` (one connection
  per thread, kept for good: no checkout at all).

Two loops of ``Item.objects.using(db).get(pk=1)``, one caller, pool warm:

* **get**: the loop inside one request (the connection stays with the thread): the
  per-query cost of each backend;
* **request**: one ``get`` per request, each ended as Django ends one
  (``close_if_unusable_or_obsolete()``, what ``request_finished`` runs): the pool
  backends give the connection back and take it again, the persistent one keeps it.

and one without a query, to see the per-request work apart from the round trip (on a
loaded machine the round trip's noise is larger than that work):

* **connect**: ``ensure_connection()`` then ``close_if_unusable_or_obsolete()``: Django's
  ``connect()`` and ``close()`` with each backend's checkout and return (the persistent
  backend only checks its connection's age). It has no target: persistent connections
  do no checkout at all.

Every round times each database for ``--n`` operations, in an order that rotates from
round to round; the figures are medians over the rounds, and the ratio is pgwarden's
median over the faster of the other two (target: at most 1.05). Each round also gives a
ratio of its own (the databases measured one after another, under the same load); the
median of those is reported too, and the target is met only when both are within it.
Each loop is timed twice: wall time (the target's) and the client thread's CPU time
(``time.thread_time()``: what this process spends, less moved by other work on a
loaded machine than wall time; the "CPU" rows, which have no target).

    python bench/django_bench.py                      # print the table
    python bench/django_bench.py --quick              # fewer rounds and operations
    python bench/django_bench.py --write docs/benchmarks.md

``--write`` puts the section "Django backend vs Django's pool and persistent connections"
into FILE (``bench/sections.py``): it replaces that section if FILE has it and appends it
otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sections import put_section  # bench/sections.py: one section of docs/benchmarks.md

# Rounds of each measurement; --quick lowers it (main() sets it once). Many short rounds:
# on a shared machine a burst of load lands on one short round of every database alike.
ROUNDS = 45
QUICK_ROUNDS = 3
N = 300
QUICK_N = 200

DATABASES = ("pgwarden", "native_pool", "persistent")
SECTION = "## Django backend vs Django's pool and persistent connections"
TABLE = "pgwarden_bench_django_items"
TARGET = 1.05
#: The loops the target applies to (``connect`` is the work apart from the round trip).
TARGETED = ("get", "request")
#: Marks a loop's row of client CPU time (``time.thread_time()``) rather than wall time.
CPU_SUFFIX = "CPU"


def configure(url: str) -> None:
    """Django in this process: the three databases, all on *url*."""
    import django
    from django.conf import settings

    parts = conninfo_to_dict(url)
    common = {
        "NAME": parts.get("dbname", "postgres"),
        "USER": parts.get("user", ""),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", ""),
        "PORT": parts.get("port", ""),
    }
    postgresql = "django.db.backends.postgresql"
    settings.configure(
        DATABASES={
            "default": {"ENGINE": "pgwarden.django", **common},
            "pgwarden": {"ENGINE": "pgwarden.django", **common},
            "native_pool": {"ENGINE": postgresql, **common, "OPTIONS": {"pool": True}},
            "persistent": {"ENGINE": postgresql, **common, "CONN_MAX_AGE": None},
        },
        INSTALLED_APPS=["pgwarden.stress.django_app.StressConfig"],
        USE_TZ=True,
    )
    django.setup()


def item_model() -> Any:
    from django.db import models

    class Item(models.Model):  # type: ignore[misc]
        id = models.IntegerField(primary_key=True)
        name = models.TextField()

        class Meta:
            app_label = "pgwarden_stress"
            db_table = TABLE
            managed = False

    return Item


def _order(round_no: int) -> list[str]:
    """The databases, rotated by one place every round."""
    k = round_no % len(DATABASES)
    return [*DATABASES[k:], *DATABASES[:k]]


def _summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Medians (µs per operation), pgwarden's ratio over the faster of the other two, and
    the median and range of the per-round ratios (each round's databases are measured
    one after another, so a burst of load moves a per-round ratio less than a median).

    "The faster" is the peer with the lower median over all rounds, and each round's
    ratio is against that same peer. (Against the faster of the two *in that round*,
    ``min(pool, persistent)``, the per-round ratio is biased upwards whenever the two
    peers are about as fast: the smaller of two noisy times is below either's typical
    value. With equal backends that bias showed as a round median of 1.07-1.09 against
    medians within 1.03.)"""
    med = {name: statistics.median(values) for name, values in times.items()}
    faster = "native_pool" if med["native_pool"] <= med["persistent"] else "persistent"
    best = med[faster]
    per_round = [ours / peer for ours, peer in zip(times["pgwarden"], times[faster], strict=True)]
    return {
        "pgwarden_us": med["pgwarden"] * 1e6,
        "native_pool_us": med["native_pool"] * 1e6,
        "persistent_us": med["persistent"] * 1e6,
        "vs_faster": med["pgwarden"] / best,
        "vs_native_pool": med["pgwarden"] / med["native_pool"],
        "vs_persistent": med["pgwarden"] / med["persistent"],
        "vs_faster_round_median": statistics.median(per_round),
        "vs_faster_min": min(per_round),
        "vs_faster_max": max(per_round),
    }


def measure(n: int) -> dict[str, dict[str, float]]:
    from django.db import connections

    item = item_model()

    def get(alias: str) -> None:
        item.objects.using(alias).get(pk=1)

    def request(alias: str) -> None:
        item.objects.using(alias).get(pk=1)
        connections[alias].close_if_unusable_or_obsolete()  # request_finished

    def connect(alias: str) -> None:
        connection = connections[alias]
        connection.ensure_connection()
        connection.close_if_unusable_or_obsolete()

    ops: dict[str, Callable[[str], None]] = {"get": get, "request": request, "connect": connect}
    for alias in DATABASES:  # warm: a connection in each pool, Django's checks done
        for _ in range(50):
            request(alias)
    out: dict[str, dict[str, float]] = {}
    cpu_out: dict[str, dict[str, float]] = {}
    for name, op in ops.items():
        times: dict[str, list[float]] = {alias: [] for alias in DATABASES}
        cpu: dict[str, list[float]] = {alias: [] for alias in DATABASES}
        for round_no in range(ROUNDS):
            for alias in _order(round_no):
                started = time.perf_counter()
                cpu_started = time.thread_time()
                for _ in range(n):
                    op(alias)
                cpu[alias].append((time.thread_time() - cpu_started) / n)
                times[alias].append((time.perf_counter() - started) / n)
                connections[alias].close_if_unusable_or_obsolete()
        out[name] = _summary(times)
        cpu_out[f"{name} {CPU_SUFFIX}"] = _summary(cpu)
    out.update(cpu_out)
    for alias in DATABASES:
        connections[alias].close()
    return out


def _prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute(f"INSERT INTO {TABLE} VALUES (1, 'one')")


def _drop(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


def machine() -> str:
    import django

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
        f"Django {django.__version__}, psycopg {psycopg.__version__}, "
        f"psycopg_pool {_version('psycopg-pool')}, pgwarden {_version('pgwarden')}, "
        f"{platform.system()} {platform.release()}"
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


def render(
    results: dict[str, dict[str, float]],
    *,
    machine_text: str,
    version: str,
    n: int,
    quick: bool,
    load: tuple[str, str],
) -> str:
    lines = [
        SECTION,
        "",
        "Generated by `bench/django_bench.py`. Three Django databases on one throwaway",
        'server, measured in the same run: `ENGINE: "pgwarden.django"` (pgwarden\'s',
        "defaults), Django's PostgreSQL backend with its psycopg pool (`OPTIONS['pool']:",
        "True`), and the same backend with persistent connections (`CONN_MAX_AGE=None`, no",
        f"pool). `Item.objects.using(db).get(pk=1)`; median of {ROUNDS} rounds of {n}",
        "operations per database, one caller, pools warm; the order rotates every round.",
        "The ratio is pgwarden's median over the faster of the other two (target: at most",
        f"{TARGET:.2f}); in brackets, the median and the range of the per-round ratios",
        "(pgwarden's time over the same round's time of the peer with the lower median:",
        "against the faster of the two *in each round*, the ratio is biased upwards when",
        "the peers are about as fast, as the smaller of two noisy times is). The target",
        "is met when both the ratio and the per-round median are within it.",
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
        "| loop | pgwarden µs | Django pool µs | persistent µs | vs faster "
        f"| vs pool | vs persistent | target (<= {TARGET:.2f}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name not in TARGETED:
            verdict = "n/a"
        else:  # both statistics, so that neither a lucky median nor a lucky round decides
            worst = max(r["vs_faster"], r["vs_faster_round_median"])
            verdict = "met" if worst <= TARGET else "not met"
        lines.append(
            f"| {name} | {r['pgwarden_us']:.1f} | {r['native_pool_us']:.1f} "
            f"| {r['persistent_us']:.1f} "
            f"| {r['vs_faster']:.3f} (round median {r['vs_faster_round_median']:.2f}, "
            f"{r['vs_faster_min']:.2f}-{r['vs_faster_max']:.2f}) "
            f"| {r['vs_native_pool']:.3f} | {r['vs_persistent']:.3f} | {verdict} |"
        )
    lines += [
        "",
        "- **get**: the loop inside one request: the connection stays with the thread for",
        "  every backend, so this is the per-query cost (pgwarden adds its statement",
        "  reporting: the query counter, histogram and observers).",
        "- **request**: one `get` per request, each ended as Django ends one",
        "  (`close_if_unusable_or_obsolete()`): both pools return the connection and take",
        "  it again through Django's `connect()` (its parameters, autocommit, time zone",
        "  check); the persistent backend keeps its connection and only checks its age.",
        "  psycopg_pool hands its idle connections out in turn (first in, first out):",
        "  Django's pool (4 connections at its default `min_size`) sends consecutive",
        "  requests to different server sessions, which costs it more than its own",
        "  `connect` loop; pgwarden's pool (no `min_size`: one connection for one",
        "  caller) and persistent connections keep using one.",
        "- **connect**: `ensure_connection()` + `close_if_unusable_or_obsolete()`, no",
        "  query: the per-request work apart from the round trip (Django's `connect()`",
        "  and `close()`, the checkout and its return). No target: the persistent",
        "  backend checks nothing out.",
        f"- **... {CPU_SUFFIX}**: the same loop, timed by the client thread's CPU time",
        "  (`time.thread_time()`: this process's work, kernel time of its socket calls",
        "  included, less moved by other work on the machine than wall time). No target.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global ROUNDS
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="PostgreSQL URL (default: a throwaway server)")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"operations per database per round (default {N}; quick {QUICK_N})",
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
        configure(url)
        print("running...", file=sys.stderr, flush=True)
        results = measure(n)
        for name, r in results.items():
            print(f"  {name}: {format_result(r)}", file=sys.stderr, flush=True)
        from django.db import connections

        for alias in DATABASES:
            close_pool = getattr(connections[alias], "close_pool", None)
            if close_pool is not None:
                close_pool()

    text_out = render(
        results,
        machine_text=machine(),
        version=version,
        n=n,
        quick=args.quick,
        load=(load_start, _loadavg()),
    )
    print(text_out)
    if args.write:
        put_section(Path(args.write), text_out)
        print(f"wrote the section to {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
