"""Chaining to the signal handler that was installed before pgwarden's."""

from __future__ import annotations

import os
import signal
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
