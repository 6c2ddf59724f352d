"""Deadlines: one absolute time bound shared by acquire, retries and the statement.

``with deadline(2.5):`` puts an absolute expiry (monotonic seconds) in a
context variable, so it follows the code into every call below it, across
``await`` (each asyncio task copies the context it was created in). Nested
deadlines can only tighten: an inner ``deadline(10)`` inside an outer
``deadline(1)`` still ends when the outer one does.

Entering :func:`deadline` reads the clock (``time.monotonic`` unless a
``clock`` is passed). It is the one clock read in the pure core, because
"seconds from now" means nothing without it; everything else here takes
``now`` as an argument.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Final

__all__ = [
    "MAX_STATEMENT_TIMEOUT_MS",
    "Deadline",
    "current_deadline",
    "deadline",
    "effective_deadline",
    "statement_timeout_ms",
]

#: PostgreSQL's largest statement_timeout (INT_MAX milliseconds, ~24.8 days).
MAX_STATEMENT_TIMEOUT_MS: Final = 2**31 - 1

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "pgwarden_deadline", default=None
)


class Deadline:
    """An absolute expiry time, in the same monotonic seconds as ``now``.

    A value: immutable (``Final``: mypy rejects reassignment), equal and hashed by
    ``expires_at``. A plain class, not a frozen dataclass: one is built per
    ``deadline()`` block, and a frozen dataclass's ``__init__`` and its definition
    at import both cost more.
    """

    __slots__ = ("expires_at",)
    expires_at: Final[float]

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"Deadline(expires_at={self.expires_at!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__ and isinstance(other, Deadline):
            return self.expires_at == other.expires_at
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.expires_at,))

    def remaining(self, now: float) -> float:
        """Seconds left at *now*; never negative."""
        return max(0.0, self.expires_at - now)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


class _DeadlineScope:
    """The context manager :func:`deadline` returns. Single use."""

    __slots__ = ("_deadline", "_token")

    def __init__(self, deadline: Deadline) -> None:
        self._deadline = deadline
        self._token: contextvars.Token[Deadline | None] | None = None

    def __enter__(self) -> Deadline:
        if self._token is not None:
            raise RuntimeError("a deadline scope cannot be entered twice")
        outer = _current.get()
        effective = self._deadline
        if outer is not None and outer.expires_at <= effective.expires_at:
            effective = outer
        self._token = _current.set(effective)
        return effective

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _current.reset(self._token)


def deadline(
    seconds: float, *, clock: Callable[[], float] = time.monotonic
) -> AbstractContextManager[Deadline]:
    """Bound everything inside the ``with`` block to *seconds* from now.

    The ``with`` target is the effective :class:`Deadline`: the earlier of
    this one and any enclosing one. Zero or negative *seconds* give a deadline
    that has already passed (every call inside fails fast); ``math.inf`` gives
    none in practice. The clock is read when :func:`deadline` is called.
    """
    if math.isnan(seconds):
        raise ValueError("deadline seconds must be a number, got nan")
    return _DeadlineScope(Deadline(clock() + seconds))


def current_deadline() -> Deadline | None:
    """The innermost (and so earliest) deadline in effect, or ``None``."""
    return _current.get()


def effective_deadline(now: float, timeout: float | None, default: float | None) -> float | None:
    """The absolute deadline for one call at *now*, or ``None`` for no bound.

    The explicit bounds, the context's :func:`deadline` and the call's own
    *timeout*, combine by taking the earlier. *default* (the handle's default
    timeout) applies only when neither is given: it is a fallback, not a cap,
    so ``with deadline(60)`` can run a long report past a 30 s default.
    """
    ctx = _current.get()
    bound = None if ctx is None else ctx.expires_at
    if timeout is not None:
        own = now + timeout
        bound = own if bound is None else min(bound, own)
    if bound is None and default is not None:
        bound = now + default
    return bound


def statement_timeout_ms(remaining: float, *, floor_ms: int = 1) -> int:
    """*remaining* seconds as a ``statement_timeout`` in whole milliseconds.

    Rounds up (a timeout that fires a fraction early would cut a statement the
    caller allowed), never goes below *floor_ms* (``>= 1``, because ``0``
    means "no timeout" to PostgreSQL) and never above
    :data:`MAX_STATEMENT_TIMEOUT_MS`.
    """
    if floor_ms < 1:
        raise ValueError(f"floor_ms must be at least 1 (0 disables the timeout), got {floor_ms}")
    if math.isnan(remaining):
        raise ValueError("remaining must be a number, got nan")
    if remaining >= MAX_STATEMENT_TIMEOUT_MS / 1000:
        return MAX_STATEMENT_TIMEOUT_MS
    if remaining <= 0:
        return min(MAX_STATEMENT_TIMEOUT_MS, floor_ms)
    # Rounding to the microsecond first keeps float noise (2.3 * 1000 ==
    # 2300.0000000000005) from adding a millisecond.
    return min(MAX_STATEMENT_TIMEOUT_MS, max(floor_ms, math.ceil(round(remaining * 1000, 3))))
