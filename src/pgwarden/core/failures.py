"""The words failures are described in, and which of them may be re-run.

`FailureKind` (what a failure means for safety), `Phase` (where in a unit of
work it happened), `RetryContext` (what the caller was doing), `sqlstate_of`,
and the retry table: `is_retryable` for a single statement and
`is_transaction_retryable` for a whole transaction.

Mapping an exception to its kind is `pgwarden.core.classify`'s job, and runs
only after a failure; this module is what every call needs, so a first query
loads it and not the classifier's rule tables (see docs/decisions.md, "The
failure vocabulary is apart from the classifier").
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

__all__ = [
    "FailureKind",
    "Phase",
    "RetryContext",
    "is_retryable",
    "is_transaction_retryable",
    "sqlstate_of",
]


class FailureKind(enum.Enum):
    """What a failure means for safety; `pgwarden.core.classify` gives the rules that
    map an exception to one."""

    NOTHING_RAN = "nothing_ran"
    OVERLOAD = "overload"
    STALE = "stale"
    LOST = "lost"
    LOST_COMMIT = "lost_commit"
    CONFLICT = "conflict"
    FAILOVER = "failover"
    PERMANENT = "permanent"
    TIMEOUT = "timeout"


class Phase(enum.Enum):
    """Where in a unit of work the failure happened.

    CONNECT: opening a connection. FIRST_USE: the first statement on a pooled
    connection that sat idle. STATEMENT: any other statement. COMMIT: after
    COMMIT was sent.
    """

    CONNECT = "connect"
    FIRST_USE = "first_use"
    STATEMENT = "statement"
    COMMIT = "commit"


def sqlstate_of(exc: BaseException) -> str | None:
    """Return the exception's five-character SQLSTATE, or ``None``.

    Reads ``exc.sqlstate`` (psycopg, asyncpg), ``exc.pgcode`` (psycopg2) and
    ``exc.diag.sqlstate``. Never raises.
    """
    try:
        for value in (
            getattr(exc, "sqlstate", None),
            getattr(exc, "pgcode", None),
            getattr(getattr(exc, "diag", None), "sqlstate", None),
        ):
            if isinstance(value, str):
                code = value.upper()
                # Five of [0-9A-Z]: an ASCII, alphanumeric, upper-cased string is exactly
                # that (no regex to compile at import, and cheaper per call).
                if len(code) == 5 and code.isascii() and code.isalnum():
                    return code
    except Exception:  # a broken property on a foreign exception must not break us
        return None
    return None


class RetryContext:
    """What the caller is doing, as far as retry safety goes.

    ``is_write``: the statement may change data (see `pgwarden.core.sqltext.is_write_sql`).
    ``idempotent``: the caller vouches that running it twice is harmless.
    ``in_transaction``: it runs inside an explicit transaction block.

    Immutable (``Final``: mypy rejects reassignment). A plain class, not a frozen
    dataclass, which costs more to define at import and to build (one per failed
    attempt of a single statement). Compared by identity: nothing compares or
    hashes contexts.
    """

    __slots__ = ("idempotent", "in_transaction", "is_write")
    is_write: Final[bool]
    idempotent: Final[bool]
    in_transaction: Final[bool]

    def __init__(
        self, is_write: bool, idempotent: bool = False, in_transaction: bool = False
    ) -> None:
        self.is_write = is_write
        self.idempotent = idempotent
        self.in_transaction = in_transaction

    def __repr__(self) -> str:
        return (
            f"RetryContext(is_write={self.is_write!r}, idempotent={self.idempotent!r}, "
            f"in_transaction={self.in_transaction!r})"
        )


# (kind) -> (read, write, idempotent write) outside a transaction.
_RETRY_TABLE: Final[Mapping[FailureKind, tuple[bool, bool, bool]]] = {
    FailureKind.NOTHING_RAN: (True, True, True),
    FailureKind.OVERLOAD: (True, True, True),
    FailureKind.STALE: (True, True, True),
    FailureKind.LOST: (True, False, True),
    FailureKind.LOST_COMMIT: (False, False, False),
    FailureKind.CONFLICT: (True, True, True),
    FailureKind.FAILOVER: (True, True, True),
    FailureKind.PERMANENT: (False, False, False),
    FailureKind.TIMEOUT: (False, False, False),
}


def is_retryable(kind: FailureKind, ctx: RetryContext) -> bool:
    """May a single statement that failed with *kind* be re-run as is?

    ============ ==== ===== ================ ==============
    kind         read write idempotent write in transaction
    ============ ==== ===== ================ ==============
    NOTHING_RAN  yes  yes   yes              no
    OVERLOAD     yes  yes   yes              no
    STALE        yes  yes   yes              no
    LOST         yes  no    yes              no
    LOST_COMMIT  no   no    no               no
    CONFLICT     yes  yes   yes              no
    FAILOVER     yes  yes   yes              no
    PERMANENT    no   no    no               no
    TIMEOUT      no   no    no               no
    ============ ==== ===== ================ ==============

    Writes are re-run only when nothing can have reached a live backend, or
    when the server answered with an error (CONFLICT, FAILOVER: an error reply
    outside a transaction block means the statement was rolled back), or when
    the caller vouched with ``idempotent=True``. Inside a transaction nothing
    is re-run statement by statement: the transaction is already aborted or
    its connection gone, so ``run_transaction`` re-runs the whole function
    instead (see :func:`is_transaction_retryable`). LOST_COMMIT is resolved by
    transaction id, never by re-running. FAILOVER assumes the shell drained
    the pool first, so the retry reaches the new primary.
    """
    if ctx.in_transaction:
        return False
    read, write, idempotent_write = _RETRY_TABLE[kind]
    if not ctx.is_write:
        return read
    return idempotent_write if ctx.idempotent else write


_TRANSACTION_RETRYABLE: Final = frozenset(
    {
        FailureKind.NOTHING_RAN,
        FailureKind.OVERLOAD,
        FailureKind.STALE,
        FailureKind.LOST,
        FailureKind.CONFLICT,
        FailureKind.FAILOVER,
    }
)


def is_transaction_retryable(kind: FailureKind) -> bool:
    """May ``run_transaction`` re-run the whole transaction function after *kind*?

    Yes for every kind where the transaction certainly did not commit: the
    connection dropped before COMMIT was sent (the server rolls back), or the
    server reported a conflict, overload or read-only standby. No for
    LOST_COMMIT (resolve it first), PERMANENT and TIMEOUT.
    """
    return kind in _TRANSACTION_RETRYABLE
