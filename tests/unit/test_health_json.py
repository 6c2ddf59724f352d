"""The pure health+json builder (`pgwarden.healthcheck`), its validator, and the error
mapping (`pgwarden.asgi.error_response`): no database, no server, no framework."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from psycopg.errors import DeadlockDetected, SerializationFailure

from pgwarden import (
    AmbiguousCommitError,
    AsyncDatabase,
    DatabaseUnavailable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
    Settings,
)
from pgwarden import healthcheck as hc
from pgwarden.asgi import Lifespan, error_response, lifespan

SECRET = "hunter2-Xq9"


def report(ok: bool = True, **pool: int) -> dict[str, Any]:
    gauges = {"size": 2, "idle": 1, "in_use": 1, "waiting": 0, "max_size": 10}
    gauges.update(pool)
    return {
        "ok": ok,
        "state": "ready",
        "breaker": "closed",
        "latency_ms": 1.234,
        "error": None if ok else "OperationalError: connection refused",
        "pool": gauges,
        "pgbouncer": False,
    }


READY = hc.Probe(state="ready", warmed=True, report=report())


def assert_valid(answer: hc.HealthResponse) -> dict[str, Any]:
    body = json.loads(answer.encode())
    assert hc.problems(body, answer.code) == []
    assert dict(answer.headers)["content-type"] == "application/health+json"
    return body  # type: ignore[no-any-return]


# --- the verdict ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probe", "fail_on_outage", "status", "code"),
    [
        pytest.param(READY, False, "pass", 200, id="ready"),
        pytest.param(hc.Probe(state="new"), False, "fail", 503, id="before-warmup"),
        pytest.param(hc.Probe(state="warming"), False, "fail", 503, id="warming"),
        pytest.param(
            hc.Probe(state="new", report=report(ok=False)), False, "fail", 503, id="warmup-failed"
        ),
        pytest.param(
            hc.Probe(state="open", breaker="open", report=report(ok=False)),
            False,
            "fail",
            503,
            id="breaker-open-never-warmed",
        ),
        pytest.param(
            hc.Probe(state="ready", warmed=True, report=report(ok=False)),
            False,
            "warn",
            200,
            id="outage-warns",
        ),
        pytest.param(
            hc.Probe(state="ready", warmed=True, report=report(ok=False)),
            True,
            "fail",
            503,
            id="outage-fails-on-opt-in",
        ),
        pytest.param(
            hc.Probe(state="open", breaker="open", warmed=True, report=report(ok=False)),
            False,
            "warn",
            200,
            id="breaker-open-warns",
        ),
        pytest.param(
            hc.Probe(state="open", breaker="open", warmed=True, report=report(ok=False)),
            True,
            "fail",
            503,
            id="breaker-open-fails-on-opt-in",
        ),
        pytest.param(
            hc.Probe(state="degraded", warmed=True, report=report()),
            True,
            "warn",
            200,
            id="degraded-serves",
        ),
        pytest.param(
            hc.Probe(state="ready", warmed=True, draining=True, report=report()),
            False,
            "fail",
            503,
            id="sigterm",
        ),
        pytest.param(hc.Probe(state="closing", warmed=True), False, "fail", 503, id="closing"),
        pytest.param(hc.Probe(state="closed", warmed=True), False, "fail", 503, id="closed"),
    ],
)
def test_readyz_and_health_verdicts(
    probe: hc.Probe, fail_on_outage: bool, status: str, code: int
) -> None:
    for answer in (
        hc.readyz(probe, fail_on_outage=fail_on_outage),
        hc.health(probe, fail_on_outage=fail_on_outage),
    ):
        body = assert_valid(answer)
        assert (answer.status, answer.code, body["status"]) == (status, code, status)
        assert ("output" in body) == (status != "pass")


def test_outage_output_says_why_and_that_it_stays_ready() -> None:
    body = hc.readyz(hc.Probe(state="ready", warmed=True, report=report(ok=False))).body
    assert body["output"].startswith("database unreachable")
    assert "still ready" in body["output"]
    draining = hc.readyz(hc.Probe(state="ready", warmed=True, draining=True)).body
    assert draining["output"].startswith("draining")


@pytest.mark.parametrize(
    ("probe", "status"),
    [
        pytest.param(READY, "pass", id="ready"),
        pytest.param(hc.Probe(state="new"), "pass", id="before-warmup"),
        pytest.param(hc.Probe(state="open", breaker="open"), "pass", id="database-down"),
        pytest.param(hc.Probe(state="closing"), "pass", id="closing"),
        pytest.param(hc.Probe(state="closed", draining=True), "pass", id="closed-at-shutdown"),
        pytest.param(hc.Probe(state="closed"), "fail", id="closed-outside-shutdown"),
    ],
)
def test_livez_ignores_the_database(probe: hc.Probe, status: str) -> None:
    answer = hc.livez(probe)
    body = assert_valid(answer)
    assert body["status"] == status
    assert answer.code == (200 if status == "pass" else 503)
    assert "checks" not in body  # nothing about the database


# --- the /health body -------------------------------------------------------------------------
def test_health_reports_response_time_connections_breaker_and_lifecycle() -> None:
    at = 1_700_000_000.25
    answer = hc.health(
        hc.Probe(state="ready", warmed=True, report=report(in_use=3, idle=1, size=4)), now=at
    )
    body = assert_valid(answer)
    checks = body["checks"]
    assert set(checks) == {
        "postgresql:responseTime",
        "postgresql:connections",
        "postgresql:utilization",
        "postgresql:lifecycle",
        "postgresql:breaker",
    }
    for entries in checks.values():
        assert len(entries) == 1
        assert entries[0]["time"] == "2023-11-14T22:13:20.250Z"
    rt = checks["postgresql:responseTime"][0]
    assert rt == {
        "componentType": "datastore",
        "observedValue": 1.234,
        "observedUnit": "ms",
        "status": "pass",
        "time": "2023-11-14T22:13:20.250Z",
    }
    conns = checks["postgresql:connections"][0]
    assert (conns["observedValue"], conns["observedUnit"], conns["max"]) == (3, "connections", 10)
    assert (conns["idle"], conns["waiting"], conns["status"]) == (1, 0, "pass")
    util = checks["postgresql:utilization"][0]
    assert (util["observedValue"], util["observedUnit"]) == (30.0, "percent")
    assert checks["postgresql:lifecycle"][0]["observedValue"] == "ready"
    assert checks["postgresql:breaker"][0]["observedValue"] == "closed"


def test_health_component_statuses_tell_the_truth_under_a_warn() -> None:
    down = hc.Probe(
        state="open", breaker="open", warmed=True, report=report(ok=False, in_use=10, waiting=4)
    )
    body = assert_valid(hc.health(down))
    assert body["status"] == "warn"  # the service: still ready
    checks = body["checks"]
    assert checks["postgresql:responseTime"][0]["status"] == "fail"  # the database: not
    assert "connection refused" in checks["postgresql:responseTime"][0]["output"]
    assert checks["postgresql:connections"][0]["status"] == "warn"
    assert "4 caller(s) waiting" in checks["postgresql:connections"][0]["output"]
    assert checks["postgresql:utilization"][0]["observedValue"] == 100.0
    assert checks["postgresql:breaker"][0]["status"] == "fail"
    assert checks["postgresql:lifecycle"][0]["status"] == "fail"


def test_health_without_a_report_is_still_valid() -> None:
    body = assert_valid(hc.health(hc.Probe(state="closed", draining=True)))
    assert body["status"] == "fail"
    assert body["checks"]["postgresql:responseTime"][0]["observedValue"] == 0.0


def test_no_secret_reaches_any_body() -> None:
    leaky = report(ok=False)
    leaky["error"] = (
        f"NotReady: postgresql://app:{SECRET}@db:5432/orders: password={SECRET} echoed {SECRET}"
    )
    probe = hc.Probe(state="ready", warmed=True, report=leaky, secrets=(SECRET,))
    answers = [
        hc.livez(probe),
        hc.readyz(probe),
        hc.readyz(probe, fail_on_outage=True),
        hc.health(probe, description=f"orders on {SECRET}", service_id=SECRET),
    ]
    for answer in answers:
        text = answer.encode().decode()
        assert SECRET not in text
    health = json.loads(answers[-1].encode())
    assert (
        "postgresql://app:***@db:5432/orders"
        in health["checks"]["postgresql:responseTime"][0]["output"]
    )


def test_probe_reads_a_handle_without_io_and_masks_its_password() -> None:
    db = AsyncDatabase(Settings(url=f"postgresql://app:{SECRET}@127.0.0.1:1/orders"))
    p = hc.probe(db)
    assert (p.state, p.breaker, p.warmed, p.draining, p.report) == (
        "new",
        "closed",
        False,
        False,
        None,
    )
    assert p.secrets == (SECRET,)
    assert not hc.is_draining(db)
    hc.start_draining(db)
    assert hc.probe(db).draining
    assert hc.is_draining(db)
    assert hc.readyz(hc.probe(db)).status == "fail"
    hc.stop_draining(db)
    assert not hc.is_draining(db)
    assert SECRET not in repr(p)


def test_headers_give_a_freshness_lifetime() -> None:
    headers = dict(hc.readyz(READY).headers)
    assert headers == {
        "content-type": "application/health+json",
        "cache-control": "max-age=0, must-revalidate",
    }


# --- the validator ----------------------------------------------------------------------------
def test_validator_accepts_the_drafts_own_example_shape() -> None:
    body = {
        "status": "pass",
        "version": "1",
        "releaseId": "1.2.2",
        "notes": [""],
        "serviceId": "f03e522f-1f44-4062-9b55-9587f91c9c41",
        "description": "health of authz service",
        "checks": {
            "cassandra:responseTime": [
                {
                    "componentId": "dfd6cf2b-1b6e-4412-a0b8-f6f7797a60d2",
                    "componentType": "datastore",
                    "observedValue": 250,
                    "observedUnit": "ms",
                    "status": "pass",
                    "time": "2018-01-17T03:36:48Z",
                }
            ],
            "uptime": [
                {
                    "componentType": "system",
                    "observedValue": 1209600.245,
                    "observedUnit": "s",
                    "status": "pass",
                    "time": "2018-01-17T03:36:48Z",
                }
            ],
        },
        "links": {"about": "http://api.example.com/about/authz"},
    }
    assert hc.problems(body, 200) == []
    assert hc.problems({"status": "UP"}, 204) == []  # aliases, any case


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        pytest.param([], None, "not a JSON object", id="not-an-object"),
        pytest.param({}, None, "status is required", id="no-status"),
        pytest.param({"status": "green"}, None, "must be pass, warn or fail", id="bad-status"),
        pytest.param({"status": "pass"}, 503, "needs HTTP 2xx-3xx", id="pass-with-503"),
        pytest.param({"status": "warn"}, 500, "needs HTTP 2xx-3xx", id="warn-with-500"),
        pytest.param({"status": "fail"}, 200, "needs HTTP 4xx-5xx", id="fail-with-200"),
        pytest.param({"status": "pass", "output": "x"}, 200, "omitted", id="output-on-pass"),
        pytest.param({"status": "pass", "version": 1}, 200, "version must", id="version-type"),
        pytest.param({"status": "pass", "checks": []}, 200, "checks must", id="checks-type"),
        pytest.param(
            {"status": "pass", "checks": {"db:responseTime": {"status": "pass"}}},
            200,
            "must be an array",
            id="check-not-array",
        ),
        pytest.param(
            {"status": "pass", "checks": {"db:x": [{}]}}, 200, "non-empty", id="empty-entry"
        ),
        pytest.param(
            {"status": "pass", "checks": {"db:x": [{"status": "nope"}]}},
            200,
            "must be pass",
            id="entry-status",
        ),
        pytest.param(
            {"status": "pass", "checks": {"db:x": [{"time": "yesterday"}]}},
            200,
            "ISO 8601",
            id="entry-time",
        ),
        pytest.param(
            {"status": "pass", "checks": {"db:x": [{"observedValue": 3}]}},
            200,
            "observedUnit",
            id="unit-missing",
        ),
        pytest.param(
            {"status": "pass", "checks": {":x": [{"status": "pass"}]}},
            200,
            "empty component",
            id="empty-component",
        ),
    ],
)
def test_validator_rejects(body: Any, code: int | None, needle: str) -> None:
    found = hc.problems(body, code)
    assert any(needle in p for p in found), found


# --- errors to HTTP ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "code", "retry_after"),
    [
        pytest.param(DatabaseUnavailable("open", retry_after=2.2), 503, "3", id="breaker"),
        pytest.param(DatabaseUnavailable("open", retry_after=0.01), 503, "1", id="breaker-soon"),
        pytest.param(DatabaseUnavailable("open"), 503, "1", id="breaker-no-hint"),
        pytest.param(NotReady("not ready"), 503, "1", id="not-ready"),
        pytest.param(DeadlineExceeded("late"), 503, "1", id="deadline"),
        pytest.param(HandleClosed("closed"), 503, "1", id="closed"),
        pytest.param(NotCommitted("lost"), 503, "0", id="not-committed"),
        pytest.param(OutcomeUnknown("maybe", txid=77), 500, None, id="outcome-unknown"),
        pytest.param(AmbiguousCommitError("maybe"), 500, None, id="ambiguous-commit"),
        pytest.param(SerializationFailure("conflict"), 409, "0", id="serialization-failure"),
        pytest.param(DeadlockDetected("deadlock"), 409, "0", id="deadlock"),
    ],
)
def test_error_response(exc: Exception, code: int, retry_after: str | None) -> None:
    exc.args = (f"{exc.args[0]} at postgresql://app:{SECRET}@10.0.0.5/orders",)
    answer = error_response(exc)
    assert answer is not None
    status, headers, body = answer
    assert status == code
    assert headers.get("retry-after") == retry_after
    assert body["status"] == code
    assert body["error"] == type(exc).__name__
    assert {"type", "title", "detail"} <= set(body)
    assert SECRET not in json.dumps(body)
    assert "10.0.0.5" not in json.dumps(body)
    if isinstance(exc, OutcomeUnknown):
        assert "may or may not" in body["detail"]
        assert body.get("txid") == exc.txid or exc.txid is None


def test_error_response_leaves_other_errors_alone() -> None:
    assert error_response(ValueError("x")) is None


# --- the lifespan object and imports ----------------------------------------------------------
def test_lifespan_is_its_own_lifespan_callable() -> None:
    db = AsyncDatabase(Settings(url="postgresql://u@127.0.0.1:1/x"))
    span = lifespan(db)
    assert isinstance(span, Lifespan)
    assert span(object()) is span
    with pytest.raises(ValueError, match=">= 0"):
        lifespan(db, drain_delay=-1)


def test_imports_load_no_framework() -> None:
    code = (
        "import sys\n"
        "import pgwarden\n"
        "frameworks = ('fastapi', 'starlette', 'pgwarden.asgi', 'pgwarden.healthcheck')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in frameworks[:2]"
        " or m in frameworks[2:]))\n"
        "import pgwarden.asgi, pgwarden.wsgi, pgwarden.healthcheck\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]
