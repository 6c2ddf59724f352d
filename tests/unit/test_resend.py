"""StatementSafety: when a single statement may be sent again (pure)."""

from __future__ import annotations

import pytest

from pgwarden.core.classify import FailureKind
from pgwarden.core.resend import READ_ONLY_VIOLATION, StatementSafety, Verdict, Wrap

K = FailureKind


@pytest.mark.parametrize(
    ("writes", "idempotent", "explicit", "wrap"),
    [
        (None, False, False, Wrap.NONE),  # a read by text: one round trip
        (None, False, True, Wrap.NONE),  # the same under a deadline (it only changes the time)
        (True, False, False, Wrap.NONE),
        (True, False, True, Wrap.WRITE),  # a write under a deadline: COMMIT resolvable by id
        (False, False, True, Wrap.NONE),  # the caller vouched
        (None, True, True, Wrap.NONE),
        (True, True, True, Wrap.NONE),  # idempotent: repeating it is harmless
        (True, True, False, Wrap.NONE),
    ],
)
def test_first_attempt_wrap(
    writes: bool | None, idempotent: bool, explicit: bool, wrap: Wrap
) -> None:
    assert StatementSafety(writes, idempotent, explicit).wrap() is wrap


@pytest.mark.parametrize("explicit", [False, True])
def test_a_deadline_does_not_change_how_a_read_is_sent(explicit: bool) -> None:
    s = StatementSafety(None, False, explicit)
    assert s.wrap() is Wrap.NONE
    assert s.after_failure(K.LOST, None, Wrap.NONE) is Verdict.DECIDE
    assert s.wrap() is Wrap.READ_ONLY  # once it may have run, with or without a deadline


def test_an_unproven_read_that_may_have_run_is_resent_read_only() -> None:
    s = StatementSafety(None, False, False)
    assert s.after_failure(K.LOST, None, Wrap.NONE) is Verdict.DECIDE
    assert s.may_have_run
    assert s.wrap() is Wrap.READ_ONLY
    assert not s.retry_context().is_write  # so the retry table allows the retry
    # The read-only retry is refused: it writes, and the first attempt may have run.
    assert s.after_failure(K.FAILOVER, READ_ONLY_VIOLATION, Wrap.READ_ONLY) is (
        Verdict.OUTCOME_UNKNOWN
    )
    assert s.writes is True


def test_a_refused_read_only_attempt_that_followed_nothing_goes_again_as_a_write() -> None:
    # Nothing before the refused attempt may have run: sending it as a write is safe.
    s = StatementSafety(None, False, True)
    assert s.after_failure(K.FAILOVER, READ_ONLY_VIOLATION, Wrap.READ_ONLY) is Verdict.AS_WRITE
    assert s.wrap() is Wrap.WRITE


def test_a_lost_read_only_attempt_proves_nothing_was_written() -> None:
    s = StatementSafety(None, False, True)
    assert s.after_failure(K.LOST, None, Wrap.READ_ONLY) is Verdict.DECIDE
    assert not s.may_have_run
    assert s.after_failure(K.FAILOVER, READ_ONLY_VIOLATION, Wrap.READ_ONLY) is Verdict.AS_WRITE


@pytest.mark.parametrize("kind", [K.NOTHING_RAN, K.STALE, K.CONFLICT, K.TIMEOUT, K.PERMANENT])
def test_failures_that_ran_nothing_keep_the_usual_decision(kind: FailureKind) -> None:
    s = StatementSafety(None, False, False)
    assert s.after_failure(kind, None, Wrap.NONE) is Verdict.DECIDE
    assert not s.may_have_run
    w = StatementSafety(True, False, False)
    assert w.after_failure(kind, None, Wrap.NONE) is Verdict.DECIDE


def test_a_write_lost_after_it_was_sent_has_an_unknown_outcome_unless_idempotent() -> None:
    assert StatementSafety(True, False, False).after_failure(K.LOST, None, Wrap.NONE) is (
        Verdict.OUTCOME_UNKNOWN
    )
    idem = StatementSafety(True, True, False)
    assert idem.after_failure(K.LOST, None, Wrap.NONE) is Verdict.DECIDE
    assert idem.retry_context().idempotent


def test_25006_outside_a_read_only_attempt_is_left_to_the_classifier() -> None:
    # A write sent to a standby after failover: the usual FAILOVER handling.
    s = StatementSafety(True, False, True)
    assert s.after_failure(K.FAILOVER, READ_ONLY_VIOLATION, Wrap.WRITE) is Verdict.DECIDE
