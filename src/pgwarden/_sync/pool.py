# WARNING: generated from src/pgwarden/_async/pool.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""psycopg_pool's pool with three narrow hooks pgwarden needs.

psycopg_pool has no public callbacks for "a connect attempt failed" or "a
connection was closed", and its reconnection backoff starts at one second. We
override three private methods (pinned by the psycopg-pool version range in
pyproject.toml and covered by integration tests; see docs/decisions.md):

- ``_connect``: report each attempt's outcome and duration to the handle, so
  the breaker, overload sizing and metrics see real connect errors;
- ``_add_connection``: use a faster, capped backoff so the pool reconnects
  within tens of milliseconds of a restarted server accepting again, and drop
  attempts left over after the adaptive limit lowered ``max_size``;
- ``_close_connection``: count closes by reason.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from psycopg import Connection
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from pgwarden._pool_base import CircuitOpen, FastReconnect, PoolObserver

__all__ = ["CircuitOpen", "PgwConnection", "PgwPool", "PoolObserver"]


class PgwConnection(Connection[DictRow]):
    """A psycopg connection that remembers when it was last used by pgwarden."""

    last_used: float = 0.0
    poller: Any = None  # see has_pending_input()


class PgwPool(ConnectionPool[PgwConnection]):
    """`ConnectionPool` that reports connects and closes to an observer."""

    def __init__(self, conninfo: str, *, observer: PoolObserver, **kwargs: Any) -> None:
        self._observer = observer
        self.failover_drain = False
        super().__init__(conninfo, connection_class=PgwConnection, open=False, **kwargs)

    def _connect(self, timeout: float | None = None) -> PgwConnection:
        if not self._observer.may_connect():
            # The breaker is open: only its single probe may touch the server.
            # Failing here costs nothing and the pool retries on its backoff.
            raise CircuitOpen("pgwarden: circuit open, not connecting")
        started = monotonic()
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            self._observer.on_connect_failed(exc)
            raise
        self._observer.on_connect_ok(monotonic() - started)
        return conn

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # After the adaptive limit lowered max_size, connection attempts queued
        # before it would keep knocking on a full server (and keep reporting
        # overload, so the limit could never grow back): drop them instead.
        with self._lock:
            surplus = self._nconns > self._max_size
            if surplus:
                self._nconns -= 1
                if growing:
                    self._growing = False
        if surplus:
            return
        if attempt is None:
            attempt = FastReconnect(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    def _close_connection(self, conn: PgwConnection) -> None:
        self._observer.on_connection_closed(self._close_reason(conn))
        super()._close_connection(conn)

    def _close_reason(self, conn: PgwConnection) -> str:
        if self._closed:
            return "close"
        if conn.closed or conn.broken:
            return "broken"
        if getattr(conn, "_created_at", 0.0) <= self._drained_at:
            return "failover" if self.failover_drain else "drain"
        if getattr(conn, "_expire_at", float("inf")) <= monotonic():
            return "lifetime"
        return "idle"

    def adopt(self, conn: PgwConnection) -> None:
        """Take a connection opened outside the pool (the warmup probe's) into it.

        Saves the first caller a second connect. Closed instead if the pool is
        closed or already full.
        """
        with self._lock:
            accept = not self._closed and self._nconns < self._max_size
            if accept:
                self._nconns += 1
        if not accept:
            conn.close()
            return
        self._set_connection_expiry_date(conn)
        self._add_to_pool(conn)
