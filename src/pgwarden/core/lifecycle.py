"""The handle's lifecycle: every state, every event, every legal transition.

Theory of operation
-------------------

A handle is born NEW and does no I/O until the first call (or ``ready()``)
fires WARMUP_STARTED. That call runs the one shared warmup while every other
caller waits on it. Success makes the handle READY. Failure sends it back to
NEW, so the next call starts a fresh warmup instead of inheriting a stale
failure; if the failures tripped the circuit breaker, the shell fires
BREAKER_OPENED instead and the handle is OPEN.

READY and DEGRADED both serve traffic. DEGRADED means "working, but not at
full strength": the server said it was overloaded and the adaptive limit
shrank the pool, a failover drained it, or connections keep going stale. The
shell fires FAULT_OBSERVED when that happens and RECOVERED once the adaptive
limit is back at its maximum with no fault for a quiet period. Both are
idempotent, because concurrent requests report the same fault.

OPEN is the breaker's state mirrored here: calls fail fast with
``DatabaseUnavailable`` except the breaker's single probe. It is reachable from
NEW, WARMING, READY and DEGRADED, and firing BREAKER_OPENED again in OPEN (a
failed probe re-opens the breaker) is a no-op. When a probe succeeds the shell
fires BREAKER_CLOSED and the handle goes to DEGRADED, not READY: the pool
restarts from a small limit and ramps up, and RECOVERED marks the end of that
ramp. It does not go back through WARMING, because the successful probe *is*
a warm-up: it opened a connection and ran a statement.

CLOSE_REQUESTED moves any state to CLOSING (and is a no-op in CLOSING and
CLOSED, so ``close()`` may be called twice); the CLOSED event, fired when
in-flight work has finished or the close timeout passed, ends in the CLOSED
state. Nothing leaves CLOSED.

Firing an event that the table below does not list raises
:class:`IllegalTransition` and leaves the state unchanged: it means the shell
has a bug. Where a race is expected (a warmup finishing after ``close()``),
the shell uses :meth:`Lifecycle.try_fire`.

Transitions
-----------

=========== ================ ===========
state       event            new state
=========== ================ ===========
NEW         WARMUP_STARTED   WARMING
NEW         BREAKER_OPENED   OPEN
NEW         CLOSE_REQUESTED  CLOSING
WARMING     WARMUP_SUCCEEDED READY
WARMING     WARMUP_FAILED    NEW
WARMING     BREAKER_OPENED   OPEN
WARMING     CLOSE_REQUESTED  CLOSING
READY       FAULT_OBSERVED   DEGRADED
READY       RECOVERED        READY
READY       BREAKER_OPENED   OPEN
READY       CLOSE_REQUESTED  CLOSING
DEGRADED    FAULT_OBSERVED   DEGRADED
DEGRADED    RECOVERED        READY
DEGRADED    BREAKER_OPENED   OPEN
DEGRADED    CLOSE_REQUESTED  CLOSING
OPEN        BREAKER_OPENED   OPEN
OPEN        BREAKER_CLOSED   DEGRADED
OPEN        CLOSE_REQUESTED  CLOSING
CLOSING     CLOSE_REQUESTED  CLOSING
CLOSING     CLOSED           CLOSED
CLOSED      CLOSE_REQUESTED  CLOSED
=========== ================ ===========
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "TRANSITIONS",
    "Event",
    "IllegalTransition",
    "Lifecycle",
    "State",
    "accepts_work",
    "is_serving",
]


class State(enum.Enum):
    NEW = "new"
    WARMING = "warming"
    READY = "ready"
    DEGRADED = "degraded"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Event(enum.Enum):
    WARMUP_STARTED = "warmup_started"
    WARMUP_SUCCEEDED = "warmup_succeeded"
    WARMUP_FAILED = "warmup_failed"
    FAULT_OBSERVED = "fault_observed"
    RECOVERED = "recovered"
    BREAKER_OPENED = "breaker_opened"
    BREAKER_CLOSED = "breaker_closed"
    CLOSE_REQUESTED = "close_requested"
    #: The drain finished (or its timeout passed): the handle is closed.
    CLOSED = "closed"


_S = State
_E = Event

#: (state, event) -> new state. The module docstring shows the same table.
TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = MappingProxyType(
    {
        (_S.NEW, _E.WARMUP_STARTED): _S.WARMING,
        (_S.NEW, _E.BREAKER_OPENED): _S.OPEN,
        (_S.NEW, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.WARMING, _E.WARMUP_SUCCEEDED): _S.READY,
        (_S.WARMING, _E.WARMUP_FAILED): _S.NEW,
        (_S.WARMING, _E.BREAKER_OPENED): _S.OPEN,
        (_S.WARMING, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.READY, _E.FAULT_OBSERVED): _S.DEGRADED,
        (_S.READY, _E.RECOVERED): _S.READY,
        (_S.READY, _E.BREAKER_OPENED): _S.OPEN,
        (_S.READY, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.DEGRADED, _E.FAULT_OBSERVED): _S.DEGRADED,
        (_S.DEGRADED, _E.RECOVERED): _S.READY,
        (_S.DEGRADED, _E.BREAKER_OPENED): _S.OPEN,
        (_S.DEGRADED, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.OPEN, _E.BREAKER_OPENED): _S.OPEN,
        (_S.OPEN, _E.BREAKER_CLOSED): _S.DEGRADED,
        (_S.OPEN, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.CLOSING, _E.CLOSE_REQUESTED): _S.CLOSING,
        (_S.CLOSING, _E.CLOSED): _S.CLOSED,
        (_S.CLOSED, _E.CLOSE_REQUESTED): _S.CLOSED,
    }
)

_ACCEPTING: Final = frozenset({_S.NEW, _S.WARMING, _S.READY, _S.DEGRADED, _S.OPEN})
_SERVING: Final = frozenset({_S.READY, _S.DEGRADED})


def accepts_work(state: State) -> bool:
    """Does a handle in *state* take new calls? False only in CLOSING and
    CLOSED (the shell raises ``HandleClosed``). In NEW a call starts the
    warmup, in WARMING it waits for it, and in OPEN the breaker's ``admit``
    decides between the probe and ``DatabaseUnavailable``."""
    return state in _ACCEPTING


def is_serving(state: State) -> bool:
    """Is the handle warmed up and healthy enough to run queries now?"""
    return state in _SERVING


class IllegalTransition(RuntimeError):
    """An event that is not legal in the current state; the state is unchanged."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"illegal transition: {event.name} in state {state.name}")
        self.state = state
        self.event = event


class Lifecycle:
    """The handle's current :class:`State`, changed only through :meth:`fire`.

    Not thread-safe by itself: its one owner, the handle's ``HandleState``,
    fires events under that object's lock.
    """

    __slots__ = ("_state",)

    def __init__(self, state: State = State.NEW) -> None:
        self._state = state

    @property
    def state(self) -> State:
        return self._state

    def fire(self, event: Event) -> State:
        """Apply *event* and return the new state (which may equal the old one).

        Raises :class:`IllegalTransition`, leaving the state unchanged, if the
        table has no row for (state, event).
        """
        new = TRANSITIONS.get((self._state, event))
        if new is None:
            raise IllegalTransition(self._state, event)
        self._state = new
        return new

    def try_fire(self, event: Event) -> State | None:
        """Like :meth:`fire`, but return ``None`` instead of raising, for
        events that may legitimately lose a race (a warmup ending after
        ``close()``)."""
        new = TRANSITIONS.get((self._state, event))
        if new is not None:
            self._state = new
        return new

    def __repr__(self) -> str:
        return f"Lifecycle(state={self._state.name})"
