"""Nested transactions (savepoints on the open connection) and what run_transaction counts."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

import psycopg
import pytest

from pgwarden import (
    AsyncDatabase,
    AsyncTransaction,
    DatabaseUnavailable,
    DeadlineExceeded,
    NotCommitted,
    Settings,
)

from ._compat import gather, run, sleep, spawn

PID = "SELECT pg_backend_pid()"


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


def fresh_table(server: Any, name: str, columns: str = "id int") -> None:
    server.execute(f"DROP TABLE IF EXISTS {name}")
    server.execute(f"CREATE TABLE {name} ({columns})")


def ids(server: Any, table: str) -> list[Any]:
    return [row[0] for row in server.execute(f"SELECT id FROM {table} ORDER BY id")]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    stop = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < stop, "timed out waiting for the other side"
        await sleep(0.01)


def test_nested_transaction_rolled_back_by_its_outer_leaves_nothing(pg_server: Any) -> None:
    fresh_table(pg_server, "nest_outer_rollback")

    async def main() -> None:
        async with make(pg_server.url) as db:

            async def outer_fails() -> None:
                async with db.transaction() as tx:
                    await tx.execute("INSERT INTO nest_outer_rollback VALUES (1)")
                    async with db.transaction() as inner:
                        assert await inner.fetchval(PID) == await tx.fetchval(PID)
                        await inner.execute("INSERT INTO nest_outer_rollback VALUES (2)")
                        # the same transaction: it sees the outer's uncommitted row
                        assert await inner.fetchval("SELECT count(*) FROM nest_outer_rollback") == 2
                    raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                await outer_fails()

    run(main)
    assert ids(pg_server, "nest_outer_rollback") == []


def test_nested_failures_roll_back_only_their_own_work(pg_server: Any) -> None:
    fresh_table(pg_server, "nest_partial", "id int primary key")

    async def main() -> None:
        async with make(pg_server.url) as db, db.transaction() as tx:

            async def nested_violates() -> None:
                async with db.transaction() as inner:
                    await inner.execute("INSERT INTO nest_partial VALUES (2)")
                    await inner.execute("INSERT INTO nest_partial VALUES (1)")

            async def savepoint_raises() -> None:
                async with tx.savepoint() as sp:
                    await sp.execute("INSERT INTO nest_partial VALUES (4)")
                    raise KeyError

            await tx.execute("INSERT INTO nest_partial VALUES (1)")
            with pytest.raises(psycopg.errors.UniqueViolation):
                await nested_violates()
            # the outer transaction is not aborted: the savepoint took the error
            await tx.execute("INSERT INTO nest_partial VALUES (3)")
            with pytest.raises(KeyError):
                await savepoint_raises()
            async with tx.savepoint() as sp:
                await sp.execute("INSERT INTO nest_partial VALUES (5)")
                async with sp.savepoint() as deeper:
                    await deeper.execute("INSERT INTO nest_partial VALUES (6)")

    run(main)
    assert ids(pg_server, "nest_partial") == [1, 3, 5, 6]


@pytest.mark.timeout(60)
def test_nesting_completes_with_a_single_connection(pg_server: Any) -> None:
    fresh_table(pg_server, "nest_single")

    async def main() -> None:
        async with make(pg_server.url, max_size=1, min_size=1, acquire_timeout=5) as db:

            async def inner(tx: AsyncTransaction) -> int:
                await tx.execute("INSERT INTO nest_single VALUES (2)")
                pid: int = await tx.fetchval(PID)
                return pid

            async def outer(tx: AsyncTransaction) -> int:
                await tx.execute("INSERT INTO nest_single VALUES (1)")
                assert await db.run_transaction(inner) == await tx.fetchval(PID)
                return await db.run_transaction(inner)

            async with db.transaction(timeout=20) as tx:
                pid = await tx.fetchval(PID)
                async with db.transaction() as nested:
                    assert await nested.fetchval(PID) == pid
                    await nested.execute("INSERT INTO nest_single VALUES (0)")
                assert await db.run_transaction(outer) == pid
                rows = [(3,), (4,)]
                assert await db.executemany("INSERT INTO nest_single VALUES (%s)", rows) == 2
            assert db.stats()["counters"]["acquire_timeouts"] == 0

    run(main)
    assert ids(pg_server, "nest_single") == [0, 1, 2, 2, 3, 4]


def test_nested_calls_cannot_change_what_begin_fixed(pg_server: Any) -> None:
    fresh_table(pg_server, "nest_modes")

    async def main() -> None:
        async with make(pg_server.url) as db:

            async def noop(tx: AsyncTransaction) -> None:
                await tx.execute("SELECT 1")

            async def nested(**options: Any) -> None:
                async with db.transaction(**options) as tx:
                    await tx.execute("INSERT INTO nest_modes VALUES (3)")

            async with db.transaction() as tx:
                with pytest.raises(ValueError, match="isolation"):
                    await nested(isolation="serializable")
                with pytest.raises(ValueError, match="readonly"):
                    await db.run_transaction(noop, readonly=True)
                with pytest.raises(ValueError, match="isolation must be one of"):
                    await db.run_transaction(noop, isolation="chaos")
                # the level the server gave the outer transaction is fine to ask for again
                async with db.transaction(isolation="read committed") as same:
                    await same.execute("INSERT INTO nest_modes VALUES (1)")
                await tx.execute("INSERT INTO nest_modes VALUES (2)")  # nothing was aborted

            async with db.transaction(isolation="repeatable read", readonly=True):
                async with db.transaction(isolation="repeatable read", readonly=True) as same:
                    assert await same.fetchval("SHOW transaction_isolation") == "repeatable read"
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    await nested()  # inherits read-only

    run(main)
    assert ids(pg_server, "nest_modes") == [1, 2]


def test_readonly_run_transaction_that_writes_is_not_a_failover(pg_server: Any) -> None:
    fresh_table(pg_server, "nest_ro")

    async def main() -> None:
        async with make(pg_server.url) as db:
            await db.ready()
            calls = 0

            async def writes(tx: AsyncTransaction) -> None:
                nonlocal calls
                calls += 1
                await tx.execute("INSERT INTO nest_ro VALUES (1)")

            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await db.run_transaction(writes, readonly=True)
            assert calls == 1
            counters = db.stats()["counters"]
            assert counters["errors"] == {}
            assert "failover" not in counters["connections_closed"]

    run(main)


def test_nested_deadline_is_never_longer_and_may_be_shorter(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:

            async def sleeps(tx: AsyncTransaction) -> None:
                await tx.execute("SELECT pg_sleep(3)")

            async def nested_sleeps(timeout: float) -> None:
                async with db.transaction(timeout=timeout) as nested:
                    await sleeps(nested)

            async def both_sleep() -> None:
                async with db.transaction(timeout=0.5):
                    await nested_sleeps(30)

            async with db.transaction(timeout=20) as tx:
                before = await tx.fetchval("SHOW statement_timeout")
                started = time.monotonic()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    await nested_sleeps(0.3)
                with pytest.raises(DeadlineExceeded):
                    await db.run_transaction(sleeps, timeout=0.3)
                assert time.monotonic() - started < 2.0
                async with db.transaction(timeout=0.5) as nested:
                    await nested.execute("SELECT 1")
                # the outer bound is back once the savepoint is released
                assert await tx.fetchval("SHOW statement_timeout") == before
                await tx.execute("SELECT pg_sleep(0.7)")

            started = time.monotonic()
            with pytest.raises((psycopg.errors.QueryCanceled, DeadlineExceeded)):
                await both_sleep()
            assert time.monotonic() - started < 2.0

    run(main)


def test_nested_run_transaction_reruns_only_its_savepoint_after_a_deadlock(
    pg_server: Any,
) -> None:
    fresh_table(pg_server, "nest_locks", "id int primary key, n int")
    pg_server.execute("INSERT INTO nest_locks VALUES (1, 0), (2, 0)")
    fresh_table(pg_server, "nest_lock_log", "id text")

    async def main() -> dict[str, Any]:
        async with make(pg_server.url, max_size=4) as db:
            await db.ready()
            step: dict[str, Any] = {"x_has_1": False, "y_has_2": False, "x_pid": None}
            calls: dict[str, int] = {"outer": 0, "inner": 0}
            pids: set[int] = set()

            async def inner(tx: AsyncTransaction) -> int:
                calls["inner"] += 1
                pids.add(await tx.fetchval(PID))
                await tx.execute("UPDATE nest_locks SET n = n + 1 WHERE id = 1")
                if calls["inner"] == 1:
                    step["x_has_1"] = True
                    await until(lambda: step["y_has_2"])
                # First attempt: waits for Y's row 2, before Y waits for row 1, so
                # this backend's deadlock check runs first: it is the victim.
                await tx.execute("UPDATE nest_locks SET n = n + 10 WHERE id = 2")
                return calls["inner"]

            async def outer(tx: AsyncTransaction) -> int:
                calls["outer"] += 1
                await tx.execute("INSERT INTO nest_lock_log VALUES ('outer')")
                step["x_pid"] = await tx.fetchval(PID)
                return await db.run_transaction(inner)

            async def x() -> int:
                return await db.run_transaction(outer, timeout=30)

            async def y() -> int:
                await until(lambda: step["x_has_1"])
                async with db.transaction(timeout=30) as tx:
                    await tx.execute("UPDATE nest_locks SET n = n + 100 WHERE id = 2")
                    step["y_has_2"] = True
                    await until(lambda: waiting[0])
                    await tx.execute("UPDATE nest_locks SET n = n + 1000 WHERE id = 1")
                return 0

            waiting = [False]  # X's backend is waiting for a lock

            async def watch() -> int:
                await until(lambda: step["y_has_2"] and step["x_pid"] is not None)
                while not waiting[0]:
                    event = await db.fetchval(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                        [step["x_pid"]],
                    )
                    waiting[0] = event == "Lock"
                    await sleep(0.01)
                return 0

            result, _, _ = await gather(spawn(x), spawn(y), spawn(watch))
            return {"result": result, "calls": calls, "pids": pids, "stats": db.stats()}

    outcome = run(main)
    calls = outcome["calls"]
    assert outcome["result"] == 2
    assert calls["outer"] == 1  # only the savepoint ran again
    assert calls["inner"] == 2
    assert len(outcome["pids"]) == 1  # on the same connection
    assert pg_server.execute("SELECT id, n FROM nest_locks ORDER BY id") == [(1, 1001), (2, 110)]
    assert pg_server.execute("SELECT count(*) FROM nest_lock_log")[0][0] == 1
    counters = outcome["stats"]["counters"]
    assert counters["errors"] == {"conflict": 1}
    assert counters["retries"]["by_reason"] == {"conflict": 1}


def test_connection_lost_in_a_nested_run_transaction_reaches_the_outer_level(
    pg_server: Any, fault_proxy: Any
) -> None:
    fresh_table(pg_server, "nest_cut", "id text")
    url = fault_proxy.url_for(pg_server.url)

    async def main() -> tuple[dict[str, int], Mapping[str, Any]]:
        calls = {"outer": 0, "inner": 0}
        async with make(url) as db:
            await db.ready()

            async def inner(tx: AsyncTransaction) -> None:
                calls["inner"] += 1
                await tx.execute("INSERT INTO nest_cut VALUES ('inner')")
                if calls["inner"] == 1:
                    fault_proxy.cut_on(b"pgw-cut-here", when="before")
                    await tx.execute("SELECT 'pgw-cut-here'")

            async def outer(tx: AsyncTransaction) -> None:
                calls["outer"] += 1
                await tx.execute("INSERT INTO nest_cut VALUES ('outer')")
                await db.run_transaction(inner)

            await db.run_transaction(outer, timeout=20)
            assert calls == {"outer": 2, "inner": 2}  # the whole function ran again

            async def plain() -> None:
                async with db.transaction(timeout=20) as tx:
                    await tx.execute("INSERT INTO nest_cut VALUES ('plain')")
                    await db.run_transaction(inner)

            calls.update(outer=0, inner=0)
            with pytest.raises(NotCommitted):
                await plain()
            assert calls["inner"] == 1  # not re-run on a connection that is gone
            return calls, db.stats()

    _, stats = run(main)
    rows = pg_server.execute("SELECT id FROM nest_cut ORDER BY id")
    assert rows == [("inner",), ("outer",)]
    # the first loss counted once, by the outer run_transaction that re-ran
    assert sum(stats["counters"]["errors"].values()) == 1


def test_a_task_spawned_inside_a_transaction_does_not_share_its_connection(
    pg_server: Any,
) -> None:
    fresh_table(pg_server, "nest_child")

    async def main() -> None:
        async with make(pg_server.url, max_size=4) as db, db.transaction() as tx:
            parent = await tx.fetchval(PID)
            await tx.execute("INSERT INTO nest_child VALUES (1)")

            async def child_transaction() -> tuple[int, int]:
                async with db.transaction() as own:
                    await own.execute("INSERT INTO nest_child VALUES (2)")
                    return await own.fetchval(PID), await own.fetchval(
                        "SELECT count(*) FROM nest_child"
                    )

            async def child_run() -> tuple[int, int]:
                async def body(own: AsyncTransaction) -> tuple[int, int]:
                    return await own.fetchval(PID), await own.fetchval(
                        "SELECT count(*) FROM nest_child WHERE id = 1"
                    )

                return await db.run_transaction(body)

            # Each child runs in a copy of this context, as asyncio tasks do (and as
            # threads started with copy_context().run do).
            children = [
                spawn(contextvars.copy_context().run, (child_transaction,)),
                spawn(contextvars.copy_context().run, (child_run,)),
            ]
            (pid_1, seen_1), (pid_2, seen_2) = await gather(*children)
            assert parent not in (pid_1, pid_2)
            assert (seen_1, seen_2) == (1, 0)  # its own row, never the parent's uncommitted one
            # the child's transaction committed on its own; the parent's row is still ours
            assert await tx.fetchval("SELECT count(*) FROM nest_child") == 2

    run(main)
    assert ids(pg_server, "nest_child") == [1, 2]


def test_an_exception_of_the_callers_own_is_neither_counted_nor_retried(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            await db.ready()
            calls = 0

            async def fn(tx: AsyncTransaction) -> None:
                nonlocal calls
                calls += 1
                await tx.execute("SELECT 1")
                raise ValueError("insufficient funds")

            with pytest.raises(ValueError, match="insufficient funds"):
                await db.run_transaction(fn)
            assert calls == 1

            async def outer(tx: AsyncTransaction) -> None:
                await db.run_transaction(fn)

            with pytest.raises(ValueError, match="insufficient funds"):
                await db.run_transaction(outer)
            assert calls == 2
            counters = db.stats()["counters"]
            assert counters["errors"] == {}
            assert counters["retries"]["total"] == 0

    run(main)


@pytest.mark.timeout(60)
def test_breaker_open_in_run_transaction_is_not_counted_as_a_query_error(
    pg_server: Any, fault_proxy: Any
) -> None:
    url = fault_proxy.url_for(pg_server.url)

    async def main() -> None:
        db = make(
            url,
            min_size=0,
            breaker_threshold=1,
            breaker_min_outage=0.01,
            breaker_cooldown=30,
            breaker_max_cooldown=30,
            acquire_timeout=2,
        )
        async with db:
            await db.ready()
            fault_proxy.refuse()
            fault_proxy.drop_connections()
            stop = time.monotonic() + 20
            while db.stats()["breaker"] != "open":
                assert time.monotonic() < stop, "the breaker did not open"
                with suppress(Exception):  # whatever the way down; the breaker is what counts
                    await db.fetchval("SELECT 1")
            before = db.stats()["counters"]["errors"]
            calls = 0

            async def fn(tx: AsyncTransaction) -> None:
                nonlocal calls
                calls += 1

            with pytest.raises(DatabaseUnavailable):
                await db.run_transaction(fn)
            assert calls == 0
            assert db.stats()["counters"]["errors"] == before
            fault_proxy.heal()

    run(main)


@pytest.mark.parametrize("resolve_commits", [True, False])
def test_a_transaction_whose_failed_statement_was_caught_never_commits(
    pg_server: Any, resolve_commits: bool
) -> None:
    """The server answers COMMIT on an aborted transaction with ROLLBACK and no error:
    the block's exit must raise instead of looking committed, and the connection is clean."""
    fresh_table(pg_server, "aborted_caught")

    async def catch_a_failure_inside(db: AsyncDatabase) -> None:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO aborted_caught VALUES (1)")
            with suppress(psycopg.errors.DivisionByZero):
                await tx.execute("SELECT 1/0")

    async def main() -> None:
        async with make(pg_server.url, resolve_commits=resolve_commits, max_size=1) as db:
            with pytest.raises(
                psycopg.errors.InFailedSqlTransaction, match="nothing was committed"
            ):
                await catch_a_failure_inside(db)
            # The one connection went back rolled back: the next call works on it.
            assert await db.fetchval("SELECT count(*) FROM aborted_caught") == 0
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO aborted_caught VALUES (2)")

    run(main)
    assert ids(pg_server, "aborted_caught") == [2]
