"""A deadline changes nothing but the time (real server, direct and through PgBouncer).

Every query method gives the same result, and raises the same error, with and without a
deadline: single statements with and without parameters, strings of several statements,
DDL, writes and failures. A failed statement under a deadline leaves no work for the pool
(psycopg_pool logs nothing about it). At the deadline the server is asked to stop the
statement (a cancel request), the call raises `DeadlineExceeded`, and the connection the
cancel consumed is used again rather than replaced.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgwarden import AsyncDatabase, DeadlineExceeded, Settings

from ._compat import run

METHODS = ["fetch", "fetchrow", "fetchval", "execute"]


@pytest.fixture(params=["direct", "pgbouncer"])
def url(request: pytest.FixtureRequest, pg_server: Any) -> str:
    if request.param == "direct":
        return str(pg_server.url)
    return str(request.getfixturevalue("pgbouncer").url)


@pytest.fixture
def table(pg_server: Any) -> Iterator[str]:
    name = "parity_" + uuid.uuid4().hex[:10]
    pg_server.execute(f"CREATE TABLE {name} (id int primary key, v text)")
    yield name
    pg_server.execute(f"DROP TABLE IF EXISTS {name}")


def make(url: str, **overrides: Any) -> AsyncDatabase:
    overrides.setdefault("application_name", "pgw-parity")
    return AsyncDatabase(Settings(url=url, **overrides))


def outcome_of(exc: BaseException) -> tuple[str, str | None]:
    return type(exc).__name__, getattr(getattr(exc, "diag", None), "sqlstate", None)


async def both(db: AsyncDatabase, method: str, query: str, params: Any = None) -> list[Any]:
    """The call's result (or error class and SQLSTATE) without, then with, a deadline."""
    outcomes: list[Any] = []
    for timeout in (None, 10.0):
        try:
            outcomes.append(("ok", await getattr(db, method)(query, params, timeout=timeout)))
        except psycopg.Error as exc:
            outcomes.append(("error", outcome_of(exc)))
    return outcomes


READS = [
    ("SELECT 1 AS a, 'x' AS b", None),
    ("SELECT %s::int AS a, %s::text AS b", [7, "y"]),
    ("SELECT 1 AS a; SELECT 2 AS a", None),  # several statements: the first result
    ("SELECT g AS a FROM generate_series(1, 3) g -- a trailing comment", None),
    ("SELECT 1 AS a;", None),
    ("SELECT 1/0 AS a", None),  # division_by_zero
    ("SELECT 1 AS a; SELECT 1/0", None),  # the second statement fails
    ("SELEC 1", None),  # syntax_error
    ("SELECT %s::int AS a", ["not a number"]),  # invalid_text_representation
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("query", "params"), READS)
def test_reads_give_the_same_result_with_and_without_a_deadline(
    url: str, method: str, query: str, params: Any
) -> None:
    async def main() -> list[Any]:
        async with make(url) as db:
            await db.ready()
            return await both(db, method, query, params)

    without, within = run(main)
    assert without == within


def writes_on(table: str) -> list[tuple[str, Any]]:
    return [
        (f"INSERT INTO {table} VALUES (1, 'a') RETURNING id", None),
        (f"INSERT INTO {table} VALUES (%s, %s) RETURNING id, v", [2, "b"]),
        (f"UPDATE {table} SET v = %s WHERE id < 100 RETURNING id", ["c"]),
        (f"DELETE FROM {table} WHERE id = -1", None),
        (f"INSERT INTO {table} VALUES (1, 'dup')", None),  # unique_violation
        (f"INSERT INTO {table} VALUES (%s, 'dup')", [1]),
        (f"CREATE TABLE {table}_ddl (a int); DROP TABLE {table}_ddl", None),
        (f"INSERT INTO {table} VALUES (3, 's'); SELECT count(*) FROM {table}", None),
        (f"SELECT count(*) FROM {table}; INSERT INTO {table} VALUES (4, 't')", None),
        (f"INSERT INTO {table} VALUES (5, 'u'); INSERT INTO {table} VALUES (1, 'v')", None),
        (f"SELECT count(*) AS n, max(id) AS top FROM {table}", None),
    ]


@pytest.mark.parametrize("method", METHODS)
def test_writes_and_ddl_give_the_same_result_with_and_without_a_deadline(
    url: str, pg_server: Any, table: str, method: str
) -> None:
    twin = table + "_t"
    pg_server.execute(f"CREATE TABLE {twin} (id int primary key, v text)")

    async def sequence(db: AsyncDatabase, on: str, timeout: float | None) -> list[Any]:
        outcomes: list[Any] = []
        for query, params in writes_on(on):
            try:
                result = await getattr(db, method)(query, params, timeout=timeout)
                outcomes.append(("ok", result))
            except psycopg.Error as exc:
                outcomes.append(("error", outcome_of(exc)))
        return outcomes

    async def main() -> tuple[list[Any], list[Any]]:
        async with make(url) as db:
            await db.ready()
            return await sequence(db, table, None), await sequence(db, twin, 10.0)

    try:
        without, within = run(main)
    finally:
        pg_server.execute(f"DROP TABLE IF EXISTS {twin}")
    assert without == within
    assert ("error", ("UniqueViolation", "23505")) in without


def test_a_failed_statement_under_a_deadline_leaves_nothing_for_the_pool(
    url: str, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with make(url) as db:
            await db.ready()
            await db.execute(f"INSERT INTO {table} VALUES (1, 'one')", timeout=10.0)
            for _ in range(3):
                with pytest.raises(psycopg.errors.UniqueViolation):
                    await db.execute(f"INSERT INTO {table} VALUES (%s, 'x')", [1], timeout=10.0)
                with pytest.raises(psycopg.errors.UniqueViolation):
                    await db.execute(f"INSERT INTO {table} VALUES (1, 'x')", timeout=10.0)
                with pytest.raises(psycopg.errors.DivisionByZero):
                    await db.fetchval("SELECT 1/0", timeout=10.0)
            assert await db.fetchval(f"SELECT count(*) FROM {table}", timeout=10.0) == 1

    run(main)
    returned = [r for r in caplog.records if "returned connection" in r.getMessage()]
    assert returned == []


def active_sleeps(pg_server: Any, app: str) -> int:
    rows = pg_server.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active' AND query LIKE %s",
        [app, "%pg_sleep(30)%"],
    )
    return int(rows[0][0])


def wait_until_no_sleeps(pg_server: Any, app: str, within: float) -> bool:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if active_sleeps(pg_server, app) == 0:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("kind", ["read", "write"])
def test_the_server_stops_the_statement_at_the_deadline(
    url: str, pg_server: Any, table: str, kind: str
) -> None:
    app = f"pgw-cancel-{kind}"
    query = (
        "SELECT 1 FROM pg_sleep(30)"
        if kind == "read"
        else f"INSERT INTO {table} SELECT 5, 'late' FROM pg_sleep(30)"
    )

    async def main() -> tuple[float, Any, int, int, Any]:
        async with make(url, application_name=app, max_size=1) as db:
            await db.ready()
            pid_before = await db.fetchval("SELECT pg_backend_pid()")
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                await db.fetchval(query, timeout=0.4)
            elapsed = time.monotonic() - started
            stopped = wait_until_no_sleeps(pg_server, app, within=1.0)
            pid_after = await db.fetchval("SELECT pg_backend_pid()")
            return elapsed, caught.value.last_error, pid_before, pid_after, stopped

    elapsed, last_error, pid_before, pid_after, stopped = run(main)
    assert 0.35 <= elapsed < 2.0
    assert isinstance(last_error, psycopg.errors.QueryCanceled)
    assert stopped  # the server stopped it: nothing left running
    if url == pg_server.url:
        # The cancel was consumed by the statement it stopped: the same session serves
        # the next call (through PgBouncer the server session behind it may differ).
        assert pid_after == pid_before
    assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(0,)]
