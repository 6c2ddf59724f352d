"""Chaining to the signal handler that was installed before pgwarden's, and signals as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def chain_signal(previous: Any, signum: int, frame: FrameType | None = None) -> None:
    """Do what the previous handler would have done for *signum*.

    A Python callable is called; ``SIG_DFL`` is restored and the signal
    re-delivered (so the default action, such as termination, still happens:
    that is the previous behaviour, not pgwarden exiting); ``SIG_IGN`` and
    ``None`` do nothing.
    """
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def signals_as_interrupt(names: tuple[str, ...] = ("SIGTERM",)) -> Iterator[None]:
    """While inside, the signals *names* (those this platform has) raise
    ``KeyboardInterrupt``, as Ctrl-C does, so ``finally`` blocks clean up (the servers a
    command started); the previous handlers come back on exit. Outside the main thread,
    where Python cannot install handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    for name in names:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
