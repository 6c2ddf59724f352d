"""The two Django clients of ``pgwarden stress``: the same ORM code on two backends.

* **django**: Django's own PostgreSQL backend with its native psycopg pool
  (``OPTIONS["pool"]``: ``min_size=min(4, max_size)``, ``max_size`` the common per-process
  ceiling, ``timeout=D``), libpq's ``connect_timeout`` and ``statement_timeout`` from the
  deadline, as the other baselines.
* **django-pgwarden**: ``ENGINE: "pgwarden.django"`` (``max_size`` as above, pgwarden's
  defaults otherwise), each request inside ``pgwarden.deadline(D)``.

Each request is what a Django view does: reads with the ORM (``filter(req_id=...)
.count()``; with ``work``, the raw SQL that holds the connection, on Django's cursor),
writes with ``objects.create()``, and, in scenarios with ``orm_share``, a unit of work
(:func:`unit_of_work`: a parent row and its lines in one ``transaction.atomic()``).
The request ends as Django ends one (``close_old_connections()``, what the
``request_finished`` signal runs): Django's pool gets its connection back, pgwarden's
too.

A unit of work on ``django`` gets the retry loop Django users write (up to 3 attempts on
``OperationalError``/``InterfaceError``, closing the broken connection first, 0.1 then
0.2 s backoff, within the deadline); on ``django-pgwarden`` it runs in
``pgwarden.django.atomic_retry``, which re-runs it only when it certainly did not
commit. Django is configured once per worker process (``settings.configure``), after
the start signal, so its import is part of the cold start.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from pgwarden.stress.clients import LINES_PER_UNIT, READ_WORK_SQL, ClientConfig, libpq_kwargs

__all__ = ["DjangoClient", "DjangoPgwardenClient", "unit_of_work"]

#: Attempts of a unit of work in the plain ``django`` client (see `DjangoClient`).
ORM_NAIVE_ATTEMPTS = 3
#: Its sleep before the second attempt (doubled for each further one).
ORM_NAIVE_BACKOFF = 0.1


def unit_of_work(run: str, req_id: str, worker: int) -> None:
    """One request's unit of work, inside the caller's ``transaction.atomic()``."""
    from pgwarden.stress.django_app.models import StressLine, StressWrite

    rid = uuid.UUID(req_id)
    write = StressWrite.objects.create(run=run, req_id=rid, worker=worker)
    StressLine.objects.bulk_create(
        [StressLine(write=write, run=run, req_id=rid, n=n) for n in range(LINES_PER_UNIT)]
    )


class DjangoClient:
    """Django's ORM on Django's native psycopg pool.

    ``django-pgwarden`` (:class:`DjangoPgwardenClient`) runs this very code and differs
    only in the database settings (:meth:`_database`), the request deadline
    (:meth:`_scope`) and how a unit of work is committed (:meth:`_unit_of_work`).
    """

    def __init__(self, cfg: ClientConfig) -> None:
        import django
        from django.conf import settings

        self._deadline = cfg.deadline
        settings.configure(
            DATABASES={"default": self._database(cfg)},
            INSTALLED_APPS=["pgwarden.stress.django_app.StressConfig"],
            USE_TZ=True,
        )
        django.setup()
        from django.db import close_old_connections, connection, transaction

        from pgwarden.stress.django_app.models import StressWrite

        self._close_old = close_old_connections
        self._connection = connection
        self._atomic = transaction.atomic
        self._writes = StressWrite.objects
        self.orm_units = 0  # orm_write calls
        self.orm_attempts = 0  # times the unit of work ran (re-runs included)

    # -- what differs between the two Django clients -----------------------------------
    def _database(self, cfg: ClientConfig) -> dict[str, Any]:
        """Django's own backend, its native pool, libpq's timeouts."""
        options: dict[str, Any] = _libpq_options(cfg.url) | dict(libpq_kwargs(cfg))
        options["pool"] = {
            "min_size": min(4, cfg.pool_size),
            "max_size": cfg.pool_size,
            "timeout": cfg.deadline,
        }
        return {"ENGINE": "django.db.backends.postgresql", **_connection_settings(cfg.url)} | {
            "OPTIONS": options
        }

    def _scope(self) -> AbstractContextManager[Any]:
        """Around each request: nothing (the deadline is in the pool and libpq timeouts)."""
        return contextlib.nullcontext()

    def _unit_of_work(self, fn: Callable[[], None]) -> None:
        """``fn()`` in ``transaction.atomic()``, the way Django users make it survive a
        restart: the whole unit again on ``OperationalError``/``InterfaceError`` (the
        broken connection closed first), up to :data:`ORM_NAIVE_ATTEMPTS` times with a
        short backoff, within the deadline. It cannot tell a COMMIT lost after it
        committed from one that never ran, so a retry then writes the unit twice."""
        from django.db import InterfaceError, OperationalError

        started = time.monotonic()
        for attempt in range(ORM_NAIVE_ATTEMPTS):
            try:
                with self._atomic():
                    fn()
                return
            except (OperationalError, InterfaceError):
                pause = ORM_NAIVE_BACKOFF * 2**attempt
                last = attempt + 1 >= ORM_NAIVE_ATTEMPTS
                if last or time.monotonic() - started + pause > self._deadline:
                    raise
                self._connection.close()
                time.sleep(pause)

    # -- the workload (the same for both) -----------------------------------------------
    def read(self, key: str, work: float) -> None:
        try:
            with self._scope():
                if work > 0:
                    with self._connection.cursor() as cursor:
                        cursor.execute(READ_WORK_SQL, (work, key))
                        cursor.fetchone()
                else:
                    self._writes.filter(req_id=uuid.UUID(key)).count()
        finally:
            self._close_old()  # the request ends

    def write(self, run: str, req_id: str, worker: int) -> None:
        try:
            with self._scope():
                self._writes.create(run=run, req_id=uuid.UUID(req_id), worker=worker)
        finally:
            self._close_old()

    def orm_write(self, run: str, req_id: str, worker: int) -> None:
        """One ORM unit of work (:func:`unit_of_work`), committed."""
        self.orm_units += 1

        def fn() -> None:
            self.orm_attempts += 1
            unit_of_work(run, req_id, worker)

        try:
            with self._scope():
                self._unit_of_work(fn)
        finally:
            self._close_old()

    def stats(self) -> dict[str, Any]:
        return {"counters": {"orm_units": self.orm_units, "orm_attempts": self.orm_attempts}}

    def close(self) -> None:
        self._connection.close()
        close_pool = getattr(self._connection, "close_pool", None)
        if close_pool is not None:
            close_pool()


class DjangoPgwardenClient(DjangoClient):
    """The same Django code on ``ENGINE: "pgwarden.django"``: connections come from
    pgwarden's shared handle, each request runs inside ``pgwarden.deadline(D)``, and a
    unit of work runs in ``pgwarden.django.atomic_retry``, which re-runs it on conflicts
    and on a connection lost before COMMIT and resolves a lost COMMIT by its transaction
    id, so it never re-runs a committed unit."""

    def _database(self, cfg: ClientConfig) -> dict[str, Any]:
        import pgwarden

        self._pgw = pgwarden
        pgw_options = {"max_size": cfg.pool_size, "application_name": cfg.application_name}
        return {"ENGINE": "pgwarden.django", **_connection_settings(cfg.url)} | {
            "OPTIONS": _libpq_options(cfg.url) | {"pgwarden": pgw_options}
        }

    def _scope(self) -> AbstractContextManager[Any]:
        return self._pgw.deadline(self._deadline)

    def _unit_of_work(self, fn: Callable[[], None]) -> None:
        from pgwarden.django import atomic_retry

        atomic_retry(fn)()

    def _handle(self) -> Any:
        from pgwarden.django import handle_of

        return handle_of()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        stats = self._handle().stats()
        out["handle"] = {k: v for k, v in stats.items() if k != "counters"}
        counters = dict(stats.get("counters") or {})
        counters.update(out["counters"])
        out["counters"] = counters
        return out

    def live_stats(self) -> dict[str, Any]:
        """``stats()`` plus histogram buckets, for ``pgwarden stress --dashboard``."""
        from pgwarden.exporters import snapshot

        return snapshot(self._handle())

    def close(self) -> None:
        self._connection.close()
        self._handle().close(timeout=2)


_DJANGO_KEYS = ("dbname", "user", "password", "host", "port")


def _libpq_options(url: str) -> dict[str, Any]:
    """The URL's other libpq parameters (``target_session_attrs``, ``sslmode``...), for
    OPTIONS: Django passes them on to libpq. (Dropping them sent both Django clients of
    the failover scenario to the first host, the demoted primary, until it went away.)"""
    from psycopg.conninfo import conninfo_to_dict

    return {k: v for k, v in conninfo_to_dict(url).items() if k not in _DJANGO_KEYS}


def _connection_settings(url: str) -> dict[str, Any]:
    """Django's NAME, USER, PASSWORD, HOST and PORT for a libpq URL (or conninfo)."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(url)
    return {
        "NAME": parts.get("dbname", "postgres"),
        "USER": parts.get("user", ""),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", ""),
        "PORT": parts.get("port", ""),
    }
