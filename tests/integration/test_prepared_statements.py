"""``pooler_prepared_statements``: prepares kept on behind PgBouncer, and the fallback.

The local PgBouncer is Debian's 1.18, which does not track protocol-level prepared
statements (that came with 1.21's ``max_prepared_statements``). So opting in here is
opting in wrongly, which is exactly the path to prove: in transaction mode psycopg's
``_pg3_0`` lands on server connections that lack it (26000) or where another client
already prepared it (42P05). No caller may see either: the statement never ran, so it
is retried, and the handle falls back to unprepared statements for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pytest

from pgwarden import AsyncDatabase, Settings
from pgwarden.testing import PgBouncerServer

pytestmark = pytest.mark.pgbouncer

Factory = Callable[..., PgBouncerServer]


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


async def hammer(db: AsyncDatabase, workers: int, calls: int) -> list[str]:
    """*workers* tasks each running the same parametrised read *calls* times."""
    errors: list[str] = []

    async def worker(n: int) -> None:
        for i in range(calls):
            try:
                assert await db.fetchval("SELECT %s::int + %s::int", [n, i]) == n + i
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return errors


def test_opted_in_behind_an_old_pgbouncer_falls_back_without_an_error(
    pgbouncer_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # One server connection shared by four clients: the second client to prepare
    # "_pg3_0" collides with the first (42P05), or binds where it was never prepared.
    bouncer = pgbouncer_factory(default_pool_size=1)

    async def main() -> None:
        async with make(
            bouncer.url,
            max_size=4,
            min_size=4,
            pooler_prepared_statements=True,
            prepare_threshold=0,  # prepare at the first execution
            retry_budget_floor=100.0,  # this test is about the fallback, not the budget
        ) as db:
            await db.ready()
            state = db._state
            assert state.pgbouncer is True
            assert state.prepares_off is False
            with caplog.at_level(logging.WARNING, logger="pgwarden"):
                assert await hammer(db, workers=8, calls=10) == []
            assert state.prepares_off is True
            counters = db.stats()["counters"]
            # The lost prepares were seen, as failures that ran nothing, and retried.
            assert set(counters["errors"]) == {"nothing_ran"}, counters
            lost = counters["errors"]["nothing_ran"]
            # From now on nothing is prepared: every connection is handed out without a
            # threshold, and the same load runs without a failure.
            async with contextlib.AsyncExitStack() as stack:
                held = [await stack.enter_async_context(db.connection()) for _ in range(4)]
                assert [conn.prepare_threshold for conn in held] == [None] * 4
            assert await hammer(db, workers=8, calls=10) == []
            assert db.stats()["counters"]["errors"] == {"nothing_ran": lost}
        events = [
            r for r in caplog.records if getattr(r, "event", None) == "prepared_statements_off"
        ]
        assert len(events) == 1
        assert getattr(events[0], "sqlstate", None) in {"26000", "42P05"}

    asyncio.run(main())


def test_without_the_opt_in_nothing_is_prepared_behind_pgbouncer(
    pgbouncer_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    bouncer = pgbouncer_factory(default_pool_size=1)

    async def main() -> None:
        async with make(bouncer.url, max_size=4, min_size=4, prepare_threshold=0) as db:
            with caplog.at_level(logging.WARNING, logger="pgwarden"):
                assert await hammer(db, workers=8, calls=10) == []
            assert db.stats()["counters"]["errors"] == {}
            assert db._state.prepares_off is False
        assert not [
            r for r in caplog.records if getattr(r, "event", None) == "prepared_statements_off"
        ]

    asyncio.run(main())
