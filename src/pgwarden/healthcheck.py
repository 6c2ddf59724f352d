"""Health responses for probes and people, in the ``application/health+json`` format.

Pure: no I/O, no framework, no asyncio. The ASGI and WSGI apps (`pgwarden.asgi`,
`pgwarden.wsgi`) read a handle into a `Probe` and turn it into a `HealthResponse`
here; anything else (a Django view, a Lambda handler) can do the same.

The format is the IETF draft *Health Check Response Format for HTTP APIs*
(draft-inadarei-api-health-check-06, expired; the de facto shape of health+json):
a required ``status`` of ``pass``, ``warn`` or ``fail``; HTTP 2xx for ``pass``
and ``warn`` and 4xx/5xx for ``fail``; ``output`` only when not ``pass``; and
``checks``, an object whose keys are ``"component:measurement"`` and whose values
are arrays of objects (``componentType``, ``observedValue``, ``observedUnit``,
``status``, ``time``, ``output``).

The three endpoints follow Kubernetes' split (``/livez``, ``/readyz``):

=========== ======================================================= ==============
endpoint    ``fail`` (HTTP 503) when                                touches the DB
=========== ======================================================= ==============
``/livez``  the handle is CLOSED outside a shutdown (a dead handle  never
            the process cannot recover from: restart it)
``/readyz`` the process is draining (SIGTERM seen, CLOSING, CLOSED); one cached,
            no warmup has succeeded yet; with ``fail_on_outage``,   bounded
            the database is unreachable                             ``health()``
``/health`` as ``/readyz``, with every measurement                  the same
=========== ======================================================= ==============

A database outage after warmup reports ``warn`` (HTTP 200) by default: every pod
shares the one database, so failing readiness on an outage takes *all* of them out
of the load balancer at once, and requests would then fail at the balancer instead
of getting a fast 503 with ``Retry-After`` from pgwarden. ``fail_on_outage=True``
opts in to ``fail`` for a fleet that can route elsewhere (another region).

Nothing here adds a URL or a password: the report's ``error`` is already redacted by
``health()``, and every ``output`` string is redacted again with the given secrets.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden._redact import redact

__all__ = [
    "FAIL",
    "MEDIA_TYPE",
    "PASS",
    "WARN",
    "HealthResponse",
    "Probe",
    "handle_behind",
    "health",
    "is_draining",
    "livez",
    "probe",
    "problems",
    "readyz",
    "start_draining",
    "stop_draining",
]

MEDIA_TYPE = "application/health+json"
PASS = "pass"  # noqa: S105 - the health+json status, not a password
WARN = "warn"
FAIL = "fail"

#: HTTP status for each top-level status (the draft: 2xx-3xx for pass and warn, 4xx-5xx
#: for fail; 503 is what load balancers and Kubernetes read as "not now").
STATUS_CODE: Mapping[str, int] = {PASS: 200, WARN: 200, FAIL: 503}

#: Lifecycle states (``State.value``) in which the handle serves queries.
SERVING = frozenset({"ready", "degraded"})
#: Lifecycle states of a handle that is shutting down or shut down.
DRAINING = frozenset({"closing", "closed"})

_COMPONENT = "postgresql"
_LIFECYCLE_STATUS = {
    "ready": PASS,
    "degraded": WARN,
    "new": WARN,
    "warming": WARN,
    "open": FAIL,
    "closing": FAIL,
    "closed": FAIL,
}
_BREAKER_STATUS = {"closed": PASS, "half_open": WARN, "open": FAIL}
_LIFECYCLE_OUTPUT = {
    "degraded": "serving at reduced capacity after a fault",
    "new": "not warmed up yet",
    "warming": "warming up",
    "open": "circuit breaker open: calls fail fast",
    "closing": "draining: refusing new work",
    "closed": "closed",
}


@dataclass(frozen=True)
class Probe:
    """What a health endpoint knows about one handle at one moment.

    *state* and *breaker* are the lifecycle and breaker values (``"ready"``,
    ``"closed"``...); *warmed*: a warmup (or a breaker probe) has succeeded since the
    handle was made; *draining*: the process said it is shutting down
    (`start_draining`; a CLOSING or CLOSED *state* drains too); *report*:
    ``db.health()``, or None when it was not consulted (``/livez``, and ``/readyz``
    while draining); *secrets*: masked in every ``output``.
    """

    state: str
    breaker: str = "closed"
    warmed: bool = False
    draining: bool = False
    report: Mapping[str, Any] | None = None
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class HealthResponse:
    """An HTTP answer: *status* (pass/warn/fail), its HTTP *code*, the JSON *body*."""

    status: str
    code: int
    body: dict[str, Any]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """``Content-Type: application/health+json`` and a zero freshness lifetime: the
        draft asks for one, and readiness can change at any moment (a SIGTERM); the
        handle caches its own round trip for ``health_interval``, so polling is cheap."""
        return [
            ("content-type", MEDIA_TYPE),
            ("cache-control", "max-age=0, must-revalidate"),
        ]

    def encode(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=True).encode()


# --- reading a handle -------------------------------------------------------------------------
# Which handles are draining: set by the lifespan on SIGTERM and at shutdown, read by the
# health apps. Keyed weakly by the handle object, so a dropped handle leaves nothing behind.
_draining: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def start_draining(db: object) -> None:
    """Mark *db*'s process as shutting down: ``/readyz`` fails from now on, before
    ``db.close()`` begins. The lifespan calls it on SIGTERM; a server without one (a
    WSGI server's shutdown hook) can call it itself."""
    _draining[db] = True


def stop_draining(db: object) -> None:
    """Undo `start_draining` (a lifespan that starts again in the same process)."""
    _draining.pop(db, None)


def is_draining(db: object) -> bool:
    """Has `start_draining` been called for *db*, or is it CLOSING or CLOSED?"""
    return bool(_draining.get(db)) or _value(getattr(db, "state", None)) in DRAINING


def _flagged(db: object) -> bool:
    return bool(_draining.get(db))


def handle_behind(target: Any) -> Any:
    """*target* itself, or the pgwarden handle behind a ``postgresql+pgwarden`` SQLAlchemy
    engine (sync or async; None until the engine's first connection attempt). Duck-typed:
    SQLAlchemy is not imported."""
    dialect = getattr(getattr(target, "sync_engine", target), "dialect", None)
    if dialect is None or not hasattr(dialect, "pgwarden_handle"):
        return target
    return dialect.pgwarden_handle


def probe(db: Any, report: Mapping[str, Any] | None = None) -> Probe:
    """Read *db* (an ``AsyncDatabase`` or ``Database``) into a `Probe`, touching only
    memory: its lifecycle state and ``stats()``. Pass ``db.health()`` as *report*."""
    stats = db.stats()
    state = _value(stats.get("state", getattr(db, "state", "new")))
    warmed = stats.get("warmup_seconds") is not None or state in SERVING
    settings = getattr(db, "settings", None)
    url = getattr(settings, "url", None)
    secrets: tuple[str, ...] = ()
    if isinstance(url, str):
        from pgwarden._handle.config import password_of

        password = password_of(url)
        secrets = (password,) if password else ()
    return Probe(
        state=state,
        breaker=_value(stats.get("breaker", "closed")),
        warmed=warmed,
        draining=_flagged(db),
        report=report,
        secrets=secrets,
    )


def _value(x: object) -> str:
    return str(getattr(x, "value", x))


# --- building the answers ---------------------------------------------------------------------
def livez(p: Probe) -> HealthResponse:
    """Liveness: is this process worth keeping? Never consults the database (a database
    outage must not restart every pod). ``fail`` only for a handle CLOSED outside a
    shutdown, which nothing in the process will reopen."""
    if p.state == "closed" and not p.draining:
        return _response(FAIL, {"output": "the database handle was closed outside a shutdown"})
    return _response(PASS, {})


def readyz(p: Probe, *, fail_on_outage: bool = False, now: float | None = None) -> HealthResponse:
    """Readiness: should the load balancer send this process traffic now?"""
    at = _now() if now is None else now
    status, output = _overall(p, fail_on_outage)
    body: dict[str, Any] = {}
    if output:
        body["output"] = output
    body["checks"] = {
        f"{_COMPONENT}:lifecycle": [_lifecycle_check(p, at)],
    }
    return _response(status, body)


def health(
    p: Probe,
    *,
    fail_on_outage: bool = False,
    description: str | None = None,
    service_id: str | None = None,
    now: float | None = None,
) -> HealthResponse:
    """The full report: the readiness verdict plus the database's response time,
    connections in use out of the maximum, utilization, lifecycle and breaker state."""
    at = _now() if now is None else now
    status, output = _overall(p, fail_on_outage)
    report = p.report or {}
    pool = report.get("pool") if isinstance(report.get("pool"), Mapping) else {}
    assert isinstance(pool, Mapping)
    ok = bool(report.get("ok"))
    error = report.get("error")

    response_time: dict[str, Any] = {
        "componentType": "datastore",
        "observedValue": _number(report.get("latency_ms")),
        "observedUnit": "ms",
        "status": PASS if ok else FAIL,
        "time": _iso(at),
    }
    if not ok:
        response_time["output"] = _redact(str(error) if error else "no health report", p.secrets)

    in_use = int(_number(pool.get("in_use")))
    max_size = int(_number(pool.get("max_size")))
    waiting = int(_number(pool.get("waiting")))
    pool_status = WARN if waiting > 0 else PASS
    connections: dict[str, Any] = {
        "componentType": "datastore",
        "observedValue": in_use,
        "observedUnit": "connections",
        "status": pool_status,
        "time": _iso(at),
        # Additional keys (the draft's section 4.10): the rest of "in use out of max".
        "max": max_size,
        "idle": int(_number(pool.get("idle"))),
        "waiting": waiting,
    }
    utilization: dict[str, Any] = {
        "componentType": "datastore",
        "observedValue": round(100.0 * in_use / max_size, 1) if max_size > 0 else 0.0,
        "observedUnit": "percent",
        "status": pool_status,
        "time": _iso(at),
    }
    if pool_status != PASS:
        waits = f"{waiting} caller(s) waiting for a pooled connection"
        connections["output"] = utilization["output"] = waits

    breaker_status = _BREAKER_STATUS.get(p.breaker, WARN)
    breaker: dict[str, Any] = {
        "componentType": "component",
        "observedValue": p.breaker,
        "status": breaker_status,
        "time": _iso(at),
    }
    if breaker_status != PASS:
        breaker["output"] = f"circuit breaker {p.breaker}: calls fail fast until a probe succeeds"

    body: dict[str, Any] = {}
    if description:
        body["description"] = _redact(description, p.secrets)
    if service_id:
        body["serviceId"] = _redact(service_id, p.secrets)
    if output:
        body["output"] = output
    body["checks"] = {
        f"{_COMPONENT}:responseTime": [response_time],
        f"{_COMPONENT}:connections": [connections],
        f"{_COMPONENT}:utilization": [utilization],
        f"{_COMPONENT}:lifecycle": [_lifecycle_check(p, at)],
        f"{_COMPONENT}:breaker": [breaker],
    }
    return _response(status, body)


def _overall(p: Probe, fail_on_outage: bool) -> tuple[str, str]:
    """The verdict shared by ``/readyz`` and ``/health``: (status, output)."""
    if p.draining or p.state in DRAINING:
        return FAIL, "draining: the process is shutting down"
    if not p.warmed:
        return FAIL, "not ready: no database round trip has succeeded yet (warming up)"
    report = p.report
    down = p.state == "open" or (report is not None and not report.get("ok"))
    if down:
        why = "database unreachable"
        if p.state == "open":
            why += " (circuit breaker open)"
        if fail_on_outage:
            return FAIL, why
        return WARN, why + "; still ready: requests get a fast 503 until it is back"
    if p.state == "degraded":
        return WARN, "degraded: serving at reduced capacity after a fault"
    return PASS, ""


def _lifecycle_check(p: Probe, at: float) -> dict[str, Any]:
    status = _LIFECYCLE_STATUS.get(p.state, WARN)
    check: dict[str, Any] = {
        "componentType": "component",
        "observedValue": p.state,
        "status": status,
        "time": _iso(at),
    }
    if status != PASS:
        check["output"] = _LIFECYCLE_OUTPUT.get(p.state, p.state)
    return check


def _response(status: str, body: dict[str, Any]) -> HealthResponse:
    return HealthResponse(status, STATUS_CODE[status], {"status": status, **body})


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    return redact(text, *secrets)


def _number(x: object) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else 0.0


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    """RFC 3339 / ISO 8601 UTC with milliseconds, e.g. ``2026-01-17T03:36:48.123Z``."""
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


# --- checking a body against the draft ----------------------------------------------------------
_STATUSES = {
    "pass": PASS,
    "ok": PASS,
    "up": PASS,
    "warn": WARN,
    "fail": FAIL,
    "error": FAIL,
    "down": FAIL,
}
_ISO8601 = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE
)
_TOP_STRINGS = ("version", "releaseId", "output", "serviceId", "description")
_CHECK_STRINGS = ("componentId", "componentType", "observedUnit", "time", "output")


def problems(body: object, code: int | None = None) -> list[str]:
    """What in *body* (a decoded health+json document) breaks draft-inadarei-api-health-
    check-06, and, given the HTTP *code*, the status/code rule; ``[]`` when nothing does.

    Checked: the required ``status`` (pass/warn/fail or their aliases, any case); pass
    and warn with 2xx-3xx, fail with 4xx-5xx; the types of the optional top-level fields;
    ``output`` omitted for pass; ``checks`` an object of arrays of non-empty objects whose
    keys are ``"component:measurement"`` with no colon in the component name; each
    entry's field types, its ``status``, ``time`` in ISO 8601, ``observedUnit`` present
    with ``observedValue``, and ``output``/``affectedEndpoints`` omitted for pass. For
    users testing their own health endpoints as much as for pgwarden's tests.
    """
    out: list[str] = []
    if not isinstance(body, Mapping):
        return [f"the body is a {type(body).__name__}, not a JSON object"]
    status = _status(body.get("status"), "status", out, required=True)
    if code is not None and status is not None:
        if status in (PASS, WARN) and not 200 <= code < 400:
            out.append(f"status {status!r} needs HTTP 2xx-3xx, got {code}")
        if status == FAIL and not 400 <= code < 600:
            out.append(f"status 'fail' needs HTTP 4xx-5xx, got {code}")
    for key in _TOP_STRINGS:
        if key in body and not isinstance(body[key], str):
            out.append(f"{key} must be a string")
    if status == PASS and body.get("output"):
        out.append("output should be omitted when status is 'pass'")
    notes = body.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        out.append("notes must be an array of strings")
    _links(body.get("links"), "links", out)
    checks = body.get("checks", {})
    if not isinstance(checks, Mapping):
        return [*out, "checks must be an object"]
    for key, entries in checks.items():
        where = f"checks[{key!r}]"
        if not isinstance(key, str) or not key:
            out.append(f"{where}: keys must be non-empty strings")
            continue
        if ":" in key and not key.split(":", 1)[0]:
            out.append(f"{where}: empty component name before ':'")
        if not isinstance(entries, list):
            out.append(f"{where} must be an array of objects")
            continue
        for i, entry in enumerate(entries):
            _check_entry(entry, f"{where}[{i}]", out)
    return out


def _status(value: object, where: str, out: list[str], *, required: bool) -> str | None:
    if value is None:
        if required:
            out.append(f"{where} is required")
        return None
    if not isinstance(value, str) or value.lower() not in _STATUSES:
        out.append(f"{where} must be pass, warn or fail (or an alias), got {value!r}")
        return None
    return _STATUSES[value.lower()]


def _links(value: object, where: str, out: list[str]) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        out.append(f"{where} must be an object of URI strings")


def _check_entry(entry: object, where: str, out: list[str]) -> None:
    if not isinstance(entry, Mapping) or not entry:
        out.append(f"{where} must be a non-empty object")
        return
    for key in _CHECK_STRINGS:
        if key in entry and not isinstance(entry[key], str):
            out.append(f"{where}.{key} must be a string")
    status = _status(entry.get("status"), f"{where}.status", out, required=False)
    # A SHOULD in the draft; a state such as "ready" has no unit, a number always has one.
    if isinstance(entry.get("observedValue"), (int, float)) and "observedUnit" not in entry:
        out.append(f"{where}: observedUnit should accompany a numeric observedValue")
    time_ = entry.get("time")
    if isinstance(time_, str) and not _ISO8601.match(time_):
        out.append(f"{where}.time is not an ISO 8601 date-time: {time_!r}")
    if status == PASS and entry.get("output"):
        out.append(f"{where}.output should be omitted when status is 'pass'")
    endpoints = entry.get("affectedEndpoints")
    if endpoints is not None:
        if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
            out.append(f"{where}.affectedEndpoints must be an array of strings")
        elif status == PASS:
            out.append(f"{where}.affectedEndpoints should be omitted when status is 'pass'")
    _links(entry.get("links"), f"{where}.links", out)
