"""What ``pgwarden check`` found, and its two renderings: aligned text and JSON. No I/O."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pgwarden.core.check_rules import Finding, ServerSetting
from pgwarden.core.fleet import FleetPlan
from pgwarden.settings import Settings

__all__ = ["Detected", "PgBouncerInfo", "PoolPolicy", "Report", "format_json", "format_report"]

Detected = Literal["yes", "likely", "no", "unknown", "off"]


@dataclass(frozen=True)
class PoolPolicy:
    """The pgwarden settings the server was compared with, as the report shows them;
    *problem* says why they are the defaults (a bad ``PGWARDEN_*`` variable), if so."""

    max_lifetime: float
    max_idle: float
    max_size: int
    min_size: int
    problem: str | None = None

    @classmethod
    def of(cls, settings: Settings, problem: str | None = None) -> PoolPolicy:
        """The report's view of *settings*."""
        return cls(
            max_lifetime=float(settings.max_lifetime),
            max_idle=float(settings.max_idle),
            max_size=int(settings.max_size),
            min_size=int(settings.min_size),
            problem=problem,
        )


@dataclass
class PgBouncerInfo:
    """Whether a pooler answers the client, and the evidence for the verdict."""

    mode: str
    detected: Detected
    evidence: list[str] = field(default_factory=list)
    version: str | None = None
    pool_mode: str | None = None

    @property
    def in_front(self) -> bool:
        """A pooler is (``yes``) or very probably is (``likely``) between client and server."""
        return self.detected in ("yes", "likely")

    def headline(self) -> str:
        """``yes, PgBouncer 1.18.0, pool_mode=transaction`` / ``no`` / ``likely`` ..."""
        if self.detected == "off":
            return "not checked (--pgbouncer off)"
        extra = [x for x in (self.version, self.pool_mode and f"pool_mode={self.pool_mode}") if x]
        return ", ".join([self.detected, *extra])


@dataclass
class Report:
    """Everything one check measured and read, and the findings about it."""

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
    #: ``--instances N``: the max_size each instance of the fleet gets (None: not asked).
    fleet: FleetPlan | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``--json`` prints (its keys are part of the CLI's interface)."""
        data = asdict(self)
        data["settings"] = {
            name: {"value": s.value, "unit": s.unit, "source": s.source}
            for name, s in self.settings.items()
        }
        data["pgbouncer"]["in_front"] = self.pgbouncer.in_front
        problem = self.policy.problem
        data["policy"] = {
            "max_lifetime": self.policy.max_lifetime,
            "max_idle": self.policy.max_idle,
            "max_size": self.policy.max_size,
            "min_size": self.policy.min_size,
            "source": "defaults: " + problem if problem else "settings",
        }
        if self.fleet is None:
            del data["fleet"]  # only with --instances: the keys stay as they were without
        else:
            data["fleet"]["shares"] = list(self.fleet.shares)
        return data


def format_json(report: Report) -> str:
    """The report as one indented JSON object."""
    return json.dumps(report.to_dict(), indent=2)


def _ms(value: float | int) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _fleet_rows(plan: FleetPlan | None) -> list[tuple[str, str]]:
    if plan is None:
        return []
    first, *rest = plan.why.split("; ")
    return [("fleet", first), *(("", line) for line in rest)]


def _rows(report: Report) -> list[tuple[str, str]]:
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
    return [
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
        *_fleet_rows(report.fleet),
        ("pgbouncer", report.pgbouncer.headline()),
        *(("", f"- {line}") for line in report.pgbouncer.evidence),
        ("tls", tls),
        ("protocol", report.protocol_version),
    ]


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )


def format_report(report: Report, width: int = 100) -> str:
    """The aligned, human-readable report. Checking an embedded server, its first line
    says so (the output may be read without the stderr lines that also say it)."""
    rows = _rows(report)
    label_width = max(len(label) for label, _ in rows) + 2
    lines: list[str] = []
    if report.embedded:
        lines.append(
            f"checking a throwaway embedded server, removed afterwards ({report.embedded})"
        )
    for label, value in rows:
        lines.extend(
            _wrap(value, width, f"{label:<{label_width}}", " " * (label_width + 2)) or [label]
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
            lines.extend(_wrap(f.message, width, f"  {mark} ", "    "))
    if report.policy.problem:
        lines.append(f"(compared with pgwarden's defaults: {report.policy.problem})")
    return "\n".join(lines)
