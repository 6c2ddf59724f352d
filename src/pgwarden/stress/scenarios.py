"""The stress scenarios: their workload, their server, and their faults, at each size.

A scenario is data: a :class:`Plan` says how many worker processes and threads run which
phases of requests, what the server looks like (``max_connections``,
``idle_session_timeout``), how clients reach it (directly, through the fault proxy, or
through PgBouncer), and which faults the harness injects at which second. The harness
runs the same plan once per client.

Sizes: ``tiny`` is for the test suite (seconds per client), ``small`` is the default and
the ``--quick`` flagship, ``full`` is what ``make bench`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pgwarden.stress.worker import Phase

__all__ = [
    "ALIASES",
    "DEFAULT",
    "OPT_IN",
    "QUICK",
    "SCENARIOS",
    "SIZES",
    "FaultStep",
    "Plan",
    "Scenario",
    "Variant",
    "Waves",
    "Workload",
    "resolve",
]

Size = Literal["tiny", "small", "full"]
Via = Literal["direct", "proxy", "pgbouncer", "pair"]
Action = Literal[
    "restart_fast",
    "restart_immediate",
    "kill",
    "latency",
    "reset",
    "blackhole",
    "mark",
    "failover_fence",
    "failover_crash",
    "rejoin",
]

SIZES: tuple[Size, ...] = ("tiny", "small", "full")

#: Connections a server keeps for superusers; the clients log in as an ordinary role, so
#: with max_connections=20 they can open 17.
RESERVED = 3


@dataclass(frozen=True)
class Workload:
    processes: int
    threads: int
    pool_size: int
    phases: tuple[Phase, ...]
    write_ratio: float = 0.3
    read_work: float = 0.0  # seconds of pg_sleep in each read (holds the connection)
    max_requests: int = 20_000  # per thread, whatever the phases say
    #: Of the writes, the share that the SQLAlchemy clients run as ORM units of work
    #: (:mod:`pgwarden.stress.orm`); the other clients do a plain write for each.
    orm_share: float = 0.0

    def end(self, deadline: float) -> float:
        """When the last phase should be over, in seconds after the start (an estimate for
        count-bounded phases: every request at its deadline would take longer)."""
        end = 0.0
        for p in self.phases:
            if p.duration is not None:
                end = max(end, p.start + p.duration)
            else:
                end = max(end, p.start + (p.requests or 0) * p.interval + 2 * deadline)
        return end


@dataclass(frozen=True)
class FaultStep:
    """At ``at`` seconds after the start, do ``action``; faults with a ``duration`` are
    healed after it. ``recover``: measure the time to the first success after the fault
    ends (the server accepts again, or the network heals)."""

    at: float
    action: Action
    label: str
    duration: float = 0.0
    value: float = 0.0
    recover: bool = True


@dataclass(frozen=True)
class Waves:
    """Worker processes arriving in ``count`` waves, ``every`` seconds apart (the ``fleet``
    scenario): process ``i`` of ``n`` is in wave ``i * count // n`` and builds its client
    and starts its phases that many waves after the start signal. Phase times stay
    relative to the start signal (:meth:`phases_for`), so every process stops together."""

    count: int
    every: float

    def wave_of(self, worker: int, processes: int) -> int:
        return worker * self.count // processes

    def delay(self, worker: int, processes: int) -> float:
        return round(self.wave_of(worker, processes) * self.every, 3)

    def phases_for(self, phases: tuple[Phase, ...], delay: float) -> tuple[Phase, ...]:
        """``phases`` as seen from an arrival ``delay`` seconds after the start: what was
        over by then is gone, what was under way is shortened."""
        out = []
        for p in phases:
            start = p.start - delay
            duration = p.duration
            if duration is not None:
                if start + duration <= 0:
                    continue
                duration = start + duration if start < 0 else duration
            out.append(
                Phase(
                    start=max(0.0, start),
                    interval=p.interval,
                    requests=p.requests,
                    duration=duration,
                )
            )
        return tuple(out)


@dataclass(frozen=True)
class Variant:
    """Another run of a client in one scenario, under its own name (``pgwarden+budget``
    in the ``fleet`` scenario): the same client with ``fleet_budget`` set."""

    name: str
    client: str
    fleet_budget: int | str | None = None


@dataclass(frozen=True)
class Plan:
    workload: Workload
    faults: tuple[FaultStep, ...] = ()
    server_settings: Mapping[str, object] = field(default_factory=dict)
    via: Via = "direct"
    pgbouncer_pool_size: int = 10  # PgBouncer's default_pool_size
    pgbouncer_max_clients: int = 1000  # PgBouncer's max_client_conn
    deadline: float = 5.0
    #: The processes arrive in waves (None: all at the start signal).
    waves: Waves | None = None
    #: Extra runs, each right after the client it varies (when that client runs).
    variants: tuple[Variant, ...] = ()

    @property
    def hard_limit(self) -> float:
        """Seconds after the start when every worker is stopped, whatever it is doing."""
        last_fault = max((f.at + f.duration for f in self.faults), default=0.0)
        return max(self.workload.end(self.deadline), last_fault) + self.deadline + 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    description: str
    #: What the scenario needs beyond a database: "control" (restart the server),
    #: "own_server" (its own settings), "pgbouncer", "proxy" (a TCP host to proxy).
    needs: frozenset[str]
    build: Callable[[Size, float], Plan]


def _pick(size: Size, tiny: float, small: float, full: float) -> float:
    return {"tiny": tiny, "small": small, "full": full}[size]


def _ipick(size: Size, tiny: int, small: int, full: int) -> int:
    return {"tiny": tiny, "small": small, "full": full}[size]


# -- the scenarios ---------------------------------------------------------------------------


def _storm_workload(size: Size) -> Workload:
    return Workload(
        processes=_ipick(size, 6, 24, 50),
        threads=2,
        pool_size=4,
        phases=(Phase(start=0.0, interval=0.01, requests=_ipick(size, 4, 10, 20)),),
    )


def _storm(size: Size, deadline: float) -> Plan:
    return Plan(
        workload=_storm_workload(size),
        server_settings={"max_connections": 20},
        deadline=deadline,
    )


def _restart_faults(size: Size) -> tuple[FaultStep, ...]:
    return (
        FaultStep(at=_pick(size, 1.5, 3.5, 10.0), action="restart_fast", label="restart (fast)"),
        FaultStep(
            at=_pick(size, 3.8, 8.0, 25.0),
            action="restart_immediate",
            label="restart (immediate)",
        ),
    )


#: The ORM share of the writes in the scenarios that run units of work (restart, kills).
ORM_SHARE = 0.5


def _steady(
    size: Size, *, tiny: float, small: float, full: float, orm_share: float = 0.0
) -> Workload:
    return Workload(
        processes=_ipick(size, 3, 4, 8),
        threads=_ipick(size, 3, 4, 4),
        pool_size=4,
        phases=(Phase(start=0.0, interval=0.02, duration=_pick(size, tiny, small, full)),),
        orm_share=orm_share,
    )


def _restart(size: Size, deadline: float) -> Plan:
    return Plan(
        workload=_steady(size, tiny=6.0, small=12.0, full=40.0, orm_share=ORM_SHARE),
        faults=_restart_faults(size),
        server_settings={"max_connections": 100},
        deadline=deadline,
    )


def _kills(size: Size, deadline: float) -> Plan:
    first, every, last = {
        "tiny": (1.5, 1.0, 3.5),
        "small": (2.0, 1.5, 10.0),
        "full": (4.0, 2.0, 26.0),
    }[size]
    faults = []
    at = first
    while at <= last + 1e-9:
        faults.append(
            FaultStep(at=round(at, 3), action="kill", value=0.5, label="kill 50% of backends")
        )
        at += every
    return Plan(
        workload=_steady(size, tiny=5.0, small=12.0, full=30.0, orm_share=ORM_SHARE),
        faults=tuple(faults),
        server_settings={"max_connections": 100},
        deadline=deadline,
    )


def _overload(size: Size, deadline: float) -> Plan:
    processes, threads, pool = {"tiny": (8, 3, 3), "small": (10, 4, 4), "full": (16, 4, 4)}[size]
    return Plan(
        workload=Workload(
            processes=processes,
            threads=threads,
            pool_size=pool,
            phases=(Phase(start=0.0, interval=0.02, duration=_pick(size, 5.0, 12.0, 30.0)),),
            read_work=0.02,
        ),
        server_settings={"max_connections": 20},
        deadline=deadline,
    )


def _flaky(size: Size, deadline: float) -> Plan:
    spike, spike_at, spike_for, reset_at, reset_for, hole_at, hole_for, total = {
        "tiny": (0.2, 1.0, 1.5, 3.5, 0.3, 5.0, 1.5, 9.0),
        "small": (0.3, 3.0, 3.0, 8.0, 0.5, 11.0, 3.0, 20.0),
        "full": (0.5, 5.0, 7.0, 16.0, 1.0, 22.0, 7.0, 45.0),
    }[size]
    return Plan(
        workload=_steady(size, tiny=total, small=total, full=total),
        faults=(
            FaultStep(
                at=spike_at,
                action="latency",
                value=spike,
                duration=spike_for,
                label=f"latency +{spike * 1000:.0f}ms each way",
                recover=False,
            ),
            FaultStep(at=reset_at, action="reset", duration=reset_for, label="connection resets"),
            FaultStep(at=hole_at, action="blackhole", duration=hole_for, label="blackhole"),
        ),
        via="proxy",
        server_settings={"max_connections": 100},
        deadline=deadline,
    )


def _idle(size: Size, deadline: float) -> Plan:
    timeout, requests, second = {"tiny": (1, 5, 3.5), "small": (2, 20, 6.0), "full": (5, 50, 15.0)}[
        size
    ]
    first_end = requests * 0.02 + 0.5
    return Plan(
        workload=Workload(
            processes=_ipick(size, 3, 4, 8),
            threads=_ipick(size, 3, 4, 4),
            pool_size=4,
            phases=(
                Phase(start=0.0, interval=0.02, requests=requests),
                Phase(start=second, interval=0.02, requests=requests),
            ),
        ),
        faults=(
            FaultStep(
                at=first_end,
                action="mark",
                duration=second - first_end,
                label=f"idle past idle_session_timeout={timeout}s",
            ),
        ),
        server_settings={"max_connections": 100, "idle_session_timeout": f"{timeout}s"},
        deadline=deadline,
    )


def _pgbouncer_storm(size: Size, deadline: float) -> Plan:
    return Plan(
        workload=_storm_workload(size),
        server_settings={"max_connections": 20},
        via="pgbouncer",
        deadline=deadline,
    )


def _pgbouncer_restart(size: Size, deadline: float) -> Plan:
    return Plan(
        workload=_steady(size, tiny=6.0, small=12.0, full=40.0),
        faults=_restart_faults(size),
        server_settings={"max_connections": 20},
        via="pgbouncer",
        deadline=deadline,
    )


def _failover(size: Size, deadline: float) -> Plan:
    """Two failovers, so every client's run starts and ends on the same primary: first the
    primary fenced read-only in place (its sessions stay open), then killed; each time the
    standby is promoted and, a while later, the old primary rejoins as a standby."""
    fence_at, rejoin_after, crash_at, total = {
        "tiny": (1.5, 1.5, 4.0, 7.0),
        "small": (3.0, 3.0, 8.0, 12.0),
        "full": (10.0, 8.0, 25.0, 40.0),
    }[size]
    rejoin = "old primary back as a standby (pg_rewind)"
    return Plan(
        workload=_steady(size, tiny=total, small=total, full=total),
        faults=(
            FaultStep(
                at=fence_at,
                action="failover_fence",
                label="failover: primary fenced read-only, standby promoted",
                recover=False,
            ),
            FaultStep(at=fence_at + rejoin_after, action="rejoin", label=rejoin, recover=False),
            FaultStep(
                at=crash_at,
                action="failover_crash",
                label="failover: primary killed (SIGQUIT), standby promoted",
                recover=False,
            ),
            FaultStep(at=crash_at + rejoin_after, action="rejoin", label=rejoin, recover=False),
        ),
        server_settings={"max_connections": 100},
        via="pair",
        deadline=deadline,
    )


#: The fleet scenario's budget: fewer connections than its processes' combined max_size
#: (and than the 17 its server leaves the clients' role).
FLEET_BUDGET = 10


def _fleet(size: Size, deadline: float) -> Plan:
    # duration: from the start signal, for every process (the last wave gets the rest).
    waves, every, per_wave, duration = {
        "tiny": (3, 1.5, 2, 6.0),
        "small": (3, 2.0, 3, 9.0),
        "full": (4, 5.0, 4, 30.0),
    }[size]
    return Plan(
        workload=Workload(
            processes=waves * per_wave,
            threads=3,
            pool_size=4,
            # Reads hold their connection for 20 ms, so every pool grows to its max_size.
            phases=(Phase(start=0.0, interval=0.02, duration=duration),),
            read_work=0.02,
        ),
        server_settings={"max_connections": 20},
        deadline=deadline,
        waves=Waves(count=waves, every=every),
        variants=(Variant("pgwarden+budget", "pgwarden", FLEET_BUDGET),),
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "storm",
            "cold-start storm",
            "Many processes start at once (as serverless instances do after a deploy); each "
            "imports its client library, connects and serves a burst, against "
            "max_connections=20.",
            frozenset(),
            _storm,
        ),
        Scenario(
            "restart",
            "restart under load",
            "Steady reads and writes while the server is restarted, first fast (SIGINT), then "
            "immediate (SIGQUIT, a crash with recovery); the SQLAlchemy clients run half of "
            "their writes as ORM units of work.",
            frozenset({"control", "own_server"}),
            _restart,
        ),
        Scenario(
            "kills",
            "backend kills",
            "Steady load while half of the clients' backends are killed with "
            "pg_terminate_backend, again and again; the SQLAlchemy clients run half of their "
            "writes as ORM units of work.",
            frozenset(),
            _kills,
        ),
        Scenario(
            "overload",
            "overload",
            "More processes times pool size than the server allows (max_connections=20), with "
            "reads that hold their connection for 20 ms.",
            frozenset({"own_server"}),
            _overload,
        ),
        Scenario(
            "flaky",
            "flaky network",
            "Through a TCP fault proxy: a latency spike, then connection resets, then a "
            "blackhole (packets held, nothing refused).",
            frozenset({"proxy"}),
            _flaky,
        ),
        Scenario(
            "idle",
            "idle then burst",
            "A burst, then the pools sit idle past the server's idle_session_timeout (which "
            "closes their connections), then another burst.",
            frozenset({"own_server"}),
            _idle,
        ),
        Scenario(
            "pgbouncer-storm",
            "cold-start storm through PgBouncer",
            "The cold-start storm through a real PgBouncer in transaction mode "
            "(default_pool_size=10) in front of max_connections=20.",
            frozenset({"own_server", "pgbouncer"}),
            _pgbouncer_storm,
        ),
        Scenario(
            "pgbouncer-restart",
            "restart under load through PgBouncer",
            "Restart under load (fast, then immediate) of the PostgreSQL behind a real "
            "PgBouncer in transaction mode.",
            frozenset({"control", "own_server", "pgbouncer"}),
            _pgbouncer_restart,
        ),
        Scenario(
            "failover",
            "failover to a synchronous standby",
            "A primary and a synchronous streaming standby; every client has both hosts "
            "(target_session_attrs=read-write). Under steady load the primary is fenced "
            "read-only in place (its sessions stay open) and the standby promoted; later the "
            "old primary rejoins as a standby (pg_rewind), and the same again with the primary "
            "killed instead of fenced.",
            frozenset({"control", "own_server"}),
            _failover,
        ),
        Scenario(
            "fleet",
            "a fleet arriving in waves",
            "Worker processes arrive in waves, each with max_size=4, together far more than "
            f"the server's max_connections=20; pgwarden runs twice, without and with "
            f"fleet_budget={FLEET_BUDGET} (pgwarden+budget). Per process: its time from "
            "arrival to its first success, and its share of the connections over time.",
            frozenset({"own_server"}),
            _fleet,
        ),
    )
}

#: Scenarios that run only when named (``--scenario fleet`` or ``all``), not by default:
#: they take longer than the default set should (see ``docs/stress.md``).
OPT_IN: tuple[str, ...] = ("fleet",)

#: What ``pgwarden stress`` runs without ``--scenario``.
DEFAULT: tuple[str, ...] = tuple(name for name in SCENARIOS if name not in OPT_IN)

#: Other names accepted by ``--scenario``.
ALIASES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "all": tuple(SCENARIOS),
    "pgbouncer": ("pgbouncer-storm", "pgbouncer-restart"),
    "cold-start-storm": ("storm",),
    "restart-under-load": ("restart",),
    "backend-kills": ("kills",),
    "flaky-network": ("flaky",),
    "idle-then-burst": ("idle",),
}

#: The flagship (``--quick``, ``make demo``).
QUICK: tuple[str, ...] = ("storm", "restart")


def resolve(names: list[str]) -> list[str]:
    """Scenario names and aliases to scenario names, in the canonical order, once each.

    Raises ``ValueError`` naming the unknown ones.
    """
    wanted: set[str] = set()
    unknown = []
    for name in names:
        key = name.strip().lower()
        if key in SCENARIOS:
            wanted.add(key)
        elif key in ALIASES:
            wanted.update(ALIASES[key])
        else:
            unknown.append(name)
    if unknown:
        choices = ", ".join([*SCENARIOS, *ALIASES])
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)} (choose from: {choices})")
    return [name for name in SCENARIOS if name in wanted]
