"""The retry decision: policy (how long to wait), budget (whether this process
may retry at all right now), and :func:`decide`, the one function every retry
loop asks (statements, transactions, warmup, breaker waits).

Both are pure: the current time and the random draw are arguments.
"""

from __future__ import annotations

import enum
import math
from dataclasses import FrozenInstanceError
from typing import ClassVar, Final, TypeAlias

from pgwarden.core.failures import (
    FailureKind,
    RetryContext,
    is_retryable,
    is_transaction_retryable,
)

__all__ = [
    "MIN_ATTEMPT_SECONDS",
    "Decision",
    "GiveUp",
    "GiveUpReason",
    "Raise",
    "RetryBudget",
    "RetryPolicy",
    "Sleep",
    "deadline_ran_out",
    "decide",
]

#: Below this much time left before the deadline, another attempt cannot succeed.
MIN_ATTEMPT_SECONDS = 0.02

# 2**63 seconds is far beyond any sane max_delay; past it the exponent would
# only overflow, so the cap applies directly.
_MAX_EXPONENT = 63
_EPSILON = 1e-9


class _FrozenValue:
    """Base of the policy and decision values: compared, hashed and shown by their fields,
    like the frozen dataclasses they replace (plain classes: cheaper to define at import).

    Each field is set once, in ``__init__``; a later assignment raises
    ``FrozenInstanceError`` (and mypy rejects it: the fields are ``Final``), because
    ``_RAISE`` and the ``GiveUp`` values are shared by every retry loop. The check
    makes a `Sleep` cost ~1 µs to build, paid only when a call is about to sleep
    and retry; nothing on the success path builds one.
    """

    __slots__ = ()
    #: The field names, in the order of the constructor's parameters.
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__ and isinstance(other, _FrozenValue):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())


class RetryPolicy(_FrozenValue):
    """An immutable retry policy: capped exponential backoff with full jitter.

    ``attempts``
        Total attempts including the first; ``1`` disables retries.
    ``base_delay``
        Cap of the first retry's sleep, in seconds.
    ``max_delay``
        Cap of any single sleep, in seconds.

    Retry number *n* (``n >= 1``: the first retry is number 1) sleeps
    ``rand * min(max_delay, base_delay * 2 ** (n - 1))`` seconds, where
    ``rand`` is uniform in ``[0, 1)`` ("full jitter", from the AWS Architecture
    Blog's "Exponential Backoff and Jitter": it spreads many clients that failed
    together evenly over the window instead of having them retry in lockstep).

    The policy only says how long to wait. The whole decision after a failed
    attempt (retryable or not, attempts, deadline, budget) is :func:`decide`.
    """

    __slots__ = ("attempts", "base_delay", "max_delay")
    _fields = ("attempts", "base_delay", "max_delay")
    attempts: Final[int]
    base_delay: Final[float]
    max_delay: Final[float]

    def __init__(self, attempts: int = 3, base_delay: float = 0.05, max_delay: float = 2.0) -> None:
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if not (self.base_delay >= 0 and math.isfinite(self.base_delay)):
            raise ValueError(f"base_delay must be finite and >= 0, got {self.base_delay}")
        if not (self.max_delay >= 0 and math.isfinite(self.max_delay)):
            raise ValueError(f"max_delay must be finite and >= 0, got {self.max_delay}")

    def with_attempts(self, attempts: int) -> RetryPolicy:
        """This policy with *attempts* attempts instead."""
        return RetryPolicy(attempts, self.base_delay, self.max_delay)

    def cap(self, retry_number: int) -> float:
        """The upper bound of retry *retry_number*'s sleep (``>= 1``)."""
        if retry_number < 1:
            raise ValueError(f"retry_number must be at least 1, got {retry_number}")
        exponent = retry_number - 1
        if exponent >= _MAX_EXPONENT:
            return self.max_delay
        return min(self.max_delay, self.base_delay * 2.0**exponent)

    def backoff(self, retry_number: int, rand: float) -> float:
        """The sleep before retry *retry_number* (``>= 1``), given a uniform draw
        *rand* in ``[0, 1)``. Always within ``[0, cap(retry_number)]``."""
        if not 0.0 <= rand <= 1.0:
            raise ValueError(f"rand must be in [0, 1], got {rand}")
        return rand * self.cap(retry_number)


class RetryBudget:
    """A process-wide token bucket that caps retries at a fraction of traffic.

    Every request earns ``ratio`` tokens; every retry spends one. Besides that,
    tokens trickle in at ``min_per_second`` so that a process with little
    traffic (a serverless function handling one request) can still retry. The
    bucket holds at most ``max_tokens``, which bounds a burst of retries after a
    quiet spell; it starts with ``min(min_per_second, max_tokens)`` tokens, so
    the very first requests of a cold process may retry.

    Over any run, retries granted <= initial tokens + ``ratio`` * requests +
    ``min_per_second`` * elapsed seconds. When the database is down and every
    request fails, retries therefore add about ``ratio`` (10%) to the load
    instead of multiplying it by the number of attempts.

    Not thread-safe by itself: its one owner, the handle's ``HandleState``,
    calls it under that object's lock. A clock that goes backwards earns nothing and moves
    nothing back.
    """

    __slots__ = ("_last", "_tokens", "max_tokens", "min_per_second", "ratio")

    def __init__(
        self, ratio: float = 0.1, min_per_second: float = 2.0, max_tokens: float = 20.0
    ) -> None:
        if not (ratio >= 0 and math.isfinite(ratio)):
            raise ValueError(f"ratio must be finite and >= 0, got {ratio}")
        if not (min_per_second >= 0 and math.isfinite(min_per_second)):
            raise ValueError(f"min_per_second must be finite and >= 0, got {min_per_second}")
        if not (max_tokens >= 1 and math.isfinite(max_tokens)):
            raise ValueError(f"max_tokens must be finite and >= 1, got {max_tokens}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.max_tokens = max_tokens
        self._tokens = min(min_per_second, max_tokens)
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is None:
            # The first observation anchors the clock; earlier time earned nothing.
            self._last = now
        elif now > self._last:
            earned = (now - self._last) * self.min_per_second
            self._tokens = min(self.max_tokens, self._tokens + earned)
            self._last = now

    def on_request(self, now: float) -> None:
        """Record one request (first attempts only, not retries): earns ``ratio``."""
        self._refill(now)
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def on_requests(self, count: int, now: float) -> None:
        """Record *count* requests at once (same effect as *count* `on_request` calls).

        Lets a hot path count requests in a plain integer and settle the
        bucket only when a retry is considered.
        """
        if count <= 0:
            return
        self._refill(now)
        self._tokens = min(self.max_tokens, self._tokens + self.ratio * count)

    def try_spend(self, now: float) -> bool:
        """Take one token for a retry. ``False`` means: do not retry, raise."""
        self._refill(now)
        # The tolerance lets ten requests at ratio 0.1 (which sum to
        # 0.9999999999999999 in floats) earn their retry.
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def tokens(self, now: float) -> float:
        """Tokens available at *now* (a retry needs a whole one)."""
        self._refill(now)
        return self._tokens

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_per_second={self.min_per_second}, "
            f"max_tokens={self.max_tokens}, tokens={self._tokens:.2f})"
        )


# --- the decision ------------------------------------------------------------------------------


class Sleep(_FrozenValue):
    """Retry: sleep *seconds*, then make attempt ``retry_number + 1``."""

    __slots__ = ("retry_number", "seconds")
    _fields = ("seconds", "retry_number")
    seconds: Final[float]
    retry_number: Final[int]

    def __init__(self, seconds: float, retry_number: int) -> None:
        self.seconds = seconds
        self.retry_number = retry_number


class Raise(_FrozenValue):
    """Not retryable (a permanent error, or unsafe to re-run): raise the failure as it is."""

    __slots__ = ()


class GiveUpReason(enum.Enum):
    ATTEMPTS = "attempts"
    DEADLINE = "deadline"
    BUDGET = "budget"


class GiveUp(_FrozenValue):
    """Retryable, but no further attempt: out of attempts, out of retry budget,
    or out of time. For ``DEADLINE`` the shell raises ``DeadlineExceeded`` from
    the failure; otherwise it raises the failure itself."""

    __slots__ = ("reason",)
    _fields = ("reason",)
    reason: Final[GiveUpReason]

    def __init__(self, reason: GiveUpReason) -> None:
        self.reason = reason


Decision: TypeAlias = Sleep | Raise | GiveUp

_RAISE = Raise()
_GIVE_UP_DEADLINE = GiveUp(GiveUpReason.DEADLINE)
_GIVE_UP_ATTEMPTS = GiveUp(GiveUpReason.ATTEMPTS)
_GIVE_UP_BUDGET = GiveUp(GiveUpReason.BUDGET)

# A statement timeout this close to the deadline is the deadline firing server-side.
_TIMEOUT_SLACK = 0.01


def deadline_ran_out(kind: FailureKind, now: float, deadline: float | None) -> bool:
    """Is a failure of *kind* at *now* the deadline's doing? The deadline passed,
    or it is a statement timeout that fired at the deadline (the server's half
    of the deadline). Then the caller gets `DeadlineExceeded`, whatever the path."""
    if deadline is None:
        return False
    return now >= deadline or (kind is FailureKind.TIMEOUT and now >= deadline - _TIMEOUT_SLACK)


def decide(
    kind: FailureKind,
    ctx: RetryContext,
    *,
    attempt: int,
    policy: RetryPolicy,
    now: float,
    deadline: float | None,
    rand: float,
    budget: RetryBudget | None,
    whole_transaction: bool = False,
) -> Decision:
    """What follows failed attempt number *attempt* (``>= 1``) whose failure is *kind*.

    1. Not retryable (see :func:`~pgwarden.core.classify.is_retryable`, or for
       *whole_transaction*, re-running a whole transaction function,
       :func:`~pgwarden.core.classify.is_transaction_retryable`): ``Raise``; but
       ``GiveUp(DEADLINE)`` when the deadline has passed (the failure is the
       deadline's doing, e.g. a severed connection), or when it is a statement
       timeout that fired at the deadline.
    2. ``attempt >= policy.attempts``: ``GiveUp(ATTEMPTS)``.
    3. Less than :data:`MIN_ATTEMPT_SECONDS` left: ``GiveUp(DEADLINE)``.
    4. The backoff ``policy.backoff(attempt, rand)``, shortened to half the
       time left so that the next attempt still fits before the deadline.
    5. A token from *budget* (``None``: no budget, as for the single shared
       warmup); none left: ``GiveUp(BUDGET)``.
    6. Otherwise ``Sleep``.

    Pure: the clock and the random draw are arguments; only *budget* changes.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    retryable = is_transaction_retryable(kind) if whole_transaction else is_retryable(kind, ctx)
    if not retryable:
        if deadline_ran_out(kind, now, deadline):
            return _GIVE_UP_DEADLINE
        return _RAISE
    if attempt >= policy.attempts:
        return _GIVE_UP_ATTEMPTS
    delay = policy.backoff(attempt, rand)
    if deadline is not None:
        left = deadline - now
        if left < MIN_ATTEMPT_SECONDS:
            return _GIVE_UP_DEADLINE
        delay = min(delay, left / 2)
    if budget is not None and not budget.try_spend(now):
        return _GIVE_UP_BUDGET
    return Sleep(delay, attempt)
