"""The lifespan's SIGTERM hook and startup rules, with a stand-in handle (no database).

The real thing, under uvicorn with a real database, is in
tests/integration/test_asgi_example.py; these pin the corner cases: chaining to a Python
handler after the delay, leaving an event-loop handler alone, restoring on exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import FrameType
from typing import Any

import pytest

from pgwarden import DeadlineExceeded, NotReady
from pgwarden.asgi import current_handle, lifespan
from pgwarden.core.lifecycle import State
from pgwarden.healthcheck import is_draining, probe, readyz

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class FakeDb:
    """Just what the lifespan and the health builder read of a handle."""

    def __init__(self, fail_ready: BaseException | None = None) -> None:
        self.state = State.NEW
        self.fail_ready = fail_ready
        self.closed_with: float | None = None

    async def ready(self, timeout: float | None = None) -> None:
        if self.fail_ready is not None:
            raise self.fail_ready
        self.state = State.READY

    async def health(self) -> dict[str, Any]:
        return {"ok": True, "pool": {}}

    async def close(self, timeout: float = 5.0) -> None:
        self.closed_with = timeout
        self.state = State.CLOSED

    def stats(self) -> dict[str, Any]:
        warmed = 0.01 if self.state is not State.NEW else None
        return {"state": self.state.value, "breaker": "closed", "warmup_seconds": warmed}


def test_sigterm_fails_readiness_then_reaches_the_servers_handler_after_the_delay() -> None:
    got: list[tuple[int, float]] = []
    loop_time: list[float] = []

    def server_handler(signum: int, frame: FrameType | None) -> None:  # like uvicorn's
        got.append((signum, asyncio.get_event_loop().time()))

    db = FakeDb()
    original = signal.signal(signal.SIGTERM, server_handler)
    try:

        async def main() -> None:
            async with lifespan(db, drain_delay=0.3):
                assert current_handle() is db
                assert readyz(probe(db)).status == "pass"
                loop_time.append(asyncio.get_running_loop().time())
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.1)
                assert is_draining(db)  # at once
                assert readyz(probe(db)).code == 503
                assert got == []  # the server has not heard of it yet
                await asyncio.sleep(0.4)
                assert [s for s, _ in got] == [signal.SIGTERM]
                assert got[0][1] - loop_time[0] >= 0.29
                # Passed on once: the server's handler is back in place for the next one.
                assert signal.getsignal(signal.SIGTERM) is server_handler
            assert db.closed_with == 5.0
            assert current_handle() is None

        asyncio.run(main())
        assert signal.getsignal(signal.SIGTERM) is server_handler
    finally:
        signal.signal(signal.SIGTERM, original)


def test_a_second_sigterm_is_passed_on_at_once() -> None:
    got: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:

        async def main() -> None:
            async with lifespan(FakeDb(), drain_delay=30):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.05)
                assert got == []
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.05)
                assert got == [signal.SIGTERM]

        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_a_server_handling_sigterm_on_the_loop_is_left_alone() -> None:
    got: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, got.append, "server")  # like hypercorn
        try:
            async with lifespan(FakeDb(), drain_delay=5):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.1)
                assert got == ["server"]  # not swallowed, not delayed
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    original = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


def test_no_hook_without_a_drain_delay() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        pass

    original = signal.signal(signal.SIGTERM, handler)
    try:

        async def main() -> None:
            async with lifespan(FakeDb()):
                assert signal.getsignal(signal.SIGTERM) is handler

        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, original)


@pytest.mark.parametrize("error", [NotReady("down"), DeadlineExceeded("slow")])
def test_startup_without_the_database_by_default_and_fail_startup_opt_in(
    error: Exception,
) -> None:
    async def main() -> None:
        db = FakeDb(fail_ready=error)
        span = lifespan(db, startup_timeout=0.1)
        async with span:
            assert span.startup_error is error
            assert readyz(probe(db)).code == 503  # never warmed up
        assert db.state is State.CLOSED
        strict = lifespan(FakeDb(fail_ready=error), fail_startup=True)
        with pytest.raises(type(error)):
            async with strict:
                pass
        assert current_handle() is None

    asyncio.run(main())
