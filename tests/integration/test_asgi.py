"""pgwarden.asgi / pgwarden.fastapi / pgwarden.wsgi against real servers.

FastAPI apps run under real uvicorn (``uvicorn.Server`` in a thread, on a free port),
the WSGI health app under wsgiref, and PostgreSQL is ``pg_server`` (the random password
in its URL is looked for in every body), reached through the fault proxy where the test
needs the database to be down. The example app under a uvicorn subprocess (startup,
SIGTERM drain) is in test_asgi_example.py, which reuses the helpers here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi import FastAPI

import pgwarden.asgi
import pgwarden.fastapi
import pgwarden.wsgi
from pgwarden import (
    AsyncDatabase,
    Database,
    NotCommitted,
    OutcomeUnknown,
    Settings,
)
from pgwarden.core.lifecycle import State
from pgwarden.dashboard import app as dashboard_app
from pgwarden.fastapi import DatabaseDep, SyncDatabaseDep
from pgwarden.healthcheck import MEDIA_TYPE, problems, start_draining


# --- HTTP without a client library: one connection per request, nothing pooled ---------------
@dataclass
class Reply:
    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(base: str, path: str, *, method: str = "GET", timeout: float = 10.0) -> Reply:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, headers, resp.read())
    finally:
        conn.close()


def post(base: str, path: str, payload: Any, *, timeout: float = 10.0) -> Reply:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        body = json.dumps(payload).encode()
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def health_json(reply: Reply) -> dict[str, Any]:
    """The body of a health endpoint, checked: media type, the draft's fields, code rule."""
    assert reply.headers["content-type"] == MEDIA_TYPE, reply.headers
    assert "max-age" in reply.headers["cache-control"]
    body = reply.json()
    assert problems(body, reply.code) == [], body
    assert isinstance(body, dict)
    return body


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll *check* until true; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


# --- uvicorn in a thread -----------------------------------------------------------------------
@contextlib.contextmanager
def serve(app: Any, *, expect_start: bool = True) -> Iterator[str]:
    """Run *app* under ``uvicorn.Server`` in a thread (lifespan on); yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    exits: list[object] = []

    def run() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits with 3 when the lifespan startup fails
            exits.append(exc.code)

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        if not expect_start:
            thread.join(30)
            assert not thread.is_alive(), "uvicorn should have given up at startup"
            assert not server.started
            assert exits == [3]
            yield ""
            return
        wait_for(lambda: server.started or not thread.is_alive(), 30, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


# --- uvicorn in a subprocess (the example app; SIGTERM) ----------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class UvicornProcess:
    """``python -m uvicorn TARGET`` on a free port, its output in *log*."""

    def __init__(self, target: str, *, app_dir: Path, env: dict[str, str], log: Path) -> None:
        self.target = target
        self.app_dir = app_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
        self.env.update(env)
        self.log_path = log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> UvicornProcess:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            self.target,
            "--app-dir",
            str(self.app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "info",
            "--timeout-graceful-shutdown",
            "30",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout, f"uvicorn to serve {self.target}\n{self.log()}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"uvicorn exited with {self.proc.returncode}:\n{self.log()}")
        try:
            get(self.base, "/livez", timeout=2)
        except OSError:
            return False
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- a small app -------------------------------------------------------------------------------
def make_app(db: AsyncDatabase, **lifespan_options: Any) -> FastAPI:
    app = FastAPI(lifespan=pgwarden.fastapi.lifespan(db, **lifespan_options))
    pgwarden.fastapi.install_error_handlers(app)

    @app.get("/value")
    async def value(d: DatabaseDep) -> dict[str, Any]:
        return {"value": await d.fetchval("SELECT 41 + 1", timeout=3), "same": d is db}

    @app.get("/raise/{kind}")
    async def boom(kind: str) -> None:
        if kind == "unknown":
            raise OutcomeUnknown("lost after it was sent", txid=1234)
        raise NotCommitted("lost before COMMIT")

    app.mount("/strict", pgwarden.asgi.health_app(db, fail_on_outage=True))
    app.mount("/", pgwarden.asgi.health_app(db, description="asgi test"))
    return app


def proxied(pg_server: Any, fault_proxy: Any, **settings: Any) -> AsyncDatabase:
    defaults: dict[str, Any] = {"ready_timeout": 1.0, "health_interval": 0.2}
    defaults.update(settings)
    return AsyncDatabase(Settings(url=fault_proxy.url_for(pg_server.url), **defaults))


def state_of(db: AsyncDatabase | Database) -> State:
    """The handle's state, read afresh (no narrowing from an earlier assert)."""
    return db.state


def no_secret(pg_server: Any, *replies: Reply) -> None:
    for reply in replies:
        assert pg_server.password not in reply.body.decode(errors="replace")
        assert pg_server.password not in json.dumps(reply.headers)


# --- tests -------------------------------------------------------------------------------------
def test_readyz_fails_until_the_first_warmup_then_passes(pg_server: Any, fault_proxy: Any) -> None:
    fault_proxy.refuse()
    db = proxied(pg_server, fault_proxy)
    with serve(make_app(db, startup_timeout=0.3)) as base:
        # The app started without its database (fail_startup is opt-in).
        live = get(base, "/livez")
        assert live.code == 200
        assert health_json(live)["status"] == "pass"
        ready = get(base, "/readyz")
        body = health_json(ready)
        assert (ready.code, body["status"]) == (503, "fail")
        assert "not ready" in body["output"]
        full = get(base, "/health")
        assert full.code == 503
        assert health_json(full)["checks"]["postgresql:responseTime"][0]["status"] == "fail"
        no_secret(pg_server, ready, full)
        time.sleep(1.2)  # past ready_timeout: the startup warmup has given up
        assert state_of(db) is State.NEW
        assert get(base, "/readyz").code == 503

        fault_proxy.heal()
        # Nothing else calls the database: /readyz itself starts the warmup that succeeds.
        took = wait_for(lambda: get(base, "/readyz").code == 200, 15, "/readyz to pass")
        assert took < 10
        assert health_json(get(base, "/readyz"))["status"] == "pass"
        full = get(base, "/health")
        body = health_json(full)
        assert (full.code, body["status"], body["description"]) == (200, "pass", "asgi test")
        checks = body["checks"]
        assert checks["postgresql:responseTime"][0]["status"] == "pass"
        assert checks["postgresql:responseTime"][0]["observedValue"] >= 0
        assert checks["postgresql:connections"][0]["max"] == 10
        assert checks["postgresql:lifecycle"][0]["observedValue"] == "ready"
        assert checks["postgresql:breaker"][0]["observedValue"] == "closed"
        assert get(base, "/value").json() == {"value": 42, "same": True}
        head = get(base, "/readyz", method="HEAD")
        assert (head.code, head.body) == (200, b"")
        assert get(base, "/readyz", method="POST").code == 405
    assert state_of(db) is State.CLOSED  # drained at shutdown


def test_outage_warns_by_default_fails_on_opt_in_and_livez_stays_up(
    pg_server: Any, fault_proxy: Any
) -> None:
    db = proxied(pg_server, fault_proxy, connect_timeout=1.0)
    with serve(make_app(db)) as base:
        assert health_json(get(base, "/readyz"))["status"] == "pass"  # warmed at startup
        assert get(base, "/strict/readyz").code == 200

        fault_proxy.refuse()
        fault_proxy.drop_connections()

        def down() -> bool:
            body = get(base, "/health").json()
            return bool(body["checks"]["postgresql:responseTime"][0]["status"] == "fail")

        wait_for(down, 15, "/health to see the outage", interval=0.2)
        ready = get(base, "/readyz")
        body = health_json(ready)
        assert (ready.code, body["status"]) == (200, "warn")
        assert body["output"].startswith("database unreachable")
        strict = get(base, "/strict/readyz")
        assert (strict.code, health_json(strict)["status"]) == (503, "fail")
        full = get(base, "/health")
        assert (full.code, health_json(full)["status"]) == (200, "warn")
        for _ in range(5):
            live = get(base, "/livez")
            assert (live.code, health_json(live)["status"]) == (200, "pass")
        # The database-backed endpoint answers a fast 503 with Retry-After, not a hang.
        started = time.monotonic()
        failed = get(base, "/value")
        assert failed.code == 503, failed.body
        assert int(failed.headers["retry-after"]) >= 1
        assert failed.json()["status"] == 503
        assert time.monotonic() - started < 8
        no_secret(pg_server, ready, strict, full, failed)

        fault_proxy.heal()
        wait_for(lambda: get(base, "/strict/readyz").code == 200, 15, "recovery")
        assert get(base, "/value").json()["value"] == 42


def test_breaker_open_maps_to_503_with_its_retry_after(pg_server: Any, fault_proxy: Any) -> None:
    db = proxied(
        pg_server,
        fault_proxy,
        connect_timeout=1.0,
        breaker_threshold=2,
        breaker_min_outage=0.1,
        breaker_cooldown=5.0,
        breaker_max_cooldown=5.0,
    )
    with serve(make_app(db)) as base:
        assert get(base, "/value").code == 200
        fault_proxy.refuse()
        fault_proxy.drop_connections()

        def breaker_open() -> bool:
            get(base, "/value")
            return bool(db.stats()["breaker"] == "open")

        wait_for(breaker_open, 20, "the breaker to open", interval=0.1)
        reply = get(base, "/value")
        assert reply.code == 503
        assert reply.json()["error"] == "DatabaseUnavailable"
        assert 1 <= int(reply.headers["retry-after"]) <= 5
        body = health_json(get(base, "/health"))
        assert body["status"] == "warn"
        assert body["checks"]["postgresql:breaker"][0]["status"] == "fail"


def test_error_handlers_for_unknown_and_uncommitted_outcomes(pg_server: Any) -> None:
    db = AsyncDatabase(Settings(url=pg_server.url))
    with serve(make_app(db)) as base:
        unknown = get(base, "/raise/unknown")
        assert unknown.code == 500
        body = unknown.json()
        assert (body["error"], body["txid"]) == ("OutcomeUnknown", 1234)
        assert "may or may not" in body["detail"]
        assert "lost after it was sent" not in unknown.body.decode()  # no exception text
        uncommitted = get(base, "/raise/uncommitted")
        assert (uncommitted.code, uncommitted.headers["retry-after"]) == (503, "0")
        assert uncommitted.json()["error"] == "NotCommitted"


def test_fail_startup_opt_in_refuses_to_start(pg_server: Any, fault_proxy: Any) -> None:
    fault_proxy.refuse()
    db = proxied(pg_server, fault_proxy)
    with serve(make_app(db, startup_timeout=0.5, fail_startup=True), expect_start=False):
        pass


def test_nested_lifespan_keeps_the_apps_own_startup(pg_server: Any) -> None:
    db = AsyncDatabase(Settings(url=pg_server.url))
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def own(app: FastAPI) -> Any:
        events.append("own startup")
        async with pgwarden.fastapi.lifespan(db):
            events.append(f"inside: {db.state.value}")
            yield
        events.append(f"own shutdown: {db.state.value}")

    app = FastAPI(lifespan=own)

    @app.get("/value")
    async def value(d: DatabaseDep) -> dict[str, Any]:
        return {"value": await d.fetchval("SELECT 1"), "same": d is db}

    app.mount("/", pgwarden.asgi.health_app(db))
    with serve(app) as base:
        assert get(base, "/value").json() == {"value": 1, "same": True}
        assert get(base, "/readyz").code == 200
    assert events == ["own startup", "inside: ready", "own shutdown: closed"]


def test_sync_handle_lifespan_dependency_and_health(pg_server: Any) -> None:
    db = Database(Settings(url=pg_server.url))
    app = FastAPI(lifespan=pgwarden.fastapi.lifespan(db))

    @app.get("/value")
    def value(d: SyncDatabaseDep) -> dict[str, Any]:  # a def endpoint: the thread pool
        return {"value": d.fetchval("SELECT 6 * 7"), "same": d is db}

    app.mount("/", pgwarden.asgi.health_app(db))
    with serve(app) as base:
        assert state_of(db) is State.READY  # warmed in a thread at startup
        assert get(base, "/value").json() == {"value": 42, "same": True}
        body = health_json(get(base, "/health"))
        assert body["status"] == "pass"
    assert state_of(db) is State.CLOSED


def test_health_app_wraps_an_app_and_passes_its_lifespan_on(pg_server: Any) -> None:
    db = AsyncDatabase(Settings(url=pg_server.url))
    inner = FastAPI(lifespan=pgwarden.fastapi.lifespan(db))

    @inner.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    app = pgwarden.asgi.health_app(db, app=inner, livez="/healthz/live", health=None)
    with serve(app) as base:
        assert state_of(db) is State.READY  # the lifespan reached the wrapped app
        assert get(base, "/hello").json() == {"hello": "world"}
        assert get(base, "/healthz/live").code == 200
        assert get(base, "/readyz").code == 200
        assert get(base, "/livez").code == 404  # renamed
        assert get(base, "/health").code == 404  # dropped
    assert state_of(db) is State.CLOSED


def _history(base: str) -> list[dict[str, Any]]:
    history = get(base, "/pgwarden/stats.json?history=1").json()["history"]
    assert isinstance(history, list)
    return history


def test_dashboard_mounted_in_fastapi_samples_under_uvicorn(pg_server: Any) -> None:
    """As docs/observability.md shows it: mounted, no lifespan of its own. The sampler
    starts on the first request and keeps sampling with no page polling."""
    db = AsyncDatabase(Settings(url=pg_server.url))
    dashboard = dashboard_app(db)
    app = FastAPI(lifespan=pgwarden.fastapi.lifespan(db))
    app.mount("/pgwarden", dashboard)
    try:
        with serve(app) as base:
            page = get(base, "/pgwarden/")
            assert page.code == 200
            assert b"pgwarden" in page.body
            first = time.time()
            time.sleep(3.5)  # nobody polls
            samples = [s for s in _history(base) if s["ts"] > first + 0.5]
            assert len(samples) >= 2, samples
            assert all(s["stats"]["pool"]["max_size"] == 10 for s in samples)
    finally:
        dashboard.close()


def test_dashboard_samples_from_startup_through_the_lifespan(pg_server: Any) -> None:
    db = AsyncDatabase(Settings(url=pg_server.url))
    dashboard = dashboard_app(db)
    app = FastAPI(lifespan=pgwarden.fastapi.lifespan(db, dashboard=dashboard))
    app.mount("/pgwarden", dashboard)
    try:
        with serve(app) as base:
            started = time.time()
            time.sleep(3.5)  # no request at all reaches the dashboard
            history = _history(base)
            before = [s for s in history if s["ts"] < started + 3.4]
            assert len(before) >= 3, history
            assert dashboard._sampler is not None
            assert not dashboard._sampler.done()
        assert dashboard._sampler is None  # stopped at shutdown
    finally:
        dashboard.close()


# --- WSGI --------------------------------------------------------------------------------------
@contextlib.contextmanager
def wsgi_serve(app: Any) -> Iterator[str]:
    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, name="wsgiref", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_wsgi_health_app_under_wsgiref(pg_server: Any, fault_proxy: Any) -> None:
    fault_proxy.refuse()
    db = Database(
        Settings(url=fault_proxy.url_for(pg_server.url), ready_timeout=1.0, health_interval=0.2)
    )

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"inner " + environ["PATH_INFO"].encode()]

    app = pgwarden.wsgi.health_app(db, app=inner, description="wsgi test")
    try:
        with wsgi_serve(app) as base:
            live = get(base, "/livez")
            assert (live.code, health_json(live)["status"]) == (200, "pass")
            ready = get(base, "/readyz")
            assert (ready.code, health_json(ready)["status"]) == (503, "fail")
            assert get(base, "/other").body == b"inner /other"
            assert get(base, "/readyz", method="DELETE").code == 405

            fault_proxy.heal()
            wait_for(lambda: get(base, "/readyz").code == 200, 15, "WSGI /readyz to pass")
            full = get(base, "/health")
            body = health_json(full)
            assert (full.code, body["status"], body["description"]) == (200, "pass", "wsgi test")
            assert body["checks"]["postgresql:connections"][0]["max"] == 10

            fault_proxy.refuse()
            fault_proxy.drop_connections()
            wait_for(
                lambda: (
                    get(base, "/health").json()["checks"]["postgresql:responseTime"][0]["status"]
                    == "fail"
                ),
                15,
                "the outage",
                interval=0.2,
            )
            warn = get(base, "/readyz")
            assert (warn.code, health_json(warn)["status"]) == (200, "warn")
            assert get(base, "/livez").code == 200
            no_secret(pg_server, ready, full, warn)

            start_draining(db)  # what a server's shutdown hook would call
            drain = get(base, "/readyz")
            assert (drain.code, health_json(drain)["output"][:8]) == (503, "draining")
            db.close(timeout=1)
            assert get(base, "/readyz").code == 503
            assert get(base, "/livez").code == 200  # closed during a shutdown: still alive
    finally:
        db.close(timeout=1)


def test_wsgi_livez_fails_for_a_handle_closed_outside_a_shutdown(pg_server: Any) -> None:
    db = Database(Settings(url=pg_server.url))
    db.ready()
    db.close(timeout=1)
    with wsgi_serve(pgwarden.wsgi.health_app(db)) as base:
        live = get(base, "/livez")
        assert (live.code, health_json(live)["status"]) == (503, "fail")
        assert get(base, "/nothing").code == 404


def test_dependency_without_a_lifespan_falls_back_to_the_registry(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", pg_server.url)

    @contextlib.asynccontextmanager
    async def own(app: FastAPI) -> Any:  # no pgwarden lifespan
        yield
        await pgwarden.connect_async().close()

    app = FastAPI(lifespan=own)

    @app.get("/value")
    async def value(d: DatabaseDep) -> dict[str, Any]:
        return {"value": await d.fetchval("SELECT 1"), "same": d is pgwarden.connect_async()}

    with serve(app) as base:
        assert get(base, "/value").json() == {"value": 1, "same": True}


def test_health_apps_take_a_sqlalchemy_engine_that_never_connected(pg_server: Any) -> None:
    pytest.importorskip("pgwarden.sqlalchemy")
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from pgwarden.sqlalchemy import handle_of

    url = pg_server.url.replace("postgresql://", "postgresql+pgwarden://", 1)
    url += "?pgwarden_application_name=asgi-engine-test"
    aengine = create_async_engine(url)

    @contextlib.asynccontextmanager
    async def own(app: FastAPI) -> Any:  # no pgwarden lifespan: nothing connects first
        yield
        db = handle_of(aengine)
        if isinstance(db, AsyncDatabase):
            await db.close()

    app = FastAPI(lifespan=own)
    app.mount("/", pgwarden.asgi.health_app(aengine))
    with serve(app) as base:
        assert handle_of(aengine) is None
        assert get(base, "/livez").code == 200
        first = get(base, "/readyz")  # connects once in the background: the handle appears
        assert (first.code, health_json(first)["status"]) == (503, "fail")
        wait_for(lambda: get(base, "/readyz").code == 200, 15, "the engine's handle to warm")
        assert health_json(get(base, "/health"))["status"] == "pass"

    engine = create_engine(url.replace("asgi-engine-test", "wsgi-engine-test"))
    try:
        with wsgi_serve(pgwarden.wsgi.health_app(engine)) as base:
            assert handle_of(engine) is None
            ready = get(base, "/readyz")  # connects inline, then answers
            assert (ready.code, health_json(ready)["status"]) == (200, "pass")
    finally:
        sync_db = handle_of(engine)
        if isinstance(sync_db, Database):
            sync_db.close(timeout=1)
        engine.dispose()
