"""What a fresh process's first query imports beyond `import psycopg`: the handle, nothing else.

A serverless fleet pays the first query's imports on every cold start (bench/micro.py's
``cold start`` row measures them). These tests run the first query in a fresh interpreter
against a real server and fail when a change makes it load an optional part of pgwarden
(exporters, dashboard, CLI, SQLAlchemy, ASGI, the test harness), the other shell, or any
module that neither pgwarden's handle nor psycopg_pool needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

FIRST_QUERY = {
    "sync": (
        "import pgwarden\n"
        "db = pgwarden.connect(os.environ['PGW_COLD_START_URL'])\n"
        "assert db.fetchval('SELECT 1') == 1\n"
    ),
    "async": (
        "import asyncio, pgwarden\n"
        "async def main():\n"
        "    db = pgwarden.connect_async(os.environ['PGW_COLD_START_URL'])\n"
        "    assert await db.fetchval('SELECT 1') == 1\n"
        "    await db.close()\n"
        "asyncio.run(main())\n"
    ),
}

# pgwarden's parts that a first query must not load; each is imported by its own users.
OPTIONAL_PARTS = (
    "pgwarden.asgi",
    "pgwarden.cli",
    "pgwarden.dashboard",
    "pgwarden.embedded",
    "pgwarden.exporters",
    "pgwarden.fastapi",
    "pgwarden.healthcheck",
    "pgwarden.sqlalchemy",
    "pgwarden.stress",
    "pgwarden.testing",
    "pgwarden.wsgi",
)
# Parts of the handle a first query does not use: loaded by their first use (listen()).
DEFERRED_PARTS = ("pgwarden.core.listen", "pgwarden._async.listen", "pgwarden._sync.listen")
OTHER_SHELL = {"sync": "pgwarden._async", "async": "pgwarden._sync"}


def _loaded_beyond_psycopg(code: str, url: str) -> set[str]:
    """The modules *code* adds to sys.modules in a fresh interpreter after `import psycopg`."""
    child = (
        "import os, sys, psycopg\nbefore = set(sys.modules)\n"
        + code
        + "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["PGW_COLD_START_URL"] = url
    out = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_first_query_loads_only_the_handle(pg_server: Any, shell: str) -> None:
    loaded = _loaded_beyond_psycopg(FIRST_QUERY[shell], pg_server.url)
    pool_imports = _loaded_beyond_psycopg("import psycopg_pool\n", pg_server.url)
    assert "pgwarden._handle.state" in loaded  # the probe saw the handle being loaded
    foreign = sorted(m for m in loaded - pool_imports if not _is_under(m, "pgwarden"))
    assert foreign == [], f"the first query imports modules psycopg does not: {foreign}"
    unneeded = sorted(
        m
        for m in loaded
        if any(_is_under(m, p) for p in (*OPTIONAL_PARTS, *DEFERRED_PARTS, OTHER_SHELL[shell]))
    )
    assert unneeded == [], f"the first query imports parts it does not use: {unneeded}"
