"""The pure parts of nesting and counting in run_transaction (no server needed)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgwarden._sync.transaction import _database_failure, _mark_counted, _Open
from pgwarden.errors import (
    AcquireTimeout,
    AmbiguousCommitError,
    DatabaseUnavailable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.SerializationFailure("could not serialize"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.errors.UniqueViolation("duplicate key"),
        NotCommitted("connection lost before COMMIT"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
    ],
)
def test_database_failures_are_counted(exc: Exception) -> None:
    assert _database_failure(exc, readonly=False)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("insufficient funds"),
        KeyError("account"),
        FileNotFoundError(2, "No such file or directory"),  # an OSError, but not the network
        NotReady("not ready"),
        DatabaseUnavailable("circuit open", retry_after=1.0),
        DeadlineExceeded("deadline exceeded"),  # a TimeoutError, but pgwarden's verdict
        AcquireTimeout("no connection in time"),
        HandleClosed("closed"),
        OutcomeUnknown("may have run"),
        AmbiguousCommitError("lost during COMMIT", txid=7),
    ],
)
def test_the_callers_own_exceptions_and_pgwardens_verdicts_are_not(exc: Exception) -> None:
    assert not _database_failure(exc, readonly=False)


def test_a_failure_counted_by_a_nested_level_is_not_counted_again() -> None:
    exc = psycopg.errors.DeadlockDetected("deadlock detected")
    _mark_counted(exc)
    assert not _database_failure(exc, readonly=False)
    assert _database_failure(psycopg.errors.DeadlockDetected("another"), readonly=False)


def test_a_write_refused_by_a_read_only_transaction_is_the_callers() -> None:
    refused = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT")
    assert not _database_failure(refused, readonly=True)
    assert _database_failure(refused, readonly=False)  # read-write: a standby (failover)


def frame(deadline: float | None, explicit: bool) -> _Open:
    fake: Any = None
    return _Open(fake, fake, None, False, deadline, explicit)


@pytest.mark.parametrize(
    ("outer", "outer_explicit", "nested", "nested_explicit", "expected"),
    [
        # an explicit outer bound: a nested one may only be shorter
        (100.0, True, 130.0, False, (100.0, None)),  # no bound of its own: inherit
        (100.0, True, 50.0, True, (50.0, 50.0)),  # shorter: the server enforces it
        (100.0, True, 200.0, True, (100.0, None)),  # longer: the outer's, already enforced
        (100.0, True, 100.0, True, (100.0, None)),
        # only the default_timeout backstop bounds the outer (client side)
        (100.0, False, 200.0, True, (100.0, 100.0)),
        (100.0, False, 50.0, True, (50.0, 50.0)),
        (100.0, False, 130.0, False, (100.0, None)),
        # no bound at all outside
        (None, False, 50.0, True, (50.0, 50.0)),
        (None, False, None, False, (None, None)),
    ],
)
def test_nested_deadline_never_extends_the_outer(
    outer: float | None,
    outer_explicit: bool,
    nested: float | None,
    nested_explicit: bool,
    expected: tuple[float | None, float | None],
) -> None:
    assert frame(outer, outer_explicit).bounds(nested, nested_explicit) == expected
