"""The statements pgwarden itself sends, and the types of what users send."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from psycopg.sql import SQL, Composed

from pgwarden.core.classify import query_is_write
from pgwarden.core.deadline import statement_timeout_ms

__all__ = [
    "ISOLATION_CLAUSES",
    "MARKER",
    "MARKER_IF_ASSIGNED",
    "RESOLVE",
    "SET_STATEMENT_TIMEOUT",
    "ManyParams",
    "Mode",
    "Params",
    "Query",
    "begin_statement",
    "query_is_write",
    "statement_timeout_args",
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

#: The one way pgwarden sets a statement timeout: transaction-local, so it
#: leaves no session state behind (safe behind a transaction pooler). Used
#: inside BEGIN ... COMMIT only, pipelined with what it bounds.
SET_STATEMENT_TIMEOUT = b"SELECT set_config('statement_timeout', %s, true)"

# What identifies a transaction for commit resolution: its id, and the server's
# start time (an id seen before a crash restart may be handed out again).
MARKER = b"SELECT txid_current() AS txid, pg_postmaster_start_time() AS started"
MARKER_IF_ASSIGNED = (
    b"SELECT txid_current_if_assigned() AS txid, pg_postmaster_start_time() AS started"
)
RESOLVE = b"SELECT txid_status(%s) AS status, pg_postmaster_start_time() AS started"

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
