"""FastAPI integration: the lifespan, a dependency that injects the handle, error handlers.

    import pgwarden, pgwarden.asgi, pgwarden.fastapi
    from pgwarden.fastapi import DatabaseDep

    db = pgwarden.connect_async()
    app = FastAPI(lifespan=pgwarden.fastapi.lifespan(db))
    pgwarden.fastapi.install_error_handlers(app)

    @app.get("/orders/{order_id}")
    async def order(order_id: int, db: DatabaseDep) -> dict[str, Any]:
        return await db.fetchrow("SELECT * FROM orders WHERE id = %s", [order_id])

    app.mount("/", pgwarden.asgi.health_app(db))    # /livez /readyz /health, after the routes

The dependency injects the *handle*, not a connection: each call acquires and returns
its own, so nothing is pinned while a response streams (FastAPI has moved the exit of
``yield`` dependencies before and after the response more than once). For the rare
endpoint that needs one connection across statements, see docs/asgi.md.

Importing this module imports FastAPI (extra ``fastapi``); `pgwarden.asgi` does not.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pgwarden._async.database import AsyncDatabase
from pgwarden._sync.database import Database
from pgwarden.asgi import Lifespan, current_handle, error_response, health_app, lifespan
from pgwarden.errors import DatabaseUnusable, NotCommitted, OutcomeUnknown

__all__ = [
    "DatabaseDep",
    "Lifespan",
    "SyncDatabaseDep",
    "database",
    "health_app",
    "install_error_handlers",
    "lifespan",
    "sync_database",
]

logger = logging.getLogger("pgwarden.asgi")


async def database() -> AsyncDatabase:
    """The ``AsyncDatabase`` whose `lifespan` is running; without one,
    ``pgwarden.connect_async()`` (the process's handle for ``DATABASE_URL``).

    Use it as ``Depends(pgwarden.fastapi.database)``, or annotate a parameter with
    `DatabaseDep`. Override it in tests with ``app.dependency_overrides``.
    """
    db = current_handle("async")
    if db is None:
        from pgwarden._registry import connect_async

        return connect_async()
    assert isinstance(db, AsyncDatabase)
    return db


async def sync_database() -> Database:
    """Like `database`, for a sync ``Database`` (``def`` endpoints run in FastAPI's thread
    pool, where the sync handle belongs); without a lifespan, ``pgwarden.connect()``."""
    db = current_handle("sync")
    if db is None:
        from pgwarden._registry import connect

        return connect()
    assert isinstance(db, Database)
    return db


#: ``db: DatabaseDep`` in an endpoint's signature injects the async handle.
DatabaseDep = Annotated[AsyncDatabase, Depends(database)]
#: ``db: SyncDatabaseDep`` injects the sync handle (for ``def`` endpoints).
SyncDatabaseDep = Annotated[Database, Depends(sync_database)]


async def _handle_error(request: Request, exc: Exception) -> Response:
    answer = error_response(exc)
    if answer is None:  # pragma: no cover - registered only for the classes mapped below
        raise exc
    status, headers, body = answer
    logger.warning(
        "%s %s: %s: %s (HTTP %d)",
        request.method,
        request.url.path,
        type(exc).__name__,
        exc,
        status,
        extra={"event": "http_error", "error": type(exc).__name__, "status": status},
    )
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: Any) -> None:
    """Answer pgwarden's errors in *app* (FastAPI or Starlette) instead of a bare 500:
    ``DatabaseUnusable`` and ``NotCommitted`` become 503 with ``Retry-After``,
    ``OutcomeUnknown`` (``AmbiguousCommitError`` too) a 500 whose body says the write may
    have happened, and a serialization failure or deadlock that outlived
    ``run_transaction``'s attempts (or the retry budget) a 409. See
    `pgwarden.asgi.error_response` for the bodies; the exception's text is logged on the
    ``pgwarden.asgi`` logger (redacted), never sent to the client."""
    import psycopg.errors

    for cls in (
        DatabaseUnusable,
        NotCommitted,
        OutcomeUnknown,
        psycopg.errors.SerializationFailure,
        psycopg.errors.DeadlockDetected,
    ):
        app.add_exception_handler(cls, _handle_error)
