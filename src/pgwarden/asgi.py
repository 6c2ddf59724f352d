"""ASGI integration with no framework dependency: a lifespan and the health app.

    import pgwarden, pgwarden.asgi

    db = pgwarden.connect_async()
    app = Starlette(lifespan=pgwarden.asgi.lifespan(db))   # or nest it in your own
    app.mount("/", pgwarden.asgi.health_app(db))           # /livez /readyz /health, last

* `lifespan` warms the handle up at startup (bounded; by default the app starts even if
  the database is down, and ``/readyz`` says not ready), makes ``/readyz`` fail as soon
  as SIGTERM arrives (optionally keeping the server up for ``drain_delay`` seconds so
  the load balancer notices), and drains the handle at shutdown with ``db.close()``.
  Sync handles are warmed and closed in a worker thread.
* `health_app` serves ``application/health+json`` (`pgwarden.healthcheck` builds the
  bodies): ``/livez`` never touches the database; ``/readyz`` fails before the first
  warmup and while draining, and reports a database outage as ``warn`` (HTTP 200) unless
  ``fail_on_outage=True``; ``/health`` adds response time, connections and breaker state.
* `error_response` maps pgwarden's errors to HTTP (``DatabaseUnusable`` to 503 with
  ``Retry-After``, ``OutcomeUnknown`` to 500, a conflict that outlived its retries to
  409); `pgwarden.fastapi.install_error_handlers` installs it in a Starlette or FastAPI
  app.

This module imports neither Starlette nor FastAPI (only asyncio and the standard library),
so it serves any ASGI server and framework; `pgwarden.fastapi` adds the FastAPI pieces.
docs/asgi.md is the guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pgwarden import healthcheck
from pgwarden.errors import (
    DatabaseUnavailable,
    DatabaseUnusable,
    HandleClosed,
    NotCommitted,
    OutcomeUnknown,
)

if TYPE_CHECKING:
    from pgwarden._async.database import AsyncDatabase
    from pgwarden._sync.database import Database
    from pgwarden.dashboard import DashboardApp

__all__ = [
    "HealthApp",
    "Lifespan",
    "current_handle",
    "error_response",
    "health_app",
    "lifespan",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("pgwarden.asgi")

#: Seconds the lifespan waits for the first warmup before letting the app start anyway:
#: longer than a cold connect to a working server, far shorter than ``ready_timeout``
#: (the warmup itself goes on in the background; ``/readyz`` turns 200 when it succeeds).
STARTUP_TIMEOUT = 5.0
#: Seconds ``db.close()`` waits for work in flight at shutdown (its own default).
CLOSE_TIMEOUT = 5.0


def _is_async(db: object) -> bool:
    return inspect.iscoroutinefunction(getattr(type(db), "health", None))


async def _call(db: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``db.method(*args)``: awaited on an async handle, in a worker thread on a sync one."""
    fn = getattr(db, method)
    if _is_async(db):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _nudge_breaker(db: Any) -> None:
    """While the breaker is open, ``health()`` reports the outage without a round trip,
    and only a real call can be the breaker's probe. A pod taken out of the load balancer
    gets no calls, so the health endpoints send one (``SELECT 1``, bounded by
    ``health_timeout``): it is the probe when one is due and fails fast otherwise."""
    if db.stats().get("breaker", "closed") == "closed":
        return
    with contextlib.suppress(Exception):
        await _call(db, "fetchval", "SELECT 1", timeout=db.settings.health_timeout)


# --- the handle the lifespan manages ----------------------------------------------------------
_active: list[object] = []


def current_handle(kind: str = "async") -> Any:
    """The innermost handle of this *kind* (``"async"`` or ``"sync"``) whose `lifespan`
    is running, or None. `pgwarden.fastapi.database` injects it."""
    want_async = kind == "async"
    for db in reversed(_active):
        if _is_async(db) == want_async:
            return db
    return None


async def _touch_engine(engine: Any, timeout: float) -> None:
    """Open and close one connection of a ``postgresql+pgwarden`` engine within *timeout*
    (its dialect makes the pgwarden handle on the first attempt, and the attempt starts
    the warmup); failures are left to the warmup to report."""
    from pgwarden.core.deadline import deadline

    bound = max(timeout, 0.001)
    if hasattr(engine, "sync_engine"):  # an AsyncEngine

        async def touch() -> None:
            with deadline(bound):
                async with engine.connect():
                    pass

        with contextlib.suppress(Exception):
            await asyncio.wait_for(touch(), bound + 1.0)
        return

    def touch_sync() -> None:
        with deadline(bound), engine.connect():
            pass

    with contextlib.suppress(Exception):
        await asyncio.to_thread(touch_sync)


# --- lifespan ---------------------------------------------------------------------------------
class Lifespan:
    """Warm up at startup, fail readiness on SIGTERM, drain at shutdown (see `lifespan`).

    Both an async context manager (``async with pgwarden.asgi.lifespan(db): ...`` inside
    your own lifespan) and a Starlette/FastAPI ``lifespan=`` callable (``lifespan(app)``
    returns it). One instance runs one app at a time.
    """

    def __init__(
        self,
        db: AsyncDatabase | Database | Any,
        *,
        startup_timeout: float = STARTUP_TIMEOUT,
        fail_startup: bool = False,
        close_timeout: float = CLOSE_TIMEOUT,
        drain_delay: float = 0.0,
        dashboard: DashboardApp | None = None,
    ) -> None:
        if startup_timeout < 0 or close_timeout < 0 or drain_delay < 0:
            raise ValueError("startup_timeout, close_timeout and drain_delay must be >= 0")
        #: What was given: a handle, or a ``postgresql+pgwarden`` SQLAlchemy engine.
        self.target = db
        #: The handle (for an engine: once its first connection attempt made it).
        self.db: Any = healthcheck.handle_behind(db)
        self.startup_timeout = startup_timeout
        self.fail_startup = fail_startup
        self.close_timeout = close_timeout
        self.drain_delay = drain_delay
        self.dashboard = dashboard
        #: The warmup's failure at startup when the app started without the database.
        self.startup_error: BaseException | None = None
        self._hook: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, app: object) -> Lifespan:
        return self

    async def __aenter__(self) -> None:
        self.startup_error = None
        started = asyncio.get_running_loop().time()
        db = self.db = healthcheck.handle_behind(self.target)
        if db is None:  # an engine that has not connected yet: its first attempt makes one
            await _touch_engine(self.target, self.startup_timeout)
            db = self.db = healthcheck.handle_behind(self.target)
            if db is None:
                raise RuntimeError(f"no pgwarden handle behind {self.target!r}")
        healthcheck.stop_draining(db)
        left = max(0.0, self.startup_timeout - (asyncio.get_running_loop().time() - started))
        try:
            await _call(db, "ready", left)
        except DatabaseUnusable as exc:
            if self.fail_startup:
                raise
            self.startup_error = exc
            logger.warning(
                "starting without the database (%s: %s); /readyz fails until a warmup succeeds",
                type(exc).__name__,
                exc,
                extra={"event": "startup_not_ready", "error": type(exc).__name__},
            )
        _active.append(db)
        try:
            if self.dashboard is not None:
                await self.dashboard.__aenter__()
            if self.drain_delay > 0:
                self._hook_sigterm()
        except BaseException:
            _active.remove(db)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        db = self.db
        healthcheck.start_draining(db)
        self._unhook_sigterm()
        try:
            if self.dashboard is not None:
                await self.dashboard.__aexit__(exc_type, exc, tb)
            await _call(db, "close", self.close_timeout)
        finally:
            with contextlib.suppress(ValueError):
                _active.remove(db)
        dispose = getattr(self.target, "dispose", None)
        if dispose is not None and self.target is not db:  # an engine: let it go too
            result = dispose()
            if inspect.isawaitable(result):
                await result

    # --- SIGTERM: fail readiness first, stop serving drain_delay seconds later ---------------
    def _hook_sigterm(self) -> None:
        """Put our handler in front of the server's SIGTERM handler (uvicorn, hypercorn
        install theirs with ``signal.signal`` before the lifespan starts)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (TestClient runs apps elsewhere)
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)
        if str(getattr(previous, "__module__", "")).startswith(("asyncio", "uvloop")):
            # The server handles SIGTERM on the event loop itself (hypercorn does): ours
            # would replace its handler, and there is nothing to chain to. Leave it be.
            logger.warning(
                "drain_delay ignored: the server handles SIGTERM on the event loop; "
                "use a preStop hook that sleeps instead",
                extra={"event": "drain_delay_ignored"},
            )
            return
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, odd loops
            return
        self._hook = (loop, previous)

    def _unhook_sigterm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        hook, self._hook = self._hook, None
        if hook is None:
            return
        loop, previous = hook
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self) -> None:
        hook = self._hook
        if hook is None:  # pragma: no cover - removed while the signal was queued
            return
        first = self._timer is None
        healthcheck.start_draining(self.db)
        if first:
            logger.info(
                "SIGTERM: /readyz fails from now on; the server stops in %.1f s",
                self.drain_delay,
                extra={"event": "draining", "delay": self.drain_delay},
            )
            self._timer = hook[0].call_later(self.drain_delay, self._pass_on)
        else:  # a second SIGTERM: do not make them wait
            self._pass_on()

    def _pass_on(self) -> None:
        """Hand SIGTERM to the handler that was there before ours (the server's)."""
        from pgwarden._signals import chain_signal

        hook = self._hook
        self._unhook_sigterm()
        if hook is not None:
            chain_signal(hook[1], signal.SIGTERM)


def lifespan(
    db: AsyncDatabase | Database | Any,
    *,
    startup_timeout: float = STARTUP_TIMEOUT,
    fail_startup: bool = False,
    close_timeout: float = CLOSE_TIMEOUT,
    drain_delay: float = 0.0,
    dashboard: DashboardApp | None = None,
) -> Lifespan:
    """The handle's lifespan, for ``FastAPI(lifespan=...)`` or to nest in your own.

    *db* is an ``AsyncDatabase`` or a ``Database`` (warmed and closed in a worker
    thread), or a ``postgresql+pgwarden`` SQLAlchemy engine: its pgwarden handle is used
    (the engine is disposed of at shutdown too).

    Startup: ``db.ready()``, waiting at most *startup_timeout* seconds. If the database
    cannot be reached, the app starts anyway (logged as ``startup_not_ready``) and
    ``/readyz`` fails until a warmup succeeds (the warmup goes on in the background, and
    every ``/readyz`` starts a new one after it gave up); with *fail_startup* the error is
    raised instead and the server does not start.

    SIGTERM (only with *drain_delay* > 0, and only in the main thread): ``/readyz``
    fails at once while everything keeps working; *drain_delay* seconds later the
    signal goes on to the server's own handler, which stops accepting connections and
    waits for requests in flight. Set it to the time your load balancer needs to notice
    (a few probe periods); without it the server stops listening at SIGTERM.

    Shutdown: ``/readyz`` fails, then ``db.close(close_timeout)`` refuses new work and
    waits for work in flight. *dashboard* (a `pgwarden.dashboard.DashboardApp`) samples
    from startup to shutdown.

    Passing ``lifespan=`` to Starlette or FastAPI replaces their default lifespan, and
    with it every ``@app.on_event("startup"/"shutdown")`` handler (FastAPI runs them only
    from its default lifespan): nest this one inside yours instead of mixing the two.
    """
    return Lifespan(
        db,
        startup_timeout=startup_timeout,
        fail_startup=fail_startup,
        close_timeout=close_timeout,
        drain_delay=drain_delay,
        dashboard=dashboard,
    )


# --- health app -------------------------------------------------------------------------------
class HealthApp:
    """The ASGI app returned by `health_app`."""

    def __init__(
        self,
        db: AsyncDatabase | Database | Any,
        *,
        fail_on_outage: bool = False,
        app: ASGIApp | None = None,
        livez: str | None = "/livez",
        readyz: str | None = "/readyz",
        health: str | None = "/health",
        description: str | None = None,
    ) -> None:
        self.target = db
        self.fail_on_outage = fail_on_outage
        self._touching: asyncio.Task[None] | None = None
        self.app = app
        self.description = description
        self._routes: dict[str, str] = {
            path: kind
            for path, kind in ((livez, "livez"), (readyz, "readyz"), (health, "health"))
            if path
        }

    async def respond(self, kind: str) -> healthcheck.HealthResponse:
        """The answer for *kind* (``"livez"``, ``"readyz"`` or ``"health"``) right now."""
        db = healthcheck.handle_behind(self.target)
        if db is None:
            # An engine that never connected (no lifespan): not ready; connect once in
            # the background, which makes its handle and starts the warmup.
            touching, loop = self._touching, asyncio.get_running_loop()
            if kind != "livez" and (
                touching is None or touching.done() or touching.get_loop() is not loop
            ):
                self._touching = loop.create_task(_touch_engine(self.target, 5.0))
            p = healthcheck.Probe(state="new")
            if kind == "livez":
                return healthcheck.livez(p)
            if kind == "readyz":
                return healthcheck.readyz(p, fail_on_outage=self.fail_on_outage)
            return healthcheck.health(p, fail_on_outage=self.fail_on_outage)
        if kind == "livez":
            return healthcheck.livez(healthcheck.probe(db))
        if kind == "readyz" and healthcheck.is_draining(db):
            # Shutting down: answer without a round trip (and without starting a warmup).
            return healthcheck.readyz(healthcheck.probe(db), fail_on_outage=self.fail_on_outage)
        # health() is bounded by health_timeout, cached for health_interval and
        # single-flight; before the first warmup it starts one, and with the breaker
        # open we send its probe: a pod whose database was down becomes ready again
        # without any traffic.
        await _nudge_breaker(db)
        report = await _call(db, "health")
        p = healthcheck.probe(db, report)
        if kind == "readyz":
            return healthcheck.readyz(p, fail_on_outage=self.fail_on_outage)
        return healthcheck.health(
            p, fail_on_outage=self.fail_on_outage, description=self.description
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = None
        if scope["type"] == "http":
            kind = self._routes.get(_route_path(scope))
        if kind is None:
            if self.app is not None:
                await self.app(scope, receive, send)
            elif scope["type"] == "lifespan":
                await _answer_lifespan(receive, send)
            elif scope["type"] == "http":
                await _send(send, 404, b"not found\n", [(b"content-type", b"text/plain")])
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _send(
                send,
                405,
                b"method not allowed\n",
                [(b"content-type", b"text/plain"), (b"allow", b"GET, HEAD")],
            )
            return
        answer = await self.respond(kind)
        body = answer.encode()
        headers = [(k.encode(), v.encode()) for k, v in answer.headers]
        headers.append((b"content-length", str(len(body)).encode()))
        await _send(send, answer.code, b"" if method == "HEAD" else body, headers)


def health_app(
    db: AsyncDatabase | Database | Any,
    *,
    fail_on_outage: bool = False,
    app: ASGIApp | None = None,
    livez: str | None = "/livez",
    readyz: str | None = "/readyz",
    health: str | None = "/health",
    description: str | None = None,
) -> HealthApp:
    """An ASGI app serving ``/livez``, ``/readyz`` and ``/health`` for *db*: an
    ``AsyncDatabase``, a sync ``Database`` (its ``health()`` then runs in a thread), or a
    ``postgresql+pgwarden`` SQLAlchemy engine (the handle behind it).

    Mount it (``app.mount("/", health_app(db))`` after your routes, or at a prefix), or
    wrap your app with it (``health_app(db, app=your_app)``): then every other request,
    and the lifespan, go to *your_app*, and probes skip your middleware (auth, sessions).
    Paths are relative to the mount point; pass ``livez=None`` (etc.) to drop one, or
    another path to rename it. *fail_on_outage*: report a database outage as ``fail``
    (503) instead of ``warn`` (200); see `pgwarden.healthcheck`. *description* becomes
    the body's ``description`` on ``/health``.
    """
    return HealthApp(
        db,
        fail_on_outage=fail_on_outage,
        app=app,
        livez=livez,
        readyz=readyz,
        health=health,
        description=description,
    )


def _route_path(scope: Scope) -> str:
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", "") or "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


async def _answer_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    if not any(k == b"content-length" for k, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- errors to HTTP ---------------------------------------------------------------------------
#: ``Retry-After`` for a ``DatabaseUnusable`` that carries no ``retry_after`` of its own.
DEFAULT_RETRY_AFTER = 1


def error_response(exc: BaseException) -> tuple[int, dict[str, str], dict[str, Any]] | None:
    """(HTTP status, headers, JSON body) for one of pgwarden's errors, or None.

    * ``DatabaseUnusable`` (not ready, breaker open, no connection in time, deadline,
      closing): 503 with ``Retry-After``: ``ceil(retry_after)`` when the error has one
      (the breaker's next probe), else 1 s;
    * ``NotCommitted``: 503, ``Retry-After: 0`` (certainly not committed: safe to retry);
    * ``OutcomeUnknown`` (and ``AmbiguousCommitError``): 500; the write may or may not
      have happened, so the body says not to retry blindly, with ``txid`` when known;
    * psycopg's ``SerializationFailure`` (40001) and ``DeadlockDetected`` (40P01), which
      reach the caller only when ``run_transaction`` ran out of attempts or the retry
      budget: 409 with ``Retry-After: 0`` (rolled back: safe to retry).

    The body is an RFC 9457 problem object (``type``, ``title``, ``status``, ``detail``)
    with ``error`` (the class name). It never carries the exception's text, which may
    name hosts; log that server-side.
    """
    if isinstance(exc, DatabaseUnusable):
        retry_after = getattr(exc, "retry_after", None)
        seconds = DEFAULT_RETRY_AFTER
        if isinstance(exc, DatabaseUnavailable) and isinstance(retry_after, (int, float)):
            seconds = max(1, math.ceil(retry_after))
        detail = (
            "the service is shutting down; retry on another instance"
            if isinstance(exc, HandleClosed)
            else "the database is temporarily unavailable; retry later"
        )
        return 503, {"retry-after": str(seconds)}, _problem(503, exc, detail)
    if isinstance(exc, NotCommitted):
        detail = "the work was certainly not committed; it is safe to retry"
        return 503, {"retry-after": "0"}, _problem(503, exc, detail)
    if isinstance(exc, OutcomeUnknown):
        body = _problem(
            500,
            exc,
            "the write may or may not have been applied; check its effect before retrying",
        )
        if exc.txid is not None:
            body["txid"] = exc.txid
        return 500, {}, body
    if getattr(exc, "sqlstate", None) in CONFLICT_SQLSTATES:
        detail = "the transaction conflicted with another and was rolled back; retry it"
        return 409, {"retry-after": "0"}, _problem(409, exc, detail)
    return None


#: Serialization failure and deadlock: rolled back by the server, safe to run again.
CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})


def _problem(status: int, exc: BaseException, detail: str) -> dict[str, Any]:
    titles = {503: "Service Unavailable", 500: "Outcome Unknown", 409: "Conflict"}
    return {
        "type": "about:blank",
        "title": titles[status],
        "status": status,
        "detail": detail,
        "error": type(exc).__name__,
    }
