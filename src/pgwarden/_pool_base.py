"""Pool pieces shared by the async and sync shells (not generated)."""

from __future__ import annotations

import logging
import select
from typing import Any, Protocol

from psycopg import OperationalError
from psycopg_pool.base import AttemptWithBackoff

__all__ = ["CircuitOpen", "FastReconnect", "PoolObserver", "has_pending_input"]


class CircuitOpen(OperationalError):
    """Raised instead of connecting while the breaker is open (never reaches callers)."""


class _HideCircuitOpen(logging.Filter):
    """Drop psycopg_pool's per-attempt warning for our own `CircuitOpen` refusals:
    the breaker already logged the outage once."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not any(isinstance(arg, CircuitOpen) for arg in args)


logging.getLogger("psycopg.pool").addFilter(_HideCircuitOpen())


class PoolObserver(Protocol):
    def on_connect_ok(self, setup_seconds: float) -> None: ...
    def on_connect_failed(self, exc: BaseException) -> Any: ...
    def on_connection_closed(self, reason: str) -> None: ...
    def may_connect(self) -> bool: ...


class FastReconnect(AttemptWithBackoff):
    """Reconnection backoff: 50 ms doubling to a 250 ms cap (psycopg_pool: 1 s doubling).

    The cap bounds how late the pool notices a restarted server; the breaker,
    not this backoff, protects a server that stays down.
    """

    INITIAL_DELAY = 0.05
    MAX_DELAY = 0.25

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


def has_pending_input(conn: Any) -> bool:
    """True when an idle connection's socket has something to read.

    An idle PostgreSQL connection has nothing to say unless the server ended
    it (a FATAL such as 57P01 followed by EOF, or just EOF after a crash or a
    reset). Checking costs one ``poll`` syscall (about half a microsecond) and
    no round trip, and it catches dead connections before a statement is sent,
    when a retry is safe even for a write. The poll object is cached on the
    connection (``conn.poller``).
    """
    poller = conn.poller
    if poller is None:
        poller = conn.poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))
