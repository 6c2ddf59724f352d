"""The fault matrix: real servers, real faults, one test per row (issue: failure semantics).

Every bound asserted here is generous and proves correctness, not speed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pgwarden import (
    AsyncDatabase,
    DatabaseUnavailable,
    DeadlineExceeded,
    NotReady,
    Settings,
    deadline,
)


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[tuple[float, str, float]] = field(default_factory=list)  # (t, error, left)
    successes_at: list[float] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)


async def read_load(
    db: AsyncDatabase, tasks: int, seconds: float, per_call_deadline: float
) -> LoadResult:
    """*tasks* concurrent readers for *seconds*; records each failure with deadline left."""
    result = LoadResult()
    stop_at = time.monotonic() + seconds

    async def reader() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                assert await db.fetchval("SELECT 1", timeout=per_call_deadline) == 1
            except Exception as exc:
                left = per_call_deadline - (time.monotonic() - started)
                result.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}", left))
                await asyncio.sleep(0.01)
            else:
                result.ok += 1
                result.successes_at.append(time.monotonic())

    await asyncio.gather(*(reader() for _ in range(tasks)))
    return result


def failures_with_deadline_left(result: LoadResult) -> list[tuple[float, str, float]]:
    return [f for f in result.failures if f[2] > 0.05]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_read_load(pg_server_factory: Any, mode: str) -> None:
    server = pg_server_factory()

    async def main() -> tuple[LoadResult, float, Mapping[str, Any]]:
        async with make(server.url, max_size=8) as db:
            await db.ready()
            load = asyncio.ensure_future(read_load(db, 16, 4.0, per_call_deadline=10.0))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.restart, mode)
            accepting_at = time.monotonic()
            result = await load
            return result, accepting_at, db.stats()

    result, accepting_at, stats = asyncio.run(main())
    assert failures_with_deadline_left(result) == []
    assert result.ok > 100
    after = [t for t in result.successes_at if t >= accepting_at]
    assert after, "no success after the restart"
    recovery = after[0] - accepting_at
    assert recovery < 1.0, f"recovered {recovery:.3f}s after the server accepted again"
    # The restart really broke connections: new ones had to be opened.
    assert stats["counters"]["connections_opened"] >= 2


def test_backend_kills_under_read_load(pg_server_factory: Any) -> None:
    server = pg_server_factory()

    async def main() -> LoadResult:
        async with make(server.url, max_size=8) as db:
            await db.ready()
            load = asyncio.ensure_future(read_load(db, 16, 3.0, per_call_deadline=10.0))
            killed = 0
            for _ in range(5):
                await asyncio.sleep(0.4)
                killed += await asyncio.to_thread(server.terminate_backends)
            result = await load
            assert killed >= 5
            return result

    result = asyncio.run(main())
    assert failures_with_deadline_left(result) == []
    assert result.ok > 100


@pytest.mark.parametrize("fault", ["restart", "kill"])
def test_writes_have_no_duplicates_and_no_lost_acks(pg_server_factory: Any, fault: str) -> None:
    server = pg_server_factory()
    server.execute("CREATE TABLE writes (id text NOT NULL, at timestamptz DEFAULT now())")

    async def main() -> tuple[list[str], list[str]]:
        acked: list[str] = []
        failed: list[str] = []
        stop_at = time.monotonic() + 3.0
        async with make(server.url, max_size=8) as db:
            await db.ready()

            async def writer() -> None:
                while time.monotonic() < stop_at:
                    request_id = str(uuid.uuid4())
                    try:
                        await db.execute(
                            "INSERT INTO writes (id) VALUES (%s)", [request_id], timeout=10
                        )
                    except Exception:
                        failed.append(request_id)
                        await asyncio.sleep(0.01)
                    else:
                        acked.append(request_id)

            async def faults() -> None:
                for _ in range(3):
                    await asyncio.sleep(0.6)
                    if fault == "restart":
                        await asyncio.to_thread(server.restart, "immediate")
                    else:
                        await asyncio.to_thread(server.terminate_backends)

            await asyncio.gather(*(writer() for _ in range(12)), faults())
        return acked, failed

    acked, failed = asyncio.run(main())
    rows = server.execute("SELECT id, count(*) FROM writes GROUP BY id")
    counts = {row[0]: row[1] for row in rows}
    duplicates = {k: v for k, v in counts.items() if v > 1}
    lost = [request_id for request_id in acked if request_id not in counts]
    assert duplicates == {}
    assert lost == []
    assert len(acked) > 100
    # A write that failed was never acknowledged; it may or may not have landed
    # (that is what "lost mid-statement" means) but it was not written twice.
    assert all(counts.get(request_id, 0) <= 1 for request_id in failed)


@pytest.mark.parametrize(("when", "outcome"), [("after", "committed"), ("before", "aborted")])
def test_connection_dropped_during_commit_is_resolved(
    pg_server: Any, fault_proxy: Any, when: str, outcome: str
) -> None:
    table = f"commit_{when}"
    pg_server.execute(f"DROP TABLE IF EXISTS {table}")
    pg_server.execute(f"CREATE TABLE {table} (id text)")
    url = fault_proxy.url_for(pg_server.url)

    async def main() -> tuple[int, Mapping[str, Any]]:
        calls = 0
        async with make(url) as db:
            await db.ready()

            async def body(tx: Any) -> str:
                nonlocal calls
                calls += 1
                if calls == 1:
                    fault_proxy.cut_on(b"COMMIT", when=when)
                await tx.execute(f"INSERT INTO {table} VALUES ('x')")
                return "done"

            assert await db.run_transaction(body, timeout=10) == "done"
            return calls, db.stats()

    calls, stats = asyncio.run(main())
    count = pg_server.execute(f"SELECT count(*) FROM {table}")[0][0]
    assert count == 1  # exactly once, in both cases
    assert stats["counters"]["ambiguous_commits"] == {outcome: 1}
    assert calls == (1 if outcome == "committed" else 2)


def test_plain_transaction_commit_lost_and_committed_returns_normally(
    pg_server: Any, fault_proxy: Any
) -> None:
    pg_server.execute("DROP TABLE IF EXISTS commit_plain")
    pg_server.execute("CREATE TABLE commit_plain (id text)")

    async def main() -> None:
        async with make(fault_proxy.url_for(pg_server.url)) as db:
            await db.ready()
            fault_proxy.cut_on(b"COMMIT", when="after")
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO commit_plain VALUES ('x')")

    asyncio.run(main())
    assert pg_server.execute("SELECT count(*) FROM commit_plain")[0][0] == 1


def test_blackholed_network_gives_deadline_exceeded_not_a_hang(
    pg_server: Any, fault_proxy: Any
) -> None:
    async def main() -> list[float]:
        elapsed: list[float] = []
        async with make(fault_proxy.url_for(pg_server.url), max_size=2) as db:
            await db.ready()
            fault_proxy.blackhole()
            for timeout in (0.5, 1.0):
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await db.fetchval("SELECT 1", timeout=timeout)
                elapsed.append(time.monotonic() - started - timeout)
            started = time.monotonic()
            # By now the pool's bounded reconnect attempts have timed out for over a
            # second, so the breaker may be open: a caller whose deadline ends before
            # the next probe then gets DatabaseUnavailable instead (both end in time).
            with pytest.raises((DeadlineExceeded, DatabaseUnavailable)), deadline(0.7):
                await db.fetch("SELECT 1")
            elapsed.append(time.monotonic() - started - 0.7)
            fault_proxy.heal()
        return elapsed

    overshoot = asyncio.run(main())
    assert all(o < 0.5 for o in overshoot), overshoot


@pytest.mark.slow
def test_server_down_opens_breaker_fails_fast_and_recovers(pg_server_factory: Any) -> None:
    """Down for 10 s with 50 callers: fail fast, one probe at a time, then recover."""
    server = pg_server_factory()

    async def main() -> dict[str, Any]:
        db = make(
            server.url,
            max_size=4,
            breaker_threshold=3,
            breaker_cooldown=0.5,
            breaker_max_cooldown=1.0,
            acquire_timeout=5,
        )
        await db.ready()
        await asyncio.to_thread(server.stop)
        outcomes: list[tuple[float, float, str]] = []  # (start, duration, outcome)
        stop_at = time.monotonic() + 14.0

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    await db.fetchval("SELECT 1")
                    outcome = "ok"
                except DatabaseUnavailable:
                    outcome = "unavailable"
                except Exception as exc:
                    outcome = type(exc).__name__
                outcomes.append((started, time.monotonic() - started, outcome))
                await asyncio.sleep(0.02)

        restarter = asyncio.get_running_loop().call_later(
            10.0, lambda: asyncio.ensure_future(asyncio.to_thread(server.start))
        )
        await asyncio.gather(*(caller() for _ in range(50)))
        restarter.cancel()
        stats = db.stats()
        await db.close()
        return {"outcomes": outcomes, "stats": stats}

    result = asyncio.run(main())
    outcomes = result["outcomes"]
    stats = result["stats"]
    unavailable = [o for o in outcomes if o[2] == "unavailable"]
    assert len(unavailable) > 100, "the breaker never failed callers fast"
    # Once open, rejections are immediate (the first ones may have waited in the pool).
    fast = [o for o in unavailable if o[1] < 0.05]
    assert len(fast) >= 0.95 * len(unavailable)
    assert stats["counters"]["breaker_transitions"].get("closed->open", 0) >= 1
    # One probe at a time: connection attempts while open stay near the probe count.
    attempts = sum(stats["counters"]["connect_failures"].values())
    assert attempts < 40, f"{attempts} connection attempts while the server was down"
    late = [o for o in outcomes if o[0] > outcomes[0][0] + 13.0]
    assert late, "no calls after the server came back"
    assert all(o[2] == "ok" for o in late[-50:]), late[-5:]


def test_wrong_password_fails_fast_without_retries_or_secrets(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-" + uuid.uuid4().hex
    url = pg_server.url_for(password=secret)

    async def main() -> tuple[BaseException, float, Mapping[str, Any]]:
        async with make(url) as db:
            started = time.monotonic()
            with pytest.raises(NotReady) as info:
                await db.fetchval("SELECT 1")
            return info.value, time.monotonic() - started, db.stats()

    with caplog.at_level(logging.DEBUG, logger="pgwarden"):
        error, elapsed, stats = asyncio.run(main())
    assert elapsed < 0.1
    assert stats["counters"]["retries"]["total"] == 0
    assert "password authentication failed" in str(error) + str(error.__cause__)
    everything = str(error) + repr(error.__cause__) + caplog.text
    assert secret not in everything
    assert pg_server.password not in everything


def test_serialization_failures_all_succeed_and_are_counted(pg_server: Any) -> None:
    pg_server.execute("DROP TABLE IF EXISTS counter")
    pg_server.execute("CREATE TABLE counter (id int primary key, n int)")
    pg_server.execute("INSERT INTO counter VALUES (1, 0)")

    async def main() -> Mapping[str, Any]:
        async with make(pg_server.url, max_size=8, retry_budget_floor=100) as db:

            async def increment(tx: Any) -> None:
                n = await tx.fetchval("SELECT n FROM counter WHERE id = 1")
                await asyncio.sleep(0.005)  # widen the race window
                await tx.execute("UPDATE counter SET n = %s WHERE id = 1", [n + 1])

            async def worker() -> None:
                for _ in range(5):
                    await db.run_transaction(
                        increment, isolation="serializable", attempts=50, timeout=30
                    )

            await asyncio.gather(*(worker() for _ in range(8)))
            return db.stats()

    stats = asyncio.run(main())
    assert pg_server.execute("SELECT n FROM counter WHERE id = 1")[0][0] == 40
    assert stats["counters"]["retries"]["by_reason"].get("conflict", 0) > 0


def test_permanent_errors_keep_their_psycopg_type_and_are_not_retried(pg_server: Any) -> None:
    async def main() -> Mapping[str, Any]:
        async with make(pg_server.url) as db:
            await db.execute("DROP TABLE IF EXISTS uniq")
            await db.execute("CREATE TABLE uniq (id int primary key)")
            await db.execute("INSERT INTO uniq VALUES (1)")
            with pytest.raises(psycopg.errors.UniqueViolation):
                await db.execute("INSERT INTO uniq VALUES (1)")
            with pytest.raises(psycopg.errors.UndefinedTable):
                await db.fetch("SELECT * FROM no_such_table")
            with pytest.raises(psycopg.errors.DivisionByZero):
                await db.fetchval("SELECT 1/0")
            return db.stats()

    stats = asyncio.run(main())
    assert stats["counters"]["retries"]["total"] == 0
    assert stats["counters"]["errors"]["permanent"] == 3


def test_failover_to_read_only_drains_the_pool(pg_server_factory: Any) -> None:
    server = pg_server_factory()
    server.execute("CREATE TABLE fo (id int)")

    async def main() -> Mapping[str, Any]:
        async with make(server.url, max_size=4) as db:
            await db.execute("INSERT INTO fo VALUES (1)")
            server.set_config(default_transaction_read_only="on")
            await asyncio.to_thread(server.terminate_backends)
            # Sessions started after the switch see a read-only server: 25006.
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await db.execute("INSERT INTO fo VALUES (2)")
            server.set_config(default_transaction_read_only="off")
            await asyncio.sleep(0.2)
            return db.stats()

    stats = asyncio.run(main())
    assert stats["counters"]["errors"]["failover"] >= 1
    assert stats["counters"]["retries"]["by_reason"].get("failover", 0) >= 1


def test_deadline_tightens_statement_timeout_on_the_server(pg_server: Any) -> None:
    async def main() -> tuple[float, BaseException | None]:
        async with make(pg_server.url) as db:
            await db.ready()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await db.fetchval("SELECT pg_sleep(5)", timeout=0.5)
            elapsed = time.monotonic() - started
            # The session carries no leftover timeout (it was transaction-local).
            assert await db.fetchval("SHOW statement_timeout") == "0"
            return elapsed, info.value.last_error

    elapsed, last_error = asyncio.run(main())
    assert 0.45 <= elapsed < 1.5
    assert isinstance(last_error, psycopg.errors.QueryCanceled)
