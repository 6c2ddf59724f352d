"""A live dashboard for a pgwarden handle: a raw ASGI app with one self-contained page.

    from pgwarden.dashboard import app
    dashboard = app(db)                    # mount it, e.g. Starlette: Mount("/pgwarden", dashboard)

Routes, relative to wherever it is mounted:

* ``/``: a single HTML page (inline CSS and JS, inline SVG charts, nothing from any other
  origin; a Content-Security-Policy enforces that).  It polls ``stats.json`` every second and
  draws pool usage over time, latency percentiles (p50/p95/p99 of query duration and acquire
  wait, over the last 10 s, from histogram bucket deltas), throughput, errors and retries per
  second, the breaker and lifecycle state, counters, and recent events;
* ``/stats.json``: ``{"ts", "name", "source", "stats", "events", "error"}``, where ``stats`` is
  :func:`pgwarden.exporters.snapshot` (``db.stats()`` plus histogram buckets) and ``events``
  the last 50 structured events from the ``pgwarden`` logger; with ``?history=1`` also
  ``history``, up to five minutes of compact one-second samples, so a page opened late starts
  with full charts. The background sampler starts with whichever comes first: the app's own
  ASGI lifespan (a top-level app), ``async with dashboard:`` (or
  ``pgwarden.asgi.lifespan(db, dashboard=dashboard)``) in the host app's lifespan, or the
  first request to the dashboard. A mounted app gets no lifespan of its own (Starlette's
  ``Mount`` passes only ``http`` and ``websocket`` scopes on), so without one of the first two
  history begins with the first request;
* ``/events.json?since=N``: buffered events with a sequence number above N.

*source* is a handle (``AsyncDatabase`` or ``Database``), a callable returning a stats dict
(sync or async), or the ``http(s)://`` URL of a stats endpoint elsewhere: another dashboard's
``stats.json`` (its events come along) or any endpoint that returns ``db.stats()`` as JSON.
Everything served is redacted (URL passwords, ``password=`` pairs, the handle's password).

The app has no framework dependency and runs on any ASGI server; ``pgwarden dashboard``
serves it with the tiny stdlib server in :mod:`pgwarden.dashboard._server`.  Fetching a URL
source uses a worker thread from the running asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from pgwarden._redact import redact
from pgwarden.core.catalog import CATALOG, Shape, read
from pgwarden.exporters import (
    StatsHandle,
    password_of,
    pool_name,
    redact_tree,
    snapshot,
)
from pgwarden.logs import EventBuffer

__all__ = ["DashboardApp", "app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Events included in each ``stats.json`` response.
EVENTS_PER_RESPONSE = 50
#: Seconds to wait for a URL source.
FETCH_TIMEOUT = 2.0
#: Samples of history kept server-side (one a second: five minutes), sent on page load.
HISTORY = 300
#: Minimum seconds between two history samples.
SAMPLE_SPACING = 0.9

_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)


def _fetch_json(url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read(8 * 1024 * 1024).decode("utf-8"))


class DashboardApp:
    """The ASGI app returned by :func:`app`.  Call :meth:`close` to detach its event buffer."""

    def __init__(
        self,
        source: object,
        *,
        name: str | None = None,
        events: int = 200,
        capture_events: bool = True,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self._secrets: tuple[str, ...] = tuple(
            s for s in (*secrets, password_of(source)) if isinstance(s, str) and s
        )
        if isinstance(source, str):
            scheme = urllib.parse.urlsplit(source).scheme
            if scheme not in ("http", "https"):
                raise ValueError(
                    f"a URL source must be http(s)://, not {redact(source, *self._secrets)!r}"
                )
            self.kind = "url"
            self.name = name or redact(source, *self._secrets)
        elif isinstance(source, StatsHandle):
            self.kind = "handle"
            self.name = pool_name(source, name)
        elif callable(source) or isinstance(source, Mapping):
            self.kind = "callable"
            self.name = name or "default"
        else:
            raise TypeError(
                "source must be a pgwarden handle, a callable returning a stats dict, or an "
                f"http(s) URL; got {type(source).__name__}"
            )
        self.buffer = EventBuffer(events, secrets=self._secrets)
        if capture_events:
            self.buffer.install()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._last_sample = 0.0
        self._sampler: asyncio.Task[None] | None = None
        self._sampler_loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        """Stop sampling and detach the event buffer from the ``pgwarden`` logger."""
        sampler, loop = self._sampler, self._sampler_loop
        self._sampler = self._sampler_loop = None
        if sampler is not None and loop is not None and not loop.is_closed():
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                sampler.cancel()
            else:  # closed from another thread (a sync shutdown hook)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(sampler.cancel)
        self.buffer.uninstall()

    async def __aenter__(self) -> DashboardApp:
        """Sample in the background until ``__aexit__``, for the host app's lifespan
        (``async with pgwarden.asgi.lifespan(db), dashboard: yield``)."""
        self.start_sampling()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # --- history -----------------------------------------------------------------------------
    def _remember(self, payload: Mapping[str, Any]) -> None:
        """Keep a compact copy of *payload* in :attr:`history` (at most one per 0.9 s)."""
        stats = payload.get("stats")
        ts = float(payload.get("ts") or 0.0)
        if not isinstance(stats, Mapping) or ts - self._last_sample < SAMPLE_SPACING:
            return
        self._last_sample = ts
        self.history.append({"ts": ts, "stats": _compact(stats)})

    async def sample(self) -> None:
        """Read the source once into :attr:`history` (the background sampler's step)."""
        self._remember(await self.payload())

    def start_sampling(self, interval: float = 1.0) -> asyncio.Task[None]:
        """Sample every *interval* seconds in the running loop, so a page opened later shows
        the last five minutes at once.  Idempotent.  Called by the app's ASGI lifespan, by
        ``async with dashboard``, on the first request, and by ``pgwarden dashboard``.  A
        sampler left on a loop that is gone (each request of a test client used without
        ``with`` runs in a loop of its own) is replaced by one on the running loop."""
        loop = asyncio.get_running_loop()
        sampler = self._sampler
        if sampler is None or sampler.done() or self._sampler_loop is not loop:
            old_loop = self._sampler_loop
            if sampler is not None and not sampler.done() and old_loop is not None:
                with contextlib.suppress(RuntimeError):  # its loop is closed
                    old_loop.call_soon_threadsafe(sampler.cancel)
            self._sampler = sampler = loop.create_task(self._sample_forever(interval))
            self._sampler_loop = loop
        return sampler

    async def _sample_forever(self, interval: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.sample()
            await asyncio.sleep(interval)

    # --- data --------------------------------------------------------------------------------
    async def payload(self) -> dict[str, Any]:
        """What ``stats.json`` serves (already redacted)."""
        out: dict[str, Any] = {
            "ts": time.time(),
            "name": self.name,
            "source": self.kind,
            "stats": None,
            "events": [],
            "error": None,
        }
        try:
            if self.kind == "url":
                assert isinstance(self.source, str)
                loop = asyncio.get_running_loop()
                got = await loop.run_in_executor(None, _fetch_json, self.source, FETCH_TIMEOUT)
                if isinstance(got, Mapping) and isinstance(got.get("stats"), Mapping):
                    out["stats"] = dict(got["stats"])
                    remote_events = got.get("events")
                    out["events"] = list(remote_events) if isinstance(remote_events, list) else []
                    if got.get("error"):
                        out["error"] = str(got["error"])
                elif isinstance(got, Mapping):
                    out["stats"] = dict(got)
                else:
                    raise ValueError("the stats endpoint did not return a JSON object")
            elif self.kind == "handle":
                out["stats"] = snapshot(self.source, name=self.name)
            else:
                got = self.source() if callable(self.source) else self.source
                if inspect.isawaitable(got):
                    got = await got
                if not isinstance(got, Mapping):
                    raise TypeError(f"the stats callable returned {type(got).__name__}")
                out["stats"] = dict(got)
        except Exception as exc:
            where = "stats source" if self.kind != "url" else self.name
            out["error"] = f"cannot read {where}: {type(exc).__name__}: {exc}"
        if self.kind != "url":
            out["events"] = self.buffer.events(limit=EVENTS_PER_RESPONSE)
        result: dict[str, Any] = redact_tree(out, *self._secrets)
        return result

    # --- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.start_sampling()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if self._sampler is None or self._sampler_loop is not asyncio.get_running_loop():
            # Mounted in a host app, whose lifespan never reaches us: start on first use.
            self.start_sampling()
        method = str(scope.get("method", "GET"))
        path = str(scope.get("path", "/"))
        root = str(scope.get("root_path", "") or "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain", [(b"allow", b"GET")])
            return
        if path == "":
            # Mounted at /prefix and asked for /prefix: the page's relative URLs need the slash.
            location = (root or "") + "/"
            await _respond(send, 308, b"", "text/plain", [(b"location", location.encode())])
            return
        if path in ("/", "/index.html"):
            from pgwarden.dashboard._page import PAGE

            await _respond(
                send,
                200,
                PAGE.encode(),
                "text/html; charset=utf-8",
                [(b"content-security-policy", _CSP.encode())],
            )
            return
        if path == "/stats.json":
            payload = await self.payload()
            self._remember(payload)
            query = urllib.parse.parse_qs(bytes(scope.get("query_string", b"")).decode())
            if query.get("history", ["0"])[0] not in ("", "0"):
                payload["history"] = list(self.history)
            body = json.dumps(payload, separators=(",", ":")).encode()
            await _respond(send, 200, body, "application/json")
            return
        if path == "/events.json":
            query = urllib.parse.parse_qs(bytes(scope.get("query_string", b"")).decode())
            try:
                since = int(query.get("since", ["0"])[0])
            except ValueError:
                since = 0
            events = redact_tree(self.buffer.events(since=since), *self._secrets)
            await _respond(send, 200, json.dumps(events).encode(), "application/json")
            return
        await _respond(send, 404, b"not found\n", "text/plain")


def history_paths() -> list[tuple[str, ...]]:
    """The ``stats()`` paths :attr:`DashboardApp.history` keeps: those of the catalog's
    entries marked ``history`` (what the page's charts plot), buckets included."""
    paths: list[tuple[str, ...]] = []
    for spec in CATALOG:
        if not spec.history:
            continue
        if spec.shape is Shape.FIELDS:
            paths.extend((*spec.path, field) for _, field in spec.fields)
        elif spec.shape is Shape.HISTOGRAM:
            paths.extend((spec.path, ("buckets", spec.path[-1])))
        else:
            paths.append(spec.path)
    return paths


_HISTORY_PATHS = history_paths()


def _compact(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a stats dict that the page's charts need, for :attr:`DashboardApp.history`."""
    out: dict[str, Any] = {}
    for path in _HISTORY_PATHS:
        value = read(stats, path)
        if value is None:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def app(
    source: object,
    *,
    name: str | None = None,
    events: int = 200,
    capture_events: bool = True,
) -> DashboardApp:
    """A mountable ASGI dashboard for *source* (see the module docstring).

    *name* labels the pool on the page (default: the handle's ``application_name``).
    *events* is the size of the ring buffer of recent ``pgwarden`` log events; with
    *capture_events* the buffer is attached to the ``pgwarden`` logger now (and, if that
    logger has no level of its own, its level is set to INFO so retries and warmups are
    captured; ``close()`` restores it).
    """
    return DashboardApp(source, name=name, events=events, capture_events=capture_events)
