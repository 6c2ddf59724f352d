"""pgwarden.django.health: /livez, /readyz, /health for Django, the ASGI/WSGI answers.

Django's test client calls the views through Django's URL resolver and handler; the
server is real (``pg_server_factory``), stopped for the outage case. Each answer must
be exactly what `pgwarden.wsgi.WSGIHealthApp` (the ASGI app's twin) says for the same
handle, valid health+json, and free of the password.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytest.importorskip("django")

from django.test import Client
from django.urls import include, path

from django_suite.inprocess import use_database
from pgwarden import healthcheck
from pgwarden.django import handle_of
from pgwarden.django.health import urls, views


class URLConf:
    """A URLconf module for one alias: the health views included under ``/probes/``."""

    def __init__(self, alias: str, **kwargs: Any) -> None:
        self.urlpatterns = [path("probes/", include(urls(alias, **kwargs)))]


def get(alias: str, route: str, method: str = "get", **kwargs: Any) -> Any:
    client = Client()
    with_urls = URLConf(alias, **kwargs)
    from django.test.utils import override_settings

    with override_settings(ROOT_URLCONF=with_urls):
        return getattr(client, method)(f"/probes/{route}")


def test_the_views_answer_what_the_wsgi_app_answers(pg_server_factory: Any) -> None:
    from pgwarden.wsgi import WSGIHealthApp

    server = pg_server_factory()
    alias = use_database(server.url, health_interval=0.05)
    db = handle_of(alias)
    # /livez never touches the database; the first /readyz warms the handle up itself.
    assert get(alias, "livez").status_code == 200
    assert db.stats()["counters"]["warmups"]["ok"] == 0
    assert get(alias, "readyz").status_code == 200
    assert db.stats()["counters"]["warmups"]["ok"] == 1
    for kind in ("livez", "readyz", "health"):
        response = get(alias, kind)
        body = json.loads(response.content)
        assert response["Content-Type"] == healthcheck.MEDIA_TYPE
        assert response["Cache-Control"] == "max-age=0, must-revalidate"
        assert healthcheck.problems(body, response.status_code) == []
        expected = WSGIHealthApp(db).respond(kind)
        assert response.status_code == expected.code == 200
        assert body["status"] == expected.status == "pass"
        assert set(body.get("checks", {})) == set(expected.body.get("checks", {}))
        assert server.password not in response.content.decode()
    head = get(alias, "health", "head")
    assert head.status_code == 200
    assert head.content == b""
    assert get(alias, "health", "post").status_code == 405

    # The database goes away: still live, still ready (warn: requests get a fast 503),
    # and failing readiness only with fail_on_outage.
    server.stop("immediate")
    assert get(alias, "livez").status_code == 200
    until = time.monotonic() + 5  # the last report is cached for health_interval
    while True:
        ready = get(alias, "readyz")
        assert ready.status_code == 200
        if json.loads(ready.content)["status"] == "warn" or time.monotonic() > until:
            break
        time.sleep(0.05)
    assert json.loads(ready.content)["status"] == "warn"
    assert get(alias, "readyz", fail_on_outage=True).status_code == 503
    health = get(alias, "health")
    body = json.loads(health.content)
    assert body["checks"]["postgresql:responseTime"][0]["status"] == "fail"
    assert server.password not in health.content.decode()
    # Draining (SIGTERM seen): readiness fails at once.
    healthcheck.start_draining(db)
    try:
        assert get(alias, "readyz").status_code == 503
    finally:
        healthcheck.stop_draining(db)
    db.close()


def test_the_default_urlconf_serves_the_default_database() -> None:
    """``include("pgwarden.django.health")`` names the three routes for ``default``."""
    from django.urls import reverse
    from django.urls.resolvers import get_resolver

    resolver = get_resolver("pgwarden.django.health")
    names = {p.name for p in resolver.url_patterns}
    assert names == {"pgwarden-livez", "pgwarden-readyz", "pgwarden-health"}
    assert reverse("pgwarden-readyz", urlconf="pgwarden.django.health") == "/readyz"
    assert set(views()) == {"livez", "readyz", "health"}
