"""A minimal HTTP/1.1 server for ASGI apps, on ``asyncio.start_server`` (standard library only).

It exists so ``pgwarden dashboard`` needs no web framework or ASGI server.  It is small on
purpose and meant for a local dashboard, not for the internet:

* one request per connection (``Connection: close``), no pipelining, no TLS;
* request line and headers at most 16 KiB, a body at most 1 MiB (``Content-Length`` only;
  chunked request bodies are refused with 411);
* 10 s to send the request; the response is buffered and sent with ``Content-Length``;
* an app that raises gets a 500 with no detail.

Production deployments mount :func:`pgwarden.dashboard.app` in their own ASGI server.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any

__all__ = ["HTTPServer"]

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
READ_TIMEOUT = 10.0


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    names = {k.lower() for k, _ in headers}
    lines = [f"HTTP/1.1 {status} {phrase}".encode()]
    for k, v in headers:
        if k.lower() in (b"connection", b"transfer-encoding"):
            continue
        lines.append(k + b": " + v)
    if b"content-length" not in names:
        lines.append(b"content-length: " + str(len(body)).encode())
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _plain(status: int, text: str) -> bytes:
    return _response(status, [(b"content-type", b"text/plain; charset=utf-8")], text.encode())


class HTTPServer:
    """Serve an ASGI *app* on *host*:*port* (``port=0`` picks a free port; see :attr:`port`)."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> HTTPServer:
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=MAX_HEAD
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def __aenter__(self) -> HTTPServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                scope, body = await asyncio.wait_for(self._read(reader, writer), READ_TIMEOUT)
            except _BadRequest as exc:
                writer.write(_plain(exc.status, str(exc)))
                return
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(await self._call(scope, body))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[dict[str, Any], bytes]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise _BadRequest(400, "malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, "HTTP/1.x only")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise _BadRequest(400, "malformed header")
            headers.append((name.strip().lower(), value.strip()))
        length = 0
        for name, value in headers:
            if name == b"transfer-encoding":
                raise _BadRequest(411, "chunked request bodies are not supported")
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _BadRequest(400, "bad content-length") from None
        if length < 0 or length > MAX_BODY:
            raise _BadRequest(413, "request body too large")
        body = await reader.readexactly(length) if length else b""
        raw_path, _, query = target.partition("?")
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("sockname")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version[5:],
            "method": method.upper(),
            "scheme": "http",
            "path": urllib.parse.unquote(raw_path),
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
            "server": tuple(sock[:2]) if isinstance(sock, tuple) else None,
        }
        return scope, body

    async def _call(self, scope: dict[str, Any], body: bytes) -> bytes:
        sent_request = False
        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        started = False

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects mid-request here
            return {"type": "http.disconnect"}  # pragma: no cover

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status, headers, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                started = True
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        try:
            await self.app(scope, receive, send)
        except Exception:
            return _plain(500, "internal error")
        if not started:
            return _plain(500, "the application sent no response")
        if scope["method"] == "HEAD":
            length = sum(len(c) for c in chunks)
            headers = [h for h in headers if h[0].lower() != b"content-length"]
            headers.append((b"content-length", str(length).encode()))
            return _response(status, headers, b"")
        return _response(status, headers, b"".join(chunks))
