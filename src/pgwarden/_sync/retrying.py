# WARNING: generated from src/pgwarden/_async/retrying.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""Carrying out a retry decision (`pgwarden.core.retry.decide`) in the shell."""

from __future__ import annotations

from pgwarden._handle.state import HandleState
from pgwarden._sync._compat import sleep
from pgwarden.core.retry import Decision, GiveUp, GiveUpReason, Sleep

__all__ = ["act_on"]


def act_on(state: HandleState, decision: Decision, exc: BaseException, operation: str) -> None:
    """Sleep before the next attempt, or raise: `DeadlineExceeded` from *exc* when
    time ran out, else *exc* itself (permanent errors keep their psycopg type)."""
    if isinstance(decision, Sleep):
        sleep(decision.seconds)
        return
    if isinstance(decision, GiveUp) and decision.reason is GiveUpReason.DEADLINE:
        raise state.deadline_error(exc, operation) from exc
    raise exc
