"""`default_timeout`: a call that sets no deadline is still bounded (the backstop)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pgwarden import AsyncDatabase, DeadlineExceeded, Settings

from ._compat import run

# The backstop is watched coarsely (pgwarden._async._compat.COARSE_TICK = 0.5 s),
# plus scheduling slack.
BACKSTOP_SLACK = 0.5 + 0.25


@pytest.mark.timeout(60)
def test_a_call_without_deadline_ends_at_default_timeout_on_a_silent_network(
    pg_server: Any, fault_proxy: Any
) -> None:
    async def main() -> None:
        url = fault_proxy.url_for(pg_server.url)
        async with AsyncDatabase(Settings(url=url, default_timeout=1.0)) as db:
            assert await db.fetchval("SELECT 1") == 1
            fault_proxy.swallow()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await db.fetchval("SELECT 2")
            took = time.monotonic() - started
            assert 1.0 <= took < 1.0 + BACKSTOP_SLACK, took
            fault_proxy.heal()
            assert await db.fetchval("SELECT 3", timeout=2.0) == 3

    run(main)


def test_default_timeout_none_leaves_calls_unbounded_but_working(pg_server: Any) -> None:
    async def main() -> None:
        async with AsyncDatabase(Settings(url=pg_server.url, default_timeout=None)) as db:
            assert await db.fetchval("SELECT pg_sleep(0.2) IS NOT NULL") is True

    run(main)
