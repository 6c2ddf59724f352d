"""asyncio primitives of the async shell; `_sync/_compat.py` mirrors every name.

Everything that differs between asyncio and threads lives here, so the rest of
the shell converts to sync code by token replacement (scripts/async_to_sync.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from time import monotonic
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

sleep = asyncio.sleep
Lock = asyncio.Lock
logger = logging.getLogger("pgwarden")

#: How late a coarse `Watchdog.watch` entry may fire.
COARSE_TICK = 0.5


class SingleFlight(Generic[T]):
    """One shared call at a time; every caller waits for its outcome, each up to its
    own *timeout*.

    The shared call runs as its own task, so neither a caller that gives up
    (`WaitTimeout`) nor one that is cancelled stops it for the others.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[T] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def run(self, fn: Callable[[], Awaitable[T]], timeout: float | None) -> T:
        task = self._task
        if task is None:
            task = self._task = asyncio.ensure_future(_call(fn))
            task.add_done_callback(self._done)
        if timeout is None:
            return await asyncio.shield(task)
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout))
        except asyncio.TimeoutError:
            raise WaitTimeout from None

    def _done(self, task: asyncio.Task[T]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


async def run_within(fn: Callable[[], Awaitable[T]], timeout: float) -> T:
    """``await fn()``, giving up with `WaitTimeout` after *timeout* seconds.

    Used for the connects made on behalf of a call (warmup, breaker probe),
    which libpq can bound only in whole seconds of at least two.
    """
    try:
        return await asyncio.wait_for(fn(), max(0.0, timeout))
    except asyncio.TimeoutError:
        raise WaitTimeout from None


_pool_logger = logging.getLogger("psycopg.pool")


async def run_pool_worker(queue: Any) -> None:
    """psycopg_pool's maintenance worker (``AsyncConnectionPool.worker``), except that
    cancelling the worker itself ends it.

    psycopg_pool swallows a CancelledError both in its worker and in the connect
    task it runs (which logs "error connecting" and schedules another attempt), so
    a worker cancelled mid-connect never ended: the cancellation ``asyncio.run()``
    sends every task at exit then waited forever (a handler that returned without
    closing its handle hung its process). Here the worker ends once it is being
    cancelled, whoever swallowed the CancelledError. A task's own cancellation, with
    the worker not being cancelled, is still logged and survived, as there.
    (Python 3.10 has no ``Task.cancelling()``: a swallowed cancellation goes unseen.)
    """
    # Imported here: a handle that never builds a pool never imports psycopg_pool.
    from psycopg_pool.pool_async import StopWorker

    current = asyncio.current_task()
    cancelling: Callable[[], int] = getattr(current, "cancelling", lambda: 0)
    while True:
        task = await queue.get()
        if isinstance(task, StopWorker):
            return
        try:
            await task.run()
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            _pool_logger.warning("task run %s failed: %s: %s", task, type(exc).__name__, exc)
        except Exception as exc:
            _pool_logger.warning("task run %s failed: %s: %s", task, type(exc).__name__, exc)
        if cancelling():
            raise asyncio.CancelledError


def running_loop() -> object:
    """The event loop this call runs on (what the shell's pool and tasks belong to)."""
    return asyncio.get_running_loop()


def loop_gone(loop: object) -> bool:
    """*loop* is closed: an earlier ``asyncio.run()`` that created our pool has ended."""
    return isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()


class Watchdog:
    """Runs a callback at a monotonic time unless disarmed first (deadlines, leaks).

    `arm` is exact: a loop timer (``call_at``) per entry. `watch` is coarse and
    cheaper (a dict entry; one sweeper timer per handle while entries exist) and
    fires up to `COARSE_TICK` late: for the ``default_timeout`` backstop that
    every call carries, where a timer per call would be paid on the hot path.
    """

    def __init__(self) -> None:
        self._coarse: dict[int, tuple[float, Callable[[], object]]] = {}
        self._next = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeper_loop: asyncio.AbstractEventLoop | None = None

    def arm(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        """Schedule ``callback(*args)`` at monotonic time *when*; returns a handle."""
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + (when - monotonic()), callback, *args)

    @staticmethod
    def disarm(handle: Any) -> None:
        handle.cancel()

    def watch(self, when: float, callback: Callable[[], object]) -> int:
        """Run ``callback()`` within `COARSE_TICK` after *when* unless `unwatch`ed."""
        self._next += 1
        token = self._next
        self._coarse[token] = (when, callback)
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper_loop is not loop:
            self._sweeper_loop = loop
            self._sweeper = loop.call_later(COARSE_TICK, self._sweep)
        return token

    def unwatch(self, token: int) -> None:
        self._coarse.pop(token, None)

    def rewatch(self, token: int, when: float, callback: Callable[[], object]) -> bool:
        """Point the coarse entry *token* at ``callback()`` at *when* (one entry instead
        of an `unwatch` and a `watch`); False if it fired or was unwatched already."""
        if token not in self._coarse:
            return False
        self._coarse[token] = (when, callback)
        return True

    def _sweep(self) -> None:
        self._sweeper = None
        now = monotonic()
        due = [token for token, (when, _) in self._coarse.items() if when <= now]
        for token in due:
            _, callback = self._coarse.pop(token)
            try:
                callback()
            except Exception as exc:  # a failing callback must not stop the sweeps
                logger.warning("watchdog callback failed: %s", type(exc).__name__)
        if self._coarse and self._sweeper_loop is not None:
            self._sweeper = self._sweeper_loop.call_later(COARSE_TICK, self._sweep)

    def close(self) -> None:
        """Drop coarse entries; exact timers live on the event loop."""
        self._coarse.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class Background:
    """``fn()`` started now as its own task; `wait` for it, each waiter up to a timeout.

    For work started from a timer callback (which cannot await) that a later
    step must know has finished: the cancel request sent at a deadline.
    Failures are logged, never raised.
    """

    __slots__ = ("_task",)

    def __init__(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self._task = asyncio.ensure_future(_call(fn))
        _BACKGROUND.add(self._task)
        self._task.add_done_callback(_BACKGROUND.discard)
        self._task.add_done_callback(_log_failure)

    async def wait(self, timeout: float) -> bool:
        """True once ``fn()`` has finished (however it ended), False after *timeout*."""
        if self._task.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        except Exception:  # logged by _log_failure
            return True
        return True


def spawn(fn: Callable[[], Awaitable[Any]]) -> None:
    """Run *fn()* in the background; exceptions are logged, never lost silently."""
    task = asyncio.ensure_future(_call(fn))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    task.add_done_callback(_log_failure)


_BACKGROUND: set[asyncio.Future[Any]] = set()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("background task failed: %s", type(task.exception()).__name__)


def on_signals(signals: Sequence[int] | None, drain: Callable[[], Awaitable[Any]]) -> None:
    """On each signal: run *drain()* on the running loop, then chain to the old handler."""
    loop = asyncio.get_running_loop()
    for signum in signals if signals is not None else DEFAULT_SIGNALS:
        previous = signal.getsignal(signum)

        async def drain_then_chain(signum: int = signum, previous: Any = previous) -> None:
            await drain()
            chain_signal(previous, signum)

        loop.add_signal_handler(signum, spawn, drain_then_chain)
