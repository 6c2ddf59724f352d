"""Carrying out a retry decision (`pgwarden.core.retry.decide`) in the shell."""

from __future__ import annotations

from pgwarden._async._compat import sleep
from pgwarden._async.acquire import AsyncConnections
from pgwarden._handle.state import HandleState
from pgwarden.core.failures import Phase, RetryContext
from pgwarden.core.retry import Decision, GiveUp, GiveUpReason, RetryPolicy, Sleep
from pgwarden.errors import OutcomeUnknown

__all__ = ["act_on", "after_failed_attempt"]


async def after_failed_attempt(
    connections: AsyncConnections,
    exc: BaseException,
    phase: Phase,
    ctx: RetryContext,
    *,
    attempt: int,
    deadline: float | None,
    policy: RetryPolicy,
    operation: str,
    connection_lost: bool = False,
    whole_transaction: bool = False,
) -> None:
    """Every retry loop's failure path: classify and decide (`HandleState.failed`),
    react on the pool (a failover drains it), then sleep or raise."""
    state = connections.state
    kind, decision = state.failed(
        exc,
        phase,
        ctx,
        attempt=attempt,
        deadline=deadline,
        policy=policy,
        operation=operation,
        connection_lost=connection_lost,
        whole_transaction=whole_transaction,
    )
    await connections.after_failure(kind)
    await act_on(state, decision, exc, operation)


async def act_on(
    state: HandleState, decision: Decision, exc: BaseException, operation: str
) -> None:
    """Sleep before the next attempt, or raise: `DeadlineExceeded` from *exc* when
    time ran out, else *exc* itself (permanent errors keep their psycopg type)."""
    if isinstance(decision, Sleep):
        await sleep(decision.seconds)
        return
    if (
        isinstance(decision, GiveUp)
        and decision.reason is GiveUpReason.DEADLINE
        and not isinstance(exc, OutcomeUnknown)  # "it may have committed" outranks the time
    ):
        raise state.deadline_error(exc, operation) from exc
    raise exc
