"""The four clients a stress worker drives, behind one tiny interface.

Each client runs the same two operations:

* a read: ``SELECT count(*) FROM pgwarden_stress_writes WHERE req_id = %s`` (an index
  lookup), optionally joined with ``pg_sleep(work)`` so a request holds its connection;
* a write: ``INSERT INTO pgwarden_stress_writes (run, req_id, worker) VALUES (...)`` with a
  fresh uuid, committed before the call returns (an acknowledged write).

and honours the same per-request deadline as far as the library lets it:

* **pgwarden**: ``with pgwarden.deadline(D)`` around each call (bounds acquire, retries and
  ``statement_timeout``); every other setting is pgwarden's default except ``max_size``.
* **psycopg_pool**: ``ConnectionPool`` with its defaults except ``max_size`` (so every
  client has the same per-process ceiling), ``timeout=D`` for ``getconn``, libpq
  ``connect_timeout`` and ``statement_timeout`` through ``options``.
* **sqlalchemy**: ``create_engine`` with QueuePool, ``pool_pre_ping=True``,
  ``pool_size=max_size``, ``max_overflow=0``, ``pool_timeout=D``, and the same libpq
  timeouts (connections come from ``psycopg.connect`` through ``creator``).
* **naive**: ``psycopg.connect`` per request (autocommit), the same libpq timeouts.

None of the three baselines retries: that is their default, and an application that adds
blind retries around writes is exactly what duplicates come from. Imports happen in the
constructors, after the worker's start signal, so they are part of the cold start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "CLIENTS",
    "TABLE",
    "Client",
    "ClientConfig",
    "classify",
    "make_client",
]

# The table name is a constant, never input: the f-strings below are not injectable.
TABLE = "pgwarden_stress_writes"
READ_SQL = f"SELECT count(*) FROM {TABLE} WHERE req_id = CAST(%s AS uuid)"  # noqa: S608
READ_WORK_SQL = f"SELECT count(*) FROM {TABLE}, pg_sleep(%s) WHERE req_id = CAST(%s AS uuid)"  # noqa: S608
WRITE_SQL = f"INSERT INTO {TABLE} (run, req_id, worker) VALUES (%s, CAST(%s AS uuid), %s)"  # noqa: S608

#: Client names, in the order the harness runs them.
CLIENTS = ("pgwarden", "psycopg_pool", "sqlalchemy", "naive")


class ClientConfig(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def pool_size(self) -> int: ...

    @property
    def deadline(self) -> float: ...

    @property
    def application_name(self) -> str: ...


class Client(Protocol):
    def read(self, key: str, work: float) -> None: ...

    def write(self, run: str, req_id: str, worker: int) -> None: ...

    def close(self) -> None: ...


def libpq_kwargs(cfg: ClientConfig) -> dict[str, Any]:
    """Connection keywords for the baselines: the deadline as libpq and server timeouts.

    libpq's ``connect_timeout`` is whole seconds, at least 2.
    """
    return {
        "connect_timeout": max(2, math.ceil(cfg.deadline)),
        "options": f"-c statement_timeout={max(1, int(cfg.deadline * 1000))}",
        "application_name": cfg.application_name,
    }


class PgwardenClient:
    def __init__(self, cfg: ClientConfig) -> None:
        import pgwarden

        self._pgw = pgwarden
        self._deadline = cfg.deadline
        self.db = pgwarden.connect(
            settings=pgwarden.Settings(
                url=cfg.url, max_size=cfg.pool_size, application_name=cfg.application_name
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

    def stats(self) -> dict[str, Any]:
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


class SqlAlchemyClient:
    def __init__(self, cfg: ClientConfig) -> None:
        import psycopg
        from sqlalchemy import create_engine, text

        kwargs = libpq_kwargs(cfg)
        url = cfg.url

        def creator() -> psycopg.Connection[Any]:
            return psycopg.connect(url, **kwargs)

        self.engine = create_engine(
            "postgresql+psycopg://",
            creator=creator,
            pool_size=cfg.pool_size,
            max_overflow=0,
            pool_timeout=cfg.deadline,
            pool_pre_ping=True,
        )
        self._read = text(_named(READ_SQL, ("key",)))
        self._read_work = text(_named(READ_WORK_SQL, ("work", "key")))
        self._write = text(_named(WRITE_SQL, ("run", "req_id", "worker")))

    def read(self, key: str, work: float) -> None:
        with self.engine.connect() as conn:
            if work > 0:
                conn.execute(self._read_work, {"work": work, "key": key}).scalar()
            else:
                conn.execute(self._read, {"key": key}).scalar()

    def write(self, run: str, req_id: str, worker: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._write, {"run": run, "req_id": req_id, "worker": worker})

    def stats(self) -> dict[str, Any]:
        return {"pool": self.engine.pool.status()}

    def close(self) -> None:
        self.engine.dispose()


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
    "naive": NaiveClient,
}


def make_client(name: str, cfg: ClientConfig) -> Any:
    """Import the library behind ``name`` and build its client."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}") from None
    return factory(cfg)


# --------------------------------------------------------------------------------------------
# Error kinds: one vocabulary for the four clients

#: Kinds that mean "the time ran out" (the request used its deadline).
TIMEOUT_KINDS = frozenset(
    {"deadline", "pool_timeout", "statement_timeout", "connect_timeout", "late", "hung"}
)

_SQLSTATE_KINDS = {
    "53300": "too_many_clients",
    "53400": "too_many_clients",
    "57P03": "server_starting",
    "57014": "statement_timeout",
    "57P01": "conn_lost",
    "57P02": "conn_lost",
    "08006": "conn_lost",
    "08003": "conn_lost",
    "08001": "refused",
    "08004": "refused",
    "26000": "prepared_stmt",
    "23505": "duplicate_key",
    "25006": "read_only",
    "40001": "conflict",
    "40P01": "conflict",
}

_MESSAGE_KINDS: tuple[tuple[str, str], ...] = (
    ("too many clients", "too_many_clients"),
    ("remaining connection slots are reserved", "too_many_clients"),
    ("no more connections allowed", "too_many_clients"),
    ("query_wait_timeout", "pooler_timeout"),
    ("server login has been failing", "pooler_login_failing"),
    ("the database system is starting up", "server_starting"),
    ("the database system is shutting down", "server_starting"),
    ("the database system is in recovery mode", "server_starting"),
    ("the database system is not yet accepting", "server_starting"),
    ("canceling statement due to statement timeout", "statement_timeout"),
    ("timeout expired", "connect_timeout"),
    ("connection refused", "refused"),
    ("no such file or directory", "refused"),
    ("prepared statement", "prepared_stmt"),
    ("server closed the connection", "conn_lost"),
    ("terminating connection", "conn_lost"),
    ("consuming input failed", "conn_lost"),
    ("connection is lost", "conn_lost"),
    ("the connection is closed", "conn_lost"),
    ("connection reset", "conn_lost"),
    ("server conn crashed", "conn_lost"),
    ("ssl syscall", "conn_lost"),
    ("sending query failed", "conn_lost"),
    ("eof detected", "conn_lost"),
    ("bad file descriptor", "conn_lost"),
    ("connection to server", "refused"),
)

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


def _unwrap(exc: BaseException) -> BaseException:
    module = type(exc).__module__
    if module.startswith("sqlalchemy"):
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException):
            return orig
    return exc


def classify(exc: BaseException) -> str:
    """One short kind for an exception from any of the four clients."""
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
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate in _SQLSTATE_KINDS:
        return _SQLSTATE_KINDS[sqlstate]
    text = str(exc).lower()
    for needle, kind in _MESSAGE_KINDS:
        if needle in text:
            return kind
    if isinstance(exc, TimeoutError):
        return "deadline"
    return "other"


def describe(exc: BaseException) -> str:
    """A one-line sample message for the report: type, first line, no secrets."""
    inner = _unwrap(exc)
    first = (str(inner).strip().splitlines() or [""])[0]
    text = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    from pgwarden._redact import redact  # standard library only

    return redact(text)[:240]
