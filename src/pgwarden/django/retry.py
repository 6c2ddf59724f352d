"""``atomic_retry()``: re-run a whole ``atomic()`` block when it certainly did not commit.

    @atomic_retry                          # or @atomic_retry(using="other", timeout=5)
    def transfer(a, b, amount):
        ...                                # runs in transaction.atomic(), re-run whole

    for attempt in atomic_retry(timeout=5):
        with attempt:                      # transaction.atomic() for this attempt
            ...

The block runs in ``transaction.atomic(using, savepoint, durable)`` and runs again, in a
new transaction (on a fresh connection when the old one was lost), after a failure that
certainly did not commit:

* serialization failures and deadlocks (40001, 40P01), at any statement or at COMMIT;
* a connection lost before COMMIT was sent (the server rolls the transaction back), or a
  server that turned read-only (25006, a failover: the pool is drained first);
* a COMMIT whose connection was lost and that pgwarden resolved as aborted
  (`NotCommitted`; the backend resolves every lost COMMIT).

Never after a COMMIT that may have committed: resolved as committed, the block counts
as done; unresolved, `AmbiguousCommitError` propagates. Nor after anything else: an
``IntegrityError``, your own exceptions and pgwarden's verdicts (`DatabaseUnusable`: no
connection in time, breaker open, deadline passed) propagate at once. Errors Django
wraps (``django.db.OperationalError`` and friends) are classified by the psycopg error
they wrap (``__cause__``).

Every re-run is inside the deadline (*timeout*, or an enclosing ``pgwarden.deadline()``;
without either, the handle's ``default_timeout`` bounds the retrying) and pgwarden's
retry budget, with its backoff; *attempts* defaults to ``max(retry_attempts, 5)``. Each
failed attempt is counted once (``stats()["counters"]["errors"]``) and each re-run as a
retry. Inside an enclosing ``atomic()`` block (a savepoint of someone else's
transaction, Django's ``TestCase`` included) the block runs once: a failure there is the
outer transaction's, which only its owner can re-run.

The loop form re-runs the block after a failure *inside* it. A failure *at COMMIT*
(`NotCommitted`, a 40001 raised by COMMIT) is raised from the ``with`` statement
instead: Python calls ``__exit__`` the same way at the end of the block and at a
``return`` inside it, so re-running there could make a ``return`` report a block that
did not commit. Use the decorator form to have those re-run too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.utils import Error as DjangoError

from pgwarden.core.deadline import current_deadline, deadline
from pgwarden.django._context import enter_attempt, leave_attempt
from pgwarden.django.base import HANDLE, KIND, LOST, READ_ONLY_REFUSAL, DatabaseWrapper
from pgwarden.errors import DatabaseUnusable, NotCommitted, OutcomeUnknown

if TYPE_CHECKING:
    from pgwarden._sync.database import Database

__all__ = ["AtomicRetry", "Attempt", "atomic_retry", "handle_of"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def handle_of(using: str | None = None) -> Database:
    """The pgwarden handle behind Django database *using* (default ``"default"``), for
    ``stats()``, ``health()``, exporters and the dashboard; made without I/O."""
    wrapper = connections[using or DEFAULT_DB_ALIAS]
    if not isinstance(wrapper, DatabaseWrapper):
        raise TypeError(
            f"database {using or DEFAULT_DB_ALIAS!r} does not use ENGINE 'pgwarden.django'"
        )
    return wrapper.pgwarden_handle


@overload
def atomic_retry(using: F) -> F: ...
@overload
def atomic_retry(
    using: str | None = None,
    *,
    savepoint: bool = True,
    durable: bool = False,
    timeout: float | None = None,
    attempts: int | None = None,
) -> AtomicRetry: ...
def atomic_retry(
    using: Any = None,
    *,
    savepoint: bool = True,
    durable: bool = False,
    timeout: float | None = None,
    attempts: int | None = None,
) -> Any:
    """``transaction.atomic()`` that re-runs the whole block when it certainly did not
    commit: a decorator (``@atomic_retry`` or ``@atomic_retry(...)``) or an iterable of
    attempts (``for attempt in atomic_retry(): with attempt: ...``). See the module
    docstring for what is re-run."""
    if callable(using):
        return AtomicRetry(None)(using)
    return AtomicRetry(
        using, savepoint=savepoint, durable=durable, timeout=timeout, attempts=attempts
    )


class AtomicRetry:
    """What `atomic_retry` returns: a decorator, and an iterable of `Attempt`s."""

    def __init__(
        self,
        using: str | None,
        *,
        savepoint: bool = True,
        durable: bool = False,
        timeout: float | None = None,
        attempts: int | None = None,
    ) -> None:
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.using = using or DEFAULT_DB_ALIAS
        self.savepoint = savepoint
        self.durable = durable
        self.timeout = timeout
        self.attempts = attempts

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            unit = _Run(self)
            while True:
                with unit.context():
                    try:
                        with unit.atomic():
                            result = fn(*args, **kwargs)
                    except Exception as exc:
                        unit.failed(exc)  # raises, or sleeps before the next attempt
                        continue
                return result

        return run  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Attempt]:
        unit = _Run(self)
        while not unit.done:
            attempt = Attempt(unit)
            yield attempt
            if not attempt.entered:
                raise RuntimeError(
                    "atomic_retry(): use each attempt as a context manager "
                    "(for attempt in atomic_retry(): with attempt: ...)"
                )


class Attempt:
    """One attempt of an `atomic_retry` loop: ``with attempt:`` runs the block in
    ``transaction.atomic()``; a failure that certainly did not commit is swallowed
    (after the backoff) and the loop goes on; anything else propagates."""

    def __init__(self, unit: _Run) -> None:
        self._unit = unit
        self._context: AbstractContextManager[None] | None = None
        self._atomic: Any = None
        self.entered = False

    def __enter__(self) -> Attempt:
        if self.entered:
            raise RuntimeError("an atomic_retry() attempt can be entered only once")
        self.entered = True
        unit = self._unit
        context = unit.context()
        context.__enter__()
        try:
            atomic = unit.atomic()
            atomic.__enter__()
        except BaseException:
            context.__exit__(None, None, None)
            raise
        self._context, self._atomic = context, atomic
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._context is not None
        try:
            if exc is None:
                self._atomic.__exit__(None, None, None)  # COMMIT: a failure raises here
                self._unit.done = True
                return False
            self._atomic.__exit__(exc_type, exc, tb)  # ROLLBACK
            if not isinstance(exc, Exception):
                return False  # KeyboardInterrupt, a cancellation: never re-run
            self._unit.failed(exc)  # raises, or sleeps before the next attempt
            return True
        finally:
            self._context.__exit__(None, None, None)


class _Run:
    """One atomic_retry() call: its attempts and its retry decisions."""

    def __init__(self, spec: AtomicRetry) -> None:
        self.spec = spec
        self.attempt = 1
        self.started = monotonic()
        self.done = False
        wrapper = connections[spec.using]
        #: Inside someone else's atomic block: run once, let its owner decide.
        self.nested = bool(wrapper.in_atomic_block)
        self.expires_at: float | None = None
        if spec.timeout is not None:
            self.expires_at = self.started + spec.timeout
            outer = current_deadline()
            if outer is not None:
                self.expires_at = min(self.expires_at, outer.expires_at)

    def atomic(self) -> Any:
        spec = self.spec
        return transaction.atomic(using=spec.using, savepoint=spec.savepoint, durable=spec.durable)

    @contextmanager
    def context(self) -> Iterator[None]:
        """Around each attempt: the call's deadline (one absolute time for every
        attempt) and the mark that the retry loop counts failures, not the backend."""
        token = enter_attempt()
        try:
            scope = (
                nullcontext()
                if self.expires_at is None
                else deadline(self.expires_at - monotonic())
            )
            with scope:
                yield
        finally:
            leave_attempt(token)

    def failed(self, exc: Exception) -> None:
        """Attempt ``self.attempt`` failed with *exc*: sleep before the next one, or
        raise (*exc* itself, or `DeadlineExceeded` from it when time ran out)."""
        failure = None if self.nested else _database_failure(exc)
        db = None if failure is None else self._handle(failure)
        if failure is None or db is None:
            raise exc
        settings = db.settings
        ctx = current_deadline()
        if ctx is not None:
            bound: float | None = ctx.expires_at
        else:
            backstop = settings.default_timeout
            bound = None if backstop is None else self.started + backstop
        attempt = self.attempt
        self.attempt += 1
        db.rerun_after_failure(  # sleeps the backoff before the next attempt, or raises
            exc,
            cause=failure,
            attempt=attempt,
            deadline=bound,
            attempts=self.spec.attempts,
            connection_lost=bool(getattr(failure, LOST, False)),
            # The backend classified it (and drained after a failover) when it saw it.
            reported=getattr(failure, KIND, None) is not None,
        )

    def _handle(self, failure: BaseException) -> Database | None:
        db = getattr(failure, HANDLE, None)
        if db is not None:
            return db  # type: ignore[no-any-return]
        wrapper = connections[self.spec.using]
        if isinstance(wrapper, DatabaseWrapper):
            return wrapper.pgwarden_handle
        return None


def _database_failure(exc: Exception) -> BaseException | None:
    """The exception to classify when *exc* is the database failing this attempt (for
    an error Django wraps, the psycopg error it wraps); None when it is the caller's
    own, a verdict of pgwarden's, or a write the caller's read-only transaction refused."""
    if isinstance(exc, (DatabaseUnusable, OutcomeUnknown)):
        return None
    if isinstance(exc, NotCommitted):
        return exc
    cause: BaseException | None = exc
    if isinstance(exc, DjangoError):
        cause = exc.__cause__
    if isinstance(cause, psycopg.Error):
        return None if getattr(cause, READ_ONLY_REFUSAL, False) else cause
    return None
