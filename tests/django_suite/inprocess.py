"""Django configured in the test process, once, and databases added to it per test.

`configure()` sets up Django (the ``faultapp`` models, ``USE_TZ``, no database yet);
`use_database(url, **pgwarden)` adds a database alias of its own for *url* (an alias
per call, so no thread keeps a wrapper of another test's server) and returns it.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from psycopg.conninfo import conninfo_to_dict

_lock = threading.Lock()
_aliases = itertools.count(1)


def configure() -> None:
    """Configure and set up Django in this process (a no-op the second time)."""
    import django
    from django.conf import settings

    with _lock:
        if settings.configured:
            return
        settings.configure(
            DATABASES={},
            INSTALLED_APPS=["django_suite.faultapp"],
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.AutoField",
            ROOT_URLCONF="pgwarden.django.health",
            ALLOWED_HOSTS=["*"],
            SECRET_KEY="pgwarden-tests",
        )
        django.setup()


def use_database(
    url: str, *, engine: str = "pgwarden.django", options: Any = None, **pgwarden: Any
) -> str:
    """A new database alias for *url* with ``OPTIONS["pgwarden"] = pgwarden`` (and
    *options*, other OPTIONS); returns the alias."""
    configure()
    from django.db import connections

    parts = conninfo_to_dict(url)
    opts: dict[str, Any] = dict(options or {})
    if engine == "pgwarden.django":
        opts["pgwarden"] = pgwarden
    config = {
        "ENGINE": engine,
        "NAME": parts.get("dbname", "postgres"),
        "USER": parts.get("user", "postgres"),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", "127.0.0.1"),
        "PORT": parts.get("port", ""),
        "OPTIONS": opts,
    }
    with _lock:
        alias = f"db{next(_aliases)}"
        # Django's defaults for every key left out (configure_settings wants a default).
        filled = connections.configure_settings({"default": {}, alias: config})[alias]
        connections.settings[alias] = filled
    return alias


def create_tables(alias: str, *models: Any) -> None:
    """Drop and create the tables of *models* on database *alias*."""
    from django.db import connections

    connection = connections[alias]
    with connection.schema_editor() as editor:
        for model in models:
            editor.execute(f"DROP TABLE IF EXISTS {model._meta.db_table} CASCADE")
            editor.create_model(model)
    connection.close()
