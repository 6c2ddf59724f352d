"""Thread primitives mirroring `_async/_compat.py` name for name."""

from __future__ import annotations

import heapq
import itertools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from pgwarden._async._compat import sever
from pgwarden._signals import DEFAULT_SIGNALS, chain_signal

__all__ = ["Lock", "SingleFlight", "Watchdog", "on_signals", "sever", "sleep", "spawn"]

T = TypeVar("T")

sleep = time.sleep
Lock = threading.Lock


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """Run one shared call at a time; concurrent callers wait for the same outcome."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _Flight[T] | None = None

    @property
    def running(self) -> bool:
        return self._current is not None

    def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            flight = self._current
            leader = flight is None
            if flight is None:
                flight = self._current = _Flight()
        if leader:
            try:
                flight.result = fn()
            except BaseException as exc:
                flight.error = exc
            finally:
                with self._lock:
                    self._current = None
                flight.done.set()
        else:
            flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.result  # type: ignore[return-value]


class Watchdog:
    """One daemon thread per handle that runs callbacks at their time (deadlines, leaks).

    Started lazily on first use, so handles that never set a deadline pay
    nothing. Arming and disarming cost a heap push and a set removal.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, when: float, callback: Callable[..., object], *args: Any) -> int:
        token = next(self._ids)
        with self._cond:
            heapq.heappush(self._heap, (when, token, callback, args))
            self._live.add(token)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="pgwarden-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][1] == token:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._live.discard(token)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when, token, callback, args = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(token)
                try:
                    callback(*args)
                except Exception as exc:  # a failing callback must not kill the thread
                    import logging

                    logging.getLogger("pgwarden").warning(
                        "watchdog callback failed: %s", type(exc).__name__
                    )


def spawn(fn: Callable[[], Any]) -> None:
    """Run *fn* in a daemon thread; failures are logged, never raised."""

    def runner() -> None:
        try:
            fn()
        except Exception as exc:
            import logging

            logging.getLogger("pgwarden").warning("background task failed: %s", type(exc).__name__)

    threading.Thread(target=runner, name="pgwarden-bg", daemon=True).start()


def on_signals(signals: Sequence[int] | None, drain: Callable[[], Any]) -> None:
    """On each signal: run *drain()* in the handler, then chain to the old handler."""
    for signum in signals if signals is not None else DEFAULT_SIGNALS:
        previous = signal.getsignal(signum)

        def handler(received: int, frame: Any, previous: Any = previous) -> None:
            drain()
            chain_signal(previous, received, frame)

        signal.signal(signum, handler)
