"""examples/fastapi_app under a real ``uvicorn`` subprocess: startup without the database,
SIGTERM drain with a slow request in flight, and an outage. The example's own endpoint
tests live in examples/fastapi_app/tests/."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .test_asgi import Reply, UvicornProcess, get, health_json, post, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app"

pytestmark = pytest.mark.skipif(
    not (EXAMPLE / "app.py").exists(), reason="examples/fastapi_app is not in this checkout"
)


@pytest.fixture
def example_db(pg_server: Any) -> Iterator[str]:
    """A fresh database for one run of the example; its URL."""
    name = f"example_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url_for(name)
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["app:app", "app_sqlalchemy:app"])
def example(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``start(url, **env)`` runs the example (on pgwarden's handle, or on SQLAlchemy's
    ``postgresql+pgwarden`` dialect) on a free port; stopped at test end."""
    started: list[UvicornProcess] = []
    target: str = request.param

    def start(url: str, **env: str) -> UvicornProcess:
        server = UvicornProcess(
            target,
            app_dir=EXAMPLE,
            env={"DATABASE_URL": url, **env},
            log=tmp_path / f"uvicorn-{len(started)}.log",
        )
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def test_readyz_is_503_until_the_database_is_reachable_then_200(
    example: Any, example_db: str, fault_proxy_factory: Any, pg_server: Any
) -> None:
    proxy = fault_proxy_factory(pg_server.host, pg_server.port)
    proxy.refuse()
    server = example(
        proxy.url_for(example_db),
        APP_STARTUP_TIMEOUT="0.5",
        PGWARDEN_READY_TIMEOUT="1",
        PGWARDEN_HEALTH_INTERVAL="0.2",
    )
    base = server.base
    assert '"event": "startup_not_ready"' in server.log()
    live = get(base, "/livez")
    assert (live.code, health_json(live)["status"]) == (200, "pass")
    ready = get(base, "/readyz")
    body = health_json(ready)
    assert (ready.code, body["status"]) == (503, "fail")
    assert body["checks"]["postgresql:lifecycle"][0]["observedValue"] in ("new", "warming")
    full = get(base, "/health")
    assert (full.code, health_json(full)["status"]) == (503, "fail")
    for reply in (ready, full):
        assert pg_server.password not in reply.body.decode()

    proxy.heal()
    wait_for(lambda: get(base, "/readyz").code == 200, 20, "/readyz to pass after the heal")
    body = health_json(get(base, "/health"))
    assert body["status"] == "pass"
    assert body["checks"]["postgresql:lifecycle"][0]["observedValue"] == "ready"


def test_sigterm_fails_readyz_while_a_slow_request_finishes(example: Any, example_db: str) -> None:
    server = example(example_db, APP_DRAIN_DELAY="2")
    base = server.base
    assert health_json(get(base, "/readyz"))["status"] == "pass"
    account = post(base, "/accounts", {"owner": "ada", "balance": 100})
    assert account.code == 201, account.body
    account_id = account.json()["id"]

    slow: list[Reply] = []
    worker = threading.Thread(
        target=lambda: slow.append(get(base, "/slow?seconds=4", timeout=30)), daemon=True
    )
    worker.start()
    time.sleep(0.5)  # the slow request is in flight
    sent = time.monotonic()
    server.signal(signal.SIGTERM)

    # During the drain delay: not ready, still alive, still serving.
    wait_for(lambda: get(base, "/readyz").code == 503, 1.5, "/readyz to fail after SIGTERM")
    ready = get(base, "/readyz")
    body = health_json(ready)
    assert (ready.code, body["status"]) == (503, "fail")
    assert body["output"].startswith("draining")
    live = get(base, "/livez")
    assert (live.code, health_json(live)["status"]) == (200, "pass")
    assert get(base, f"/accounts/{account_id}").json()["balance"] == 100
    assert time.monotonic() - sent < 2.0, "these answers must fit in the drain delay"

    # Then the server stops listening, lets the slow request finish, and drains the handle.
    worker.join(30)
    assert len(slow) == 1, "the slow request got no answer"
    assert slow[0].code == 200, slow
    assert slow[0].json() == {"slept": 4.0}
    code = server.wait(30)
    assert code in (0, -signal.SIGTERM), code
    log = server.log()
    assert '"event": "draining"' in log, log  # pgwarden.asgi saw SIGTERM first
    assert '"event": "closed", "cut_off": 0' in log, log  # then drained, nothing cut off
    assert log.index('"event": "draining"') < log.index("Shutting down"), log
    assert time.monotonic() - sent >= 2.0  # it kept serving for the whole delay


def test_livez_stays_200_and_requests_fail_fast_while_the_database_is_down(
    example: Any, example_db: str, fault_proxy_factory: Any, pg_server: Any
) -> None:
    proxy = fault_proxy_factory(pg_server.host, pg_server.port)
    server = example(proxy.url_for(example_db), PGWARDEN_HEALTH_INTERVAL="0.2")
    base = server.base
    assert get(base, "/readyz").code == 200
    created = post(base, "/accounts", {"owner": "bob", "balance": 5})
    assert created.code == 201

    proxy.refuse()
    proxy.drop_connections()
    failed = get(base, f"/accounts/{created.json()['id']}")
    assert failed.code == 503, failed.body
    assert failed.headers["retry-after"].isdigit()
    assert failed.json()["error"] in ("DeadlineExceeded", "DatabaseUnavailable", "AcquireTimeout")
    for _ in range(10):
        live = get(base, "/livez")
        assert (live.code, health_json(live)["status"]) == (200, "pass")
    ready = get(base, "/readyz")
    assert (ready.code, health_json(ready)["status"]) == (200, "warn")  # the default

    proxy.heal()
    wait_for(lambda: health_json(get(base, "/readyz"))["status"] == "pass", 20, "recovery", 0.2)
    assert get(base, f"/accounts/{created.json()['id']}").json()["owner"] == "bob"
