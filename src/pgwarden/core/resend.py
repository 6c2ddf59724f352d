"""When a single statement may be sent again: only if it cannot have written.

SQL text is a guess, not proof: ``SELECT add_row(1)`` reads as a read and
inserts a row. So a statement is *sent again* after it may have reached the
server only when the server enforced that it could not write, or the caller
said so:

* the caller says it writes (``write=True``) or the text says so: never re-sent
  once it may have run (`Verdict.OUTCOME_UNKNOWN`), unless ``idempotent=True``;
* the caller says it does not write (``write=False``) or that repeating it is
  harmless (``idempotent=True``): re-sent by the usual rules;
* a read by its text alone is *unproven*. Its first attempt costs nothing
  extra (one round trip in autocommit, with or without a deadline). Once an attempt may
  have run, every later attempt is sent inside ``BEGIN READ ONLY``, so the
  server refuses it if it writes (SQLSTATE 25006). A refusal proves it writes:
  if an earlier attempt may have run, its outcome is unknown; if not (the
  refused attempt was the first), nothing ran and it is sent again as a write.

`StatementSafety` is that rule for one call, pure and without I/O; the
shells ask it how to send each attempt (`Wrap`) and what a failure means.
"""

from __future__ import annotations

import enum
from typing import Final

from pgwarden.core.failures import FailureKind, RetryContext

__all__ = ["READ_ONLY_VIOLATION", "StatementSafety", "Verdict", "Wrap"]

#: ``read_only_sql_transaction``: the server refused a write in a read-only
#: transaction (an INSERT, ``nextval()``, a function that writes, ...).
READ_ONLY_VIOLATION = "25006"


class Wrap(enum.Enum):
    """How one attempt of a single statement is sent."""

    NONE = "none"  # as is, in autocommit: one round trip (a deadline is a cancel)
    READ_ONLY = "read_only"  # BEGIN READ ONLY, statement, COMMIT: the server refuses a write
    WRITE = "write"  # BEGIN, txid, statement; then COMMIT, resolved by txid if lost


class Verdict(enum.Enum):
    """What a failed attempt means, before the retry decision."""

    DECIDE = "decide"  # the usual retry decision applies
    AS_WRITE = "as_write"  # nothing ran and the statement writes: send it again as a write
    OUTCOME_UNKNOWN = "outcome_unknown"  # it may have written: never send it again


class StatementSafety:
    """What is known about one call's statement, updated attempt by attempt.

    *writes*: True (the caller or the text says it writes, or the server proved
    it), False (the caller vouched it does not), None (a read by its text only).
    *explicit*: the caller set a deadline, so a write runs in a transaction whose
    COMMIT can be resolved by id.

    *idempotent* and *explicit* are fixed (``Final``); the rest is what the
    attempts taught. A plain class with ``__slots__`` rather than a dataclass: one
    is built per call, and the dataclass cost ~0.6 ms to define at import.
    Compared by identity (nothing compares them).
    """

    __slots__ = ("explicit", "idempotent", "lost_error", "may_have_run", "writes")
    idempotent: Final[bool]
    explicit: Final[bool]

    def __init__(
        self,
        writes: bool | None,
        idempotent: bool,
        explicit: bool,
        may_have_run: bool = False,
        lost_error: BaseException | None = None,
    ) -> None:
        self.writes = writes
        self.idempotent = idempotent
        self.explicit = explicit
        #: An attempt of an unproven read may have reached the server.
        self.may_have_run = may_have_run
        #: The failure of that attempt: the cause to report if its outcome turns out unknown.
        self.lost_error = lost_error

    def __repr__(self) -> str:
        return (
            f"StatementSafety(writes={self.writes!r}, idempotent={self.idempotent!r}, "
            f"explicit={self.explicit!r}, may_have_run={self.may_have_run!r}, "
            f"lost_error={self.lost_error!r})"
        )

    def wrap(self) -> Wrap:
        """How to send the next attempt."""
        if self.writes is True and not self.idempotent:
            return Wrap.WRITE if self.explicit else Wrap.NONE
        if self.writes is None and not self.idempotent and self.may_have_run:
            return Wrap.READ_ONLY
        return Wrap.NONE

    def retry_context(self) -> RetryContext:
        """The context for the retry table: an unproven read counts as a read,
        because every attempt after one that may have run is read-only."""
        return RetryContext(
            is_write=self.writes is True,
            idempotent=self.idempotent or self.writes is False,
        )

    def after_failure(
        self,
        kind: FailureKind,
        sqlstate: str | None,
        wrap: Wrap,
        error: BaseException | None = None,
    ) -> Verdict:
        """Learn from the attempt sent as *wrap* that failed with *kind* (*error*)."""
        if wrap is Wrap.READ_ONLY and sqlstate == READ_ONLY_VIOLATION:
            self.writes = True
            return Verdict.OUTCOME_UNKNOWN if self.may_have_run else Verdict.AS_WRITE
        if wrap is Wrap.NONE and kind is FailureKind.LOST and not self.idempotent:
            if self.writes is True:
                return Verdict.OUTCOME_UNKNOWN
            if self.writes is None and not self.may_have_run:
                self.may_have_run = True
                self.lost_error = error
        return Verdict.DECIDE
