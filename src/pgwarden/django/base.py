"""``ENGINE: "pgwarden.django"``: Django's PostgreSQL backend on pgwarden's shared handle.

`DatabaseWrapper` subclasses ``django.db.backends.postgresql.base.DatabaseWrapper`` (so SQL,
types, introspection, schema editing and the test database are Django's own) and changes
only where a connection comes from, how it goes back, and what a failure does:

connecting (``get_new_connection``)
    ``db.checkout(row_factory=tuple_row)`` from the process's pgwarden handle for the
    connection parameters Django computed (``get_connection_params()``: libpq parameters,
    Django's adapters template as the handle's ``AdaptersMap``, its cursor class, its
    ``prepare_threshold``) and ``OPTIONS["pgwarden"]``: readiness awaited once per
    process, the breaker, pgwarden's validation (no round trip per checkout), leak watch
    and in-flight count. Django then does what it does with any new connection
    (autocommit, isolation level, time zone, ``assume_role``, ``connection_created``);
    the time zone and role are sent only when the pooled connection does not have them
    already. What a pooled connection does not need is not done per checkout: the
    connection parameters are recomputed only when the settings entry, ``USE_TZ`` or
    the time zone changed, and AUTOCOMMIT is not set again on a connection lent in
    autocommit (no round trip is spent on any of it). On the per-request path
    (``ensure_connection``, ``_cursor``, ``_close``) Django's error wrapper is entered
    only when a psycopg error is raised (it wraps nothing else), and work needed only
    after a failure (may the statement be sent again?) is done only then.
returning (``_close``)
    ``checkout.release()`` (rolls back what is open, restores pgwarden's shape) or
    ``checkout.discard()`` for a connection found lost. Django closes a connection at the
    end of each request; with pgwarden that returns it to the pool, whatever
    ``CONN_MAX_AGE`` says (the pool is what keeps connections between requests, so
    ``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS`` have nothing left to do and are ignored).
    With ``OPTIONS["pgwarden"]["release_between_queries"]`` the connection also goes back
    whenever its last cursor closes outside ``atomic()`` (and when an outermost atomic
    block ends): a request that makes one query and then waits on a slow service holds
    no connection meanwhile. Under ``pgwarden.deadline()`` outside ``atomic()`` a
    connection is always returned that way, and exchanged for one bound by the current
    deadline when it was checked out under another, so that no connection outlives the
    deadline that bounds its bytes.
statements (`CursorWrapper`)
    each one is reported to the handle (``db.statement_started`` / ``statement_finished``):
    its statement observers (operation ``django``), and for a success the ``queries``
    counter, the query histogram and the slow-query event. Under a deadline the first
    statement of a transaction first sends, pipelined with psycopg's BEGIN, the
    transaction-local ``statement_timeout`` of the time left.
failures (``wrap_database_errors``)
    every psycopg error on a lent connection is classified and counted by the handle
    (``db.report_failure``; inside ``atomic_retry()`` the retry loop counts it instead).
    A connection lost, stale or on a read-only server (25006 outside a read-only
    transaction: a failover, which also drains the pool so new connections find the new
    primary) is discarded at once: outside ``atomic()`` the next query gets a fresh
    connection; inside, Django's "closed in transaction" rules apply until the block
    ends. A statement cut by the caller's deadline raises `pgwarden.DeadlineExceeded`.
    pgwarden's own verdicts (`DatabaseUnusable`, `NotCommitted`, `OutcomeUnknown`) are
    raised as themselves; psycopg's errors are wrapped by Django as usual, the psycopg
    error as ``__cause__``.
COMMIT (``_commit``)
    with ``resolve_commits`` (the default) a transaction that wrote fetches
    ``txid_current_if_assigned()`` before COMMIT; a COMMIT whose connection is lost is
    resolved on another connection: committed returns normally, aborted raises
    `NotCommitted`, unknown `AmbiguousCommitError`.
``pool`` / ``close_pool()``
    ``pool`` is None (pgwarden's pool is the pool; ``OPTIONS["pool"]`` sizing is read as
    pgwarden settings, see ``_options.py``). ``close_pool()`` closes the pgwarden handle of
    this database's current parameters (Django's test runner does it before dropping a
    test database).

A forked child (gunicorn ``--preload``) forgets the parent's connections without touching
their sockets and gets its own. docs/django.md is the guide.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

import django
import psycopg
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base import base as django_base
from django.db.backends.postgresql import base as postgresql
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.utils import CursorWrapper as DjangoCursorWrapper
from django.db.backends.utils import debug_transaction
from django.db.utils import DatabaseErrorWrapper
from django.db.utils import Error as DjangoError
from django.db.utils import OperationalError as DjangoOperationalError
from django.db.utils import ProgrammingError as DjangoProgrammingError
from django.utils.asyncio import async_unsafe
from django.utils.functional import cached_property
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

import pgwarden
from pgwarden._handle.config import skip_call_sites_under
from pgwarden._handle.sql import MARKER_IF_ASSIGNED, statement_timeout_command
from pgwarden.core.commit import Marker
from pgwarden.core.deadline import current_deadline
from pgwarden.core.failures import FailureKind, Phase, sqlstate_of
from pgwarden.core.lifecycle import State
from pgwarden.core.retry import deadline_ran_out
from pgwarden.django._context import in_atomic_retry
from pgwarden.django._options import parse_options, split_params
from pgwarden.errors import DatabaseUnusable, DeadlineExceeded, PgwardenError, SettingsError

if TYPE_CHECKING:
    from pgwarden._sync.acquire import Checkout
    from pgwarden._sync.database import Database

__all__ = ["CursorDebugWrapper", "CursorWrapper", "DatabaseWrapper", "django_flavoured"]

# A leak report names the view or task that took the connection, not Django's ORM.
skip_call_sites_under(django.__file__)

#: Set on a psycopg error the backend classified and counted: its `FailureKind`.
KIND = "_pgwarden_kind"
#: Set on a psycopg error of a lent connection, and on a commit verdict: the handle.
HANDLE = "_pgwarden_handle"
#: Set on a psycopg error: the connection was lost (closed or broken) by then.
LOST = "_pgwarden_lost"
#: Set on a 25006 that the caller's own read-only transaction raised: not a failover.
READ_ONLY_REFUSAL = "_pgwarden_read_only_refusal"
#: On a psycopg connection: the role ``assume_role`` last set on it (None: none).
_ROLE = "_pgwarden_django_role"

# Failures after which a connection is useless.
_DISCONNECTS = frozenset(
    {FailureKind.STALE, FailureKind.LOST, FailureKind.LOST_COMMIT, FailureKind.FAILOVER}
)
# Failures of a single statement in autocommit after which it certainly did not run:
# it never reached a server (a pooler that could not log in), or the server ended the
# session before running it (57P01/57P02 on an autocommit statement: see
# docs/decisions.md, "A server-terminated statement is retried even if it was a write").
_RESENDABLE = frozenset({FailureKind.NOTHING_RAN, FailureKind.STALE})
_QUERY_CANCELED = "57014"
_READ_ONLY_SQL_TRANSACTION = "25006"
_RESOLVE_SETTING = 'OPTIONS["pgwarden"]["resolve_commits"]'
_GONE = (State.CLOSING, State.CLOSED)
_TIME_ZONE = b"TimeZone"


class _Resolved:
    """The handle (and per-connection extras) one set of connection parameters resolves to."""

    __slots__ = ("cursor_factory", "db", "key", "pid", "release")

    def __init__(self, key: Any, db: Database, cursor_factory: Any, release: bool) -> None:
        self.key = key
        self.db = db
        self.cursor_factory = cursor_factory
        self.release = release
        self.pid = _pid

    def usable(self) -> bool:
        return self.pid == _pid and self.db.state not in _GONE


_lock = threading.Lock()
# This process's id: read on every connect, so kept here rather than asked of the kernel
# each time (a forked child sets its own, `_after_fork_in_child`).
_pid = os.getpid()
_resolved: dict[Any, _Resolved] = {}
# Every wrapper of this backend, so that a forked child can make them forget the
# parent's connections (Django keeps one wrapper per alias and thread).
_wrappers: weakref.WeakSet[DatabaseWrapper] = weakref.WeakSet()


def _freeze(value: Any) -> Any:
    """*value* as a hashable key part (dicts and lists by content, the rest as is)."""
    if isinstance(value, Mapping):
        return tuple(sorted(((str(k), _freeze(v)) for k, v in value.items()), key=_first))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("unhashable", id(value))
    return value


def _snapshot(value: Any) -> Any:
    """A copy of *value*'s containers (dicts, lists, tuples, sets) holding the same
    leaves: equal to *value* until something in it changes (as `_freeze` would see)."""
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    if type(value) in (list, tuple, set, frozenset):
        return type(value)(_snapshot(v) for v in value)
    return value


def _first(item: tuple[str, Any]) -> str:
    return item[0]


def _mark(exc: BaseException, name: str, value: object) -> None:
    try:
        setattr(exc, name, value)
    except Exception:  # an exception class that refuses attributes
        return


# pgwarden error class -> the same class made a Django OperationalError as well.
_flavours: dict[type[BaseException], type[BaseException]] = {}


def django_flavoured(exc: PgwardenError) -> PgwardenError:
    """*exc* as an instance of a class that is both its pgwarden class and Django's
    ``OperationalError``: code that catches ``django.db.DatabaseError`` (Django's own
    included) sees pgwarden's verdicts, and code that catches ``pgwarden.NotReady`` (or
    any pgwarden class) still does. Message, attributes and cause are *exc*'s."""
    cls = type(exc)
    if issubclass(cls, DjangoOperationalError):
        return exc
    flavour = _flavours.get(cls)
    if flavour is None:
        made = type(
            cls.__name__,
            (cls, DjangoOperationalError),
            {"__module__": __name__, "__doc__": cls.__doc__, "__qualname__": cls.__name__},
        )
        flavour = _flavours.setdefault(cls, made)
    new = cast(PgwardenError, flavour.__new__(flavour, *exc.args))
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    new.__cause__ = exc.__cause__
    new.__traceback__ = exc.__traceback__
    return new


class _Errors(DatabaseErrorWrapper):  # type: ignore[misc]
    """Django's error wrapper, with pgwarden's handling of a lent connection's failures
    first (`DatabaseWrapper._pgwarden_failed`)."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None:
            return
        if isinstance(exc_value, psycopg.Error):
            replacement = self.wrapper._pgwarden_failed(exc_value)
            if replacement is not None:
                self.wrapper.errors_occurred = True
                raise django_flavoured(replacement).with_traceback(traceback) from exc_value
        super().__exit__(exc_type, exc_value, traceback)


class _Observed:
    """What pgwarden's cursor wrappers add to Django's: statements reported to the
    handle, and cursors closing tell the backend (release between queries)."""

    db: Any
    cursor: Any

    def _execute(self, sql: Any, params: Any, *rest: Any) -> Any:
        run: Callable[..., Any] = super()._execute  # type: ignore[misc]
        return self.db._pgwarden_observe(run, self, sql, params, rest, single=True)

    def _executemany(self, sql: Any, param_list: Any, *rest: Any) -> Any:
        run: Callable[..., Any] = super()._executemany  # type: ignore[misc]
        return self.db._pgwarden_observe(run, self, sql, param_list, rest, single=False)

    def close(self) -> Any:
        try:
            return self.cursor.close()
        finally:
            db = self.db
            if db._pgwarden_releasing:  # cursors are counted only then
                db._pgwarden_cursor_closed(self)


class CursorWrapper(_Observed, DjangoCursorWrapper):  # type: ignore[misc]
    """Django's ``CursorWrapper`` with pgwarden's statement reporting."""


class CursorDebugWrapper(_Observed, postgresql.CursorDebugWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``CursorDebugWrapper`` (query logging) with pgwarden's."""


class DatabaseWrapper(postgresql.DatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``DatabaseWrapper`` with connections from pgwarden's handle."""

    # Django's attributes that this class assigns (Django itself is untyped here).
    connection: Any
    autocommit: bool
    isolation_level: Any
    closed_in_transaction: bool
    needs_rollback: bool
    health_check_done: bool
    run_on_commit: list[Any]
    run_commit_hooks_on_set_autocommit_on: bool
    in_atomic_block: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pgwarden_checkout: Checkout | None = None
        self._pgwarden_db: Database | None = None
        self._pgwarden_resolved: _Resolved | None = None
        #: What `_pgwarden_resolved` was resolved from (copies): compared by value on
        #: each connect, cheaper than freezing them into the shared cache's key.
        self._pgwarden_inputs: tuple[Any, Any, Any] | None = None
        #: The lent connection's own cursor factory, put back when it is returned.
        self._pgwarden_saved_factory: Any = None
        #: pgwarden returned the connection itself (not Django's close()): Django's
        #: state still says connected, and the next use connects again.
        self._pgwarden_released = False
        #: This checkout goes back when no cursor is open outside atomic().
        self._pgwarden_releasing = False
        self._pgwarden_open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pgwarden_committing = False
        #: Inside Django's connect(): its own queries (version check, time zone, role,
        #: connection_created receivers) must not give the new connection back.
        self._pgwarden_connecting = False
        #: The cursor wrapper of the single statement running now (`_pgwarden_observe`):
        #: whether it may be sent again is worked out only if it fails.
        self._pgwarden_single: Any = None
        #: Django's time zone name and its bytes, as the server reports TimeZone.
        self._pgwarden_tz: tuple[str, bytes] | None = None
        #: What `get_connection_params` last computed, and from what (copies).
        self._pgwarden_params: tuple[Any, dict[str, Any]] | None = None
        _wrappers.add(self)

    # --- the handle -------------------------------------------------------------------------
    @property
    def pool(self) -> None:
        """Always None: pgwarden's pool is the pool (Django's code paths for its own
        psycopg_pool stay off)."""
        return None

    @property
    def pgwarden_handle(self) -> Database:
        """The pgwarden handle this database's connections come from (made on first use,
        without I/O): for ``stats()``, ``health()`` and exporters."""
        return self._resolve(self.get_connection_params()).db

    def get_connection_params(self) -> dict[str, Any]:
        # Django computes these on every connect(), i.e. on every checkout here; they
        # depend only on the settings entry, USE_TZ and the time zone (its adapters
        # template), so they are recomputed only when one of those changed (compared
        # by value: a test's in-place edit of the entry is seen).
        inputs = (self.settings_dict, settings.USE_TZ, self.timezone)
        memo = self._pgwarden_params
        if memo is not None and memo[0] == inputs:
            return dict(memo[1])
        params: dict[str, Any] = super().get_connection_params()
        params.pop("pgwarden", None)  # ours, not libpq's
        # The snapshot after Django's call: it may edit the entry (NAME None pops "service").
        self._pgwarden_params = (_snapshot(inputs), params)
        return dict(params)

    def _resolve(self, conn_params: Mapping[str, Any]) -> _Resolved:
        options = self.settings_dict["OPTIONS"]
        inputs = (conn_params, options.get("pgwarden"), options.get("pool"))
        cached = self._pgwarden_resolved
        if cached is not None and self._pgwarden_inputs == inputs and cached.usable():
            return cached  # every connect: the same parameters as last time
        key = tuple(_freeze(part) for part in inputs)
        with _lock:
            hit = _resolved.get(key)
            if hit is None or not hit.usable():
                try:
                    parsed = parse_options(options.get("pgwarden"), options.get("pool"))
                    target = split_params(conn_params, parsed)
                except SettingsError as exc:
                    raise ImproperlyConfigured(f"{self.alias}: {exc}") from None
                db = pgwarden.connect(settings=target.settings, adapters=target.adapters)
                hit = _Resolved(key, db, target.cursor_factory, parsed.release_between_queries)
                _resolved[key] = hit
        self._pgwarden_resolved = hit
        self._pgwarden_inputs = _snapshot(inputs)  # a later change in place is seen
        return hit

    def close_pool(self) -> None:
        """Close the pgwarden handles of this database's current connection parameters
        (every handle of the same connection string, whatever the time zone or
        pgwarden settings: their idle connections close at once, lent ones when they
        come back): what Django's test runner needs before it drops or clones a test
        database. The next use makes a new handle."""
        self.close()
        try:
            conn_params = self.get_connection_params()
            url = self._resolve(conn_params).db.settings.url
        except ImproperlyConfigured:
            return
        with _lock:
            gone = [key for key, hit in _resolved.items() if hit.db.settings.url == url]
            closing = [_resolved.pop(key) for key in gone]
        self._pgwarden_resolved = None
        for hit in closing:
            if hit.usable():
                hit.db.close()

    # --- connecting and returning ----------------------------------------------------------
    @async_unsafe  # type: ignore[untyped-decorator]
    def ensure_connection(self) -> None:
        # Django's, with its error wrapping entered only when connecting failed (it
        # wraps psycopg's errors alone): this runs at the first query of every request.
        if self.connection is None:
            if self.in_atomic_block and self.closed_in_transaction:
                raise DjangoProgrammingError("Cannot open a new connection in an atomic block.")
            try:
                self.connect()
            except psycopg.Error:
                with self.wrap_database_errors:
                    raise

    def connect(self) -> None:
        """Django's connect(); when the SQL Django sends on a new connection (time zone,
        role, version check) fails before it could run (a pooler that cannot log in,
        a session the server ended), it connects again within the deadline, as the
        handle does for its own statements. Nothing of the caller's has run yet."""
        started = monotonic()
        attempt = 1
        while True:
            self._pgwarden_connecting = True
            try:
                super().connect()
                return
            except psycopg.Error as exc:
                if self._pgwarden_checkout is None:
                    raise  # not on a lent connection: Django's own error handling
                self._pgwarden_again(self._pgwarden_db, None, exc, attempt, started)
                attempt += 1
            finally:
                self._pgwarden_connecting = False

    @async_unsafe  # type: ignore[untyped-decorator]
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        self.isolation_level, set_level = self._isolation_from_options()
        resolved = self._resolve(conn_params)
        db = resolved.db
        try:
            checkout = db.checkout(row_factory=tuple_row)
        except DatabaseUnusable as exc:  # not ready, breaker open, no connection in time
            raise django_flavoured(exc) from exc.__cause__
        conn = checkout.connection
        saved = None
        try:
            if resolved.cursor_factory is not None:
                saved = conn.cursor_factory
                conn.cursor_factory = resolved.cursor_factory
            if set_level:
                conn.isolation_level = self.isolation_level
        except BaseException:
            checkout.release()
            raise
        self._pgwarden_checkout = checkout
        self._pgwarden_db = db
        self._pgwarden_saved_factory = saved
        self._pgwarden_released = False
        if self._pgwarden_releasing:  # before the mode changes: it says if any were kept
            self._pgwarden_open.clear()
        self._pgwarden_releasing = resolved.release or checkout.deadline is not None
        return conn

    def _isolation_from_options(self) -> tuple[Any, bool]:
        """Django's isolation level rule: OPTIONS["isolation_level"] or READ COMMITTED;
        and whether it must be set on the connection (given in OPTIONS)."""
        options = self.settings_dict["OPTIONS"]
        if "isolation_level" not in options:  # no KeyError raised on every checkout
            return IsolationLevel.READ_COMMITTED, False
        value = options["isolation_level"]
        try:
            return IsolationLevel(value), True
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {value} specified. Use one of the "
                "psycopg.IsolationLevel values."
            ) from None

    def _pgwarden_return(self, *, discard: bool = False) -> None:
        """Give the lent connection back to pgwarden (discarded when lost)."""
        checkout = self._pgwarden_checkout
        if checkout is None:
            return
        self._pgwarden_checkout = None
        if self._pgwarden_releasing:
            self._pgwarden_open.clear()  # no cursor counts as open any more
        conn = checkout.connection
        if self._pgwarden_saved_factory is not None:
            conn.cursor_factory = self._pgwarden_saved_factory
            self._pgwarden_saved_factory = None
        if discard or checkout.lost:
            checkout.discard()
        else:
            checkout.release()

    def _pgwarden_drop(self, *, discard: bool = False) -> None:
        """Return the connection while Django believes it open: the next use connects
        again; inside atomic() Django's "closed in transaction" rules take over."""
        self._pgwarden_return(discard=discard)
        self.connection = None
        self._pgwarden_released = True
        if self.in_atomic_block:
            self.closed_in_transaction = True
            self.needs_rollback = True

    def _close(self) -> None:
        if self._pgwarden_checkout is None:
            super()._close()
            return
        try:
            self._pgwarden_return()
        except psycopg.Error:
            with self.wrap_database_errors:  # Django's wrapping, on the failure path only
                raise
        finally:
            self.connection = None  # it is the pool's now, even inside atomic()

    def _pgwarden_forget(self) -> None:
        """In a forked child: the parent's connection is the parent's (its socket is
        neither used nor closed here); the next use checks one out of this process."""
        if self._pgwarden_checkout is not None:
            self._pgwarden_checkout = None
            self._pgwarden_saved_factory = None
            self._pgwarden_forget_cursors()
            self.connection = None
            self._pgwarden_released = True
        self._pgwarden_resolved = None

    def _pgwarden_forget_cursors(self) -> None:
        """No cursor counts as open any more (a new checkout, or none). Cursors are
        kept only in release mode (`_prepare_cursor`, `_pgwarden_again`); the set is
        emptied in place, cheaper than a new WeakSet on every connect and release."""
        if self._pgwarden_releasing:
            self._pgwarden_open.clear()

    def _pgwarden_idle(self) -> bool:
        conn = self.connection
        return (
            conn is not None
            and conn.autocommit
            and conn.info.transaction_status == TransactionStatus.IDLE
        )

    # --- Django's connection management, where pgwarden's pool changes it ------------------
    def close_if_unusable_or_obsolete(self) -> None:
        # The start and end of each request: the connection goes back to pgwarden's pool
        # (which keeps it; CONN_MAX_AGE would only pin it to this thread).
        if self._pgwarden_checkout is not None and not self.in_atomic_block:
            self.health_check_done = False
            self.close()
            return
        super().close_if_unusable_or_obsolete()

    def close_if_health_check_failed(self) -> None:
        if self._pgwarden_checkout is not None:
            return  # pgwarden validated it at checkout, without a round trip
        super().close_if_health_check_failed()

    def is_usable(self) -> bool:
        checkout = self._pgwarden_checkout
        if self.connection is not None and checkout is not None:
            # What Django's SELECT 1 would find, without the round trip: a lost
            # connection, or a transaction aborted by an error (pgwarden validates the
            # connection itself at checkout).
            return not checkout.lost and self.connection.info.transaction_status not in (
                TransactionStatus.INERROR,
                TransactionStatus.UNKNOWN,
            )
        return bool(super().is_usable())

    def ensure_timezone(self) -> bool:
        # Django's closes its pool here; pgwarden's pool is shared, and each checkout
        # gets the current time zone anyway (init_connection_state).
        if self.connection is None:
            return False
        return self._pgwarden_timezone(self.connection)

    def init_connection_state(self) -> None:
        # Django's (PostgreSQL's, on its base class's), without walking the class chain
        # on each checkout once the version check ran: the session's time zone and role
        # (`_configure_connection`), committed outside autocommit. `pool` is None here.
        if self.alias not in django_base.RAN_DB_VERSION_CHECK:
            super().init_connection_state()
            return
        conn = self.connection
        if conn is not None and self._configure_connection(conn) and not self.get_autocommit():
            conn.commit()

    def _configure_connection(self, connection: Any) -> bool:
        """What Django sends on a new connection, for a pooled one: the time zone and
        ``assume_role`` only when the connection does not have them already. Returns
        whether a COMMIT is needed (a connection not in autocommit). Written out here
        rather than through Django's helpers, which changed within 5.1."""
        commit_tz = self._pgwarden_timezone(connection)
        if self.settings_dict["OPTIONS"].get("assume_role") == getattr(connection, _ROLE, None):
            return commit_tz  # the common case, checked without a call
        return self._pgwarden_role(connection) or commit_tz

    def _pgwarden_timezone(self, connection: Any) -> bool:
        """Django's time zone (``TIME_ZONE``/``USE_TZ``) on *connection*, if it differs
        (compared as the server reports it, undecoded: one C call per checkout)."""
        name = self.timezone_name
        if not name:
            return False
        cached = self._pgwarden_tz
        if cached is None or cached[0] != name:
            cached = self._pgwarden_tz = (name, name.encode())
        if connection.pgconn.parameter_status(_TIME_ZONE) != cached[1]:
            with connection.cursor() as cursor:
                cursor.execute(self.ops.set_time_zone_sql(), [name])
            return True
        return False

    def _pgwarden_role(self, connection: Any) -> bool:
        """``assume_role`` on a pooled connection: sent only when the connection's role
        differs (``RESET ROLE`` when another database of the same handle set one)."""
        role = self.settings_dict["OPTIONS"].get("assume_role")
        current = getattr(connection, _ROLE, None)
        if role == current:
            return False
        with connection.cursor() as cursor:
            if role:
                cursor.execute(self.ops.compose_sql("SET ROLE %s", [role]))
            else:
                cursor.execute("RESET ROLE")
        setattr(connection, _ROLE, role or None)
        return True

    def get_autocommit(self) -> bool:
        if self.connection is None and self._pgwarden_released and not self.in_atomic_block:
            # What connecting would set; no need to take a connection to say so.
            return bool(self.settings_dict["AUTOCOMMIT"])
        return bool(super().get_autocommit())

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        if (
            self.connection is None
            and self._pgwarden_released
            and autocommit == self.settings_dict["AUTOCOMMIT"]
        ):
            # The end of a transaction whose connection pgwarden returned (lost, or
            # released): the next connection starts in this mode anyway.
            self.validate_no_atomic_block()
            self.autocommit = autocommit
            if autocommit and self.run_commit_hooks_on_set_autocommit_on:
                self.run_and_clear_commit_hooks()
                self.run_commit_hooks_on_set_autocommit_on = False
            return
        conn = self.connection
        if (
            self._pgwarden_connecting
            and autocommit
            and conn is not None
            and conn.autocommit
            and self._pgwarden_checkout is not None
            and conn.pgconn.transaction_status == TransactionStatus.IDLE
        ):
            # Django's connect() turning AUTOCOMMIT on for the connection checkout()
            # just lent in autocommit (pgwarden's shape): nothing to set on it, so
            # only Django's state (what its set_autocommit does after setting it).
            self.autocommit = True
            if self.run_commit_hooks_on_set_autocommit_on:
                self.run_and_clear_commit_hooks()
                self.run_commit_hooks_on_set_autocommit_on = False
            return
        super().set_autocommit(autocommit, force_begin_transaction_with_broken_autocommit)

    def _set_autocommit(self, autocommit: bool) -> None:
        conn = self.connection
        if self._pgwarden_checkout is not None and (conn.closed or conn.broken):
            if autocommit:
                self._pgwarden_drop(discard=True)  # nothing to set on a lost connection
                return
            with self.wrap_database_errors:
                raise psycopg.OperationalError("the connection was lost")
        ended = bool(autocommit and not conn.autocommit)
        super()._set_autocommit(autocommit)
        if (
            ended
            and self._pgwarden_releasing
            and not self._pgwarden_open
            and not self._pgwarden_connecting
        ):
            self._pgwarden_drop()  # an outermost atomic block ended

    def _rollback(self) -> None:
        conn = self.connection
        if (
            conn is not None
            and self._pgwarden_checkout is not None
            and (conn.closed or conn.broken)
        ):
            self._pgwarden_drop(discard=True)  # the server rolled back when it went
            return
        super()._rollback()

    # --- cursors and statements ------------------------------------------------------------
    def _cursor(self, name: str | None = None) -> Any:
        checkout = self._pgwarden_checkout
        if checkout is not None:
            ctx = current_deadline()
            wanted = None if ctx is None else ctx.expires_at
            if (
                checkout.deadline != wanted
                and not self.in_atomic_block
                and not self._pgwarden_open
                and self._pgwarden_idle()
            ):
                # Checked out under another deadline: take one bound by this one.
                self._pgwarden_drop()
            elif self.connection is not None:
                # Django's _cursor() for a lent connection, whose health check and
                # connect are no-ops; its error wrapping entered only on a failure.
                try:
                    return self._prepare_cursor(self.create_cursor(name))
                except psycopg.Error:
                    with self.wrap_database_errors:
                        raise
        return super()._cursor(name)

    def _prepare_cursor(self, cursor: Any) -> Any:
        wrapped = super()._prepare_cursor(cursor)
        if self._pgwarden_releasing and self._pgwarden_checkout is not None:
            self._pgwarden_open.add(wrapped)
        return wrapped

    def make_cursor(self, cursor: Any) -> Any:
        return CursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        return CursorDebugWrapper(cursor, self)

    def _pgwarden_cursor_closed(self, wrapper: Any) -> None:
        opened = self._pgwarden_open
        if wrapper not in opened:
            return  # not a cursor of the current checkout
        opened.discard(wrapper)
        if (
            not opened
            and not self.in_atomic_block
            and not self._pgwarden_connecting
            and self._pgwarden_idle()
        ):
            self._pgwarden_drop()

    def _pgwarden_observe(
        self,
        run: Callable[..., Any],
        wrapper: Any,
        sql: Any,
        params: Any,
        rest: tuple[Any, ...],
        *,
        single: bool,
    ) -> Any:
        """``run(sql, params, *rest)`` (Django's execute) reported to the handle; a
        single statement in autocommit outside atomic() that failed before it could
        run (`_RESENDABLE`) is sent again, within the deadline and the retry budget."""
        started = monotonic()
        attempt = 1
        while True:
            checkout = self._pgwarden_checkout
            db = self._pgwarden_db
            if checkout is None or db is None:
                return run(sql, params, *rest)
            conn = checkout.connection
            ctx = current_deadline()
            if (
                ctx is not None
                and not conn.autocommit
                and conn.info.transaction_status == TransactionStatus.IDLE
                and db.settings.server_deadlines
            ):
                # Without server deadlines (RDS Proxy pinning), the checkout's own
                # deadline (its socket is shut down when it passes) bounds the block.
                self._pgwarden_set_timeout(db, conn, ctx.expires_at)
            if single:
                self._pgwarden_single = wrapper
            mark = db.statement_started("django", sql)
            try:
                result = run(sql, params, *rest)
            except BaseException as exc:
                cause = exc.__cause__
                db.statement_finished(mark, cause if isinstance(cause, psycopg.Error) else exc)
                if not (isinstance(exc, DjangoError) and self._pgwarden_may_resend(conn)):
                    raise
                self._pgwarden_again(db, wrapper, exc, attempt, started)
                attempt += 1
                continue
            finally:
                self._pgwarden_single = None
            db.statement_finished(mark, None, wrapper.cursor.rowcount)
            return result

    def _pgwarden_may_resend(self, conn: Any) -> bool:
        """May the statement running now on *conn* be sent again, should it fail in a
        way that shows it did not run? Only a single statement in autocommit outside
        atomic() on a client-side cursor (the retry loop counts its failures)."""
        wrapper = self._pgwarden_single
        return (
            wrapper is not None
            and conn.autocommit
            and not self.in_atomic_block
            and getattr(wrapper.cursor, "name", None) is None
        )

    def _pgwarden_again(
        self,
        db: Database | None,
        wrapper: Any,
        exc: BaseException,
        attempt: int,
        started: float,
    ) -> None:
        """A statement that may be sent again failed with *exc*: Django's error from a
        cursor *wrapper*'s execute (reported already), or psycopg's from Django's own
        SQL on a new connection (*wrapper* None: reported here, and the connection given
        back). Count it and decide (the handle's own rules, as for its single
        statements); return to send it again (after the backoff; on a new connection if
        the old one was given back), or raise (*exc*, or `DeadlineExceeded`)."""
        if wrapper is None:
            cause: BaseException | None = exc
            if db is not None and isinstance(exc, psycopg.Error):
                self._pgwarden_report(db, exc, counted=False)
            self._pgwarden_drop(discard=getattr(exc, KIND, None) in _DISCONNECTS)
        else:
            cause = exc.__cause__
        if db is None or not isinstance(cause, psycopg.Error) or getattr(cause, KIND, None) is None:
            raise exc  # not a failure of a lent connection (nothing was reported)
        ctx = current_deadline()
        bound: float | None = ctx.expires_at if ctx is not None else None
        if bound is None and db.settings.default_timeout is not None:
            bound = started + db.settings.default_timeout
        try:
            # Counted, and sent again (after the backoff) only if it certainly did not
            # run (`_RESENDABLE`); else raises. Reported already: the pool was acted on.
            db.rerun_after_failure(
                exc,
                cause=cause,
                attempt=attempt,
                deadline=bound,
                whole_transaction=False,
                connection_lost=bool(getattr(cause, LOST, False)),
                reported=True,
                operation="django",
            )
        except DeadlineExceeded as verdict:
            raise django_flavoured(verdict) from exc
        if wrapper is not None and self.connection is None:
            # Discarded: the statement goes to a new connection, on a new cursor.
            self.ensure_connection()
            with self.wrap_database_errors:
                wrapper.cursor = self.create_cursor()
            if self._pgwarden_releasing and self._pgwarden_checkout is not None:
                self._pgwarden_open.add(wrapper)

    def _pgwarden_set_timeout(self, db: Database, conn: Any, expires_at: float) -> None:
        """BEGIN and the transaction-local statement_timeout of the time left, in one
        write, before the transaction's first statement (safe behind PgBouncer: nothing
        outlives the transaction)."""
        remaining = expires_at - monotonic()
        if remaining <= 0:
            raise django_flavoured(db.deadline_error(None))
        from pgwarden._sync.pipelined import begin_with

        with self.wrap_database_errors:
            begin_with(conn, statement_timeout_command(remaining))  # one round trip

    # --- COMMIT and its resolution ---------------------------------------------------------
    def _commit(self) -> None:
        conn = self.connection
        checkout = self._pgwarden_checkout
        db = self._pgwarden_db
        if (
            conn is None
            or checkout is None
            or db is None
            or conn.read_only
            or conn.info.transaction_status != TransactionStatus.INTRANS
        ):
            super()._commit()
            return
        resolve = bool(db.settings.resolve_commits)
        marker = None
        if resolve:
            # The transaction's id (NULL when it wrote nothing: nothing to resolve then).
            with self.wrap_database_errors:
                row = conn.execute(MARKER_IF_ASSIGNED).fetchone()
            marker = None if row is None else Marker(*row)
        bound = self._pgwarden_bound(checkout.deadline)
        self._pgwarden_committing = True
        try:
            with debug_transaction(self, "COMMIT"), self.wrap_database_errors:
                conn.commit()
        except DjangoError as exc:
            cause = exc.__cause__
            if cause is None or getattr(cause, KIND, None) is not FailureKind.LOST_COMMIT:
                raise  # a server-side failure (a deferred constraint, 40001): not ambiguous
            self._pgwarden_resolve(db, cause, marker, resolve, bound)
        finally:
            self._pgwarden_committing = False

    def _pgwarden_resolve(
        self,
        db: Database,
        exc: BaseException,
        marker: Marker | None,
        resolve: bool,
        bound: float | None,
    ) -> None:
        """A COMMIT whose connection was lost: return if it committed, else raise
        `NotCommitted` or `AmbiguousCommitError` (the handle's own resolution; the lost
        connection's slot was given back already, see `_pgwarden_failed`)."""
        try:
            db.resolve_lost_commit(
                exc, marker, resolve=resolve, deadline=bound, setting=_RESOLVE_SETTING
            )
        except PgwardenError as verdict:
            self.run_on_commit = []  # not committed, or not known to be: no on_commit hooks
            _mark(verdict, HANDLE, db)
            raise django_flavoured(verdict) from verdict.__cause__

    def _pgwarden_bound(self, checkout_deadline: float | None) -> float | None:
        """The earlier of the checkout's deadline and the one in effect now."""
        ctx = current_deadline()
        if ctx is None:
            return checkout_deadline
        if checkout_deadline is None:
            return ctx.expires_at
        return min(ctx.expires_at, checkout_deadline)

    # --- failures ---------------------------------------------------------------------------
    @cached_property  # type: ignore[untyped-decorator]
    def wrap_database_errors(self) -> _Errors:
        return _Errors(self)

    def _pgwarden_report(self, db: Database, exc: psycopg.Error, *, counted: bool) -> FailureKind:
        """``db.report_failure`` for *exc* on the lent connection (classified, counted
        unless not *counted*, a failover drains the pool); its kind marked on *exc*."""
        checkout = self._pgwarden_checkout
        conn = None if checkout is None else checkout.connection
        lost = conn is None or bool(conn.closed or conn.broken)
        kind = db.report_failure(
            exc,
            phase=Phase.COMMIT if self._pgwarden_committing else Phase.STATEMENT,
            connection_lost=lost,
            in_transaction=conn is not None and not conn.autocommit,
            counted=counted,
            operation="django",
        )
        _mark(exc, HANDLE, db)
        _mark(exc, LOST, lost)
        _mark(exc, KIND, kind)
        return kind

    def _pgwarden_failed(self, exc: psycopg.Error) -> BaseException | None:
        """A psycopg error on the lent connection: classify and count it
        (``db.report_failure``, which drains the pool on a failover), discard a useless
        connection; returns `DeadlineExceeded` for a failure that is the deadline's."""
        checkout = self._pgwarden_checkout
        db = self._pgwarden_db
        if checkout is None or db is None:
            return None
        conn = checkout.connection
        lost = bool(conn.closed or conn.broken)
        _mark(exc, HANDLE, db)
        _mark(exc, LOST, lost)
        sqlstate = sqlstate_of(exc)
        if sqlstate == _READ_ONLY_SQL_TRANSACTION and conn.read_only:
            _mark(exc, READ_ONLY_REFUSAL, True)  # the caller's read-only transaction said no
            return None
        if getattr(exc, KIND, None) is not None:
            return None  # reported already (a failure of Django's connect(), see there)
        committing = self._pgwarden_committing
        # Counted by the retry loop that may send it again (atomic_retry, or the resend
        # of a statement that cannot have run), else here.
        kind = self._pgwarden_report(
            db, exc, counted=not (in_atomic_retry() or self._pgwarden_may_resend(conn))
        )
        if kind in _DISCONNECTS:
            self._pgwarden_drop(discard=True)
        if committing:
            return None  # a lost COMMIT is resolved (_commit), never a deadline verdict
        bound = self._pgwarden_bound(checkout.deadline)
        now = monotonic()
        if bound is not None and (
            (lost and now >= bound)
            or (sqlstate == _QUERY_CANCELED and deadline_ran_out(FailureKind.TIMEOUT, now, bound))
        ):
            return db.deadline_error(exc)
        return None


def _after_fork_in_child() -> None:
    global _lock, _pid
    _lock = threading.Lock()
    _pid = os.getpid()
    _resolved.clear()
    for wrapper in list(_wrappers):
        wrapper._pgwarden_forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
