"""LISTEN/NOTIFY on one dedicated connection per handle, re-established after any loss.

`Listener` is the I/O shell around `pgwarden.core.listen.ListenBook`, which holds
every decision (see its theory of operation). One background run (a task; a
thread in the sync shell) owns the listener connection: it connects outside the
pool with the handle's connect parameters and credentials, LISTENs to every
wanted channel, waits for notifications in short polls (so that new channels
are LISTENed within `POLL` seconds) and sends a heartbeat every `HEARTBEAT`
seconds, which also asks whether the server is still a primary (a silent
network is found by the sever timer, not by TCP hours later; a fenced old
primary by its read-only state). Every statement on it is bounded: its socket
is shut down `statement_bound` seconds after the statement was sent. When the connection is lost it
reconnects with short bounded backoff and re-LISTENs, and each subscriber
that was active gets one `Gap`. The run ends when nobody listens any more
(closing the connection) and starts again with the next subscription.

The book and every subscriber's mailbox share one lock (`Listener._lock`), held
only for bookkeeping, never across I/O or a callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgwarden._async._compat import Background, Watchdog, run_within
from pgwarden._async.connection import PgwAsyncConnection
from pgwarden._handle.config import connect_kwargs, libpq_connect_timeout
from pgwarden._handle.net import sever
from pgwarden._handle.state import HandleState
from pgwarden.core.classify import FailureKind, Phase, classify_failure
from pgwarden.core.listen import (
    Gap,
    ListenBook,
    ListenEvent,
    Notification,
    off_primary,
    reconnect_delay,
    wants_primary,
)
from pgwarden.errors import DeadlineExceeded, HandleClosed

if True:  # ASYNC
    import asyncio
    from asyncio import Event

    def _owner() -> Any:
        """What the listener's run belongs to: the running event loop."""
        return asyncio.get_running_loop()

    def _set_from_anywhere(event: Event, owner: Any) -> None:
        """Set *event*, which belongs to the loop *owner*, from any thread (a snapshot
        hook's or a signal closer's)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if owner is None or running is owner:
            event.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            owner.call_soon_threadsafe(event.set)

    async def _wait(event: Event, timeout: float | None) -> bool:
        """Wait for *event* up to *timeout* seconds (None: forever); is it set?"""
        if timeout is None:
            await event.wait()
            return True
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return event.is_set()
        return True
else:
    from threading import Event

    def _owner() -> Any:
        """What the listener's run belongs to: nothing in particular with threads."""
        return None

    def _set_from_anywhere(event: Event, owner: Any) -> None:
        """Set *event* from any thread."""
        event.set()

    def _wait(event: Event, timeout: float | None) -> bool:
        """Wait for *event* up to *timeout* seconds (None: forever); is it set?"""
        return event.wait(None if timeout is None else max(0.0, timeout))


T = TypeVar("T")

#: ``Callback[None]``: a callback for each event, run on the listener (awaited on its
#: task in the async shell, called on its thread in the sync one), one at a time.
Callback: TypeAlias = Callable[[ListenEvent], Awaitable[T]]

__all__ = ["HEARTBEAT", "MAX_PENDING", "POLL", "Callback", "Listener", "Subscription"]

logger = logging.getLogger("pgwarden")

#: The longest a notification wait lasts before the listener looks for new channels.
POLL = 0.1
#: Every this many seconds the listener proves its connection with a round trip.
HEARTBEAT = 5.0
#: Events a subscriber may have waiting; past it they become one overflow `Gap`.
MAX_PENDING = 10_000


class Subscription:
    """A subscription to some channels (from `AsyncDatabase.listen`).

    Open it (``async with``, or ``await sub.open()``); it returns once every channel
    is LISTENed on the server, so each notification sent from then on is delivered
    exactly once, or a `Gap` says some may have been missed. Iterate it (``async
    for event in sub``) or, with a *callback*, have each event passed to it on the
    listener. Iteration ends when the subscription or the handle is closed.
    """

    def __init__(
        self,
        listener: Listener,
        channels: tuple[str, ...],
        callback: Callback[None] | None,
        timeout: float | None,
    ) -> None:
        self.channels = channels
        self.callback = callback
        self._listener = listener
        self._timeout = timeout
        self._id: int | None = None
        self._pending: deque[ListenEvent] = deque()
        self._arrived = Event()  # set when an event is pending or the subscription ended
        self._activated = Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> Subscription:
        """Subscribe and wait until every channel is LISTENed, up to *timeout* (given
        to ``listen``; default the handle's ``connect_timeout`` plus ``ready_timeout``).
        `DeadlineExceeded` if the listener could not get there in time (the
        subscription is then closed); `HandleClosed` on a closed handle."""
        if self._id is not None or self._closed:
            raise RuntimeError("a subscription is opened once")
        await self._listener.subscribe(self)
        return self

    async def get(self, timeout: float | None = None) -> ListenEvent | None:
        """The next event, waiting up to *timeout* seconds (None: until one arrives
        or the subscription ends); None if there was none."""
        give_up_at = None if timeout is None else monotonic() + timeout
        while True:
            with self._listener._lock:
                if self._pending:
                    return self._pending.popleft()
                if self._closed:
                    return None
                self._arrived.clear()
            left = None if give_up_at is None else give_up_at - monotonic()
            if left is not None and left <= 0:
                return None
            await _wait(self._arrived, left)

    async def close(self) -> None:
        """Unsubscribe (the channel is UNLISTENed when nobody else wants it); idempotent."""
        self._listener.unsubscribe(self)

    if True:  # ASYNC

        def __aiter__(self) -> Subscription:
            return self

        async def __anext__(self) -> ListenEvent:
            event = await self.get()
            if event is None:
                raise StopAsyncIteration
            return event
    else:

        def __iter__(self) -> Subscription:
            return self

        def __next__(self) -> ListenEvent:
            event = self.get()
            if event is None:
                raise StopIteration
            return event

    async def __aenter__(self) -> Subscription:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Subscription {', '.join(self.channels)}{' closed' if self._closed else ''}>"


class Listener:
    """The handle's listener: its subscriptions and its one dedicated connection."""

    def __init__(self, state: HandleState, watchdog: Watchdog) -> None:
        self.state = state
        self.settings = state.settings
        self._watchdog = watchdog
        # One lock for the book and every mailbox (a threading lock in both shells: it
        # is held for bookkeeping only, never across an await).
        self._lock = threading.Lock()
        self._book = ListenBook()
        self._subscriptions: dict[int, Subscription] = {}
        self._run: Background | None = None  # the current run, while one is going
        self._wake = Event()  # set by close(): ends a reconnect backoff early
        self._conn: PgwAsyncConnection | None = None
        self._random = random.Random()
        self._pid = os.getpid()
        self._owner: Any = None  # the event loop of the current run (async shell)
        self._check_due = False  # the handle saw a failover: heartbeat at the next poll
        try:
            attrs = conninfo_to_dict(self.settings.url or "").get("target_session_attrs")
        except psycopg.Error:
            attrs = None  # the connect reports a malformed URL, without echoing it
        self._primary_wanted = wants_primary(None if attrs is None else str(attrs))

    def check_soon(self) -> None:
        """The handle found a server read-only (25006, a failover): run the heartbeat's
        primary check at the next poll (within ``POLL``) instead of waiting out
        ``HEARTBEAT``, since a fenced old primary keeps the listener's session open
        and silent. No I/O here: it is called from the handle's failure path."""
        with self._lock:
            self._check_due = True

    @property
    def statement_bound(self) -> float:
        """How long one LISTEN, UNLISTEN or heartbeat may take before the socket is cut."""
        return self.settings.connect_timeout

    # --- subscriptions -------------------------------------------------------------------------
    def subscription(
        self, channels: tuple[str, ...], callback: Callback[None] | None, timeout: float | None
    ) -> Subscription:
        return Subscription(self, channels, callback, timeout)

    async def subscribe(self, sub: Subscription) -> None:
        self.state.check_accepting()
        with self._lock:
            if self._book.closing:
                raise HandleClosed(f"the database handle for {self.settings.safe_url} is closed")
            sid, active = self._book.subscribe(sub.channels)
            sub._id = sid
            self._subscriptions[sid] = sub
            if active:
                sub._activated.set()
            if self._run is None:
                self._wake.clear()
                self._owner = _owner()
                self._run = Background(self._serve_forever)
        timeout = sub._timeout
        if timeout is None:
            timeout = self.settings.connect_timeout + self.settings.ready_timeout
        try:
            activated = await _wait(sub._activated, timeout)
        except BaseException:  # cancelled while waiting: do not leave it subscribed
            self.unsubscribe(sub)
            raise
        if activated:
            return
        with self._lock:
            error = self._book.last_error
            active = self._book.is_active(sid)
        if active:  # became active between the wait's end and the lock
            return
        self.unsubscribe(sub)
        raise DeadlineExceeded(
            f"deadline exceeded during listen ({error or 'the listener is not connected yet'})"
        )

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub._id is not None:
                self._book.unsubscribe(sub._id)
                self._subscriptions.pop(sub._id, None)
            sub._closed = True
            sub._arrived.set()

    def stats(self) -> dict[str, Any]:
        """The ``stats()["listen"]`` section (see `ListenBook.stats`)."""
        with self._lock:
            return self._book.stats()

    async def close(self, timeout: float) -> None:
        """End every subscription, stop the run and close its connection, within
        *timeout* (past it, the connection's socket is shut down)."""
        with self._lock:
            self._book.close()
            subs = list(self._subscriptions.values())
            self._subscriptions.clear()
            run = self._run
            for sub in subs:
                sub._closed = True
                sub._arrived.set()
            self._wake.set()
        if run is None:
            return
        if not await run.wait(timeout):
            conn = self._conn
            if conn is not None:
                _sever(conn)
            await run.wait(min(1.0, self.settings.connect_timeout))

    def forget(self) -> None:
        """The handle forgot its state (`AsyncDatabase._forget_after_fork`): in a forked
        child, nothing (the parent's socket is not ours); after a serverless snapshot
        reset, end every subscription and cut the connection's socket, from any
        thread and without waiting, so that no session outlives the reset."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._book.close()
            subs = list(self._subscriptions.values())
            self._subscriptions.clear()
            for sub in subs:
                sub._closed = True
            conn = self._conn
        for sub in subs:
            _set_from_anywhere(sub._arrived, self._owner)
        _set_from_anywhere(self._wake, self._owner)
        if conn is not None:
            _sever(conn)  # the run finds it broken, sees the book closed, and ends

    # --- the run -------------------------------------------------------------------------------
    async def _serve_forever(self) -> None:
        """Connect, serve, reconnect after a loss; return once nobody listens."""
        try:
            await self._serve_until_idle()
        except BaseException as exc:
            # Cancelled (the loop is going away) or a bug: let the next subscription
            # start a run again, and count the subscribers' loss as an outage.
            with self._lock:
                self._run = None
                self._book.lost(time.time(), f"listener stopped: {type(exc).__name__}")
            raise

    async def _serve_until_idle(self) -> None:
        retry_number = 0
        while True:
            with self._lock:
                if self._stop_if_idle():
                    return
            try:
                conn = await self._connect()
            except Exception as exc:
                retry_number += 1
                kind = self._lost(exc, connect_failed=True)
                delay = reconnect_delay(retry_number, self._random.random(), kind)
                await _wait(self._wake, delay)
                continue
            self._conn = conn
            try:
                await self._serve(conn)
                return  # nobody listens any more
            except Exception as exc:
                await self._drain_backlog(conn)
                kind = self._lost(exc)
            finally:
                if self._conn is conn:
                    self._conn = None
                await _close_quietly(conn)
            retry_number = 1
            await _wait(self._wake, reconnect_delay(1, self._random.random(), kind))

    def _stop_if_idle(self) -> bool:
        """Under the lock: end the run if nobody listens (a new subscription starts
        another)."""
        if self._book.plan().stop:
            self._book.stopped()
            self._run = None
            return True
        return False

    async def _connect(self) -> PgwAsyncConnection:
        settings = self.settings
        kwargs = connect_kwargs(settings, pgbouncer=self.state.pgbouncer)
        bound = settings.connect_timeout
        kwargs["connect_timeout"] = libpq_connect_timeout(bound)
        conninfo = settings.url or ""
        conn = await run_within(lambda: PgwAsyncConnection.connect(conninfo, **kwargs), bound)
        with self._lock:
            self._book.connected(conn.info.backend_pid)
        return conn

    async def _serve(self, conn: PgwAsyncConnection) -> None:
        """Keep *conn*'s channels in line with the book and deliver what arrives; return
        once nobody listens (the run ends), raise when the connection fails."""
        checked_at = monotonic()
        while True:
            with self._lock:
                if self._stop_if_idle():
                    return
                plan = self._book.plan()
                check_due, self._check_due = self._check_due, False
            if check_due:
                await self._heartbeat(conn)
                checked_at = monotonic()
            if plan.listen or plan.unlisten:
                statements = [sql.SQL("LISTEN {}").format(sql.Identifier(c)) for c in plan.listen]
                statements += [
                    sql.SQL("UNLISTEN {}").format(sql.Identifier(c)) for c in plan.unlisten
                ]
                await self._bounded(conn, sql.SQL("; ").join(statements))
                await self._listened(plan.listen, plan.unlisten)
            elif monotonic() - checked_at >= HEARTBEAT:
                # Even while notifications flow: a fenced old primary still delivers
                # what is sent to it, while the writers moved to the new one.
                await self._heartbeat(conn)
                checked_at = monotonic()
            async for note in conn.notifies(timeout=POLL):
                await self._deliver(Notification(note.channel, note.payload, note.pid))

    async def _heartbeat(self, conn: PgwAsyncConnection) -> None:
        """A round trip that also asks whether the server is still a primary: after a
        failover that fences the old primary, its sessions stay open but silent."""
        row = await self._bounded(conn, _HEARTBEAT)
        moved = off_primary(
            bool(row and row["standby"]),
            bool(row and row["read_only"] == "on"),
            primary_wanted=self._primary_wanted,
        )
        if moved is not None:
            raise ListenerMoved(moved)

    async def _bounded(
        self, conn: PgwAsyncConnection, query: sql.SQL | sql.Composed
    ) -> dict[str, Any] | None:
        """Run *query* on *conn* (its first row, if any), the socket shut down if no
        answer comes within `statement_bound`."""
        timer = self._watchdog.arm(monotonic() + self.statement_bound, _sever, conn)
        try:
            cur = await conn.execute(query, prepare=False)
            return await cur.fetchone() if cur.description is not None else None
        finally:
            self._watchdog.disarm(timer)

    async def _listened(self, listen: tuple[str, ...], unlisten: tuple[str, ...]) -> None:
        with self._lock:
            activated, gap, recipients = self._book.listened(listen, unlisten, time.time())
            for sid in activated:
                self._subscriptions[sid]._activated.set()
            # Each recipient's gap names its own channels.
            gaps = [(sid, self._book.channels_of(sid)) for sid in recipients]
        if gap is not None:
            self.state.log(
                logging.WARNING,
                "listener re-established; notifications on %s may have been missed (%s)",
                ", ".join(gap.channels),
                gap.reason,
                event="listen_gap",
                channels=list(gap.channels),
            )
            for sid, channels in gaps:
                await self._send(sid, Gap(channels, gap.since, gap.reason))

    async def _deliver(self, note: Notification) -> None:
        with self._lock:
            recipients = self._book.recipients(note.channel)
        for sid in recipients:
            await self._send(sid, note)

    async def _send(self, sid: int, event: ListenEvent) -> None:
        """Into *sid*'s mailbox, or to its callback (outside the lock)."""
        with self._lock:
            sub = self._subscriptions.get(sid)
            if sub is None or sub._closed:
                return
            callback = sub.callback
            if callback is None:
                pending = sub._pending
                if len(pending) >= MAX_PENDING:
                    # Too far behind: what it has not read is replaced by one gap (a
                    # bounded mailbox, and the subscriber still learns it must re-read).
                    self._book.overflowed()
                    pending.clear()
                    pending.append(Gap(sub.channels, time.time(), "overflow"))
                else:
                    pending.append(event)
                sub._arrived.set()
                return
        try:
            await callback(event)
        except Exception as exc:  # one failing callback must not stop the listener
            logger.warning(
                "listen callback failed: %s", type(exc).__name__, extra={"event": "listen_callback"}
            )

    def _lost(self, exc: BaseException, *, connect_failed: bool = False) -> FailureKind:
        """Record a loss (or a failed connect); returns its kind, for the backoff."""
        state = self.state
        reason = state.describe_error(state.redacted_cause(exc))
        kind = kind_of(exc)
        with self._lock:
            first = not self._book.outage_open
            closing = self._book.closing
            self._book.lost(time.time(), reason, connect_failed=connect_failed)
        if closing:
            return kind  # cut on purpose (close, a snapshot): not worth a warning
        if not connect_failed or first:
            state.log(
                logging.WARNING,
                "listener connection lost, reconnecting: %s",
                reason,
                event="listen_lost",
            )
        return kind

    async def _drain_backlog(self, conn: PgwAsyncConnection) -> None:
        """Deliver what psycopg received on a lost connection but not yet handed out
        (notifications that arrived during a LISTEN or a heartbeat)."""
        try:
            async for note in conn.notifies(timeout=0):
                await self._deliver(Notification(note.channel, note.payload, note.pid))
        except Exception as exc:  # the connection is gone: its backlog came first, if any
            logger.debug("listener backlog drained (%s)", type(exc).__name__)


_HEARTBEAT = sql.SQL(
    "SELECT pg_is_in_recovery() AS standby, current_setting('transaction_read_only') AS read_only"
)


class ListenerMoved(Exception):
    """The listener's server no longer gets the notifications (a failover): reconnect."""


def kind_of(exc: BaseException) -> FailureKind:
    """The failure kind of a connect or connection failure (for the backoff)."""
    if isinstance(exc, ListenerMoved):
        return FailureKind.FAILOVER
    try:
        return classify_failure(exc, Phase.CONNECT)
    except Exception:
        return FailureKind.NOTHING_RAN


def _sever(conn: PgwAsyncConnection) -> None:
    """Shut down *conn*'s socket so a read blocked on it fails (a timer callback)."""
    try:
        fileno = conn.pgconn.socket
    except psycopg.Error:
        return
    sever(fileno)


async def _close_quietly(conn: PgwAsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:
        logger.debug("closing the listener connection failed", exc_info=True)
