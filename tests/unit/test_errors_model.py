"""The public error model: the hierarchy callers catch, and what `pgwarden` exports.

Pure checks, no I/O. docs/errors.md explains each class; these tests pin the shape
that the table there relies on, so a class moved under another base fails here first.
"""

from __future__ import annotations

import pytest

import pgwarden
import pgwarden.errors
from pgwarden import (
    AcquireTimeout,
    AmbiguousCommitError,
    DatabaseUnavailable,
    DatabaseUnusable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
    PgwardenError,
    SettingsError,
)

ALL_ERRORS: tuple[type[PgwardenError], ...] = (
    AcquireTimeout,
    AmbiguousCommitError,
    DatabaseUnavailable,
    DatabaseUnusable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
    PgwardenError,
    SettingsError,
)

UNUSABLE: tuple[type[PgwardenError], ...] = (
    NotReady,
    DatabaseUnavailable,
    DeadlineExceeded,
    AcquireTimeout,
    HandleClosed,
)

# Errors that say something about the *outcome* of work (did it run, did it commit):
# none of them is "the database could not be used", so a 503 handler never swallows one.
OUTCOME: tuple[type[PgwardenError], ...] = (NotCommitted, OutcomeUnknown, AmbiguousCommitError)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_exported_at_top_level(cls: type[PgwardenError]) -> None:
    name = cls.__name__
    assert name in pgwarden.__all__
    assert name in pgwarden.errors.__all__
    assert getattr(pgwarden, name) is cls
    assert getattr(pgwarden.errors, name) is cls
    assert name in dir(pgwarden)


def test_errors_module_exports_exactly_the_public_errors() -> None:
    assert sorted(pgwarden.errors.__all__) == sorted(c.__name__ for c in ALL_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_a_pgwarden_error(cls: type[PgwardenError]) -> None:
    assert issubclass(cls, PgwardenError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize("cls", UNUSABLE, ids=lambda c: c.__name__)
def test_database_unusable_family(cls: type[PgwardenError]) -> None:
    assert issubclass(cls, DatabaseUnusable)
    assert not issubclass(cls, OutcomeUnknown)
    assert not issubclass(cls, NotCommitted)


@pytest.mark.parametrize("cls", OUTCOME, ids=lambda c: c.__name__)
def test_outcome_errors_are_not_database_unusable(cls: type[PgwardenError]) -> None:
    assert not issubclass(cls, DatabaseUnusable)
    assert not issubclass(cls, TimeoutError)


def test_ambiguous_commit_is_an_outcome_unknown() -> None:
    assert issubclass(AmbiguousCommitError, OutcomeUnknown)
    error = AmbiguousCommitError("lost during COMMIT", txid=1234)
    assert isinstance(error, OutcomeUnknown)
    assert error.txid == 1234
    assert str(error) == "lost during COMMIT"


def test_not_committed_and_outcome_unknown_are_unrelated() -> None:
    # "certainly not committed" and "may have happened" must never be caught as each other.
    assert not issubclass(NotCommitted, OutcomeUnknown)
    assert not issubclass(OutcomeUnknown, NotCommitted)
    assert not issubclass(AmbiguousCommitError, NotCommitted)


def test_outcome_unknown_carries_txid() -> None:
    assert OutcomeUnknown("lost").txid is None
    assert OutcomeUnknown("lost", txid=7).txid == 7


def test_deadline_exceeded_is_a_timeout_error() -> None:
    assert issubclass(DeadlineExceeded, TimeoutError)
    assert issubclass(DeadlineExceeded, DatabaseUnusable)
    cause = ValueError("last attempt")
    error = DeadlineExceeded("deadline exceeded", last_error=cause)
    assert isinstance(error, TimeoutError)
    assert error.last_error is cause
    assert DeadlineExceeded("no attempt").last_error is None


def test_acquire_timeout_is_a_deadline_exceeded() -> None:
    assert issubclass(AcquireTimeout, DeadlineExceeded)
    assert issubclass(AcquireTimeout, TimeoutError)
    assert AcquireTimeout("no connection", last_error=None).last_error is None


def test_database_unavailable_carries_retry_after() -> None:
    assert DatabaseUnavailable("open").retry_after is None
    assert DatabaseUnavailable("open", retry_after=1.5).retry_after == 1.5


def test_settings_error_is_a_value_error_not_unusable() -> None:
    assert issubclass(SettingsError, ValueError)
    assert not issubclass(SettingsError, DatabaseUnusable)
    assert not issubclass(SettingsError, OutcomeUnknown)


def test_the_families_do_not_overlap() -> None:
    for cls in ALL_ERRORS:
        bases = (DatabaseUnusable, OutcomeUnknown, NotCommitted)
        families = [base for base in bases if issubclass(cls, base)]
        assert len(families) <= 1, (cls, families)
