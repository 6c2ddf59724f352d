"""asyncio primitives the async tests use; `tests/_sync/_compat.py` mirrors the names.

Tests write concurrency as ``await gather(*[spawn(worker, (i,)) for i in range(n)])``
so that the generated sync twin runs the same workers in threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar, overload

__all__ = ["gather", "run", "sleep", "spawn"]

T = TypeVar("T")

sleep = asyncio.sleep


def run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the test body *fn()* to completion on a fresh event loop."""
    return asyncio.run(fn())


def spawn(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...] = ()) -> asyncio.Future[T]:
    """Start ``fn(*args)`` concurrently; `gather` waits for it."""
    return asyncio.ensure_future(fn(*args))


@overload
async def gather(*tasks: Awaitable[T], return_exceptions: Literal[False] = False) -> list[T]: ...


@overload
async def gather(
    *tasks: Awaitable[T], return_exceptions: Literal[True]
) -> list[T | BaseException]: ...


async def gather(*tasks: Awaitable[T], return_exceptions: bool = False) -> list[Any]:
    """Wait for all *tasks*; their results in order, or the first error raised.

    With ``return_exceptions=True`` errors are returned in place of results.
    """
    return await asyncio.gather(*tasks, return_exceptions=return_exceptions)
