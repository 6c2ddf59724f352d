"""OpenTelemetry exporter (extra ``otel``): semantic-convention metrics and optional spans.

    from pgwarden.exporters.otel import instrument
    inst = instrument(db)                  # global MeterProvider; spans=True for query spans
    ...
    inst.uninstrument()

Only this module imports ``opentelemetry`` (the API package; bring your own SDK).

Metrics (meter ``pgwarden``)
    Observable instruments read ``db.stats()`` when the reader collects (one snapshot per
    collection, shared by every callback):

    * ``db.client.connection.count`` (``db.client.connection.state`` = ``idle`` | ``used``),
      ``db.client.connection.max``, ``db.client.connection.idle.max``,
      ``db.client.connection.pending_requests``, ``pgwarden.pool.limit``,
      ``pgwarden.in_flight``: UpDownCounters;
    * ``pgwarden.pool.utilization``, ``pgwarden.state`` (``pgwarden.state``) and
      ``pgwarden.breaker`` (``pgwarden.breaker.state``): Gauges, the states one-hot;
    * ``pgwarden.operations``, ``pgwarden.errors`` (``error.type`` = failure kind),
      ``pgwarden.retries`` (``pgwarden.retry.reason``), ``pgwarden.retry.attempts``
      (``pgwarden.retry.attempt``, ``5+`` caps it), ``pgwarden.connections.opened``,
      ``pgwarden.connections.closed`` (``pgwarden.close.reason``),
      ``pgwarden.connect_failures`` (``error.type``), ``pgwarden.overload_events``,
      ``pgwarden.breaker.transitions`` (``pgwarden.breaker.from``/``to``),
      ``pgwarden.ambiguous_commits`` (``pgwarden.commit.outcome``), ``pgwarden.health_checks``
      and ``pgwarden.warmups`` (``pgwarden.result``), ``pgwarden.slow_queries``,
      ``pgwarden.leaked_connections``: monotonic Counters.

    docs/observability.md has the full table with units.
    Every observation carries ``db.client.connection.pool.name`` (the handle's
    ``application_name`` or the *name* given) and ``db.system.name`` = ``postgresql``.

    OpenTelemetry has no asynchronous histogram, so the histograms are recorded as events
    happen, by an :class:`OTelTracker` attached with ``db.add_tracker()``:
    ``db.client.connection.create_time``, ``db.client.connection.wait_time``,
    ``db.client.operation.duration`` and ``pgwarden.warmup.duration`` (seconds, with bucket
    boundaries advised at 10 µs .. 60 s).  They record from the moment of :func:`instrument`.
    (``db.client.connection.use_time`` and ``db.client.connection.timeouts`` need hooks the
    handle does not offer yet.)

Spans (``spans=True`` or :func:`traced`)
    One CLIENT span per ``fetch``/``fetchrow``/``fetchval``/``execute``/``executemany`` call,
    retries included, named after the operation (``SELECT``, ``INSERT``, ...).  Attributes:
    ``db.system.name``, ``db.namespace``, ``server.address``, ``server.port``,
    ``db.operation.name``, ``db.query.text`` *sanitised* (string and number literals become
    ``?``; placeholders such as ``%s`` stay), ``db.response.returned_rows`` for fetches, and on
    failure ``error.type`` and ``db.response.status_code`` (the SQLSTATE).  Parameters are
    never recorded, and neither is the exception message (PostgreSQL's DETAIL can quote
    values): the span status carries only the error type.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from pgwarden._redact import sanitize_sql
from pgwarden.core.metrics import NoopTracker
from pgwarden.exporters import (
    AMBIGUOUS_OUTCOMES,
    BREAKER_STATES,
    BUCKET_BOUNDS,
    CLOSE_REASONS,
    KINDS,
    STATES,
    StatsHandle,
    attach_tracker,
    attempt_label,
    bounded,
    pool_name,
)

__all__ = [
    "QUERY_METHODS",
    "Instrumentation",
    "OTelTracker",
    "instrument",
    "query_attributes",
    "traced",
]

_SCOPE = "pgwarden"
#: Handle methods that get a span each.
QUERY_METHODS: tuple[str, ...] = ("fetch", "fetchrow", "fetchval", "execute", "executemany")
_POOL_ATTR = "db.client.connection.pool.name"
_SYSTEM = {"db.system.name": "postgresql"}
_SNAPSHOT_TTL = 0.05  # seconds one stats() snapshot serves every callback of a collection
_OPERATIONS = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "WITH",
        "COPY",
        "CALL",
        "DO",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SET",
        "SHOW",
        "VALUES",
        "EXPLAIN",
        "ANALYZE",
        "VACUUM",
        "LOCK",
        "GRANT",
        "REVOKE",
        "LISTEN",
        "NOTIFY",
        "REFRESH",
    }
)


def _version() -> str:
    import pgwarden

    return str(pgwarden.__version__)


def _meter(provider: MeterProvider | None) -> Meter:
    return (provider or metrics.get_meter_provider()).get_meter(_SCOPE, _version())


def _histogram(meter: Meter, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name,
            unit="s",
            description=description,
            explicit_bucket_boundaries_advisory=list(BUCKET_BOUNDS),
        )
    except TypeError:  # opentelemetry-api < 1.23 has no bucket advice
        return meter.create_histogram(name, unit="s", description=description)


class OTelTracker(NoopTracker):
    """A ``MetricsTracker`` that records pgwarden's latencies into OpenTelemetry histograms.

    :func:`instrument` attaches one next to the handle's own tracker; to do it yourself,
    ``remove = db.add_tracker(OTelTracker(meter, "app"))`` (``stats()`` is unchanged).
    Only the histograms are recorded here; counters and gauges are observed from
    ``stats()`` by :func:`instrument`.
    """

    __slots__ = ("_attrs", "_create", "_duration", "_wait", "_warmup")

    def __init__(self, meter: Meter | None = None, pool: str = "default") -> None:
        meter = meter or _meter(None)
        self._attrs: dict[str, str] = {**_SYSTEM, _POOL_ATTR: pool}
        self._create = _histogram(
            meter,
            "db.client.connection.create_time",
            "The time it took to create a new connection.",
        )
        self._wait = _histogram(
            meter,
            "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool.",
        )
        self._duration = _histogram(
            meter,
            "db.client.operation.duration",
            "Duration of database client operations (successful, retries included).",
        )
        self._warmup = _histogram(
            meter, "pgwarden.warmup.duration", "Duration of readiness warmups."
        )

    def query(self, duration: float) -> None:
        self._duration.record(duration, self._attrs)

    def acquire(self, wait: float) -> None:
        self._wait.record(wait, self._attrs)

    def connection_opened(self, setup: float) -> None:
        self._create.record(setup, self._attrs)

    def warmup(self, duration: float, ok: bool) -> None:
        self._warmup.record(duration, {**self._attrs, "pgwarden.result": "ok" if ok else "failed"})

    # Every other event is a no-op inherited from NoopTracker: counters and
    # gauges are observed from stats() by the observable instruments instead.

    def snapshot(self) -> dict[str, object]:
        return {"otel": True}


def _num(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value == value:
        return float(value)
    return 0.0


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class _Observer:
    """Serves one cached ``stats()`` snapshot to every callback of a collection."""

    def __init__(self, handle: StatsHandle, pool: str) -> None:
        self.handle = handle
        self.base: dict[str, str] = {**_SYSTEM, _POOL_ATTR: pool}
        self.active = True
        self._lock = threading.Lock()
        self._snap: dict[str, Any] = {}
        self._at = -1.0

    def snap(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            if now - self._at > _SNAPSHOT_TTL:
                try:
                    self._snap = self.handle.stats()
                except Exception:
                    self._snap = {}
                self._at = now
            return self._snap

    def attrs(self, **extra: str) -> dict[str, str]:
        return {**self.base, **extra}

    def gauge(self, path: tuple[str, ...]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            if not self.active:
                return
            value: Any = self.snap()
            for key in path:
                value = _mapping(value).get(key)
            if value is not None:
                yield Observation(_num(value), self.attrs())

        return callback

    def labelled(
        self,
        path: tuple[str, ...],
        attr: str,
        vocabulary: tuple[str, ...],
        label: Callable[[object], str] | None = None,
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """Observations of a ``{label: count}`` dict: every vocabulary value, plus other."""

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            if not self.active:
                return
            value: Any = self.snap()
            for key in path:
                value = _mapping(value).get(key)
            counts = {v: 0.0 for v in vocabulary}
            for key, n in _mapping(value).items():
                name = label(key) if label is not None else bounded(key, vocabulary)
                counts[name] = counts.get(name, 0.0) + _num(n)
            for name, n in counts.items():
                yield Observation(n, self.attrs(**{attr: name}))

        return callback

    def connections(self, options: CallbackOptions) -> Iterator[Observation]:
        if not self.active:
            return
        pool = _mapping(self.snap().get("pool"))
        yield Observation(
            _num(pool.get("idle")), self.attrs(**{"db.client.connection.state": "idle"})
        )
        yield Observation(
            _num(pool.get("in_use")), self.attrs(**{"db.client.connection.state": "used"})
        )

    def one_hot(
        self, key: str, attr: str, states: tuple[str, ...]
    ) -> Callable[..., Iterator[Observation]]:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            if not self.active:
                return
            current = str(self.snap().get(key, ""))
            for s in states:
                yield Observation(1.0 if s == current else 0.0, self.attrs(**{attr: s}))

        return callback

    def transitions(self, options: CallbackOptions) -> Iterator[Observation]:
        if not self.active:
            return
        counters = _mapping(self.snap().get("counters"))
        for key, n in _mapping(counters.get("breaker_transitions")).items():
            src, _, dst = str(key).partition("->")
            yield Observation(
                _num(n),
                self.attrs(
                    **{
                        "pgwarden.breaker.from": bounded(src, BREAKER_STATES),
                        "pgwarden.breaker.to": bounded(dst, BREAKER_STATES),
                    }
                ),
            )


def _register_observables(meter: Meter, obs: _Observer) -> None:
    conn = "{connection}"
    meter.create_observable_up_down_counter(
        "db.client.connection.count",
        callbacks=[obs.connections],
        unit=conn,
        description="The number of connections that are currently in the state described by "
        "the state attribute.",
    )
    ud = meter.create_observable_up_down_counter
    ud(
        "db.client.connection.max",
        callbacks=[obs.gauge(("pool", "max_size"))],
        unit=conn,
        description="The maximum number of open connections allowed.",
    )
    ud(
        "db.client.connection.idle.max",
        callbacks=[obs.gauge(("pool", "idle_max"))],
        unit=conn,
        description="The maximum number of idle open connections allowed.",
    )
    ud(
        "db.client.connection.pending_requests",
        callbacks=[obs.gauge(("pool", "waiting"))],
        unit="{request}",
        description="The number of current pending requests for an open connection.",
    )
    ud(
        "pgwarden.pool.limit",
        callbacks=[obs.gauge(("pool", "limit"))],
        unit=conn,
        description="Connection limit chosen by adaptive sizing.",
    )
    ud(
        "pgwarden.in_flight",
        callbacks=[obs.gauge(("in_flight",))],
        unit="{operation}",
        description="Operations in progress.",
    )
    meter.create_observable_gauge(
        "pgwarden.pool.utilization",
        callbacks=[obs.gauge(("pool", "utilization"))],
        unit="1",
        description="Used connections divided by the pool's current maximum.",
    )
    meter.create_observable_gauge(
        "pgwarden.state",
        callbacks=[obs.one_hot("state", "pgwarden.state", STATES)],
        unit="1",
        description="Lifecycle state: 1 for the current state.",
    )
    meter.create_observable_gauge(
        "pgwarden.breaker",
        callbacks=[obs.one_hot("breaker", "pgwarden.breaker.state", BREAKER_STATES)],
        unit="1",
        description="Circuit breaker state: 1 for the current state.",
    )
    c = meter.create_observable_counter
    c(
        "pgwarden.operations",
        callbacks=[obs.gauge(("counters", "queries"))],
        unit="{operation}",
        description="Operations that succeeded.",
    )
    c(
        "pgwarden.errors",
        callbacks=[obs.labelled(("counters", "errors"), "error.type", KINDS)],
        unit="{error}",
        description="Failed attempts by failure kind.",
    )
    c(
        "pgwarden.retries",
        callbacks=[
            obs.labelled(("counters", "retries", "by_reason"), "pgwarden.retry.reason", KINDS)
        ],
        unit="{retry}",
        description="Retries by the failure kind that caused them.",
    )
    c(
        "pgwarden.retry.attempts",
        callbacks=[
            obs.labelled(
                ("counters", "retries", "by_attempt"),
                "pgwarden.retry.attempt",
                ("1", "2", "3", "4", "5+"),
                label=attempt_label,
            )
        ],
        unit="{retry}",
        description="Retries by attempt number.",
    )
    c(
        "pgwarden.connections.opened",
        callbacks=[obs.gauge(("counters", "connections_opened"))],
        unit=conn,
        description="Server connections established.",
    )
    c(
        "pgwarden.connections.closed",
        callbacks=[
            obs.labelled(("counters", "connections_closed"), "pgwarden.close.reason", CLOSE_REASONS)
        ],
        unit=conn,
        description="Pooled connections closed, by reason.",
    )
    c(
        "pgwarden.connect_failures",
        callbacks=[obs.labelled(("counters", "connect_failures"), "error.type", KINDS)],
        unit="{attempt}",
        description="Failed attempts to open a connection.",
    )
    c(
        "pgwarden.overload_events",
        callbacks=[obs.gauge(("counters", "overload_events"))],
        unit="{event}",
        description="Server or pooler overload reports.",
    )
    c(
        "pgwarden.breaker.transitions",
        callbacks=[obs.transitions],
        unit="{transition}",
        description="Circuit breaker transitions.",
    )
    c(
        "pgwarden.ambiguous_commits",
        callbacks=[
            obs.labelled(
                ("counters", "ambiguous_commits"), "pgwarden.commit.outcome", AMBIGUOUS_OUTCOMES
            )
        ],
        unit="{commit}",
        description="COMMITs whose connection was lost, by resolved outcome.",
    )
    c(
        "pgwarden.health_checks",
        callbacks=[
            obs.labelled(("counters", "health_checks"), "pgwarden.result", ("passed", "failed"))
        ],
        unit="{check}",
        description="Health checks run, by result.",
    )
    c(
        "pgwarden.warmups",
        callbacks=[obs.labelled(("counters", "warmups"), "pgwarden.result", ("ok", "failed"))],
        unit="{warmup}",
        description="Readiness warmups, by result.",
    )
    c(
        "pgwarden.slow_queries",
        callbacks=[obs.gauge(("counters", "slow_queries"))],
        unit="{query}",
        description="Statements slower than slow_query_threshold.",
    )
    c(
        "pgwarden.leaked_connections",
        callbacks=[obs.gauge(("counters", "leaked_connections"))],
        unit=conn,
        description="Connections held longer than leak_threshold.",
    )


# --- spans ---------------------------------------------------------------------------------


def _query_text(query: object) -> str:
    if isinstance(query, (str, bytes)):
        return sanitize_sql(query, limit=1000)
    as_string = getattr(query, "as_string", None)
    if callable(as_string):
        try:
            return sanitize_sql(as_string(None), limit=1000)
        except Exception:
            return "<composed>"
    return "<unknown>"


def query_attributes(query: object) -> dict[str, str]:
    """``db.query.text`` (sanitised) and ``db.operation.name`` for *query*."""
    text = _query_text(query)
    first = text.lstrip("( ").split(" ", 1)[0].upper().rstrip(";")
    attrs = {"db.query.text": text}
    if first in _OPERATIONS:
        attrs["db.operation.name"] = first
    return attrs


def _server_attributes(handle: object) -> dict[str, str | int]:
    settings = getattr(handle, "settings", None)
    url = getattr(settings, "url", None)
    out: dict[str, str | int] = dict(_SYSTEM)
    if not isinstance(url, str) or not url:
        return out
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(url)
    except Exception:
        return out
    if info.get("dbname"):
        out["db.namespace"] = str(info["dbname"])
    host = str(info.get("host") or "")
    if host and "," not in host:
        out["server.address"] = host
    port = str(info.get("port") or "")
    if port.isdigit():
        out["server.port"] = int(port)
    return out


def _finish(span: trace.Span, exc: BaseException) -> None:
    sqlstate = getattr(exc, "sqlstate", None)
    error_type = str(sqlstate) if sqlstate else type(exc).__qualname__
    span.set_attribute("error.type", error_type)
    if sqlstate:
        span.set_attribute("db.response.status_code", str(sqlstate))
    span.set_status(Status(StatusCode.ERROR, error_type))


def _rows(result: object) -> int | None:
    return len(result) if isinstance(result, list) else None


def _wrap(method: Callable[..., Any], tracer: Tracer, base: dict[str, str | int]) -> Any:
    def start(query: object) -> Any:
        attrs: dict[str, str | int] = {**base, **query_attributes(query)}
        name = str(attrs.get("db.operation.name") or "postgresql")
        return tracer.start_as_current_span(
            name,
            kind=SpanKind.CLIENT,
            attributes=attrs,
            record_exception=False,
            set_status_on_exception=False,
        )

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(query: Any, *args: Any, **kwargs: Any) -> Any:
            with start(query) as span:
                try:
                    result = await method(query, *args, **kwargs)
                except BaseException as exc:
                    _finish(span, exc)
                    raise
                rows = _rows(result)
                if rows is not None:
                    span.set_attribute("db.response.returned_rows", rows)
                return result

        return async_wrapper

    @functools.wraps(method)
    def sync_wrapper(query: Any, *args: Any, **kwargs: Any) -> Any:
        with start(query) as span:
            try:
                result = method(query, *args, **kwargs)
            except BaseException as exc:
                _finish(span, exc)
                raise
            rows = _rows(result)
            if rows is not None:
                span.set_attribute("db.response.returned_rows", rows)
            return result

    return sync_wrapper


def _tracer(provider: TracerProvider | None) -> Tracer:
    return trace.get_tracer(_SCOPE, _version(), tracer_provider=provider)


class _Traced:
    """The handle with query spans; everything else is delegated unchanged."""

    def __init__(self, handle: Any, tracer: Tracer) -> None:
        base = _server_attributes(handle)
        self.__dict__["_handle"] = handle
        for name in QUERY_METHODS:
            method = getattr(handle, name, None)
            if method is not None:
                self.__dict__[name] = _wrap(method, tracer, base)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_handle"], name)

    def __repr__(self) -> str:
        return f"<traced {self.__dict__['_handle']!r}>"

    async def __aenter__(self) -> Any:
        await self.__dict__["_handle"].__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.__dict__["_handle"].__aexit__(*exc_info)

    def __enter__(self) -> Any:
        self.__dict__["_handle"].__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.__dict__["_handle"].__exit__(*exc_info)


def traced(handle: Any, tracer_provider: TracerProvider | None = None) -> Any:
    """A wrapper of *handle* whose query methods create a CLIENT span per call.

    The handle itself is unchanged; use the wrapper where you want spans.  Every other
    attribute (``stats``, ``transaction``, ``close``, ...) is the handle's own.
    """
    return _Traced(handle, _tracer(tracer_provider))


class Instrumentation:
    """What :func:`instrument` set up; :meth:`uninstrument` undoes it."""

    def __init__(
        self,
        handle: Any,
        observer: _Observer,
        tracker: OTelTracker | None,
        detach: Callable[[], None] | None,
        patched: list[str],
    ) -> None:
        self.handle = handle
        self.tracker = tracker
        self.pool = observer.base[_POOL_ATTR]
        self._observer = observer
        self._detach = detach
        self._patched = patched

    @property
    def active(self) -> bool:
        return self._observer.active

    def uninstrument(self) -> None:
        """Stop observing (callbacks report nothing), detach the histogram tracker and remove
        the span wrappers.  OpenTelemetry cannot delete instruments, so they stay registered
        but silent."""
        self._observer.active = False
        if self._detach is not None:
            self._detach()
            self._detach = None
        for name in self._patched:
            self.handle.__dict__.pop(name, None)
        self._patched = []


def instrument(
    handle: Any,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    *,
    spans: bool = False,
    histograms: bool = True,
    name: str | None = None,
) -> Instrumentation:
    """Export *handle*'s metrics through OpenTelemetry (and, with *spans*, trace its queries).

    *meter_provider* and *tracer_provider* default to the global ones.  *name* sets
    ``db.client.connection.pool.name`` (default: the handle's ``application_name``).  With
    ``spans=True`` the handle's query methods are wrapped in place (reversibly); use
    :func:`traced` for a wrapper that leaves the handle untouched.  Call it once per handle.

    With *histograms* (the default) an :class:`OTelTracker` records every query, acquire and
    connect into OTel histograms as it happens.  That costs what the SDK's
    ``Histogram.record`` costs, a few microseconds per operation; ``histograms=False`` keeps
    only the observable instruments, which cost nothing between collections.
    """
    if not isinstance(handle, StatsHandle):
        raise TypeError(f"instrument() needs a pgwarden handle, got {type(handle).__name__}")
    pool = pool_name(handle, name)
    meter = _meter(meter_provider)
    observer = _Observer(handle, pool)
    _register_observables(meter, observer)
    tracker = OTelTracker(meter, pool) if histograms else None
    detach: Callable[[], None] | None = None
    if tracker is not None:
        try:
            detach = attach_tracker(handle, tracker)
        except TypeError:
            detach = None  # no add_tracker() (not a pgwarden handle): observables only
    patched: list[str] = []
    if spans:
        wrapper = _Traced(handle, _tracer(tracer_provider))
        for method_name in QUERY_METHODS:
            if method_name in wrapper.__dict__:
                setattr(handle, method_name, wrapper.__dict__[method_name])
                patched.append(method_name)
    return Instrumentation(handle, observer, tracker, detach, patched)
