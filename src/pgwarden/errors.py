"""The exceptions pgwarden raises itself.

psycopg's own exceptions (``psycopg.errors.UniqueViolation`` and friends) are
re-raised unchanged for permanent errors, so code that catches them keeps
working. The classes here cover what psycopg has no word for: a deadline that
ran out, a database that is known to be down, a commit whose outcome is
unknown, and a handle that is closing.
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "AmbiguousCommitError",
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "HandleClosed",
    "NotCommitted",
    "NotReady",
    "PgwardenError",
    "SettingsError",
]


class PgwardenError(Exception):
    """Base class of every exception that pgwarden itself raises."""


class SettingsError(PgwardenError, ValueError):
    """A setting has a bad value. The message names the setting, never a secret."""


class NotReady(PgwardenError):
    """Readiness did not complete within ``ready_timeout``.

    Every caller that waited on the same warmup gets an instance carrying the
    same underlying cause (``__cause__``), with secrets redacted from the text.
    """


class DatabaseUnavailable(PgwardenError):
    """The circuit breaker is open: the database failed repeatedly, so callers
    fail fast instead of queueing. ``__cause__`` is the last connect failure."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(PgwardenError, TimeoutError):
    """The caller's deadline passed. ``last_error`` is the last underlying
    failure, if any attempt failed before time ran out."""

    def __init__(self, message: str, *, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


class AcquireTimeout(DeadlineExceeded):
    """No pooled connection became free in time: within ``acquire_timeout``, or
    before the caller's deadline. Nothing was sent to the server. A subclass of
    `DeadlineExceeded` (and so of ``TimeoutError``) whichever bound ran out."""


class NotCommitted(PgwardenError):
    """The connection was lost and the work certainly did not commit: it was lost
    before COMMIT was sent, or ``txid_status()`` on a new connection said the
    transaction aborted. Safe to re-run; ``run_transaction`` does so itself."""


class AmbiguousCommitError(PgwardenError):
    """The connection dropped after COMMIT was sent and the outcome could not
    be resolved by transaction id. The transaction may or may not have been
    committed; ``txid`` is its id when known, for manual reconciliation."""

    def __init__(self, message: str, *, txid: int | None = None) -> None:
        super().__init__(message)
        self.txid = txid


class HandleClosed(PgwardenError):
    """The handle is closing or closed and refuses new work."""
