"""The code in docs/guides/*.rst compiles, and the examples that do something run against a
real server and do what the guides say."""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pgwarden
from pgwarden.testing import FaultProxy, PostgresServer

GUIDES = Path(__file__).resolve().parents[2] / "docs" / "guides"
_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:(?: {4}.*)?\n)+)", re.M)


def blocks(guide: str) -> list[str]:
    text = (GUIDES / guide).read_text()
    return [textwrap.dedent(b) for b in _BLOCK.findall(text)]


def namespace(guide: str) -> dict[str, Any]:
    """Every python block of *guide*, run in one namespace (they only define things)."""
    ns: dict[str, Any] = {}
    for i, code in enumerate(blocks(guide)):
        if "start_http_server" in code:
            continue  # serves a port: compiled by the test below, not run
        exec(compile(code, f"{guide}[{i}]", "exec"), ns)  # noqa: S102 - our own docs
    return ns


@pytest.mark.parametrize("guide", sorted(p.name for p in GUIDES.glob("*.rst")))
def test_every_python_block_compiles(guide: str) -> None:
    found = blocks(guide)
    assert found, f"{guide} has no python example"
    for i, code in enumerate(found):
        compile(code, f"{guide}[{i}]", "exec")


def test_transactions_guide_runs(pg_server: PostgresServer) -> None:
    ns = namespace("transactions.rst")

    async def main() -> None:
        db = pgwarden.connect_async(pg_server.url)
        try:
            await db.execute("DROP TABLE IF EXISTS account, item, t")
            await db.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
            await db.execute("INSERT INTO account VALUES (1, 100), (2, 0)")
            await ns["transfer"](db, 1, 2, 30)
            assert await db.fetchval("SELECT balance FROM account WHERE id = 2") == 30

            await db.execute("CREATE TABLE item (id int PRIMARY KEY, stock int)")
            await db.execute("INSERT INTO item VALUES (7, 3)")
            assert await ns["reserve"](db, 7) == 2

            await db.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
            rows = [(1, "a"), (1, "dup"), (2, "b")]
            assert await ns["import_rows"](db, rows) == 1  # the duplicate, alone
            assert await db.fetchval("SELECT count(*) FROM t") == 2
        finally:
            await db.execute("DROP TABLE IF EXISTS account, item, t")
            await db.close()

    asyncio.run(main())


def test_errors_and_deadlines_guides_run(pg_server: PostgresServer) -> None:
    errors = namespace("errors.rst")
    deadlines = namespace("deadlines.rst")

    async def main() -> None:
        db = pgwarden.connect_async(pg_server.url)
        try:
            await db.execute("DROP TABLE IF EXISTS users, orders")
            await db.execute("CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE)")
            await db.execute("CREATE TABLE orders (id serial, user_id int)")
            assert await errors["create_user"](db, "a@example.com") == (201, "created")
            assert (await errors["create_user"](db, "a@example.com"))[0] == 409
            got = await deadlines["handle_request"](db, 1)
            assert got["user"]["email"] == "a@example.com"
            assert got["orders"] == []
        finally:
            await db.execute("DROP TABLE IF EXISTS users, orders")
            await db.close()

    asyncio.run(main())


def test_testing_guide_runs(
    pg_server: PostgresServer,
    pg_server_factory: Callable[..., PostgresServer],
    fault_proxy: FaultProxy,
) -> None:
    ns = namespace("testing.rst")
    ns["test_survives_idle_session_timeout"](pg_server_factory)
    ns["test_query_after_restart"](pg_server_factory)
    ns["test_dropped_connections"](fault_proxy, pg_server)
    server = pg_server_factory()  # the first example creates a table: not in the shared one
    ns["test_counts_orders"](server)
