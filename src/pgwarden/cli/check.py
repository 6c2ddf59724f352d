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
  (``pgwarden.settings.Settings.from_env()``: ``max_lifetime``, ``max_idle``, ``max_size``;
  the same defaults as the handle when a ``PGWARDEN_*`` variable is bad).

Layout: :mod:`pgwarden.cli._check_probe` does the I/O (with the handle's own connect-timeout
rule, failure classifier and pooler heuristics), :mod:`pgwarden.core.check_rules` turns what
it read into findings (one small named rule per finding, pure), and
:mod:`pgwarden.cli._check_report` renders the report as text or JSON. This module wires them
to the command line.

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
* libpq got no BackendKeyData, or ``pg_backend_pid()`` failed: ``unknown``;
* the pids are equal but the server saw the connection come from another port than this end
  dialled from (``inet_client_port()``): pgpool-II forwards the server's key, so the check
  asks ``SHOW pool_version``, as the handle does; if it answers, the verdict is ``yes`` with
  pgpool-II's version.

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

Output
------
stdout holds only the report (text, or one JSON object with ``--json``); progress and
failures go to stderr. Checking the embedded default, the first line on stderr and the first
line of the text report say that a throwaway embedded server is being checked.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from pgwarden._redact import redact
from pgwarden.cli._args import int_between, positive_float
from pgwarden.cli._check_probe import (
    CheckError,
    Probe,
    UsageError,
    connect,
    is_local,
    parse_target,
    probe,
    summarize_connect_error,
)
from pgwarden.cli._check_report import (
    PgBouncerInfo,
    PoolPolicy,
    Report,
    format_json,
    format_report,
)
from pgwarden.cli._common import err, sigterm_as_interrupt, url_secrets
from pgwarden.cli._embedded import with_embedded
from pgwarden.core.check_rules import (
    RULES,
    CheckFacts,
    Finding,
    ServerSetting,
    assess,
    fmt_duration,
    usable_slots,
)
from pgwarden.core.fleet import FleetPlan, plan_fleet
from pgwarden.errors import SettingsError
from pgwarden.settings import FleetBudget, Settings

__all__ = [
    "RULES",
    "CheckFacts",
    "Finding",
    "PgBouncerInfo",
    "PoolPolicy",
    "Report",
    "ServerSetting",
    "assess",
    "build_parser",
    "build_report",
    "fmt_duration",
    "format_json",
    "format_report",
    "load_settings",
    "plan_for",
    "run",
    "summarize_connect_error",
]

DEFAULT_PINGS = 10


def short_version(full: str) -> str:
    """``PostgreSQL 15.2 (Debian ...) on x86_64-pc-linux-gnu, compiled by ...`` -> up to `` on``."""
    return full.split(" on ", 1)[0].strip()


def load_settings(environ: Mapping[str, str] | None = None) -> tuple[Settings, str | None]:
    """pgwarden's settings as the handle reads them (``Settings.from_env()``), and ``None``;
    or, when a ``PGWARDEN_*`` variable is bad, the defaults (with ``PGWARDEN_URL`` or
    ``DATABASE_URL``) and why, already redacted."""
    env = os.environ if environ is None else environ
    try:
        return Settings.from_env(env), None
    except SettingsError as exc:
        url = env.get("PGWARDEN_URL") or env.get("DATABASE_URL") or None
        return Settings(url=url), redact(str(exc))


def plan_for(
    instances: int, budget: FleetBudget, settings: Settings, row: Mapping[str, Any]
) -> FleetPlan:
    """:func:`pgwarden.core.fleet.plan_fleet` over the fleet sampler's row (*row*: what
    the handle's own sample query returned, this check's connection not counted)."""
    others = row["others_role"] if budget == "role" else row["others_server"]
    role_limit = row["role_limit"]
    return plan_fleet(
        budget,
        None if role_limit is None else int(role_limit),
        int(row["max_connections"]),
        int(row["reserved"]),
        instances,
        settings.max_size,
        others=int(others),
    )


def build_report(
    found: Probe,
    *,
    target: str,
    embedded: str | None,
    connect_ms: float,
    settings: Settings,
    problem: str | None = None,
    instances: int | None = None,
    fleet_budget: FleetBudget | None = None,
) -> Report:
    """The report about what :func:`~pgwarden.cli._check_probe.probe` read; with
    *instances* (and the probe's fleet row), the fleet plan for them. Pure."""
    server = found.settings
    fleet = None
    if instances is not None and found.fleet_row is not None:
        budget = fleet_budget or settings.fleet_budget or "server"
        fleet = plan_for(instances, budget, settings, found.fleet_row)
    facts = CheckFacts(
        server=server,
        pgwarden=settings,
        connections_in_use=found.in_use,
        behind_pooler=found.pgbouncer.in_front,
        socket=found.host.startswith(("/", "@")),
        local=is_local(found.host),
        tls=found.tls,
        standby=found.standby,
        fleet=fleet,
    )

    def number(name: str) -> int | None:
        row = server.get(name)
        return row.as_int() if row else None

    sv = server.get("server_version")
    proto = found.protocol_version
    return Report(
        target=target,
        embedded=embedded,
        host=found.host,
        port=found.port,
        user=found.user,
        database=found.database,
        server_version=sv.value if sv else found.parameter_server_version,
        server_version_num=number("server_version_num"),
        version=short_version(found.version_full),
        version_full=found.version_full,
        standby=found.standby,
        connect_ms=round(connect_ms, 3),
        latency_ms=found.latency_ms(),
        max_connections=number("max_connections"),
        superuser_reserved_connections=number("superuser_reserved_connections"),
        reserved_connections=number("reserved_connections"),
        usable_connections=usable_slots(server),
        connections_in_use=found.in_use,
        connections_in_use_error=found.in_use_error,
        pgbouncer=found.pgbouncer,
        tls=found.tls,
        protocol_version=f"{proto // 10000}.{proto % 10000}",
        settings=dict(server),
        policy=PoolPolicy.of(settings, problem),
        findings=assess(facts),
        fleet=fleet,
    )


# --------------------------------------------------------------------------------------------
# Command


def _fleet_budget(text: str) -> FleetBudget:
    word = text.strip().lower()
    if word in ("role", "server"):
        return "role" if word == "role" else "server"
    try:
        value = int(word)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number of connections, 'role' or 'server': {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser(
    prog: str = "pgwarden check", settings: Settings | None = None
) -> argparse.ArgumentParser:
    """The parser of ``pgwarden check``; defaults from *settings* (else pgwarden's)."""
    settings = settings or Settings()
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
        default=settings.connect_timeout,
        metavar="SECONDS",
        help="connect timeout per address; libpq rounds it up to whole seconds, at least 2 "
        "(default: %(default)g, from PGWARDEN_CONNECT_TIMEOUT)",
    )
    parser.add_argument(
        "--pgbouncer",
        choices=("auto", "on", "off"),
        default=settings.pgbouncer,
        help="detect PgBouncer (auto), or assume it is (on) or is not (off) in front "
        "(default: %(default)s, from PGWARDEN_PGBOUNCER)",
    )
    parser.add_argument(
        "--pings",
        type=int_between(1, 10_000),
        default=DEFAULT_PINGS,
        metavar="N",
        help="SELECT 1 round trips used for the latency figures (default: %(default)s)",
    )
    parser.add_argument(
        "--instances",
        type=int_between(1, 1_000_000),
        metavar="N",
        help="plan a fleet of N processes against this server: the max_size each one gets "
        "from the fleet budget (pgwarden.core.fleet.plan_fleet, as the handles compute it)",
    )
    parser.add_argument(
        "--fleet-budget",
        type=_fleet_budget,
        metavar="X",
        help="with --instances: connections the fleet shares, 'role' (the role's CONNECTION "
        "LIMIT) or 'server' (max_connections less the reserved slots) (default: "
        "PGWARDEN_FLEET_BUDGET, else server)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _check(
    url: str,
    args: argparse.Namespace,
    settings: Settings,
    problem: str | None,
    prog: str,
    embedded: str | None,
) -> int:
    secrets = url_secrets(url)
    try:
        parse_target(url)
    except UsageError as exc:
        err(f"{prog}: invalid connection URL {redact(url, *secrets)}: {redact(str(exc), *secrets)}")
        return 2
    target = redact(url, *secrets)
    timeout = float(args.timeout)
    try:
        started = time.perf_counter()
        conn = connect(url, timeout)
        connect_ms = (time.perf_counter() - started) * 1000
    except psycopg.Error as exc:
        reason = redact(summarize_connect_error(exc, timeout), *secrets)
        err(f"{prog}: cannot connect to {target}: {reason}")
        return 2
    try:
        found = probe(
            conn,
            url,
            timeout=timeout,
            pings=int(args.pings),
            pgbouncer=str(args.pgbouncer),
            fleet_tag=None if args.instances is None else settings.fleet_tag,
        )
    except (psycopg.Error, CheckError) as exc:
        reason = redact(summarize_connect_error(exc), *secrets)
        err(f"{prog}: check failed on {target}: {reason}")
        return 1
    report = build_report(
        found,
        target=target,
        embedded=embedded,
        connect_ms=connect_ms,
        settings=settings,
        problem=problem,
        instances=args.instances,
        fleet_budget=args.fleet_budget,
    )
    text = format_json(report) if args.json else format_report(report)
    # Belt and braces: nothing in the report should hold a secret, but mask any that does.
    print(redact(text, *secrets), flush=True)
    return 0


def run(argv: Sequence[str], prog: str = "pgwarden check") -> int:
    """Entry point used by :mod:`pgwarden.cli.main`. Returns the exit code."""
    settings, problem = load_settings()
    parser = build_parser(prog, settings)
    args = parser.parse_args(list(argv))
    if args.fleet_budget is not None and args.instances is None:
        parser.error("--fleet-budget plans a fleet: give --instances N too")
    url = args.url if args.url is not None else settings.url
    if url is not None:
        return _check(url, args, settings, problem, prog, embedded=None)
    with sigterm_as_interrupt():
        return with_embedded(
            prog,
            lambda url, description: _check(
                url, args, settings, problem, prog, embedded=description
            ),
            doing="checking",
        )
