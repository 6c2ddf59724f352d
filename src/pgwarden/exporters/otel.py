"""OpenTelemetry exporter (extra ``otel``): semantic-convention metrics and optional spans.

    from pgwarden.exporters.otel import instrument
    inst = instrument(db)                  # global MeterProvider; spans=True for statement spans
    ...
    inst.uninstrument()

Only this module imports ``opentelemetry`` (the API package; bring your own SDK).

Metrics (meter ``pgwarden``)
    One instrument per entry of :data:`pgwarden.core.catalog.CATALOG` that has an OTel name
    (the table in docs/observability.md is generated from it).  Counters and gauges are
    observable instruments that read ``db.stats()`` when the reader collects (one snapshot
    per collection, shared by every callback), with the samples of
    :func:`pgwarden.core.catalog.samples`, so they agree with Prometheus by construction.
    Every observation carries ``db.client.connection.pool.name`` (the handle's
    ``application_name`` or the *name* given) and ``db.system.name`` = ``postgresql``.

    OpenTelemetry has no asynchronous histogram, so the histograms are recorded as events
    happen, by an :class:`OTelTracker` attached with ``db.add_tracker()``: each catalog
    histogram names the tracker event that records it (seconds, with bucket boundaries
    advised at 10 µs .. 60 s).  They record from the moment of :func:`instrument`.

Spans (``spans=True``, :class:`OTelStatementObserver` or :func:`traced`)
    Built on the handle's statement-observer seam (:mod:`pgwarden.core.tracing`,
    ``db.add_statement_observer``): one CLIENT span per statement *attempt* the caller's code
    runs (a retried ``fetch`` gives two spans, the first with its error; statements inside
    transactions get spans too; internal probes get none), named after the operation
    (``SELECT``, ``INSERT``, ...).  Attributes: ``db.system.name``, ``db.namespace``,
    ``server.address``, ``server.port``, ``db.operation.name``, ``db.query.text``
    *sanitised* (string and number literals become ``?``; placeholders such as ``%s`` stay),
    ``db.response.returned_rows`` for fetches when the row count is known, and on failure
    ``error.type`` and ``db.response.status_code`` (the SQLSTATE).  Parameters are never
    recorded, and neither is the exception message (PostgreSQL's DETAIL can quote values):
    the span status carries only the error type.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from pgwarden._redact import sanitize_sql
from pgwarden.core.catalog import CATALOG, MetricSpec, samples
from pgwarden.core.metrics import NoopTracker
from pgwarden.exporters import (
    BUCKET_BOUNDS,
    StatsHandle,
    attach_statement_observer,
    attach_tracker,
    pool_name,
)

__all__ = [
    "QUERY_METHODS",
    "ROW_OPERATIONS",
    "TRACED_METHODS",
    "Instrumentation",
    "OTelStatementObserver",
    "OTelTracker",
    "instrument",
    "query_attributes",
    "traced",
]

_SCOPE = "pgwarden"
#: The handle's query methods.
QUERY_METHODS: tuple[str, ...] = ("fetch", "fetchrow", "fetchval", "execute", "executemany")
#: The methods a :func:`traced` wrapper scopes (``transaction()`` is scoped too, as a context).
TRACED_METHODS: tuple[str, ...] = (*QUERY_METHODS, "run_transaction")
#: Operations whose row count is the number of rows returned, recorded as
#: ``db.response.returned_rows``.  For ``execute`` and ``executemany`` the driver's row count
#: is the number of rows *affected*, which that attribute does not mean, so it is not recorded.
ROW_OPERATIONS: frozenset[str] = frozenset({"fetch", "fetchrow", "fetchval"})
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


#: The catalog's histograms by the tracker event that records them.
_HISTOGRAMS: dict[str, MetricSpec] = {
    spec.event: spec
    for spec in CATALOG
    if spec.otel is not None and spec.otel.instrument == "histogram" and spec.event
}


def _histogram(meter: Meter, event: str) -> Any:
    spec = _HISTOGRAMS[event]
    assert spec.otel is not None
    try:
        return meter.create_histogram(
            spec.otel.name,
            unit=spec.unit,
            description=spec.help,
            explicit_bucket_boundaries_advisory=list(BUCKET_BOUNDS),
        )
    except TypeError:  # opentelemetry-api < 1.23 has no bucket advice
        return meter.create_histogram(spec.otel.name, unit=spec.unit, description=spec.help)


class OTelTracker(NoopTracker):
    """A ``MetricsTracker`` that records pgwarden's latencies into OpenTelemetry histograms.

    :func:`instrument` attaches one next to the handle's own tracker; to do it yourself,
    ``remove = db.add_tracker(OTelTracker(meter, "app"))`` (``stats()`` is unchanged).
    Only the histograms are recorded here; counters and gauges are observed from
    ``stats()`` by :func:`instrument`.
    """

    __slots__ = ("_attrs", "_create", "_duration", "_use", "_wait", "_warmup")

    def __init__(self, meter: Meter | None = None, pool: str = "default") -> None:
        meter = meter or _meter(None)
        self._attrs: dict[str, str] = {**_SYSTEM, _POOL_ATTR: pool}
        self._create = _histogram(meter, "connection_opened")
        self._wait = _histogram(meter, "acquire")
        self._use = _histogram(meter, "connection_used")
        self._duration = _histogram(meter, "query")
        self._warmup = _histogram(meter, "warmup")

    def query(self, duration: float) -> None:
        self._duration.record(duration, self._attrs)

    def acquire(self, wait: float) -> None:
        self._wait.record(wait, self._attrs)

    def connection_used(self, seconds: float) -> None:
        self._use.record(seconds, self._attrs)

    def connection_opened(self, setup: float) -> None:
        self._create.record(setup, self._attrs)

    def warmup(self, duration: float, ok: bool) -> None:
        self._warmup.record(duration, {**self._attrs, "pgwarden.result": "ok" if ok else "failed"})

    # Every other event is a no-op inherited from NoopTracker: counters and
    # gauges are observed from stats() by the observable instruments instead.

    def snapshot(self) -> dict[str, object]:
        return {"otel": True}


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

    def observe(self, spec: MetricSpec) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The callback of *spec*'s observable instrument: its samples in the snapshot."""
        attributes = [label.otel for label in spec.labels]

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            if not self.active:
                return
            for values, value in samples(spec, self.snap()):
                extra = {a: v for a, v in zip(attributes, values, strict=True) if a is not None}
                yield Observation(value, {**self.base, **extra})

        return callback


def _register_observables(meter: Meter, obs: _Observer) -> None:
    """One observable instrument per catalog entry with a non-histogram OTel instrument."""
    create = {
        "counter": meter.create_observable_counter,
        "updowncounter": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }
    for spec in CATALOG:
        if spec.otel is None or spec.otel.instrument == "histogram":
            continue
        create[spec.otel.instrument](
            spec.otel.name, callbacks=[obs.observe(spec)], unit=spec.unit, description=spec.help
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


def _set_error(span: trace.Span, exc: BaseException) -> None:
    sqlstate = getattr(exc, "sqlstate", None)
    error_type = str(sqlstate) if sqlstate else type(exc).__qualname__
    span.set_attribute("error.type", error_type)
    if sqlstate:
        span.set_attribute("db.response.status_code", str(sqlstate))
    span.set_status(Status(StatusCode.ERROR, error_type))


def _tracer(provider: TracerProvider | None) -> Tracer:
    return trace.get_tracer(_SCOPE, _version(), tracer_provider=provider)


class _SpanToken:
    """One statement's span, from ``statement_started`` to ``statement_finished``."""

    __slots__ = ("rows", "span")

    def __init__(self, span: trace.Span, rows: bool) -> None:
        self.span: trace.Span | None = span
        self.rows = rows

    def finish(self, error: BaseException | None, rowcount: int | None) -> None:
        span, self.span = self.span, None
        if span is None:
            return  # finished already
        if error is not None:
            _set_error(span, error)
        elif self.rows and rowcount is not None and rowcount >= 0:
            span.set_attribute("db.response.returned_rows", rowcount)
        span.end()


class OTelStatementObserver:
    """A :class:`~pgwarden.core.tracing.StatementObserver` that traces each statement.

    ``remove = db.add_statement_observer(OTelStatementObserver(db, tracer_provider))`` is what
    ``instrument(db, spans=True)`` does.  Every statement attempt the handle reports becomes
    one CLIENT span, started in ``statement_started`` (a child of the caller's current span)
    and ended in ``statement_finished``; the span is not made current while the statement
    runs.  Named after ``db.operation.name`` (``SELECT``, ``INSERT``, ...), else
    ``postgresql``.  Attributes: ``db.system.name``, ``db.namespace``, ``server.address``,
    ``server.port`` (from *handle*'s URL), ``db.query.text`` sanitised and
    ``db.operation.name`` (see :func:`query_attributes`); on failure ``error.type`` and
    ``db.response.status_code`` (the error's SQLSTATE), with status ERROR described by the
    error type only; on success of a :data:`ROW_OPERATIONS` operation,
    ``db.response.returned_rows`` when the row count is known.  Parameters and exception
    messages are never recorded.
    """

    __slots__ = ("_base", "_tracer")

    def __init__(
        self, handle: object = None, tracer_provider: TracerProvider | None = None
    ) -> None:
        self._tracer = _tracer(tracer_provider)
        self._base = _server_attributes(handle)

    def statement_started(self, operation: str, query: object) -> object:
        attrs: dict[str, str | int] = dict(self._base)
        if query is not None:
            attrs.update(query_attributes(query))
        name = str(attrs.get("db.operation.name") or "postgresql")
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        return _SpanToken(span, operation in ROW_OPERATIONS)

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        if isinstance(token, _SpanToken):
            token.finish(error, rowcount)


# traced(): one dispatcher per handle, attached on the first traced(handle); each wrapper's
# methods set _ACTIVE to (dispatcher, observer) for their duration, so only statements run
# by a call through a wrapper get spans, each with the wrapper's tracer.
_ACTIVE: ContextVar[tuple[object, OTelStatementObserver] | None] = ContextVar(
    "pgwarden_traced", default=None
)
_DISPATCHERS: weakref.WeakKeyDictionary[Any, _TracedDispatcher] = weakref.WeakKeyDictionary()
_DISPATCHERS_LOCK = threading.Lock()


class _TracedDispatcher:
    """The statement observer :func:`traced` attaches to a handle (once)."""

    __slots__ = ()

    def statement_started(self, operation: str, query: object) -> object:
        active = _ACTIVE.get()
        if active is None or active[0] is not self:
            return None  # not called through a traced() wrapper of this handle
        return active[1].statement_started(operation, query)

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        if isinstance(token, _SpanToken):
            token.finish(error, rowcount)


def _dispatcher(handle: Any) -> _TracedDispatcher:
    with _DISPATCHERS_LOCK:
        try:
            found = _DISPATCHERS.get(handle)
        except TypeError:  # not weak-referenceable: a dispatcher per wrapper
            found = None
        if found is None:
            found = _TracedDispatcher()
            attach_statement_observer(handle, found)
            with contextlib.suppress(TypeError):
                _DISPATCHERS[handle] = found
        return found


def _scoped(method: Callable[..., Any], active: tuple[object, OTelStatementObserver]) -> Any:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            reset = _ACTIVE.set(active)
            try:
                return await method(*args, **kwargs)
            finally:
                _ACTIVE.reset(reset)

        return async_wrapper

    @functools.wraps(method)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        reset = _ACTIVE.set(active)
        try:
            return method(*args, **kwargs)
        finally:
            _ACTIVE.reset(reset)

    return sync_wrapper


class _ScopedTransaction:
    """``traced(db).transaction()``: the handle's transaction context, with the statements run
    inside it traced."""

    __slots__ = ("_active", "_inner", "_resets")

    def __init__(self, inner: Any, active: tuple[object, OTelStatementObserver]) -> None:
        self._inner = inner
        self._active = active
        self._resets: list[Token[tuple[object, OTelStatementObserver] | None]] = []

    def __getattr__(self, name: str) -> Any:
        if name in self.__slots__:
            raise AttributeError(name)  # not set yet: never recurse
        return getattr(self._inner, name)

    async def __aenter__(self) -> Any:
        self._resets.append(_ACTIVE.set(self._active))
        try:
            return await self._inner.__aenter__()
        except BaseException:
            _ACTIVE.reset(self._resets.pop())
            raise

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self._inner.__aexit__(*exc_info)
        finally:
            _ACTIVE.reset(self._resets.pop())

    def __enter__(self) -> Any:
        self._resets.append(_ACTIVE.set(self._active))
        try:
            return self._inner.__enter__()
        except BaseException:
            _ACTIVE.reset(self._resets.pop())
            raise

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self._inner.__exit__(*exc_info)
        finally:
            _ACTIVE.reset(self._resets.pop())


class _Traced:
    """The handle with spans for the statements its calls run; everything else is delegated
    unchanged."""

    def __init__(self, handle: Any, tracer_provider: TracerProvider | None) -> None:
        active = (_dispatcher(handle), OTelStatementObserver(handle, tracer_provider))
        self.__dict__["_handle"] = handle
        for name in TRACED_METHODS:
            method = getattr(handle, name, None)
            if method is not None:
                self.__dict__[name] = _scoped(method, active)
        transaction = getattr(handle, "transaction", None)
        if transaction is not None:

            @functools.wraps(transaction)
            def scoped_transaction(*args: Any, **kwargs: Any) -> _ScopedTransaction:
                return _ScopedTransaction(transaction(*args, **kwargs), active)

            self.__dict__["transaction"] = scoped_transaction

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
    """A wrapper of *handle* whose calls trace the statements they run, one span per attempt.

    The spans are those of :class:`OTelStatementObserver`, for the statements of calls made
    through the wrapper (``fetch``, ``fetchrow``, ``fetchval``, ``execute``, ``executemany``,
    ``run_transaction`` and statements inside ``transaction()``); calls on *handle* itself get
    none.  Every other attribute (``stats``, ``close``, ...) is the handle's own.  The first
    ``traced(handle)`` attaches one statement observer to the handle for its lifetime (it
    costs a context-variable lookup per statement run outside a wrapper).  Needs a handle with
    ``add_statement_observer`` (:class:`TypeError` otherwise).
    """
    return _Traced(handle, tracer_provider)


class Instrumentation:
    """What :func:`instrument` set up; :meth:`uninstrument` undoes it."""

    def __init__(
        self,
        handle: Any,
        observer: _Observer,
        tracker: OTelTracker | None,
        detach: Callable[[], None] | None,
        spans: OTelStatementObserver | None = None,
        remove_spans: Callable[[], None] | None = None,
    ) -> None:
        self.handle = handle
        self.tracker = tracker
        self.spans = spans
        self.pool = observer.base[_POOL_ATTR]
        self._observer = observer
        self._detach = detach
        self._remove_spans = remove_spans

    @property
    def active(self) -> bool:
        return self._observer.active

    def uninstrument(self) -> None:
        """Stop observing (callbacks report nothing), detach the histogram tracker and the
        span observer.  OpenTelemetry cannot delete instruments, so they stay registered but
        silent.  Calling it again does nothing."""
        self._observer.active = False
        if self._detach is not None:
            self._detach()
            self._detach = None
        if self._remove_spans is not None:
            self._remove_spans()
            self._remove_spans = None


def instrument(
    handle: Any,
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
    *,
    spans: bool = False,
    histograms: bool = True,
    name: str | None = None,
) -> Instrumentation:
    """Export *handle*'s metrics through OpenTelemetry (and, with *spans*, trace its statements).

    *meter_provider* and *tracer_provider* default to the global ones.  *name* sets
    ``db.client.connection.pool.name`` (default: the handle's ``application_name``).  With
    ``spans=True`` an :class:`OTelStatementObserver` is attached with
    ``handle.add_statement_observer()``, so every statement attempt gets a span; use
    :func:`traced` for spans on the calls made through a wrapper only.  Call it once per
    handle.

    With *histograms* (the default) an :class:`OTelTracker` records every query, acquire,
    connection use and connect into OTel histograms as it happens.  That costs what the SDK's
    ``Histogram.record`` costs, a few microseconds per operation; ``histograms=False`` keeps
    only the observable instruments, which cost nothing between collections.
    """
    if not isinstance(handle, StatsHandle):
        raise TypeError(f"instrument() needs a pgwarden handle, got {type(handle).__name__}")
    if spans and not callable(getattr(handle, "add_statement_observer", None)):
        raise TypeError(
            f"instrument(spans=True) needs a handle with add_statement_observer(); "
            f"{type(handle).__name__} has none"
        )
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
    span_observer: OTelStatementObserver | None = None
    remove_spans: Callable[[], None] | None = None
    if spans:
        span_observer = OTelStatementObserver(handle, tracer_provider)
        remove_spans = attach_statement_observer(handle, span_observer)
    return Instrumentation(handle, observer, tracker, detach, span_observer, remove_spans)
