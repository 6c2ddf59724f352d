"""The findings of ``pgwarden check``: small named rules over what the check read. Pure.

A rule is a function ``rule(facts) -> Finding | None`` named after the finding's code; the
check runs :data:`RULES` in order over one :class:`CheckFacts` (what the server said, plus
pgwarden's own :class:`~pgwarden.settings.Settings`, the same the handle would use). A new
finding is a new function, a new entry in :data:`RULES` and, if it needs input the check does
not collect yet, a new field of :class:`CheckFacts` with a default (so every other rule and
test stays as it is), as :func:`fleet_budget` came with ``--instances N --fleet-budget X``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pgwarden.core.fleet import FleetPlan
from pgwarden.settings import Settings

__all__ = [
    "BUSY_RATIO",
    "LONG_KEEPALIVE_IDLE",
    "RULES",
    "SHORT_IDLE_IN_TRANSACTION",
    "SMALL_FLEET",
    "CheckFacts",
    "Finding",
    "Level",
    "Rule",
    "ServerSetting",
    "assess",
    "connections_in_use",
    "fleet_budget",
    "fmt_duration",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "max_connections",
    "standby",
    "statement_timeout",
    "superuser_reserved_connections",
    "tcp_keepalives_idle",
    "tls",
    "usable_slots",
]

#: idle_in_transaction_session_timeout below this (seconds) is reported as "very short".
SHORT_IDLE_IN_TRANSACTION = 10.0
#: tcp_keepalives_idle above this (seconds; or 0: the OS default, usually 2 h) is reported.
LONG_KEEPALIVE_IDLE = 600.0
#: Connections in use above this share of the usable slots are reported.
BUSY_RATIO = 0.8
#: Fewer processes than this at pgwarden's max_size fit in the server: reported.
SMALL_FLEET = 10

Level = Literal["warning", "info"]

_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


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


@dataclass(frozen=True)
class ServerSetting:
    """One row of ``pg_settings``: name, raw value, unit and where it was set."""

    name: str
    value: str
    unit: str | None = None
    source: str = "default"

    def as_int(self) -> int | None:
        """The value as an integer, or ``None`` if it is not one."""
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
        """``name = 5s (set by configuration file)``."""
        secs = self.seconds()
        shown = fmt_duration(secs) if secs is not None else self.value
        return f"{self.name} = {shown} (set by {self.source})"


@dataclass
class Finding:
    """One line under the report: a ``warning`` or a note (``info``), with a stable code."""

    level: Level
    code: str
    message: str


@dataclass(frozen=True)
class CheckFacts:
    """Everything the rules look at. *server*: ``pg_settings`` rows by name; *pgwarden*:
    the settings the handle would run with (``Settings.from_env()``, else the defaults)."""

    server: Mapping[str, ServerSetting]
    pgwarden: Settings = field(default_factory=Settings)
    connections_in_use: int | None = None
    behind_pooler: bool = False
    socket: bool = False  # a Unix-domain socket, where TCP keepalives and TLS do not apply
    local: bool = True  # loopback or a socket: TLS off is no risk
    tls: bool = False
    standby: bool = False
    #: ``pgwarden check --instances N``: what :func:`pgwarden.core.fleet.plan_fleet` gives
    #: each of N processes against this server (None: not asked).
    fleet: FleetPlan | None = None


Rule = Callable[[CheckFacts], "Finding | None"]


def usable_slots(server: Mapping[str, ServerSetting]) -> int | None:
    """max_connections minus the slots reserved for superusers and reserved roles."""
    mc = server.get("max_connections")
    total = mc.as_int() if mc else None
    if total is None:
        return None
    for name in ("superuser_reserved_connections", "reserved_connections"):
        s = server.get(name)
        total -= (s.as_int() or 0) if s else 0
    return total


def _seconds(facts: CheckFacts, name: str) -> tuple[ServerSetting, float] | None:
    setting = facts.server.get(name)
    secs = setting.seconds() if setting else None
    return None if setting is None or secs is None else (setting, secs)


def idle_session_timeout(facts: CheckFacts) -> Finding | None:
    """Warn when the server closes idle sessions before pgwarden retires them."""
    found = _seconds(facts, "idle_session_timeout")
    pgw = facts.pgwarden
    if found is None or not found[1] or found[1] >= pgw.max_lifetime:
        return None
    setting, secs = found
    head = (
        f"{setting.describe()} is shorter than pgwarden's max_lifetime "
        f"({fmt_duration(pgw.max_lifetime)})"
    )
    limit = fmt_duration(secs)
    if facts.behind_pooler:
        tail = (
            f": the server closes PgBouncer's server connections after {limit} idle; "
            f"keep PgBouncer's server_idle_timeout below that, or raise the setting."
        )
    elif secs <= pgw.max_idle:
        tail = (
            f" and than max_idle ({fmt_duration(pgw.max_idle)}): the server closes a "
            f"pooled connection after {limit} idle, before pgwarden retires it, so its "
            f"next use finds it dead and pays a reconnect. Raise idle_session_timeout for "
            f"pgwarden's role (ALTER ROLE ... SET idle_session_timeout = 0), or set "
            f"PGWARDEN_MAX_IDLE below {limit}."
        )
    else:
        tail = (
            f": idle connections above min_size are retired after max_idle "
            f"({fmt_duration(pgw.max_idle)}), but the min_size={pgw.min_size} "
            f"kept open can sit idle past {limit} and are found dead on their next use. "
            f"Keep PGWARDEN_MIN_SIZE at 0 or PGWARDEN_MAX_LIFETIME below {limit}."
        )
    return Finding("warning", "idle_session_timeout", head + tail)


def idle_in_transaction_session_timeout(facts: CheckFacts) -> Finding | None:
    """Warn when a transaction waiting on the application is killed within seconds."""
    found = _seconds(facts, "idle_in_transaction_session_timeout")
    if found is None or not found[1] or found[1] >= SHORT_IDLE_IN_TRANSACTION:
        return None
    return Finding(
        "warning",
        "idle_in_transaction_session_timeout",
        f"{found[0].describe()} is very short: a transaction that waits on the application "
        f"between statements for longer is ended with FATAL 25P03 and its connection "
        f"closed.",
    )


def tcp_keepalives_idle(facts: CheckFacts) -> Finding | None:
    """Note a server that notices vanished TCP clients late (not over a socket or pooler)."""
    found = _seconds(facts, "tcp_keepalives_idle")
    if found is None or facts.socket or facts.behind_pooler:
        return None
    setting, secs = found
    if secs != 0 and secs <= LONG_KEEPALIVE_IDLE:
        return None
    what = "the OS default, usually 2h" if secs == 0 else fmt_duration(secs)
    return Finding(
        "info",
        "tcp_keepalives_idle",
        f"tcp_keepalives_idle = {setting.value} ({what}): the server notices a vanished "
        f"client (a frozen serverless instance, a dropped NAT entry) only that late, "
        f"and its slot stays taken until then. 60-300s is common. (pgwarden's own "
        f"keepalives protect the client side.)",
    )


def statement_timeout(facts: CheckFacts) -> Finding | None:
    """Note a role- or server-wide statement_timeout (it cuts off migrations too)."""
    found = _seconds(facts, "statement_timeout")
    if found is None or not found[1]:
        return None
    return Finding(
        "info",
        "statement_timeout",
        f"{found[0].describe()} applies to every statement of this role, migrations and "
        f"maintenance included; pgwarden's deadlines can only shorten it per statement.",
    )


def superuser_reserved_connections(facts: CheckFacts) -> Finding | None:
    """Warn when no slot is kept for an administrator."""
    setting = facts.server.get("superuser_reserved_connections")
    if setting is None or setting.as_int() != 0:
        return None
    return Finding(
        "warning",
        "superuser_reserved_connections",
        "superuser_reserved_connections = 0: when clients take every slot, no "
        "administrator can log in to find out why.",
    )


def connections_in_use(facts: CheckFacts) -> Finding | None:
    """Warn when at least :data:`BUSY_RATIO` of the client slots are taken."""
    usable = usable_slots(facts.server)
    in_use = facts.connections_in_use
    if usable is None or usable <= 0 or in_use is None or in_use < BUSY_RATIO * usable:
        return None
    return Finding(
        "warning",
        "connections_in_use",
        f"{in_use} of {usable} usable connections are in use: new "
        f"clients will soon get 'too many clients' (53300).",
    )


def max_connections(facts: CheckFacts) -> Finding | None:
    """Note, without a pooler, when fewer than :data:`SMALL_FLEET` processes fit."""
    usable = usable_slots(facts.server)
    if usable is None or facts.behind_pooler:
        return None
    max_size = facts.pgwarden.max_size
    fleet = usable // max(max_size, 1)
    if fleet >= SMALL_FLEET:
        return None
    mc = facts.server["max_connections"].value
    return Finding(
        "info",
        "max_connections",
        f"max_connections = {mc} leaves {usable} slots for clients: room for "
        f"{fleet} processes at pgwarden's max_size={max_size}. A larger fleet "
        f"needs a smaller max_size or a pooler such as PgBouncer.",
    )


def fleet_budget(facts: CheckFacts) -> Finding | None:
    """With ``--instances N``: warn when the instances must take turns (more of them than
    the budget has slots to share), and note when pgwarden's max_size asks for more than
    each one's share while no fleet budget is set (the processes would overrun it)."""
    plan = facts.fleet
    if plan is None:
        return None
    low, high = plan.per_instance
    max_size = facts.pgwarden.max_size
    if low == 0:
        return Finding(
            "warning",
            "fleet_budget",
            f"{plan.instances} instances share {plan.budget - plan.headroom} connections: "
            f"each gets one only in turn and waits for it between turns. Fewer instances, a "
            f"larger budget or a pooler such as PgBouncer avoid the wait.",
        )
    if facts.pgwarden.fleet_budget is None and plan.instances * max_size > plan.budget:
        each = f"{low}" if low == high else f"{low}-{high}"
        return Finding(
            "info",
            "fleet_budget",
            f"{plan.instances} instances at pgwarden's max_size={max_size} could open "
            f"{plan.instances * max_size} connections, more than the budget of {plan.budget}; "
            f"set PGWARDEN_FLEET_BUDGET (each instance then caps itself at {each}).",
        )
    return None


def tls(facts: CheckFacts) -> Finding | None:
    """Warn about plaintext on a network (not socket, not loopback) connection."""
    if facts.tls or facts.socket or facts.local:
        return None
    return Finding(
        "warning",
        "tls",
        "TLS is off on a network connection: add sslmode=require (better: verify-full) to the URL.",
    )


def standby(facts: CheckFacts) -> Finding | None:
    """Note a hot standby: writes fail there."""
    if not facts.standby:
        return None
    return Finding(
        "info",
        "standby",
        "the server is a standby: writes fail with 25006 (read-only transaction).",
    )


#: Every rule, in the order their findings are listed.
RULES: tuple[Rule, ...] = (
    idle_session_timeout,
    idle_in_transaction_session_timeout,
    tcp_keepalives_idle,
    statement_timeout,
    superuser_reserved_connections,
    connections_in_use,
    max_connections,
    fleet_budget,
    tls,
    standby,
)


def assess(facts: CheckFacts, rules: tuple[Rule, ...] = RULES) -> list[Finding]:
    """The findings of *rules* (default: all of them) about *facts*, in rule order."""
    return [finding for rule in rules if (finding := rule(facts)) is not None]
