"""``run_transaction()``: re-run a whole SQLAlchemy unit of work when that is safe.

    result = run_transaction(Session, lambda session: transfer(session, a, b, 10))
    result = await run_transaction_async(AsyncSession, transfer_async)

*fn* gets a `Session` in a transaction (``session.begin()``) from the session factory,
or a `Connection` in one (``engine.begin()``) from an engine, and its transaction
commits when it returns. The whole function runs again, on a new session and
connection, after a failure that certainly did not commit:

* serialization failures and deadlocks (40001, 40P01), at any statement or at COMMIT;
* a connection lost before COMMIT was sent (the server rolls the transaction back),
  or a server that turned read-only (25006, a failover: the pool is drained first);
* a COMMIT whose connection was lost and that ``txid_status()`` resolved as aborted
  (`NotCommitted`; the dialect resolves every lost COMMIT, see ``dialect.py``).

Never after a COMMIT that may have committed: resolved as committed, the call returns
normally; unresolved, `AmbiguousCommitError` propagates. Nor after anything else:
an `IntegrityError`, your own exceptions and pgwarden's verdicts (`DatabaseUnusable`:
no connection in time, breaker open, deadline passed) propagate at once.

Every re-run is inside the deadline (``timeout=`` or an enclosing ``pgwarden.deadline()``,
which also bounds each attempt's acquire and statements; without either, the handle's
``default_timeout`` bounds the retrying) and pgwarden's retry budget, with its backoff;
*attempts* defaults to ``max(retry_attempts, 5)``. Each failed attempt is counted once
(``stats()["counters"]["errors"]``) and each re-run as a retry.

Return plain values from *fn*: ORM objects are expired when its session closes.
A run_transaction() inside another one (same task or thread) raises RuntimeError; use
``session.begin_nested()`` in the outer function.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from time import monotonic
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from pgwarden.core.deadline import Deadline, current_deadline, deadline
from pgwarden.errors import DatabaseUnusable, NotCommitted, OutcomeUnknown
from pgwarden.sqlalchemy._context import running_transaction
from pgwarden.sqlalchemy.dialect import HANDLE, READ_ONLY_REFUSAL, REPORTED, _Pgwarden

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from pgwarden._async.database import AsyncDatabase
    from pgwarden._sync.database import Database

__all__ = ["run_transaction", "run_transaction_async"]

T = TypeVar("T")


@overload
def run_transaction(
    target: Engine,
    fn: Callable[[Connection], T],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T: ...
@overload
def run_transaction(
    target: Callable[[], Session],
    fn: Callable[[Session], T],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T: ...
def run_transaction(
    target: Engine | Callable[[], Session],
    fn: Callable[[Any], T],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T:
    """Run ``fn(session)`` (a session factory) or ``fn(connection)`` (an `Engine`) in a
    transaction, re-running the whole of it when it certainly did not commit."""
    run = _Run(target, attempts)
    with running_transaction(), _scope(timeout):
        while True:
            try:
                with run.unit() as unit:
                    return fn(unit)
            except Exception as exc:
                failure = run.failed(exc)
                # Sleeps the backoff before the next attempt, or raises.
                cast("Database", failure.db).rerun_after_failure(exc, **failure.how)


@overload
async def run_transaction_async(
    target: AsyncEngine,
    fn: Callable[[AsyncConnection], Awaitable[T]],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T: ...
@overload
async def run_transaction_async(
    target: Callable[[], AsyncSession],
    fn: Callable[[AsyncSession], Awaitable[T]],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T: ...
async def run_transaction_async(
    target: AsyncEngine | Callable[[], AsyncSession],
    fn: Callable[[Any], Awaitable[T]],
    *,
    timeout: float | None = None,
    attempts: int | None = None,
) -> T:
    """`run_transaction` for asyncio: an `async_sessionmaker` (``fn(session)``) or an
    `AsyncEngine` (``fn(connection)``); *fn* is a coroutine function."""
    run = _Run(target, attempts)
    with running_transaction(), _scope(timeout):
        while True:
            try:
                async with run.unit_async() as unit:
                    return await fn(unit)
            except Exception as exc:
                failure = run.failed(exc)
                # Sleeps the backoff before the next attempt, or raises.
                await cast("AsyncDatabase", failure.db).rerun_after_failure(exc, **failure.how)


class _Failure(NamedTuple):
    """A failed attempt: its handle, and the arguments of its ``rerun_after_failure``."""

    db: Any
    how: dict[str, Any]


def _scope(timeout: float | None) -> AbstractContextManager[Deadline | None]:
    return nullcontext() if timeout is None else deadline(timeout)


class _Run:
    """One run_transaction() call: its units of work and its retry decisions."""

    def __init__(self, target: Any, attempts: int | None) -> None:
        single = (
            Connection,
            *_loaded("sqlalchemy.orm", "Session"),
            *_loaded("sqlalchemy.ext.asyncio", "AsyncSession", "AsyncConnection"),
        )
        if isinstance(target, single):
            raise TypeError(
                f"run_transaction needs a session factory or an engine, not a "
                f"{type(target).__name__}: a re-run needs a fresh session"
            )
        if not (isinstance(target, _engines()) or callable(target)):
            raise TypeError(f"run_transaction needs a session factory or an engine: {target!r}")
        if attempts is not None and attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.target = target
        self.attempts = attempts
        self.started = monotonic()
        self.attempt = 1
        #: The bind of the last session made (to find the handle of a failure that
        #: does not carry it).
        self.bind: Any = target if isinstance(target, _engines()) else None

    @contextmanager
    def unit(self) -> Iterator[Any]:
        from sqlalchemy.orm import Session

        target = self.target
        if isinstance(target, Engine):
            with target.begin() as connection:
                yield connection
            return
        with target() as session:
            if not isinstance(session, Session):
                raise TypeError(f"the session factory returned {session!r}, not a Session")
            self._note_bind(session)
            with session.begin():
                yield session

    @asynccontextmanager
    async def unit_async(self) -> AsyncIterator[Any]:
        from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

        target = self.target
        if isinstance(target, AsyncEngine):
            async with target.begin() as connection:
                yield connection
            return
        async with target() as session:
            if not isinstance(session, AsyncSession):
                raise TypeError(f"the session factory returned {session!r}, not an AsyncSession")
            self._note_bind(session.sync_session)
            async with session.begin():
                yield session

    def _note_bind(self, session: Session) -> None:
        try:
            self.bind = session.get_bind()
        except sa_exc.UnboundExecutionError:  # binds per mapper only
            self.bind = None

    def failed(self, exc: Exception) -> _Failure:
        """The handle to ask whether to re-run after attempt ``self.attempt`` failed with
        *exc*, and how to ask it; raises *exc* when it is not the database failing."""
        failure = _database_failure(exc)
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
        how = {
            "cause": failure,
            "attempt": self.attempt,
            "deadline": bound,
            "attempts": self.attempts,
            "connection_lost": bool(getattr(exc, "connection_invalidated", False)),
            # The dialect acted on it (a failover drained) when it saw it.
            "reported": getattr(failure, REPORTED, None) is not None,
        }
        self.attempt += 1
        return _Failure(db, how)

    def _handle(self, failure: BaseException) -> Database | AsyncDatabase | None:
        db = getattr(failure, HANDLE, None)
        if db is not None:
            return db  # type: ignore[no-any-return]
        bind = self.bind
        engine = getattr(bind, "sync_engine", bind)
        dialect = getattr(engine, "dialect", None)
        if not isinstance(dialect, _Pgwarden):
            return None
        return dialect.pgwarden_handle


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    """Classes of *module* if something imported it already, else none: no instance of
    them can exist otherwise (so that a sync run_transaction never imports the asyncio
    extension and the ORM it brings, about 0.1 s of a cold start)."""
    found = sys.modules.get(module)
    return () if found is None else tuple(getattr(found, name) for name in names)


def _engines() -> tuple[type, ...]:
    return (Engine, *_loaded("sqlalchemy.ext.asyncio", "AsyncEngine"))


def _database_failure(exc: Exception) -> BaseException | None:
    """The exception to classify when *exc* is the database failing this attempt
    (for a SQLAlchemy error, the driver's); None when it is the caller's own, a
    verdict of pgwarden's, or a write the caller's read-only transaction refused."""
    if isinstance(exc, (DatabaseUnusable, OutcomeUnknown)):
        return None
    if isinstance(exc, NotCommitted):
        return exc
    failure: BaseException | None = exc
    if isinstance(exc, sa_exc.DBAPIError):
        failure = exc.orig
    if isinstance(failure, _loaded("psycopg", "Error")):
        return None if getattr(failure, READ_ONLY_REFUSAL, False) else failure
    if isinstance(failure, (ConnectionError, TimeoutError)):
        return failure
    return None
