"""Commit resolution: what ``txid_status()`` on a new connection says about a
transaction whose COMMIT was sent when the connection was lost.

Pure: the shell runs the queries (on its own bounded connection, outside the
public API) and asks :func:`commit_outcome` what the answer means.

================ ===================== ==========================================
txid_status      server start time     outcome
================ ===================== ==========================================
committed        same as at BEGIN      COMMITTED
committed        changed (a restart)   UNKNOWN: after a crash restart an id whose
                                       transaction never reached the WAL is handed
                                       out again, so "committed" may describe
                                       someone else's work
aborted          any                   ABORTED: a durable commit keeps its id
in progress      any                   IN_PROGRESS: the old backend has not
                                       finished yet; ask again shortly
NULL / other     any                   UNKNOWN (too old to tell, or no answer)
================ ===================== ==========================================
"""

from __future__ import annotations

import enum

__all__ = ["RESOLVE_POLL_SECONDS", "CommitOutcome", "commit_outcome"]

#: How long to wait before asking again about a transaction still "in progress".
RESOLVE_POLL_SECONDS = 0.05


class CommitOutcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    IN_PROGRESS = "in progress"
    UNKNOWN = "unknown"


def commit_outcome(status: object, started_then: object, started_now: object) -> CommitOutcome:
    """The outcome of a lost COMMIT, from ``txid_status(txid)`` and the server's
    start time when the id was assigned (*started_then*) and now."""
    if status == "committed":
        return CommitOutcome.COMMITTED if started_then == started_now else CommitOutcome.UNKNOWN
    if status == "aborted":
        return CommitOutcome.ABORTED
    if status == "in progress":
        return CommitOutcome.IN_PROGRESS
    return CommitOutcome.UNKNOWN
