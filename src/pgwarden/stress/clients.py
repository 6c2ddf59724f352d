"""The clients a stress worker drives, behind one tiny interface (the two Django clients,
``django`` and ``django-pgwarden``, are in :mod:`pgwarden.stress.django_clients`).

Each client runs the same two operations:

* a read: ``SELECT count(*) FROM pgwarden_stress_writes WHERE req_id = %s`` (an index
  lookup), optionally joined with ``pg_sleep(work)`` so a request holds its connection;
* a write: ``INSERT INTO pgwarden_stress_writes (run, req_id, worker) VALUES (...)`` with a
  fresh uuid, committed before the call returns (an acknowledged write).

and the two SQLAlchemy clients, in scenarios with ``orm_share``, a third one:

* an ORM unit of work (``orm_write``, :mod:`pgwarden.stress.orm`): declarative models,
  ``session.add`` + ``flush`` of a parent row (in the same table, with the request id) and
  ``add_all`` of its child rows, committed before the call returns. The other clients do a
  plain write instead, so every client sees the same mix of requests.

and honours the same per-request deadline as far as the library lets it:

* **pgwarden**: ``with pgwarden.deadline(D)`` around each call (bounds acquire, retries and
  ``statement_timeout``); every other setting is pgwarden's default except ``max_size``.
* **psycopg_pool**: ``ConnectionPool`` with its defaults except ``max_size`` (so every
  client has the same per-process ceiling), ``timeout=D`` for ``getconn``, libpq
  ``connect_timeout`` and ``statement_timeout`` through ``options``.
* **sqlalchemy**: ``create_engine`` with QueuePool, ``pool_pre_ping=True``,
  ``pool_size=max_size``, ``max_overflow=0``, ``pool_timeout=D``, and the same libpq
  timeouts (connections come from ``psycopg.connect`` through ``creator``).
* **sqlalchemy-pgwarden**: the same SQLAlchemy code on ``postgresql+pgwarden://`` (pgwarden's
  dialect: connections from its shared handle, ``max_size`` as above, pgwarden's defaults
  otherwise), each call inside ``with pgwarden.deadline(D)``.
* **naive**: ``psycopg.connect`` per request (autocommit), the same libpq timeouts.

None of the baselines retries a read or a write: that is their default, and an application
that adds blind retries around writes is exactly what duplicates come from. Units of work
are the exception, on both sides, because that is what ORM code does: the plain
``sqlalchemy`` client re-runs a unit on a disconnect-class error (up to 3 attempts, the
loop SQLAlchemy users write), ``sqlalchemy-pgwarden`` commits it with
``pgwarden.sqlalchemy.run_transaction``. Imports happen in the constructors, after the
worker's start signal, so they are part of the cold start.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = [
    "CLIENTS",
    "DJANGO_CLIENTS",
    "LINES_PER_UNIT",
    "LINES_TABLE",
    "ORM_CLIENTS",
    "PGWARDEN_CLIENTS",
    "TABLE",
    "Client",
    "ClientConfig",
    "classify",
    "make_client",
    "missing_requirement",
]

# The table name is a constant, never input: the f-strings below are not injectable.
TABLE = "pgwarden_stress_writes"
READ_SQL = f"SELECT count(*) FROM {TABLE} WHERE req_id = CAST(%s AS uuid)"  # noqa: S608
READ_WORK_SQL = f"SELECT count(*) FROM {TABLE}, pg_sleep(%s) WHERE req_id = CAST(%s AS uuid)"  # noqa: S608
WRITE_SQL = f"INSERT INTO {TABLE} (run, req_id, worker) VALUES (%s, CAST(%s AS uuid), %s)"  # noqa: S608

#: Client names, in the order the harness runs them.
CLIENTS = (
    "pgwarden",
    "psycopg_pool",
    "sqlalchemy",
    "sqlalchemy-pgwarden",
    "django",
    "django-pgwarden",
    "naive",
)

#: The clients whose invariants (no duplicate, no lost acknowledged write, no torn unit of
#: work) are pgwarden's: ``pgwarden stress`` exits 1 when one of them breaks one.
PGWARDEN_CLIENTS = ("pgwarden", "sqlalchemy-pgwarden", "django-pgwarden")

#: The Django ORM clients (:mod:`pgwarden.stress.django_clients`): they run the ORM
#: workload too, with Django's models.
DJANGO_CLIENTS = ("django", "django-pgwarden")

#: The clients that run the ORM workload (``Workload.orm_share``); the others do a plain
#: write for each unit of work, so every client sees the same mix of requests.
ORM_CLIENTS = ("sqlalchemy", "sqlalchemy-pgwarden")

#: The child rows of the ORM units of work (see :mod:`pgwarden.stress.orm`).
LINES_TABLE = "pgwarden_stress_lines"
#: Child rows in every unit of work.
LINES_PER_UNIT = 2


class ClientConfig(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def pool_size(self) -> int: ...

    @property
    def deadline(self) -> float: ...

    @property
    def application_name(self) -> str: ...

    @property
    def orm_share(self) -> float: ...

    @property
    def fleet_budget(self) -> int | str | None: ...

    @property
    def fleet_tag(self) -> str: ...


class Client(Protocol):
    def read(self, key: str, work: float) -> None: ...

    def write(self, run: str, req_id: str, worker: int) -> None: ...

    def close(self) -> None: ...


def libpq_kwargs(cfg: ClientConfig) -> dict[str, Any]:
    """Connection keywords for the baselines: the deadline as libpq and server timeouts.

    libpq's ``connect_timeout`` is whole seconds, at least 2 (pgwarden's one rule for it).
    """
    from pgwarden._handle.config import libpq_connect_timeout

    return {
        "connect_timeout": libpq_connect_timeout(cfg.deadline),
        "options": f"-c statement_timeout={max(1, int(cfg.deadline * 1000))}",
        "application_name": cfg.application_name,
    }


class PgwardenClient:
    def __init__(self, cfg: ClientConfig) -> None:
        import pgwarden

        self._pgw = pgwarden
        self._deadline = cfg.deadline
        fleet: dict[str, Any] = {}
        if cfg.fleet_budget is not None:  # the fleet scenario's pgwarden+budget
            fleet["fleet_budget"] = cfg.fleet_budget
            if cfg.fleet_tag:
                fleet["fleet_tag"] = cfg.fleet_tag
        self.db = pgwarden.connect(
            settings=pgwarden.Settings(
                url=cfg.url,
                max_size=cfg.pool_size,
                application_name=cfg.application_name,
                **fleet,
            )
        )

    def read(self, key: str, work: float) -> None:
        with self._pgw.deadline(self._deadline):
            if work > 0:
                self.db.fetchval(READ_WORK_SQL, (work, key))
            else:
                self.db.fetchval(READ_SQL, (key,))

    def write(self, run: str, req_id: str, worker: int) -> None:
        with self._pgw.deadline(self._deadline):
            self.db.execute(WRITE_SQL, (run, req_id, worker))

    def stats(self) -> Mapping[str, Any]:
        return self.db.stats()

    def live_stats(self) -> dict[str, Any]:
        """``stats()`` plus histogram buckets, for ``pgwarden stress --dashboard``."""
        from pgwarden.exporters import snapshot

        return snapshot(self.db)

    def close(self) -> None:
        self.db.close(timeout=2)


class PsycopgPoolClient:
    def __init__(self, cfg: ClientConfig) -> None:
        from psycopg_pool import ConnectionPool

        self.pool = ConnectionPool(
            cfg.url,
            # psycopg_pool's default is min_size=4, max_size=min_size; keep its min_size
            # and use the common per-process ceiling as max_size.
            min_size=min(4, cfg.pool_size),
            max_size=cfg.pool_size,
            timeout=cfg.deadline,
            kwargs=libpq_kwargs(cfg),
            open=True,
        )

    def read(self, key: str, work: float) -> None:
        with self.pool.connection() as conn:
            if work > 0:
                conn.execute(READ_WORK_SQL, (work, key)).fetchone()
            else:
                conn.execute(READ_SQL, (key,)).fetchone()

    def write(self, run: str, req_id: str, worker: int) -> None:
        with self.pool.connection() as conn:  # commits on leaving the block
            conn.execute(WRITE_SQL, (run, req_id, worker))

    def stats(self) -> dict[str, Any]:
        return dict(self.pool.get_stats())

    def close(self) -> None:
        self.pool.close(timeout=2)


def _named(sql: str, names: tuple[str, ...]) -> str:
    """``%s`` placeholders to SQLAlchemy's ``:name`` ones, in order."""
    parts = sql.split("%s")
    out = parts[0]
    for name, part in zip(names, parts[1:], strict=True):
        out += f":{name}" + part
    return out


#: Attempts of a unit of work in the plain ``sqlalchemy`` client: the retry loop SQLAlchemy
#: users write around a session (see ``SqlAlchemyClient._unit_of_work``).
ORM_NAIVE_ATTEMPTS = 3
#: Its sleep before the second attempt (doubled for each further one).
ORM_NAIVE_BACKOFF = 0.1


class SqlAlchemyClient:
    """SQLAlchemy Core (and, with ``orm_share``, the ORM) on QueuePool over psycopg.

    ``sqlalchemy-pgwarden`` (:class:`SqlAlchemyPgwardenClient`) runs this very code; it
    differs only where the methods below say so: how the engine is made
    (:meth:`_make_engine`), how the request deadline is expressed (:meth:`_scope`), and
    how a unit of work is committed (:meth:`_unit_of_work`).
    """

    def __init__(self, cfg: ClientConfig) -> None:
        from sqlalchemy import text

        self._deadline = cfg.deadline
        self.engine = self._make_engine(cfg)
        self._read = text(_named(READ_SQL, ("key",)))
        self._read_work = text(_named(READ_WORK_SQL, ("work", "key")))
        self._write = text(_named(WRITE_SQL, ("run", "req_id", "worker")))
        self._session: Any = None
        self._unit: Any = None
        self.orm_units = 0  # orm_write calls
        self.orm_attempts = 0  # times the unit of work ran (re-runs included)
        if cfg.orm_share > 0:
            from sqlalchemy.orm import sessionmaker

            from pgwarden.stress.orm import unit_of_work

            self._session = sessionmaker(self.engine)
            self._unit = unit_of_work

    # -- what differs between the two SQLAlchemy clients --------------------------------
    def _make_engine(self, cfg: ClientConfig) -> Any:
        """QueuePool with pre-ping, ``pool_size`` connections, libpq's timeouts."""
        import psycopg
        from sqlalchemy import create_engine

        kwargs = libpq_kwargs(cfg)
        url = cfg.url

        def creator() -> psycopg.Connection[Any]:
            return psycopg.connect(url, **kwargs)

        return create_engine(
            "postgresql+psycopg://",
            creator=creator,
            pool_size=cfg.pool_size,
            max_overflow=0,
            pool_timeout=cfg.deadline,
            pool_pre_ping=True,
        )

    def _scope(self) -> AbstractContextManager[Any]:
        """Around each request: nothing (the deadline is in the pool and libpq timeouts)."""
        return contextlib.nullcontext()

    def _unit_of_work(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(session)`` and commit, the way SQLAlchemy users make it survive a
        restart: the whole unit again on a disconnect-class error (``OperationalError``,
        ``InterfaceError``, or any ``DBAPIError`` that invalidated its connection), up to
        :data:`ORM_NAIVE_ATTEMPTS` times with a short backoff, within the deadline. It
        cannot tell a COMMIT that was lost after it committed from one that never ran, so
        a retry after a lost COMMIT writes the unit twice (a duplicate)."""
        from sqlalchemy import exc

        started = time.monotonic()
        for attempt in range(ORM_NAIVE_ATTEMPTS):
            try:
                with self._session() as session:
                    fn(session)
                    session.commit()
                return
            except exc.DBAPIError as error:
                retryable = error.connection_invalidated or isinstance(
                    error, (exc.OperationalError, exc.InterfaceError)
                )
                pause = ORM_NAIVE_BACKOFF * 2**attempt
                last = attempt + 1 >= ORM_NAIVE_ATTEMPTS
                if not retryable or last or time.monotonic() - started + pause > self._deadline:
                    raise
                time.sleep(pause)

    # -- the workload (the same for both) -----------------------------------------------
    def read(self, key: str, work: float) -> None:
        with self._scope(), self.engine.connect() as conn:
            if work > 0:
                conn.execute(self._read_work, {"work": work, "key": key}).scalar()
            else:
                conn.execute(self._read, {"key": key}).scalar()

    def write(self, run: str, req_id: str, worker: int) -> None:
        with self._scope(), self.engine.begin() as conn:
            conn.execute(self._write, {"run": run, "req_id": req_id, "worker": worker})

    def orm_write(self, run: str, req_id: str, worker: int) -> None:
        """One ORM unit of work (see :mod:`pgwarden.stress.orm`), committed."""
        if self._unit is None:
            raise RuntimeError("this client was built without the ORM workload")
        unit = self._unit
        self.orm_units += 1

        def fn(session: Any) -> None:
            self.orm_attempts += 1
            unit(session, run, req_id, worker)

        with self._scope():
            self._unit_of_work(fn)

    def stats(self) -> dict[str, Any]:
        return {"pool": self.engine.pool.status(), "counters": self._orm_counters()}

    def _orm_counters(self) -> dict[str, int]:
        if self._unit is None:
            return {}
        return {"orm_units": self.orm_units, "orm_attempts": self.orm_attempts}

    def close(self) -> None:
        self.engine.dispose()


class SqlAlchemyPgwardenClient(SqlAlchemyClient):
    """The same SQLAlchemy code on pgwarden's dialect (``postgresql+pgwarden://``):
    connections come from pgwarden's shared handle (``max_size`` = the common ceiling,
    everything else pgwarden's default), each request runs inside
    ``pgwarden.deadline(D)``, and a unit of work is committed by
    ``pgwarden.sqlalchemy.run_transaction``, which re-runs it on conflicts and on a
    connection lost before COMMIT and resolves a lost COMMIT by its transaction id, so it
    never re-runs a committed unit."""

    def _make_engine(self, cfg: ClientConfig) -> Any:
        import pgwarden

        self._pgw = pgwarden
        return pgwarden_engine(cfg)

    def _scope(self) -> AbstractContextManager[Any]:
        return self._pgw.deadline(self._deadline)

    def _unit_of_work(self, fn: Callable[[Any], None]) -> None:
        from pgwarden.sqlalchemy import run_transaction

        run_transaction(self._session, fn)

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        handle = _pgwarden_handle(self.engine)
        if handle is not None:
            stats = handle.stats()
            out["handle"] = {k: v for k, v in stats.items() if k != "counters"}
            counters = dict(stats.get("counters") or {})
            counters.update(out["counters"])
            out["counters"] = counters
        return out

    def close(self) -> None:
        handle = _pgwarden_handle(self.engine)
        super().close()
        if handle is not None:  # the engine's NullPool holds nothing; the handle does
            handle.close(timeout=2)


def pgwarden_engine(cfg: ClientConfig) -> Any:
    """``create_engine("postgresql+pgwarden://...")`` for the stress URL, with pgwarden's
    defaults except ``max_size`` and ``application_name``.

    The URL's parts go in ``connect_args`` (the dialect takes libpq parameters there), so a
    ``--url`` in conninfo form (``host=/run/postgresql dbname=app``) works as well.
    """
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy import create_engine

    return create_engine(
        "postgresql+pgwarden://",
        connect_args={
            **conninfo_to_dict(cfg.url),
            "pgwarden_max_size": cfg.pool_size,
            "application_name": cfg.application_name,
        },
    )


def _pgwarden_handle(engine: Any) -> Any:
    """The pgwarden handle behind an engine of the dialect (None before its first use)."""
    from pgwarden.sqlalchemy import handle_of

    return handle_of(engine)


class NaiveClient:
    def __init__(self, cfg: ClientConfig) -> None:
        import psycopg

        self._connect = psycopg.connect
        self._url = cfg.url
        self._kwargs = libpq_kwargs(cfg)

    def read(self, key: str, work: float) -> None:
        with self._connect(self._url, autocommit=True, **self._kwargs) as conn:
            if work > 0:
                conn.execute(READ_WORK_SQL, (work, key)).fetchone()
            else:
                conn.execute(READ_SQL, (key,)).fetchone()

    def write(self, run: str, req_id: str, worker: int) -> None:
        with self._connect(self._url, autocommit=True, **self._kwargs) as conn:
            conn.execute(WRITE_SQL, (run, req_id, worker))

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


_FACTORIES: dict[str, Callable[[ClientConfig], Any]] = {
    "pgwarden": PgwardenClient,
    "psycopg_pool": PsycopgPoolClient,
    "sqlalchemy": SqlAlchemyClient,
    "sqlalchemy-pgwarden": SqlAlchemyPgwardenClient,
    "django": lambda cfg: _django_client("DjangoClient", cfg),
    "django-pgwarden": lambda cfg: _django_client("DjangoPgwardenClient", cfg),
    "naive": NaiveClient,
}


def _django_client(name: str, cfg: ClientConfig) -> Any:
    """A client of :mod:`pgwarden.stress.django_clients` (imported only for it)."""
    from pgwarden.stress import django_clients

    return getattr(django_clients, name)(cfg)


def missing_requirement(name: str) -> str | None:
    """Why client ``name`` cannot run here (a library that is not installed), or None.

    Looks the modules up without running the client libraries' own code, except
    ``pgwarden.sqlalchemy``'s package (to find its dialect module).
    """
    import importlib.util

    if name in ORM_CLIENTS and importlib.util.find_spec("sqlalchemy") is None:
        return "SQLAlchemy is not installed (pip install 'pgwarden[stress]')"
    if name in DJANGO_CLIENTS and importlib.util.find_spec("django") is None:
        return "Django is not installed (pip install 'pgwarden[django]')"
    if name == "sqlalchemy-pgwarden":
        try:
            found = importlib.util.find_spec("pgwarden.sqlalchemy.dialect") is not None
        except ImportError:
            found = False
        if not found:
            return "pgwarden.sqlalchemy (the postgresql+pgwarden:// dialect) is not available"
    return None


def make_client(name: str, cfg: ClientConfig) -> Any:
    """Import the library behind ``name`` and build its client."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}") from None
    return factory(cfg)


# --------------------------------------------------------------------------------------------
# Error kinds: one vocabulary for every client, from the library's own classifier

#: Kinds that mean "the time ran out" (the request used its deadline).
TIMEOUT_KINDS = frozenset(
    {"deadline", "pool_timeout", "statement_timeout", "connect_timeout", "late", "hung"}
)

#: The clients' own errors that are not about the database, by class name: pgwarden's
#: (its module is ``pgwarden...``) and the pools' "no connection in time".
_PGWARDEN_KINDS = {
    "DeadlineExceeded": "deadline",
    "AcquireTimeout": "pool_timeout",
    "DatabaseUnavailable": "breaker_open",
    "NotReady": "not_ready",
    "AmbiguousCommitError": "ambiguous_commit",
    "OutcomeUnknown": "outcome_unknown",
    "NotCommitted": "not_committed",
    "HandleClosed": "handle_closed",
}

#: How the report names what :func:`pgwarden.core.classify.classify_with_reason` decided:
#: per failure kind, the first ``(rule, report kind)`` whose rule is in the classifier's
#: reason (the rule that matched: ``sqlstate 57014``, ``text 'timeout expired'``, ``class
#: ConnectionTimeout``; never the error's own text), else the kind's default.
_REPORT_KINDS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "overload": ((("query_wait_timeout", "query_timeout"), "pooler_timeout"),),
    "nothing_ran": (
        (("timeout expired", "class connectiontimeout"), "connect_timeout"),
        (
            ("sqlstate 57p03", "the database system is", "not accepting connections"),
            "server_starting",
        ),
        (
            ("server login has been failing", "pgbouncer cannot connect", "client_login_timeout"),
            "pooler_login_failing",
        ),
        (("session is", "hot standby", "writable connection"), "no_primary"),
    ),
    "timeout": ((("sqlstate 57014",), "statement_timeout"),),
    "permanent": (
        (("sqlstate 23505",), "duplicate_key"),
        (("sqlstate 26000",), "prepared_stmt"),
        (("sqlstate 53400",), "too_many_clients"),
    ),
}
_REPORT_DEFAULTS = {
    "overload": "too_many_clients",
    "nothing_ran": "refused",
    "stale": "conn_lost",
    "lost": "conn_lost",
    "lost_commit": "conn_lost",
    "conflict": "conflict",
    "failover": "read_only",
    "timeout": "deadline",
    "permanent": "other",
}


def _unwrap(exc: BaseException) -> BaseException:
    module = type(exc).__module__
    if module.startswith("sqlalchemy"):
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException):
            return orig
    if module.startswith("django") and isinstance(exc.__cause__, BaseException):
        return exc.__cause__  # django.db.utils wraps the driver's error: raise ... from it
    return exc


def classify(exc: BaseException) -> str:
    """One short kind for an exception from any of the clients (see ``docs/stress.md``).

    The clients' own errors by class (pgwarden's, the pools' timeouts); everything else
    as the library classifies it (:mod:`pgwarden.core.classify`, imported on the first
    error, after the start signal), named in the report's vocabulary.
    """
    cls = type(exc)
    if cls.__module__.startswith("sqlalchemy") and cls.__name__ == "TimeoutError":
        return "pool_timeout"  # QueuePool limit reached, pool_timeout expired
    exc = _unwrap(exc)
    cls = type(exc)
    if cls.__module__.startswith("pgwarden"):
        kind = _PGWARDEN_KINDS.get(cls.__name__)
        if kind is not None:
            return kind
    if cls.__name__ == "PoolTimeout":
        return "pool_timeout"
    from pgwarden.core.classify import Phase, classify_with_reason

    # The phase only splits "connection broken" into stale, lost or lost commit, which the
    # report counts alike (conn_lost); STATEMENT is what a request runs.
    failure, reason = classify_with_reason(exc, Phase.STATEMENT)
    rule = reason.lower()
    for needles, name in _REPORT_KINDS.get(failure.value, ()):
        if any(needle in rule for needle in needles):
            return name
    return _REPORT_DEFAULTS[failure.value]


def describe(exc: BaseException) -> str:
    """A one-line sample message for the report: type, first line, no secrets."""
    inner = _unwrap(exc)
    first = (str(inner).strip().splitlines() or [""])[0]
    text = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    from pgwarden._redact import redact  # standard library only

    return redact(text)[:240]
