"""The statements pgwarden itself sends, and the types of what users send."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from psycopg.sql import SQL, Composed

from pgwarden.core.deadline import statement_timeout_ms
from pgwarden.core.sqltext import query_is_write

__all__ = [
    "DEFAULT_FETCH_SIZE",
    "ISOLATION_CLAUSES",
    "MARKER",
    "MARKER_IF_ASSIGNED",
    "RESOLVE",
    "RESOLVE_CHECKPOINT",
    "SET_STATEMENT_TIMEOUT",
    "ManyParams",
    "Mode",
    "Params",
    "Query",
    "begin_statement",
    "query_is_write",
    "statement_timeout_args",
    "statement_timeout_command",
]


class Mode(enum.Enum):
    """What a single statement returns (the value names the handle's method)."""

    ROWS = "fetch"  # all rows
    ROW = "fetchrow"  # the first row or None
    VALUE = "fetchval"  # the first column of the first row, or None
    COUNT = "execute"  # the rowcount


Query: TypeAlias = str | bytes | SQL | Composed
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None
ManyParams: TypeAlias = Sequence[Any] | Mapping[str, Any]

#: Rows per FETCH of a stream unless the caller says otherwise: large enough that the
#: round trip is a small part of the time per batch, small enough to stay a few MB.
#: Here, not in the stream's module, so that a handle's signatures need no stream.
DEFAULT_FETCH_SIZE = 2000

#: The one way pgwarden sets a statement timeout: transaction-local, so it
#: leaves no session state behind (safe behind a transaction pooler). Used
#: inside BEGIN ... COMMIT only, pipelined with what it bounds.
SET_STATEMENT_TIMEOUT = b"SELECT set_config('statement_timeout', %s, true)"

# What identifies a transaction for commit resolution (`pgwarden.core.commit.Marker`):
# its id, and which run of the server assigned it: a new postmaster has a new start
# time, and every crash recovery (a backend's crash included, which keeps the start
# time) resets the statistics. An id seen before a crash may be handed out again.
MARKER = (
    b"SELECT txid_current() AS txid, pg_postmaster_start_time() AS started,"
    b" pg_stat_get_bgwriter_stat_reset_time() AS stats_reset"
)
MARKER_IF_ASSIGNED = (
    b"SELECT txid_current_if_assigned() AS txid, pg_postmaster_start_time() AS started,"
    b" pg_stat_get_bgwriter_stat_reset_time() AS stats_reset"
)
# What the server says after a lost COMMIT (`pgwarden.core.commit.ServerView`). Each
# part that could raise is asked only when it cannot: txid_status() below the
# snapshot's xmax (at or above it raises "in the future"; OFFSET 0 keeps the inner
# query whole, so xmax is one snapshot's), the commit timestamp with
# track_commit_timestamp on. pg_control_checkpoint() is checked when the plan starts,
# so it is a statement of its own (RESOLVE_CHECKPOINT), sent when granted and not on
# a standby (nor is the WAL file name, which carries the timeline).
RESOLVE = b"""\
SELECT v.in_recovery, v.started, v.stats_reset, v.xmax, v.wal_level,
  CASE WHEN v.txid < v.xmax THEN txid_status(v.txid) END AS status,
  CASE WHEN v.txid < v.xmax AND current_setting('track_commit_timestamp')::bool
    THEN pg_xact_commit_timestamp((v.txid %% 4294967296)::text::xid) END AS committed_at,
  has_function_privilege('pg_control_checkpoint()', 'execute') AS checkpoint_readable,
  (SELECT max(a.backend_start) FROM pg_stat_activity a
   WHERE a.backend_type = 'walwriter') AS walwriter_started
FROM (SELECT %(txid)s::bigint AS txid, pg_is_in_recovery() AS in_recovery,
        pg_postmaster_start_time() AS started,
        pg_stat_get_bgwriter_stat_reset_time() AS stats_reset,
        txid_snapshot_xmax(txid_current_snapshot()) AS xmax,
        current_setting('wal_level') AS wal_level
      OFFSET 0) v"""
# The latest checkpoint, one call (its fields must come from one checkpoint), and
# the current timeline (the first 8 hex digits of the WAL file name).
RESOLVE_CHECKPOINT = (
    b"SELECT c.next_xid, c.oldest_active_xid::text AS oldest_active_xid,"
    b" c.timeline_id, pg_walfile_name(pg_current_wal_lsn()) AS wal_file"
    b" FROM pg_control_checkpoint() c"
)

ISOLATION_CLAUSES: Mapping[str | None, str] = {
    None: "",
    "read committed": " ISOLATION LEVEL READ COMMITTED",
    "repeatable read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


def begin_statement(isolation: str | None, readonly: bool) -> bytes:
    """``BEGIN`` with the isolation level and access mode; ValueError for a bad level."""
    if isolation not in ISOLATION_CLAUSES:
        levels = sorted(k for k in ISOLATION_CLAUSES if k)
        raise ValueError(f"isolation must be one of {levels}, not {isolation!r}")
    return ("BEGIN" + ISOLATION_CLAUSES[isolation] + (" READ ONLY" if readonly else "")).encode()


def statement_timeout_args(remaining: float) -> tuple[str]:
    """The parameters of `SET_STATEMENT_TIMEOUT` for *remaining* seconds."""
    return (str(statement_timeout_ms(remaining)),)


def statement_timeout_command(remaining: float) -> bytes:
    """`SET_STATEMENT_TIMEOUT` for *remaining* seconds with its parameter written in (an
    integer: nothing to quote), for psycopg's command queue, which takes no parameters."""
    return SET_STATEMENT_TIMEOUT.replace(b"%s", b"'%d'" % statement_timeout_ms(remaining))
