"""Health views for Django: ``/livez``, ``/readyz``, ``/health`` (``application/health+json``).

    # urls.py
    from django.urls import include, path

    urlpatterns = [
        path("", include("pgwarden.django.health")),          # /livez /readyz /health
        # or, configured:
        # path("probes/", include(pgwarden.django.health.urls(fail_on_outage=True))),
        ...
    ]

The answers are exactly the ASGI and WSGI apps' (`pgwarden.asgi.health_app`,
`pgwarden.wsgi.health_app`): the same code (`pgwarden.wsgi.WSGIHealthApp.respond`, which
`pgwarden.healthcheck` builds the bodies for) reading the pgwarden handle behind the
Django database. ``/livez`` never touches the database; ``/readyz`` fails before the
first warmup and while draining (``db.close()`` under way, or
`pgwarden.healthcheck.start_draining` called from your server's shutdown hook), and
reports a database outage as ``warn`` (200) unless ``fail_on_outage=True``; ``/health``
adds response time, connections in use out of the maximum, breaker and lifecycle state.
Each answer is bounded by the handle's ``health_timeout`` and costs the database at most
one round trip per ``health_interval``. GET and HEAD only. Under ASGI, Django runs these
(sync) views in its thread pool, as it does every view that uses the ORM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.http import require_safe

from pgwarden import healthcheck
from pgwarden.django.retry import handle_of
from pgwarden.wsgi import WSGIHealthApp

__all__ = ["urlpatterns", "urls", "views"]

View = Callable[[HttpRequest], HttpResponse]


def views(
    using: str | None = None,
    *,
    fail_on_outage: bool = False,
    description: str | None = None,
) -> dict[str, View]:
    """The three views (``"livez"``, ``"readyz"``, ``"health"``) for Django database
    *using*; see `pgwarden.asgi.health_app` for *fail_on_outage* and *description*."""

    def view_for(kind: str) -> View:
        @require_safe  # type: ignore[untyped-decorator]
        def view(request: HttpRequest) -> HttpResponse:
            app = WSGIHealthApp(
                handle_of(using), fail_on_outage=fail_on_outage, description=description
            )
            return _http(app.respond(kind), head=request.method == "HEAD")

        view.__name__ = view.__qualname__ = f"pgwarden_{kind}"
        return view  # type: ignore[no-any-return]

    return {kind: view_for(kind) for kind in ("livez", "readyz", "health")}


def urls(
    using: str | None = None,
    *,
    fail_on_outage: bool = False,
    description: str | None = None,
    livez: str | None = "livez",
    readyz: str | None = "readyz",
    health: str | None = "health",
) -> list[Any]:
    """URL patterns for the views, to ``include()``; a route set to None is left out."""
    found = views(using, fail_on_outage=fail_on_outage, description=description)
    routes = (("livez", livez), ("readyz", readyz), ("health", health))
    return [path(route, found[kind], name=f"pgwarden-{kind}") for kind, route in routes if route]


def _http(answer: healthcheck.HealthResponse, *, head: bool) -> HttpResponse:
    body = answer.encode()
    response = HttpResponse(b"" if head else body, status=answer.code)
    for name, value in answer.headers:
        response[name] = value
    response["Content-Length"] = str(len(body))
    return response


#: ``include("pgwarden.django.health")``: the three views for the default database.
urlpatterns = urls()
