"""Fleet budget: many processes sharing one connection budget, with no coordinator.

The database is the only shared state. Each process marks its connections in
``application_name`` (``pgwarden:<tag>:<instance>``, :func:`member_name`),
counts its live peers and their connections in ``pg_stat_activity`` at a
bounded rate, and caps its own pool at its fair share of the budget
(:func:`fair_shares`); the adaptive limit (`pgwarden.core.sizing`) still works
underneath the cap. Every process computes the same shares from the same view,
so nobody negotiates.

Three rules make it fair rather than merely bounded:

* **Headroom for newcomers.** The fleet fills only ``budget - headroom`` slots
  (:func:`newcomer_headroom`). A process that has no connection is invisible in
  ``pg_stat_activity``; the free slots are how it logs in and becomes visible,
  and the others make room for it by shrinking at their next sample, idle
  connections first, never one in use.
* **Turns when there are more instances than slots.** Every instance gets one
  connection in turn: the members, sorted by instance id, get a window of
  ``capacity`` consecutive ranks that moves every turn (a turn is a third of a
  sample interval, `TURN_SHARE`, numbered by the wall clock, the same on every
  host to NTP's precision) by half the number left out (`rotation_step`), so
  while the fleet is at most three times its capacity nobody is off for more than
  two turns in a row, and the instances that are on together change from turn
  to turn: a process samples only while it holds a connection, and this is how
  it comes to see every peer. A share rises `HANDOFF_SHARE` of an interval after
  the turn begins but falls at once, so the leaver's slot is free when the
  joiner connects.
* **Memory of the absent.** An instance rotated out holds no connection, so it
  vanishes from the view; peers keep counting an instance they saw for
  :meth:`FleetPolicy.away_ttl` (the turns it may wait, plus one sample interval),
  so its turn comes back. Remembering only while the view looked oversubscribed
  was tried and is much less fair: views that never saw part of the fleet stay
  small and hold their slots (Jain 0.80 against 0.99 for 1,000 instances in the
  simulation). The price: a process killed with SIGKILL is still counted for that
  long after a sample first misses it (one turn plus one interval when the fleet
  fits), until the next sample.

Pure: no I/O, no clock. The shells (``_async/fleet.py``, generated
``_sync/fleet.py``) run the query and feed :meth:`FleetPolicy.observe`; the
simulation (``bench/fleet_sim.py``) feeds the same class; ``pgwarden check
--instances`` calls :func:`plan_fleet`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "FLEET_QUERY",
    "FleetPlan",
    "FleetPolicy",
    "FleetSample",
    "fair_shares",
    "member_name",
    "member_of",
    "newcomer_headroom",
    "plan_fleet",
    "resolve_budget",
    "rotation_step",
    "share_of",
]

#: PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes.
APPLICATION_NAME_MAX = 63
#: Share of the budget left free for newcomers to log in through (at least one slot).
HEADROOM_RATIO = 0.1
#: A turn lasts this share of the sample interval: an instance rotated out waits at most
#: two turns (while the fleet is at most three times its capacity), within one interval;
#: turns need no sample, only the wall clock.
TURN_SHARE = 1 / 3
#: A share rises this share of the interval after a turn begins (it falls at once).
HANDOFF_SHARE = 0.05

_MARK = "pgwarden:"

#: The sampler's one statement: every fleet member's connection count, the connections
#: of others that take from the same budget, and the budget's inputs. ``$1``: the LIKE
#: pattern of this fleet's names. Counts client backends only (not autovacuum, WAL
#: senders); ``reserved_connections`` exists from PostgreSQL 16 (NULL before).
FLEET_QUERY = """
SELECT
  (SELECT coalesce(json_object_agg(m.name, m.n), '{}')
     FROM (SELECT application_name AS name, count(*) AS n FROM pg_stat_activity
            WHERE backend_type = 'client backend' AND application_name LIKE %(pattern)s
            GROUP BY application_name) m) AS members,
  (SELECT count(*) FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND application_name NOT LIKE %(pattern)s)
    AS others_server,
  (SELECT count(*) FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND application_name NOT LIKE %(pattern)s
      AND usename = current_user) AS others_role,
  (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user) AS role_limit,
  current_setting('max_connections')::int AS max_connections,
  current_setting('superuser_reserved_connections')::int
    + coalesce(current_setting('reserved_connections', true), '0')::int AS reserved
""".strip()

_INSTANCE_ID = re.compile(r"^[0-9a-f]{6,16}$")


def member_name(application_name: str, tag: str, instance_id: str) -> str:
    """This process's ``application_name``: ``pgwarden:<tag>:<id>``, after the user's own
    name (as a prefix, cut to fit) unless that is the default ``pgwarden``. The fleet mark
    always survives PostgreSQL's 63-byte truncation."""
    mark = f"{_MARK}{tag}:{instance_id}"
    prefix = "" if application_name in ("", "pgwarden") else application_name
    room = APPLICATION_NAME_MAX - len(mark.encode()) - 1
    if not prefix or room <= 0:
        return mark
    cut = prefix.encode()[:room].decode("utf-8", "ignore")
    return f"{cut} {mark}"


def member_of(application_name: str | None, tag: str) -> str | None:
    """The instance id if *application_name* is a member of fleet *tag*, else None."""
    if not application_name:
        return None
    marker = f"{_MARK}{tag}:"
    at = application_name.rfind(marker)
    if at < 0 or (at > 0 and application_name[at - 1] != " "):
        return None
    instance = application_name[at + len(marker) :]
    return instance if _INSTANCE_ID.match(instance) else None


def member_pattern(tag: str) -> str:
    """The LIKE pattern matching fleet *tag*'s names (a tag has no LIKE wildcards but
    ``_``, escaped here)."""
    return "%" + (_MARK + tag + ":").replace("_", "\\_") + "%"


def newcomer_headroom(budget: int) -> int:
    """Slots the fleet leaves free so a process without a connection can log in:
    10% of the budget, at least 1, and never the whole budget."""
    if budget <= 1:
        return 0
    return max(1, min(budget - 1, round(budget * HEADROOM_RATIO)))


def resolve_budget(
    source: int | str,
    *,
    role_limit: int | None,
    max_connections: int,
    reserved: int,
    others_server: int = 0,
    others_role: int = 0,
) -> tuple[int, str]:
    """``(connections the fleet may hold, why)`` for ``fleet_budget=source``.

    ``"server"``: ``max_connections`` less the reserved slots less the client
    connections that are not the fleet's (*others_server*). ``"role"``: the role's
    CONNECTION LIMIT less the role's other connections (*others_role*); a role with
    no limit (-1) falls back to the server's. An integer is taken as given.
    """
    if isinstance(source, int):
        return source, f"fleet_budget={source}"
    server = max_connections - reserved
    server_why = f"max_connections={max_connections} less {reserved} reserved"
    if source == "role" and role_limit is not None and role_limit >= 0:
        budget = role_limit - others_role
        why = f"the role's CONNECTION LIMIT {role_limit}"
        if others_role:
            why += f" less {others_role} other connection(s) of the role"
        if budget > server - others_server:
            budget = server - others_server
            why += f", capped by the server ({server_why})"
        return max(0, budget), why
    prefix = "the role has no CONNECTION LIMIT; " if source == "role" else ""
    why = prefix + server_why
    if others_server:
        why += f" less {others_server} connection(s) outside the fleet"
    return max(0, server - others_server), why


def fair_shares(
    budget: int, members: Sequence[str], *, max_size: int, turn: int = 0
) -> dict[str, int]:
    """Each member's cap. *members*: instance ids, in any order (sorted here, so every
    process computes the same answer). *turn*: the turn's number (`FleetPolicy.turn`).

    With ``capacity = budget - newcomer_headroom(budget)``: when every member can
    have one, each gets ``capacity // n`` or one more (the extra ones rotate with the
    turn), at most *max_size*; otherwise a window of ``capacity`` members gets one
    and the rest zero, the window moving by `rotation_step` each turn.
    """
    ranked = sorted(members)
    n = len(ranked)
    return {
        member: share_of(rank, n, budget, max_size=max_size, turn=turn)
        for rank, member in enumerate(ranked)
    }


def share_of(rank: int, n: int, budget: int, *, max_size: int, turn: int) -> int:
    """The cap of the member at *rank* (0-based, in instance id order) of *n* (see
    `fair_shares`, which is this for every rank)."""
    capacity = budget - newcomer_headroom(budget)
    if capacity <= 0 or n <= 0:
        return 0
    if n <= capacity:
        base, extra = divmod(capacity, n)
        bonus = 1 if (rank - turn * extra) % n < extra else 0
        return min(max_size, base + bonus)
    start = (turn * rotation_step(n, capacity)) % n
    return 1 if (rank - start) % n < capacity else 0


def rotation_step(members: int, capacity: int) -> int:
    """How far the window of members with a connection moves per turn: half of those
    left out (rounded up), so nobody is out more than two turns in a row, and less
    than the window, so those in it together change; at most the window itself."""
    return max(1, min(capacity, math.ceil((members - capacity) / 2)))


@dataclass(frozen=True)
class FleetSample:
    """One row of `FLEET_QUERY`, parsed: *members* maps instance id to connections."""

    members: Mapping[str, int]
    others_server: int
    others_role: int
    role_limit: int | None
    max_connections: int
    reserved: int

    @classmethod
    def from_row(cls, row: Mapping[str, object], tag: str) -> FleetSample:
        raw = row.get("members") or {}
        members: dict[str, int] = {}
        if isinstance(raw, Mapping):
            for name, count in raw.items():
                instance = member_of(str(name), tag)
                if instance is not None and isinstance(count, int):
                    members[instance] = members.get(instance, 0) + count
        role_limit = row.get("role_limit")
        return cls(
            members=members,
            others_server=_int(row.get("others_server")),
            others_role=_int(row.get("others_role")),
            role_limit=role_limit if isinstance(role_limit, int) else None,
            max_connections=_int(row.get("max_connections")),
            reserved=_int(row.get("reserved")),
        )


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


@dataclass
class FleetPolicy:
    """One process's view of its fleet and its cap. Not thread-safe: its owner
    (`HandleState`) calls it under that object's lock. Times are wall-clock seconds
    (turns must agree across hosts)."""

    instance_id: str
    source: int | str
    max_size: int
    interval: float
    budget: int | None = None
    why: str = "no sample yet"
    #: Why the policy turned itself off (behind a pooler), or None.
    off: str | None = None
    samples: int = 0
    members: dict[str, int] = field(default_factory=dict)
    #: Instances rotated out (no connection) still counted, until this wall time.
    away: dict[str, float] = field(default_factory=dict)
    #: (this instance's rank, members counted): computed once per view.
    _rank: tuple[int, int] | None = field(default=None, repr=False)

    def observe(self, wall: float, sample: FleetSample) -> None:
        """Take a new view. This process is a member even when the sample missed it."""
        self.samples += 1
        budget, why = resolve_budget(
            self.source,
            role_limit=sample.role_limit,
            max_connections=sample.max_connections,
            reserved=sample.reserved,
            others_server=sample.others_server,
            others_role=sample.others_role,
        )
        seen = {k: v for k, v in sample.members.items() if v > 0}
        seen.setdefault(self.instance_id, 0)
        known = len(self.members) + len(self.away)
        expires = wall + self.away_ttl(budget, known)
        for member in self.members.keys() - seen.keys():
            self.away.setdefault(member, expires)
        self.away = {m: t for m, t in self.away.items() if t > wall and m not in seen}
        self.members = seen
        self.budget, self.why = budget, why
        everyone = sorted(seen.keys() | self.away.keys())
        self._rank = (bisect.bisect_left(everyone, self.instance_id), len(everyone))

    def away_ttl(self, budget: int, members: int) -> float:
        """How long an instance that vanished is still counted: the turns it may wait
        for its next one, plus one, plus one sample interval (to be seen again)."""
        capacity = max(1, budget - newcomer_headroom(budget))
        out = math.ceil(max(0, members - capacity) / rotation_step(members, capacity))
        return self.turn_length * (out + 1) + self.interval

    @property
    def turn_length(self) -> float:
        return self.interval * TURN_SHARE

    def turn(self, wall: float) -> int:
        return math.floor(wall / self.turn_length)

    def turn_ends(self, wall: float) -> float:
        """When the next change of cap may come: the handoff within this turn, or the
        next turn's start."""
        start = self.turn(wall) * self.turn_length
        handoff = start + self.interval * HANDOFF_SHARE
        return handoff if wall < handoff else start + self.turn_length

    def shares(self, wall: float) -> dict[str, int]:
        if self.budget is None:
            return {}
        everyone = [*self.members, *self.away]
        return fair_shares(self.budget, everyone, max_size=self.max_size, turn=self.turn(wall))

    def cap(self, wall: float) -> int | None:
        """This process's cap now: None when off; 1 before the first sample (a newcomer
        holds its first connection only). Within `HANDOFF_SHARE` of a turn's start, the
        smaller of this turn's share and the last one's."""
        if self.off is not None:
            return None
        if self.budget is None or self._rank is None:
            return 1
        rank, n = self._rank
        now = share_of(rank, n, self.budget, max_size=self.max_size, turn=self.turn(wall))
        if not now:
            return 0
        lag = self.turn(wall - self.interval * HANDOFF_SHARE)
        return min(now, share_of(rank, n, self.budget, max_size=self.max_size, turn=lag))

    def next_on(self, wall: float) -> float | None:
        """The wall time of this process's next turn with a connection (now if it has
        one), from its last view; None when the view gives it none."""
        if self.cap(wall):
            return wall
        start = self.turn(wall)
        lag = self.interval * HANDOFF_SHARE + 1e-6  # past the handoff despite rounding
        for ahead in range(1, len(self.members) + len(self.away) + 2):
            at = (start + ahead) * self.turn_length + lag
            if self.cap(at):
                return at
        return None

    def turn_off(self, why: str) -> None:
        self.off = why

    def snapshot(self, wall: float) -> dict[str, object]:
        """The ``fleet`` section of ``stats()``."""
        live = len(self.members) + len(self.away)
        return {
            "enabled": self.off is None,
            "off_reason": self.off,
            "instance": self.instance_id,
            "budget": self.budget,
            "why": self.why,
            "instances": live,
            "fleet_connections": sum(self.members.values()),
            "cap": self.cap(wall),
            "samples": self.samples,
        }


@dataclass(frozen=True)
class FleetPlan:
    """What ``pgwarden check --instances N`` reports: *shares* lists each instance's
    max_size (equal ones collapse in `why`)."""

    budget: int
    headroom: int
    instances: int
    shares: tuple[int, ...]
    why: str

    @property
    def per_instance(self) -> tuple[int, int]:
        """(smallest, largest) max_size an instance gets."""
        return (min(self.shares), max(self.shares)) if self.shares else (0, 0)


def plan_fleet(
    budget_source: int | str,
    role_limit: int | None,
    max_connections: int,
    reserved: int,
    instances: int,
    max_size: int,
    *,
    others: int = 0,
) -> FleetPlan:
    """The plan for *instances* processes of one fleet against this server and role.

    *role_limit*: ``pg_roles.rolconnlimit`` (-1 or None: none); *reserved*:
    ``superuser_reserved_connections`` plus ``reserved_connections``; *others*:
    client connections outside the fleet now (taken from a "server" or "role"
    budget alike, a conservative reading for "role").
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    budget, why_budget = resolve_budget(
        budget_source,
        role_limit=role_limit,
        max_connections=max_connections,
        reserved=reserved,
        others_server=others,
        others_role=others,
    )
    headroom = newcomer_headroom(budget)
    ids = [f"{i:08x}" for i in range(instances)]
    shares = tuple(fair_shares(budget, ids, max_size=max_size, turn=0).values())
    low, high = (min(shares), max(shares))
    capacity = budget - headroom
    lines = [f"budget {budget} connection(s): {why_budget}"]
    lines.append(f"{headroom} left free so a new instance can log in; {capacity} shared")
    if instances <= capacity:
        each = f"{low}" if low == high else f"{low} or {high}"
        lines.append(f"{instances} instance(s): max_size {each} each")
        if high == max_size and capacity > instances * max_size:
            lines.append(f"(max_size={max_size} caps the share; the budget is not all used)")
    else:
        out = math.ceil((instances - capacity) / rotation_step(instances, capacity))
        lines.append(
            f"{instances} instance(s) > {capacity}: one connection each in turn, "
            f"{capacity} at a time; an instance waits up to {out} turn(s) "
            "(a third of fleet_interval each) for its next one"
        )
    return FleetPlan(
        budget=budget,
        headroom=headroom,
        instances=instances,
        shares=shares,
        why="; ".join(lines),
    )
