"""One handle per process per (URL, settings): `connect()` and `connect_async()`.

Calling ``pgwarden.connect()`` inside every request handler is safe and
cheap: the second call returns the first call's handle. After ``fork()`` the
child starts with an empty registry and its handles forget the parent's pool
(psycopg does not close a connection in a process that did not open it, so
the parent's sessions are untouched).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pgwarden.settings import Settings

if TYPE_CHECKING:
    from pgwarden._async.database import AsyncDatabase
    from pgwarden._sync.database import Database

__all__ = ["connect", "connect_async"]


class _Handle(Protocol):
    @property
    def state(self) -> Any: ...


H = TypeVar("H", bound=_Handle)

_lock = threading.Lock()
# Keyed by the settings and the consumer's adapters map (None for pgwarden's own
# shape): an ORM's JSON loaders must not leak into another consumer's rows.
_async_handles: dict[tuple[Settings, Any], AsyncDatabase] = {}
_sync_handles: dict[tuple[Settings, Any], Database] = {}
# Every handle ever made in this process, so a fork can reset them all.
_all_handles: weakref.WeakSet[Any] = weakref.WeakSet()


def _settings(url: str | None, overrides: dict[str, Any]) -> Settings:
    if url is not None:
        overrides["url"] = url
    return Settings.from_env(**overrides)


def connect_async(
    url: str | None = None, *, adapters: Any = None, **settings: Any
) -> AsyncDatabase:
    """The process's `AsyncDatabase` for *url* (default ``DATABASE_URL``) and *settings*.

    Does no I/O: the first query (or ``await db.ready()``) connects. Pass
    ``settings=Settings(...)`` to use a prepared `Settings` object. *adapters*
    (a psycopg ``AdaptersMap``, for integrations) gives a separate handle whose
    connections start from it.
    """
    from pgwarden._async.database import AsyncDatabase

    def make(key: Settings) -> AsyncDatabase:
        return AsyncDatabase(key, adapters=adapters)

    return _handle(_async_handles, make, url, settings, adapters)


def connect(url: str | None = None, *, adapters: Any = None, **settings: Any) -> Database:
    """The process's sync `Database` for *url* and *settings*; see `connect_async`.

    Sync handles close themselves at interpreter exit.
    """
    from pgwarden._sync.database import Database

    def make(key: Settings) -> Database:
        return Database(key, adapters=adapters)

    return _handle(_sync_handles, make, url, settings, adapters)


def _handle(
    handles: dict[tuple[Settings, Any], H],
    make: Callable[[Settings], H],
    url: str | None,
    given: dict[str, Any],
    adapters: Any,
) -> H:
    prepared = given.pop("settings", None)
    settings = prepared if isinstance(prepared, Settings) else _settings(url, given)
    key = (settings, adapters)
    with _lock:
        handle = handles.get(key)
        if handle is None or handle.state.value in ("closing", "closed"):
            handle = handles[key] = make(settings)
            _all_handles.add(handle)
        return handle


def _reset_after_fork() -> None:
    """In the child: forget every handle's pool and start with an empty registry."""
    global _lock
    _lock = threading.Lock()
    _async_handles.clear()
    _sync_handles.clear()
    for handle in list(_all_handles):
        handle._forget_after_fork()


def _close_sync_handles_at_exit() -> None:
    for handle in list(_sync_handles.values()):
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            handle.close(timeout=1.0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_close_sync_handles_at_exit)
