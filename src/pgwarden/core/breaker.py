"""A pure circuit breaker: callers fail fast while the database is known down.

Transitions::

    CLOSED    --threshold consecutive failures-->  OPEN
    OPEN      --admit() after cooldown (PROBE)-->  HALF_OPEN
    HALF_OPEN --probe succeeds-->                  CLOSED     (cooldown reset)
    HALF_OPEN --probe fails-->                     OPEN       (cooldown doubled, capped)
    HALF_OPEN --abandon_probe()-->                 OPEN       (may probe again at once)

Only :meth:`CircuitBreaker.admit` moves OPEN to HALF_OPEN, so :attr:`state`
stays OPEN after the cooldown until somebody asks. Exactly one caller gets
``PROBE``; everybody else gets ``REJECT`` until the probe reports back. A
probe that never reports (its task was killed without ``abandon_probe``) is
presumed lost after ``probe_timeout`` and the next caller probes instead, so
a lost probe cannot lock the breaker forever.

The shell reports connect failures (NOTHING_RAN and OVERLOAD at CONNECT), not
query errors: a bad query says nothing about whether the database is up.
"""

from __future__ import annotations

import enum
import math

__all__ = ["Admission", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(enum.Enum):
    """The answer to "may I try?".

    ALLOW: go ahead. PROBE: go ahead, you are the one trial call, and you must
    report the outcome (``on_success``/``on_failure``, or ``abandon_probe`` if
    you never got to try). REJECT: fail fast, see ``retry_after``.
    """

    ALLOW = "allow"
    PROBE = "probe"
    REJECT = "reject"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    ``threshold`` consecutive failures open it, provided the first of them is
    at least ``min_outage`` seconds old: a burst of simultaneous failures (every
    pooled connection noticing the same restart at once) is one blip, not an
    outage, and callers with time left should wait it out. It stays open for
    ``cooldown`` seconds; each failed probe doubles that, up to
    ``max_cooldown``; a successful probe closes it and resets the cooldown.
    ``probe_timeout`` (default ``max(max_cooldown, cooldown)``) is how long an
    unanswered probe blocks another one.

    In OPEN, outcomes of calls admitted before it opened are ignored: only the
    probe decides. In HALF_OPEN, any reported outcome is taken as the probe's.
    Not thread-safe by itself: its one owner, the handle's ``HandleState``,
    calls it under that object's lock.
    """

    __slots__ = (
        "_cooldown",
        "_failures",
        "_first_failure_at",
        "_opened_at",
        "_probe_started_at",
        "_state",
        "_transitions",
        "_wait",
        "base_cooldown",
        "max_cooldown",
        "min_outage",
        "probe_timeout",
        "threshold",
    )

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 2.0,
        max_cooldown: float = 30.0,
        *,
        probe_timeout: float | None = None,
        min_outage: float = 0.0,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")
        if not (cooldown >= 0 and math.isfinite(cooldown)):
            raise ValueError(f"cooldown must be finite and >= 0, got {cooldown}")
        if not (max_cooldown >= cooldown and math.isfinite(max_cooldown)):
            raise ValueError(f"max_cooldown must be finite and >= cooldown, got {max_cooldown}")
        if not (min_outage >= 0 and math.isfinite(min_outage)):
            raise ValueError(f"min_outage must be finite and >= 0, got {min_outage}")
        if probe_timeout is None:
            probe_timeout = max(max_cooldown, cooldown)
        if not probe_timeout > 0:
            raise ValueError(f"probe_timeout must be > 0, got {probe_timeout}")
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.probe_timeout = probe_timeout
        self.min_outage = min_outage
        self._first_failure_at = 0.0
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._cooldown = cooldown
        self._wait = cooldown
        self._opened_at = 0.0
        self._probe_started_at = 0.0
        self._transitions = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (reset when the breaker closes)."""
        return self._failures

    @property
    def cooldown(self) -> float:
        """The current cooldown: ``base_cooldown`` doubled per failed probe."""
        return self._cooldown

    @property
    def transitions(self) -> int:
        """How many state changes happened so far (for the metrics counter)."""
        return self._transitions

    def _move(self, state: BreakerState) -> BreakerState:
        self._state = state
        self._transitions += 1
        return state

    def admit(self, now: float) -> Admission:
        """May a call go ahead at *now*? See :class:`Admission`."""
        if self._state is BreakerState.CLOSED:
            return Admission.ALLOW
        if self._state is BreakerState.OPEN:
            if now - self._opened_at >= self._wait:
                self._move(BreakerState.HALF_OPEN)
                self._probe_started_at = now
                return Admission.PROBE
            return Admission.REJECT
        if now - self._probe_started_at >= self.probe_timeout:
            # The previous probe is presumed lost; hand the slot to this caller.
            self._probe_started_at = now
            return Admission.PROBE
        return Admission.REJECT

    def on_success(self, now: float) -> BreakerState | None:
        """Record a success. Returns the new state if it changed (HALF_OPEN -> CLOSED)."""
        if self._state is BreakerState.CLOSED:
            self._failures = 0
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._failures = 0
            self._cooldown = self.base_cooldown
            return self._move(BreakerState.CLOSED)
        return None

    def on_failure(self, now: float, rand: float = 1.0) -> BreakerState | None:
        """Record a failure. Returns OPEN if this failure opened the breaker
        (threshold reached, or the probe failed), else ``None``.

        When it opens, the wait before the next probe is the cooldown times
        ``0.5 + rand / 2`` (*rand* uniform in ``[0, 1]``): processes that saw the
        same outage probe spread over half a cooldown, never later than a
        full one. ``rand=1.0`` waits exactly the cooldown."""
        if not 0.0 <= rand <= 1.0:
            raise ValueError(f"rand must be in [0, 1], got {rand}")
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures == 1:
                self._first_failure_at = now
            if self._failures >= self.threshold and now - self._first_failure_at >= self.min_outage:
                self._opened_at = now
                self._cooldown = self.base_cooldown
                self._wait = self._cooldown * (0.5 + rand / 2)
                return self._move(BreakerState.OPEN)
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._failures += 1
            self._opened_at = now
            self._cooldown = min(self.max_cooldown, self._cooldown * 2)
            self._wait = self._cooldown * (0.5 + rand / 2)
            return self._move(BreakerState.OPEN)
        return None

    def abandon_probe(self, now: float) -> BreakerState | None:
        """The probe never got to try (cancelled, deadline passed before it
        connected): back to OPEN without penalty, and the next :meth:`admit`
        may probe at once. Returns OPEN if the state changed."""
        if self._state is not BreakerState.HALF_OPEN:
            return None
        self._opened_at = now - self._wait
        return self._move(BreakerState.OPEN)

    def retry_after(self, now: float) -> float:
        """Seconds until a call may be admitted again: 0 when CLOSED, the rest
        of the cooldown when OPEN, and the current cooldown as an estimate
        while a probe is in flight."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        if self._state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._wait - now)
        return self._cooldown

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value}, failures={self._failures}, "
            f"cooldown={self._cooldown})"
        )
