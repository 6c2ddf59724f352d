# WARNING: generated from src/pgwarden/_async/pool.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""The one seam to psycopg_pool: the only module that knows its internals.

psycopg_pool has public hooks for configuring, checking and resetting
connections, but none for "a connection attempt failed", "a connection was
closed (and why)" or the reconnection backoff, and no way to hand it a
connection opened elsewhere. pgwarden therefore overrides or reads the private
names listed below. They are checked when this module is imported (methods
and classes) and when a pool opens (instance attributes), so a psycopg_pool
release that renames one fails with a clear error instead of misbehaving; the
version range in ``pyproject.toml`` (``psycopg-pool>=3.3,<3.4``) is the range
tested, and ``make test`` also runs the suite against its lowest version.

==================================== ==========================================================
private name                         why pgwarden uses it
==================================== ==========================================================
``_connect`` (override)              refuse while the breaker is open (only its probe may touch
                                     the server); report each attempt's outcome and duration
``_add_connection`` (override)       a faster, capped reconnection backoff; drop attempts left
                                     over after the adaptive limit lowered ``max_size``
``_close_connection`` (override)     count closes by reason
``worker`` (override)                end when cancelled (``asyncio.run()`` cancels every task at
                                     exit; psycopg_pool's worker swallows the cancellation of a
                                     connect in progress and never ends)
``_add_to_pool``                     adopt the warmup's connection (saves the first caller a
                                     second connect)
``_set_connection_expiry_date``      give an adopted connection its lifetime
``_lock``, ``_nconns``, ``_max_size``,  the pool's own counting under its own lock: an adopted
``_growing``                         connection counts; a dropped surplus attempt uncounts
``_closed``                          close reason "close"; no adoption into a closed pool
``_drained_at``                      close reason "drain"/"failover" (psycopg_pool 3.3+)
``_pool`` (the idle deque)           abandon a pool whose event loop has closed: close its idle
                                     connections without awaiting the dead loop's workers
``_return_connection`` (override),   the fleet budget's share: close idle connections above it
``_waiting``                         now, and returned ones on return (unless a caller waits)
``base.AttemptWithBackoff``          subclassed for the faster backoff (``delay``,
                                     ``update_delay``)
connection ``_created_at``,          close reasons "drain" and "lifetime" (set by psycopg and
``_expire_at``                       by the pool on every connection)
connection ``_pool``                 `claim`: the handle's solo connection, lent when the pool
                                     is built, comes back through ``putconn``
==================================== ==========================================================

psycopg_pool's own log records about our pools become pgwarden events: each
pool's constructor calls `pgwarden.logs.route_pool_logs`, which installs (once
per process, not at import) a filter on psycopg_pool's loggers that turns every
record about a pgwarden pool into one ``pool_*`` event on the ``pgwarden``
logger, redacted, and drops the original. It recognises our pools by the
``_pgwarden_owned`` mark on `PgwPool` and `PgwConnection` (see
`pgwarden.logs.PoolLogBridge`). Its per-attempt warning for our own
`CircuitOpen` refusals is dropped without an event (``_pgwarden_quiet``): the
breaker already logged the outage once.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, ClassVar, Protocol

import psycopg
import psycopg_pool
from psycopg import OperationalError
from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from pgwarden._handle.config import password_of
from pgwarden._redact import redact
from pgwarden._sync._compat import run_pool_worker, run_within
from pgwarden._sync.connection import CredentialsFailed, PgwConnection
from pgwarden.core.failures import sqlstate_of
from pgwarden.core.metrics import CloseReason
from pgwarden.logs import route_pool_logs

__all__ = [
    "POOL_PRIVATE_ATTRIBUTES",
    "POOL_PRIVATE_METHODS",
    "CircuitOpen",
    "CredentialsFailed",
    "PgwConnection",
    "PgwPool",
    "PoolObserver",
    "login_rejection",
]

POOL_PRIVATE_METHODS = (
    "_connect",
    "_add_connection",
    "_close_connection",
    "_add_to_pool",
    "_set_connection_expiry_date",
    "_return_connection",
    "worker",
)
POOL_PRIVATE_ATTRIBUTES = (
    "_lock",
    "_nconns",
    "_max_size",
    "_growing",
    "_closed",
    "_drained_at",
    "_pool",
    "_waiting",
)
CONNECTION_PRIVATE_ATTRIBUTES = ("_created_at", "_expire_at", "_pool")


def _check_internals(pool_class: type[Any]) -> None:
    missing = [
        name for name in POOL_PRIVATE_METHODS if not callable(getattr(pool_class, name, None))
    ]
    if not callable(getattr(AttemptWithBackoff, "update_delay", None)):
        missing.append("base.AttemptWithBackoff.update_delay")
    if missing:
        raise ImportError(
            f"pgwarden needs psycopg_pool internals that psycopg_pool "
            f"{getattr(psycopg_pool, '__version__', '?')} does not have: {', '.join(missing)}. "
            "Install a psycopg-pool version within pgwarden's declared range (>=3.3,<3.4)."
        )


_check_internals(ConnectionPool)


class CircuitOpen(OperationalError):
    """Raised instead of connecting while the breaker is open (never reaches callers)."""

    #: psycopg_pool's "error connecting" record for it is dropped (see the module docstring).
    _pgwarden_quiet: ClassVar[bool] = True


class PoolObserver(Protocol):
    """What the pool reports to its handle (implemented by ``HandleState``)."""

    #: A pooler lost a prepared statement: connections are handed out unprepared.
    prepares_off: bool

    @property
    def may_connect(self) -> bool: ...
    def connect_bound(self) -> tuple[float, bool]: ...
    def connect_succeeded(self, setup_seconds: float, *, explorer: bool = False) -> None: ...
    def connect_failed(
        self, exc: BaseException, *, feed_breaker: bool = True, explorer: bool = False
    ) -> Any: ...
    def connection_closed(self, reason: str) -> None: ...


#: SQLSTATEs of a login the server refused (28P01 invalid_password, 28000
#: invalid_authorization_specification: pg_hba, an expired IAM token): permanent for the
#: attempt, but the next one asks the credentials callable again.
LOGIN_REJECTED = frozenset({"28P01", "28000"})

#: How long `getconn` waits for a connection while logins are rejected: about one
#: reconnection backoff (`FastReconnect.MAX_DELAY`), so the attempt after the callable
#: starts returning the new secret is the one that serves the caller.
LOGIN_REJECTED_WAIT = 0.3


def login_rejection(exc: BaseException) -> str | None:
    """The SQLSTATE if *exc* is the server refusing the login, else None. libpq reports
    a failed connect as text only (psycopg's error has no ``sqlstate`` then), so the
    server's English messages count too; RDS Proxy's "too many competing requests" is
    overload, not a refusal."""
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        return sqlstate if sqlstate in LOGIN_REJECTED else None
    text = str(exc).lower()
    if "competing requests" in text:
        return None
    if "authentication failed" in text:  # password, SCRAM, md5, PAM (RDS IAM)
        return "28P01"
    if "no pg_hba.conf entry" in text:
        return "28000"
    return None


def _login_rejected_error(rejected: BaseException) -> psycopg.Error:
    """A fresh error for one caller (the pool's own is shared): the same SQLSTATE, so it
    classifies alike, and the server's text, which names the role, redacted."""
    sqlstate = login_rejection(rejected) or "28P01"
    return psycopg.errors.lookup(sqlstate)(
        f"pgwarden: the server rejected this handle's login ({sqlstate}) and no pooled "
        "connection was free; each new connection asks the credentials callable again: "
        + redact(str(rejected))
    )


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


class PgwPool(ConnectionPool[PgwConnection]):
    """`ConnectionPool` that reports connects and closes to its handle."""

    _pgwarden_owned: ClassVar[bool] = True  # psycopg_pool's records about it are events

    def __init__(self, conninfo: str, *, observer: PoolObserver, **kwargs: Any) -> None:
        self._observer = observer
        #: The last connect failure if the server rejected the login (`LOGIN_REJECTED`)
        #: and no connect has succeeded since; None otherwise.
        self._login_rejected: BaseException | None = None
        #: The close reason of connections closed by the current drain.
        self.drain_reason = CloseReason.DRAIN
        super().__init__(conninfo, connection_class=PgwConnection, open=False, **kwargs)
        connect_kwargs = kwargs.get("kwargs") or {}
        route_pool_logs(
            self.name, secrets=(password_of(conninfo), str(connect_kwargs.get("password") or ""))
        )

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        super().open(wait=wait, timeout=timeout)
        # Instance attributes exist only once the pool is open (the lock is made then).
        missing = [name for name in POOL_PRIVATE_ATTRIBUTES if not hasattr(self, name)]
        if missing:
            self.close()
            raise ImportError(
                "pgwarden needs psycopg_pool pool attributes that this psycopg_pool lacks: "
                f"{', '.join(missing)}; install psycopg-pool>=3.3,<3.4"
            )

    @classmethod
    def worker(cls, q: Any) -> None:
        run_pool_worker(q)

    def _connect(self, timeout: float | None = None) -> PgwConnection:
        if not self._observer.may_connect:
            # The breaker is open: only its single probe may touch the server.
            # Failing here costs nothing and the pool retries on its backoff.
            raise CircuitOpen("pgwarden: circuit open, not connecting")
        # Bounded like every connect (libpq only knows whole seconds >= 2), so
        # an attempt made while the network is silent does not outlive it long.
        bound, explorer = self._observer.connect_bound()
        started = monotonic()
        try:
            conn = run_within(lambda: ConnectionPool._connect(self, timeout), bound)
        except Exception as exc:
            self._observer.connect_failed(exc, explorer=explorer)
            if login_rejection(exc) is not None:
                self._login_rejected = exc
            raise
        self._login_rejected = None
        self._observer.connect_succeeded(monotonic() - started, explorer=explorer)
        return conn

    @property
    def rejecting_logins(self) -> bool:
        """The server rejected the last login and none succeeded since: `getconn` then
        waits at most `LOGIN_REJECTED_WAIT` before it raises the refusal."""
        return self._login_rejected is not None

    def getconn(self, timeout: float | None = None) -> PgwConnection:
        if self._login_rejected is None:
            conn = ConnectionPool.getconn(self, timeout)  # no super(): a hot path
        else:
            conn = self._getconn_login_rejected(timeout)
        if self._observer.prepares_off:
            # Behind a pooler that turned out not to track prepared statements, none of
            # this handle's connections may prepare one (see pgwarden.core.prepared).
            conn.prepare_threshold = None
        return conn

    def _getconn_login_rejected(self, timeout: float | None) -> PgwConnection:
        """`getconn` while the server rejects new logins (a rotated password that the
        credentials callable does not return yet): the pool cannot grow, so a caller
        waits only `LOGIN_REJECTED_WAIT` for a connection to come back (or for the next
        attempt, which asks the callable again, to succeed), then gets the server's
        refusal, redacted, instead of waiting out its whole acquire timeout."""
        wait = LOGIN_REJECTED_WAIT if timeout is None else min(timeout, LOGIN_REJECTED_WAIT)
        try:
            return ConnectionPool.getconn(self, wait)
        except PoolTimeout:
            rejected = self._login_rejected
            if rejected is None:
                raise  # a login succeeded meanwhile: wait on as usual
            raise _login_rejected_error(rejected) from None

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

    #: The fleet budget's share (`shrink_to`): connections above it are closed when idle.
    keep_at_most: int | None = None

    def shrink_to(self, keep: int | None) -> int:
        """Hold at most *keep* connections (None: no such cap): close idle ones above it
        now, and ones in use when they come back. Never one in use. Returns how many
        were closed now."""
        self.keep_at_most = keep
        if keep is None or not hasattr(self, "_lock"):
            # Not open yet: nothing to close, and psycopg_pool 3.3.0 makes its lock only
            # at open (the fleet sampler starts with the pool, before it opens).
            return 0
        surplus: list[PgwConnection] = []
        with self._lock:
            while self._pool and self._nconns > keep and not self._closed:
                surplus.append(self._pool.popleft())
                self._nconns -= 1
        for conn in surplus:
            self._close_connection(conn)
        return len(surplus)

    def _return_connection(self, conn: PgwConnection, from_getconn: bool) -> None:
        keep = self.keep_at_most
        if keep is not None:
            with self._lock:
                # A waiting caller gets it instead: the pool would not grow for it.
                surplus = self._nconns > keep and not self._waiting and not self._closed
                if surplus:
                    self._nconns -= 1
            if surplus:
                self._close_connection(conn)
                return
        super()._return_connection(conn, from_getconn)

    def _close_connection(self, conn: PgwConnection) -> None:
        self._observer.connection_closed(self._close_reason(conn).value)
        super()._close_connection(conn)

    def _close_reason(self, conn: PgwConnection) -> CloseReason:
        if self._closed:
            return CloseReason.CLOSE
        if conn.closed or conn.broken:
            return CloseReason.BROKEN
        if getattr(conn, "_created_at", 0.0) <= self._drained_at:
            return self.drain_reason
        if getattr(conn, "_expire_at", float("inf")) <= monotonic():
            return CloseReason.LIFETIME
        return CloseReason.IDLE

    def drain_for(self, reason: CloseReason) -> None:
        """`drain()`, counting the closed connections under *reason*.

        Idle connections are closed now (no round trip: a close only sends
        Terminate) and replaced; connections in use are closed when returned.
        """
        self.drain_reason = reason
        try:
            self.drain()
        finally:
            self.drain_reason = CloseReason.DRAIN

    def abandon(self) -> None:
        """Give up this pool without awaiting anything: its event loop has closed (an
        earlier ``asyncio.run()``), and its workers, tasks of that loop, ended with it.

        Idle connections are closed at the socket (libpq sends Terminate) and
        counted as closed; the pool refuses any further use.
        """
        self._closed = True
        idle = list(self._pool)
        self._pool.clear()
        for conn in idle:
            self._observer.connection_closed(CloseReason.CLOSE.value)
            conn.pgconn.finish()

    #: What `getconn` raises when its timeout passes (here so that callers need not
    #: import psycopg_pool themselves: see `pgwarden._sync.connection`).
    Timeout: ClassVar[type[PoolTimeout]] = PoolTimeout

    def reserve_slot(self) -> None:
        """Count one connection more, for one `claim` will hand over (or `release_slot`)."""
        with self._lock:
            self._nconns += 1

    def release_slot(self) -> None:
        """Give back a slot `reserve_slot` took for a connection that did not come."""
        with self._lock:
            self._nconns -= 1

    def claim(self, conn: PgwConnection, expires_at: float) -> None:
        """Make *conn*, opened before this pool (the handle's solo connection), one of
        its own, in a slot `reserve_slot` took: `putconn` then takes it, now if idle or
        when its caller is done with it. No I/O: the caller may hold a lock."""
        self._set_connection_expiry_date(conn)
        conn._expire_at = expires_at  # the lifetime it had as the solo connection
        conn._pool = self

    def claimed(self, conn: PgwConnection) -> bool:
        """Is *conn* this pool's to take back (`claim`) and not yet taken?"""
        return getattr(conn, "_pool", None) is self

    def adopt(self, conn: PgwConnection) -> None:
        """Take a connection opened outside the pool (the warmup's, a probe's) into it.

        Closed instead if the pool is closed or already full.
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
