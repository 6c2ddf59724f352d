"""A connection's session shape changed without psycopg's lock, where that is safe."""

from __future__ import annotations

from typing import Any

from psycopg.pq import TransactionStatus

__all__ = ["autocommit_in_place"]

_IDLE = int(TransactionStatus.IDLE)  # libpq's status is a plain int
_MISSING = object()


def autocommit_in_place(conn: Any, value: bool) -> bool:
    """Set *conn*'s autocommit to *value* as psycopg's own setter does, without its lock;
    False (nothing done) when the caller must use the public setter instead.

    Only for a connection the caller holds alone (just taken from the pool, or being
    given back): psycopg's lock is there for concurrent users, and there are none. The
    setter's checks are made here too: the connection is idle outside a pipeline (no
    transaction, nothing pending), which is when psycopg's setter only assigns the
    attribute. It takes the lock (and, async, awaits it) for that: 1.3 µs per
    off/on pair sync and 4.5 µs async here, against 0.05 µs, on every checkout by a
    consumer that wants autocommit off (an ORM). A psycopg without these attributes
    gets the public setter."""
    if (
        conn.pgconn.transaction_status != _IDLE
        or getattr(conn, "_pipeline", _MISSING) is not None
        or getattr(conn, "_autocommit", _MISSING) is _MISSING
    ):
        return False
    conn._autocommit = value
    return True
