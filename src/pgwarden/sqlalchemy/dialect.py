"""``postgresql+pgwarden://``: SQLAlchemy's psycopg dialects on pgwarden's shared handle.

    engine = create_engine("postgresql+pgwarden://app:secret@db/app?pgwarden_max_size=5")
    engine = create_async_engine("postgresql+pgwarden://...")   # the asyncio variant

`PGDialect_pgwarden` and `PGDialectAsync_pgwarden` subclass SQLAlchemy's
``PGDialect_psycopg`` / ``PGDialectAsync_psycopg`` (so SQL, types, reflection and
the rest are SQLAlchemy's own) and change only where connections come from and go:

``connect()``
    ``checkout(autocommit=False, row_factory=tuple_row)`` from the process's pgwarden
    handle for the connection parameters and ``pgwarden_*`` settings
    (``pgwarden.connect(settings=..., adapters=<the dialect's AdaptersMap>)``): readiness
    awaited once, the breaker, pgwarden's validation (no round trip per checkout), leak
    watch and in-flight count; under ``pgwarden.deadline()`` the acquire and every byte
    until the connection is returned are bounded by it. SQLAlchemy's own pool is
    ``NullPool``: it holds nothing, pgwarden's pool does.
``do_close()`` / ``do_terminate()``
    ``checkout.release()`` (rolls back, restores pgwarden's shape, back to the pool) /
    ``checkout.discard()`` (an invalidated connection is closed, never returned; a
    soft-invalidated one is discarded when it comes back).
``do_execute*()``
    the first statement of each transaction under an explicit deadline first sends,
    pipelined with the implicit BEGIN, the transaction-local ``statement_timeout`` of
    the time left (safe behind PgBouncer); every statement is reported to the handle's
    statement observers (operation ``sqlalchemy``).
``do_commit()``
    with ``resolve_commits`` (the default), ``txid_current_if_assigned()`` before
    COMMIT; a COMMIT whose connection is lost is resolved by ``txid_status()`` on
    another connection: committed returns normally, aborted raises `NotCommitted`,
    unknown `AmbiguousCommitError`.
``handle_error`` (installed by ``engine_created``) and ``is_disconnect()``
    every statement error is classified by pgwarden, counted by kind, and marks the
    connection a disconnect when it is lost or the server is read-only (25006 outside a
    read-only transaction: a failover), which also drains pgwarden's pool so new
    connections find the new primary. A statement timeout or a sever at the caller's
    deadline is raised as `pgwarden.DeadlineExceeded`.

Connections are shared by every engine with the same connection parameters, pgwarden
settings and JSON/HSTORE configuration: such engines share one AdaptersMap (SQLAlchemy's
HSTORE registration reaches it, and connections made before it are brought up to date at
checkout), so the registry gives them one handle. An engine with "connect" listeners of
its own, or a pool class other than NullPool, gets a handle of its own instead, closed by
``engine.dispose()``: what it does to its sessions stays its own. ``docs/sqlalchemy.md``
has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGDialectAsync_psycopg
from sqlalchemy.pool import NullPool, Pool

import pgwarden
from pgwarden._handle.sql import MARKER_IF_ASSIGNED, SET_STATEMENT_TIMEOUT, statement_timeout_args
from pgwarden.core.classify import FailureKind, Phase, RetryContext, classify_failure, sqlstate_of
from pgwarden.core.commit import CommitOutcome
from pgwarden.core.deadline import current_deadline
from pgwarden.core.retry import RetryPolicy, deadline_ran_out
from pgwarden.errors import AmbiguousCommitError, NotCommitted, PgwardenError
from pgwarden.settings import Settings
from pgwarden.sqlalchemy._context import in_run_transaction
from pgwarden.sqlalchemy._params import split_connect_params

try:  # SQLAlchemy 2.1 names it await_; 2.0 await_only (kept in 2.1 as an alias)
    from sqlalchemy.util.concurrency import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_
from sqlalchemy.util.concurrency import in_greenlet

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine, ExceptionContext
    from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
    from sqlalchemy.engine.url import URL

    from pgwarden._async.acquire import AsyncCheckout
    from pgwarden._async.database import AsyncDatabase
    from pgwarden._sync.acquire import Checkout
    from pgwarden._sync.database import Database

    class _Base(PGDialect_psycopg):
        """Typed signatures of what we call on SQLAlchemy's psycopg dialect (an
        untyped module to mypy); at run time the mixin's base is plain ``object``."""

        _psycopg_adapters_map: Any

        def __init__(self, **kwargs: Any) -> None: ...
        def create_connect_args(self, url: URL) -> Any: ...
        def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None: ...
        def do_close(self, dbapi_connection: Any) -> None: ...
        def do_terminate(self, dbapi_connection: Any) -> None: ...
        def do_rollback(self, dbapi_connection: Any) -> None: ...
        def do_commit(self, dbapi_connection: Any) -> None: ...
        def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool: ...

else:
    _Base = object

__all__ = ["PGDialectAsync_pgwarden", "PGDialect_pgwarden", "PgwardenPool", "handle_of"]

logger = logging.getLogger("sqlalchemy.dialects.postgresql")

#: The attribute of a lent psycopg connection that holds its `_Lent` (None once returned).
_LENT = "_pgwarden_sqlalchemy"
#: Set on an exception that handle_error has classified, counted and acted on.
REPORTED = "_pgwarden_reported"
#: Set on a 25006 that a read-only transaction of the caller's raised: not a failover.
READ_ONLY_REFUSAL = "_pgwarden_read_only_refusal"
#: Set on an exception of a lent connection: the pgwarden handle it came from.
HANDLE = "_pgwarden_handle"

# Failures after which the connection is useless: SQLAlchemy must invalidate it.
_DISCONNECTS = frozenset(
    {FailureKind.STALE, FailureKind.LOST, FailureKind.LOST_COMMIT, FailureKind.FAILOVER}
)
_QUERY_CANCELED = "57014"
_READ_ONLY_SQL_TRANSACTION = "25006"
# handle_error counts a failure without deciding a retry: one attempt, no budget spent.
_COUNT_ONLY = RetryPolicy(attempts=1)
_STATEMENT = RetryContext(is_write=True, in_transaction=True)
_AUTOCOMMIT_STATEMENT = RetryContext(is_write=True)

# One AdaptersMap per (settings, JSON and HSTORE configuration): engines that agree on
# them share it, and so share one pgwarden handle (the registry keys on the map).
_maps_lock = threading.Lock()
_shared_maps: dict[tuple[Any, ...], Any] = {}


class PgwardenPool(NullPool):
    """SQLAlchemy's `NullPool` (it holds nothing: pgwarden's pool does the pooling) that
    also takes QueuePool's sizing arguments and ignores them, so an engine's existing
    ``pool_size``, ``max_overflow``, ``pool_timeout`` and ``pool_use_lifo`` need not be
    removed when switching (``pgwarden_max_size`` and ``acquire_timeout`` govern)."""

    def __init__(
        self,
        creator: Any,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        timeout: float | None = None,
        use_lifo: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(creator, **kwargs)


def _log_notices(diagnostic: psycopg.errors.Diagnostic) -> None:
    logger.info("%s: %s", diagnostic.severity, diagnostic.message_primary)


class _Lent:
    """What the dialect knows about a psycopg connection it has checked out."""

    __slots__ = ("checkout", "committing", "cursor_factory", "db", "discard", "loop")

    def __init__(
        self,
        checkout: Checkout | AsyncCheckout,
        db: Database | AsyncDatabase,
        cursor_factory: Any,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.checkout = checkout
        self.db = db
        #: The connection's own cursor factory while ours is set (None: untouched).
        self.cursor_factory = cursor_factory
        #: The event loop of an async checkout (a garbage-collected one is discarded on it).
        self.loop = loop
        self.discard = False  # soft-invalidated: close it instead of returning it
        self.committing = False

    def deadline(self) -> float | None:
        """The earlier of the checkout's deadline and the one in effect now."""
        bound: float | None = self.checkout.deadline
        ctx = current_deadline()
        if ctx is not None and (bound is None or ctx.expires_at < bound):
            bound = ctx.expires_at
        return bound


class _Target:
    """The handle (and per-connection extras) one set of connect parameters resolves to."""

    __slots__ = ("cargs", "cparams", "cursor_factory", "db", "pid", "private")

    def __init__(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        db: Database | AsyncDatabase,
        cursor_factory: Any,
        private: bool,
    ) -> None:
        self.cargs = cargs
        self.cparams = cparams
        self.db = db
        self.cursor_factory = cursor_factory
        #: The handle is this engine's alone (see `_Pgwarden._needs_own_handle`).
        self.private = private
        self.pid = os.getpid()

    def serves(self, cargs: tuple[Any, ...], cparams: Mapping[str, Any], private: bool) -> bool:
        return (
            self.pid == os.getpid()
            and self.private is private
            and self.db.state.value not in ("closing", "closed")
            and cargs == self.cargs
            and cparams == self.cparams
        )


def _driver(connection: Any) -> Any:
    """The psycopg connection behind a pool proxy, an asyncio adapter or itself."""
    return getattr(connection, "driver_connection", connection)


def _lent_of(driver: Any) -> _Lent | None:
    lent = getattr(driver, _LENT, None)
    return lent if isinstance(lent, _Lent) else None


def _lost(driver: Any) -> bool:
    return bool(driver.closed or driver.broken)


def _mark(exc: BaseException, name: str, value: object) -> None:
    with contextlib.suppress(Exception):  # an exception that refuses attributes
        setattr(exc, name, value)


class _Pgwarden(_Base):
    """What the sync and asyncio dialects share; I/O goes through the `_io_*` methods."""

    driver = "pgwarden"
    supports_statement_cache = True

    _pgwarden_target: _Target | None = None
    _pgwarden_events = False
    _sa_adapters_map: Any = None
    _private_adapters_map: Any = None
    # The engine (weakly) and how many "connect" listeners SQLAlchemy itself put on its
    # pool; more means the engine has its own, and so gets a handle of its own.
    _pgwarden_engine: Callable[[], Engine | None] = staticmethod(lambda: None)
    _pgwarden_own_connect = 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pgwarden_lock = threading.Lock()  # first connects may race (threads)
        # The map SQLAlchemy built for this dialect's JSON and inet configuration; the
        # first dialect of a configuration donates it as the shared one (see _adapters).
        self._sa_adapters_map = self._psycopg_adapters_map

    @classmethod
    def get_async_dialect_cls(cls, url: URL) -> type[PGDialectAsync_pgwarden]:
        # create_async_engine() asks the URL's class (sync or async) for this.
        return PGDialectAsync_pgwarden

    @classmethod
    def get_pool_class(cls, url: URL) -> type[Pool]:
        # pgwarden's pool is the pool; SQLAlchemy's must not hold connections.
        return PgwardenPool

    @classmethod
    def load_provisioning(cls) -> None:
        # SQLAlchemy's test framework looks for "<our package>.provision"; PostgreSQL's
        # hooks (schemas, temp tables, upserts) are SQLAlchemy's own.
        import sqlalchemy.dialects.postgresql.provision  # noqa: F401

    @classmethod
    def engine_created(cls, engine: Engine) -> None:
        dialect = engine.dialect
        # Called for the async dialect and again for the entry point's (sync) class.
        if not isinstance(dialect, _Pgwarden) or dialect._pgwarden_events:
            return
        dialect._pgwarden_events = True
        dialect._pgwarden_engine = weakref.ref(engine)
        dialect._pgwarden_own_connect = len(engine.pool.dispatch.connect)
        event.listen(engine, "handle_error", dialect._on_error)
        event.listen(engine.pool, "soft_invalidate", dialect._on_soft_invalidate)
        event.listen(engine, "engine_disposed", dialect._on_disposed)

    def _needs_own_handle(self) -> bool:
        """Must this engine's connections be its own? When the user put "connect"
        listeners on its pool (SQLAlchemy runs them at every checkout under NullPool,
        and what they do to a connection, a session SET, must not reach other engines),
        or chose a pool that keeps connections (StaticPool, QueuePool: their session
        state, temp tables included, is the engine's until it is disposed)."""
        engine = self._pgwarden_engine()
        if engine is None:
            return False
        pool = engine.pool
        return not isinstance(pool, NullPool) or (
            len(pool.dispatch.connect) > self._pgwarden_own_connect
        )

    def _on_disposed(self, engine: Engine) -> None:
        # engine.dispose(): a handle of the engine's own closes with it (a shared one is
        # other engines' too, and pgwarden replaces dead connections itself).
        target = self._pgwarden_target
        if target is not None and target.private:
            self._pgwarden_target = None
            self._io_close(target.db)

    # --- connection parameters -------------------------------------------------------------
    def create_connect_args(self, url: URL) -> Any:
        # Validate the pgwarden_* parameters now (create_engine raises for a typo);
        # they stay in cparams, merged with connect_args, and connect() reads them.
        split_connect_params({k: v for k, v in url.query.items() if k.startswith("pgwarden_")})
        return super().create_connect_args(url)

    def _resolve(self, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> _Target:
        private = self._needs_own_handle()
        cached = self._pgwarden_target
        if cached is not None and cached.serves(cargs, cparams, private):
            return cached
        with self._pgwarden_lock:
            return self._resolve_locked(cargs, cparams, private)

    def _resolve_locked(
        self, cargs: tuple[Any, ...], cparams: dict[str, Any], private: bool
    ) -> _Target:
        cached = self._pgwarden_target
        if cached is not None and cached.serves(cargs, cparams, private):
            return cached
        split = split_connect_params(cparams)
        base = cargs[0] if cargs and isinstance(cargs[0], str) else ""
        conninfo = make_conninfo(base, **split.libpq) if (base or split.libpq) else None
        settings = Settings.from_env(url=conninfo, **split.settings)
        adapters = self._adapters(settings, split.context, private)
        db = self._handle(settings, adapters)
        target = _Target(cargs, dict(cparams), db, split.cursor_factory, private)
        self._pgwarden_target = target
        return target

    def _adapters(self, settings: Settings, given: Any, private: bool) -> Any:
        """The AdaptersMap this dialect's connections start from: the caller's own
        ``context``, this engine's own (`_needs_own_handle`), or the one shared by
        every dialect of the same configuration."""
        if given is not None and given is not self._sa_adapters_map:
            self._psycopg_adapters_map = given
            return given
        if private:
            if self._private_adapters_map is None:
                from psycopg.adapt import AdaptersMap

                # A copy of the current map, HSTORE included once SQLAlchemy found it.
                self._private_adapters_map = AdaptersMap(self._psycopg_adapters_map)
            self._psycopg_adapters_map = self._private_adapters_map
            return self._private_adapters_map
        key = (
            settings,
            self._json_serializer,
            self._json_deserializer,
            getattr(self, "_native_inet_types", None),
            self.use_native_hstore,
        )
        with _maps_lock:
            shared = _shared_maps.setdefault(key, self._sa_adapters_map)
        # SQLAlchemy registers HSTORE on this attribute's map in initialize().
        self._psycopg_adapters_map = shared
        return shared

    def _handle(self, settings: Settings, adapters: Any) -> Database | AsyncDatabase:
        raise NotImplementedError

    @property
    def pgwarden_handle(self) -> Database | AsyncDatabase | None:
        """The pgwarden handle this dialect's last connection came from (None before)."""
        target = self._pgwarden_target
        return None if target is None else target.db

    def _lend(
        self,
        driver: Any,
        target: _Target,
        checkout: Checkout | AsyncCheckout,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """Make *driver* what SQLAlchemy expects and remember its checkout."""
        saved = None
        if target.cursor_factory is not None:
            saved = driver.cursor_factory
            driver.cursor_factory = target.cursor_factory
        info = self._psycopg_adapters_map.types.get("hstore")
        if info is not None and driver.adapters.types.get("hstore") is None:
            # Opened before SQLAlchemy registered HSTORE on the shared map.
            from psycopg.types.hstore import register_hstore

            register_hstore(info, driver)
        setattr(driver, _LENT, _Lent(checkout, target.db, saved, loop))

    def _take(self, connection: Any) -> _Lent | None:
        """The checkout of *connection*, forgotten (it is being returned)."""
        driver = _driver(connection)
        lent = _lent_of(driver)
        if lent is not None:
            setattr(driver, _LENT, None)
            if lent.cursor_factory is not None:
                driver.cursor_factory = lent.cursor_factory
        return lent

    def on_connect(self) -> Callable[[Any], None]:
        # SQLAlchemy's on_connect adds a notice handler per connect; with NullPool that
        # is per checkout, and pgwarden's connections live on: add it once.
        def setup(connection: Any) -> None:
            driver = _driver(connection)
            with contextlib.suppress(ValueError):
                driver.remove_notice_handler(_log_notices)
            driver.add_notice_handler(_log_notices)
            if self.isolation_level is not None:
                self.set_isolation_level(connection, self.isolation_level)

        return setup

    # --- returning connections -------------------------------------------------------------
    def do_close(self, dbapi_connection: DBAPIConnection) -> None:
        lent = self._take(dbapi_connection)
        if lent is not None:
            self._io_finish(lent, discard=lent.discard)
        elif not getattr(_driver(dbapi_connection), "_pgwarden_owned", False):
            super().do_close(dbapi_connection)
        # else: a pgwarden connection already returned (nothing to do: it is the pool's)

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        lent = self._take(dbapi_connection)
        if lent is not None:
            self._io_finish(lent, discard=True)
        elif not getattr(_driver(dbapi_connection), "_pgwarden_owned", False):
            super().do_terminate(dbapi_connection)

    def _on_soft_invalidate(self, dbapi_connection: Any, record: Any, exc: Any) -> None:
        lent = _lent_of(_driver(dbapi_connection))
        if lent is not None:
            lent.discard = True

    def do_rollback(self, dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        if driver is not None and getattr(driver, "_pgwarden_owned", False) and _lost(driver):
            return  # the server rolled back when the connection went; nothing to send
        super().do_rollback(dbapi_connection)

    # --- statements ------------------------------------------------------------------------
    def _before_statement(self, context: ExecutionContext | None) -> _Lent | None:
        """The checkout of the statement's connection; under a deadline, the first
        statement of a transaction gets the server-side timeout first."""
        if context is None:
            return None
        fairy = getattr(context.root_connection, "_dbapi_connection", None)
        driver = getattr(fairy, "driver_connection", None)
        if driver is None:
            return None
        lent = _lent_of(driver)
        if lent is None:
            return None
        deadline = lent.deadline()
        if (
            deadline is not None
            and not driver.autocommit
            and driver.info.transaction_status == TransactionStatus.IDLE
        ):
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise lent.db._state.deadline_error(None, "statement")
            self._io_set_timeout(driver, remaining)
        return lent

    def _observed(
        self, lent: _Lent, statement: str, cursor: Any, run: Callable[..., object], *args: Any
    ) -> None:
        """``run(*args)`` reported to the handle's statement observers."""
        observer = lent.db._statements.observer
        token = observer.statement_started("sqlalchemy", statement)
        try:
            run(*args)
        except BaseException as exc:
            observer.statement_finished(token, exc, None)
            raise
        observer.statement_finished(token, None, getattr(cursor, "rowcount", None))

    def do_execute(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        lent = self._before_statement(context)
        if lent is None:
            cursor.execute(statement, parameters)
        else:
            self._observed(lent, statement, cursor, cursor.execute, statement, parameters)

    def do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext | None = None
    ) -> None:
        lent = self._before_statement(context)
        if lent is None:
            cursor.execute(statement)
        else:
            self._observed(lent, statement, cursor, cursor.execute, statement)

    def do_executemany(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        lent = self._before_statement(context)
        if lent is None:
            cursor.executemany(statement, parameters)
        else:
            self._observed(lent, statement, cursor, cursor.executemany, statement, parameters)

    # --- COMMIT and its resolution ---------------------------------------------------------
    def do_commit(self, dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        lent = None if driver is None else _lent_of(driver)
        if (
            lent is None
            or driver.autocommit
            or driver.read_only
            or driver.info.transaction_status != TransactionStatus.INTRANS
        ):
            super().do_commit(dbapi_connection)
            return
        resolve = bool(lent.db.settings.resolve_commits)
        # txid NULL when the transaction wrote nothing: nothing to resolve then.
        marker = self._io_marker(driver) if resolve else None
        lent.committing = True
        try:
            super().do_commit(dbapi_connection)
        except psycopg.OperationalError as exc:
            kind = classify_failure(exc, Phase.COMMIT, connection_lost=_lost(driver))
            if kind is not FailureKind.LOST_COMMIT:
                raise  # a server-side failure (a deferred constraint, 40001): not ambiguous
            self._resolve_commit(lent, exc, marker, resolve=resolve)
        finally:
            lent.committing = False

    def _resolve_commit(
        self, lent: _Lent, exc: BaseException, marker: Sequence[Any] | None, *, resolve: bool
    ) -> None:
        state = lent.db._state
        if not resolve:
            state.ambiguous_commit("unknown")
            raise AmbiguousCommitError(
                "connection lost during COMMIT and commit resolution is off "
                f"(pgwarden_resolve_commits); the outcome is unknown ({state.describe_error(exc)})"
            ) from exc
        if marker is None or marker[0] is None:
            state.ambiguous_commit("committed")  # it wrote nothing: nothing can be lost
            return
        txid, started = marker[0], marker[1]
        deadline = lent.deadline()
        # The connection is gone: give its slot back first, so that asking on another
        # connection does not wait for it (a pool of one would wait out the deadline).
        taken = self._take(lent.checkout.connection)
        if taken is not None:
            self._io_finish(taken, discard=True)
        outcome = self._io_ask(lent.db, txid, started, deadline)
        state.ambiguous_commit(outcome.value)
        if outcome is CommitOutcome.COMMITTED:
            return
        if outcome is CommitOutcome.ABORTED:
            aborted = NotCommitted(
                "connection lost during COMMIT; the transaction was rolled back "
                f"({state.describe_error(exc)})"
            )
            _mark(aborted, HANDLE, lent.db)
            raise aborted from exc
        raise AmbiguousCommitError(
            f"connection lost during COMMIT and txid {txid} could not be resolved "
            f"({state.describe_error(exc)})",
            txid=txid,
        ) from exc

    # --- errors ----------------------------------------------------------------------------
    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        if super().is_disconnect(e, connection, cursor):
            return True
        if not isinstance(e, psycopg.Error):
            return False
        if sqlstate_of(e) == _READ_ONLY_SQL_TRANSACTION:
            driver = None if connection is None else _driver(connection)
            return not (driver is not None and driver.read_only)
        return classify_failure(e, Phase.STATEMENT) in _DISCONNECTS

    def _on_error(self, ctx: ExceptionContext) -> BaseException | None:
        """handle_error: classify, count, drain on failover, mark the disconnect; a
        failure at the caller's deadline becomes `DeadlineExceeded`."""
        connection = ctx.connection
        fairy = None if connection is None else getattr(connection, "_dbapi_connection", None)
        try:
            driver = None if fairy is None else fairy.driver_connection
        except Exception:  # a proxy already torn down
            driver = None
        if driver is None or not getattr(driver, "_pgwarden_owned", False):
            return None
        lost = _lost(driver)
        if lost:
            ctx.is_disconnect = True
        lent = _lent_of(driver)
        if lent is None:
            return None  # already given back (a COMMIT lost and resolved)
        exc = ctx.original_exception
        _mark(exc, HANDLE, lent.db)
        if isinstance(exc, PgwardenError) or not isinstance(exc, Exception):
            return None  # our own verdict (commit resolution), or a cancellation
        if sqlstate_of(exc) == _READ_ONLY_SQL_TRANSACTION and driver.read_only:
            _mark(exc, READ_ONLY_REFUSAL, True)  # the caller's read-only transaction said no
            return None
        kind = self._report(lent, exc, driver, lost)
        if kind in _DISCONNECTS:
            ctx.is_disconnect = True
        deadline = lent.deadline()
        now = monotonic()
        if deadline is not None and (
            (lost and now >= deadline)
            or (
                sqlstate_of(exc) == _QUERY_CANCELED
                and deadline_ran_out(FailureKind.TIMEOUT, now, deadline)
            )
        ):
            return lent.db._state.deadline_error(exc, "statement")
        return None

    def _report(self, lent: _Lent, exc: BaseException, driver: Any, lost: bool) -> FailureKind:
        """Classify *exc*, count it (unless run_transaction will), and drain the pool on
        a failover. The hook proposed for core as ``db.report_failure(...)``."""
        state = lent.db._state
        kind, _ = state.failed(
            exc,
            Phase.COMMIT if lent.committing else Phase.STATEMENT,
            _AUTOCOMMIT_STATEMENT if driver.autocommit else _STATEMENT,
            attempt=1,
            deadline=None,
            policy=_COUNT_ONLY,
            operation="sqlalchemy",
            connection_lost=lost,
            user_call=not in_run_transaction(),
        )
        _mark(exc, REPORTED, kind)
        if kind is FailureKind.FAILOVER:
            self._io_after_failure(lent.db, kind)
        return kind

    # --- I/O, sync or asyncio --------------------------------------------------------------
    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        raise NotImplementedError

    def _io_set_timeout(self, driver: Any, remaining: float) -> None:
        raise NotImplementedError

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        raise NotImplementedError

    def _io_ask(self, db: Any, txid: Any, started: Any, deadline: float | None) -> CommitOutcome:
        raise NotImplementedError

    def _io_after_failure(self, db: Any, kind: FailureKind) -> None:
        raise NotImplementedError

    def _io_close(self, db: Any) -> None:
        raise NotImplementedError


class PGDialect_pgwarden(_Pgwarden, PGDialect_psycopg):
    """``postgresql+pgwarden://`` with ``create_engine()`` (sync)."""

    supports_statement_cache = True

    def _handle(self, settings: Settings, adapters: Any) -> Database:
        return pgwarden.connect(settings=settings, adapters=adapters)

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        target = self._resolve(cargs, cparams)
        db = cast("Database", target.db)
        checkout = db.checkout(autocommit=False, row_factory=tuple_row)
        try:
            self._lend(checkout.connection, target, checkout, None)
        except BaseException:
            checkout.release()
            raise
        return checkout.connection

    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        checkout = cast("Checkout", lent.checkout)
        if discard:
            checkout.discard()
        else:
            checkout.release()

    def _io_set_timeout(self, driver: Any, remaining: float) -> None:
        with driver.pipeline():  # one round trip: BEGIN and the timeout
            driver.execute(SET_STATEMENT_TIMEOUT, statement_timeout_args(remaining))

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        row: Sequence[Any] | None = driver.execute(MARKER_IF_ASSIGNED).fetchone()
        return row

    def _io_ask(self, db: Any, txid: Any, started: Any, deadline: float | None) -> CommitOutcome:
        outcome: CommitOutcome = db._transactions._ask(txid, started, deadline)
        return outcome

    def _io_after_failure(self, db: Any, kind: FailureKind) -> None:
        db._connections.after_failure(kind)

    def _io_close(self, db: Any) -> None:
        db.close()


class PGDialectAsync_pgwarden(_Pgwarden, PGDialectAsync_psycopg):
    """``postgresql+pgwarden://`` with ``create_async_engine()`` (real asyncio)."""

    supports_statement_cache = True
    # A connection the garbage collector finds checked out can still be given back
    # (discarded on its event loop) instead of being dropped with a warning.
    has_terminate = True

    def _handle(self, settings: Settings, adapters: Any) -> AsyncDatabase:
        return pgwarden.connect_async(settings=settings, adapters=adapters)

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        target = self._resolve(cargs, cparams)
        db = cast("AsyncDatabase", target.db)

        async def lend() -> Any:
            checkout = await db.checkout(autocommit=False, row_factory=tuple_row)
            try:
                self._lend(checkout.connection, target, checkout, asyncio.get_running_loop())
            except BaseException:
                await checkout.release()
                raise
            return checkout.connection

        # SQLAlchemy's own adapter wraps the connection (async_creator_fn: 2.0 and 2.1).
        return self.loaded_dbapi.connect(async_creator_fn=lend)

    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        checkout = cast("AsyncCheckout", lent.checkout)
        finish = checkout.discard if discard else checkout.release
        if in_greenlet():
            await_(finish())
            return
        # The garbage collector, outside any greenlet: give it back on its loop.
        loop = lent.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to return to
                loop.call_soon_threadsafe(_spawn, loop, checkout.discard)

    def _io_set_timeout(self, driver: Any, remaining: float) -> None:
        await_(_set_timeout_async(driver, remaining))

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        return await_(_marker_async(driver))

    def _io_ask(self, db: Any, txid: Any, started: Any, deadline: float | None) -> CommitOutcome:
        outcome: CommitOutcome = await_(db._transactions._ask(txid, started, deadline))
        return outcome

    def _io_after_failure(self, db: Any, kind: FailureKind) -> None:
        await_(db._connections.after_failure(kind))

    def _io_close(self, db: Any) -> None:
        if in_greenlet():  # AsyncEngine.dispose() runs the sync dispose in one
            await_(db.close())


_tasks: set[asyncio.Task[Any]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[Any]]) -> None:
    async def run() -> None:
        await fn()

    task = loop.create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _set_timeout_async(driver: Any, remaining: float) -> None:
    async with driver.pipeline():  # one round trip: BEGIN and the timeout
        await driver.execute(SET_STATEMENT_TIMEOUT, statement_timeout_args(remaining))


async def _marker_async(driver: Any) -> Sequence[Any] | None:
    cur = await driver.execute(MARKER_IF_ASSIGNED)
    row: Sequence[Any] | None = await cur.fetchone()
    return row


def handle_of(engine: Any) -> Database | AsyncDatabase | None:
    """The pgwarden handle behind a ``postgresql+pgwarden`` engine (sync or async),
    for ``stats()``, ``health()`` and exporters; None until its first connection."""
    sync_engine = getattr(engine, "sync_engine", engine)
    dialect = getattr(sync_engine, "dialect", None)
    if not isinstance(dialect, _Pgwarden):
        raise TypeError(f"not a postgresql+pgwarden engine: {engine!r}")
    return dialect.pgwarden_handle
