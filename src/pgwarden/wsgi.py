"""WSGI health app for a sync handle: ``/livez``, ``/readyz``, ``/health`` (health+json).

    import pgwarden, pgwarden.wsgi

    db = pgwarden.connect()
    application = pgwarden.wsgi.health_app(db, app=your_wsgi_app)   # Django, Flask, ...

The same answers as `pgwarden.asgi.health_app` (`pgwarden.healthcheck` builds both):
``/livez`` never touches the database; ``/readyz`` fails before the first warmup and
while draining (``db.close()`` under way, or `pgwarden.healthcheck.start_draining`
called from your server's shutdown hook), and reports a database outage as ``warn``
(200) unless ``fail_on_outage=True``; ``/health`` adds response time, connections in use
out of the maximum, breaker and lifecycle state. A WSGI server has no lifespan: warm up
with ``db.ready()`` where your workers start (or let the first ``/readyz`` do it: it
starts a warmup, bounded by ``health_timeout``).

Standard library only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pgwarden import healthcheck

if TYPE_CHECKING:
    from pgwarden._sync.database import Database

__all__ = ["WSGIHealthApp", "health_app"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {
    200: "200 OK",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    503: "503 Service Unavailable",
}


class WSGIHealthApp:
    """The WSGI app returned by `health_app`."""

    def __init__(
        self,
        db: Database | Any,
        *,
        fail_on_outage: bool = False,
        app: WSGIApp | None = None,
        livez: str | None = "/livez",
        readyz: str | None = "/readyz",
        health: str | None = "/health",
        description: str | None = None,
    ) -> None:
        self.target = db
        self.fail_on_outage = fail_on_outage
        self.app = app
        self.description = description
        self._routes: dict[str, str] = {
            path: kind
            for path, kind in ((livez, "livez"), (readyz, "readyz"), (health, "health"))
            if path
        }

    def respond(self, kind: str) -> healthcheck.HealthResponse:
        """The answer for *kind* (``"livez"``, ``"readyz"`` or ``"health"``) right now."""
        db = healthcheck.handle_behind(self.target)
        if db is None and kind != "livez":
            _touch_engine(self.target)  # an engine that never connected: connect once
            db = healthcheck.handle_behind(self.target)
        if db is None:
            p = healthcheck.Probe(state="new")
            if kind == "livez":
                return healthcheck.livez(p)
            if kind == "readyz":
                return healthcheck.readyz(p, fail_on_outage=self.fail_on_outage)
            return healthcheck.health(p, fail_on_outage=self.fail_on_outage)
        if kind == "livez":
            return healthcheck.livez(healthcheck.probe(db))
        if kind == "readyz" and healthcheck.is_draining(db):
            return healthcheck.readyz(healthcheck.probe(db), fail_on_outage=self.fail_on_outage)
        if db.stats().get("breaker", "closed") != "closed":
            # Be the breaker's probe (see pgwarden.asgi._nudge_breaker): with no traffic,
            # nothing else would close it.
            with contextlib.suppress(Exception):
                db.fetchval("SELECT 1", timeout=db.settings.health_timeout)
        p = healthcheck.probe(db, db.health())
        if kind == "readyz":
            return healthcheck.readyz(p, fail_on_outage=self.fail_on_outage)
        return healthcheck.health(
            p, fail_on_outage=self.fail_on_outage, description=self.description
        )

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        kind = self._routes.get(str(environ.get("PATH_INFO", "") or "/"))
        if kind is None:
            if self.app is not None:
                return self.app(environ, start_response)
            return _plain(start_response, 404, b"not found\n")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, 405, b"method not allowed\n", [("Allow", "GET, HEAD")])
        answer = self.respond(kind)
        body = answer.encode()
        headers = [*answer.headers, ("content-length", str(len(body)))]
        start_response(_REASONS[answer.code], headers)
        return [b"" if method == "HEAD" else body]


def _touch_engine(engine: Any, timeout: float = 1.0) -> None:
    """One connection attempt through a ``postgresql+pgwarden`` engine, which makes its
    pgwarden handle (and starts the warmup); failures are the warmup's to report."""
    from pgwarden.core.deadline import deadline

    with contextlib.suppress(Exception), deadline(timeout), engine.connect():
        pass


def health_app(
    db: Database | Any,
    *,
    fail_on_outage: bool = False,
    app: WSGIApp | None = None,
    livez: str | None = "/livez",
    readyz: str | None = "/readyz",
    health: str | None = "/health",
    description: str | None = None,
) -> WSGIHealthApp:
    """A WSGI app serving the health endpoints for the sync handle *db* (or the handle
    behind a sync ``postgresql+pgwarden`` SQLAlchemy engine).

    With *app*, every other path goes to *app* (wrap your application with it, so probes
    skip its middleware); without, other paths are 404. Paths are relative to
    ``SCRIPT_NAME`` (``PATH_INFO``); pass ``livez=None`` (etc.) to drop one. See
    `pgwarden.asgi.health_app` for *fail_on_outage* and *description*.
    """
    return WSGIHealthApp(
        db,
        fail_on_outage=fail_on_outage,
        app=app,
        livez=livez,
        readyz=readyz,
        health=health,
        description=description,
    )


def _plain(
    start_response: StartResponse,
    code: int,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [
        ("content-type", "text/plain"),
        ("content-length", str(len(body))),
        *(extra or []),
    ]
    start_response(_REASONS[code], headers)
    return [body]
