# WARNING: generated from src/pgwarden/_async/execute.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""Single statements on the handle: ``fetch``, ``fetchrow``, ``fetchval``, ``execute``.

How each attempt is sent is `pgwarden.core.resend.StatementSafety`'s choice:

* **a read, or a write without an explicit deadline**: the statement alone, in
  autocommit: one round trip, the same with or without a deadline. Under an
  explicit deadline the lease sends a cancel request at the deadline (the
  server stops the statement) and severs the socket shortly after if it has
  not ended; without one the lease's sever timer (``default_timeout``) bounds it.
* **a write under an explicit deadline**: BEGIN, the transaction's id and the
  statement, then ``COMMIT``: two round trips, and a lost COMMIT is resolved by
  id (`Transactions.write_under_deadline`).
* **a read sent again** after an attempt that may have run: inside ``BEGIN
  READ ONLY``, so a hidden write (a function that inserts) is refused by the
  server instead of running twice; it then raises `OutcomeUnknown`.

Statements without parameters that pgwarden wraps in a transaction go as one
message, so a string of several statements behaves as it does unwrapped; after
a failure inside the wrap, the transaction is rolled back here, under the
lease's timer, not by the pool.

Failures go to `HandleState.failed`, the one retry decision.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Any

from pgwarden._handle import deferred
from pgwarden._handle.sql import Mode, Params, Query
from pgwarden._handle.state import HandleState
from pgwarden._sync.acquire import Connections, Lease
from pgwarden._sync.transaction import (
    QUERY_CANCELED,
    Transactions,
    cursor_for,
    query_bytes,
    result_of,
    rollback_quietly,
)
from pgwarden.core.failures import Phase, sqlstate_of
from pgwarden.core.resend import READ_ONLY_VIOLATION, StatementSafety, Verdict, Wrap
from pgwarden.core.retry import RetryPolicy
from pgwarden.errors import OutcomeUnknown

if TYPE_CHECKING:
    from pgwarden._sync.pipelined import send_together
    from pgwarden._sync.retrying import after_failed_attempt
    from pgwarden._sync.warmup import Warmup
    from pgwarden.core.classify import classify_failure
    from pgwarden.core.rows import RowShape
    from pgwarden.core.tracing import StatementObserver
else:
    # Only after a failure: imported by the first retry, the classifier by the first failure.
    after_failed_attempt = deferred("pgwarden._sync.retrying", "after_failed_attempt", globals())
    classify_failure = deferred("pgwarden.core.classify", "classify_failure", globals())
    # Only for a statement with parameters that must go in a transaction of its own.
    send_together = deferred("pgwarden._sync.pipelined", "send_together", globals())

__all__ = ["Statements"]


class Statements:
    def __init__(
        self,
        state: HandleState,
        connections: Connections,
        warmup: Warmup,
        transactions: Transactions,
    ) -> None:
        self.state = state
        self.connections = connections
        self.warmup = warmup
        self.transactions = transactions
        self.observer: StatementObserver = transactions.observer

    def run(
        self,
        mode: Mode,
        query: Query,
        params: Params,
        timeout: float | None,
        idempotent: bool,
        write: bool | None = None,
        row: RowShape | None = None,
    ) -> Any:
        state = self.state
        deadline, explicit = state.deadline_for(timeout)
        state.enter()
        seconds = acquire_wait = used = None
        try:
            if not state.fast_path:
                self.warmup.wait(deadline)
            if write is None and state.statement_writes(query):
                write = True
            safety = StatementSafety(writes=write, idempotent=idempotent, explicit=explicit)
            policy = state.deadline_policy if explicit else state.statement_policy
            attempt = 1
            while True:
                lease = self.connections.lease(deadline, explicit=explicit, cancel=explicit)
                wrap = safety.wrap()
                started = monotonic()
                token = self.observer.statement_started(mode.value, query)
                try:
                    result = self._statement(
                        lease, mode, query, params, deadline if explicit else None, wrap, row
                    )
                except BaseException as exc:
                    self.observer.statement_finished(token, exc, None)
                    if not isinstance(exc, Exception):
                        lease.release()
                        raise
                    if lease.cancel_sent and sqlstate_of(exc) == QUERY_CANCELED:
                        lease.cancel_consumed = True
                    if wrap is not Wrap.NONE:
                        rollback_quietly(lease.conn)
                    lost = lease.lost
                    if wrap is not Wrap.READ_ONLY and sqlstate_of(exc) == READ_ONLY_VIOLATION:
                        self.connections.read_only_server(lease)
                    state.lease_returned(lease.acquire_wait, lease.release())
                    self._after_failure(exc, safety, wrap, query, attempt, deadline, policy, lost)
                    attempt += 1
                    continue
                finished = monotonic()
                self.observer.statement_finished(
                    token, None, result if mode is Mode.COUNT else _rows(result)
                )
                used = lease.release()
                acquire_wait = lease.acquire_wait
                seconds = finished - started
                return result
        finally:
            state.leave(query=query, seconds=seconds, acquire_wait=acquire_wait, used=used)

    def _after_failure(
        self,
        exc: Exception,
        safety: StatementSafety,
        wrap: Wrap,
        query: Query,
        attempt: int,
        deadline: float | None,
        policy: RetryPolicy,
        lost: bool,
    ) -> None:
        """Return to send the statement again; raise otherwise."""
        state = self.state
        if isinstance(exc, OutcomeUnknown):
            # A COMMIT whose loss could not be resolved: counted as an ambiguous
            # commit already, and never turned into anything else (not even a
            # DeadlineExceeded): the caller must reconcile.
            raise exc
        sqlstate = sqlstate_of(exc)
        kind = classify_failure(exc, Phase.STATEMENT, connection_lost=lost)
        verdict = safety.after_failure(kind, sqlstate, wrap, exc)
        if wrap is Wrap.READ_ONLY and safety.writes:
            # The server refused it read-only: it writes. Not the database failing.
            state.learn_write(query)
            if verdict is Verdict.AS_WRITE:
                return  # nothing ran: send it again as a write, at once
            lost_error = safety.lost_error or exc
            raise state.outcome_unknown(
                lost_error,
                "a statement that reads as a read writes, and an earlier attempt was lost",
            ) from lost_error
        if verdict is Verdict.OUTCOME_UNKNOWN:
            state.failed(
                exc,
                Phase.STATEMENT,
                safety.retry_context(),
                attempt=attempt,
                deadline=deadline,
                policy=policy,
                operation="query",
                connection_lost=lost,
            )
            raise state.outcome_unknown(exc, "connection lost after the write was sent") from exc
        after_failed_attempt(
            self.connections,
            exc,
            Phase.STATEMENT,
            safety.retry_context(),
            attempt=attempt,
            deadline=deadline,
            policy=policy,
            operation="query",
            connection_lost=lost,
        )

    def _statement(
        self,
        lease: Lease,
        mode: Mode,
        query: Query,
        params: Params,
        deadline: float | None,
        wrap: Wrap,
        row: RowShape | None,
    ) -> Any:
        conn = lease.conn
        cur = cursor_for(conn, mode, row)
        if wrap is Wrap.NONE:
            cur.execute(query, params)
        elif wrap is Wrap.WRITE and deadline is not None:
            self.transactions.write_under_deadline(lease, cur, query, params, deadline)
        elif params is None:
            # One message, as without a deadline (a string of several statements
            # works the same); the server refuses any write in it.
            cur.execute(b"BEGIN READ ONLY;\n" + query_bytes(conn, query) + b"\n;COMMIT")
            cur.nextset()  # past BEGIN: the statement's first result, as without a wrap
        else:
            send_together(conn, b"BEGIN READ ONLY", (cur, query, params, None, None), b"COMMIT")
        return result_of(cur, mode)


def _rows(result: Any) -> int | None:
    if isinstance(result, list):
        return len(result)
    return None if result is None else 1
