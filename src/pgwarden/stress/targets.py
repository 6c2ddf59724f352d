"""Where a scenario runs: the server (ours or ``--url``), PgBouncer or the fault proxy in
front, the schema and the clients' role, and putting it all back between clients.

By default a target is a throwaway PostgreSQL started with the scenario's settings
(``max_connections``, ``idle_session_timeout``), plus a PgBouncer or a fault proxy in front
when the scenario needs one; or, with ``--url``, the given server (loopback only), on which
scenarios that must restart or reconfigure the server are skipped with the reason
(:func:`why_skip`). On a server of its own the harness creates an ordinary login role for
the clients, so ``max_connections=20`` leaves them 17 slots and the harness's superuser
connections never compete with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgwarden._redact import redact
from pgwarden.stress import failover
from pgwarden.stress.clients import LINES_TABLE, TABLE
from pgwarden.stress.scenarios import Plan, Scenario

if TYPE_CHECKING:
    from pgwarden.embedded import EmbeddedServer
    from pgwarden.testing import FaultProxy, PgBouncerServer, PostgresServer, StandbyPair

__all__ = [
    "ADMIN_APP",
    "APP_PREFIX",
    "ROLE",
    "HarnessError",
    "Say",
    "Target",
    "loopback_problem",
    "open_target",
    "prepare_schema_and_role",
    "reset",
    "rows_for",
    "why_skip",
]

#: The clients' login role on a server of our own.
ROLE = "pgwarden_stress"
#: ``application_name`` of the harness's own sessions (never counted as a client's).
ADMIN_APP = "pgwarden-stress-admin"
#: Prefix of every client's ``application_name`` (``pgwstress-<client>``).
APP_PREFIX = "pgwstress-"

Say = Callable[[str], None]


class HarnessError(Exception):
    """The harness could not do its job (a server would not start, and so on)."""


# --------------------------------------------------------------------------------------------
# URL checks


def loopback_problem(url: str) -> str | None:
    """Why ``url`` is not a server on this machine, or None if it is (or is a socket)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        return f"cannot parse the URL: {redact(str(exc))}"
    hosts = [h for h in str(params.get("hostaddr") or params.get("host") or "").split(",") if h]
    if not hosts:
        env = os.environ.get("PGHOST", "")
        hosts = [h for h in env.split(",") if h]
    for host in hosts:
        if host.startswith(("/", "@")) or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host.strip("[]")).is_loopback:
                continue
        except ValueError:
            pass
        return f"host {host!r} is not a loopback address (127.0.0.0/8, ::1, localhost)"
    return None


def tcp_endpoint(url: str) -> tuple[str, int] | None:
    params = conninfo_to_dict(url)
    host = str(params.get("hostaddr") or params.get("host") or "")
    if not host or "," in host or host.startswith(("/", "@")):
        return None
    if host == "localhost":
        host = "127.0.0.1"
    return host, int(str(params.get("port") or 5432))


# --------------------------------------------------------------------------------------------
# Targets


class Target:
    """Where one scenario runs: the URL the clients use and what the harness controls."""

    def __init__(self) -> None:
        self.client_url = ""
        self.description = ""
        self.server: PostgresServer | None = None  # when the server is ours
        self.embedded: EmbeddedServer | None = None
        self.bouncer: PgBouncerServer | None = None
        self.proxy: FaultProxy | None = None
        self.pair: StandbyPair | None = None  # the failover scenario, see .failover
        self.admin_params: dict[str, Any] = {}
        self.only_ours = False  # count only our clients' backends (a shared server)
        self.max_connections: int | None = None
        self.server_version = ""
        self.pgbouncer_version: str | None = None
        self.drop_table = False
        self.closers: list[Callable[[], None]] = []

    def admin(self, timeout: int = 3) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            **self.admin_params,
            autocommit=True,
            connect_timeout=timeout,
            application_name=ADMIN_APP,
        )

    def kill_ours(self, fraction: float = 1.0) -> int:
        """``pg_terminate_backend`` a random ``fraction`` of the clients' backends."""
        query = (
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND application_name LIKE %s AND random() < %s"
        )
        with self.admin() as conn:
            conn.add_notice_handler(lambda diag: None)
            row = conn.execute(query, [APP_PREFIX + "%", fraction]).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        self.closers.clear()


_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " seq bigserial PRIMARY KEY,"
    " run text NOT NULL,"
    " req_id uuid NOT NULL,"
    " worker integer NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now())",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_req_id ON {TABLE} (req_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_run ON {TABLE} (run, req_id)",
    # The child rows of the ORM units of work (pgwarden.stress.orm).
    f"CREATE TABLE IF NOT EXISTS {LINES_TABLE} ("
    " seq bigserial PRIMARY KEY,"
    f" write_seq bigint NOT NULL REFERENCES {TABLE} (seq),"
    " run text NOT NULL,"
    " req_id uuid NOT NULL,"
    " n integer NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {LINES_TABLE}_run ON {LINES_TABLE} (run, req_id)",
    f"CREATE INDEX IF NOT EXISTS {LINES_TABLE}_write ON {LINES_TABLE} (write_seq)",
)


def why_skip(scenario: Scenario, plan: Plan, url: str | None) -> str | None:
    if url is None:
        return None
    needs = scenario.needs
    if "control" in needs:
        return (
            "needs to restart the server, which only works on the server pgwarden stress "
            "starts itself (run without --url)"
        )
    if "pgbouncer" in needs:
        return "needs its own PostgreSQL and PgBouncer (run without --url)"
    if "own_server" in needs:
        settings = ", ".join(f"{k}={v}" for k, v in plan.server_settings.items())
        return f"needs its own server with {settings} (run without --url)"
    if "proxy" in needs and tcp_endpoint(url) is None:
        return "needs a TCP URL (host and port) to put the fault proxy in front of"
    return None


@contextlib.contextmanager
def open_target(plan: Plan, url: str | None, say: Say) -> Iterator[Target]:
    target = Target()
    try:
        if url is None and plan.via == "pair":
            failover.open_pair(target, plan, say)
        elif url is None:
            _own_server(target, plan, say)
        else:
            _given_server(target, url)
        if plan.via == "proxy":
            from pgwarden.testing import FaultProxy

            if target.server is not None:
                upstream: tuple[str, int] | None = (target.server.host, target.server.port)
            else:
                upstream = tcp_endpoint(target.client_url)
            assert upstream is not None
            proxy = FaultProxy(*upstream).start()
            target.closers.append(proxy.close)
            target.proxy = proxy
            target.client_url = proxy.url_for(target.client_url)
            target.description += f", through a fault proxy on 127.0.0.1:{proxy.port}"
        yield target
    finally:
        target.close()


def _own_server(target: Target, plan: Plan, say: Say) -> None:
    from pgwarden.embedded import start_embedded

    settings = dict(plan.server_settings)
    try:
        embedded = start_embedded(settings)
    except Exception as exc:
        raise HarnessError(f"cannot start the embedded PostgreSQL: {redact(str(exc))}") from exc
    target.closers.append(embedded.close)
    server = embedded.server
    if server is None:
        raise HarnessError("the embedded PostgreSQL cannot be controlled (no local binaries)")
    target.embedded = embedded
    target.server = server
    target.server_version = str(server.version)
    target.admin_params = {
        "host": str(server.socket_dir),
        "port": server.port,
        "user": server.user,
        "dbname": server.dbname,
    }
    password = prepare_schema_and_role(target)
    target.client_url = server.url_for(user=ROLE, password=password)
    target.description = f"embedded PostgreSQL {target.server_version} on 127.0.0.1:{server.port}"
    if plan.via == "pgbouncer":
        from pgwarden.testing import PgBouncerServer

        try:
            bouncer = PgBouncerServer(
                server,
                pool_mode="transaction",
                default_pool_size=plan.pgbouncer_pool_size,
                max_client_conn=plan.pgbouncer_max_clients,
            )
            target.closers.append(bouncer.close)
            bouncer.start()
        except Exception as exc:
            raise HarnessError(f"cannot start PgBouncer: {redact(str(exc))}") from exc
        target.bouncer = bouncer
        target.pgbouncer_version = str(bouncer.version)
        target.client_url = bouncer.url
        target.description += (
            f", through PgBouncer {bouncer.version} (transaction mode) on 127.0.0.1:{bouncer.port}"
        )


def prepare_schema_and_role(target: Target) -> str:
    """On a server of our own (``target.admin_params`` set): the tables, and an ordinary
    login role for the clients with a random password, which is returned. Also reads
    ``max_connections``."""
    password = secrets.token_urlsafe(18)
    with target.admin() as conn:
        for stmt in _SCHEMA:
            conn.execute(stmt)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(password)
            )
        )
        for table in (TABLE, LINES_TABLE):
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
                    sql.Identifier(table), sql.Identifier(ROLE)
                )
            )
            conn.execute(
                sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                    sql.Identifier(f"{table}_seq_seq"), sql.Identifier(ROLE)
                )
            )
        row = conn.execute("SHOW max_connections").fetchone()
        target.max_connections = int(row[0]) if row else None
    return password


def _given_server(target: Target, url: str) -> None:
    target.admin_params = {"conninfo": url}
    target.client_url = url
    target.only_ours = True
    try:
        with target.admin(timeout=5) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NULL", [TABLE]).fetchone()
            target.drop_table = bool(row and row[0])
            for stmt in _SCHEMA:
                conn.execute(stmt)
            row = conn.execute("SHOW server_version").fetchone()
            target.server_version = str(row[0]) if row else ""
            row = conn.execute("SHOW max_connections").fetchone()
            target.max_connections = int(row[0]) if row else None
    except psycopg.Error as exc:
        raise HarnessError(f"cannot prepare {redact(url)}: {redact(str(exc))}") from exc
    if target.drop_table:

        def drop() -> None:
            with target.admin() as conn:
                for table in (LINES_TABLE, TABLE):  # the lines refer to the writes
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))

        target.closers.append(drop)
    target.description = f"PostgreSQL {target.server_version} at {redact(url)}"


def rows_for(target: Target, run_id: str, table: str = TABLE) -> dict[str, int]:
    """Request id -> rows in ``table`` (one of ours, a constant), for one run (retrying
    while the server restarts)."""
    query = f"SELECT req_id::text, count(*) FROM {table} WHERE run = %s GROUP BY 1"  # noqa: S608
    last: Exception | None = None
    for _ in range(50):
        try:
            with target.admin() as conn:
                return {str(rid): int(n) for rid, n in conn.execute(query, [run_id]).fetchall()}
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.2)
    raise HarnessError(f"cannot read back the writes: {redact(str(last))}")


def reset(target: Target) -> None:
    """Between clients: everything back to normal, and no client connections left."""
    if target.pair is not None:
        failover.reset(target)
    if target.proxy is not None:
        target.proxy.heal()
    if target.server is not None and not target.server.is_running():
        target.server.start()
    if target.bouncer is not None:
        target.bouncer.restart()
    with contextlib.suppress(psycopg.Error):
        target.kill_ours(1.0)
    time.sleep(0.3)
