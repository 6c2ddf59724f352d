"""A transaction's BEGIN goes with its first statement (`pgwarden.sqlalchemy._begin`).

One round trip where psycopg's own path takes two, and nothing else changes: every
statement gives the rows, row counts, column names, transaction state and errors that
SQLAlchemy's own psycopg dialect gives for it. Real server; the round trips are counted
through the fault proxy with a large latency (each costs at least twice it, and the
bounds leave most of a round trip for the machine).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import pgwarden
from pgwarden.testing import FaultProxy, PostgresServer

LATENCY = 0.1  # each way: a round trip costs at least 0.2 s
ROUND_TRIP = 2 * LATENCY


def _url(url: str, scheme: str) -> str:
    query = f"application_name=sa-begin-{uuid.uuid4().hex[:8]}"
    if scheme == "postgresql+pgwarden":
        query += "&pgwarden_max_size=1"
    return f"{url.replace('postgresql://', scheme + '://', 1)}?{query}"


@pytest.fixture
def table(pg_url: str) -> Iterator[str]:
    name = f"sab_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, label text)")
        admin.execute(f"INSERT INTO {name} VALUES (1, 'one'), (2, 'two')")
    yield name
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {name}")


def _timed_first_statement(engine: sa.Engine, statement: Any, **options: Any) -> float:
    """Seconds the first statement of a transaction takes (the checkout left out)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1")).scalar()  # checkout and warmup paid here
        conn.rollback()
        started = time.monotonic()
        conn.execution_options(**options).execute(statement).fetchall()
        return time.monotonic() - started


def test_first_statement_and_begin_cost_one_round_trip(
    fault_proxy: FaultProxy, pg_server: PostgresServer
) -> None:
    engine = sa.create_engine(_url(fault_proxy.url_for(pg_server.url), "postgresql+pgwarden"))
    try:
        _timed_first_statement(engine, sa.text("SELECT 1"))
        fault_proxy.set_latency(LATENCY)
        one = _timed_first_statement(engine, sa.text("SELECT :x").bindparams(x=1))
        bare = _timed_first_statement(engine, sa.text("SELECT 1"))
        # Two statements in one string: psycopg's own path (BEGIN, then the string).
        two = _timed_first_statement(engine, sa.text("SELECT 1; SELECT 2"))
        with pgwarden.deadline(30):  # BEGIN, the timeout and the statement together
            timed = _timed_first_statement(engine, sa.text("SELECT :x").bindparams(x=1))
            # BEGIN and the timeout together, then the string: two, not three.
            timed_two = _timed_first_statement(engine, sa.text("SELECT 1; SELECT 2"))
    finally:
        fault_proxy.set_latency(0)
        engine.dispose()
    assert ROUND_TRIP <= one < 1.75 * ROUND_TRIP
    assert ROUND_TRIP <= bare < 1.75 * ROUND_TRIP
    assert ROUND_TRIP <= timed < 1.75 * ROUND_TRIP
    assert two >= 2 * ROUND_TRIP
    assert 2 * ROUND_TRIP <= timed_two < 2.75 * ROUND_TRIP


def test_async_first_statement_and_begin_cost_one_round_trip(
    fault_proxy: FaultProxy, pg_server: PostgresServer
) -> None:
    url = _url(fault_proxy.url_for(pg_server.url), "postgresql+pgwarden")

    async def main() -> tuple[float, float]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await conn.rollback()
                fault_proxy.set_latency(LATENCY)
                started = time.monotonic()
                await conn.execute(sa.text("SELECT :x").bindparams(x=1))
                plain = time.monotonic() - started
                await conn.rollback()
                with pgwarden.deadline(30):
                    started = time.monotonic()
                    await conn.execute(sa.text("SELECT :x").bindparams(x=1))
                    timed = time.monotonic() - started
            return plain, timed
        finally:
            fault_proxy.set_latency(0)
            await engine.dispose()

    plain, timed = asyncio.run(main())
    assert ROUND_TRIP <= plain < 1.75 * ROUND_TRIP
    assert ROUND_TRIP <= timed < 1.75 * ROUND_TRIP


# --- the same answers as SQLAlchemy's own psycopg dialect -------------------------------

Outcome = tuple[str, Any]


def _cases(table: str) -> list[tuple[str, Callable[[sa.Connection], Any]]]:
    """First statements of a transaction, each with what it gives back."""

    def rows(statement: Any, **options: Any) -> Callable[[sa.Connection], Any]:
        def run(conn: sa.Connection) -> Any:
            result = conn.execution_options(**options).execute(statement)
            if not result.returns_rows:
                return result.rowcount
            count = result.rowcount  # before the rows: a consumed result is closed
            return (list(result.keys()), [tuple(r) for r in result], count)

        return run

    def driver_sql(statement: str, *args: Any) -> Callable[[sa.Connection], Any]:
        def run(conn: sa.Connection) -> Any:
            result = conn.exec_driver_sql(statement, *args)
            return [tuple(r) for r in result] if result.returns_rows else result.rowcount

        return run

    def write_then_read(conn: sa.Connection) -> Any:
        inserted = conn.execute(sa.text(f"INSERT INTO {table} VALUES (:i, :l)"), {"i": 3, "l": "x"})
        count = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
        return inserted.rowcount, count

    return [
        (
            "select with parameters",
            rows(sa.text(f"SELECT id, label FROM {table} WHERE id = :i").bindparams(i=1)),
        ),
        ("select no parameters", rows(sa.text(f"SELECT id, label FROM {table} ORDER BY id"))),
        ("update rowcount", rows(sa.text(f"UPDATE {table} SET label = label || '!'"))),
        ("insert returning", rows(sa.text(f"INSERT INTO {table} VALUES (5, 'five') RETURNING id"))),
        ("write then read in the transaction", write_then_read),
        ("unique violation", rows(sa.text(f"INSERT INTO {table} VALUES (1, 'dup')"))),
        ("syntax error", rows(sa.text("SELEC 1"))),
        ("division by zero", rows(sa.text("SELECT 1 / :z").bindparams(z=0))),
        ("two statements in one string", driver_sql("SELECT 1; SELECT 2")),
        ("percent with no parameters", driver_sql("SELECT '100%'")),
        ("percent with parameters", driver_sql("SELECT '100%%', %(x)s", {"x": 7})),
        ("ddl", driver_sql(f"CREATE TEMP TABLE t_{table} (x int)")),
        # psycopg refuses the parameter after BEGIN went (its path and ours alike).
        ("a parameter psycopg cannot adapt", driver_sql("SELECT %(x)s", {"x": object()})),
        # (COPY through execute() is left out: psycopg's own path leaves the connection
        # unusable after it, so there is no answer to compare with; the dialect sends a
        # text that mentions COPY on psycopg's path.)
        (
            "serializable",
            rows(
                sa.text("SELECT current_setting('transaction_isolation')"),
                isolation_level="SERIALIZABLE",
            ),
        ),
        (
            "read only",
            rows(
                sa.text("SELECT current_setting('transaction_read_only')"), postgresql_readonly=True
            ),
        ),
        (
            "deferrable",
            rows(
                sa.text("SELECT current_setting('transaction_deferrable')"),
                isolation_level="SERIALIZABLE",
                postgresql_readonly=True,
                postgresql_deferrable=True,
            ),
        ),
        (
            "server-side cursor",
            rows(sa.text(f"SELECT id FROM {table} ORDER BY id"), stream_results=True),
        ),
        (
            "executemany",
            lambda conn: (
                conn.execute(
                    sa.text(f"INSERT INTO {table} VALUES (:i, 'm')"), [{"i": 10}, {"i": 11}]
                ).rowcount
            ),
        ),
    ]


def _outcome(engine: sa.Engine, run: Callable[[sa.Connection], Any]) -> tuple[Outcome, Any, Any]:
    with engine.connect() as conn:
        return _outcome_on(conn, run)


def _outcome_on(
    conn: sa.Connection, run: Callable[[sa.Connection], Any]
) -> tuple[Outcome, Any, Any]:
    """What *run* gave (or raised), the transaction's state after it, and what a new
    statement sees after a rollback (the connection is still usable)."""
    try:
        got: Outcome = ("ok", run(conn))
    except sa.exc.DBAPIError as exc:
        orig = exc.orig
        got = ("error", (type(exc).__name__, type(orig).__name__, getattr(orig, "sqlstate", None)))
    driver = conn.connection.driver_connection
    assert driver is not None
    status = psycopg.pq.TransactionStatus(driver.info.transaction_status).name
    conn.rollback()
    after = conn.execute(sa.text("SELECT 41 + 1")).scalar()
    conn.rollback()
    return got, status, after


def test_first_statements_give_what_the_psycopg_dialect_gives(pg_url: str, table: str) -> None:
    ours = sa.create_engine(_url(pg_url, "postgresql+pgwarden"))
    theirs = sa.create_engine(_url(pg_url, "postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        for name, run in _cases(table):
            expected = _outcome(theirs, run)
            got = _outcome(ours, run)
            assert got == expected, name
            with psycopg.connect(pg_url, autocommit=True) as admin:  # the same table each time
                admin.execute(f"DELETE FROM {table}")
                admin.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        # The cases ran their statements, not nothing: a sample of what they gave.
        assert _outcome(ours, _cases(table)[0][1])[0] == ("ok", (["id", "label"], [(1, "one")], 1))
        assert _outcome(ours, _cases(table)[5][1])[0] == (
            "error",
            ("IntegrityError", "UniqueViolation", "23505"),
        )
    finally:
        ours.dispose()
        theirs.dispose()


def test_async_first_statements_give_what_the_psycopg_dialect_gives(
    pg_url: str, table: str
) -> None:
    async def outcome(engine: Any, run: Callable[[sa.Connection], Any]) -> tuple[Outcome, Any, Any]:
        async with engine.connect() as conn:
            return await conn.run_sync(_outcome_on, run)  # type: ignore[no-any-return]

    async def main() -> None:
        ours = create_async_engine(_url(pg_url, "postgresql+pgwarden"))
        theirs = create_async_engine(_url(pg_url, "postgresql+psycopg"), poolclass=sa.pool.NullPool)
        try:
            for name, run in _cases(table):
                expected = await outcome(theirs, run)
                got = await outcome(ours, run)
                assert got == expected, name
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute(f"DELETE FROM {table}")
                    admin.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
            sample = await outcome(ours, _cases(table)[0][1])
            assert sample[0] == ("ok", (["id", "label"], [(1, "one")], 1))
        finally:
            await ours.dispose()
            await theirs.dispose()

    asyncio.run(main())


def test_a_deadline_still_stops_the_first_statement_on_the_server(pg_url: str) -> None:
    engine = sa.create_engine(_url(pg_url, "postgresql+pgwarden"))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.rollback()
            with pgwarden.deadline(5):  # the first statement reads the timeout it went with
                shown = conn.execute(
                    sa.text("SELECT setting::int FROM pg_settings WHERE name = :n"),
                    {"n": "statement_timeout"},
                ).scalar()
            conn.rollback()
            assert shown is not None
            assert 0 < shown <= 5000
            started = time.monotonic()
            with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
                conn.execute(sa.text("SELECT pg_sleep(:s)").bindparams(s=10))
            assert time.monotonic() - started < 3
            conn.rollback()
            # A first statement that cannot go with BEGIN still gets the timeout first.
            started = time.monotonic()
            with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
                conn.exec_driver_sql("SELECT 1; SELECT pg_sleep(10)")
            assert time.monotonic() - started < 3
            conn.rollback()
            # No session state left: the next transaction has the server's default.
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()


def test_async_deadline_stops_first_statements_on_the_server(pg_url: str) -> None:
    async def main() -> None:
        engine = create_async_engine(_url(pg_url, "postgresql+pgwarden"))
        try:
            async with engine.connect() as conn:
                for statement in ("SELECT pg_sleep(10)", "SELECT 1; SELECT pg_sleep(10)"):
                    started = time.monotonic()
                    with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
                        await conn.exec_driver_sql(statement)
                    assert time.monotonic() - started < 3, statement
                    await conn.rollback()
                assert (await conn.exec_driver_sql("SHOW statement_timeout")).scalar() == "0"
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_a_mark_for_begin_is_not_left_for_the_next_statement(pg_url: str) -> None:
    """The dialect marks a first statement for its cursor just before calling it; a mark
    left over (a statement that never reached its cursor) must not send the next first
    statement, which may be two statements in one string, through a pipeline."""
    engine = sa.create_engine(_url(pg_url, "postgresql+pgwarden"))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.rollback()
            driver = conn.connection.driver_connection
            lent = getattr(driver, "_pgwarden_sqlalchemy")  # noqa: B009 - the dialect's record
            lent.begin = b""  # as if a marked statement had not reached its cursor
            assert conn.exec_driver_sql("SELECT 1; SELECT 2").scalar() == 1  # the first result
            assert lent.begin is None
    finally:
        engine.dispose()


def test_prepared_statements_and_their_upkeep_go_with_begin(pg_url: str) -> None:
    """psycopg prepares a statement (here at its first run) and deallocates the oldest
    past ``prepared_max``; through the first statement's pipeline both are queued with it.
    The same runs through SQLAlchemy's own psycopg dialect leave the same statements
    prepared on the server at every step (commits not resolved, so that pgwarden's
    marker query does not take a place in the cache)."""

    def prepared(conn: sa.Connection) -> list[str]:
        listed = conn.execute(sa.text("SELECT statement FROM pg_prepared_statements"))
        statements = sorted(s for (s,) in listed if "pg_prepared_statements" not in s)
        conn.commit()
        return statements

    def steps(engine: sa.Engine) -> Iterator[list[str]]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.commit()
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.prepare_threshold = 0
            driver.prepared_max = 2
            for n in (0, 1, 2, 0, 1):  # three statements (and the listing) for two places
                for i in range(3):
                    statement = sa.text(f"SELECT CAST(:x AS int) + {n}")
                    assert conn.execute(statement, {"x": i}).scalar() == i + n
                    assert driver.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                    conn.commit()  # (a ROLLBACK makes psycopg forget its prepares)
                yield prepared(conn)

    ours = sa.create_engine(_url(pg_url, "postgresql+pgwarden") + "&pgwarden_resolve_commits=false")
    theirs = sa.create_engine(_url(pg_url, "postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        expected = list(steps(theirs))
        assert list(steps(ours)) == expected
        # The runs prepared statements and deallocated the oldest.
        assert expected[0] == ["SELECT CAST($1 AS int) + 0"]
        assert expected[2] == ["SELECT CAST($1 AS int) + 2"]
    finally:
        ours.dispose()
        theirs.dispose()


def test_async_first_statement_cancelled_leaves_a_usable_engine(pg_url: str) -> None:
    """A task cancelled while its first statement (sent with BEGIN) runs: psycopg cancels
    it on the server and reads the pipeline's answers, and the engine goes on."""

    async def main() -> None:
        engine = create_async_engine(_url(pg_url, "postgresql+pgwarden"))
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await conn.rollback()
                started = time.monotonic()
                with pytest.raises((asyncio.TimeoutError, asyncio.CancelledError)):
                    await asyncio.wait_for(
                        conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": 10}), 0.3
                    )
                assert time.monotonic() - started < 5
            for _ in range(3):  # pgwarden_max_size=1: the same connection, or its successor
                async with engine.connect() as conn:
                    assert (await conn.execute(sa.text("SELECT 7"))).scalar() == 7
        finally:
            await engine.dispose()

    asyncio.run(main())


@pytest.mark.parametrize("front", ["pgbouncer", "pgpool"])
def test_first_statements_behind_a_pooler(front: str, request: pytest.FixtureRequest) -> None:
    """BEGIN, the deadline's timeout and the statement in one pipeline, through a real
    PgBouncer (transaction mode) and a real pgpool-II: the same answers, the timeout
    still stops the statement, and a write commits."""
    server = request.getfixturevalue(front)
    name = f"sabp_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(_url(server.url, "postgresql+pgwarden"))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {name} (id int PRIMARY KEY)")
        for i in range(8):  # past psycopg's prepare threshold: prepared statements too
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT :x + 1").bindparams(x=i)).scalar() == i + 1
        with engine.begin() as conn, pgwarden.deadline(30):
            conn.execute(sa.text(f"INSERT INTO {name} VALUES (:i)"), {"i": 1})
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar() == 1
            conn.rollback()
            started = time.monotonic()
            with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
                conn.execute(sa.text("SELECT pg_sleep(:s)").bindparams(s=10))
            assert time.monotonic() - started < 3
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()
