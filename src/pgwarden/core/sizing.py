"""Adaptive sizing: AIMD on the local pool's connection limit.

When the server says it is out of connection slots (OVERLOAD), every process
that keeps its pool at full size keeps the server full. So each overload
halves this process's limit (multiplicative decrease), and each quiet period
without one adds a connection back (additive increase), the same rule TCP uses
to share a link. Many processes converge on a fair share of the server's slots
without talking to each other.

A burst of overload errors from one event (twenty requests all refused in the
same instant) must count once, or the limit would collapse to the minimum at
once; so overloads within ``debounce`` seconds of the last decrease only
restart the quiet period.

Behind a pooler, PostgreSQL's own "too many clients" (53300) was forwarded by
the pooler: its connections to the server ran out, and how many connections
this process holds to the pooler does not set that number. Such an overload is
retried after a backoff like any other, but does not lower the limit
(:func:`overload_shrinks`). A pooler's limit on its own clients (PgBouncer's
``max_client_conn``, Supavisor's EMAXCONN, pgpool-II's ``num_init_children``)
does count this process's connections, and shrinks it as before.
"""

from __future__ import annotations

import math

__all__ = ["AdaptiveLimit", "overload_shrinks"]


class AdaptiveLimit:
    """The current connection limit, always within ``[min_limit, max_size]``.

    ``on_overload(now)`` halves it (rounding down, never below ``min_limit``),
    unless the previous decrease was less than ``debounce`` seconds ago
    (default ``quiet_period / 5``). ``tick(now)``, called periodically, adds
    one (never above ``max_size``) once ``quiet_period`` seconds have passed
    since the last change and the last overload. An outage that was not an
    overload (the breaker opening and closing) does not touch the limit: the
    server did not ask for fewer connections, so capacity returns at once.

    Starts at ``max_size``. Not thread-safe by itself: its one owner, the
    handle's ``HandleState``, calls it under that object's lock.
    """

    __slots__ = (
        "_last_change",
        "_last_decrease",
        "_last_overload",
        "_limit",
        "debounce",
        "max_size",
        "min_limit",
        "quiet_period",
    )

    def __init__(
        self,
        max_size: int,
        *,
        quiet_period: float = 5.0,
        min_limit: int = 1,
        debounce: float | None = None,
    ) -> None:
        if min_limit < 1:
            raise ValueError(f"min_limit must be at least 1, got {min_limit}")
        if max_size < min_limit:
            raise ValueError(f"max_size must be at least min_limit ({min_limit}), got {max_size}")
        if not (quiet_period >= 0 and math.isfinite(quiet_period)):
            raise ValueError(f"quiet_period must be finite and >= 0, got {quiet_period}")
        if debounce is None:
            debounce = quiet_period / 5
        if not (debounce >= 0 and math.isfinite(debounce)):
            raise ValueError(f"debounce must be finite and >= 0, got {debounce}")
        self.max_size = max_size
        self.min_limit = min_limit
        self.quiet_period = quiet_period
        self.debounce = debounce
        self._limit = max_size
        self._last_change = -math.inf
        self._last_decrease = -math.inf
        self._last_overload = -math.inf

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def at_max(self) -> bool:
        """Is the limit back at ``max_size`` (nothing left to recover)?"""
        return self._limit == self.max_size

    def on_overload(self, now: float) -> int | None:
        """The server refused a connection for lack of slots. Returns the new
        limit if it changed."""
        self._last_overload = max(self._last_overload, now)
        if now - self._last_decrease < self.debounce:
            return None
        self._last_decrease = now
        new = max(self.min_limit, self._limit // 2)
        if new == self._limit:
            return None
        self._limit = new
        self._last_change = now
        return new

    def tick(self, now: float) -> int | None:
        """Grow by one if ``quiet_period`` has passed since the last change and
        the last overload. Returns the new limit if it changed."""
        if self._limit >= self.max_size:
            return None
        if now - max(self._last_change, self._last_overload) < self.quiet_period:
            return None
        self._limit += 1
        self._last_change = now
        return self._limit

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self._limit}, max_size={self.max_size})"


def overload_shrinks(*, server_refused: bool, behind_pooler: bool) -> bool:
    """Should an overload lower this process's limit (:meth:`AdaptiveLimit.on_overload`)?

    *server_refused*: PostgreSQL itself refused for lack of connection slots
    (:func:`pgwarden.core.classify.server_refused_slots`). *behind_pooler*: the
    handle detected (or was told of) a pooler in between. Only that combination
    keeps the limit: the pooler's server connections are full, not this process's
    share; the caller backs off and retries without shrinking.
    """
    return not (server_refused and behind_pooler)
