"""Pure logic for short-lived login tokens: when to make a new one, and how fast to log in.

Used by `pgwarden.aws` (RDS IAM auth tokens) with the real clock; no I/O here, and
no locking: the caller holds a lock around each call.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenBucket", "TokenCache"]


@dataclass
class TokenCache:
    """One token, reused for most of its life and replaced before it expires.

    *refresh_after*: seconds after issue when a new token is made (an RDS IAM token
    is valid 900 s; at 600 s a connect that starts late in a slow network still
    presents a valid one). *lifetime*: how long a token is accepted at all; when
    making a new one fails, the old one is used until ``lifetime - grace``.
    """

    refresh_after: float
    lifetime: float
    #: Seconds before expiry after which an old token is no longer handed out
    #: (a connect takes time; a token that expires mid-handshake is refused).
    grace: float = 30.0
    _token: str | None = None
    _issued_at: float = float("-inf")

    def __post_init__(self) -> None:
        if not 0 < self.refresh_after <= self.lifetime - self.grace:
            raise ValueError("need 0 < refresh_after <= lifetime - grace")

    def current(self, now: float) -> str | None:
        """The cached token if it is young enough to use without refreshing, else None."""
        if self._token is not None and now - self._issued_at < self.refresh_after:
            return self._token
        return None

    def usable_old(self, now: float) -> str | None:
        """The cached token while it is still valid (for when making a new one failed)."""
        if self._token is not None and now - self._issued_at < self.lifetime - self.grace:
            return self._token
        return None

    def store(self, token: str, issued_at: float) -> None:
        """Keep *token*, made at *issued_at* (the time generation started: the
        signature's clock starts then, not when it returned)."""
        self._token = token
        self._issued_at = issued_at


@dataclass
class TokenBucket:
    """A token bucket that hands out *delays*, not refusals: `reserve` takes one
    token and says how long the caller must wait for it, so concurrent callers
    queue in order at *rate* per second after a *burst*."""

    rate: float
    burst: float
    _level: float | None = None  # tokens available at _updated (negative: reserved ahead)
    _updated: float = 0.0

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("need rate > 0 and burst >= 1")

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0.0: now)."""
        if self._level is None:
            level = self.burst
        else:
            level = min(self.burst, self._level + (now - self._updated) * self.rate)
        level -= 1.0
        self._level = level
        self._updated = now
        return 0.0 if level >= 0 else -level / self.rate
