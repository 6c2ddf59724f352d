"""psycopg_pool's own log lines, provoked against a real server, come out as pgwarden events.

With pgwarden's JSON formatter on the root logger, a pgwarden handle (async, and sync) lives
through killed backends, a database that refuses connections and a proxy that refuses them,
while a user's own ``psycopg_pool.ConnectionPool`` runs in the same process. Every line
written must be pgwarden's JSON; every record psycopg_pool emitted about pgwarden's pool must
come out exactly once, as a ``pool_*`` event on the ``pgwarden`` logger and never raw; every
record of the user's pool must come out raw and unchanged; no line may carry the password.

The database the handle uses is named after the password, so psycopg's connection repr and
the server's "database ... is not currently accepting connections" both carry it: without
redaction it would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import psycopg_pool
import pytest
from psycopg import sql

from pgwarden import AsyncDatabase, Database, Settings
from pgwarden.logs import POOL_LOGGERS, POOL_MESSAGES, QUIET_MARK, JsonFormatter
from pgwarden.testing import FaultProxy, PostgresServer

pytestmark = [pytest.mark.proxy, pytest.mark.slow]

USER_POOL = "user-pool"
ENVELOPE = ["ts", "level", "logger", "message", "event"]


@dataclass
class Seen:
    """One record psycopg_pool emitted, as the first filter on its logger saw it."""

    seq: int
    logger: str
    level: str
    template: str
    message: str
    thread: str
    quiet: bool


class Spy(logging.Filter):
    """First filter on psycopg_pool's loggers: numbers each record (``spy_seq``, carried into
    the event by the bridge as an extra field) and remembers it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, Seen] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            seq = next(self._seq)
        record.spy_seq = seq
        args = record.args if isinstance(record.args, tuple) else ()
        quiet = any(getattr(type(a), QUIET_MARK, False) for a in args)
        self.seen[seq] = Seen(
            seq,
            record.name,
            record.levelname,
            str(record.msg),
            record.getMessage(),
            threading.current_thread().name,
            quiet,
        )
        return True

    def templates(self) -> set[str]:
        return {s.template for s in self.seen.values()}


@contextmanager
def json_on_root() -> Iterator[tuple[io.StringIO, Spy]]:
    """pgwarden's JSON formatter on the root logger at DEBUG, the spy first on psycopg_pool's
    loggers; pgwarden's and psycopg_pool's loggers at DEBUG, propagating."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    spy = Spy()
    # psycopg_pool's loggers at DEBUG themselves: their parent "psycopg" stays at the WARNING
    # psycopg gives it (psycopg's own DEBUG lines describe connections, database included).
    touched = [logging.getLogger(n) for n in ("pgwarden", *POOL_LOGGERS)]
    saved = [(lg, lg.level, lg.propagate) for lg in touched]
    root_level = root.level
    for lg in touched:
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
    for name in POOL_LOGGERS:
        logging.getLogger(name).filters.insert(0, spy)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream, spy
    finally:
        root.removeHandler(handler)
        root.setLevel(root_level)
        for name in POOL_LOGGERS:
            logging.getLogger(name).removeFilter(spy)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


def users_own_pool(server: PostgresServer, stop: threading.Event) -> None:
    """A plain psycopg_pool pool, as an application might run one next to pgwarden: a
    connection returned inside a transaction, one returned broken, then steady use."""
    with psycopg_pool.ConnectionPool(
        server.url, name=USER_POOL, min_size=1, max_size=2, open=False
    ) as pool:
        pool.open(wait=True, timeout=10)
        conn = pool.getconn()
        conn.execute("SELECT 1")  # leaves it INTRANS: "rolling back returned connection"
        pool.putconn(conn)
        conn = pool.getconn()
        server.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        pool.putconn(conn)  # "discarding closed connection"
        while not stop.wait(0.05):
            with pool.connection(timeout=10) as c:
                c.execute("SELECT 1")


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Faults:
    """The faults (blocking calls: the async flavour runs them in a thread)."""

    def __init__(self, server: PostgresServer, proxy: FaultProxy, spy: Spy) -> None:
        self.server, self.proxy, self.spy, self.dbname = server, proxy, spy, server.password
        self._failures_seen = 0

    def kill_backends(self) -> None:
        self.server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [self.dbname],
        )

    def database_refuses(self) -> None:
        """Connects fail with an error naming the database (the password), and the pool's
        connections are gone."""
        self._allow(False)
        self.kill_backends()

    def database_accepts(self) -> None:
        self._allow(True)

    def proxy_refuses(self) -> None:
        self.proxy.refuse()
        self.proxy.drop_connections()

    def proxy_heals(self) -> None:
        self.proxy.heal()

    def wait_for_a_connect_failure(self) -> None:
        """Until psycopg_pool logs one more failed connect than before."""

        def failures() -> int:
            return sum(s.template == "error connecting in %r: %s" for s in self.spy.seen.values())

        wait_for(lambda: failures() > self._failures_seen, 15)
        self._failures_seen = failures()

    def _allow(self, allow: bool) -> None:
        self.server.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(self.dbname), sql.SQL("true" if allow else "false")
            )
        )


SCRIPT = (
    "left_in_transaction",
    "kill_backends",
    "query",
    "database_refuses",
    "query_fails",
    "wait_for_a_connect_failure",
    "database_accepts",
    "query",
    "proxy_refuses",
    "query_fails",
    "wait_for_a_connect_failure",
    "proxy_heals",
    "query",
)


def run_async(url: str, faults: Faults) -> None:
    async def main() -> None:
        async with AsyncDatabase(Settings(url=url, min_size=2, max_size=4)) as db:
            await db.ready()
            await asyncio.gather(*(db.fetchval("SELECT pg_sleep(0.05)") for _ in range(8)))
            for step in SCRIPT:
                if step == "query":
                    assert await db.fetchval("SELECT 1", timeout=15) == 1
                elif step == "left_in_transaction":
                    async with db.connection() as conn:
                        await conn.execute("BEGIN")
                elif step == "query_fails":
                    with contextlib.suppress(Exception):
                        await db.fetchval("SELECT 1", timeout=1)
                else:
                    await asyncio.to_thread(getattr(faults, step))

    asyncio.run(main())


def run_sync(url: str, faults: Faults) -> None:
    with Database(Settings(url=url, min_size=2, max_size=4)) as db:
        db.ready()
        threads = [
            threading.Thread(
                target=db.fetchval, args=("SELECT pg_sleep(0.05)",), name=f"caller-{i}"
            )
            for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for step in SCRIPT:
            if step == "query":
                assert db.fetchval("SELECT 1", timeout=15) == 1
            elif step == "left_in_transaction":
                with db.connection() as conn:
                    conn.execute("BEGIN")
            elif step == "query_fails":
                with contextlib.suppress(Exception):
                    db.fetchval("SELECT 1", timeout=1)
            else:
                getattr(faults, step)()


@pytest.mark.parametrize("flavor", ["async", "sync"])
def test_psycopg_pool_lines_are_pgwarden_events_once_and_a_users_pool_is_untouched(
    pg_server_factory: Callable[..., PostgresServer],
    fault_proxy_factory: Callable[..., FaultProxy],
    flavor: str,
) -> None:
    server = pg_server_factory()
    password = server.password
    server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(password)))
    proxy = fault_proxy_factory(server.host, server.port)
    url = proxy.url_for(server.url_for(dbname=password))
    ours = f"pgwarden-{os.getpid()}"

    with json_on_root() as (stream, spy):
        stop = threading.Event()
        errors: list[BaseException] = []

        def user() -> None:
            try:
                users_own_pool(server, stop)
            except BaseException as exc:
                errors.append(exc)

        user_thread = threading.Thread(target=user, name=f"{USER_POOL}-driver")
        user_thread.start()
        try:
            (run_async if flavor == "async" else run_sync)(url, Faults(server, proxy, spy))
        finally:
            stop.set()
            user_thread.join(30)
        assert not errors, errors
    output = stream.getvalue()
    seen = dict(spy.seen)

    # Every line is one JSON object from pgwarden's formatter; none carries the password.
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines
    for line in lines:
        assert list(line)[:5] == ENVELOPE, line
    assert password not in output

    # Each record psycopg_pool emitted is written once (raw or as an event), or, for the
    # breaker's own refusals, not at all.
    written = Counter(line["spy_seq"] for line in lines if "spy_seq" in line)
    assert max(written.values()) == 1
    assert set(written) == {s.seq for s in seen.values() if not s.quiet}

    def is_users(s: Seen) -> bool:
        return s.thread.startswith(USER_POOL)

    def is_ours(s: Seen) -> bool:  # the handle's callers and tasks, its pool's workers
        return s.thread == "MainThread" or s.thread.startswith(("pgwarden-", "caller-"))

    by_seq = {line["spy_seq"]: line for line in lines if "spy_seq" in line}
    raw = {seq for seq, line in by_seq.items() if line["logger"] in POOL_LOGGERS}
    users = {s.seq for s in seen.values() if is_users(s)}
    mine = {s.seq for s in seen.values() if is_ours(s) and not s.quiet}

    # The user's pool: every record raw, as psycopg_pool wrote it.
    assert raw == users
    for seq in users:
        line, original = by_seq[seq], seen[seq]
        assert line["logger"] == original.logger
        assert line["level"] == original.level
        assert line["message"] == original.message
        assert line["event"] is None
    user_templates = {seen[seq].template for seq in users}
    assert "rolling back returned connection: %s" in user_templates
    assert "discarding closed connection: %s" in user_templates

    # pgwarden's pool: every record an event on the pgwarden logger, named after its message.
    assert mine
    events: Counter[str] = Counter()
    for seq in mine:
        line, original = by_seq[seq], seen[seq]
        assert line["logger"] == "pgwarden"
        assert line["origin"] == original.logger
        assert line["pool"] == ours
        assert line["event"] == POOL_MESSAGES[original.template][0]
        events[line["event"]] += 1
    assert ours not in {s.message for s in seen.values() if s.seq in raw}
    assert {"pool_connect_failed", "pool_connection_added", "pool_returned_broken"} <= set(
        events
    ), events
    connect_failures = [by_seq[s]["message"] for s in mine if "connecting" in seen[s].template]
    assert any("***" in m for m in connect_failures), connect_failures  # the database name
    in_transaction = [seen[s].message for s in mine if "rolling back" in seen[s].template]
    assert any(password in m for m in in_transaction), in_transaction  # it was there to redact
    assert "pool_returned_in_transaction" in events
