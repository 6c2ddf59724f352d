"""Connections for calls: admission, acquire, validation, and the bound on every byte.

Every byte the shell sends or receives on a connection goes through an
`AsyncLease`: a connection plus a sever timer armed at the call's deadline
*before* any I/O (validation, BEGIN, statements, COMMIT, the pool's reset on
return) and disarmed only after the connection is back in the pool. So no I/O
made on behalf of a call can outlive its deadline, whatever the code path: if
the server (or the network) stops answering, the socket is shut down at the
deadline plus a short grace, and the blocked read fails. Connects made on
behalf of a call (the warmup, the breaker's probe) are bounded by
`run_within`. A deadline exists for every call unless ``default_timeout`` was
set to None.

A lease for a single statement under an explicit deadline (``cancel=True``)
first sends a cancel request at the deadline, so the server stops the
statement and the connection stays usable; the sever follows `SEVER_GRACE`
later. Such a connection goes back to the pool only once no cancel can still
reach it (`AsyncLease.release`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from pgwarden._async._compat import (
    Background,
    Lock,
    SingleFlight,
    Watchdog,
    loop_gone,
    run_within,
    running_loop,
    sleep,
)
from pgwarden._async.connection import PgwAsyncConnection
from pgwarden._handle.config import connect_kwargs, libpq_connect_timeout, pool_kwargs
from pgwarden._handle.net import has_pending_input, sever
from pgwarden._handle.shape import autocommit_in_place
from pgwarden._handle.state import HandleState
from pgwarden._handle.waits import WaitTimeout
from pgwarden.core.breaker import Admission
from pgwarden.core.failures import FailureKind
from pgwarden.core.metrics import CloseReason
from pgwarden.errors import AcquireTimeout, HandleClosed

if TYPE_CHECKING:
    from pgwarden._async.pool import PgwAsyncPool

__all__ = ["SEVER_GRACE", "AsyncCheckout", "AsyncConnections", "AsyncLease"]

logger = logging.getLogger("pgwarden")

# Extra time past the deadline before the client severs a connection whose
# server stopped answering. With an explicit deadline the server-side
# statement_timeout normally ends the statement first, cleanly.
SEVER_GRACE = 0.05

# How long a cancel request sent at a deadline may take (its own connection to
# the server or pooler). Only the cancel waits this long, never the caller.
CANCEL_TIMEOUT = 5.0

# A connection idle past validation_window gets one round trip before use; a
# healthy server answers in milliseconds, so a silent one is given up on soon.
VALIDATION_TIMEOUT = 1.0

# Two drains asked for this close together are one: the second (the retry path
# after a transaction that already drained) would only close fresh connections.
DRAIN_COALESCE = 0.25

# getconn() waits in slices this long, so that a breaker opening meanwhile
# ends the wait; waiting callers re-ask the breaker at this interval.
WAIT_SLICE = 0.25
ADMIT_POLL = 0.05


class AsyncLease:
    """A connection held for one call, under a sever timer armed at its deadline.

    Created only by `AsyncConnections.lease` (pooled) and `AsyncConnections.bound`
    (a direct connection); released exactly once.
    """

    __slots__ = (
        "_cancel",
        "_cancelling",
        "_connections",
        "_precise",
        "_timer",
        "_until",
        "_watch",
        "acquire_wait",
        "acquired_at",
        "cancel_consumed",
        "conn",
        "severed",
    )

    def __init__(
        self,
        connections: AsyncConnections,
        conn: PgwAsyncConnection,
        until: float | None,
        acquire_wait: float = 0.0,
        *,
        precise: bool = True,
        cancel: bool = False,
        acquired_at: float | None = None,
    ) -> None:
        self._connections = connections
        self.conn = conn
        self.severed = False
        #: When the connection was obtained (monotonic; *acquired_at* if given).
        self.acquired_at = monotonic() if acquired_at is None else acquired_at
        self.acquire_wait = acquire_wait
        self._precise = precise
        # Cancel-at-deadline (single statements under an explicit deadline): the
        # server is asked to stop the statement at the deadline itself, instead of
        # a statement_timeout sent with it; the sever follows SEVER_GRACE later.
        self._cancel = cancel and precise
        self._cancelling: Background | None = None  # the cancel request, once sent
        #: The statement ended with query_canceled after the cancel was sent: the
        #: server consumed the request, so none is left to hit a later statement.
        self.cancel_consumed = False
        self._timer: Any = None
        self._watch: int | None = None
        self._until: float | None = None
        if until is not None:
            self.rearm(until)

    def rearm(self, until: float | None) -> None:
        """Move the sever timer to *until* (None: no bound). A lease that is not
        *precise* (only the ``default_timeout`` backstop bounds it) uses the
        watchdog's coarse, cheaper watch, which fires up to ``COARSE_TICK`` late."""
        watchdog = self._connections.watchdog
        if self._timer is not None:
            watchdog.disarm(self._timer)
            self._timer = None
        if self._watch is not None:
            watchdog.unwatch(self._watch)
            self._watch = None
        self._until = until
        if until is None:
            return
        if self._cancel:
            self._timer = watchdog.arm(until, self._on_deadline)
        elif self._precise:
            self._timer = watchdog.arm(until + SEVER_GRACE, self._sever)
        else:
            self._watch = watchdog.watch(until, self._sever)

    def backstop_to_watch(self, when: float, callback: Callable[[], object]) -> int:
        """End the ``default_timeout`` backstop of a lease that is not *precise* (a
        consumer's checkout: the backstop bounds only getting the connection) and
        watch ``callback()`` at *when* instead, reusing the backstop's watchdog entry
        (one entry moved rather than one removed and one added, on the hot path).
        Returns the watch's token, for `Watchdog.unwatch`."""
        watchdog = self._connections.watchdog
        token = self._watch
        if token is not None and self._timer is None:
            self._watch = None
            self._until = None
            if watchdog.rewatch(token, when, callback):
                return token
        elif self._timer is not None:
            self.rearm(None)
        # It fired already (a sever), or none was armed (default_timeout=None, or a
        # checkout's that no round trip needed: see `AsyncConnections.lease`).
        self._until = None
        return watchdog.watch(when, callback)

    @property
    def armed(self) -> bool:
        """A sever timer or a backstop watch is set."""
        return self._timer is not None or self._watch is not None

    @property
    def cancel_sent(self) -> bool:
        """The deadline passed while the connection was held: a cancel request went out."""
        return self._cancelling is not None

    def _on_deadline(self) -> None:
        # A timer callback (it cannot wait): send the cancel in the background and
        # sever SEVER_GRACE later if the statement has not ended by then. A cancel
        # travels on its own connection, so it reaches the server even if this
        # connection's network went silent or is severed meanwhile.
        self._cancelling = Background(self._send_cancel)
        until = self._until if self._until is not None else monotonic()
        self._timer = self._connections.watchdog.arm(until + SEVER_GRACE, self._sever)

    def stop_cancelling(self) -> bool:
        """From now on the deadline severs instead of cancelling; False if a cancel
        was already sent (the deadline passed).

        Before a COMMIT: a cancel that reaches a COMMIT waiting for a synchronous
        standby makes the server end the wait with a warning and report success,
        for a commit the standby may never have received."""
        if not self._cancel:
            return self._cancelling is None
        until = self._until
        self.rearm(None)  # after this, a cancel was sent already or never will be
        self._cancel = False
        self.rearm(until)  # the sever alone, still at the deadline plus the grace
        return self._cancelling is None

    async def _send_cancel(self) -> None:
        try:
            await self.conn.cancel_safe(timeout=CANCEL_TIMEOUT)
        except Exception as exc:  # it could not arrive: the sever ends the call
            logger.debug("cancel request failed: %s", type(exc).__name__)

    def _sever(self) -> None:
        # Read the descriptor now, not at arm time: a connection closed
        # meanwhile raises here instead of naming a descriptor reused since.
        try:
            fileno = self.conn.pgconn.socket
        except psycopg.Error:
            return
        self.severed = True
        sever(fileno)

    @property
    def lost(self) -> bool:
        """The connection is broken or closed (the server, the network or a sever)."""
        return self.conn.broken or self.conn.closed

    async def release(self, *, lost: bool | None = None) -> float:
        """Return the connection to the pool (its reset still under the timer);
        returns how long it was held. *lost*: `lost`, when the caller just read it."""
        conn = self.conn
        connections = self._connections
        if self._cancel or self._cancelling is not None:
            await self._end_cancel_window()
            lost = None  # the cancel window may have closed it
        # One reading for both: the connection's last use and the end of the hold.
        returned = monotonic()
        try:
            if not (self.lost if lost is None else lost):
                conn.last_used = returned
            pool = connections.pool
            if pool is not None:
                await pool.putconn(conn)
            else:
                await connections.return_solo(conn)
        finally:
            if self._timer is not None or self._watch is not None:
                self.rearm(None)
        if self.severed:
            # The server did not answer by the deadline: the network (or the
            # server) went silent, and this connection's siblings are likely as
            # silent. Drop them all rather than hand any of them out again.
            await connections.drain(CloseReason.DRAIN, "connection went silent")
        return returned - self.acquired_at

    async def _end_cancel_window(self) -> None:
        """Before the connection can serve anyone else: no cancel may still be on
        its way to the session, or it would stop someone else's statement."""
        until = self._until
        self.rearm(None)  # after this, a cancel was sent already or never will be
        self._cancel = False
        cancelling = self._cancelling
        if cancelling is not None:
            settled = self.cancel_consumed and await cancelling.wait(
                (until or 0.0) + SEVER_GRACE - monotonic()
            )
            if not settled and not self.lost:
                await self.conn.close()  # the pool replaces it
        if (
            until is not None
            and not self.lost
            and self.conn.info.transaction_status != TransactionStatus.IDLE
        ):
            self.rearm(until)  # the pool's rollback on return, under the sever timer

    async def discard(self) -> None:
        """Close a connection found dead and let the pool replace it."""
        await self.conn.close()
        await self.release()


class AsyncConnections:
    """The handle's pool and everything between a call and a usable connection."""

    def __init__(self, state: HandleState, adapters: Any = None) -> None:
        self.state = state
        self.settings = state.settings
        #: The consumer's psycopg AdaptersMap every connection starts from (or None).
        self.adapters = adapters
        self._drained_at = float("-inf")  # when the last drain finished
        self.pool: PgwAsyncPool | None = None
        self.watchdog = Watchdog()
        self._resize_lock = Lock()
        self._drain_flight: SingleFlight[None] = SingleFlight()
        #: The event loop the pool and its workers belong to (asyncio; None in threads).
        self._loop: object = None
        #: Called (without I/O) when a call finds the server read-only: the listener
        #: checks its own server at once instead of at its next heartbeat.
        self.failover_hooks: list[Callable[[], None]] = []
        self._closed = False
        # The solo connection (see `keep_solo`): its state has one owner, this lock,
        # taken only for plain reads and writes (never across I/O).
        self._solo_lock = threading.Lock()
        self._solo: PgwAsyncConnection | None = None
        self._solo_lent = False
        self._solo_expires = float("inf")
        #: Why the lent solo connection must be closed when it comes back (a drain, a close).
        self._solo_condemned: CloseReason | None = None
        self._solo_idle_watch: int | None = None

    def _loop_moved(self) -> bool:
        """Follow the caller's event loop: True when this call runs on a new loop and the
        pool's loop has closed (sequential ``asyncio.run()`` calls, a serverless handler
        per invocation, a test framework's loop per test). The old pool is then
        abandoned: its workers died with their loop, so it would never reconnect or
        grow again. A pool whose loop still runs elsewhere cannot be shared: refused."""
        loop = running_loop()
        old = self._loop
        if loop is old:
            return False
        self._loop = loop
        if old is None:
            return False
        if not loop_gone(old):
            self._loop = old
            raise RuntimeError(
                f"the database handle for {self.settings.safe_url} belongs to another "
                "event loop that is still running; make one handle per event loop"
            )
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.abandon()
        with self._solo_lock:
            solo, self._solo = self._solo, None
            self._solo_lent = False
            self._solo_condemned = None
            self._solo_idle_watch = None  # the old loop's sweeper went with it
        if solo is not None:  # abandoned like the pool's idle connections
            self.state.connection_closed(CloseReason.CLOSE.value)
            solo.pgconn.finish()
        # Both are bound to the old loop once used there.
        self._resize_lock = Lock()
        self._drain_flight = SingleFlight()
        return pool is not None

    # --- the pool ------------------------------------------------------------------------------
    def ensure_pool(self) -> PgwAsyncPool:
        """The pool, made (not opened) if there is none. It does not take the solo
        connection: `_pool_for_more` does, for a handle that had one."""
        if self.pool is None:
            self.pool = self._new_pool()
            self._start_fleet_sampler()
        return self.pool

    def _new_pool(self) -> PgwAsyncPool:
        from pgwarden._async.pool import PgwAsyncPool  # the first time one is needed

        state = self.state
        return PgwAsyncPool(
            self.settings.url or "",
            observer=state,
            kwargs={
                **connect_kwargs(self.settings, pgbouncer=state.pgbouncer, adapters=self.adapters),
                "application_name": state.application_name,  # the fleet's mark
            },
            **pool_kwargs(
                self.settings, max_size=state.applied_limit, max_lifetime=state.max_lifetime
            ),
        )

    def _start_fleet_sampler(self) -> None:
        if self.settings.fleet_budget is not None:
            from pgwarden._async.fleet import AsyncFleetSampler  # only with a fleet budget

            AsyncFleetSampler(self).start()

    def pool_stats(self) -> dict[str, int] | None:
        pool = self.pool
        if pool is not None:
            return pool.get_stats()
        with self._solo_lock:
            if self._solo is None:
                return None
            return {
                "pool_size": 1,
                "pool_available": 0 if self._solo_lent else 1,
                "pool_max": self.state.applied_limit,
            }

    # --- the solo connection -------------------------------------------------------------------
    # A handle with min_size=0 and no fleet budget keeps the warmup's connection without a
    # pool, and serves calls on it for as long as they do not overlap: a serverless
    # invocation or a worker that runs one query at a time never imports psycopg_pool nor
    # starts its worker threads (a third of a cold start's imports beyond psycopg). The
    # first call that finds it lent (or gone) builds the pool, which takes the connection
    # over in the slot it counts (`_pool_for_more`). Meanwhile the handle does for it what
    # the pool would: its lifetime is checked when it is taken, and it is closed after
    # ``max_idle`` idle (`_solo_idled`), a drain or the handle's close.

    @property
    def solo_allowed(self) -> bool:
        """May the warmup keep its connection without building a pool?"""
        settings = self.settings
        return self.pool is None and settings.min_size == 0 and settings.fleet_budget is None

    def keep_solo(self, conn: PgwAsyncConnection) -> None:
        """Hold the warmup's *conn* as the handle's only connection, idle."""
        now = monotonic()
        with self._solo_lock:
            self._solo = conn
            self._solo_lent = False
            self._solo_condemned = None
            self._solo_expires = now + self.state.max_lifetime
            old, self._solo_idle_watch = self._solo_idle_watch, None
        if old is not None:
            self.watchdog.unwatch(old)
        token = self.watchdog.watch(now + self.settings.max_idle, self._solo_idled)
        with self._solo_lock:
            self._solo_idle_watch = token

    def _solo_idled(self) -> None:
        """The idle watch: one entry for the solo connection's whole life, not one per
        use. When it fires, it closes the connection if it has been idle ``max_idle``
        since its last use (``last_used``, set on every return), and otherwise watches
        again at the time that would be. A watchdog callback (it cannot wait): libpq's
        finish sends Terminate and closes the socket without the event loop."""
        max_idle = self.settings.max_idle
        with self._solo_lock:
            conn = self._solo
            if conn is None or self.pool is not None:
                self._solo_idle_watch = None
                return
            now = monotonic()
            due = (now if self._solo_lent else conn.last_used) + max_idle
            if due > now:
                self._solo_idle_watch = self.watchdog.watch(due, self._solo_idled)
                return
            self._solo = None
            self._solo_idle_watch = None
        self.state.connection_closed(CloseReason.IDLE.value)
        conn.pgconn.finish()

    async def _take_solo(self) -> PgwAsyncConnection | None:
        """The solo connection, now lent to the caller; None if there is none or it
        is lent already (the caller then needs the pool)."""
        with self._solo_lock:
            conn = self._solo
            if conn is None or self._solo_lent or self.pool is not None:
                return None
            self._solo_lent = True
            expired = monotonic() >= self._solo_expires
            if expired:
                self._solo = None
        if expired:
            self.state.connection_closed(CloseReason.LIFETIME.value)
            await conn.close()
            return None
        if self.state.prepares_off:
            conn.prepare_threshold = None  # as the pool's getconn does
        return conn

    async def return_solo(self, conn: PgwAsyncConnection) -> None:
        """*conn* is back from a call while no pool existed when it was read: keep it
        as the solo connection, or hand it to the pool built meanwhile, or close it."""
        if conn.pgconn.transaction_status == TransactionStatus.IDLE:
            # The usual case, first: an idle session is open and usable as it is.
            with self._solo_lock:
                if (
                    conn is self._solo
                    and self._solo_condemned is None
                    and self.pool is None
                    and not self._closed
                ):
                    self._solo_lent = False
                    return
        elif not (conn.closed or conn.broken):
            status = conn.pgconn.transaction_status
            if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                try:
                    await conn.rollback()  # as the pool does on return
                except psycopg.Error:
                    await conn.close()
            elif status != TransactionStatus.IDLE:
                await conn.close()  # a statement still running (or unknown): not reused
        lost = conn.closed or conn.broken
        with self._solo_lock:
            pool = self.pool
            mine = conn is self._solo
            reason = self._solo_condemned
            keep = mine and not lost and reason is None and pool is None and not self._closed
            if keep:
                self._solo_lent = False
            elif mine:
                self._solo = None
                self._solo_lent = False
                self._solo_condemned = None
        if keep:
            return
        if pool is not None and pool.claimed(conn):
            await pool.putconn(conn)  # the pool built while it was lent counts it already
            return
        if not lost:
            self.state.connection_closed((reason or CloseReason.CLOSE).value)
        await conn.close()

    def finish_idle_solo(self) -> None:
        """Terminate the solo connection if idle, without awaiting anything (a hook
        or signal handler: `pgwarden.serverless`); a lent one is left to its caller."""
        with self._solo_lock:
            conn = self._solo
            if conn is None or self._solo_lent:
                return
            self._solo = None
            self._solo_idle_watch = None  # it finds no connection if it fires
        self.state.connection_closed(CloseReason.CLOSE.value)
        conn.pgconn.finish()

    async def _close_solo(self, reason: CloseReason) -> None:
        """Close the solo connection now if idle, or when it comes back if lent."""
        with self._solo_lock:
            conn = self._solo
            if conn is None:
                return
            if self._solo_lent:
                self._solo_condemned = reason
                return
            self._solo = None
            watch, self._solo_idle_watch = self._solo_idle_watch, None
        if watch is not None:
            self.watchdog.unwatch(watch)
        self.state.connection_closed(reason.value)
        await conn.close()

    async def _pool_for_more(self) -> PgwAsyncPool:
        """The pool, built and opened now if there is none, with the solo connection
        in it: idle, it goes into the pool at once; lent, the pool counts it from now
        on and takes it when it comes back (so the pool never exceeds ``max_size``)."""
        async with self._resize_lock:
            pool = self.pool
            if pool is not None:
                return pool
            if self._closed:
                raise HandleClosed(f"the database handle for {self.settings.safe_url} is not open")
            pool = self._new_pool()  # published below, once it counts the solo connection
            await pool.open(wait=False)
            await pool.reserve_slot()
            with self._solo_lock:
                conn, lent, reason = self._solo, self._solo_lent, self._solo_condemned
                watch, self._solo_idle_watch = self._solo_idle_watch, None
                # A drain or close condemned it while lent (an idle one is closed at
                # once): it stays the solo connection until `return_solo` closes it.
                claim = conn is not None and reason is None
                if conn is not None and claim:
                    pool.claim(conn, self._solo_expires)
                if not (lent and reason is not None):
                    self._solo, self._solo_lent, self._solo_condemned = None, False, None
                self.pool = pool
        if watch is not None:
            self.watchdog.unwatch(watch)
        if not claim:
            await pool.release_slot()
        elif conn is not None and not lent:
            await pool.putconn(conn)
        self._start_fleet_sampler()
        return pool

    # --- connects made on behalf of a call -----------------------------------------------------
    async def connect_direct(
        self,
        timeout: float,
        *,
        feed_breaker: bool = True,
        explorer: bool = False,
        cut_short: bool = False,
    ) -> PgwAsyncConnection:
        """One connection outside the pool, within *timeout*; the outcome is reported
        (*cut_short*: *timeout* is less than the learnt bound, `HandleState.connect_failed`)."""
        self._loop_moved()  # a pool left behind is re-made by the warmup that calls this
        kwargs = connect_kwargs(
            self.settings, pgbouncer=self.state.pgbouncer, adapters=self.adapters
        )
        kwargs["connect_timeout"] = libpq_connect_timeout(timeout)
        kwargs["application_name"] = self.state.application_name
        conninfo = self.settings.url or ""
        started = monotonic()
        try:
            conn = await run_within(lambda: PgwAsyncConnection.connect(conninfo, **kwargs), timeout)
        except Exception as exc:
            self.state.connect_failed(
                exc, feed_breaker=feed_breaker, explorer=explorer, cut_short=cut_short
            )
            raise
        self.state.connect_succeeded(monotonic() - started, explorer=explorer)
        return conn

    def bound(self, conn: PgwAsyncConnection, until: float) -> AsyncLease:
        """A lease on a direct connection (the warmup's), under a timer at *until*."""
        return AsyncLease(self, conn, until)

    # --- leases --------------------------------------------------------------------------------
    async def lease(
        self,
        deadline: float | None,
        *,
        explicit: bool,
        internal: bool = False,
        cancel: bool = False,
        lent: bool = False,
        started: float | None = None,
    ) -> AsyncLease:
        """A usable connection under the deadline, as far as can be known without SQL.

        *explicit*: the caller set the deadline itself, so it may wait for the
        breaker's next probe; otherwise an open breaker fails fast. The caller
        reports the lease's ``acquire_wait`` and held time when it is a user's
        (internal probes are not counted). An *internal* lease (the health
        check's) is not counted as a waiting caller either, and does not wait for
        a fleet turn (`HandleState.fleet_wait`). *cancel*: with an explicit
        deadline, the server is asked to cancel at the deadline (one statement in
        autocommit, which no statement_timeout bounds); see `AsyncLease`.

        *lent*: the connection is handed to the caller's own code (a consumer's
        checkout, `lend`; ``connection()``), which the ``default_timeout`` backstop
        bounds only while getting it: without an explicit deadline the backstop is
        armed only if getting it makes a round trip (a validation), since nothing else
        does I/O before the lease is returned. *started*: the monotonic time the call
        began, when the caller has just read it.
        """
        state = self.state
        if started is None:
            started = monotonic()
        if True:  # ASYNC
            self._loop_moved()  # an abandoned pool is re-made below, when one is needed
        else:
            pass  # threads share one pool for the handle's life: no loop to follow
        if not state.fast_path:
            await self._admit(deadline, explicit)
            turn_in = 0.0 if internal else state.fleet_wait(deadline)
            if turn_in > 0:
                await sleep(turn_in)  # this process's share is zero until its next turn
            wanted = state.wanted_limit()
            if wanted is not None:
                await self._apply_limit(wanted)
        pool = self.pool  # None: the solo connection, or a pool to build (`keep_solo`)
        unarmed = lent and not explicit
        end = started + self.settings.acquire_timeout
        if deadline is not None and deadline < end:
            end = deadline
        grace = state.WAITING_GRACE
        while True:
            # A first slice of WAITING_GRACE, uncounted (see `_getconn`); a pool refusing
            # logins ends any wait with the refusal, so it gets no such short slice.
            conn: PgwAsyncConnection | None = None
            if pool is None and (solo := await self._take_solo()) is not None:
                conn = solo
            else:
                if pool is None:
                    pool = await self._pool_for_more()
                left = end - monotonic()
                if left > 0 and not pool.rejecting_logins:
                    try:
                        conn = await pool.getconn(left if left < grace else grace)
                    except pool.Timeout:
                        conn = None  # waited out the grace: from now on it counts as waiting
                if conn is None:
                    conn = await self._getconn(
                        pool, deadline, explicit, started, counted=not internal
                    )
            now = monotonic()
            lease = AsyncLease(
                self,
                conn,
                None if unarmed else deadline,
                now - started,
                precise=explicit,
                cancel=cancel,
                acquired_at=now,
            )
            try:
                fresh = self._fresh(conn, now)
                if fresh:
                    return lease
                if fresh is None:
                    self.state.connection_closed(CloseReason.BROKEN.value)
                    await lease.discard()
                elif await self._round_trip(lease, now, deadline if unarmed else None):
                    return lease
            except BaseException:  # cancelled while validating: do not lose the connection
                await lease.release()
                raise

    def _fresh(self, conn: PgwAsyncConnection, now: float) -> bool | None:
        """Validation without a round trip (*now*: a monotonic reading just taken): None
        when the connection is dead (input waiting: the server's goodbye, or EOF), False
        when it was idle past the window (or since a freeze), so it needs `_round_trip`."""
        if has_pending_input(conn):
            return None
        last_used = conn.last_used
        return last_used == 0.0 or (
            now - last_used <= self.settings.validation_window
            and last_used >= self.state.validate_before
        )

    async def _round_trip(self, lease: AsyncLease, now: float, backstop: float | None) -> bool:
        """One bounded round trip; False (the connection released) if it failed.
        *backstop*: the lease's unarmed ``default_timeout`` deadline, armed first."""
        conn = lease.conn
        if backstop is not None:
            lease.rearm(backstop)
        timer = self.watchdog.arm(now + VALIDATION_TIMEOUT, lease._sever)
        try:
            await conn.execute("")
        except psycopg.Error:
            self.state.connection_closed(CloseReason.BROKEN.value)
            await lease.release()
            return False
        finally:
            self.watchdog.disarm(timer)
        return True

    async def _getconn(
        self,
        pool: PgwAsyncPool,
        deadline: float | None,
        explicit: bool,
        started: float,
        *,
        counted: bool = True,
    ) -> PgwAsyncConnection:
        """`pool.getconn` in slices, so that a breaker that opens meanwhile ends the
        wait; for a caller that was not served within its first slice.

        That first slice (`lease`'s) lasts `HandleState.WAITING_GRACE`, the time a
        caller must have waited to count in the ``waiting`` gauge; so a checkout served
        at once costs the handle's lock nothing, and a *counted* caller is registered
        here, as waiting since *started*, until it has a connection or gives up,
        however that ends (cancellation included). The gauge is ours: psycopg_pool
        leaves each slice that timed out in its queue (and in its ``requests_waiting``)
        until a returned connection pops it; psycopg_pool has no non-blocking getconn
        (``getconn(0)`` always times out), hence the short first slice.
        """
        state = self.state
        end = started + self.settings.acquire_timeout
        if deadline is not None and deadline < end:
            end = deadline
        token = state.wait_started(started) if counted else None
        try:
            while True:
                left = end - monotonic()
                if left <= 0:
                    state.acquire_timed_out()
                    raise state.deadline_error(state.last_connect_error, "acquire", AcquireTimeout)
                try:
                    return await pool.getconn(left if left < WAIT_SLICE else WAIT_SLICE)
                except pool.Timeout:
                    await self._admit(deadline, explicit)
        finally:
            if token is not None:
                state.wait_ended(token)

    async def _admit(self, deadline: float | None, explicit: bool) -> None:
        """Pass the breaker: wait for its next probe if the caller's deadline allows,
        or be the probe."""
        state = self.state
        while True:
            verdict, retry_after = state.admit()
            if verdict is Admission.ALLOW:
                return
            if verdict is Admission.REJECT:
                now = monotonic()
                if not explicit or deadline is None or now + retry_after >= deadline:
                    raise state.unavailable_error(retry_after)
                await sleep(min(max(retry_after, 0.001), ADMIT_POLL))
                continue
            if await self._probe(deadline):
                return

    async def _probe(self, deadline: float | None) -> bool:
        """The breaker's single half-open attempt: one direct connect, bounded by a
        time learnt from this server's own connects, adopted into the pool.

        A probe that its caller's deadline cut below that bound and that timed out
        proved nothing against the server (a server warming up after a restart takes
        longer than a nearly spent deadline): it is abandoned, not counted as a
        failed probe (which would re-open the breaker with a doubled cooldown and
        refuse every caller meanwhile), and the caller gets its deadline error. The
        next caller probes at once, with the time it has."""
        state = self.state
        timeout, explorer = state.connect_bound()
        cut_short = False
        if deadline is not None:
            left = deadline - monotonic()
            if left < timeout:
                timeout, cut_short = left, True
        try:
            conn = await self.connect_direct(
                max(0.0, timeout), explorer=explorer, cut_short=cut_short
            )
        except WaitTimeout as exc:
            if not cut_short:
                return False  # reported; the breaker decides the next admission
            state.abandon_probe()
            state.acquire_timed_out()
            raise state.deadline_error(exc, "acquire", AcquireTimeout) from exc
        except Exception:
            return False  # reported; the breaker decides the next admission
        except BaseException:
            state.abandon_probe()
            raise
        try:
            pool = self.pool or await self._pool_for_more()
        except BaseException:
            await conn.close()
            raise
        await pool.adopt(conn)
        return True

    async def apply_fleet_cap(self, cap: int | None) -> None:
        """The fleet sampler's share: the pool's limit, then idle connections above it."""
        wanted = self.state.wanted_limit()
        if wanted is not None:
            await self._apply_limit(wanted)
        pool = self.pool
        if pool is not None:
            await pool.shrink_to(cap)

    async def _apply_limit(self, wanted: int) -> None:
        async with self._resize_lock:
            pool = self.pool
            if pool is None or self.state.applied_limit == wanted:
                return
            await pool.resize(min(self.settings.min_size, wanted), wanted)
            self.state.limit_applied(wanted)

    # --- after failures ------------------------------------------------------------------------
    async def after_failure(self, kind: FailureKind) -> None:
        """A read-only server (failover) makes every connection useless: drain them.

        Connections of a restarted or killed server need no sweep: each is
        found dead by a poll when it is next checked out.
        """
        if kind is FailureKind.FAILOVER:
            for hook in self.failover_hooks:
                hook()
            await self.drain(CloseReason.FAILOVER, "server is read-only (failover)")

    async def drain(self, reason: CloseReason, why: str) -> None:
        """Close every idle connection now and the others when returned; reconnect.

        A caller that finds a drain already running waits for it: it must not take
        a connection the drain is about to close (one of a demoted primary's)."""
        pool = self.pool
        if pool is None:
            if self._solo is not None:
                self.state.log(
                    logging.WARNING,
                    "%s: closing the connection; the next call reconnects",
                    why,
                    event="reconnect",
                    reason=reason.value,
                )
                await self._close_solo(reason)
            return
        if pool.closed:
            return
        if not self._drain_flight.running:
            if monotonic() - self._drained_at < DRAIN_COALESCE:
                return  # one just finished: every connection it saw is gone or going
            self.state.log(
                logging.WARNING,
                "%s: draining every connection and reconnecting",
                why,
                event="reconnect",
                reason=reason.value,
            )
        await self._drain_flight.run(lambda: pool.drain_for(reason), None)
        self._drained_at = monotonic()

    async def read_only_server(self, lease: AsyncLease) -> None:
        """*lease*'s server refused a write as read-only (25006 outside a read-only
        transaction of the caller's): a failover. Close its connection before it
        can be handed out again, then drain the rest."""
        if not lease.lost:
            await lease.conn.close()
        await self.after_failure(FailureKind.FAILOVER)  # the caller's retry path coalesces

    # --- holding a connection for the user -----------------------------------------------------
    @asynccontextmanager
    async def held(self, lease: AsyncLease, site: object) -> AsyncIterator[AsyncLease]:
        """Report once if the caller holds *lease* past ``leak_threshold`` (*site*: where
        it was acquired, as ``str()`` gives it); release after, and count the user's
        acquire wait and held time."""
        now = monotonic()
        leak = self.watchdog.arm(now + self.settings.leak_threshold, self.state.leaked, site, now)
        try:
            yield lease
        finally:
            self.watchdog.disarm(leak)
            self.state.lease_returned(lease.acquire_wait, await lease.release())

    def lend(
        self, lease: AsyncLease, site: object, deadline: float | None, *, row_factory: Any
    ) -> AsyncCheckout:
        """*lease* as an `AsyncCheckout` with the consumer's *row_factory* (None: dict
        rows), watched for leaks (*site*: where it was checked out, formatted by
        ``str()`` only if a leak is reported). The caller sets autocommit first.

        With no explicit *deadline*, the lease's ``default_timeout`` backstop ends here
        (it bounded getting the connection); its watchdog entry becomes the leak watch."""
        if row_factory is not None:
            lease.conn.row_factory = row_factory
        return AsyncCheckout(self, lease, site, deadline)

    async def close(self, timeout: float) -> None:
        self._loop_moved()  # a pool of a closed loop is abandoned, not awaited
        self._closed = True
        await self._close_solo(CloseReason.CLOSE)
        pool = self.pool
        if pool is not None:
            await pool.close(timeout=max(0.0, timeout))
        self.watchdog.close()


class AsyncCheckout:
    """A pooled connection lent to a consumer until `release` or `discard`.

    Created by `AsyncDatabase.checkout`. ``connection`` is the psycopg
    connection; ``deadline`` the monotonic time its socket is shut down at (an
    explicit deadline), or None. Release exactly once; a second call is a no-op.

    The leak watch is the watchdog's coarse one (a dict entry, no timer per
    checkout): a checkout held past ``leak_threshold`` is reported within
    `COARSE_TICK` after it.
    """

    __slots__ = (
        "_connections",
        "_leak",
        "_lease",
        "_site",
        "connection",
        "deadline",
        "released",
    )

    def __init__(
        self,
        connections: AsyncConnections,
        lease: AsyncLease,
        site: object,
        deadline: float | None,
    ) -> None:
        self._connections = connections
        self._lease = lease
        self._site = site
        self.connection = lease.conn
        self.deadline = deadline
        self.released = False
        leak_at = lease.acquired_at + connections.settings.leak_threshold
        if deadline is None and lease.armed:
            self._leak = lease.backstop_to_watch(leak_at, self._leaked)
        else:  # an explicit deadline's timer stays; or no backstop was armed
            self._leak = connections.watchdog.watch(leak_at, self._leaked)

    def _leaked(self) -> None:
        self._connections.state.leaked(self._site, self._lease.acquired_at)

    @property
    def lost(self) -> bool:
        """The connection is broken or closed (the server, the network or a sever)."""
        return self._lease.lost

    async def release(self) -> None:
        """Roll back whatever is open, put pgwarden's shape back (autocommit, dict
        rows, default isolation and access mode) and return it to the pool."""
        if self.released:
            return
        conn = self.connection
        lost = self._lease.lost
        if not lost:
            if _shape_changed(conn):
                try:
                    await _restore_shape(conn)
                except psycopg.Error:
                    await conn.close()  # a connection that cannot be reset is not reused
                    lost = True
                except BaseException:
                    # Interrupted half-way (cancelled, KeyboardInterrupt): its shape is
                    # unknown, so it is closed, and still given back (never leaked).
                    await conn.close()
                    await self._finish(True)
                    raise
            elif conn.row_factory is not dict_row:
                conn.row_factory = dict_row
        await self._finish(lost)

    async def discard(self) -> None:
        """Close the connection (the consumer found it unusable: an invalidated
        ORM connection) and let the pool open a replacement."""
        if self.released:
            return
        self._connections.state.connection_closed(CloseReason.BROKEN.value)
        await self.connection.close()
        await self._finish()

    async def _finish(self, lost: bool | None = None) -> None:
        self.released = True
        connections = self._connections
        connections.watchdog.unwatch(self._leak)
        lease = self._lease
        used: float | None = None
        try:
            used = await lease.release(lost=lost)
        finally:
            # One call (one lock) for the hold's wait and use times and the end of it.
            connections.state.leave(
                acquire_wait=None if used is None else lease.acquire_wait, used=used
            )


def _shape_changed(conn: PgwAsyncConnection) -> bool:
    """Does putting pgwarden's shape back need a setter or a rollback (not only the
    row factory, a plain attribute)?"""
    return (
        conn.pgconn.transaction_status != TransactionStatus.IDLE
        or not conn.autocommit
        or conn.isolation_level is not None
        or conn.read_only is not None
        or conn.deferrable is not None
    )


async def _restore_shape(conn: PgwAsyncConnection) -> None:
    """pgwarden's shape back on a connection a consumer had. Only what differs is
    set: the reads are plain attributes, the setters take psycopg's lock."""
    if conn.pgconn.transaction_status != TransactionStatus.IDLE:
        await conn.rollback()
    if not conn.autocommit and not autocommit_in_place(conn, True):
        await conn.set_autocommit(True)
    if conn.isolation_level is not None:
        await conn.set_isolation_level(None)
    if conn.read_only is not None:
        await conn.set_read_only(None)
    if conn.deferrable is not None:
        await conn.set_deferrable(None)
    if conn.row_factory is not dict_row:
        conn.row_factory = dict_row
