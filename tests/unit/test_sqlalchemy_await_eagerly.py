"""`_await_eagerly`: a coroutine that finishes at once costs no greenlet switch, and one
that suspends behaves as under SQLAlchemy's ``await_``: results, errors, cancellation."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from sqlalchemy.util.concurrency import greenlet_spawn

from pgwarden.sqlalchemy.dialect import _await_eagerly

marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


async def _at_once() -> tuple[str, str]:
    task = asyncio.current_task()
    assert task is not None
    return marker.get(), task.get_name()


async def _suspends(times: int) -> int:
    for _ in range(times):
        await asyncio.sleep(0.001)
    return times


async def _fails_after_suspending() -> None:
    await asyncio.sleep(0.001)
    raise LookupError("after a suspension")


@pytest.fixture
def switches(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The awaitables handed to SQLAlchemy's ``await_`` (each costs two greenlet switches)."""
    from pgwarden.sqlalchemy import dialect

    handed: list[object] = []
    real = dialect.await_  # type: ignore[attr-defined]

    def counting(awaitable: Any) -> Any:
        handed.append(awaitable)
        return real(awaitable)

    monkeypatch.setattr(dialect, "await_", counting)
    return handed


def test_a_coroutine_that_does_not_suspend_runs_in_the_task_and_its_context(
    switches: list[object],
) -> None:
    async def body() -> tuple[str, str]:
        marker.set("set by the task")
        return await greenlet_spawn(lambda: _await_eagerly(_at_once()))

    async def main() -> tuple[str, str]:
        return await asyncio.get_running_loop().create_task(body(), name="the-task")

    assert asyncio.run(main()) == ("set by the task", "the-task")
    assert switches == []


def test_a_coroutine_that_suspends_is_awaited_to_its_end(switches: list[object]) -> None:
    async def main() -> int:
        return await greenlet_spawn(lambda: _await_eagerly(_suspends(3)))

    assert asyncio.run(main()) == 3
    assert len(switches) == 1  # handed over once, where it first suspended


def test_an_error_after_a_suspension_reaches_the_caller() -> None:
    async def main() -> None:
        await greenlet_spawn(lambda: _await_eagerly(_fails_after_suspending()))

    with pytest.raises(LookupError, match="after a suspension"):
        asyncio.run(main())


def test_a_cancellation_while_suspended_reaches_the_coroutine() -> None:
    seen: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    async def main() -> None:
        task = asyncio.create_task(greenlet_spawn(lambda: _await_eagerly(waits())))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled inside"]
