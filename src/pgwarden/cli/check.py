"""``pgwarden check [URL]``: connect once and report what a pooled client needs to know.

Theory of operation
-------------------
One connection is opened with ``psycopg.connect(url, connect_timeout=...)`` (autocommit, no
server-side prepared statements, so it behaves the same behind PgBouncer in transaction mode).
Over it the check reads, in a handful of statements:

* ``version()`` and the ``server_version`` setting, and whether the server is a standby;
* the connect time, and round-trip latency from ``--pings`` (default 10) ``SELECT 1``;
* ``max_connections``, ``superuser_reserved_connections`` (and ``reserved_connections`` on
  PostgreSQL 16+), and the client backends counted in ``pg_stat_activity``;
* whether PgBouncer (or another pooler) is in front, see below;
* TLS on the client's connection, and the protocol version;
* the server settings that hurt pooled clients, compared with pgwarden's own settings
  (``pgwarden.settings.Settings.from_env()``: ``max_lifetime``, ``max_idle``, ``max_size``).

PgBouncer detection (``--pgbouncer auto``)
------------------------------------------
PostgreSQL sends each client a BackendKeyData message carrying the pid of the backend that
serves it; libpq exposes it as ``PQbackendPID`` (``conn.info.backend_pid``). On a direct
connection it always equals ``SELECT pg_backend_pid()``. PgBouncer (and every pooler that
multiplexes clients onto server connections: Odyssey, pgcat, Supavisor, RDS Proxy) cannot
hand out a real backend's pid, because the client is not tied to one backend; PgBouncer
sends a random cancel key instead. So:

* the pids are equal: ``no``;
* they differ: a pooler answers the client. pgwarden then asks PgBouncer's admin console
  (the same URL with database ``pgbouncer``) for ``SHOW VERSION``. If it answers
  ``PgBouncer x.y`` the verdict is ``yes``, with the version and pool mode; otherwise it stays
  ``likely`` (the evidence says whether the console replied with PgBouncer's ``not allowed``,
  which PostgreSQL never sends, or could not be reached at all);
* libpq got no BackendKeyData, or ``pg_backend_pid()`` failed: ``unknown``.

A server port (``inet_server_port()``) that differs from the port dialled is reported as
supporting evidence only: Docker port mapping and NAT do the same. The admin console is
probed only when the pids already differ, so a check against a plain server never causes a
failed login in its log. ``--pgbouncer on`` or ``off`` skips the heuristic.

Failure
-------
If the connection cannot be made the command prints one line to stderr,
``pgwarden check: cannot connect to <url with password masked>: <reason>``, and exits 2. The
password (from the URL or ``PGPASSWORD``) is masked in the URL and in the reason. A URL that
cannot be parsed exits 2 as well; a failure after connecting exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import re
import signal
import statistics
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Literal, TextIO

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from pgwarden._redact import redact
from pgwarden.cli._args import positive_float
from pgwarden.cli._embedded import with_embedded

__all__ = [
    "Finding",
    "PgBouncerInfo",
    "PoolPolicy",
    "Report",
    "ServerSetting",
    "assess",
    "build_parser",
    "format_report",
    "run",
    "summarize_connect_error",
]

# Fallbacks for when pgwarden.settings cannot be loaded (they match the brief's defaults).
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_LIFETIME = 1800.0
DEFAULT_MAX_IDLE = 600.0
DEFAULT_MAX_SIZE = 10
DEFAULT_PINGS = 10

#: idle_in_transaction_session_timeout below this is reported as "very short".
SHORT_IDLE_IN_TRANSACTION = 10.0
#: tcp_keepalives_idle above this (or 0: the OS default, usually 2 h) is reported.
LONG_KEEPALIVE_IDLE = 600.0
#: Connections in use above this share of the usable slots are reported.
BUSY_RATIO = 0.8
#: Fewer processes than this at pgwarden's max_size fit in the server: reported.
SMALL_FLEET = 10

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

Detected = Literal["yes", "likely", "no", "unknown", "off"]
Level = Literal["warning", "info"]


class UsageError(Exception):
    """Bad input (a URL that cannot be parsed): exit 2."""


class CheckError(Exception):
    """The check failed after connecting: exit 1."""


# --------------------------------------------------------------------------------------------
# Settings of pgwarden itself


@dataclass(frozen=True)
class PoolPolicy:
    """The pgwarden settings the check compares the server with."""

    max_lifetime: float = DEFAULT_MAX_LIFETIME
    max_idle: float = DEFAULT_MAX_IDLE
    max_size: int = DEFAULT_MAX_SIZE
    min_size: int = 0
    connect_timeout: float = DEFAULT_TIMEOUT
    pgbouncer: str = "auto"
    url: str | None = field(default=None, repr=False)
    problem: str | None = None  # why the defaults are used, if they are


def load_policy(environ: Mapping[str, str] | None = None) -> PoolPolicy:
    """pgwarden's settings from ``PGWARDEN_*`` and ``DATABASE_URL``, or the fallbacks."""
    env = os.environ if environ is None else environ
    fallback_url = env.get("DATABASE_URL") or None
    try:
        from pgwarden.settings import Settings
    except ImportError as exc:  # pragma: no cover - only before settings.py exists
        return PoolPolicy(url=fallback_url, problem=f"pgwarden.settings unavailable ({exc})")
    try:
        s = Settings.from_env(env)
    except Exception as exc:  # SettingsError: a bad PGWARDEN_* variable
        return PoolPolicy(url=fallback_url, problem=redact(str(exc)))
    return PoolPolicy(
        max_lifetime=float(s.max_lifetime),
        max_idle=float(s.max_idle),
        max_size=int(s.max_size),
        min_size=int(s.min_size),
        connect_timeout=float(s.connect_timeout),
        pgbouncer=str(s.pgbouncer),
        url=s.url,
    )


# --------------------------------------------------------------------------------------------
# The report


_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class ServerSetting:
    """One row of ``pg_settings``."""

    name: str
    value: str
    unit: str | None = None
    source: str = "default"

    def as_int(self) -> int | None:
        try:
            return int(self.value)
        except ValueError:
            return None

    def seconds(self) -> float | None:
        """The value in seconds, for time settings (``None`` if not a time)."""
        factor = _UNIT_SECONDS.get(self.unit or "")
        number = self.as_int()
        if factor is None or number is None:
            return None
        return number * factor

    def describe(self) -> str:
        """``name = 5s (configuration file)``."""
        secs = self.seconds()
        shown = fmt_duration(secs) if secs is not None else self.value
        return f"{self.name} = {shown} (set by {self.source})"


@dataclass
class Finding:
    level: Level
    code: str
    message: str


@dataclass
class PgBouncerInfo:
    mode: str
    detected: Detected
    evidence: list[str] = field(default_factory=list)
    version: str | None = None
    pool_mode: str | None = None

    @property
    def in_front(self) -> bool:
        return self.detected in ("yes", "likely")

    def headline(self) -> str:
        """``yes, PgBouncer 1.18.0, pool_mode=transaction`` / ``no`` / ``likely`` ..."""
        if self.detected == "off":
            return "not checked (--pgbouncer off)"
        extra = [x for x in (self.version, self.pool_mode and f"pool_mode={self.pool_mode}") if x]
        return ", ".join([self.detected, *extra])


@dataclass
class Report:
    target: str
    embedded: str | None
    host: str
    port: str
    user: str
    database: str
    server_version: str | None
    server_version_num: int | None
    version: str
    version_full: str
    standby: bool
    connect_ms: float
    latency_ms: dict[str, float | int]
    max_connections: int | None
    superuser_reserved_connections: int | None
    reserved_connections: int | None
    usable_connections: int | None
    connections_in_use: int | None
    connections_in_use_error: str | None
    pgbouncer: PgBouncerInfo
    tls: bool
    protocol_version: str
    settings: dict[str, ServerSetting]
    policy: PoolPolicy
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = {
            name: {"value": s.value, "unit": s.unit, "source": s.source}
            for name, s in self.settings.items()
        }
        data["pgbouncer"]["in_front"] = self.pgbouncer.in_front
        data["policy"] = {
            "max_lifetime": self.policy.max_lifetime,
            "max_idle": self.policy.max_idle,
            "max_size": self.policy.max_size,
            "min_size": self.policy.min_size,
            "source": "defaults: " + self.policy.problem if self.policy.problem else "settings",
        }
        return data


# --------------------------------------------------------------------------------------------
# Pure helpers


def fmt_duration(seconds: float) -> str:
    """``0``, ``250ms``, ``5s``, ``90s``, ``30min``, ``2h``."""
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 120 or seconds % 60:
        return f"{seconds:g}s"
    if seconds < 7200 or seconds % 3600:
        return f"{seconds / 60:g}min"
    return f"{seconds / 3600:g}h"


def short_version(full: str) -> str:
    """``PostgreSQL 15.2 (Debian ...) on x86_64-pc-linux-gnu, compiled by ...`` -> up to `` on``."""
    return full.split(" on ", 1)[0].strip()


def usable_slots(settings: Mapping[str, ServerSetting]) -> int | None:
    """max_connections minus the slots reserved for superusers and reserved roles."""
    mc = settings.get("max_connections")
    total = mc.as_int() if mc else None
    if total is None:
        return None
    for name in ("superuser_reserved_connections", "reserved_connections"):
        s = settings.get(name)
        total -= (s.as_int() or 0) if s else 0
    return total


def assess(
    settings: Mapping[str, ServerSetting],
    *,
    policy: PoolPolicy,
    connections_in_use: int | None = None,
    behind_pooler: bool = False,
    socket: bool = False,
    local: bool = True,
    tls: bool = False,
    standby: bool = False,
) -> list[Finding]:
    """Findings about server settings that hurt pooled clients. Pure: no I/O."""
    out: list[Finding] = []

    def add(level: Level, code: str, message: str) -> None:
        out.append(Finding(level, code, message))

    ist = settings.get("idle_session_timeout")
    ist_s = ist.seconds() if ist else None
    if ist is not None and ist_s and ist_s < policy.max_lifetime:
        head = (
            f"{ist.describe()} is shorter than pgwarden's max_lifetime "
            f"({fmt_duration(policy.max_lifetime)})"
        )
        limit = fmt_duration(ist_s)
        if behind_pooler:
            tail = (
                f": the server closes PgBouncer's server connections after {limit} idle; "
                f"keep PgBouncer's server_idle_timeout below that, or raise the setting."
            )
        elif ist_s <= policy.max_idle:
            tail = (
                f" and than max_idle ({fmt_duration(policy.max_idle)}): the server closes a "
                f"pooled connection after {limit} idle, before pgwarden retires it, so its "
                f"next use finds it dead and pays a reconnect. Raise idle_session_timeout for "
                f"pgwarden's role (ALTER ROLE ... SET idle_session_timeout = 0), or set "
                f"PGWARDEN_MAX_IDLE below {limit}."
            )
        else:
            tail = (
                f": idle connections above min_size are retired after max_idle "
                f"({fmt_duration(policy.max_idle)}), but the min_size={policy.min_size} "
                f"kept open can sit idle past {limit} and are found dead on their next use. "
                f"Keep PGWARDEN_MIN_SIZE at 0 or PGWARDEN_MAX_LIFETIME below {limit}."
            )
        add("warning", "idle_session_timeout", head + tail)

    iit = settings.get("idle_in_transaction_session_timeout")
    iit_s = iit.seconds() if iit else None
    if iit is not None and iit_s and iit_s < SHORT_IDLE_IN_TRANSACTION:
        add(
            "warning",
            "idle_in_transaction_session_timeout",
            f"{iit.describe()} is very short: a transaction that waits on the application "
            f"between statements for longer is ended with FATAL 25P03 and its connection "
            f"closed.",
        )

    ka = settings.get("tcp_keepalives_idle")
    ka_s = ka.seconds() if ka else None
    if (
        ka is not None
        and ka_s is not None
        and not socket
        and not behind_pooler
        and (ka_s == 0 or ka_s > LONG_KEEPALIVE_IDLE)
    ):
        what = "the OS default, usually 2h" if ka_s == 0 else fmt_duration(ka_s)
        add(
            "info",
            "tcp_keepalives_idle",
            f"tcp_keepalives_idle = {ka.value} ({what}): the server notices a vanished "
            f"client (a frozen serverless instance, a dropped NAT entry) only that late, "
            f"and its slot stays taken until then. 60-300s is common. (pgwarden's own "
            f"keepalives protect the client side.)",
        )

    st = settings.get("statement_timeout")
    st_s = st.seconds() if st else None
    if st is not None and st_s:
        add(
            "info",
            "statement_timeout",
            f"{st.describe()} applies to every statement of this role, migrations and "
            f"maintenance included; pgwarden's deadlines can only shorten it per statement.",
        )

    sr = settings.get("superuser_reserved_connections")
    if sr is not None and sr.as_int() == 0:
        add(
            "warning",
            "superuser_reserved_connections",
            "superuser_reserved_connections = 0: when clients take every slot, no "
            "administrator can log in to find out why.",
        )

    usable = usable_slots(settings)
    if (
        usable is not None
        and usable > 0
        and connections_in_use is not None
        and connections_in_use >= BUSY_RATIO * usable
    ):
        add(
            "warning",
            "connections_in_use",
            f"{connections_in_use} of {usable} usable connections are in use: new "
            f"clients will soon get 'too many clients' (53300).",
        )

    if usable is not None and not behind_pooler:
        fleet = usable // max(policy.max_size, 1)
        if fleet < SMALL_FLEET:
            mc = settings["max_connections"].value
            add(
                "info",
                "max_connections",
                f"max_connections = {mc} leaves {usable} slots for clients: room for "
                f"{fleet} processes at pgwarden's max_size={policy.max_size}. A larger fleet "
                f"needs a smaller max_size or a pooler such as PgBouncer.",
            )

    if not tls and not socket and not local:
        add(
            "warning",
            "tls",
            "TLS is off on a network connection: add sslmode=require (better: verify-full) "
            "to the URL.",
        )

    if standby:
        add(
            "info",
            "standby",
            "the server is a standby: writes fail with 25006 (read-only transaction).",
        )
    return out


def summarize_connect_error(exc: BaseException, timeout: float | None = None) -> str:
    """One short line saying why a connection attempt failed (not yet redacted)."""
    if isinstance(exc, pg_errors.ConnectionTimeout):
        return f"timed out after {effective_timeout(timeout)}s" if timeout else "timed out"
    text = str(exc)
    fatal = re.search(r"(?:FATAL|ERROR):\s+(.+)", text)
    if fatal:
        return " ".join(fatal.group(1).split())
    patterns: list[tuple[str, str]] = [
        (r"Connection refused", "connection refused"),
        (r"failed to resolve host '([^']*)'", "cannot resolve host name {0!r}"),
        (r'could not translate host name "([^"]*)"', "cannot resolve host name {0!r}"),
        (r'on socket "([^"]*)" failed: No such file or directory', "no server socket at {0}"),
        (r"timeout expired", "timed out"),
        (r"Network is unreachable", "network is unreachable"),
        (r"No route to host", "no route to host"),
        (r"server closed the connection unexpectedly", "server closed the connection"),
    ]
    for pattern, phrase in patterns:
        m = re.search(pattern, text)
        if m:
            return phrase.format(*m.groups())
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = re.sub(r"^(connection failed|connection is bad):\s*", "", first)
    first = re.sub(r"^connection to server (at|on) .*? failed:\s*", "", first)
    return " ".join(first.split()) or type(exc).__name__


def _secrets(url: str, params: Mapping[str, str]) -> tuple[str, ...]:
    found = [params.get("password"), os.environ.get("PGPASSWORD")]
    with contextlib.suppress(ValueError):
        found.append(urllib.parse.urlsplit(url).password)
    return tuple(s for s in found if s)


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


def _is_local(host: str) -> bool:
    if not host or host.startswith(("/", "@")) or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Talking to the server


def effective_timeout(timeout: float) -> int:
    """The connect timeout libpq applies: whole seconds, at least 2 (per address tried)."""
    return max(2, math.ceil(timeout))


def _connect(url: str, timeout: float, **extra: Any) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(
        url,
        autocommit=True,
        prepare_threshold=None,  # no server-side prepares: safe behind PgBouncer
        connect_timeout=effective_timeout(timeout),
        fallback_application_name="pgwarden check",
        **extra,
    )


def _read_settings(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, ServerSetting]:
    rows = conn.execute(
        "SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY(%s)",
        [list(SETTING_NAMES)],
    ).fetchall()
    return {r[0]: ServerSetting(r[0], r[1], r[2], r[3]) for r in rows}


def _count_in_use(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[int | None, str | None]:
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
        with _connect(url, min(timeout, 3.0), dbname="pgbouncer") as admin:
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


def _admin_pool_mode(admin: psycopg.Connection[tuple[Any, ...]], dbname: str) -> str | None:
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


def detect_pgbouncer(
    conn: psycopg.Connection[tuple[Any, ...]],
    mode: str,
    *,
    url: str,
    timeout: float,
    backend_pid: int | None,
    server_port: int | None,
) -> PgBouncerInfo:
    """Apply the heuristic described in the module docstring."""
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
    elif key_pid == backend_pid:
        detected = "no"
        evidence.append(f"cancel-key pid {key_pid} = pg_backend_pid()")
    else:
        detected = "likely"
        evidence.append(
            f"cancel-key pid {key_pid} != pg_backend_pid() {backend_pid}: a pooler answers"
        )
    dialled = conn.info.port
    if server_port is not None and str(server_port) != str(dialled):
        evidence.append(f"server port {server_port} != dialled port {dialled}")

    version = pool_mode = None
    if detected in ("yes", "likely"):
        version, pool_mode, said = _probe_admin_console(url, timeout, conn.info.dbname)
        evidence.append(said)
        if version and detected == "likely":
            detected = "yes"
    return PgBouncerInfo(mode, detected, evidence, version, pool_mode)


def collect(
    conn: psycopg.Connection[tuple[Any, ...]],
    url: str,
    *,
    connect_ms: float,
    timeout: float,
    pings: int,
    pgbouncer: str,
    policy: PoolPolicy,
    target: str,
    embedded: str | None = None,
) -> Report:
    """Measure and read everything the report needs over *conn* (closed on return).

    Raises ``psycopg.Error`` if a statement fails or the connection is lost.
    """
    with conn:
        row = conn.execute(
            "SELECT version(), pg_backend_pid(), pg_is_in_recovery(), current_user, "
            "current_database(), inet_server_port()"
        ).fetchone()
        if row is None:  # pragma: no cover - a SELECT without FROM always returns a row
            raise CheckError("the server returned no row for SELECT version()")
        version_full, backend_pid, standby, user, database, server_port = row

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
        )
        tls = bool(conn.pgconn.ssl_in_use)
        proto = conn.info.full_protocol_version
        host = conn.info.host
        port = str(conn.info.port)

    socket = host.startswith(("/", "@"))
    findings = assess(
        settings,
        policy=policy,
        connections_in_use=in_use,
        behind_pooler=bouncer.in_front,
        socket=socket,
        local=_is_local(host),
        tls=tls,
        standby=bool(standby),
    )
    sv = settings.get("server_version")
    svn = settings.get("server_version_num")
    mc, sr, rc = (settings.get(n) for n in SETTING_NAMES[2:5])
    return Report(
        target=target,
        embedded=embedded,
        host=host,
        port=port,
        user=str(user),
        database=str(database),
        server_version=sv.value if sv else conn.info.parameter_status("server_version"),
        server_version_num=svn.as_int() if svn else None,
        version=short_version(str(version_full)),
        version_full=str(version_full),
        standby=bool(standby),
        connect_ms=round(connect_ms, 3),
        latency_ms={
            "p50": round(statistics.median(samples), 3) if samples else 0.0,
            "min": round(min(samples), 3) if samples else 0.0,
            "max": round(max(samples), 3) if samples else 0.0,
            "samples": len(samples),
        },
        max_connections=mc.as_int() if mc else None,
        superuser_reserved_connections=sr.as_int() if sr else None,
        reserved_connections=rc.as_int() if rc else None,
        usable_connections=usable_slots(settings),
        connections_in_use=in_use,
        connections_in_use_error=in_use_error,
        pgbouncer=bouncer,
        tls=tls,
        protocol_version=f"{proto // 10000}.{proto % 10000}",
        settings=settings,
        policy=policy,
        findings=findings,
    )


# --------------------------------------------------------------------------------------------
# Output


def _ms(value: float | int) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def format_report(report: Report, width: int = 100) -> str:
    """The aligned, human-readable report."""
    lat = report.latency_ms
    role = "standby (read-only)" if report.standby else "primary"
    where = f"{report.host}:{report.port}" if not report.host.startswith("/") else report.host
    if report.max_connections is not None:
        reserved = [f"{report.superuser_reserved_connections} reserved for superusers"]
        if report.reserved_connections:
            reserved.append(f"{report.reserved_connections} for reserved_connections")
        limits = (
            f"{report.max_connections} ({', '.join(reserved)}; "
            f"{report.usable_connections} for clients)"
        )
    else:
        limits = "unknown"
    if report.connections_in_use is not None:
        in_use = f"{report.connections_in_use} in use (client backends in pg_stat_activity)"
    else:
        in_use = f"unknown: {report.connections_in_use_error}"
    tls = "on" if report.tls else "off"
    if report.pgbouncer.in_front:
        tls += " (between this client and the pooler)"
    rows = [
        ("target", report.target + (" (embedded)" if report.embedded else "")),
        ("server", f"{report.version}, {role}"),
        ("server_version", report.server_version or "unknown"),
        ("connected as", f"{report.user} to database {report.database} at {where}"),
        ("connect time", f"{_ms(report.connect_ms)} ms"),
        (
            "latency",
            f"p50 {_ms(lat['p50'])} ms (min {_ms(lat['min'])}, max {_ms(lat['max'])}; "
            f"{lat['samples']} x SELECT 1)",
        ),
        ("max_connections", limits),
        ("connections", in_use),
        ("pgbouncer", report.pgbouncer.headline()),
        *(("", f"- {line}") for line in report.pgbouncer.evidence),
        ("tls", tls),
        ("protocol", report.protocol_version),
    ]
    label_width = max(len(label) for label, _ in rows) + 2
    lines: list[str] = []
    for label, value in rows:
        lines.extend(
            textwrap.wrap(
                value,
                width=width,
                initial_indent=f"{label:<{label_width}}",
                subsequent_indent=" " * (label_width + 2),
                break_on_hyphens=False,
            )
            or [label]
        )
    warnings = [f for f in report.findings if f.level == "warning"]
    infos = [f for f in report.findings if f.level == "info"]
    lines.append("")
    if not report.findings:
        lines.append("no warnings")
    else:
        lines.append(f"warnings: {len(warnings)}, notes: {len(infos)}")
        for f in warnings + infos:
            mark = "!" if f.level == "warning" else "i"
            lines.extend(
                textwrap.wrap(
                    f.message,
                    width=width,
                    initial_indent=f"  {mark} ",
                    subsequent_indent="    ",
                    break_on_hyphens=False,
                )
            )
    if report.policy.problem:
        lines.append(f"(compared with pgwarden's defaults: {report.policy.problem})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command


def _pings(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 10000: {text!r}")
    return value


def build_parser(
    prog: str = "pgwarden check", policy: PoolPolicy | None = None
) -> argparse.ArgumentParser:
    policy = policy or PoolPolicy()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Connect once and report the server version, connect time and round-trip "
            "latency, connection limits and use, whether PgBouncer is in front, TLS, and "
            "server settings that hurt pooled clients. With no URL and no DATABASE_URL a "
            "throwaway embedded PostgreSQL is started, checked and removed."
        ),
        epilog=(
            "exit status: 0 checked (warnings do not fail the check), 1 failed after "
            "connecting, 2 bad arguments or cannot connect, 130 interrupted."
        ),
    )
    parser.add_argument(
        "url",
        nargs="?",
        metavar="URL",
        help="postgresql://user:password@host:port/dbname or a key=value conninfo string "
        "(default: PGWARDEN_URL, then DATABASE_URL, then an embedded server)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=policy.connect_timeout,
        metavar="SECONDS",
        help="connect timeout per address; libpq rounds it up to whole seconds, at least 2 "
        "(default: %(default)g, from PGWARDEN_CONNECT_TIMEOUT)",
    )
    parser.add_argument(
        "--pgbouncer",
        choices=("auto", "on", "off"),
        default=policy.pgbouncer if policy.pgbouncer in ("auto", "on", "off") else "auto",
        help="detect PgBouncer (auto), or assume it is (on) or is not (off) in front "
        "(default: %(default)s, from PGWARDEN_PGBOUNCER)",
    )
    parser.add_argument(
        "--pings",
        type=_pings,
        default=DEFAULT_PINGS,
        metavar="N",
        help="SELECT 1 round trips used for the latency figures (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _err(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stderr, flush=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks clean up the server."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check(
    url: str, args: argparse.Namespace, policy: PoolPolicy, prog: str, embedded: str | None
) -> int:
    try:
        params = parse_target(url)
    except UsageError as exc:
        secrets = _secrets(url, {})
        _err(
            f"{prog}: invalid connection URL {redact(url, *secrets)}: {redact(str(exc), *secrets)}"
        )
        return 2
    secrets = _secrets(url, params)
    target = redact(url, *secrets)
    timeout = float(args.timeout)
    try:
        started = time.perf_counter()
        conn = _connect(url, timeout)
        connect_ms = (time.perf_counter() - started) * 1000
    except psycopg.Error as exc:
        reason = redact(summarize_connect_error(exc, timeout), *secrets)
        _err(f"{prog}: cannot connect to {target}: {reason}")
        return 2
    try:
        report = collect(
            conn,
            url,
            connect_ms=connect_ms,
            timeout=timeout,
            pings=int(args.pings),
            pgbouncer=str(args.pgbouncer),
            policy=policy,
            target=target,
            embedded=embedded,
        )
    except (psycopg.Error, CheckError) as exc:
        reason = redact(summarize_connect_error(exc), *secrets)
        _err(f"{prog}: check failed on {target}: {reason}")
        return 1
    text = json.dumps(report.to_dict(), indent=2) if args.json else format_report(report)
    # Belt and braces: nothing in the report should hold a secret, but mask any that does.
    print(redact(text, *secrets), flush=True)
    return 0


def _run_embedded(args: argparse.Namespace, policy: PoolPolicy, prog: str) -> int:
    with _sigterm_as_interrupt():
        return with_embedded(
            prog, lambda url, description: _check(url, args, policy, prog, embedded=description)
        )


def run(argv: Sequence[str], prog: str = "pgwarden check") -> int:
    """Entry point used by :mod:`pgwarden.cli.main`. Returns the exit code."""
    policy = load_policy()
    args = build_parser(prog, policy).parse_args(list(argv))
    url = args.url if args.url is not None else policy.url
    if url is None:
        return _run_embedded(args, policy, prog)
    return _check(url, args, policy, prog, embedded=None)
