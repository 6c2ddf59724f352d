"""Connection hygiene: when to check a connection, and when to retire it.

A ``SELECT 1`` before every checkout costs a round trip per request. Instead,
only a connection that sat idle longer than a short window is validated (a
firewall, PgBouncer or the server may have dropped it meanwhile), and so is
every connection after the whole process was frozen (a serverless instance
between invocations, a suspended VM), which the idle timer alone can miss.
Lifetimes are jittered so that processes started together do not all
reconnect in the same second.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["GapDetector", "jittered_lifetime", "needs_validation"]


def needs_validation(idle_for: float, window: float) -> bool:
    """Should a connection idle for *idle_for* seconds be checked before use?

    True when it was idle longer than *window*. ``window=0`` validates every
    checkout; ``window=math.inf`` never does.
    """
    return idle_for > window


class GapDetector:
    """Notices that the process was frozen or suspended.

    :meth:`observe` returns True when the time since the previous call, by
    *either* clock, exceeds ``threshold``. Both are needed: on Linux the
    monotonic clock stops while a VM or container is suspended, so only the
    wall clock shows the gap; the wall clock can be stepped by NTP, and then
    the monotonic one is the honest witness. A large backwards step of the
    wall clock also counts: a wasted validation is cheaper than a missed one.
    The first call only records the time and returns False.

    ``threshold`` is fixed (``Final``); the last readings are private state.
    """

    __slots__ = ("_last_mono", "_last_wall", "threshold")
    threshold: Final[float]

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._last_mono: float | None = None
        self._last_wall = 0.0

    def __repr__(self) -> str:
        return f"GapDetector(threshold={self.threshold!r})"

    def observe(self, mono_now: float, wall_now: float) -> bool:
        last_mono, last_wall = self._last_mono, self._last_wall
        self._last_mono, self._last_wall = mono_now, wall_now
        if last_mono is None:
            return False
        return mono_now - last_mono > self.threshold or abs(wall_now - last_wall) > self.threshold


def jittered_lifetime(max_lifetime: float, jitter: float, rand: float) -> float:
    """A connection's lifetime: ``max_lifetime * (1 - jitter * rand)``.

    *jitter* in ``[0, 1]`` is the largest fraction taken off; *rand* is a
    uniform draw in ``[0, 1)``. The result is within
    ``[max_lifetime * (1 - jitter), max_lifetime]``, so it never exceeds the
    configured maximum (which may be a hard limit set by the provider).
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    if math.isinf(max_lifetime):
        return max_lifetime
    return max_lifetime * (1.0 - jitter * rand)
