"""The I/O of ``pgwarden check``: connect, read the server, detect a pooler.

Everything that decides uses pgwarden's own pieces, so the check and the handle cannot drift:
a connect failure is described after :func:`pgwarden.core.classify.classify_with_reason`
(the rule the handle applies), the connect timeout is
:func:`pgwarden._handle.config.libpq_connect_timeout`, and the pooler heuristics are
:func:`~pgwarden._handle.config.looks_like_pgbouncer` and
:func:`~pgwarden._handle.config.looks_relayed` (then ``SHOW pool_version``), as in the
handle's warmup.
"""

from __future__ import annotations

import ipaddress
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from pgwarden._handle.config import (
    libpq_connect_timeout,
    local_port,
    looks_like_pgbouncer,
    looks_relayed,
)
from pgwarden.cli._check_report import Detected, PgBouncerInfo
from pgwarden.core.check_rules import ServerSetting
from pgwarden.core.classify import Phase, classify_with_reason
from pgwarden.core.fleet import FLEET_QUERY, member_pattern

__all__ = [
    "SETTING_NAMES",
    "CheckError",
    "Probe",
    "UsageError",
    "connect",
    "detect_pgbouncer",
    "is_local",
    "parse_target",
    "probe",
    "summarize_connect_error",
]

Connection = psycopg.Connection[tuple[Any, ...]]

SETTING_NAMES = (
    "server_version",
    "server_version_num",
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "tcp_keepalives_idle",
    "statement_timeout",
)


class UsageError(Exception):
    """Bad input (a URL that cannot be parsed): exit 2."""


class CheckError(Exception):
    """The check failed after connecting: exit 1."""


# --------------------------------------------------------------------------------------------
# Describing a failed connect


# How the check words the libpq texts that core/classify.py recognises (its "text" rules);
# {0} is filled from _DETAIL. Any other failure is told in the server's or libpq's words.
_LIBPQ_WORDING: dict[str, str] = {
    "connection refused": "connection refused",
    "could not translate host name": "cannot resolve host name {0!r}",
    "name or service not known": "cannot resolve host name {0!r}",
    "temporary failure in name resolution": "cannot resolve host name {0!r}",
    "no such file or directory": "no server socket at {0}",
    "network is unreachable": "network is unreachable",
    "no route to host": "no route to host",
    "server closed the connection unexpectedly": "server closed the connection",
}
_DETAIL = re.compile(
    r"""failed to resolve host '(?P<a>[^']*)'|host name "(?P<b>[^"]*)"|socket "(?P<c>[^"]*)\""""
)
_TIMEOUT_RULES = ("class ConnectionTimeout", "text 'timeout expired'")
_SERVER_TEXT = re.compile(r"(?:FATAL|ERROR):\s+(.+)")


def summarize_connect_error(exc: BaseException, timeout: float | None = None) -> str:
    """One short line saying why a connection attempt failed (not yet redacted)."""
    _, rule = classify_with_reason(exc, Phase.CONNECT)
    if rule in _TIMEOUT_RULES:
        return f"timed out after {libpq_connect_timeout(timeout)}s" if timeout else "timed out"
    text = str(exc)
    server = _SERVER_TEXT.search(text)
    if server:  # the server's (or pooler's) own words say it best
        return " ".join(server.group(1).split())
    pattern = rule[6:-1] if rule.startswith("text '") else ""
    wording = _LIBPQ_WORDING.get(pattern)
    if wording is not None:
        detail = _DETAIL.search(text)
        if "{0" not in wording or detail:
            found = detail and next(g for g in detail.groups() if g is not None)
            return wording.format(found)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = re.sub(r"^(connection failed|connection is bad):\s*", "", first)
    first = re.sub(r"^connection to server (at|on) .*? failed:\s*", "", first)
    return " ".join(first.split()) or type(exc).__name__


def parse_target(url: str) -> dict[str, str]:
    """Validate *url* (a ``postgresql://`` URL or a ``key=value`` string) before dialling."""
    if not url.strip():
        raise UsageError("the URL is empty")
    scheme = re.match(r"^\s*([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme and scheme.group(1).lower() not in ("postgresql", "postgres"):
        raise UsageError(
            f"unsupported scheme {scheme.group(1)!r} (expected postgresql:// or postgres://)"
        )
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    for port in str(params.get("port", "")).split(","):
        if port and not port.isdigit():
            raise UsageError(f"invalid port {port!r}")
    return {k: str(v) for k, v in params.items()}


def is_local(host: str) -> bool:
    """A Unix socket, ``localhost`` or a loopback address: TLS off is no risk there."""
    if not host or host.startswith(("/", "@")) or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Talking to the server


def connect(url: str, timeout: float, **extra: Any) -> Connection:
    """One autocommit connection, never preparing server-side (safe behind PgBouncer)."""
    return psycopg.connect(
        url,
        autocommit=True,
        prepare_threshold=None,
        connect_timeout=libpq_connect_timeout(timeout),
        fallback_application_name="pgwarden check",
        **extra,
    )


def _read_settings(conn: Connection) -> dict[str, ServerSetting]:
    rows = conn.execute(
        "SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY(%s)",
        [list(SETTING_NAMES)],
    ).fetchall()
    return {r[0]: ServerSetting(r[0], r[1], r[2], r[3]) for r in rows}


def _count_in_use(conn: Connection) -> tuple[int | None, str | None]:
    try:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()
    except pg_errors.InsufficientPrivilege:
        return None, "not permitted to read pg_stat_activity"
    except psycopg.DatabaseError as exc:
        if conn.closed:
            raise
        return None, f"not available ({' '.join(str(exc).split())})"
    return (int(row[0]) if row else None), None


def _probe_admin_console(
    url: str, timeout: float, dbname: str
) -> tuple[str | None, str | None, str]:
    """Ask PgBouncer's admin console (database ``pgbouncer``) who it is.

    Returns (version, pool_mode, evidence line). Never raises for connection problems.
    """
    try:
        with connect(url, min(timeout, 3.0), dbname="pgbouncer") as admin:
            row = admin.execute("SHOW VERSION").fetchone()
            version = str(row[0]) if row else ""
            if not version.lower().startswith("pgbouncer"):
                return None, None, "database 'pgbouncer' is not PgBouncer's admin console"
            pool_mode = _admin_pool_mode(admin, dbname)
            return version, pool_mode, "its admin console answered SHOW VERSION"
    except psycopg.Error as exc:
        reason = summarize_connect_error(exc, timeout)
        if reason == "not allowed":
            return (
                None,
                None,
                "admin database 'pgbouncer' answered 'not allowed' (PgBouncer's reply to a "
                "user outside admin_users/stats_users)",
            )
        return None, None, f"PgBouncer's admin console did not answer: {reason}"


def _admin_pool_mode(admin: Connection, dbname: str) -> str | None:
    """The pool mode of *dbname* (the name the client used) from the admin console."""
    try:
        cur = admin.execute("SHOW DATABASES")
        cols = [d.name for d in cur.description or ()]
        rows = cur.fetchall()
        if "pool_mode" in cols and "name" in cols:
            i_name, i_mode = cols.index("name"), cols.index("pool_mode")
            for r in rows:
                if r[i_name] == dbname and r[i_mode]:
                    return str(r[i_mode])
        for key, value, *_ in admin.execute("SHOW CONFIG").fetchall():
            if key == "pool_mode":
                return str(value)
    except psycopg.Error:
        return None
    return None


# The comment shows in the server's log next to the error (see pgwarden._async.warmup).
_POOL_VERSION = "SHOW pool_version /* pgwarden check: is this pgpool-II? an error means no */"


def _pgpool_version(conn: Connection) -> str | None:
    """pgpool-II's version if the other end answers ``SHOW pool_version`` itself (as the
    handle's warmup asks); None from PostgreSQL (42704; the autocommit session survives)."""
    try:
        cur = conn.execute(_POOL_VERSION, prepare=False)
        row = cur.fetchone()
    except psycopg.errors.UndefinedObject:
        return None
    names = [d.name for d in cur.description or ()]
    if names[:1] != ["pool_version"]:
        return None
    # Over the extended protocol pgpool-II 4.3 describes the column but sends no row.
    return f"pgpool-II {row[0]}" if row else "pgpool-II"


def detect_pgbouncer(
    conn: Connection,
    mode: str,
    *,
    url: str,
    timeout: float,
    backend_pid: int | None,
    server_port: int | None,
    client_port: int | None = None,
) -> PgBouncerInfo:
    """Apply the heuristic described in :mod:`pgwarden.cli.check`'s docstring."""
    if mode == "off":
        return PgBouncerInfo(mode, "off")
    key_pid = conn.info.backend_pid
    evidence: list[str] = []
    detected: Detected
    if mode == "on":
        detected = "yes"
        evidence.append("--pgbouncer on")
    elif not key_pid or backend_pid is None:
        detected = "unknown"
        evidence.append("no backend pid from libpq (BackendKeyData) to compare")
    elif looks_like_pgbouncer(backend_pid, key_pid):
        detected = "likely"
        evidence.append(
            f"cancel-key pid {key_pid} != pg_backend_pid() {backend_pid}: a pooler answers"
        )
    else:
        detected = "no"
        evidence.append(f"cancel-key pid {key_pid} = pg_backend_pid()")
    dialled = conn.info.port
    if server_port is not None and str(server_port) != str(dialled):
        evidence.append(f"server port {server_port} != dialled port {dialled}")

    version = pool_mode = None
    if detected in ("yes", "likely"):
        version, pool_mode, said = _probe_admin_console(url, timeout, conn.info.dbname)
        evidence.append(said)
        if version and detected == "likely":
            detected = "yes"
    elif detected == "no" and looks_relayed(client_port, local_port(conn.pgconn.socket)):
        # pgpool-II forwards the server's own backend key, so the pids agree through it.
        version = _pgpool_version(conn)
        if version is not None:
            detected = "yes"
            evidence.append(
                f"the server saw another client port than this end's; {version} answered "
                "SHOW pool_version"
            )
    return PgBouncerInfo(mode, detected, evidence, version, pool_mode)


@dataclass
class Probe:
    """What :func:`probe` read over one connection, before any judgement."""

    version_full: str
    backend_pid: int | None
    standby: bool
    user: str
    database: str
    host: str
    port: str
    latency_samples: list[float]
    settings: dict[str, ServerSetting]
    in_use: int | None
    in_use_error: str | None
    pgbouncer: PgBouncerInfo
    tls: bool
    protocol_version: int
    parameter_server_version: str | None
    #: The fleet sampler's own row (:data:`pgwarden.core.fleet.FLEET_QUERY`), when asked.
    fleet_row: dict[str, Any] | None = None

    def latency_ms(self) -> dict[str, float | int]:
        """p50, min and max of the samples (milliseconds), and how many there were."""
        s = self.latency_samples
        return {
            "p50": round(statistics.median(s), 3) if s else 0.0,
            "min": round(min(s), 3) if s else 0.0,
            "max": round(max(s), 3) if s else 0.0,
            "samples": len(s),
        }


def _read_fleet(conn: Connection, tag: str) -> dict[str, Any]:
    """The handle's fleet sample for *tag*, less this check's own connection."""
    cur = conn.execute(FLEET_QUERY, {"pattern": member_pattern(tag)})
    row = cur.fetchone()
    names = [d.name for d in cur.description or ()]
    if row is None:  # pragma: no cover - a SELECT without FROM always returns a row
        raise CheckError("the server returned no row for the fleet query")
    found = dict(zip(names, row, strict=True))
    for key in ("others_server", "others_role"):  # this check is not one of the others
        found[key] = max(0, int(found[key]) - 1)
    return found


def probe(
    conn: Connection,
    url: str,
    *,
    timeout: float,
    pings: int,
    pgbouncer: str,
    fleet_tag: str | None = None,
) -> Probe:
    """Measure and read everything the report needs over *conn* (closed on return); with
    *fleet_tag*, also what the fleet budget of that fleet is computed from.

    Raises ``psycopg.Error`` if a statement fails or the connection is lost.
    """
    with conn:
        row = conn.execute(
            "SELECT version(), pg_backend_pid(), pg_is_in_recovery(), current_user, "
            "current_database(), inet_server_port(), inet_client_port()"
        ).fetchone()
        if row is None:  # pragma: no cover - a SELECT without FROM always returns a row
            raise CheckError("the server returned no row for SELECT version()")
        version_full, backend_pid, standby, user, database, server_port, client_port = row

        samples: list[float] = []
        for _ in range(pings):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            samples.append((time.perf_counter() - t0) * 1000)

        settings = _read_settings(conn)
        in_use, in_use_error = _count_in_use(conn)
        bouncer = detect_pgbouncer(
            conn,
            pgbouncer,
            url=url,
            timeout=timeout,
            backend_pid=backend_pid,
            server_port=server_port,
            client_port=client_port,
        )
        fleet_row = None if fleet_tag is None else _read_fleet(conn, fleet_tag)
        return Probe(
            version_full=str(version_full),
            backend_pid=backend_pid,
            standby=bool(standby),
            user=str(user),
            database=str(database),
            host=conn.info.host,
            port=str(conn.info.port),
            latency_samples=samples,
            settings=settings,
            in_use=in_use,
            in_use_error=in_use_error,
            pgbouncer=bouncer,
            tls=bool(conn.pgconn.ssl_in_use),
            protocol_version=conn.info.full_protocol_version,
            parameter_server_version=conn.info.parameter_status("server_version"),
            fleet_row=fleet_row,
        )
