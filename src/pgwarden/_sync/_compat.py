"""Thread primitives mirroring `_async/_compat.py` name for name (hand-written)."""

from __future__ import annotations

import heapq
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from pgwarden._handle.waits import WaitTimeout
from pgwarden._signals import DEFAULT_SIGNALS, chain_signal

__all__ = [
    "COARSE_TICK",
    "Background",
    "Lock",
    "SingleFlight",
    "WaitTimeout",
    "Watchdog",
    "loop_gone",
    "on_signals",
    "run_pool_worker",
    "run_within",
    "running_loop",
    "sleep",
    "spawn",
]

T = TypeVar("T")

sleep = time.sleep
Lock = threading.Lock
logger = logging.getLogger("pgwarden")

#: How late a coarse `Watchdog.watch` entry may fire.
COARSE_TICK = 0.5


class _Outcome(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self, fn: Callable[[], T]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout: float | None) -> T:
        if not self.done.wait(None if timeout is None else max(0.0, timeout)):
            raise WaitTimeout
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class SingleFlight(Generic[T]):
    """One shared call at a time; every caller waits for its outcome, each up to its
    own *timeout*.

    The shared call runs on its own daemon thread, so a caller that gives up
    (`WaitTimeout`) does not stop it for the others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Outcome[T] | None = None

    @property
    def running(self) -> bool:
        return self._current is not None

    def run(self, fn: Callable[[], T], timeout: float | None) -> T:
        with self._lock:
            flight = self._current
            if flight is None:
                flight = self._current = _Outcome()
                threading.Thread(
                    target=self._lead, args=(flight, fn), name="pgwarden-flight", daemon=True
                ).start()
        return flight.wait(timeout)

    def _lead(self, flight: _Outcome[T], fn: Callable[[], T]) -> None:
        try:
            flight.run(fn)
        finally:
            with self._lock:
                if self._current is flight:
                    self._current = None


def run_within(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` on a helper thread, giving up with `WaitTimeout` after *timeout* seconds.

    Used for the connects made on behalf of a call (warmup, breaker probe),
    which libpq can bound only in whole seconds of at least two. A connection
    that arrives after the caller gave up is closed.
    """
    outcome: _Outcome[T] = _Outcome()
    abandoned = threading.Event()

    def target() -> None:
        outcome.run(fn)
        if abandoned.is_set() and outcome.result is not None:
            close = getattr(outcome.result, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    logger.debug("closing an abandoned connection failed", exc_info=True)

    threading.Thread(target=target, name="pgwarden-connect", daemon=True).start()
    try:
        return outcome.wait(timeout)
    except WaitTimeout:
        abandoned.set()
        if outcome.done.is_set() and outcome.result is not None:
            # Finished between the timeout and the flag: keep it, it is good.
            abandoned.clear()
            return outcome.result
        raise


_pool_logger = logging.getLogger("psycopg.pool")


def run_pool_worker(queue: Any) -> None:
    """psycopg_pool's maintenance worker (``ConnectionPool.worker``), as there: a
    thread is never cancelled (the async twin differs)."""
    # Imported here: a handle that never builds a pool never imports psycopg_pool.
    from psycopg_pool.pool import StopWorker

    while True:
        task = queue.get()
        if isinstance(task, StopWorker):
            return
        try:
            task.run()
        except Exception as exc:
            _pool_logger.warning("task run %s failed: %s: %s", task, type(exc).__name__, exc)


def running_loop() -> object:
    """Threads share one pool for the handle's life: there is no loop to follow."""
    return None


def loop_gone(loop: object) -> bool:
    """Never: see `running_loop`."""
    return False


class Watchdog:
    """One daemon thread per handle that runs callbacks at their time (deadlines, leaks).

    Started lazily on first use. Arming is a heap push; disarming removes the
    token from a set, and the heap is rebuilt from the live entries when dead
    ones outnumber them, so memory stays proportional to what is armed.
    `watch` is coarse and cheaper (a dict entry, no wake-up of the thread unless
    it sleeps with nothing to do) and fires up to `COARSE_TICK` late: for the
    ``default_timeout`` backstop that every call carries.

    Callbacks run on the thread one at a time with the lock released (they may arm
    again), so the lock is a plain one: nothing holding it ever takes it again.
    `disarm`, `unwatch` and a failed `rewatch` still return only once the entry's
    callback, if it is running, has finished (a released lease relies on it: a
    cancel or a sever must not reach a connection already serving someone else).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # wakes the thread
        self._finished = threading.Condition(self._lock)  # a running callback ended
        self._running: int | None = None  # the token whose callback runs now
        self._heap: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._coarse: dict[int, tuple[float, Callable[[], object]]] = {}
        # When the thread's current wait ends; -inf while it runs callbacks (it looks
        # at every entry again before it waits, so no one needs to wake it then).
        self._wake_at = float("inf")

    def arm(self, when: float, callback: Callable[..., object], *args: Any) -> int:
        token = next(self._ids)
        with self._lock:
            heap = self._heap
            if len(heap) > 64 and len(heap) > 2 * len(self._live):
                heap[:] = [entry for entry in heap if entry[1] in self._live]
                heapq.heapify(heap)
            heapq.heappush(heap, (when, token, callback, args))
            self._live.add(token)
            if self._thread is None:
                self._start()
            elif when < self._wake_at:
                # Only a timer due before the thread's current wake-up needs it woken:
                # the lock is held, so the thread is inside its wait and _wake_at is
                # that wait's end. (Notifying on every new earliest timer woke the
                # thread once per call under a deadline.)
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._live.discard(token)
            if self._running == token:
                self._settle(token)

    def watch(self, when: float, callback: Callable[[], object]) -> int:
        """Run ``callback()`` within `COARSE_TICK` after *when* unless `unwatch`ed."""
        token = next(self._ids)
        with self._lock:
            self._coarse[token] = (when, callback)
            if self._thread is None:
                self._start()
            elif self._wake_at > when + COARSE_TICK:
                # It would wake too late for this entry (at most once a tick: while
                # entries exist it wakes every tick by itself). Compared with *when*
                # rather than the clock: no clock reading on the hot path.
                self._cond.notify()
        return token

    def unwatch(self, token: int) -> None:
        with self._lock:
            self._coarse.pop(token, None)
            if self._running == token:
                self._settle(token)

    def rewatch(self, token: int, when: float, callback: Callable[[], object]) -> bool:
        """Point the coarse entry *token* at ``callback()`` at *when* (one entry instead
        of an `unwatch` and a `watch`); False if it fired or was unwatched already."""
        with self._lock:
            if token not in self._coarse:
                if self._running == token:
                    self._settle(token)
                return False
            self._coarse[token] = (when, callback)
            if self._wake_at > when + COARSE_TICK:
                self._cond.notify()  # moved earlier than the thread's wake-up allows
            return True

    def _settle(self, token: int) -> None:
        """Wait (the lock held) until *token*'s running callback has finished, unless
        the callback itself is the caller."""
        if self._thread is threading.current_thread():
            return
        while self._running == token:
            self._finished.wait()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pgwarden-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due = self._take_due(now)
                if due is None:
                    self._sleep(now)
                    continue
                token, callback, args = due
                self._running = token
                self._wake_at = float("-inf")
            try:
                self._run(callback, args)
            finally:
                with self._lock:
                    self._running = None
                    self._finished.notify_all()

    def _take_due(self, now: float) -> tuple[int, Callable[..., object], tuple[Any, ...]] | None:
        """Remove and return one entry due at *now* (called with the lock held)."""
        coarse = self._coarse
        if coarse:
            for token, (when, callback) in coarse.items():
                if when <= now:
                    del coarse[token]
                    return token, callback, ()
        heap, live = self._heap, self._live
        while heap and (heap[0][1] not in live or heap[0][0] <= now):
            _, token, callback, args = heapq.heappop(heap)
            if token in live:
                live.discard(token)
                return token, callback, args
        return None

    def _sleep(self, now: float) -> None:
        """Wait until the next timer, a tick while coarse entries exist, or a notify
        (called with the lock held, nothing due at *now*)."""
        heap = self._heap
        timeout = heap[0][0] - now if heap else None
        if self._coarse:
            timeout = COARSE_TICK if timeout is None else min(timeout, COARSE_TICK)
        self._wake_at = float("inf") if timeout is None else now + timeout
        self._cond.wait(timeout)

    @staticmethod
    def _run(callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception as exc:  # a failing callback must not kill the thread
            logger.warning("watchdog callback failed: %s", type(exc).__name__)


class Background:
    """``fn()`` started now on its own daemon thread; `wait` for it, each waiter up
    to a timeout.

    For work started from a timer callback that a later step must know has
    finished: the cancel request sent at a deadline. Failures are logged, never
    raised.
    """

    __slots__ = ("_done",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), name="pgwarden-bg", daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            logger.warning("background task failed: %s", type(exc).__name__)
        finally:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        """True once ``fn()`` has finished (however it ended), False after *timeout*."""
        return self._done.wait(max(0.0, timeout))


def spawn(fn: Callable[[], Any]) -> None:
    """Run *fn* in a daemon thread; failures are logged, never raised."""

    def runner() -> None:
        try:
            fn()
        except Exception as exc:
            logger.warning("background task failed: %s", type(exc).__name__)

    threading.Thread(target=runner, name="pgwarden-bg", daemon=True).start()


def on_signals(signals: Sequence[int] | None, drain: Callable[[], Any]) -> None:
    """On each signal: run *drain()* in the handler, then chain to the old handler."""
    for signum in signals if signals is not None else DEFAULT_SIGNALS:
        previous = signal.getsignal(signum)

        def handler(received: int, frame: Any, previous: Any = previous) -> None:
            drain()
            chain_signal(previous, received, frame)

        signal.signal(signum, handler)
