"""The example app's endpoints, under a real uvicorn subprocess and a real PostgreSQL.

Needs pgwarden's pytest plugin (installed with pgwarden: the ``pg_server`` fixture).
Run from the repository root: ``pytest examples/fastapi_app/tests``. Startup without the
database and the SIGTERM drain are tested in tests/integration/test_asgi_example.py.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgwarden.healthcheck import MEDIA_TYPE, problems

APP_DIR = Path(__file__).resolve().parents[1]


def call(
    base: tuple[str, int], method: str, path: str, payload: Any = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(*base, timeout=30)
    try:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        ctype = hdrs.get("content-type", "")
        return resp.status, hdrs, json.loads(raw) if "json" in ctype else raw.decode()
    finally:
        conn.close()


@pytest.fixture(scope="module", params=["app:app", "app_sqlalchemy:app"])
def target(request: pytest.FixtureRequest) -> str:
    """Each version of the example: on pgwarden's handle, and on SQLAlchemy's dialect."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def server(pg_server: Any, target: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The example on a free port, on a database of its own; yields (host, port)."""
    name = f"example_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["DATABASE_URL"] = pg_server.url_for(name)
    log = tmp_path_factory.mktemp("example") / "uvicorn.log"
    cmd = [sys.executable, "-m", "uvicorn", target, "--app-dir", str(APP_DIR)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = ("127.0.0.1", port)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if call(base, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    text = log.read_text()
    assert pg_server.password not in text
    assert '"event": "closed"' in text  # drained by the lifespan at shutdown


def open_account(server: Any, owner: str, balance: int) -> int:
    code, _, body = call(server, "POST", "/accounts", {"owner": owner, "balance": balance})
    assert code == 201, body
    assert body["owner"] == owner
    assert body["balance"] == balance
    account_id: int = body["id"]
    return account_id


def balance(server: Any, account_id: int) -> int:
    code, _, body = call(server, "GET", f"/accounts/{account_id}")
    assert code == 200, body
    value: int = body["balance"]
    return value


def test_accounts_and_a_transfer(server: Any) -> None:
    a = open_account(server, "ada", 100)
    b = open_account(server, "bob", 0)
    code, _, moved = call(server, "POST", "/transfers", {"from_id": a, "to_id": b, "amount": 30})
    assert code == 201, moved
    assert (moved["from_id"], moved["to_id"], moved["amount"]) == (a, b, 30)
    assert (balance(server, a), balance(server, b)) == (70, 30)

    code, _, body = call(server, "POST", "/transfers", {"from_id": a, "to_id": b, "amount": 71})
    assert (code, body["detail"]) == (409, "insufficient funds")
    assert (balance(server, a), balance(server, b)) == (70, 30)  # rolled back, not retried
    assert call(server, "POST", "/transfers", {"from_id": a, "to_id": 10**9, "amount": 1})[0] == 404
    assert call(server, "POST", "/transfers", {"from_id": a, "to_id": a, "amount": 1})[0] == 422
    assert call(server, "GET", "/accounts/999999999")[0] == 404
    assert call(server, "POST", "/accounts", {"owner": "", "balance": 1})[0] == 422


def test_concurrent_transfers_conserve_money(server: Any) -> None:
    accounts = [open_account(server, f"owner-{i}", 1000) for i in range(4)]
    rng = random.Random(7)
    moves = [[*rng.sample(accounts, 2), rng.randint(1, 400)] for _ in range(60)]

    def move(m: list[int]) -> tuple[int, Any]:
        code, _, body = call(
            server, "POST", "/transfers", {"from_id": m[0], "to_id": m[1], "amount": m[2]}
        )
        return code, body

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(move, moves))
    refused = [body for code, body in results if code != 201]
    assert all(body == {"detail": "insufficient funds"} for body in refused), refused
    moved = sum(m[2] for m, (code, _) in zip(moves, results, strict=True) if code == 201)
    assert moved > 0
    assert sum(balance(server, a) for a in accounts) == 4000  # nothing lost or doubled


def test_health_endpoints_speak_health_json(server: Any) -> None:
    for path in ("/livez", "/readyz", "/health"):
        code, headers, body = call(server, "GET", path)
        assert headers["content-type"] == MEDIA_TYPE
        assert problems(body, code) == [], body
        assert (code, body["status"]) == (200, "pass"), body
    _, _, full = call(server, "GET", "/health")
    conns = full["checks"]["postgresql:connections"][0]
    assert conns["observedUnit"] == "connections"
    assert conns["max"] == 10
    assert full["checks"]["postgresql:responseTime"][0]["observedUnit"] == "ms"


def test_dashboard_samples_without_being_polled(server: Any, target: str) -> None:
    if target != "app:app":
        # Only app.py mounts the dashboard; the SQLAlchemy version has none.
        code, _, _ = call(server, "GET", "/pgwarden/stats.json")
        assert code == 404
        return
    time.sleep(2.5)  # the lifespan started the sampler: nobody polls meanwhile
    code, _, body = call(server, "GET", "/pgwarden/stats.json?history=1")
    assert code == 200
    assert len(body["history"]) >= 2, body["history"]
    assert body["stats"]["counters"]["queries"] > 0


def test_health_routes_stay_out_of_the_openapi_schema(server: Any) -> None:
    code, _, schema = call(server, "GET", "/openapi.json")
    assert code == 200
    assert "/accounts" in schema["paths"]
    assert "/transfers" in schema["paths"]
    assert not any(p in schema["paths"] for p in ("/livez", "/readyz", "/health"))
