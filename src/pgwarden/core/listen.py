"""LISTEN/NOTIFY subscriptions that survive: the pure bookkeeping, without I/O.

Theory of operation. A handle has one dedicated listener connection, shared by
every channel of every subscription. `ListenBook` is its single source of
truth: who subscribed to what, which channels the current connection has
LISTENed, whether that connection is believed up, the open outage (if any) and
the counters behind ``stats()["listen"]``. The shell (``_async/listen.py``)
asks it what to do next (`ListenBook.plan`) and reports what happened
(`connected`, `listened`, `lost`); it holds one lock around every call.

A subscriber is *active* once every one of its channels is LISTENed on a live
connection: from then on each notification the server sends on its channels is
delivered to it exactly once, or a `Gap` says some may be missing. When the
connection is lost, the subscribers active at that moment are *affected*; one
outage (however many connect attempts fail in it) yields exactly one `Gap`
for each of them, delivered once every wanted channel is LISTENed again, so a
subscriber that re-reads its state on a gap knows that everything after the
re-read is delivered. Subscribers that joined during the outage were not
active yet: they get no gap, they become active at the same moment.

Reconnect delays (`reconnect_delay`) are short and bounded (50 ms doubling to
a 250 ms cap, full jitter), so that listening resumes well within 0.5 s of the
server accepting again; one handle makes about eight to ten connect attempts a
second while the server is down (measured: 15-20 in a 2 s outage), which a
refused or "starting up" connect makes cheap; a permanent failure (a rejected
login) waits longer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pgwarden.core.failures import FailureKind
from pgwarden.core.retry import RetryPolicy

__all__ = [
    "MAX_CHANNEL_BYTES",
    "PERMANENT_RECONNECT",
    "RECONNECT",
    "Gap",
    "ListenBook",
    "ListenEvent",
    "ListenPlan",
    "Notification",
    "check_channels",
    "off_primary",
    "reconnect_delay",
    "wants_primary",
]

#: PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN - 1): a longer channel
#: would be LISTENed under another name than the one notifications are routed by.
MAX_CHANNEL_BYTES = 63

#: Backoff between reconnect attempts after a transient failure (refused, starting up,
#: lost): the attempts count only their retry number; ``attempts`` is not used.
RECONNECT = RetryPolicy(attempts=1, base_delay=0.05, max_delay=0.25)
#: After a permanent failure (a rejected login, an unknown database): a fix takes a
#: human, so there is no point in asking several times a second.
PERMANENT_RECONNECT = RetryPolicy(attempts=1, base_delay=1.0, max_delay=5.0)


@dataclass(frozen=True)
class Notification:
    """One ``NOTIFY`` the server delivered: *channel*, *payload* and the sending *pid*."""

    channel: str
    payload: str
    pid: int


@dataclass(frozen=True)
class Gap:
    """Notifications on *channels* may have been missed: re-read the state they track.

    *since*: the wall-clock time (``time.time()``) the listener noticed the loss;
    notifications sent shortly before it may be missing too. *reason*: why
    (``"connection lost: ..."`` or ``"overflow"`` when the subscriber fell too far
    behind). Everything sent after a gap was delivered is delivered.
    """

    channels: tuple[str, ...]
    since: float
    reason: str


#: What a subscription yields.
ListenEvent = Notification | Gap


def check_channels(channels: tuple[str, ...]) -> tuple[str, ...]:
    """*channels* deduplicated in order; `ValueError` for none, an empty or too long one."""
    if not channels:
        raise ValueError("listen() needs at least one channel")
    for channel in channels:
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"a channel must be a non-empty str, not {channel!r}")
        if len(channel.encode()) > MAX_CHANNEL_BYTES:
            raise ValueError(
                f"channel {channel[:20]!r}... is longer than PostgreSQL's "
                f"{MAX_CHANNEL_BYTES}-byte identifiers: the server would truncate it"
            )
    return tuple(dict.fromkeys(channels))


def reconnect_delay(retry_number: int, rand: float, kind: FailureKind) -> float:
    """How long to wait before reconnect attempt *retry_number* (``>= 1``) after a
    failure of *kind*; *rand* is uniform in ``[0, 1)``."""
    policy = PERMANENT_RECONNECT if kind is FailureKind.PERMANENT else RECONNECT
    return policy.backoff(retry_number, rand)


def wants_primary(target_session_attrs: str | None) -> bool:
    """Does the URL ask libpq for a server that accepts writes (a failover-aware URL)?"""
    return target_session_attrs in ("read-write", "primary")


def off_primary(in_recovery: bool, read_only: bool, *, primary_wanted: bool) -> str | None:
    """Why the listener's server no longer serves it after a failover, or None.

    A standby (*in_recovery*) refuses LISTEN and gets no NOTIFY. A fenced old primary
    (*read_only*: ``transaction_read_only`` is on) keeps its sessions open while the
    writers, and their NOTIFYs, move to the new one; that counts only when the URL
    asked for a writable server (*primary_wanted*), since a server can also be
    read-only by default on purpose, and then the reconnect would find it again.
    """
    if in_recovery:
        return "the server is a standby now (failover)"
    if read_only and primary_wanted:
        return "the server turned read-only (failover)"
    return None


@dataclass(frozen=True)
class ListenPlan:
    """What the listener should do next on its connection."""

    stop: bool  # nobody listens any more (or the handle closes): close the connection
    listen: tuple[str, ...]  # channels to LISTEN
    unlisten: tuple[str, ...]  # channels nobody wants any more


@dataclass
class _Subscriber:
    channels: tuple[str, ...]
    active: bool = False


@dataclass
class _Outage:
    since: float
    reason: str
    affected: set[int] = field(default_factory=set)


class ListenBook:
    """Subscriptions, the listener connection's channels, outages and counters.

    Not thread-safe by itself: the shell calls it under one lock.
    """

    def __init__(self) -> None:
        self._subscribers: dict[int, _Subscriber] = {}
        self._next_id = 0
        self._listened: set[str] = set()
        self._connected = False
        self._ever_connected = False
        self._outage: _Outage | None = None
        self._closing = False
        self.backend_pid: int | None = None
        self.notifications_total = 0
        self.gaps_total = 0
        self.overflows_total = 0
        self.reconnects_total = 0
        self.connect_failures_total = 0
        self.last_gap_at: float | None = None
        self.last_error: str | None = None

    # --- subscribers ---------------------------------------------------------------------------
    def subscribe(self, channels: tuple[str, ...]) -> tuple[int, bool]:
        """A new subscriber to *channels* (checked); ``(id, active)``: active at once
        when the live connection already LISTENs to all of them."""
        subscriber = _Subscriber(check_channels(channels))
        self._next_id += 1
        self._subscribers[self._next_id] = subscriber
        subscriber.active = self._covers(subscriber)
        return self._next_id, subscriber.active

    def unsubscribe(self, subscriber_id: int) -> None:
        self._subscribers.pop(subscriber_id, None)
        if self._outage is not None:
            self._outage.affected.discard(subscriber_id)

    def is_active(self, subscriber_id: int) -> bool:
        subscriber = self._subscribers.get(subscriber_id)
        return subscriber is not None and subscriber.active

    def recipients(self, channel: str) -> list[int]:
        """The active subscribers of *channel*, for one notification (counted)."""
        self.notifications_total += 1
        return [
            sid for sid, sub in self._subscribers.items() if sub.active and channel in sub.channels
        ]

    def channels_of(self, subscriber_id: int) -> tuple[str, ...]:
        subscriber = self._subscribers.get(subscriber_id)
        return () if subscriber is None else subscriber.channels

    def overflowed(self) -> None:
        """A subscriber fell too far behind; its backlog became one overflow gap."""
        self.overflows_total += 1

    # --- the connection ------------------------------------------------------------------------
    def close(self) -> None:
        """The handle closes: every subscriber is dropped and the listener stops."""
        self._closing = True
        self._subscribers.clear()
        self._outage = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def outage_open(self) -> bool:
        """A loss (or a failed connect) was recorded and not yet ended by a re-LISTEN."""
        return self._outage is not None

    @property
    def wanted(self) -> set[str]:
        return {channel for sub in self._subscribers.values() for channel in sub.channels}

    def plan(self) -> ListenPlan:
        """What to do next on the connection (`listened` reports it done)."""
        wanted = self.wanted
        if self._closing or not wanted:
            return ListenPlan(True, (), ())
        return ListenPlan(
            False,
            tuple(sorted(wanted - self._listened)),
            tuple(sorted(self._listened - wanted)),
        )

    def connected(self, backend_pid: int) -> None:
        """A fresh connection is up (nothing LISTENed on it yet)."""
        if self._ever_connected and self._outage is not None:
            self.reconnects_total += 1
        self._ever_connected = True
        self._connected = True
        self._listened = set()
        self.backend_pid = backend_pid

    def listened(
        self, listen: tuple[str, ...], unlisten: tuple[str, ...], now: float
    ) -> tuple[list[int], Gap | None, list[int]]:
        """*listen* and *unlisten* succeeded at wall time *now*.

        Returns ``(activated, gap, gap_recipients)``: the subscribers that became
        active, and, if this ended an outage, its one `Gap` and who gets it.
        """
        self._listened.update(listen)
        self._listened.difference_update(unlisten)
        activated = []
        for sid, sub in self._subscribers.items():
            if not sub.active and self._covers(sub):
                sub.active = True
                activated.append(sid)
        outage = self._outage
        if outage is None or not self.wanted <= self._listened:
            return activated, None, []
        self._outage = None
        recipients = [sid for sid in outage.affected if sid in self._subscribers]
        if not recipients:
            return activated, None, []
        channels = sorted({c for sid in recipients for c in self._subscribers[sid].channels})
        self.gaps_total += 1
        self.last_gap_at = now
        return activated, Gap(tuple(channels), outage.since, outage.reason), recipients

    def lost(self, now: float, reason: str, *, connect_failed: bool = False) -> None:
        """The connection is gone (or a connect attempt failed) at wall time *now*.

        The first loss of an outage opens it and records the active subscribers as
        affected; they are inactive until the channels are LISTENed again."""
        if connect_failed:
            self.connect_failures_total += 1
        self.last_error = reason
        self._connected = False
        self._listened = set()
        self.backend_pid = None
        if self._outage is None:
            self._outage = _Outage(now, reason)
        for sid, sub in self._subscribers.items():
            if sub.active:
                sub.active = False
                self._outage.affected.add(sid)

    def stopped(self) -> None:
        """The listener closed its connection because nobody listens (not an outage)."""
        self._connected = False
        self._listened = set()
        self.backend_pid = None
        self._outage = None

    def _covers(self, subscriber: _Subscriber) -> bool:
        return self._connected and set(subscriber.channels) <= self._listened

    # --- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """The ``stats()["listen"]`` section."""
        return {
            "channels": len(self.wanted),
            "subscribers": len(self._subscribers),
            "connected": self._connected,
            "backend_pid": self.backend_pid,
            "in_outage": self._outage is not None and self._ever_connected,
            "notifications_total": self.notifications_total,
            "gaps_total": self.gaps_total,
            "overflows_total": self.overflows_total,
            "reconnects_total": self.reconnects_total,
            "connect_failures_total": self.connect_failures_total,
            "last_gap_at": self.last_gap_at,
            "last_error": self.last_error,
        }
