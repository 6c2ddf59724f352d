"""The serverless lifecycle: snapshot/restore (AWS Lambda SnapStart) and a bounded
shutdown on SIGTERM, for every pgwarden handle of the process.

    import pgwarden.serverless
    pgwarden.serverless.install()   # SIGTERM closes every handle within 300 ms;
                                    # SnapStart hooks registered if the runtime has them

`before_snapshot` / `after_restore` are plain functions, usable from any runtime's
hooks. No AWS package is needed: ``snapshot_restore_py`` (shipped in the Lambda
Python managed runtimes) is used only when it can be imported. A frozen process
needs nothing from here: each handle checks idle connections after a pause itself
(``validation_window``, ``gap_threshold``). See docs/serverless.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Any

from pgwarden import _registry
from pgwarden._signals import chain_signal
from pgwarden.errors import PgwardenError

__all__ = [
    "SHUTDOWN_BUDGET",
    "after_restore",
    "before_snapshot",
    "close_all",
    "install",
    "register_snapstart_hooks",
]

logger = logging.getLogger("pgwarden.serverless")

#: Seconds Lambda leaves the runtime process for a graceful shutdown when external
#: extensions are registered (the rest of its 2 s shutdown phase goes to them).
SHUTDOWN_BUDGET = 0.3
#: Lambda fails a restore whose ``after_restore`` hooks take longer than 10 s; leave
#: the runtime's own restore some of it.
RESTORE_BUDGET = 8.0
# Of the shutdown bound, what is kept back from closing for starting and joining the closer.
_JOIN_MARGIN = 0.05
# Old async pools' closes scheduled on their loop, referenced until done (the loop
# keeps only weak references to tasks).
_closing: set[asyncio.Task[None]] = set()


def _live_handles(handles: Iterable[Any] | None) -> list[Any]:
    """Those of *handles* (default: every handle of this process, sync and async)
    that are not closed."""
    chosen = list(_registry._all_handles if handles is None else handles)
    return [h for h in chosen if h.state.value not in ("closing", "closed")]


def _is_async(handle: Any) -> bool:
    # Looked up, not imported: a process without async handles never loads that shell
    # (an import on the shutdown path would eat into its 300 ms).
    module = sys.modules.get("pgwarden._async.database")
    return module is not None and isinstance(handle, module.AsyncDatabase)


def _sever_async(handle: Any, timeout: float) -> None:
    """Terminate an async handle's idle sessions without awaiting anything.

    A hook or signal handler cannot await, and the loop that opened the pool (an
    ``asyncio.run`` of an earlier invocation) may be gone. libpq's ``PQfinish`` is
    synchronous: it sends Terminate and closes the socket. When that loop is
    running in this thread, the pool's proper close is also scheduled on it, so a
    connection being opened or returned right now is closed when it arrives.
    Connections lent out at this moment are left to their owner.
    """
    connections = handle._connections
    connections.finish_idle_solo()
    pool = connections.pool
    for conn in list(getattr(pool, "_pool", ()) if pool is not None else ()):
        with contextlib.suppress(Exception):  # best effort: the socket may be dead already
            conn.pgconn.finish()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop: nothing of the old pool can run any more
    task = loop.create_task(connections.close(timeout))
    _closing.add(task)
    task.add_done_callback(_closed)


def _closed(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    # Retrieved so that a pool made on another loop fails quietly: it is dead already.
    if not task.cancelled() and task.exception() is not None:
        logger.debug("an old pool's close failed: %s", type(task.exception()).__name__)


def _reset(handle: Any, timeout: float) -> None:
    """Close *handle*'s connections and forget its state: the next use warms up anew."""
    if _is_async(handle):
        _sever_async(handle, timeout)
    else:
        handle._connections.close(timeout)
    handle._forget_after_fork()


def before_snapshot(timeout: float = 5.0, *, handles: Iterable[Any] | None = None) -> None:
    """Close every connection of every handle and forget the handles' state.

    The handles stay usable (same objects): each is NEW again and warms up on its
    next use or in `after_restore`. A snapshot then holds no socket, no server
    session and no breaker or health state that would be stale on restore.
    *timeout* bounds the whole call (sync pools' close). *handles*: only these
    (default: every handle of the process).
    """
    give_up_at = time.monotonic() + timeout
    for handle in _live_handles(handles):
        try:
            _reset(handle, max(0.0, give_up_at - time.monotonic()))
        except Exception as exc:  # one bad handle must not keep the others' sessions open
            logger.warning("before_snapshot: %s failed: %s", handle, type(exc).__name__)


def after_restore(timeout: float = RESTORE_BUDGET, *, handles: Iterable[Any] | None = None) -> None:
    """Warm up every sync handle again, within *timeout* in total.

    Never raises: a database that is not reachable yet must not fail the restore
    (the first query retries the warmup within its own deadline). Async handles
    need their event loop, so they warm up on their first query (or ``await
    db.ready()`` in the handler). *handles* as for `before_snapshot`.
    """
    give_up_at = time.monotonic() + timeout
    for handle in _live_handles(handles):
        if _is_async(handle):
            continue
        remaining = give_up_at - time.monotonic()
        if remaining <= 0:
            logger.warning("after_restore: no time left to warm up %s", handle)
            return
        try:
            handle.ready(timeout=remaining)
        except PgwardenError as exc:
            logger.warning("after_restore: %s not ready: %s", handle, type(exc).__name__)


def close_all(timeout: float = SHUTDOWN_BUDGET, *, handles: Iterable[Any] | None = None) -> None:
    """Close every handle within *timeout* in total (sync handles drain their work in
    flight for what is left of it; async handles' idle sessions are terminated).
    *handles* as for `before_snapshot`."""
    give_up_at = time.monotonic() + timeout
    for handle in _live_handles(handles):
        remaining = max(0.0, give_up_at - time.monotonic())
        try:
            if _is_async(handle):
                _sever_async(handle, remaining)
                handle._forget_after_fork()
            else:
                handle.close(timeout=remaining)
        except Exception as exc:  # keep closing the others: the process is going away
            logger.warning("close_all: %s failed: %s", handle, type(exc).__name__)


def _close_all_bounded(timeout: float) -> None:
    """`close_all` on its own thread, waited for at most *timeout* in all.

    The handler runs on the main thread between two bytecodes of whatever it
    interrupted, possibly inside one of the handle's locks: closing there could
    deadlock. On another thread it cannot, and the wait stays bounded.
    """
    closer = threading.Thread(
        target=close_all, args=(max(0.0, timeout - _JOIN_MARGIN),), name="pgwarden-shutdown"
    )
    closer.daemon = True
    closer.start()
    closer.join(timeout)


def register_snapstart_hooks() -> bool:
    """Register `before_snapshot` / `after_restore` as SnapStart runtime hooks if the
    ``snapshot_restore_py`` module is present; returns whether it was."""
    try:
        import snapshot_restore_py  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    snapshot_restore_py.register_before_snapshot(before_snapshot)
    snapshot_restore_py.register_after_restore(after_restore)
    return True


def install(
    timeout: float = SHUTDOWN_BUDGET,
    *,
    signals: Sequence[int] = (signal.SIGTERM,),
    snapstart: bool = True,
) -> None:
    """On each of *signals* (SIGTERM by default), `close_all` within *timeout*, then
    do what the previously installed handler would have done (for the default
    disposition: terminate). With *snapstart*, also `register_snapstart_hooks`.

    Call it from the main thread (Python delivers signals there), after any other
    library that installs its own SIGTERM handler, so that it is chained to.
    """
    for signum in signals:
        previous = signal.getsignal(signum)

        def handler(received: int, frame: FrameType | None, previous: Any = previous) -> None:
            _close_all_bounded(timeout)
            chain_signal(previous, received, frame)

        signal.signal(signum, handler)
    if snapstart:
        register_snapstart_hooks()
