"""Is an atomic_retry() attempt running here? (No Django import.)

The backend counts a failed statement once: by itself, or, inside
``atomic_retry()``, by the retry loop (which counts every failed attempt).
A context variable says which; Django runs a request's ORM calls in one
thread (under ASGI, the thread ``sync_to_async`` picks), so it follows them.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

__all__ = ["enter_attempt", "in_atomic_retry", "leave_attempt"]

_attempting: ContextVar[bool] = ContextVar("pgwarden_django_attempt", default=False)


def in_atomic_retry() -> bool:
    """Is an ``atomic_retry()`` attempt of this thread (task) in progress?"""
    return _attempting.get()


def enter_attempt() -> Token[bool]:
    return _attempting.set(True)


def leave_attempt(token: Token[bool]) -> None:
    _attempting.reset(token)
