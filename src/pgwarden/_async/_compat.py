"""asyncio primitives the async shell needs; `_sync/_compat.py` mirrors the names.

Everything that differs between asyncio and threads lives here, so that the
rest of the shell can be converted to sync code by token replacement.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from pgwarden._signals import DEFAULT_SIGNALS, chain_signal

__all__ = ["Lock", "SingleFlight", "Watchdog", "on_signals", "sever", "sleep", "spawn"]

T = TypeVar("T")

sleep = asyncio.sleep
Lock = asyncio.Lock


class SingleFlight(Generic[T]):
    """Run one shared call at a time; concurrent callers await the same outcome.

    Cancelling a waiter does not cancel the shared call (it is shielded), so
    one impatient caller cannot fail a warmup that others are waiting on.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[T] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._task
        if task is None:
            task = self._task = asyncio.ensure_future(_call(fn))
            task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[T]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter already got it


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def sever(fileno: int) -> None:
    """Shut down the socket behind *fileno* so a read blocked on it fails now.

    Used when a deadline passes and the server does not answer (a blackholed
    network): a cancel request would hang the same way, a shutdown does not.
    """
    try:
        dup = os.dup(fileno)
    except OSError:
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class Watchdog:
    """Runs a callback at a monotonic time unless disarmed first (deadlines, leaks)."""

    def arm(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        """Schedule ``callback(*args)`` at monotonic time *when*; returns a handle."""
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + (when - _monotonic()), callback, *args)

    @staticmethod
    def disarm(handle: Any) -> None:
        handle.cancel()

    def close(self) -> None:
        """Nothing to stop: timers live on the event loop."""


def spawn(fn: Callable[[], Awaitable[Any]]) -> None:
    """Run *fn()* in the background; exceptions are logged, never lost silently."""
    task = asyncio.ensure_future(_call(fn))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    task.add_done_callback(_log_failure)


_BACKGROUND: set[asyncio.Future[Any]] = set()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        import logging

        logging.getLogger("pgwarden").warning(
            "background task failed: %s", type(task.exception()).__name__
        )


def _monotonic() -> float:
    import time

    return time.monotonic()


def on_signals(signals: Sequence[int] | None, drain: Callable[[], Awaitable[Any]]) -> None:
    """On each signal: run *drain()* on the running loop, then chain to the old handler."""
    loop = asyncio.get_running_loop()
    for signum in signals if signals is not None else DEFAULT_SIGNALS:
        previous = signal.getsignal(signum)

        async def drain_then_chain(signum: int = signum, previous: Any = previous) -> None:
            await drain()
            chain_signal(previous, signum)

        loop.add_signal_handler(signum, spawn, drain_then_chain)
