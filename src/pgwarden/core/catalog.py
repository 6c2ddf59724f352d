"""The metric catalog: every exported metric, once (pure data; stdlib and core only).

Each :class:`MetricSpec` says what a metric is (kind, unit, help, labels), what it is called
in Prometheus and in OpenTelemetry, and where in ``db.stats()`` (:class:`~pgwarden.core.stats.
Stats`) its value comes from.  Everything else is derived from :data:`CATALOG`:

* the Prometheus collector's families (``pgwarden.exporters.prometheus``);
* the OpenTelemetry instruments (``pgwarden.exporters.otel``), the histograms included;
* :data:`pgwarden.core.metrics.OTEL_NAMES`;
* the dashboard's counter table and the fields its history keeps (``pgwarden.dashboard``);
* the metric tables of ``docs/observability.md`` (``scripts/metrics_doc.py`` rewrites them
  from :func:`markdown_tables`).

``tests/unit/test_catalog.py`` fails when any of them disagrees with the catalog, or when a
leaf of a real ``stats()`` has no entry.

Reading a value
    :func:`samples` turns one entry and one stats dict into ``(label values, value)`` pairs,
    the same for every exporter: every vocabulary value of a labelled counter is reported (0
    until it moves, so ``rate()`` and alerts see a series from the first scrape) and any
    value outside the vocabulary is counted under ``other``, so cardinality stays bounded
    whatever a custom tracker reports.  The stats dict may come from another process, so
    missing or malformed values read as 0, never raise.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from pgwarden.core.breaker import BreakerState
from pgwarden.core.failures import FailureKind
from pgwarden.core.lifecycle import State
from pgwarden.core.metrics import CloseReason

__all__ = [
    "AMBIGUOUS_OUTCOMES",
    "ATTEMPTS",
    "BREAKER_STATES",
    "CATALOG",
    "CLOSE_REASONS",
    "HISTOGRAMS",
    "KINDS",
    "MAX_ATTEMPT_LABEL",
    "OTHER",
    "STATES",
    "Kind",
    "Label",
    "MetricSpec",
    "Otel",
    "Shape",
    "attempt_label",
    "bounded",
    "by_key",
    "histogram_parts",
    "markdown_tables",
    "number",
    "otel_attributes",
    "otel_names",
    "parse_buckets",
    "prometheus_help",
    "read",
    "samples",
]

#: The value a label takes when a tracker reports something outside its vocabulary.
OTHER = "other"
#: Failure kinds (``errors``, ``connect_failures`` and retry reasons).
KINDS: tuple[str, ...] = tuple(k.value for k in FailureKind)
#: Why a pooled connection was closed (``connections_closed``).
CLOSE_REASONS: tuple[str, ...] = tuple(r.value for r in CloseReason)
#: Lifecycle states (``state``).
STATES: tuple[str, ...] = tuple(s.value for s in State)
#: Circuit-breaker states (``breaker``).
BREAKER_STATES: tuple[str, ...] = tuple(s.value for s in BreakerState)
#: How a COMMIT whose connection was lost was resolved.
AMBIGUOUS_OUTCOMES: tuple[str, ...] = ("committed", "aborted", "unknown")
#: Retry attempt numbers from this one on share the label ``"<n>+"``.
MAX_ATTEMPT_LABEL = 5
#: The retry attempt labels: ``"1"`` .. ``"4"``, ``"5+"``.
ATTEMPTS: tuple[str, ...] = (
    *(str(n) for n in range(1, MAX_ATTEMPT_LABEL)),
    f"{MAX_ATTEMPT_LABEL}+",
)


class Kind(str, enum.Enum):
    """What a metric is, in Prometheus terms."""

    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    INFO = "info"

    def __str__(self) -> str:
        return self.value


class Shape(str, enum.Enum):
    """How the value at :attr:`MetricSpec.path` becomes samples (see :func:`samples`)."""

    VALUE = "value"  # a number: one sample
    KEYS = "keys"  # {label value: number}: one sample per vocabulary value, plus other
    FIELDS = "fields"  # named numbers of one mapping, one label value each (MetricSpec.fields)
    ONE_HOT = "one_hot"  # a string: 1 for the vocabulary value it equals, 0 for the others
    PAIRS = "pairs"  # {"from->to": number}: two labels, every ordered pair of distinct values
    HISTOGRAM = "histogram"  # a HistogramSummary, with buckets under stats["buckets"]
    INFO = "info"  # static facts: label values, the metric is always 1
    SCRAPE = "scrape"  # not from stats: 1 if the stats could be read at all

    def __str__(self) -> str:
        return self.value


class Label(NamedTuple):
    """One label: its Prometheus name, its OpenTelemetry attribute and its vocabulary."""

    name: str | None  # the Prometheus label, or None where only OpenTelemetry has it
    otel: str | None  # the OpenTelemetry attribute, or None where only Prometheus has it
    values: tuple[str, ...] = ()  # the vocabulary; empty: not bounded by one (INFO labels)
    #: Retry attempts: numbers from MAX_ATTEMPT_LABEL on share one label (see attempt_label).
    capped: bool = False


class Otel(NamedTuple):
    """The OpenTelemetry instrument of a metric."""

    name: str
    #: ``counter`` / ``updowncounter`` / ``gauge`` (observable, read from stats() when the
    #: reader collects) or ``histogram`` (recorded as events happen by ``OTelTracker``).
    instrument: str


class MetricSpec(NamedTuple):
    """One metric of the catalog (see the module docstring)."""

    key: str  # stable id: the Prometheus family name without ``pgwarden_`` and ``_total``
    kind: Kind
    unit: str  # UCUM, as OpenTelemetry wants it: ``s``, ``1``, ``{connection}``
    help: str  # one sentence; Prometheus HELP, OTel description and the docs' "meaning"
    shape: Shape
    path: tuple[str, ...]  # where in stats(); () for SCRAPE
    prometheus: str  # the exposed name (counters with ``_total``, info with ``_info``)
    otel: Otel | None = None
    labels: tuple[Label, ...] = ()
    #: FIELDS: (label value, key in the mapping at ``path``) pairs.
    fields: tuple[tuple[str, str], ...] = ()
    #: Read this path instead when ``path`` is absent (a stats dict of an older version).
    fallback: tuple[str, ...] | None = None
    #: Report nothing, rather than 0, while the value is absent or not a number.
    optional: bool = False
    #: HISTOGRAM: the MetricsTracker event that records a value (OTel records as it happens).
    event: str | None = None
    #: The dashboard's counter table: the row title (labelled counters get one row per key).
    dashboard: str | None = None
    #: Kept in the dashboard's one-second history (its charts need it).
    history: bool = False


_KIND = Label("kind", "error.type", KINDS)
_CONN = "{connection}"

# Shorthands for the entries below: each derives the Prometheus name from the key.


def _pool(key: str, field: str, help: str, **kw: Any) -> MetricSpec:
    return MetricSpec(
        key,
        Kind.GAUGE,
        kw.pop("unit", _CONN),
        help,
        Shape.VALUE,
        ("pool", field),
        f"pgwarden_{key}",
        **kw,
    )


def _counter(key: str, path: tuple[str, ...], unit: str, help: str, **kw: Any) -> MetricSpec:
    shape = Shape.KEYS if kw.get("labels") else Shape.VALUE
    return MetricSpec(
        key, Kind.COUNTER, unit, help, kw.pop("shape", shape), path, f"pgwarden_{key}_total", **kw
    )


def _listen(key: str, field: str, kind: Kind, unit: str, help: str, otel: str) -> MetricSpec:
    name = f"pgwarden_{key}_total" if kind is Kind.COUNTER else f"pgwarden_{key}"
    otel_name = "pgwarden." + key.replace("_", ".", 1)
    return MetricSpec(
        key,
        kind,
        unit,
        help,
        Shape.VALUE,
        ("listen", field),
        name,
        Otel(otel_name, otel),
        dashboard=key.replace("_", " ") if kind is Kind.COUNTER else None,
    )


def _histogram(key: str, otel: str, event: str, help: str, **kw: Any) -> MetricSpec:
    return MetricSpec(
        key,
        Kind.HISTOGRAM,
        "s",
        help,
        Shape.HISTOGRAM,
        ("histograms", key),
        f"pgwarden_{key}",
        Otel(otel, "histogram"),
        event=event,
        **kw,
    )


# fmt: off
CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("up", Kind.GAUGE, "1", "1 if the pool's stats could be read at this scrape, else 0.",
               Shape.SCRAPE, (), "pgwarden_up"),
    MetricSpec("info", Kind.INFO, "1",
               "Static facts about the pool (PgBouncer detected, pgwarden version).",
               Shape.INFO, ("pgbouncer",), "pgwarden_info",
               labels=(Label("pgbouncer", None), Label("version", None))),
    MetricSpec("state", Kind.GAUGE, "1",
               "Lifecycle state of the handle: 1 for the current state, 0 for the others.",
               Shape.ONE_HOT, ("state",), "pgwarden_state", Otel("pgwarden.state", "gauge"),
               labels=(Label("state", "pgwarden.state", STATES),)),
    MetricSpec("breaker_state", Kind.GAUGE, "1",
               "Circuit breaker state: 1 for the current state, 0 for the others.",
               Shape.ONE_HOT, ("breaker",), "pgwarden_breaker_state",
               Otel("pgwarden.breaker", "gauge"),
               labels=(Label("state", "pgwarden.breaker.state", BREAKER_STATES),)),
    MetricSpec("pool_connections", Kind.GAUGE, _CONN, "Open connections by state, idle or used.",
               Shape.FIELDS, ("pool",), "pgwarden_pool_connections",
               Otel("db.client.connection.count", "updowncounter"),
               labels=(Label("state", "db.client.connection.state", ("idle", "used")),),
               fields=(("idle", "idle"), ("used", "in_use")), history=True),
    _pool("pool_size", "size", "Open connections, idle and used together."),
    _pool("pool_max_connections", "max_size", "Maximum connections the pool may open now.",
          otel=Otel("db.client.connection.max", "updowncounter"), history=True),
    _pool("pool_idle_max_connections", "idle_max", "Maximum idle connections kept.",
          otel=Otel("db.client.connection.idle.max", "updowncounter"),
          fallback=("pool", "max_size")),
    _pool("pool_pending_requests", "waiting",
          "Callers that have waited at least 10 ms for a pooled connection (pgwarden's own "
          "count, not psycopg_pool's requests_waiting, which also counts abandoned waits).",
          unit="{request}", otel=Otel("db.client.connection.pending_requests", "updowncounter"),
          history=True),
    _pool("pool_utilization_ratio", "utilization",
          "Used connections divided by the pool's current maximum (0..1).", unit="1",
          otel=Otel("pgwarden.pool.utilization", "gauge")),
    _pool("pool_limit_connections", "limit",
          "Connection limit chosen by adaptive sizing (lowered on server overload).",
          otel=Otel("pgwarden.pool.limit", "updowncounter"), fallback=("pool", "max_size")),
    _pool("pool_configured_max_connections", "configured_max",
          "Configured max_size: the limit adaptive sizing grows back to.",
          fallback=("pool", "max_size")),
    MetricSpec("in_flight_operations", Kind.GAUGE, "{operation}",
               "Operations (queries, transactions, borrowed connections) in progress.",
               Shape.VALUE, ("in_flight",), "pgwarden_in_flight_operations",
               Otel("pgwarden.in_flight", "updowncounter")),
    MetricSpec("retry_budget_tokens", Kind.GAUGE, "{token}",
               "Retries the retry budget would allow right now.",
               Shape.VALUE, ("retry_budget_tokens",), "pgwarden_retry_budget_tokens"),
    MetricSpec("last_warmup_seconds", Kind.GAUGE, "s",
               "Duration of the most recent successful warmup.",
               Shape.VALUE, ("last_warmup_seconds",), "pgwarden_last_warmup_seconds",
               optional=True),
    _counter("queries", ("counters", "queries"), "{operation}", "Operations that succeeded.",
             otel=Otel("pgwarden.operations", "counter"), dashboard="queries", history=True),
    _counter("errors", ("counters", "errors"), "{error}",
             "Failed attempts by failure kind (before any retry decision).",
             otel=Otel("pgwarden.errors", "counter"), labels=(_KIND,), dashboard="errors",
             history=True),
    _counter("retries", ("counters", "retries", "by_reason"), "{retry}",
             "Retries by the failure kind that caused them.",
             otel=Otel("pgwarden.retries", "counter"),
             labels=(Label("reason", "pgwarden.retry.reason", KINDS),), dashboard="retries",
             history=True),
    _counter("retry_attempts", ("counters", "retries", "by_attempt"), "{retry}",
             f"Retries by attempt number (1 = first retry; {MAX_ATTEMPT_LABEL}+ groups the "
             "rest).", otel=Otel("pgwarden.retry.attempts", "counter"),
             labels=(Label("attempt", "pgwarden.retry.attempt", ATTEMPTS, capped=True),),
             dashboard="retries: attempt"),
    _counter("connections_opened", ("counters", "connections_opened"), _CONN,
             "Server connections established.",
             otel=Otel("pgwarden.connections.opened", "counter"),
             dashboard="connections opened"),
    _counter("connections_closed", ("counters", "connections_closed"), _CONN,
             "Pooled connections closed, by reason (lifetime, idle, broken, drain, failover, "
             "close).", otel=Otel("pgwarden.connections.closed", "counter"),
             labels=(Label("reason", "pgwarden.close.reason", CLOSE_REASONS),),
             dashboard="closed"),
    _counter("pool_connections_lost", ("pool", "connections_lost"), _CONN,
             "Connections the pool found broken (lost while idle or returned bad).",
             dashboard="connections lost"),
    _counter("connect_failures", ("counters", "connect_failures"), "{attempt}",
             "Failed attempts to open a connection, by failure kind.",
             otel=Otel("pgwarden.connect_failures", "counter"), labels=(_KIND,),
             dashboard="connect failures"),
    _counter("acquire_timeouts", ("counters", "acquire_timeouts"), "{timeout}",
             "Callers that gave up waiting for a pooled connection: acquire timeout or "
             "deadline.", otel=Otel("db.client.connection.timeouts", "counter"),
             dashboard="acquire timeouts"),
    _counter("warmups", ("counters", "warmups"), "{warmup}",
             "Readiness warmups by result (ok, failed).",
             otel=Otel("pgwarden.warmups", "counter"),
             labels=(Label("result", "pgwarden.result", ("ok", "failed")),),
             dashboard="warmups"),
    _counter("overload_events", ("counters", "overload_events"), "{event}",
             "Server or pooler overload reports (53300 too many clients, reserved slots, "
             "pooler full).", otel=Otel("pgwarden.overload_events", "counter"),
             dashboard="overload events", history=True),
    _counter("breaker_transitions", ("counters", "breaker_transitions"), "{transition}",
             "Circuit breaker transitions by from and to state.",
             otel=Otel("pgwarden.breaker.transitions", "counter"), shape=Shape.PAIRS,
             labels=(Label("from", "pgwarden.breaker.from", BREAKER_STATES),
                     Label("to", "pgwarden.breaker.to", BREAKER_STATES)),
             dashboard="breaker"),
    _counter("ambiguous_commits", ("counters", "ambiguous_commits"), "{commit}",
             "COMMITs whose connection was lost, by resolved outcome.",
             otel=Otel("pgwarden.ambiguous_commits", "counter"),
             labels=(Label("outcome", "pgwarden.commit.outcome", AMBIGUOUS_OUTCOMES),),
             dashboard="ambiguous commit"),
    _counter("health_checks", ("counters", "health_checks"), "{check}",
             "Health checks run (not cached), by result.",
             otel=Otel("pgwarden.health_checks", "counter"),
             labels=(Label("result", "pgwarden.result", ("passed", "failed")),),
             dashboard="health checks"),
    _counter("slow_queries", ("counters", "slow_queries"), "{query}",
             "Statements slower than slow_query_threshold.",
             otel=Otel("pgwarden.slow_queries", "counter"), dashboard="slow queries"),
    _counter("leaked_connections", ("counters", "leaked_connections"), _CONN,
             "Connections held longer than leak_threshold (reported once per hold).",
             otel=Otel("pgwarden.leaked_connections", "counter"),
             dashboard="leaked connections"),
    # LISTEN/NOTIFY: stats()["listen"], the handle's one listener connection.
    _listen("listen_channels", "channels", Kind.GAUGE, "{channel}",
            "Channels the listener connection should be LISTENing on.", "updowncounter"),
    _listen("listen_subscribers", "subscribers", Kind.GAUGE, "{subscriber}",
            "Open LISTEN subscriptions.", "updowncounter"),
    _listen("listen_connected", "connected", Kind.GAUGE, "1",
            "1 while the listener connection is up, else 0.", "gauge"),
    _listen("listen_in_outage", "in_outage", Kind.GAUGE, "1",
            "1 while the listener connection is lost and not yet re-LISTENed, else 0.", "gauge"),
    _listen("listen_notifications", "notifications_total", Kind.COUNTER, "{notification}",
            "Notifications delivered to subscribers.", "counter"),
    _listen("listen_gaps", "gaps_total", Kind.COUNTER, "{gap}",
            "Gaps delivered: a subscriber may have missed notifications (an outage or an "
            "overflow).", "counter"),
    _listen("listen_overflows", "overflows_total", Kind.COUNTER, "{overflow}",
            "Subscribers that fell too far behind; each backlog became one gap.", "counter"),
    _listen("listen_reconnects", "reconnects_total", Kind.COUNTER, "{reconnect}",
            "Times the listener connection was re-established after a loss.", "counter"),
    _listen("listen_connect_failures", "connect_failures_total", Kind.COUNTER, "{attempt}",
            "Failed attempts to open the listener connection.", "counter"),
    _histogram("acquire_wait_seconds", "db.client.connection.wait_time", "acquire",
               "Time waiting to obtain a connection from the pool.", history=True),
    _histogram("connection_use_seconds", "db.client.connection.use_time", "connection_used",
               "Time a connection was held by one caller, checkout to return."),
    _histogram("query_duration_seconds", "db.client.operation.duration", "query",
               "Duration of successful operations, acquire and retries included.",
               history=True),
    _histogram("connection_setup_seconds", "db.client.connection.create_time",
               "connection_opened", "Time to establish a new server connection."),
    _histogram("warmup_duration_seconds", "pgwarden.warmup.duration", "warmup",
               "Duration of readiness warmups, failed ones included.",
               labels=(Label(None, "pgwarden.result", ("ok", "failed")),)),
)
# fmt: on

#: The histograms, by their ``stats()["histograms"]`` key.
HISTOGRAMS: tuple[str, ...] = tuple(s.path[-1] for s in CATALOG if s.shape is Shape.HISTOGRAM)


def by_key() -> dict[str, MetricSpec]:
    """The catalog by :attr:`MetricSpec.key`."""
    return {spec.key: spec for spec in CATALOG}


def otel_names() -> dict[str, str]:
    """Stats keys (the last element of a path, or a FIELDS field) mapped to their
    OpenTelemetry *semantic-convention* metric names (``db.client.*``); see
    :data:`pgwarden.core.metrics.OTEL_NAMES`."""
    out: dict[str, str] = {}
    for spec in CATALOG:
        if spec.otel is None or not spec.otel.name.startswith("db."):
            continue
        if spec.shape is Shape.FIELDS:
            out.update((field, spec.otel.name) for _, field in spec.fields)
        elif spec.path:
            out[spec.path[-1]] = spec.otel.name
    return out


def otel_attributes() -> dict[str, dict[str, str]]:
    """The extra OpenTelemetry attributes of the stats keys that share one OTel name (the
    FIELDS of an entry); see :data:`pgwarden.core.metrics.OTEL_ATTRIBUTES`."""
    out: dict[str, dict[str, str]] = {}
    for spec in CATALOG:
        if spec.otel is None or spec.shape is not Shape.FIELDS:
            continue
        attr = spec.labels[0].otel
        if attr is not None:
            out.update((field, {attr: value}) for value, field in spec.fields)
    return out


def prometheus_help(spec: MetricSpec) -> str:
    """The HELP text: the help, naming the semantic-convention metric where there is one."""
    if spec.otel is not None and spec.otel.name.startswith("db."):
        return f"{spec.help[:-1]} (OTel {spec.otel.name})."
    return spec.help


# --- reading stats -------------------------------------------------------------------------


def number(value: object) -> float:
    """A finite float from a stats value (``None``, junk, NaN and infinities become 0)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return 0.0


def read(stats: Mapping[str, Any], path: Iterable[str]) -> Any:
    """The value at *path* in a nested mapping, or None where any step is missing."""
    value: Any = stats
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def bounded(value: object, vocabulary: Iterable[str]) -> str:
    """``str(value)`` (an enum member's value) if it is in *vocabulary*, else :data:`OTHER`."""
    text = str(getattr(value, "value", value))
    return text if text in vocabulary else OTHER


def attempt_label(attempt: object) -> str:
    """A retry attempt number as a bounded label: ``"1"`` .. ``"4"``, then ``"5+"``."""
    try:
        n = int(str(attempt))
    except ValueError:
        return OTHER
    if n < 1:
        return OTHER
    return str(n) if n < MAX_ATTEMPT_LABEL else f"{MAX_ATTEMPT_LABEL}+"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _counts(label: Label, counts: Mapping[str, Any]) -> dict[str, float]:
    out = dict.fromkeys(label.values, 0.0)
    for key, n in counts.items():
        name = attempt_label(key) if label.capped else bounded(key, label.values)
        if name not in out and name != OTHER:
            name = OTHER
        out[name] = out.get(name, 0.0) + number(n)
    return out


def samples(spec: MetricSpec, stats: Mapping[str, Any]) -> list[tuple[tuple[str, ...], float]]:
    """The samples of *spec* in *stats*: ``(label values, value)`` pairs, label values in the
    order of :attr:`MetricSpec.labels` (Prometheus labels only for INFO).

    SCRAPE gives ``[((), 1.0)]`` (the stats were read); HISTOGRAM gives nothing (see
    :func:`histogram_parts`).
    """
    shape = spec.shape
    if shape is Shape.SCRAPE:
        return [((), 1.0)]
    if shape is Shape.HISTOGRAM:
        return []
    value = read(stats, spec.path)
    if value is None and spec.fallback is not None:
        value = read(stats, spec.fallback)
    if shape is Shape.VALUE:
        if spec.optional and not (isinstance(value, (int, float)) and math.isfinite(value)):
            return []
        return [((), number(value))]
    if shape is Shape.INFO:
        return [(("true" if value else "false", _version()), 1.0)]
    if shape is Shape.ONE_HOT:
        current = str(value if value is not None else "")
        return [((s,), 1.0 if s == current else 0.0) for s in spec.labels[0].values]
    if shape is Shape.FIELDS:
        fields = _mapping(value)
        return [((label,), number(fields.get(field))) for label, field in spec.fields]
    if shape is Shape.KEYS:
        return [((k,), n) for k, n in _counts(spec.labels[0], _mapping(value)).items()]
    # PAIRS: every ordered pair of distinct states, plus whatever else was reported.
    src_label, dst_label = spec.labels
    seen = {(a, b): 0.0 for a in src_label.values for b in dst_label.values if a != b}
    for key, n in _mapping(value).items():
        src, _, dst = str(key).partition("->")
        pair = (bounded(src, src_label.values), bounded(dst, dst_label.values))
        seen[pair] = seen.get(pair, 0.0) + number(n)
    return [(pair, n) for pair, n in seen.items()]


def parse_buckets(raw: object) -> list[tuple[float, int]] | None:
    """``[[le, count], ...]`` (``le`` may be ``"+Inf"``) as ``(float, int)`` pairs, or None."""
    if not isinstance(raw, (list, tuple)) or not raw:
        return None
    out: list[tuple[float, int]] = []
    try:
        for le, n in raw:
            out.append((math.inf if le in ("+Inf", "inf", "Infinity") else float(le), int(n)))
    except (TypeError, ValueError):
        return None
    if out[-1][0] != math.inf:
        return None
    return out


def histogram_parts(
    spec: MetricSpec, stats: Mapping[str, Any]
) -> tuple[list[tuple[float, int]], float] | None:
    """A HISTOGRAM entry's cumulative ``(le, count)`` buckets and sum, or None if *stats* has
    no such histogram.  Without bucket detail (a plain ``stats()`` dict) the buckets are the
    single exact ``(+Inf, count)``."""
    summary = _mapping(read(stats, spec.path))
    pairs = parse_buckets(read(stats, ("buckets", spec.path[-1])))
    if pairs is None:
        if not summary:
            return None
        pairs = [(math.inf, int(number(summary.get("count"))))]
    return pairs, number(summary.get("sum"))


_VERSION: list[str] = []


def _version() -> str:
    if not _VERSION:
        import pgwarden

        _VERSION.append(str(pgwarden.__version__))
    return _VERSION[0]


# --- docs ----------------------------------------------------------------------------------


def _code(text: str) -> str:
    return f"`{text}`"


def _labels_cell(spec: MetricSpec, *, otel: bool) -> str:
    cells = []
    for label in spec.labels:
        name = label.otel if otel else label.name
        if name is None:
            continue
        if label.values == KINDS:
            cells.append(f"{_code(name)} = a failure kind")
        elif label.values:
            cells.append(f"{_code(name)} = {', '.join(label.values)}")
        else:
            cells.append(_code(name))
    return ", ".join(cells)


def _where(spec: MetricSpec) -> str:
    if spec.shape is Shape.SCRAPE:
        return "(the scrape)"
    if spec.shape is Shape.FIELDS:
        base = ".".join(spec.path)
        return ", ".join(_code(f"{base}.{field}") for _, field in spec.fields)
    if spec.shape is Shape.HISTOGRAM:
        return _code(".".join(spec.path)) + ", " + _code("buckets." + spec.path[-1])
    return _code(".".join(spec.path))


def markdown_tables() -> dict[str, str]:
    """The generated tables of ``docs/observability.md``, by marker name
    (``prometheus``, ``otel``), each a Markdown table ending in a newline."""
    kinds = ", ".join(_code(k) for k in KINDS)
    prom = [
        f"Every series has the label `pool`. A failure kind is one of {kinds}; a value outside "
        f"a label's vocabulary is reported as `{OTHER}`.",
        "",
        "| metric | type | labels | from `stats()` | OpenTelemetry | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOG:
        otel = _code(spec.otel.name) if spec.otel is not None else ""
        prom.append(
            f"| {_code(spec.prometheus)} | {spec.kind} | {_labels_cell(spec, otel=False)} | "
            f"{_where(spec)} | {otel} | {spec.help} |"
        )
    otel_rows = [
        "Every point also has `db.system.name` and `db.client.connection.pool.name`.",
        "",
        "| instrument | kind | unit | attributes | from `stats()` | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for spec in CATALOG:
        if spec.otel is None:
            continue
        kind = f"observable {spec.otel.instrument}"
        where = _where(spec)
        if spec.otel.instrument == "histogram":  # recorded as events happen, not read
            kind, where = "histogram", f"each `{spec.event}` event"
        otel_rows.append(
            f"| {_code(spec.otel.name)} | {kind} | {_code(spec.unit)} | "
            f"{_labels_cell(spec, otel=True)} | {where} | {spec.help} |"
        )
    return {"prometheus": "\n".join(prom) + "\n", "otel": "\n".join(otel_rows) + "\n"}
