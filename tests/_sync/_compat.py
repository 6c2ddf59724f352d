"""Thread primitives mirroring `tests/_async/_compat.py` name for name."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, overload

__all__ = ["gather", "run", "sleep", "spawn"]

T = TypeVar("T")

sleep = time.sleep


def run(fn: Callable[[], T]) -> T:
    """Run the test body: in the sync twin it is a plain call."""
    return fn()


class Worker(threading.Thread, Generic[T]):
    """A thread running ``fn(*args)``; `join` returns its result or re-raises its error."""

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        super().__init__(name=f"test-{getattr(fn, '__name__', 'worker')}", daemon=True)
        self._fn = fn
        self._args = args
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        # Caught here, so that a failing worker is not an unhandled thread exception.
        try:
            self._result = self._fn(*self._args)
        except BaseException as exc:
            self._error = exc

    def join(self, timeout: float | None = None) -> T:  # type: ignore[override]
        super().join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def spawn(fn: Callable[..., T], args: tuple[Any, ...] = ()) -> Worker[T]:
    """Start ``fn(*args)`` in a thread; `gather` joins it."""
    worker = Worker(fn, args)
    worker.start()
    return worker


@overload
def gather(*tasks: Worker[T], return_exceptions: Literal[False] = False) -> list[T]: ...


@overload
def gather(*tasks: Worker[T], return_exceptions: Literal[True]) -> list[T | BaseException]: ...


def gather(*tasks: Worker[T], return_exceptions: bool = False) -> list[Any]:
    """Join all *tasks*; their results in order, or the first one's error.

    Every task is joined before an error is raised, so none outlives the test.
    With ``return_exceptions=True`` errors are returned in place of results.
    """
    outcomes: list[Any] = []
    error: BaseException | None = None
    for task in tasks:
        try:
            outcomes.append(task.join())
        except BaseException as exc:
            outcomes.append(exc)
            error = exc if error is None else error
    if error is not None and not return_exceptions:
        raise error
    return outcomes
