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
    `PgwardenPool`: it holds no connection (pgwarden's pool does), only SQLAlchemy's
    record of each pgwarden connection it has lent, found again at the next checkout
    of that connection, so SQLAlchemy's side of a checkout costs what QueuePool's does.
`PgwardenPool` giving a connection back, ``do_close()`` / ``do_terminate()``
    ``checkout.release()`` (rolls back, restores pgwarden's shape, back to the pool) /
    ``checkout.discard()`` (an invalidated connection is closed, never returned; a
    soft-invalidated one is discarded when it comes back).
``do_execute*()``
    the first statement of each transaction goes in one round trip with psycopg's BEGIN
    and, under an explicit deadline, the transaction-local ``statement_timeout`` of the
    time left (safe behind PgBouncer; `pgwarden.sqlalchemy._begin`); every statement is
    reported to the handle
    (``db.statement_started`` / ``statement_finished``): its statement observers
    (operation ``sqlalchemy``), and for a success the ``queries`` counter, the query
    histogram and the slow-query event, as for the handle's own statements.
``do_commit()``
    with ``resolve_commits`` (the default), ``txid_current_if_assigned()`` before
    COMMIT; a COMMIT whose connection is lost is resolved by ``txid_status()`` on
    another connection: committed returns normally, aborted raises `NotCommitted`,
    unknown `AmbiguousCommitError`.
``handle_error`` (installed by ``engine_created``) and ``is_disconnect()``
    every statement error is classified by pgwarden, counted by kind, and marks the
    connection a disconnect when it is lost or the server is read-only (25006 outside a
    read-only transaction: a failover), which also drains pgwarden's pool so new
    connections find the new primary (``db.report_failure``). A statement timeout or a
    sever at the caller's deadline is raised as `pgwarden.DeadlineExceeded`
    (``db.deadline_error``).

Connections are shared by every engine with the same connection parameters, pgwarden
settings and JSON/HSTORE configuration: such engines share one AdaptersMap (SQLAlchemy's
HSTORE registration reaches it, and connections made before it are brought up to date at
checkout), so the registry gives them one handle. An engine with "connect" listeners of
its own, or a pool class other than `PgwardenPool` or NullPool, gets a handle of its own
instead, closed by ``engine.dispose()``: what it does to its sessions stays its own.
``docs/sqlalchemy.md`` has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg, PGDialectAsync_psycopg
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, Pool

import pgwarden
from pgwarden._handle.config import skip_call_sites_under
from pgwarden.core.classify import FailureKind, Phase, classify_failure, sqlstate_of
from pgwarden.core.commit import Marker, Verdict, lost_commit_verdict
from pgwarden.core.deadline import current_deadline
from pgwarden.core.lifecycle import State
from pgwarden.core.retry import deadline_ran_out
from pgwarden.errors import NotCommitted, PgwardenError
from pgwarden.settings import Settings
from pgwarden.sqlalchemy._context import in_run_transaction
from pgwarden.sqlalchemy._params import split_connect_params

try:  # SQLAlchemy 2.1 names it await_; 2.0 await_only (kept in 2.1 as an alias)
    from sqlalchemy.util.concurrency import await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util.concurrency import await_only as await_
from sqlalchemy.util.concurrency import in_greenlet

if TYPE_CHECKING:
    import psycopg
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
        _has_native_hstore: bool
        use_native_hstore: bool

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
_T = TypeVar("_T")

# A leak report names where the user's code took the connection, not SQLAlchemy's pool.
skip_call_sites_under(sqlalchemy.__file__, generated="<sqlalchemy ")

#: The attribute of a lent psycopg connection that holds its `_Lent` (None once returned).
_LENT = "_pgwarden_sqlalchemy"
#: Set on a lent psycopg connection once HSTORE is registered on it.
_HSTORE = "_pgwarden_hstore"
#: Set on an exception that handle_error has classified, counted and acted on.
REPORTED = "_pgwarden_reported"
#: Set on a 25006 that a read-only transaction of the caller's raised: not a failover.
READ_ONLY_REFUSAL = "_pgwarden_read_only_refusal"
#: Set on an exception of a lent connection: the pgwarden handle it came from.
HANDLE = "_pgwarden_handle"
# How the dialect names resolve_commits, in the error that says it is off.
_RESOLVE_SETTING = "pgwarden_resolve_commits"

# Failures after which the connection is useless: SQLAlchemy must invalidate it.
_DISCONNECTS = frozenset(
    {FailureKind.STALE, FailureKind.LOST, FailureKind.LOST_COMMIT, FailureKind.FAILOVER}
)
_QUERY_CANCELED = "57014"
_READ_ONLY_SQL_TRANSACTION = "25006"
# libpq's PQtransactionStatus values (psycopg.pq.TransactionStatus.IDLE / INTRANS), so that
# importing the dialect does not import psycopg: SQLAlchemy's own psycopg dialect imports
# it only when an engine is created (import_dbapi), and so does this one (first connect).
_IDLE = 0
_INTRANS = 2
# One AdaptersMap per (settings, JSON and HSTORE configuration): engines that agree on
# them share it, and so share one pgwarden handle (the registry keys on the map).
_maps_lock = threading.Lock()
_shared_maps: dict[tuple[Any, ...], Any] = {}


class PgwardenPool(Pool):
    """SQLAlchemy's pool for ``postgresql+pgwarden``: pgwarden's pool does the pooling.

    Each checkout takes a connection from the pgwarden handle (the engine's creator the
    first time; then, with no ``do_connect`` listener to change its arguments, the handle
    it resolved to) and gives it back on return. What this pool keeps is SQLAlchemy's
    record of each pgwarden connection it has lent, found again when pgwarden lends it
    the same connection, so SQLAlchemy's side of a checkout costs what QueuePool's does:
    no record and no "connect" events per checkout (those run once per pgwarden
    connection and engine, as with QueuePool). A record is made anew for a connection
    this pool has not lent before, and after an invalidation (SQLAlchemy's "invalidate
    the pool" leaves the connections to pgwarden's own checks: their records are
    replaced, the connections are not closed). An invalidated connection is closed, never
    returned; a soft-invalidated one is closed when it comes back. With ``do_connect``
    listeners every checkout gets a record of its own (they are handed it), closed on
    return, as with NullPool.

    It takes QueuePool's sizing arguments and ignores them, so ``pool_size``,
    ``max_overflow``, ``pool_timeout`` and ``pool_use_lifo`` need not be removed when
    switching (``pgwarden_max_size`` and ``acquire_timeout`` govern); ``pool_pre_ping``
    and ``pool_recycle`` too (pgwarden validates and recycles its connections itself).
    """

    def __init__(
        self,
        creator: Any,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        timeout: float | None = None,
        use_lifo: bool | None = None,
        recycle: int = -1,
        pre_ping: bool = False,
        **kwargs: Any,
    ) -> None:
        #: The connection a new record takes instead of calling the creator (`_hand_over`).
        self._handing = threading.local()
        self._records: dict[Any, ConnectionPoolEntry] = {}  # driver connection -> record
        self._records_lock = threading.Lock()
        self._connect_fn: Callable[[Any], Any] = _no_creator
        #: What the engine's creator resolved to when no do_connect listener could change
        #: its arguments: later checkouts go to that handle directly (`_Target.usable`).
        self._target: _Target | None = None
        super().__init__(creator, recycle=-1, pre_ping=False, **kwargs)

    # SQLAlchemy calls ``_invoke_creator(record)`` when a record connects; ours hands a new
    # record the connection `_do_get` already has (see `_hand_over`).
    @property
    def _creator(self) -> Any:
        return self._creator_arg

    @_creator.setter
    def _creator(self, creator: Any) -> None:
        self._creator_arg = creator
        self._connect_fn = self._should_wrap_creator(creator)
        self._invoke_creator = cast(Any, self._hand_over)

    def _hand_over(self, record: ConnectionPoolEntry | None) -> Any:
        pending = getattr(self._handing, "pending", None)
        if pending is not None:
            self._handing.pending = None
            return pending
        return self._connect_fn(record)  # a record reconnecting: a checkout of its own

    def _do_get(self) -> ConnectionPoolEntry:
        dialect: Any = self._dialect
        if dialect._has_events and dialect.dispatch.do_connect:
            self._target = None
            return self._create_connection()  # listeners get the record: NullPool's way
        target = self._target
        # `_Target.usable`, inlined: this runs on every checkout.
        if (
            target is not None
            and target.pid == _process[0]
            and target.private is (len(self.dispatch.connect) > dialect._pgwarden_own_connect)
            and (state := target.db.state) is not State.CLOSING
            and state is not State.CLOSED
        ):
            # The creator's arguments are the engine's own: skip it (and _resolve).
            driver = dialect._pgwarden_lend(target)
            dbapi_connection = None
            ours = True
        else:
            dbapi_connection = self._connect_fn(None)
            driver = dialect.get_driver_connection(dbapi_connection)
            ours = _lent_of(driver) is not None
            self._target = dialect._pgwarden_target if ours else None
        if ours:
            record: Any = self._records.get(driver)
            if (
                record is not None
                and record.dbapi_connection is not None
                and not record.in_use
                and record.starttime >= self._invalidate_time
            ):
                dialect._pgwarden_reshape(record.dbapi_connection)
                return record  # type: ignore[no-any-return]
            if dbapi_connection is None:
                try:
                    dbapi_connection = dialect._pgwarden_dbapi(driver)
                except BaseException:
                    dialect.do_terminate(driver)
                    raise
        self._handing.pending = dbapi_connection
        try:
            fresh = self._create_connection()  # its connect takes the pending connection
        finally:
            self._handing.pending = None
        if ours:
            with self._records_lock:
                # Forget the records of connections pgwarden has closed since.
                stale = [
                    d for d, r in self._records.items() if d.closed or r.dbapi_connection is None
                ]
                for gone in stale:
                    del self._records[gone]
                self._records[driver] = fresh
        return fresh

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        dbapi_connection = record.dbapi_connection
        if dbapi_connection is None:
            return  # invalidated (closed already) or detached
        dialect: Any = self._dialect
        driver = dialect.get_driver_connection(dbapi_connection)
        lent = getattr(driver, _LENT, None)
        if lent is not None and not lent.discard and self._records.get(driver) is record:
            # Back to pgwarden's pool (its release rolls back); the record waits for the
            # next checkout of this connection. Soft-invalidated: closed below instead.
            dialect._pgwarden_give_back(driver, lent)
            return
        with self._records_lock:
            if self._records.get(driver) is record:
                del self._records[driver]
        record.close()  # do_close: given back or discarded, or closed if not pgwarden's

    def dispose(self) -> None:
        """Forget the records (pgwarden's connections stay pgwarden's); an engine's own
        handle (see `_Pgwarden._needs_own_handle`) is closed."""
        with self._records_lock:
            self._records.clear()
        disposed = getattr(self._dialect, "_pgwarden_pool_disposed", None)
        if disposed is not None:
            disposed()

    def recreate(self) -> PgwardenPool:
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        return f"PgwardenPool: records of {len(self._records)} pgwarden connection(s)"


def _no_creator(record: ConnectionPoolEntry | None) -> Any:
    raise RuntimeError("PgwardenPool has no creator yet")  # pragma: no cover


def _psycopg() -> Any:
    """psycopg, imported on first use (a connection exists by then)."""
    import psycopg

    return psycopg


def _sql() -> Any:
    """pgwarden's SQL texts, imported on first use (the module imports psycopg.sql)."""
    from pgwarden._handle import sql

    return sql


def _log_notices(diagnostic: psycopg.errors.Diagnostic) -> None:
    logger.info("%s: %s", diagnostic.severity, diagnostic.message_primary)


class _Lent:
    """What the dialect knows about a psycopg connection it has checked out."""

    __slots__ = (
        "begin",
        "begin_cursor",
        "checkout",
        "committing",
        "cursor_factory",
        "db",
        "discard",
        "loop",
    )

    def __init__(
        self,
        checkout: Checkout | AsyncCheckout,
        db: Database | AsyncDatabase,
        cursor_factory: Any,
        begin_cursor: type | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.checkout = checkout
        self.db = db
        #: The connection's own cursor factory while ours is set (None: untouched).
        self.cursor_factory = cursor_factory
        #: The cursor class that can send BEGIN with a statement (`_begin`), if it is set.
        self.begin_cursor = begin_cursor
        #: What the next statement's cursor sends first (see `_begin`); None: nothing.
        self.begin: bytes | None = None
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

    __slots__ = (
        "begin_cursor",
        "cargs",
        "cparams",
        "cursor_factory",
        "db",
        "pid",
        "private",
        "row_factory",
    )

    def __init__(
        self,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
        db: Database | AsyncDatabase,
        cursor_factory: Any,
        begin_cursor: type | None,
        private: bool,
    ) -> None:
        from psycopg.rows import tuple_row

        self.cargs = cargs
        self.cparams = cparams
        self.db = db
        #: The caller's cursor factory (``connect_args``), set on every checkout.
        self.cursor_factory = cursor_factory
        #: Without one, the cursor that sends BEGIN with a transaction's first statement.
        self.begin_cursor = begin_cursor
        self.row_factory = tuple_row  # SQLAlchemy's rows
        #: The handle is this engine's alone (see `_Pgwarden._needs_own_handle`).
        self.private = private
        self.pid = _process[0]

    def serves(self, cargs: tuple[Any, ...], cparams: Mapping[str, Any], private: bool) -> bool:
        return self.usable(private=private) and cargs == self.cargs and cparams == self.cparams

    def usable(self, *, private: bool) -> bool:
        """Still the handle for these parameters (not a parent's, not closed)?"""
        return (
            self.pid == _process[0]
            and self.private is private
            and (state := self.db.state) is not State.CLOSING
            and state is not State.CLOSED
        )


# This process's pid, kept up to date across forks: a checkout compares it instead of
# asking the kernel (os.getpid() is a system call each time).
_process = [os.getpid()]


def _after_fork_in_child() -> None:
    _process[0] = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# Types with no driver_connection (psycopg's own connections), so that finding the
# driver of one costs a set lookup rather than an AttributeError each time.
_BARE: set[type] = set()
_MISSING = object()


def _driver(connection: Any) -> Any:
    """The psycopg connection behind a pool proxy, an asyncio adapter or itself."""
    kind = type(connection)
    if kind in _BARE:
        return connection
    driver = getattr(connection, "driver_connection", _MISSING)
    if driver is _MISSING:
        _BARE.add(kind)
        return connection
    return driver


def _lent_of(driver: Any) -> _Lent | None:
    lent = getattr(driver, _LENT, None)
    return lent if isinstance(lent, _Lent) else None


def _lost(driver: Any) -> bool:
    # psycopg's ``broken`` (closed, but not by close()) implies ``closed``.
    return bool(driver.closed)


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
    #: Are DBAPI cursors SQLAlchemy's adapters around psycopg's (in ``_cursor``)?
    _adapted_cursor = False

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
        event.listen(engine, "handle_error", dialect._on_error)  # a dialect event
        event.listen(engine.pool, "soft_invalidate", dialect._on_soft_invalidate)
        if not isinstance(engine.pool, PgwardenPool):
            # PgwardenPool.dispose() says so itself: an engine listener would make
            # SQLAlchemy dispatch engine events around every statement.
            event.listen(engine, "engine_disposed", dialect._on_disposed)

    def _needs_own_handle(self) -> bool:
        """Must this engine's connections be its own? When the user put "connect"
        listeners on its pool (what they do to a connection, a session SET, must not
        reach other engines), or chose a pool that keeps connections (StaticPool,
        QueuePool: their session state, temp tables included, is the engine's until it
        is disposed)."""
        engine = self._pgwarden_engine()
        if engine is None:
            return False
        pool = engine.pool
        return not isinstance(pool, (PgwardenPool, NullPool)) or (
            len(pool.dispatch.connect) > self._pgwarden_own_connect
        )

    def _on_disposed(self, engine: Engine) -> None:
        self._pgwarden_pool_disposed()

    def _pgwarden_pool_disposed(self) -> None:
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
        from psycopg.conninfo import make_conninfo

        conninfo = make_conninfo(base, **split.libpq) if (base or split.libpq) else None
        settings = Settings.from_env(url=conninfo, **split.settings)
        adapters = self._adapters(settings, split.context, private)
        db = self._handle(settings, adapters)
        from pgwarden.sqlalchemy._begin import cursor_class

        begin_cursor = cursor_class(asyncio=self.is_async) if split.cursor_factory is None else None
        target = _Target(cargs, dict(cparams), db, split.cursor_factory, begin_cursor, private)
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
        factory = target.cursor_factory or target.begin_cursor
        if factory is not None:
            saved = driver.cursor_factory
            driver.cursor_factory = factory
        # SQLAlchemy's initialize() says whether HSTORE is there (True until it knows).
        if (
            self.use_native_hstore
            and self._has_native_hstore
            and not getattr(driver, _HSTORE, False)
        ):
            info = self._psycopg_adapters_map.types.get("hstore")
            if info is not None:
                if driver.adapters.types.get("hstore") is None:
                    # Opened before SQLAlchemy registered HSTORE on the shared map.
                    from psycopg.types.hstore import register_hstore

                    register_hstore(info, driver)
                setattr(driver, _HSTORE, True)
        setattr(driver, _LENT, _Lent(checkout, target.db, saved, target.begin_cursor, loop))

    def _take(self, connection: Any) -> _Lent | None:
        """The checkout of *connection*, forgotten (it is being returned)."""
        driver = _driver(connection)
        lent = _lent_of(driver)
        if lent is not None:
            _forget(driver, lent)
        return lent

    def _pgwarden_give_back(self, driver: Any, lent: _Lent) -> None:
        """`PgwardenPool` returning the checkout *lent* of *driver*: forgotten, then given
        back (pgwarden's release rolls back and restores its shape)."""
        raise NotImplementedError

    def on_connect(self) -> Callable[[Any], None]:
        # SQLAlchemy's on_connect adds a notice handler per connect: once per record, and
        # a pgwarden connection can get records in several engines: add it once.
        def setup(connection: Any) -> None:
            driver = _driver(connection)
            with contextlib.suppress(ValueError):
                driver.remove_notice_handler(_log_notices)
            driver.add_notice_handler(_log_notices)
            if self.isolation_level is not None:
                self.set_isolation_level(connection, self.isolation_level)

        return setup

    def _pgwarden_reshape(self, dbapi_connection: Any) -> None:
        """A checkout on a record kept from before: the engine's isolation level again
        (SQLAlchemy sets it per connect; pgwarden's release put the default back)."""
        level = getattr(self, "_on_connect_isolation_level", None) or self.isolation_level
        if level is not None:
            self.set_isolation_level(dbapi_connection, level)

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
        # Not skipped when nothing is open: SQLAlchemy's contract (its compliance suite,
        # test_autocommit_block) is that the DBAPI connection's rollback() is called;
        # psycopg sends nothing then anyway. Every return passes here, so the connection's
        # own ``closed`` comes first (psycopg's ``broken`` implies it, see `_lost`): the
        # rest is read only for a lost connection.
        if dbapi_connection.closed and getattr(_driver(dbapi_connection), "_pgwarden_owned", False):
            return  # the server rolled back when the connection went; nothing to send
        super().do_rollback(dbapi_connection)

    # --- statements ------------------------------------------------------------------------
    # The statement path runs for every statement: the connection is found through the
    # cursor (one read, no walk through SQLAlchemy's proxies), and what only a failure
    # needs is left to handle_error (`_on_error`).
    def _before_statement(self, cursor: Any, statement: object) -> _Lent | None:
        """The checkout of *cursor*'s connection (None: not one of ours); for a
        transaction's first statement, BEGIN (and under a deadline the server-side
        timeout) is sent with it, or before it (`_first_statement`)."""
        if self._adapted_cursor:
            cursor = cursor._cursor
        driver: Any = getattr(cursor, "connection", None)
        lent: _Lent | None = getattr(driver, _LENT, None)
        if (
            lent is not None
            # A transaction's first statement (BEGIN not sent yet).
            and driver.pgconn.transaction_status == _IDLE
            and not driver.autocommit
        ):
            self._first_statement(cursor, driver, lent, statement)
        return lent

    def _first_statement(self, cursor: Any, driver: Any, lent: _Lent, statement: object) -> None:
        """BEGIN and, under a deadline, the transaction-local ``statement_timeout`` of the
        time left: sent with *statement* by our cursor in one round trip (`_begin`), or
        (a statement that cannot go with them) the two pipelined before it."""
        deadline = lent.deadline()
        timeout = b""
        if deadline is not None:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise lent.db.deadline_error(None)
            timeout = _sql().statement_timeout_command(remaining)
        if lent.begin_cursor is not None and _sends_begin(cursor, lent.begin_cursor, statement):
            lent.begin = timeout  # our cursor's execute takes it from here
            return
        # No mark left over for the cursor (from a marked statement that never reached it).
        lent.begin = None
        if timeout:
            self._io_set_timeout(driver, timeout)

    def do_execute(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        lent = self._before_statement(cursor, statement)
        if lent is None:
            cursor.execute(statement, parameters)
        else:
            _reported(lent, statement, cursor, cursor.execute, statement, parameters)

    def do_execute_no_params(
        self, cursor: DBAPICursor, statement: str, context: ExecutionContext | None = None
    ) -> None:
        # psycopg sends a statement given no parameters (None) as it is, unparsed.
        self.do_execute(cursor, statement, None, context)

    def do_executemany(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None = None,
    ) -> None:
        lent = self._before_statement(cursor, None)  # executemany: psycopg pipelines it
        if lent is None:
            cursor.executemany(statement, parameters)
        else:
            _reported(lent, statement, cursor, cursor.executemany, statement, parameters)

    # --- COMMIT and its resolution ---------------------------------------------------------
    def do_commit(self, dbapi_connection: Any) -> None:
        driver = _driver(dbapi_connection)
        lent = None if driver is None else _lent_of(driver)
        if (
            lent is None
            or driver.autocommit
            or driver.read_only
            or driver.pgconn.transaction_status != _INTRANS
        ):
            super().do_commit(dbapi_connection)
            return
        resolve = bool(lent.db.settings.resolve_commits)
        # txid NULL when the transaction wrote nothing: nothing to resolve then.
        marker = self._io_marker(driver) if resolve else None
        lent.committing = True
        try:
            super().do_commit(dbapi_connection)
        except _psycopg().OperationalError as exc:
            kind = classify_failure(exc, Phase.COMMIT, connection_lost=_lost(driver))
            if kind is not FailureKind.LOST_COMMIT:
                raise  # a server-side failure (a deferred constraint, 40001): not ambiguous
            self._resolve_commit(lent, exc, marker, resolve=resolve)
        finally:
            lent.committing = False

    def _resolve_commit(
        self, lent: _Lent, exc: BaseException, marker: Sequence[Any] | None, *, resolve: bool
    ) -> None:
        """The handle's resolution (``resolve_lost_commit``), its slot given back first."""
        tx_marker = None if marker is None else Marker(*marker)
        deadline = lent.deadline()
        if lost_commit_verdict(resolve=resolve, marker=tx_marker) is Verdict.ASK:
            # The connection is gone: give its slot back first, so that asking on another
            # connection does not wait for it (a pool of one would wait out the deadline).
            taken = self._take(lent.checkout.connection)
            if taken is not None:
                self._io_finish(taken, discard=True)
        try:
            self._io_resolve(lent.db, exc, tx_marker, resolve, deadline)
        except NotCommitted as aborted:
            _mark(aborted, HANDLE, lent.db)
            raise

    # --- errors ----------------------------------------------------------------------------
    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        if super().is_disconnect(e, connection, cursor):
            return True
        if not isinstance(e, _psycopg().Error):
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
            return lent.db.deadline_error(exc)
        return None

    def _report(self, lent: _Lent, exc: BaseException, driver: Any, lost: bool) -> FailureKind:
        """Classify *exc*, count it (unless run_transaction will), and drain the pool on
        a failover: ``db.report_failure``."""
        kind = self._io_report(
            lent.db,
            exc,
            phase=Phase.COMMIT if lent.committing else Phase.STATEMENT,
            connection_lost=lost,
            in_transaction=not driver.autocommit,
            counted=not in_run_transaction(),
            operation="sqlalchemy",
        )
        _mark(exc, REPORTED, kind)
        return kind

    # --- I/O, sync or asyncio --------------------------------------------------------------
    def _pgwarden_lend(self, target: _Target) -> Any:
        """A checkout from *target*'s handle in SQLAlchemy's shape: its psycopg connection."""
        raise NotImplementedError

    def _pgwarden_dbapi(self, driver: Any) -> Any:
        """What SQLAlchemy holds for a lent psycopg connection (itself, or the asyncio
        adapter SQLAlchemy's psycopg dialect wraps it in)."""
        raise NotImplementedError

    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        raise NotImplementedError

    def _io_set_timeout(self, driver: Any, timeout: bytes) -> None:
        """BEGIN and the transaction-local timeout (a command), in one round trip."""
        raise NotImplementedError

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        raise NotImplementedError

    def _io_resolve(
        self,
        db: Any,
        exc: BaseException,
        marker: Marker | None,
        resolve: bool,
        deadline: float | None,
    ) -> None:
        raise NotImplementedError

    def _io_report(self, db: Any, exc: BaseException, **how: Any) -> FailureKind:
        raise NotImplementedError

    def _io_close(self, db: Any) -> None:
        raise NotImplementedError


def _sends_begin(cursor: Any, cursor_class: type, statement: object) -> bool:
    """Can *cursor* send BEGIN with *statement* (`_begin`)? One of that module's cursors,
    and one statement as text: a ``;`` may start a second, which the extended protocol
    of a pipeline refuses where psycopg's simple query takes it; a COPY, which psycopg
    cannot run through ``execute()`` anyway, is left to psycopg's own path and error
    rather than to a pipeline's (any text that merely mentions either goes that way too)."""
    return (
        cursor.__class__ is cursor_class
        and type(statement) is str
        and ";" not in statement
        and "copy" not in statement.lower()
    )


def _forget(driver: Any, lent: _Lent) -> None:
    """*driver* is being returned: no longer lent, and its own cursor factory back."""
    setattr(driver, _LENT, None)
    if lent.cursor_factory is not None:
        driver.cursor_factory = lent.cursor_factory


def _reported(lent: _Lent, statement: str, cursor: Any, run: Any, *args: Any) -> None:
    """``run(*args)`` (the cursor's execute or executemany) reported to the handle: its
    statement observers, and the query metrics for a success."""
    db = lent.db
    mark = db.statement_started("sqlalchemy", statement)
    try:
        run(*args)
    except BaseException as exc:
        db.statement_finished(mark, exc)
        raise
    db.statement_finished(mark, None, cursor.rowcount)


class PGDialect_pgwarden(_Pgwarden, PGDialect_psycopg):
    """``postgresql+pgwarden://`` with ``create_engine()`` (sync)."""

    supports_statement_cache = True

    def _handle(self, settings: Settings, adapters: Any) -> Database:
        return pgwarden.connect(settings=settings, adapters=adapters)

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        return self._pgwarden_lend(self._resolve(cargs, cparams))

    def _pgwarden_lend(self, target: _Target) -> Any:
        db: Database = target.db  # type: ignore[assignment]
        checkout = db.checkout(autocommit=False, row_factory=target.row_factory)
        try:
            self._lend(checkout.connection, target, checkout, None)
        except BaseException:
            checkout.release()
            raise
        return checkout.connection

    def _pgwarden_dbapi(self, driver: Any) -> Any:
        return driver

    def _pgwarden_give_back(self, driver: Any, lent: _Lent) -> None:
        _forget(driver, lent)
        lent.checkout.release()

    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        checkout: Checkout = lent.checkout  # type: ignore[assignment]
        if discard:
            checkout.discard()
        else:
            checkout.release()

    def _io_set_timeout(self, driver: Any, timeout: bytes) -> None:
        from pgwarden._sync.pipelined import begin_with

        begin_with(driver, timeout)  # BEGIN and the timeout in one round trip

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        row: Sequence[Any] | None = driver.execute(_sql().MARKER_IF_ASSIGNED).fetchone()
        return row

    def _io_resolve(
        self,
        db: Any,
        exc: BaseException,
        marker: Marker | None,
        resolve: bool,
        deadline: float | None,
    ) -> None:
        db.resolve_lost_commit(
            exc, marker, resolve=resolve, deadline=deadline, setting=_RESOLVE_SETTING
        )

    def _io_report(self, db: Any, exc: BaseException, **how: Any) -> FailureKind:
        kind: FailureKind = db.report_failure(exc, **how)
        return kind

    def _io_close(self, db: Any) -> None:
        db.close()


class PGDialectAsync_pgwarden(_Pgwarden, PGDialectAsync_psycopg):
    """``postgresql+pgwarden://`` with ``create_async_engine()`` (real asyncio)."""

    supports_statement_cache = True
    # SQLAlchemy's asyncio cursor adapter holds psycopg's cursor in _cursor (2.0 and 2.1).
    _adapted_cursor = True
    # A connection the garbage collector finds checked out can still be given back
    # (discarded on its event loop) instead of being dropped with a warning.
    has_terminate = True

    def _handle(self, settings: Settings, adapters: Any) -> AsyncDatabase:
        return pgwarden.connect_async(settings=settings, adapters=adapters)

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        target = self._resolve(cargs, cparams)
        # SQLAlchemy's own adapter wraps the connection (async_creator_fn: 2.0 and 2.1).
        return self.loaded_dbapi.connect(async_creator_fn=lambda: self._lend_async(target))

    def _pgwarden_lend(self, target: _Target) -> Any:
        return _await_eagerly(self._lend_async(target))

    async def _lend_async(self, target: _Target) -> Any:
        checkout = await cast("AsyncDatabase", target.db).checkout(
            autocommit=False, row_factory=target.row_factory
        )
        try:
            self._lend(checkout.connection, target, checkout, asyncio.get_running_loop())
        except BaseException:
            await checkout.release()
            raise
        return checkout.connection

    def _pgwarden_dbapi(self, driver: Any) -> Any:
        async def lent() -> Any:
            return driver

        return self.loaded_dbapi.connect(async_creator_fn=lent)

    def _pgwarden_give_back(self, driver: Any, lent: _Lent) -> None:
        _forget(driver, lent)
        if in_greenlet():
            checkout: AsyncCheckout = lent.checkout  # type: ignore[assignment]
            _await_eagerly(checkout.release())
            return
        self._io_finish(lent, discard=False)  # the garbage collector's: see _io_finish

    def _io_finish(self, lent: _Lent, *, discard: bool) -> None:
        checkout: AsyncCheckout = lent.checkout  # type: ignore[assignment]
        finish = checkout.discard if discard else checkout.release
        if in_greenlet():
            _await_eagerly(finish())
            return
        # The garbage collector, outside any greenlet: give it back on its loop.
        loop = lent.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to return to
                loop.call_soon_threadsafe(_spawn, loop, checkout.discard)

    def _io_set_timeout(self, driver: Any, timeout: bytes) -> None:
        from pgwarden._async.pipelined import begin_with

        await_(begin_with(driver, timeout))

    def _io_marker(self, driver: Any) -> Sequence[Any] | None:
        return await_(_marker_async(driver))

    def _io_resolve(
        self,
        db: Any,
        exc: BaseException,
        marker: Marker | None,
        resolve: bool,
        deadline: float | None,
    ) -> None:
        await_(
            db.resolve_lost_commit(
                exc, marker, resolve=resolve, deadline=deadline, setting=_RESOLVE_SETTING
            )
        )

    def _io_report(self, db: Any, exc: BaseException, **how: Any) -> FailureKind:
        kind: FailureKind = await_(db.report_failure(exc, **how))
        return kind

    def _io_close(self, db: Any) -> None:
        if in_greenlet():  # AsyncEngine.dispose() runs the sync dispose in one
            await_(db.close())


def _await_eagerly(coro: Coroutine[Any, Any, _T]) -> _T:
    """``await_(coro)`` without its two greenlet switches when *coro* finishes without
    suspending (a checkout or return with a connection at hand, no I/O): its first step
    runs here, in the calling greenlet, which SQLAlchemy runs inside the event loop's task
    step, so the task, the running loop and the context are the ones ``await_`` gives it.
    A coroutine that suspends is handed to ``await_`` where it stopped (`_Resumed`)."""
    try:
        first = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    result: _T = await_(_Resumed(coro, first))
    return result


class _Resumed:
    """An awaitable that goes on with a coroutine already started (what ``await`` would
    have done from its first suspension on): what it yielded goes to the task, and what
    the task sends or throws goes back to it."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (a cancellation)
                try:
                    value = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value


_tasks: set[asyncio.Task[Any]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[Any]]) -> None:
    async def run() -> None:
        await fn()

    task = loop.create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _marker_async(driver: Any) -> Sequence[Any] | None:
    cur = await driver.execute(_sql().MARKER_IF_ASSIGNED)
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
