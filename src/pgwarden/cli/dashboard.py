"""``pgwarden dashboard [URL]``: serve the live dashboard for a database or a stats endpoint.

Theory of operation
-------------------
With a database URL (the argument, else ``PGWARDEN_URL``, else ``DATABASE_URL``, else a
throwaway embedded PostgreSQL, as ``pgwarden check`` does) the command creates one
:class:`pgwarden.AsyncDatabase`, mounts :func:`pgwarden.dashboard.app` on it and serves it
with a minimal standard-library HTTP server on ``127.0.0.1:8765`` (``--host``, ``--port``;
``--port 0`` picks a free port).  The address is printed on stdout as soon as it listens.

So that the charts have something to show, a light probe runs in the background: one
``SELECT 1`` per second and a health check every five seconds.  ``--load`` adds to it a
bounded synthetic workload (``--load-rate`` statements per second over four workers, default
40/s, at most 2000/s): short ``pg_sleep`` and ``generate_series`` reads with a long-tailed
latency mix, a burst every 15 s that briefly asks for 1.5 times the pool so callers queue,
one statement in a hundred failing on purpose (division by zero, so the errors chart moves) and
one in five hundred slower than the slow-query threshold.  Everything it sends is read-only.

With ``--stats-url URL`` (or an ``http(s)://`` URL as the argument) no database is opened:
the dashboard polls that endpoint instead, e.g. ``/pgwarden/stats.json`` of an application
that mounts the dashboard app, or any endpoint returning ``db.stats()`` as JSON.

It runs until Ctrl-C or SIGTERM (exit 0), or for ``--duration`` seconds.  Exit 2: bad
arguments, the port cannot be bound, or the embedded server cannot start.  Every URL printed
has its password masked, and so has everything the page shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import math
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from pgwarden._redact import redact
from pgwarden.cli._args import port, positive_float
from pgwarden.cli._common import err, url_secrets
from pgwarden.cli._embedded import with_embedded

__all__ = ["build_parser", "run"]

DEFAULT_PORT = 8765
DEFAULT_LOAD_RATE = 40.0
MAX_LOAD_RATE = 2000.0
LOAD_WORKERS = 4
BURST_EVERY = 15.0
APPLICATION_NAME = "pgwarden-dashboard"


def _rate(text: str) -> float:
    value = positive_float(text)
    if value > MAX_LOAD_RATE:
        raise argparse.ArgumentTypeError(f"at most {MAX_LOAD_RATE:g} statements per second")
    return value


def build_parser(prog: str = "pgwarden dashboard") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve a live dashboard (pool usage, latency percentiles, errors and retries, "
            "breaker state, recent events) for a database, or for a running application's "
            "stats endpoint. With no URL and no DATABASE_URL a throwaway embedded PostgreSQL "
            "is used."
        ),
        epilog="exit status: 0 stopped (Ctrl-C, SIGTERM or --duration), 2 could not start.",
    )
    parser.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="postgresql://user:password@host:port/dbname, or an http(s):// stats endpoint "
        "(default: PGWARDEN_URL, then DATABASE_URL, then an embedded server)",
    )
    parser.add_argument(
        "--stats-url",
        metavar="URL",
        help="poll this http(s) stats endpoint (e.g. http://app:8000/pgwarden/stats.json) "
        "instead of opening a database",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port",
        type=port,
        default=DEFAULT_PORT,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="run a bounded synthetic read workload so every chart moves",
    )
    parser.add_argument(
        "--load-rate",
        type=_rate,
        default=DEFAULT_LOAD_RATE,
        metavar="N",
        help="statements per second of --load (default: %(default)g, at most 2000)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    return parser


def _settings(url: str) -> Any:
    from pgwarden.errors import SettingsError
    from pgwarden.settings import Settings

    overrides: dict[str, Any] = {"url": url}
    if "PGWARDEN_APPLICATION_NAME" not in os.environ:
        overrides["application_name"] = APPLICATION_NAME
    try:
        return Settings.from_env(**overrides)
    except SettingsError:
        # A PGWARDEN_* variable that is not a setting (test harnesses use some): defaults.
        return Settings(url=url, application_name=overrides.get("application_name", "pgwarden"))


# --------------------------------------------------------------------------------------------
# Background activity


async def _probe(db: Any, stop: asyncio.Event) -> None:
    """One SELECT 1 per second and a health check every five seconds."""
    tick = 0
    while not stop.is_set():
        with contextlib.suppress(Exception):
            await db.fetchval("SELECT 1", timeout=5)
            if tick % 5 == 0:
                await db.health()
        tick += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _statement(rng: random.Random) -> tuple[str, tuple[Any, ...]]:
    roll = rng.random()
    if roll < 0.01:
        return "SELECT 1 / (0 * %s::int)", (1,)  # fails on purpose: the errors chart moves
    if roll < 0.012:
        return "SELECT pg_sleep(%s)", (1.1,)  # past the default 1 s slow-query threshold
    if roll < 0.10:
        return "SELECT count(*) FROM generate_series(1, %s)", (rng.randint(10_000, 200_000),)
    # Long-tailed latency: mostly 1-5 ms, sometimes tens of milliseconds.
    seconds = min(0.08, rng.lognormvariate(math.log(0.002), 0.9))
    return "SELECT pg_sleep(%s)", (round(seconds, 5),)


async def _worker(db: Any, stop: asyncio.Event, interval: float, seed: int) -> None:
    rng = random.Random(seed)
    next_at = time.monotonic()
    while not stop.is_set():
        sql, params = _statement(rng)
        with contextlib.suppress(Exception):
            await db.fetchval(sql, params, timeout=5)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay < -1.0:  # fell behind (slow statement): do not try to catch up
            next_at = time.monotonic()
        elif delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


async def _bursts(db: Any, stop: asyncio.Event) -> None:
    """Every 15 s (the first after 5 s), ask for half again as many connections as the pool
    has, for about 0.9 s: the pool fills and callers queue, yet no statement crosses the
    default 1 s slow-query threshold."""
    wait = 5.0  # the first burst comes early, so a fresh dashboard shows one soon
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return
        wait = BURST_EVERY
        pool = int(getattr(db.settings, "max_size", 10))
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(db.fetchval("SELECT pg_sleep(0.45)", timeout=5) for _ in range(pool + pool // 2)),
                return_exceptions=True,
            )


def _activity(db: Any, args: argparse.Namespace, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    if not args.load:
        return [asyncio.create_task(_probe(db, stop))]
    interval = LOAD_WORKERS / float(args.load_rate)
    tasks = [asyncio.create_task(_worker(db, stop, interval, seed)) for seed in range(LOAD_WORKERS)]
    tasks.append(asyncio.create_task(_bursts(db, stop)))
    tasks.append(asyncio.create_task(_probe(db, stop)))
    return tasks


# --------------------------------------------------------------------------------------------
# Serving


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _serve(source: object, args: argparse.Namespace, label: str, db: Any) -> int:
    from pgwarden.dashboard import app
    from pgwarden.dashboard._server import HTTPServer

    dashboard = app(source)
    server = HTTPServer(dashboard, args.host, int(args.port))
    try:
        await server.start()
    except OSError as exc:
        dashboard.close()
        err(f"pgwarden dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return 2
    dashboard.start_sampling()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM,):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    print(f"pgwarden dashboard: serving {server.url} for {label} (Ctrl-C to stop)", flush=True)
    if not _is_loopback(str(args.host)):
        err(
            "pgwarden dashboard: warning: listening beyond loopback; the dashboard has no "
            "authentication, so anyone who can reach this address can read it"
        )
    tasks: list[asyncio.Task[None]] = []
    try:
        if db is not None:
            try:
                await db.ready()
            except Exception as exc:
                err(f"pgwarden dashboard: database not ready yet: {redact(str(exc))}")
            tasks = _activity(db, args, stop)
        if args.duration is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), float(args.duration))
        else:
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for signum in installed:
            loop.remove_signal_handler(signum)
        await server.close()
        dashboard.close()
        if db is not None:
            with contextlib.suppress(Exception):
                await db.close(timeout=2)
    return 0


async def _serve_database(url: str, args: argparse.Namespace) -> int:
    from pgwarden import AsyncDatabase

    db = AsyncDatabase(_settings(url))
    label = redact(url, *url_secrets(url))
    return await _serve(db, args, label, db)


def _run_loop(coro: Any) -> int:
    try:
        result: int = asyncio.run(coro)
    except KeyboardInterrupt:
        err("pgwarden dashboard: stopped")
        return 0
    return result


def _run_embedded(args: argparse.Namespace, prog: str) -> int:
    return with_embedded(
        prog, lambda url, _: _run_loop(_serve_database(url, args)), doing="serving"
    )


def run(argv: Sequence[str], prog: str = "pgwarden dashboard") -> int:
    """Entry point used by :mod:`pgwarden.cli.main`. Returns the exit code."""
    args = build_parser(prog).parse_args(list(argv))
    stats_url = args.stats_url
    url = args.url
    if url is not None and url.startswith(("http://", "https://")):
        if stats_url is not None:
            err(f"{prog}: give either an http(s) URL or --stats-url, not both")
            return 2
        stats_url, url = url, None
    if stats_url is not None:
        if url is not None:
            err(f"{prog}: --stats-url and a database URL are mutually exclusive")
            return 2
        if not stats_url.startswith(("http://", "https://")):
            err(f"{prog}: --stats-url must be an http(s):// URL")
            return 2
        return _run_loop(_serve(stats_url, args, redact(stats_url), None))
    if url is None:
        url = os.environ.get("PGWARDEN_URL") or os.environ.get("DATABASE_URL") or None
    if url is None:
        return _run_embedded(args, prog)
    return _run_loop(_serve_database(url, args))
