"""What a fresh process's first query imports beyond `import psycopg`: the handle, nothing else.

A serverless fleet pays the first query's imports on every cold start (bench/micro.py's
``cold start`` row measures them). These tests run the first query in a fresh interpreter
against a real server and fail when a change makes it load an optional part of pgwarden
(exporters, dashboard, CLI, SQLAlchemy, ASGI, the test harness), the other shell, or any
module that pgwarden's handle does not need. psycopg_pool is among those: a first query
runs on the warmup's own connection, and the pool is built only when calls overlap.
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
# Parts of the handle a first query does not use: loaded by their first use (listen(),
# stream(), with_rows(), a COPY, a row shape, a retry, a lost COMMIT's resolution, the
# classifier's rules by the first failure).
_DEFERRED_SHELL_PARTS = ("listen", "copy", "stream", "rows", "retrying")
DEFERRED_PARTS = (
    "pgwarden.core.classify",
    "pgwarden.core.listen",
    "pgwarden.core.commit",
    "pgwarden.core.rows",
    "pgwarden._handle.rows",
    *(
        f"pgwarden.{shell}.{part}"
        for shell in ("_async", "_sync")
        for part in _DEFERRED_SHELL_PARTS
    ),
)
OTHER_SHELL = {"sync": "pgwarden._async", "async": "pgwarden._sync"}
# Every pgwarden module a first query loads, the shell's as "{shell}": a module added to
# this path (a new top-level import in the handle's modules) must be added here, on purpose.
FIRST_QUERY_MODULES = frozenset(
    {
        "pgwarden",
        "pgwarden._handle",
        "pgwarden._handle.config",
        "pgwarden._handle.net",
        "pgwarden._handle.shape",
        "pgwarden._handle.sql",
        "pgwarden._handle.state",
        "pgwarden._handle.waits",
        "pgwarden._redact",
        "pgwarden._registry",
        "pgwarden._signals",
        "pgwarden.core",
        "pgwarden.core.breaker",
        "pgwarden.core.deadline",
        "pgwarden.core.histogram",
        "pgwarden.core.hygiene",
        "pgwarden.core.lifecycle",
        "pgwarden.core.metrics",
        "pgwarden.core.prepared",
        "pgwarden.core.failures",
        "pgwarden.core.resend",
        "pgwarden.core.retry",
        "pgwarden.core.sizing",
        "pgwarden.core.sqltext",
        "pgwarden.core.tracing",
        "pgwarden.errors",
        "pgwarden.settings",
        "{shell}",
        "{shell}._compat",
        "{shell}.acquire",
        "{shell}.database",
        "{shell}.execute",
        "{shell}.connection",
        "{shell}.transaction",
        "{shell}.warmup",
    }
)
SHELL_PACKAGE = {"sync": "pgwarden._sync", "async": "pgwarden._async"}


def _loaded_beyond_psycopg(code: str, url: str, **extra_env: str) -> set[str]:
    """The modules *code* adds to sys.modules in a fresh interpreter after `import psycopg`."""
    child = (
        "import os, sys, psycopg\nbefore = set(sys.modules)\n"
        + code
        + "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["PGW_COLD_START_URL"] = url
    env.update(extra_env)
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
    assert "pgwarden._handle.state" in loaded  # the probe saw the handle being loaded
    foreign = sorted(m for m in loaded if not _is_under(m, "pgwarden"))
    assert foreign == [], f"the first query imports modules psycopg does not: {foreign}"
    unneeded = sorted(
        m
        for m in loaded
        if any(_is_under(m, p) for p in (*OPTIONAL_PARTS, *DEFERRED_PARTS, OTHER_SHELL[shell]))
    )
    assert unneeded == [], f"the first query imports parts it does not use: {unneeded}"


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_first_query_loads_exactly_the_handle_path(pg_server: Any, shell: str) -> None:
    loaded = _loaded_beyond_psycopg(FIRST_QUERY[shell], pg_server.url)
    expected = {m.format(shell=SHELL_PACKAGE[shell]) for m in FIRST_QUERY_MODULES}
    ours = {m for m in loaded if _is_under(m, "pgwarden")}
    assert sorted(ours - expected) == [], "new modules on the first query's path"
    assert sorted(expected - ours) == [], "modules the first query no longer loads: drop them"


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_deferred_parts_load_on_first_use(pg_server: Any, shell: str) -> None:
    """The deferred parts still work when first used in a fresh process: a stream,
    a row shape, a with_rows view, a COPY out, a transaction and a write's COMMIT under a
    deadline (`deferred` stand-ins replaced by the real callables)."""
    if shell == "sync":
        code = (
            "import io, pgwarden\n"
            "db = pgwarden.connect(os.environ['PGW_COLD_START_URL'])\n"
            "assert db.fetchval('SELECT 1') == 1\n"
            "assert [r[0] for r in db.stream('SELECT generate_series(1, 3)', row=tuple)] "
            "== [1, 2, 3]\n"
            "assert db.with_rows(tuple).fetchrow('SELECT 7') == (7,)\n"
            "sink = io.BytesIO()\n"
            "assert db.copy_out('SELECT 1', sink) == 1 and sink.getvalue() == b'1\\n'\n"
            "with db.transaction() as tx:\n"
            "    assert tx.fetchval('SELECT 2') == 2\n"
            "assert db.execute('SELECT 1', timeout=5, write=True) == 1\n"
            "db.close()\n"
        )
    else:
        code = (
            "import asyncio, io, pgwarden\n"
            "async def main():\n"
            "    db = pgwarden.connect_async(os.environ['PGW_COLD_START_URL'])\n"
            "    assert await db.fetchval('SELECT 1') == 1\n"
            "    assert [r[0] async for r in db.stream('SELECT generate_series(1, 3)', "
            "row=tuple)] == [1, 2, 3]\n"
            "    assert await db.with_rows(tuple).fetchrow('SELECT 7') == (7,)\n"
            "    sink = io.BytesIO()\n"
            "    assert await db.copy_out('SELECT 1', sink) == 1 and sink.getvalue() == b'1\\n'\n"
            "    async with db.transaction() as tx:\n"
            "        assert await tx.fetchval('SELECT 2') == 2\n"
            "    assert await db.execute('SELECT 1', timeout=5, write=True) == 1\n"
            "    await db.close()\n"
            "asyncio.run(main())\n"
        )
    loaded = _loaded_beyond_psycopg(code, pg_server.url)
    package = SHELL_PACKAGE[shell]
    for part in ("stream", "rows", "copy"):
        assert f"{package}.{part}" in loaded
    # a write under a deadline commits with its marker: the commit module came with it
    assert {"pgwarden._handle.rows", "pgwarden.core.commit"} <= loaded


FIRST_FAILURES = {
    "sync": (
        "import psycopg, pgwarden\n"
        "from pgwarden.errors import NotReady\n"
        "db = pgwarden.connect(os.environ['PGW_COLD_START_URL'])\n"
        "assert db.fetchval('SELECT 1') == 1\n"
        "try:\n"
        "    db.fetchval('SELECT 1/0')\n"
        "except psycopg.errors.DivisionByZero:\n"
        "    pass\n"
        "assert db.fetchval('SELECT 2') == 2\n"
        "errors = db.stats()['counters']['errors']\n"
        "assert errors == {'permanent': 1}, errors\n"
        "db.close()\n"
        "down = pgwarden.connect(os.environ['PGW_COLD_START_DOWN_URL'], ready_timeout=0.5)\n"
        "try:\n"
        "    down.fetchval('SELECT 1')\n"
        "except NotReady:\n"
        "    pass\n"
        "assert down.stats()['counters']['connect_failures'].get('nothing_ran', 0) >= 1\n"
        "down.close()\n"
    ),
    "async": (
        "import asyncio, psycopg, pgwarden\n"
        "from pgwarden.errors import NotReady\n"
        "async def main():\n"
        "    db = pgwarden.connect_async(os.environ['PGW_COLD_START_URL'])\n"
        "    assert await db.fetchval('SELECT 1') == 1\n"
        "    try:\n"
        "        await db.fetchval('SELECT 1/0')\n"
        "    except psycopg.errors.DivisionByZero:\n"
        "        pass\n"
        "    assert await db.fetchval('SELECT 2') == 2\n"
        "    errors = db.stats()['counters']['errors']\n"
        "    assert errors == {'permanent': 1}, errors\n"
        "    await db.close()\n"
        "    down = pgwarden.connect_async(\n"
        "        os.environ['PGW_COLD_START_DOWN_URL'], ready_timeout=0.5)\n"
        "    try:\n"
        "        await down.fetchval('SELECT 1')\n"
        "    except NotReady:\n"
        "        pass\n"
        "    assert down.stats()['counters']['connect_failures'].get('nothing_ran', 0) >= 1\n"
        "    await down.close()\n"
        "asyncio.run(main())\n"
    ),
}


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_first_failure_loads_the_classifier(pg_server: Any, shell: str) -> None:
    """The classifier's rules arrive with the first failure, and classify it: a failed
    statement (permanent: not retried, the handle still works) and a refused connect
    (nothing ran: the warmup retries it until ``ready_timeout``)."""
    loaded = _loaded_beyond_psycopg(
        FIRST_FAILURES[shell],
        pg_server.url,
        PGW_COLD_START_DOWN_URL=f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres",
    )
    assert "pgwarden.core.classify" in loaded


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_overlapping_calls_load_the_pool(pg_server: Any, shell: str) -> None:
    """The pool (and psycopg_pool) arrives with the first call that finds the warmup's
    connection lent: here a query made while a checkout holds it."""
    if shell == "sync":
        code = (
            "import pgwarden\n"
            "db = pgwarden.connect(os.environ['PGW_COLD_START_URL'])\n"
            "with db.connection() as conn:\n"
            "    assert 'psycopg_pool' not in sys.modules\n"
            "    assert db.fetchval('SELECT 1') == 1\n"
            "db.close()\n"
        )
    else:
        code = (
            "import asyncio, pgwarden\n"
            "async def main():\n"
            "    db = pgwarden.connect_async(os.environ['PGW_COLD_START_URL'])\n"
            "    async with db.connection() as conn:\n"
            "        assert 'psycopg_pool' not in sys.modules\n"
            "        assert await db.fetchval('SELECT 1') == 1\n"
            "    await db.close()\n"
            "asyncio.run(main())\n"
        )
    loaded = _loaded_beyond_psycopg(code, pg_server.url)
    assert {"psycopg_pool", f"{SHELL_PACKAGE[shell]}.pool"} <= loaded
