"""The failure classifier against the exceptions that real servers raise.

``tests/unit/test_classify.py`` builds its exceptions by hand. Here each row of
``ROWS`` provokes one real failure with plain (sync) psycopg, against a throwaway
PostgreSQL, a real PgBouncer (1.18, transaction mode) or the fault proxy, and
checks what :func:`classify` says in the phase where the failure happened:
CONNECT for ``connect()``, FIRST_USE for the first statement on a connection
that sat idle, STATEMENT, and COMMIT for ``commit()``.

Each row also checks a fragment of the message and the SQLSTATE, so a row that
provoked some other failure than the one it names fails instead of passing by
luck; and that no password the row used appears in ``classify_with_reason``'s
reason.

Timing: nothing waits with a fixed sleep. Readiness is polled with bounded
deadlines (a backend seen in ``pg_sleep``, a socket that became readable), and
the two races against a restarting server are tried a bounded number of times.

Not provoked here (see the notes at the end of ``ROWS``):

* 57P02 crash_shutdown as an exception: PostgreSQL 14+ sends it as a
  WARNING-level notice just before closing the socket, so the client raises
  "server closed the connection unexpectedly"; the row for a crashed backend
  checks both.
* PgBouncer's "pgbouncer cannot connect to server" and "server login has been
  failing, cached error: ...": PgBouncer 1.18 has neither text (newer versions do).
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import pytest
from psycopg import sql

from pgwarden.core.classify import FailureKind, Phase, classify, classify_with_reason, sqlstate_of

if TYPE_CHECKING:
    from pgwarden.testing import FaultProxy, PgBouncerServer, PostgresServer

K = FailureKind
CONNECT = Phase.CONNECT
FIRST_USE = Phase.FIRST_USE
STATEMENT = Phase.STATEMENT
COMMIT = Phase.COMMIT

Conn = psycopg.Connection[Any]


# --- the environment a row runs in ---------------------------------------------------------------


class Env:
    """What a row may use: the plugin's fixtures (fetched only when asked for),
    cleanups that run after the row, and every password it used."""

    def __init__(self, request: pytest.FixtureRequest, stack: ExitStack) -> None:
        self._request = request
        self.stack = stack
        self.secrets: list[str] = []

    @property
    def pg(self) -> PostgresServer:
        """The session's shared server (use only for faults that touch nothing else)."""
        server: PostgresServer = self._request.getfixturevalue("pg_server")
        self._secret(server.password)
        return server

    def server(self, settings: Mapping[str, object] | None = None) -> PostgresServer:
        """A dedicated server, for rows that restart, stop, crash or fill it."""
        make: Callable[..., PostgresServer] = self._request.getfixturevalue("pg_server_factory")
        server = make(dict(settings) if settings else None)
        self._secret(server.password)
        return server

    def bouncer(self, postgres: PostgresServer | None = None, **kwargs: Any) -> PgBouncerServer:
        """A dedicated PgBouncer (kwargs: see PgBouncerServer)."""
        make: Callable[..., PgBouncerServer] = self._request.getfixturevalue("pgbouncer_factory")
        bouncer = make(postgres if postgres is not None else self.pg, **kwargs)
        self._secret(bouncer.password)
        return bouncer

    @property
    def shared_bouncer(self) -> PgBouncerServer:
        """The session's PgBouncer (for rows that change nothing in it)."""
        bouncer: PgBouncerServer = self._request.getfixturevalue("pgbouncer")
        self._secret(bouncer.password)
        return bouncer

    @property
    def proxy(self) -> FaultProxy:
        """A fault proxy in front of the shared server."""
        self._secret(self.pg.password)
        proxy: FaultProxy = self._request.getfixturevalue("fault_proxy")
        return proxy

    def role(self, server: PostgresServer, options: str = "") -> str:
        """Create a non-superuser login role with a random password; return its URL."""
        name = f"pgw_{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        self._secret(password)
        ident = sql.Identifier(name)
        server.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} " + options).format(
                ident, sql.Literal(password)
            )
        )
        self.stack.callback(lambda: server.execute(sql.SQL("DROP ROLE {}").format(ident)))
        return server.url_for(user=name, password=password)

    def table(self, server: PostgresServer, columns: str, rows: str = "") -> str:
        """Create a uniquely named table (and fill it); return its name."""
        name = f"pgw_{secrets.token_hex(4)}"
        ident = sql.Identifier(name)
        server.execute(sql.SQL("CREATE TABLE {} (" + columns + ")").format(ident))
        self.stack.callback(lambda: server.execute(sql.SQL("DROP TABLE {}").format(ident)))
        if rows:
            server.execute(sql.SQL("INSERT INTO {} VALUES " + rows).format(ident))
        return name

    def connect(self, conninfo: str, **kwargs: Any) -> Conn:
        """A connection closed after the row, whatever happens to it."""
        conn: Conn = psycopg.connect(conninfo, **kwargs)
        self.stack.callback(conn.close)
        return conn

    def _secret(self, value: str) -> None:
        if value not in self.secrets:
            self.secrets.append(value)


# --- helpers -------------------------------------------------------------------------------------


def raised(action: Callable[[], object]) -> psycopg.Error:
    """Run ``action`` and return the psycopg error it raised; fail if it raised none."""
    try:
        action()
    except psycopg.Error as exc:
        return exc
    pytest.fail("the action was expected to fail, and it succeeded")


def connect_only(conninfo: str, **kwargs: Any) -> None:
    """Open a connection and close it at once (connect failures are what we are after)."""
    psycopg.connect(conninfo, **kwargs).close()


def poll(what: str, attempt: Callable[[], bool], timeout: float = 10.0) -> None:
    """Call ``attempt`` until it returns True; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not attempt():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


def wait_sleeping(server: PostgresServer, pid: int) -> None:
    """Wait until backend ``pid`` is inside pg_sleep (so a fault hits a running statement)."""
    poll(
        f"backend {pid} to run pg_sleep",
        lambda: bool(
            server.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'PgSleep'", [pid]
            )
        ),
    )


def wait_readable(conn: Conn, timeout: float = 10.0) -> None:
    """Wait until the server side has sent something (an error) or closed the socket."""
    ready, _, _ = select.select([conn.fileno()], [], [], timeout)
    assert ready, f"nothing arrived on the idle connection within {timeout:.0f}s"


@contextmanager
def meanwhile(action: Callable[[], object]) -> Iterator[None]:
    """Run ``action`` in a thread while the body runs; re-raise what the thread raised."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name="pgw-fault", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)
    assert not thread.is_alive(), "the fault thread did not finish"
    if failures:
        raise failures[0]


def fill_until_refused(env: Env, conninfo: str, limit: int) -> psycopg.Error:
    """Open connections (kept open until the row ends) until one is refused."""
    for _ in range(limit):
        try:
            env.connect(conninfo, connect_timeout=5)
        except psycopg.OperationalError as exc:
            return exc
    pytest.fail(f"{limit} connections were all accepted")


def read_only_server(env: Env) -> PostgresServer:
    # settings={"default_transaction_read_only": "on"} cannot be used: the harness sets
    # the superuser's password (ALTER ROLE) after start, which a read-only server
    # refuses. ALTER SYSTEM + reload (set_config) works, for new sessions.
    server = env.server()
    server.set_config(default_transaction_read_only="on")
    return server


def in_pg_sleep(server: PostgresServer, conn: Conn, fault: Callable[[], object]) -> psycopg.Error:
    """Run ``SELECT pg_sleep(10)`` on ``conn`` and inject ``fault`` once it is running."""
    pid = conn.info.backend_pid

    def inject() -> None:
        wait_sleeping(server, pid)
        fault()

    with meanwhile(inject):
        return raised(lambda: conn.execute("SELECT pg_sleep(10)"))


# --- connect failures: PostgreSQL and the network ------------------------------------------------


def refused(env: Env) -> psycopg.Error:
    proxy = env.proxy
    proxy.refuse()  # stops listening: a closed port
    return raised(lambda: connect_only(proxy.url_for(env.pg.url), connect_timeout=2))


def connect_timeout(env: Env) -> psycopg.Error:
    proxy = env.proxy
    proxy.blackhole()
    # libpq (and psycopg) round connect_timeout up to 2 s: 1 would wait as long.
    return raised(lambda: connect_only(proxy.url_for(env.pg.url), connect_timeout=2))


def no_socket(env: Env) -> psycopg.Error:
    missing = f"/nonexistent-pgwarden-{secrets.token_hex(4)}"
    return raised(lambda: connect_only(f"host={missing} port=5432 user=x connect_timeout=2"))


def unknown_host(env: Env) -> psycopg.Error:
    # RFC 6761: .invalid never resolves.
    return raised(lambda: connect_only("postgresql://x:y@pgwarden-test.invalid/db"))


def too_many_clients(env: Env) -> psycopg.Error:
    # With no reserved slots, a non-superuser that finds every slot taken gets
    # "sorry, too many clients already".
    server = env.server({"max_connections": 3, "superuser_reserved_connections": 0})
    return fill_until_refused(env, env.role(server), limit=6)


def reserved_slots(env: Env) -> psycopg.Error:
    # 4 slots, 1 kept for superusers: the 4th non-superuser is refused with
    # "remaining connection slots are reserved ..." (a superuser would get the slot,
    # and the next superuser "too many clients").
    server = env.server({"max_connections": 4, "superuser_reserved_connections": 1})
    return fill_until_refused(env, env.role(server), limit=6)


def role_connection_limit(env: Env) -> psycopg.Error:
    url = env.role(env.pg, "CONNECTION LIMIT 1")
    env.connect(url)
    return raised(lambda: connect_only(url))


def shutting_down(env: Env) -> psycopg.Error:
    # A smart shutdown (pg_ctl stop -m smart, SIGTERM) waits for open sessions to end
    # and meanwhile refuses new ones with 57P03: deterministic while `keep` is open.
    server = env.server()
    keep = env.connect(server.url)
    refusals: list[psycopg.Error] = []

    def refused_now() -> bool:
        try:
            connect_only(server.url, connect_timeout=2)
        except psycopg.OperationalError as exc:
            refusals.append(exc)
            return True
        return False

    with meanwhile(lambda: server.stop(mode="smart")):
        try:
            poll("the smart shutdown to refuse new sessions", refused_now)
        finally:
            keep.close()  # the last session ends: the shutdown completes, the thread ends
    return refusals[0]


def starting_up(env: Env) -> psycopg.Error:
    # The "starting up" window of a restart is a few milliseconds: hammer the server with
    # connections while it restarts, a bounded number of times. Every failure seen on the
    # way (refused, closed, shutting down, starting up, not yet accepting) must mean
    # "nothing ran".
    server = env.server()
    seen: list[psycopg.Error] = []
    for _ in range(20):
        stop = threading.Event()

        def hammer(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    connect_only(server.url, connect_timeout=2)
                except psycopg.OperationalError as err:
                    seen.append(err)

        thread = threading.Thread(target=hammer, name="pgw-hammer", daemon=True)
        thread.start()
        try:
            server.restart(mode="immediate")
        finally:
            stop.set()
            thread.join(30)
        if any("starting up" in str(exc) for exc in seen):
            break
    return _restart_refusal(seen, "starting up")


def in_recovery(env: Env) -> psycopg.Error:
    # A backend killed with SIGKILL (what the OOM killer does) makes the postmaster
    # restart every session and run crash recovery; new sessions meanwhile get
    # "in recovery mode" or "not yet accepting connections" (57P03).
    server = env.server()
    seen: list[psycopg.Error] = []
    for _ in range(10):
        victim = psycopg.connect(server.url)
        try:
            os.kill(victim.info.backend_pid, signal.SIGKILL)
        finally:
            victim.close()
        recovered: list[bool] = []

        def back(recovered: list[bool] = recovered) -> bool:
            # Until the postmaster notices the crash, connections still succeed.
            try:
                connect_only(server.url, connect_timeout=2)
            except psycopg.OperationalError as err:
                seen.append(err)
                recovered.append(False)
                return False
            return bool(recovered)

        poll("the server to crash and recover", back, timeout=30)
        if any("recovery mode" in str(exc) for exc in seen):
            break
    return _restart_refusal(seen, "recovery mode")


def _restart_refusal(seen: Sequence[psycopg.Error], wanted: str) -> psycopg.Error:
    for exc in seen:
        kind, reason = classify_with_reason(exc, CONNECT)
        assert kind is K.NOTHING_RAN, f"{exc!s}: {kind} ({reason})"
    cannot_connect_now = [exc for exc in seen if "the database system is" in str(exc)]
    best = [exc for exc in cannot_connect_now if wanted in str(exc)] or cannot_connect_now
    if not best:
        pytest.fail(f"no 57P03 refusal in {len(seen)} failed connection attempts")
    return best[0]


def password_failed(env: Env) -> psycopg.Error:
    wrong = f"wrong-{secrets.token_urlsafe(8)}"
    env.secrets.append(wrong)
    return raised(lambda: connect_only(env.pg.url_for(password=wrong)))


def role_missing_tcp(env: Env) -> psycopg.Error:
    # Over TCP with SCRAM the server does not reveal that the role is missing.
    return raised(lambda: connect_only(env.pg.url_for(user="pgw_nobody", password="x")))


def role_missing_socket(env: Env) -> psycopg.Error:
    # The Unix socket trusts local users, so the server says what is wrong.
    server = env.pg
    return raised(
        lambda: psycopg.connect(
            host=str(server.socket_dir), port=server.port, user="pgw_nobody", dbname="postgres"
        ).close()
    )


def database_missing(env: Env) -> psycopg.Error:
    return raised(lambda: connect_only(env.pg.url_for(dbname=f"pgw_{secrets.token_hex(4)}")))


def database_not_allowing(env: Env) -> psycopg.Error:
    server = env.pg
    name = f"pgw_{secrets.token_hex(4)}"
    server.execute(
        sql.SQL("CREATE DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name))
    )
    env.stack.callback(
        lambda: server.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    )
    return raised(lambda: connect_only(server.url_for(dbname=name)))


def session_read_only(env: Env) -> psycopg.Error:
    server = read_only_server(env)
    return raised(lambda: connect_only(server.url + "?target_session_attrs=read-write"))


def not_a_standby(env: Env) -> psycopg.Error:
    return raised(lambda: connect_only(env.pg.url + "?target_session_attrs=standby"))


def no_host_is_writable(env: Env) -> psycopg.Error:
    # The shape of a failover with a multi-host URL: one host down, one read-only.
    server = read_only_server(env)
    proxy = env.proxy
    proxy.refuse()
    conninfo = (
        f"host={proxy.host},{server.host} port={proxy.port},{server.port} user=postgres "
        f"password={server.password} dbname=postgres target_session_attrs=read-write "
        "connect_timeout=2"
    )
    return raised(lambda: connect_only(conninfo))


# --- a connection that dies ----------------------------------------------------------------------


def admin_shutdown_idle(env: Env) -> psycopg.Error:
    server = env.server()
    conn = env.connect(server.url, autocommit=True)
    assert server.terminate_backends() >= 1
    return raised(lambda: conn.execute("SELECT 1"))


def admin_shutdown_running(env: Env) -> psycopg.Error:
    server = env.pg
    conn = env.connect(server.url, autocommit=True)
    pid = conn.info.backend_pid
    return in_pg_sleep(
        server, conn, lambda: server.execute("SELECT pg_terminate_backend(%s)", [pid])
    )


def fast_restart_idle(env: Env) -> psycopg.Error:
    server = env.server()
    conn = env.connect(server.url, autocommit=True)
    server.restart(mode="fast")
    return raised(lambda: conn.execute("SELECT 1"))


def crash_restart_idle(env: Env) -> psycopg.Error:
    server = env.server()
    conn = env.connect(server.url, autocommit=True)
    server.restart(mode="immediate")
    return raised(lambda: conn.execute("SELECT 1"))


def crash_restart_running(env: Env) -> psycopg.Error:
    server = env.server()
    conn = env.connect(server.url, autocommit=True)
    return in_pg_sleep(server, conn, lambda: server.restart(mode="immediate"))


def other_backend_crashed(env: Env) -> psycopg.Error:
    server = env.server()
    conn = env.connect(server.url, autocommit=True)
    notices: list[str | None] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.sqlstate))
    victim = env.connect(server.url)
    victim_pid = victim.info.backend_pid
    exc = in_pg_sleep(server, conn, lambda: os.kill(victim_pid, signal.SIGKILL))
    # 57P02 arrives, but only as a notice: the error raised is the closed socket.
    assert "57P02" in notices, notices
    return exc


def proxy_reset_running(env: Env) -> psycopg.Error:
    proxy = env.proxy
    conn = env.connect(proxy.url_for(env.pg.url), autocommit=True)
    pid = conn.info.backend_pid
    # The server does not notice a vanished client while it sleeps: end it.
    env.stack.callback(lambda: env.pg.execute("SELECT pg_terminate_backend(%s)", [pid]))
    return in_pg_sleep(env.pg, conn, proxy.reset)


def proxy_reset_idle(env: Env) -> psycopg.Error:
    proxy = env.proxy
    conn = env.connect(proxy.url_for(env.pg.url), autocommit=True)
    proxy.reset()
    return raised(lambda: conn.execute("SELECT 1"))


def proxy_dropped_idle(env: Env) -> psycopg.Error:
    proxy = env.proxy
    conn = env.connect(proxy.url_for(env.pg.url), autocommit=True)
    proxy.drop_connections()
    return raised(lambda: conn.execute("SELECT 1"))


def reused_after_loss(env: Env) -> psycopg.Error:
    proxy = env.proxy
    conn = env.connect(proxy.url_for(env.pg.url), autocommit=True)
    proxy.drop_connections()
    raised(lambda: conn.execute("SELECT 1"))
    return raised(lambda: conn.execute("SELECT 1"))


def used_after_close(env: Env) -> psycopg.Error:
    conn = env.connect(env.pg.url, autocommit=True)
    conn.close()
    return raised(lambda: conn.execute("SELECT 1"))


def idle_session_timeout(env: Env) -> psycopg.Error:
    conn = env.connect(env.pg.url, autocommit=True)
    conn.execute("SET idle_session_timeout = '100ms'")
    wait_readable(conn)
    return raised(lambda: conn.execute("SELECT 1"))


def idle_in_transaction_timeout(env: Env) -> psycopg.Error:
    conn = env.connect(env.pg.url)
    conn.execute("SET idle_in_transaction_session_timeout = '100ms'")
    wait_readable(conn)
    return raised(lambda: conn.execute("SELECT 1"))


def commit_cut(when: Literal["before", "after"]) -> Callable[[Env], psycopg.Error]:
    def provoke(env: Env) -> psycopg.Error:
        proxy = env.proxy
        table = env.table(env.pg, "x int")
        conn = env.connect(proxy.url_for(env.pg.url))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
        proxy.cut_on(b"COMMIT", when=when)
        exc = raised(conn.commit)
        # The client cannot tell these two apart; the server can.
        rows = env.pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        assert rows == [(1 if when == "after" else 0,)]
        return exc

    return provoke


# --- the server answers with an error ------------------------------------------------------------


def serialization_concurrent_update(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "id int PRIMARY KEY, v int", "(1, 0)")
    ident = sql.Identifier(table)
    first = env.connect(env.pg.url)
    second = env.connect(env.pg.url)
    for conn in (first, second):
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    first.execute(sql.SQL("SELECT v FROM {} WHERE id = 1").format(ident))  # takes the snapshot
    second.execute(sql.SQL("UPDATE {} SET v = 2 WHERE id = 1").format(ident))
    second.commit()
    return raised(lambda: first.execute(sql.SQL("UPDATE {} SET v = 1 WHERE id = 1").format(ident)))


def serialization_at_commit(env: Env) -> psycopg.Error:
    # Write skew: each reads what the other writes. SSI lets both statements run and
    # cancels the second COMMIT.
    table = env.table(env.pg, "g int, v int")
    ident = sql.Identifier(table)
    first = env.connect(env.pg.url)
    second = env.connect(env.pg.url)
    for conn in (first, second):
        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    first.execute(sql.SQL("SELECT count(*) FROM {} WHERE g = 1").format(ident))
    second.execute(sql.SQL("SELECT count(*) FROM {} WHERE g = 2").format(ident))
    first.execute(sql.SQL("INSERT INTO {} VALUES (2, 1)").format(ident))
    second.execute(sql.SQL("INSERT INTO {} VALUES (1, 1)").format(ident))
    first.commit()
    return raised(second.commit)


def deadlock(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "id int PRIMARY KEY, v int", "(1, 0), (2, 0)")
    update = sql.SQL("UPDATE {} SET v = v + 1 WHERE id = %s").format(sql.Identifier(table))
    first = env.connect(env.pg.url)
    second = env.connect(env.pg.url)
    # Only `second` runs the deadlock check in time, so it is the one that fails.
    first.execute("SET deadlock_timeout = '30s'")
    second.execute("SET deadlock_timeout = '50ms'")
    first.execute(update, [1])
    second.execute(update, [2])
    first_pid = first.info.backend_pid

    def first_blocks() -> None:
        first.execute(update, [2])  # waits for `second`, then succeeds once it is aborted

    def waiting() -> bool:
        rows = env.pg.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            [first_pid],
        )
        return bool(rows)

    with meanwhile(first_blocks):
        poll("the first transaction to wait for the lock", waiting)
        exc = raised(lambda: second.execute(update, [1]))
        second.rollback()
    first.rollback()
    return exc


def read_only_transaction(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "x int")
    conn = env.connect(env.pg.url)
    conn.execute("SET TRANSACTION READ ONLY")
    return raised(
        lambda: conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
    )


def read_only_server_write(env: Env) -> psycopg.Error:
    server = read_only_server(env)
    conn = env.connect(server.url, autocommit=True)
    return raised(lambda: conn.execute("CREATE TABLE pgw_t (x int)"))


def statement_timeout(env: Env) -> psycopg.Error:
    conn = env.connect(env.pg.url, autocommit=True)
    conn.execute("SET statement_timeout = '50ms'")
    return raised(lambda: conn.execute("SELECT pg_sleep(10)"))


def cancelled(env: Env) -> psycopg.Error:
    conn = env.connect(env.pg.url, autocommit=True)
    return in_pg_sleep(env.pg, conn, conn.cancel_safe)


def cancel_timed_out(env: Env) -> psycopg.Error:
    proxy = env.proxy
    conn = env.connect(proxy.url_for(env.pg.url), autocommit=True)
    proxy.blackhole()  # the cancel request's own connection never gets an answer
    return raised(lambda: conn.cancel_safe(timeout=0.5))


def lock_not_available(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "x int", "(1)")
    select_for_update = sql.SQL("SELECT * FROM {} FOR UPDATE").format(sql.Identifier(table))
    holder = env.connect(env.pg.url)
    holder.execute(select_for_update)
    conn = env.connect(env.pg.url)
    return raised(lambda: conn.execute(select_for_update + sql.SQL(" NOWAIT")))


def statement_error(query: str, setup: str = "") -> Callable[[Env], psycopg.Error]:
    def provoke(env: Env) -> psycopg.Error:
        conn = env.connect(env.pg.url, autocommit=True)
        if setup:
            conn.execute(setup)
        return raised(lambda: conn.execute(query))

    return provoke


def unique_violation(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "x int PRIMARY KEY", "(1)")
    conn = env.connect(env.pg.url, autocommit=True)
    return raised(
        lambda: conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(table)))
    )


def deferred_unique_at_commit(env: Env) -> psycopg.Error:
    table = env.table(env.pg, "x int UNIQUE DEFERRABLE INITIALLY DEFERRED")
    conn = env.connect(env.pg.url)
    conn.execute(sql.SQL("INSERT INTO {} VALUES (1), (1)").format(sql.Identifier(table)))
    return raised(conn.commit)


# --- PgBouncer -----------------------------------------------------------------------------------


def bouncer_conn(bouncer: PgBouncerServer, env: Env, **kwargs: Any) -> Conn:
    return env.connect(bouncer.url, prepare_threshold=None, **kwargs)


def bouncer_max_client_conn(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(max_client_conn=2)
    return fill_until_refused(env, bouncer.url, limit=5)


def bouncer_query_wait_timeout(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(default_pool_size=1, query_wait_timeout=1)
    holder = bouncer_conn(bouncer, env)
    holder.execute("SELECT 1")  # an open transaction keeps the only server connection
    waiter = bouncer_conn(bouncer, env, autocommit=True)
    return raised(lambda: waiter.execute("SELECT 1"))


def bouncer_query_timeout_queued(env: Env) -> psycopg.Error:
    # query_timeout below query_wait_timeout: a query that is still queued is dropped
    # with "query_timeout" (underscore), one that runs with "query timeout" (space).
    bouncer = env.bouncer(default_pool_size=1, query_wait_timeout=30, extra={"query_timeout": 1})
    holder = bouncer_conn(bouncer, env)
    holder.execute("SELECT 1")
    waiter = bouncer_conn(bouncer, env, autocommit=True)
    return raised(lambda: waiter.execute("SELECT 1"))


def bouncer_query_timeout_running(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(extra={"query_timeout": 0.5})
    conn = bouncer_conn(bouncer, env, autocommit=True)
    # PgBouncer closes the server connection; that backend ends when pg_sleep does.
    return raised(lambda: conn.execute("SELECT pg_sleep(3)"))


def bouncer_server_stopped(env: Env, **settings: Any) -> tuple[PostgresServer, PgBouncerServer]:
    server = env.server()
    server.stop()
    return server, env.bouncer(server, **settings)


def bouncer_login_timeout(env: Env) -> psycopg.Error:
    # PgBouncer never reached the server, so it cannot finish any client's login.
    _, bouncer = bouncer_server_stopped(
        env, query_wait_timeout=30, extra={"client_login_timeout": 1}
    )
    return raised(lambda: connect_only(bouncer.url, connect_timeout=10))


def bouncer_query_timeout_at_login(env: Env) -> psycopg.Error:
    _, bouncer = bouncer_server_stopped(env, query_wait_timeout=30, extra={"query_timeout": 1})
    return raised(lambda: connect_only(bouncer.url, connect_timeout=10))


def bouncer_login_failing(env: Env) -> psycopg.Error:
    # PgBouncer logged in once (at start), then the server went away. The first client
    # waits in the queue (query_wait_timeout); once a login has failed, later ones are
    # turned away at once.
    server = env.server()
    bouncer = env.bouncer(server, query_wait_timeout=1)
    server.stop()
    seen: list[psycopg.Error] = []

    def failing_now() -> bool:
        with psycopg.connect(bouncer.url, prepare_threshold=None, autocommit=True) as conn:
            seen.append(raised(lambda: conn.execute("SELECT 1")))
        return "server login has been failing" in str(seen[-1])

    poll("PgBouncer to report failing server logins", failing_now, timeout=20)
    for exc in seen[:-1]:
        assert classify(exc, STATEMENT) in (K.OVERLOAD, K.NOTHING_RAN), str(exc)
    return seen[-1]


def bouncer_bad_password(env: Env) -> psycopg.Error:
    bouncer = env.shared_bouncer
    wrong = f"wrong-{secrets.token_urlsafe(8)}"
    env.secrets.append(wrong)
    return raised(lambda: connect_only(bouncer.url.replace(bouncer.password, wrong)))


def bouncer_database_missing(env: Env) -> psycopg.Error:
    bouncer = env.bouncer()
    return raised(lambda: connect_only(bouncer.url_for(f"pgw_{secrets.token_hex(4)}")))


def bouncer_startup_parameter(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(extra={"ignore_startup_parameters": "extra_float_digits"})
    return raised(lambda: connect_only(bouncer.url, options="-c work_mem=4MB"))


def bouncer_database_removed(env: Env) -> psycopg.Error:
    bouncer = env.bouncer()
    conn = bouncer_conn(bouncer, env, autocommit=True)
    with psycopg.connect(
        bouncer.url_for("pgbouncer"), autocommit=True, prepare_threshold=None
    ) as admin:
        admin.execute("KILL postgres")
    return raised(lambda: conn.execute("SELECT 1"))


def bouncer_idle_transaction_timeout(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(extra={"idle_transaction_timeout": 0.5})
    conn = bouncer_conn(bouncer, env)
    conn.execute("SELECT 1")
    wait_readable(conn)
    return raised(lambda: conn.execute("SELECT 1"))


def bouncer_client_idle_timeout(env: Env) -> psycopg.Error:
    bouncer = env.bouncer(extra={"client_idle_timeout": 0.5})
    conn = bouncer_conn(bouncer, env, autocommit=True)
    wait_readable(conn)
    return raised(lambda: conn.execute("SELECT 1"))


# --- the table -----------------------------------------------------------------------------------

BROKEN_IDLE = {FIRST_USE: K.STALE, STATEMENT: K.LOST}


@dataclass(frozen=True)
class Row:
    """One real failure: how to provoke it, what it says, and its kind per phase."""

    id: str
    provoke: Callable[[Env], psycopg.Error]
    expect: Mapping[Phase, FailureKind]
    text: str  # a fragment of str(exc): proof that the intended failure happened
    sqlstate: str | None = None
    marks: tuple[pytest.MarkDecorator, ...] = ()


PROXY = (pytest.mark.proxy,)
BOUNCER = (pytest.mark.pgbouncer,)

ROWS: list[Row] = [
    # connect failures: no SQLSTATE reaches psycopg, the text decides
    Row("refused", refused, {CONNECT: K.NOTHING_RAN}, "Connection refused", marks=PROXY),
    Row(
        "connect timeout", connect_timeout, {CONNECT: K.NOTHING_RAN}, "timeout expired", marks=PROXY
    ),
    Row("no unix socket", no_socket, {CONNECT: K.NOTHING_RAN}, "No such file or directory"),
    Row("unknown host", unknown_host, {CONNECT: K.NOTHING_RAN}, "failed to resolve host"),
    Row("53300 too many clients", too_many_clients, {CONNECT: K.OVERLOAD}, "too many clients"),
    Row("53300 reserved slots", reserved_slots, {CONNECT: K.OVERLOAD}, "slots are reserved"),
    Row(
        "53300 role limit",
        role_connection_limit,
        {CONNECT: K.OVERLOAD},
        "too many connections for role",
    ),
    Row("57P03 shutting down", shutting_down, {CONNECT: K.NOTHING_RAN}, "is shutting down"),
    Row("57P03 starting up", starting_up, {CONNECT: K.NOTHING_RAN}, "the database system is"),
    Row("57P03 in recovery", in_recovery, {CONNECT: K.NOTHING_RAN}, "the database system is"),
    Row("28P01 password", password_failed, {CONNECT: K.PERMANENT}, "password authentication"),
    Row("no role, TCP", role_missing_tcp, {CONNECT: K.PERMANENT}, "password authentication"),
    Row("no role, socket", role_missing_socket, {CONNECT: K.PERMANENT}, "does not exist"),
    Row("3D000 no database", database_missing, {CONNECT: K.PERMANENT}, "does not exist"),
    Row(
        "datallowconn false",
        database_not_allowing,
        {CONNECT: K.PERMANENT},
        "not currently accepting connections",
    ),
    Row(
        "read-write wanted, read-only",
        session_read_only,
        {CONNECT: K.NOTHING_RAN},
        "session is read-only",
    ),
    Row(
        "standby wanted, primary",
        not_a_standby,
        {CONNECT: K.NOTHING_RAN},
        "not in hot standby mode",
    ),
    Row(
        "two hosts, none writable",
        no_host_is_writable,
        {CONNECT: K.NOTHING_RAN},
        "session is read-only",
        marks=PROXY,
    ),
    # the connection dies
    Row(
        "57P01 idle, terminate_backends",
        admin_shutdown_idle,
        BROKEN_IDLE,
        "administrator command",
        "57P01",
    ),
    Row(
        "57P01 running, pg_terminate_backend",
        admin_shutdown_running,
        {STATEMENT: K.LOST},
        "administrator command",
        "57P01",
    ),
    Row("57P01 idle, fast restart", fast_restart_idle, BROKEN_IDLE, "administrator", "57P01"),
    Row("crash restart, idle", crash_restart_idle, BROKEN_IDLE, "closed the connection"),
    Row(
        "crash restart, running",
        crash_restart_running,
        {STATEMENT: K.LOST},
        "closed the connection",
    ),
    Row(
        "other backend crashed (57P02 notice)",
        other_backend_crashed,
        {STATEMENT: K.LOST},
        "closed the connection",
    ),
    Row(
        "proxy reset, running",
        proxy_reset_running,
        {STATEMENT: K.LOST},
        "closed the connection",
        marks=PROXY,
    ),
    Row(
        "proxy reset, idle",
        proxy_reset_idle,
        BROKEN_IDLE,
        "closed the connection",
        marks=PROXY,
    ),
    Row(
        "proxy FIN, idle",
        proxy_dropped_idle,
        BROKEN_IDLE,
        "closed the connection",
        marks=PROXY,
    ),
    Row(
        "reuse after loss",
        reused_after_loss,
        BROKEN_IDLE,
        "the connection is closed",  # psycopg closes a connection once it broke
        marks=PROXY,
    ),
    Row("use after close", used_after_close, BROKEN_IDLE, "the connection is closed"),
    Row(
        "57P05 idle_session_timeout",
        idle_session_timeout,
        {FIRST_USE: K.STALE},
        "idle-session timeout",
        "57P05",
    ),
    Row(
        "25P03 idle in transaction",
        idle_in_transaction_timeout,
        {STATEMENT: K.LOST},
        "idle-in-transaction timeout",
        "25P03",
    ),
    Row(
        "COMMIT cut after",
        commit_cut("after"),
        {COMMIT: K.LOST_COMMIT},
        "closed the connection",
        marks=PROXY,
    ),
    Row(
        "COMMIT cut before",
        commit_cut("before"),
        {COMMIT: K.LOST_COMMIT},
        "closed the connection",
        marks=PROXY,
    ),
    # the server answers with an error
    Row(
        "40001 concurrent update",
        serialization_concurrent_update,
        {STATEMENT: K.CONFLICT},
        "could not serialize",
        "40001",
    ),
    Row(
        "40001 at COMMIT",
        serialization_at_commit,
        {COMMIT: K.CONFLICT},
        "could not serialize",
        "40001",
    ),
    Row("40P01 deadlock", deadlock, {STATEMENT: K.CONFLICT}, "deadlock detected", "40P01"),
    Row(
        "25006 read-only transaction",
        read_only_transaction,
        {STATEMENT: K.FAILOVER},
        "read-only transaction",
        "25006",
    ),
    Row(
        "25006 read-only server",
        read_only_server_write,
        {STATEMENT: K.FAILOVER},
        "read-only transaction",
        "25006",
    ),
    Row(
        "57014 statement_timeout",
        statement_timeout,
        {STATEMENT: K.TIMEOUT},
        "statement timeout",
        "57014",
    ),
    Row("57014 cancel", cancelled, {STATEMENT: K.TIMEOUT}, "user request", "57014"),
    Row(
        "cancel request timed out",
        cancel_timed_out,
        {STATEMENT: K.TIMEOUT},
        "cancellation timeout",
        marks=PROXY,
    ),
    Row("55P03 NOWAIT", lock_not_available, {STATEMENT: K.TIMEOUT}, "could not obtain", "55P03"),
    Row(
        "23505 unique",
        unique_violation,
        {STATEMENT: K.PERMANENT},
        "duplicate key",
        "23505",
    ),
    Row(
        "23505 deferred, at COMMIT",
        deferred_unique_at_commit,
        {COMMIT: K.PERMANENT},
        "duplicate key",
        "23505",
    ),
    Row(
        "42P01 undefined table",
        statement_error("SELECT * FROM pgw_no_such_table"),
        {STATEMENT: K.PERMANENT},
        "does not exist",
        "42P01",
    ),
    Row(
        "42601 syntax",
        statement_error("SELEC 1"),
        {STATEMENT: K.PERMANENT},
        "syntax error",
        "42601",
    ),
    Row(
        "22012 division by zero",
        statement_error("SELECT 1 / 0"),
        {STATEMENT: K.PERMANENT},
        "division by zero",
        "22012",
    ),
    # PgBouncer 1.18: its own errors come as 08P01, or without SQLSTATE at login
    Row(
        "bouncer max_client_conn",
        bouncer_max_client_conn,
        {CONNECT: K.OVERLOAD},
        "no more connections allowed",
        marks=BOUNCER,
    ),
    Row(
        "bouncer query_wait_timeout",
        bouncer_query_wait_timeout,
        {FIRST_USE: K.OVERLOAD, STATEMENT: K.OVERLOAD},
        "query_wait_timeout",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer query_timeout, queued",
        bouncer_query_timeout_queued,
        {FIRST_USE: K.OVERLOAD, STATEMENT: K.OVERLOAD},
        "query_timeout",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer query timeout, running",
        bouncer_query_timeout_running,
        {STATEMENT: K.TIMEOUT},
        "query timeout",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer client_login_timeout, server down",
        bouncer_login_timeout,
        {CONNECT: K.NOTHING_RAN},
        "client_login_timeout",
        marks=BOUNCER,
    ),
    Row(
        "bouncer query_timeout at login, server down",
        bouncer_query_timeout_at_login,
        {CONNECT: K.OVERLOAD},
        "query_timeout",
        marks=BOUNCER,
    ),
    Row(
        "bouncer server login failing",
        bouncer_login_failing,
        {STATEMENT: K.NOTHING_RAN},
        "server login has been failing",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer auth failed",
        bouncer_bad_password,
        {CONNECT: K.PERMANENT},
        "SASL authentication failed",
        marks=BOUNCER,
    ),
    Row(
        "bouncer no database",
        bouncer_database_missing,
        {CONNECT: K.PERMANENT},
        "does not exist",
        marks=BOUNCER,
    ),
    Row(
        "bouncer startup parameter",
        bouncer_startup_parameter,
        {CONNECT: K.PERMANENT},
        "unsupported startup parameter",
        marks=BOUNCER,
    ),
    Row(
        "bouncer KILL",
        bouncer_database_removed,
        BROKEN_IDLE,
        "database removed",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer idle_transaction_timeout",
        bouncer_idle_transaction_timeout,
        {STATEMENT: K.LOST},
        "idle transaction timeout",
        "08P01",
        marks=BOUNCER,
    ),
    Row(
        "bouncer client_idle_timeout",
        bouncer_client_idle_timeout,
        {FIRST_USE: K.STALE},
        "client_idle_timeout",
        "08P01",
        marks=BOUNCER,
    ),
    # Not provoked:
    # - 57P02 crash_shutdown as the exception: PostgreSQL 14+ sends it as a notice
    #   before closing (checked in "other backend crashed (57P02 notice)").
    # - PgBouncer "pgbouncer cannot connect to server" and "server login has been
    #   failing, cached error: ...": not in PgBouncer 1.18 (the version tested here).
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_real_failure_is_classified(row: Row, request: pytest.FixtureRequest) -> None:
    with ExitStack() as stack:
        env = Env(request, stack)
        exc = row.provoke(env)
    message = str(exc)
    assert row.text.lower() in message.lower(), f"provoked something else: {message!r}"
    assert sqlstate_of(exc) == row.sqlstate, message
    for phase, expected in row.expect.items():
        kind, reason = classify_with_reason(exc, phase)
        assert kind is expected, f"in {phase.value}: {kind.value} ({reason}); {message!r}"
        leaked = [s for s in env.secrets if s in reason]
        assert not leaked, f"a password leaked into the reason: {reason!r}"


def test_reason_never_carries_the_password(pg_server: PostgresServer) -> None:
    # Failures whose messages do contain the password: as a database name that does
    # not exist, and as a value that is not a number.
    password = pg_server.password
    failures = [raised(lambda: connect_only(pg_server.url_for(dbname=password)))]
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        failures.append(raised(lambda: conn.execute("SELECT %s::int", [password])))
    for exc in failures:
        assert password in str(exc)
        for phase in Phase:
            assert password not in classify_with_reason(exc, phase)[1]
