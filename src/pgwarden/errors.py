"""The exceptions pgwarden raises itself.

Two families, by what the caller should do next:

* `DatabaseUnusable`: the database could not be used for this call (not
  ready, breaker open, no connection in time, deadline passed, handle
  closed). Catch it to answer "503, try later". For every subclass except
  `DeadlineExceeded` raised mid-statement, nothing of the call ran.
* `OutcomeUnknown`: a write may or may not have happened (its connection was
  lost after it was sent, or during COMMIT, and the outcome could not be
  resolved). Reconcile before retrying by hand.

`NotCommitted` says the work certainly did not commit (safe to re-run).
psycopg's own exceptions (``psycopg.errors.UniqueViolation`` and friends) are
raised unchanged, with their type, ``sqlstate`` and ``diag``; only secrets
are removed from their text. docs/errors.md has the full table.
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "AmbiguousCommitError",
    "DatabaseUnavailable",
    "DatabaseUnusable",
    "DeadlineExceeded",
    "HandleClosed",
    "NotCommitted",
    "NotReady",
    "OutcomeUnknown",
    "PgwardenError",
    "SettingsError",
]


class PgwardenError(Exception):
    """Base class of every exception that pgwarden itself raises."""


class SettingsError(PgwardenError, ValueError):
    """A setting has a bad value. The message names the setting, never a secret."""


class DatabaseUnusable(PgwardenError):
    """The database could not be used for this call: not ready, unavailable,
    no connection in time, the deadline passed, or the handle is closed.

    The same condition raises the same subclass whatever the caller passed.
    """


class NotReady(DatabaseUnusable):
    """Readiness did not complete within ``ready_timeout``.

    Every caller that waited on the same warmup gets an instance carrying the
    same underlying cause (``__cause__``), with secrets redacted from the text.
    """


class DatabaseUnavailable(DatabaseUnusable):
    """The circuit breaker is open: the database failed repeatedly, so callers
    fail fast instead of queueing. ``__cause__`` is the last connect failure."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(DatabaseUnusable, TimeoutError):
    """The caller's deadline passed. ``last_error`` is the last underlying
    failure, if any attempt failed before time ran out."""

    def __init__(self, message: str, *, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class AcquireTimeout(DeadlineExceeded):
    """No pooled connection became free in time: within ``acquire_timeout``, or
    before the caller's deadline. Nothing was sent to the server. A subclass of
    `DeadlineExceeded` (and so of ``TimeoutError``) whichever bound ran out."""


class HandleClosed(DatabaseUnusable):
    """The handle is closing or closed and refuses new work."""


class NotCommitted(PgwardenError):
    """The connection was lost and the work certainly did not commit: it was lost
    before COMMIT was sent, or ``txid_status()`` on a new connection said the
    transaction aborted. Safe to re-run; ``run_transaction`` does so itself."""


class OutcomeUnknown(PgwardenError):
    """A write may or may not have taken effect: its connection was lost after the
    statement was sent and nothing could tell whether it ran. pgwarden never
    re-sends it. ``txid`` is the transaction's id when known, for reconciliation."""

    def __init__(self, message: str, *, txid: int | None = None) -> None:
        super().__init__(message)
        self.txid = txid


class AmbiguousCommitError(OutcomeUnknown):
    """The connection dropped after COMMIT was sent and the outcome could not
    be resolved by transaction id. The transaction may or may not have been
    committed; ``txid`` is its id when known, for manual reconciliation."""
