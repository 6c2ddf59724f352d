"""Commit resolution: what the server says, on a new connection, about a
transaction whose COMMIT was sent when the connection was lost.

Pure: the shell runs the queries (`pgwarden._handle.sql`: a *marker* read in the
transaction before COMMIT, ``RESOLVE`` on its own bounded connection after the
loss) and asks :func:`commit_outcome` what the answers mean and
:func:`lost_commit_verdict` what the caller gets.

Why ``txid_status()`` alone is not enough. After a crash (the server killed, or
one backend crashing, after which the postmaster kills the others and recovers
*without* a new start time) PostgreSQL replays the WAL and hands out ids from the
**recovery next id** N: one past every id in the replayed WAL. An id below N
reached the WAL, so it is never handed out again and its status is the truth
about our transaction. An id at or above N never reached the WAL: our
transaction did not become durable (it rolled back), and the id may since have
gone to another transaction, so its status says nothing about ours.

So the marker records, with the txid, which *run* of the server assigned it:
``pg_postmaster_start_time()`` (a new postmaster) and the bgwriter statistics'
reset time (every crash recovery resets the statistics, a postmaster's own
crash-restart included). Same run now: no restart since, the status is the
truth. Otherwise, what proves what:

=========================================== ================================
the server now                               outcome
=========================================== ================================
``aborted``                                  ABORTED (a durable commit keeps
                                             its id, so whoever has it now,
                                             ours did not commit)
id below N (the latest checkpoint is the     the status is the truth:
run's first: shutdown type, that is          ``committed`` is COMMITTED
``oldest_active_xid`` 0 with ``wal_level``
``replica`` or ``logical``, on the current
timeline)
a restart since is proven, and the id has    ABORTED: not in this server's
not finished here (at or above the snapshot  durable history
xmax), or is at or above the latest
checkpoint's next id, or is in progress
(ours cannot be, after a restart)
``committed`` with a commit timestamp        COMMITTED (committed before this
(``track_commit_timestamp``) earlier than    run existed)
the run's start
anything else after a restart                UNKNOWN
=========================================== ================================

A restart since the marker is proven by a new start time, or by statistics reset
before normal running began (earlier than the WAL writer's start, which
``pg_stat_activity`` shows to roles with ``pg_read_all_stats``): a reset by hand
comes later. With ``wal_level=minimal`` an online checkpoint also shows
``oldest_active_xid`` 0, so N cannot be told apart from a later checkpoint's
next id, which is only an upper bound: a committed id below it stays UNKNOWN.

Two assumptions remain (no query can see them): the server that answers is the
one that assigned the id, restarted, or a standby promoted from it; and at most
one restart between the marker and the answer. Two crash restarts within the
resolution window, the second after our lost id went to a transaction that
committed, would make that commit look like ours.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

__all__ = [
    "RESOLVE_POLL_SECONDS",
    "Checkpoint",
    "CommitOutcome",
    "Marker",
    "ServerView",
    "Verdict",
    "commit_outcome",
    "full_xid",
    "lost_commit_verdict",
    "next_xid_bound",
    "recovery_next_xid",
    "restarted_since",
    "timeline_of_wal_file",
]

#: How long to wait before asking again when the answer is not final yet.
RESOLVE_POLL_SECONDS = 0.05

#: ``wal_level`` values under which an online checkpoint records ``oldest_active_xid``.
_STANDBY_INFO_LEVELS = frozenset({"replica", "logical"})


class CommitOutcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: Not final: the old backend has not finished, or the server is a standby; ask again.
    IN_PROGRESS = "in progress"
    UNKNOWN = "unknown"


class Marker(NamedTuple):
    """Read in the transaction before COMMIT: its id (None if it wrote nothing)
    and which run of the server assigned it."""

    txid: int | None
    started: datetime | None  # pg_postmaster_start_time()
    stats_reset: datetime | None  # pg_stat_get_bgwriter_stat_reset_time()


@dataclass(frozen=True)
class Checkpoint:
    """The latest checkpoint (``pg_control_checkpoint()``), ids epoch-qualified."""

    next_xid: int
    oldest_active_xid: int
    timeline: int


@dataclass(frozen=True)
class ServerView:
    """What the server says after the loss, in one statement (``RESOLVE``)."""

    in_recovery: bool
    started: datetime | None
    stats_reset: datetime | None
    #: txid_snapshot_xmax() of a new snapshot: no id at or above it has finished.
    xmax: int
    #: txid_status(txid), asked only when txid < xmax (above it, it would raise).
    status: str | None
    #: pg_xact_commit_timestamp(txid) with track_commit_timestamp on, if committed.
    committed_at: datetime | None = None
    #: The WAL writer's backend_start: it starts when normal running begins (None if hidden).
    walwriter_started: datetime | None = None
    wal_level: str | None = None
    #: The current WAL timeline (None when unknown).
    timeline: int | None = None
    #: None when pg_control_checkpoint() is not readable (revoked, or a standby).
    checkpoint: Checkpoint | None = None


def full_xid(text: str) -> int:
    """An epoch-qualified id as ``txid_current()`` gives it, from
    ``pg_control_checkpoint()``'s ``"epoch:xid"`` text (or a plain number)."""
    epoch, _, xid = text.rpartition(":")
    return (int(epoch) << 32 | int(xid)) if epoch else int(xid)


def timeline_of_wal_file(name: str) -> int:
    """The timeline of a WAL file name (its first 8 hex digits)."""
    return int(name[:8], 16)


def restarted_since(marker: Marker, view: ServerView) -> bool | None:
    """True if the server provably restarted (or is another server) since the
    marker, False if it provably did not, None if that cannot be told."""
    if view.started != marker.started:
        return True  # another postmaster: a restart, or another server after a failover
    if marker.stats_reset is None or view.stats_reset is None:
        return None
    if view.stats_reset == marker.stats_reset:
        return False  # every crash recovery resets the statistics: none since
    if view.walwriter_started is not None and view.stats_reset < view.walwriter_started:
        return True  # reset before normal running began: a crash recovery's own reset
    return None  # reset by hand since (perhaps after a crash recovery too)


def next_xid_bound(view: ServerView) -> int | None:
    """The latest checkpoint's next id when it belongs to the current timeline of a
    primary: at or above the id the current run started at (None if unknown)."""
    checkpoint = view.checkpoint
    if checkpoint is None or view.in_recovery or view.timeline != checkpoint.timeline:
        return None
    return checkpoint.next_xid


def recovery_next_xid(view: ServerView) -> int | None:
    """N: the id the current run started handing out at, when the latest
    checkpoint is provably the one it started from (an end-of-recovery or
    shutdown checkpoint: no later online one, which would record the oldest
    active id under ``wal_level`` replica or logical). None if not provable."""
    bound = next_xid_bound(view)
    checkpoint = view.checkpoint
    if bound is None or checkpoint is None or view.wal_level not in _STANDBY_INFO_LEVELS:
        return None
    return bound if checkpoint.oldest_active_xid == 0 else None


def _run_began(marker: Marker, view: ServerView) -> datetime | None:
    """When the current run began, given a proven restart: before any commit of it."""
    if view.started != marker.started:
        return view.started
    return view.stats_reset  # the crash recovery's reset (restarted_since proved it)


def commit_outcome(marker: Marker, view: ServerView) -> CommitOutcome:
    """The outcome of a lost COMMIT of *marker*'s transaction (txid not None), from
    what the server says now (the table in the module docstring)."""
    txid = marker.txid
    if txid is None:
        raise ValueError("a transaction without an id has nothing to resolve")
    if view.in_recovery:
        return CommitOutcome.IN_PROGRESS  # a standby says nothing about the primary: ask again
    finished = txid < view.xmax
    status = view.status if finished else None
    restarted = restarted_since(marker, view)
    if restarted is False:
        if not finished or status == "in progress":
            return CommitOutcome.IN_PROGRESS  # the old backend has not finished yet
        if status == "committed":
            return CommitOutcome.COMMITTED
        if status == "aborted":
            return CommitOutcome.ABORTED
        return CommitOutcome.UNKNOWN  # too old to tell
    if status == "aborted":
        return CommitOutcome.ABORTED
    recovered = recovery_next_xid(view)
    if recovered is not None and txid < recovered:
        # Assigned before this run began (so a restart came after it) and never
        # handed out since: the status is ours.
        if status == "committed":
            return CommitOutcome.COMMITTED
        return CommitOutcome.IN_PROGRESS if status == "in progress" else CommitOutcome.UNKNOWN
    if restarted is None:
        # Perhaps no restart (statistics reset by hand): only the in-progress case waits.
        if not finished or status == "in progress":
            return CommitOutcome.IN_PROGRESS
        return CommitOutcome.UNKNOWN
    bound = next_xid_bound(view)
    if not finished or status == "in progress" or (bound is not None and txid >= bound):
        return CommitOutcome.ABORTED  # handed out (if at all) in this run: ours never was durable
    if status == "committed":
        began = _run_began(marker, view)
        if view.committed_at is not None and began is not None and view.committed_at < began:
            return CommitOutcome.COMMITTED  # committed before this run existed
    return CommitOutcome.UNKNOWN


class Verdict(enum.Enum):
    """What a COMMIT whose connection was lost ends as; the value is its label in
    ``stats()["counters"]["ambiguous_commits"]``."""

    #: Not decided yet: ask the server (`commit_outcome`), then decide again.
    ASK = "ask"
    #: Return normally: it committed, or wrote nothing.
    COMMITTED = "committed"
    #: Raise `NotCommitted`: it certainly did not commit; safe to run again.
    ABORTED = "aborted"
    #: Raise `AmbiguousCommitError`: resolution is off or could not tell.
    UNKNOWN = "unknown"


def lost_commit_verdict(
    *, resolve: bool, marker: Marker | None, outcome: CommitOutcome | None = None
) -> Verdict:
    """What a lost COMMIT ends as: with resolution off, UNKNOWN; for a transaction
    that wrote nothing (no id), COMMITTED; else ASK until *outcome* (the last
    answer, when asking stopped) is known: COMMITTED, ABORTED, or UNKNOWN for
    anything not final."""
    if not resolve:
        return Verdict.UNKNOWN
    if marker is None or marker.txid is None:
        return Verdict.COMMITTED  # nothing was written: nothing whose fate is unknown
    if outcome is None:
        return Verdict.ASK
    if outcome is CommitOutcome.COMMITTED:
        return Verdict.COMMITTED
    if outcome is CommitOutcome.ABORTED:
        return Verdict.ABORTED
    return Verdict.UNKNOWN
