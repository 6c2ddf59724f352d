"""The metrics model: a tracker protocol the shells call unconditionally (pure; stdlib only).

Theory of operation
    The shells hold exactly one tracker and call its methods on every event, with no
    ``if tracker is None`` anywhere (HikariCP's ``IMetricsTracker`` pattern).  When metrics are
    off the tracker is a :class:`NoopTracker`, whose methods do nothing, so the cost of "off" is
    one method call.  :class:`StatsTracker` keeps counters and :class:`Histogram` s in memory and
    renders them as a plain dict for ``db.stats()``; exporters (Prometheus, OpenTelemetry) live at
    the edges and either read a :class:`StatsTracker` or implement :class:`MetricsTracker`
    themselves, attached beside the stats with ``db.add_tracker(...)``, which wraps both in a
    :class:`TeeTracker` (``stats()`` keeps its shape; an exporter's exception is swallowed).
    The events are the methods of :class:`MetricsTracker` (:data:`TRACKER_EVENTS`); the tee's
    forwarding methods are generated from that list and :class:`NoopTracker` inherits the
    protocol's empty bodies, so a new event is added in two places: the protocol and
    :class:`StatsTracker`.

Contracts for every tracker method
    * Cheap: no I/O, no locks, no allocation beyond a dict slot for a new label value.
    * Never raises for well-typed arguments; a tracker must not be able to fail a query.
    * Durations are seconds (``time.monotonic()`` differences); labels are plain strings such as
      ``FailureKind`` or :class:`CloseReason` values (a ``str`` enum member is accepted and is
      reported under its value).

Threads
    Counters are plain ``int`` attributes and dict slots, updated with ``+=`` and no lock.  Under
    the GIL a thread switch between the load and the store of ``+=`` can very rarely lose an
    increment across threads; under free-threaded CPython it is more likely.  That is an accepted
    tradeoff: the hot path costs nothing extra, and a counter that is off by one in a million is
    still a correct operational signal.  (``itertools.count`` would make increments atomic under
    the GIL, but reading it back needs pickling internals that Python 3.14 removes.)  A sync or
    async shell that needs exact counts can wrap its tracker; the model does not.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from types import FunctionType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from pgwarden.core.histogram import Histogram

__all__ = [
    "OTEL_ATTRIBUTES",
    "OTEL_NAMES",
    "TRACKER_EVENTS",
    "CloseReason",
    "MetricsTracker",
    "NoopTracker",
    "StatsTracker",
    "TeeTracker",
    "pool_gauges",
]


class CloseReason(str, enum.Enum):
    """Why pgwarden closed a pooled connection (the label of ``connections_closed``)."""

    LIFETIME = "lifetime"  # max lifetime (with jitter) reached
    IDLE = "idle"  # idle longer than max idle time
    BROKEN = "broken"  # failed a check or died under a statement
    DRAIN = "drain"  # handle closing: drained
    FAILOVER = "failover"  # pool drained after a read-only (25006) failover signal
    CLOSE = "close"  # closed by an explicit close of the handle or pool

    def __str__(self) -> str:
        return self.value


if TYPE_CHECKING:
    #: Our metric keys (as in :func:`pool_gauges` and :meth:`StatsTracker.snapshot`) mapped
    #: to OpenTelemetry semantic-convention metric names; keys without one are absent.
    #: Derived from :data:`pgwarden.core.catalog.CATALOG` on first use (the catalog is not
    #: loaded by ``import pgwarden``).
    OTEL_NAMES: dict[str, str]
    #: Extra OTel attributes that distinguish keys sharing one OTel name (from the catalog).
    OTEL_ATTRIBUTES: dict[str, dict[str, str]]


def __getattr__(name: str) -> object:
    # OTEL_NAMES and OTEL_ATTRIBUTES come from the catalog, loaded only when asked for.
    if name in ("OTEL_NAMES", "OTEL_ATTRIBUTES"):
        from pgwarden.core import catalog

        value = catalog.otel_names() if name == "OTEL_NAMES" else catalog.otel_attributes()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class MetricsTracker(Protocol):
    """What the shells report.  Every method must be cheap and must not raise.

    A tracker implements it structurally (any class with these methods and ``snapshot``) or
    by subclassing it, or :class:`NoopTracker`, explicitly: then every event it does not
    override is ignored, so events added in later versions do not break it.  A structural
    tracker that lacks an event is rejected by :class:`TeeTracker` (``db.add_tracker``).
    """

    # The events' bodies are ``return None``, not empty: mypy treats an empty protocol method
    # as abstract in an explicit subclass, and TeeTracker (whose methods are generated) is one.
    __slots__ = ()

    def query(self, duration: float) -> None:
        """A statement or operation succeeded after ``duration`` seconds."""
        return None

    def query_error(self, kind: str) -> None:
        """A statement or operation failed; ``kind`` is a ``FailureKind`` value."""
        return None

    def acquire(self, wait: float) -> None:
        """A connection was obtained from the pool after waiting ``wait`` seconds."""
        return None

    def acquire_timeout(self) -> None:
        """A caller gave up waiting for a pooled connection: its acquire timed out or its
        deadline passed while it waited."""
        return None

    def connection_used(self, seconds: float) -> None:
        """A caller returned a connection it had held for ``seconds``, checkout to return."""
        return None

    def connection_opened(self, setup: float) -> None:
        """A new server connection was established in ``setup`` seconds."""
        return None

    def connection_closed(self, reason: str) -> None:
        """A pooled connection was closed; ``reason`` is a :class:`CloseReason` value."""
        return None

    def connect_failed(self, kind: str) -> None:
        """An attempt to open a connection failed; ``kind`` is a ``FailureKind`` value."""
        return None

    def warmup(self, duration: float, ok: bool) -> None:
        """A readiness probe finished after ``duration`` seconds, successfully or not."""
        return None

    def retry(self, reason: str, attempt: int) -> None:
        """Attempt number ``attempt`` (1 = first retry) is about to run because of ``reason``."""
        return None

    def overload(self) -> None:
        """The server or pooler reported overload (53300, reserved slots, pooler full)."""
        return None

    def breaker_transition(self, from_state: str, to_state: str) -> None:
        """The circuit breaker moved from ``from_state`` to ``to_state``."""
        return None

    def ambiguous_commit(self, outcome: str) -> None:
        """A COMMIT lost its connection; ``outcome`` is committed, aborted or unknown."""
        return None

    def health_check(self, ok: bool) -> None:
        """A health check ran (not a cached answer) and passed or failed."""
        return None

    def slow_query(self) -> None:
        """A statement exceeded the slow-query threshold."""
        return None

    def leaked_connection(self) -> None:
        """A connection was held longer than the leak-detection threshold."""
        return None

    def limit_changed(self, new_limit: int) -> None:
        """Adaptive sizing set the pool's effective connection limit to ``new_limit``."""
        return None

    def snapshot(self) -> dict[str, object]:
        """A plain, JSON-serialisable view of what this tracker knows."""
        ...


#: The event methods of :class:`MetricsTracker`, in declaration order (everything but
#: ``snapshot``).
TRACKER_EVENTS: tuple[str, ...] = tuple(
    name
    for name, member in vars(MetricsTracker).items()
    if callable(member) and not name.startswith("_") and name != "snapshot"
)


class NoopTracker(MetricsTracker):
    """The tracker used when metrics are off: every method does nothing.

    The events are the protocol's own ``return None`` bodies, so a new event needs no copy
    here, and a subclass that overrides some events ignores the rest.
    """

    __slots__ = ()

    def snapshot(self) -> dict[str, object]:
        """Always ``{"enabled": False}``."""
        return {"enabled": False}


if TYPE_CHECKING:  # only annotations use it (postponed): no TypeVar to build at import
    _K = TypeVar("_K")


def _label(key: object) -> str:
    # Callers may pass str-enum members (CloseReason.IDLE) or plain values ("idle"); they share
    # a dict slot, and whichever was stored first is reported under its value, never its repr.
    if isinstance(key, enum.Enum):
        return str(key.value)
    return str(key)


def _labelled(counts: Mapping[_K, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in list(counts.items()):  # list(): one atomic copy under the GIL
        name = _label(key)
        out[name] = out.get(name, 0) + n
    return out


class StatsTracker:
    """In-memory counters and histograms behind ``db.stats()``.

    Lock-free (see the module docstring).  The histograms are public attributes so exporters
    can read :meth:`Histogram.buckets` directly.  ``queries`` counts successes only; failures
    are under ``errors`` by kind.  ``last_warmup_seconds`` is the duration of the most recent
    *successful* warmup; the warmup histogram records every attempt.
    """

    __slots__ = (
        "_acquire_timeouts",
        "_ambiguous",
        "_closed",
        "_connect_failures",
        "_errors",
        "_health_failed",
        "_health_passed",
        "_last_warmup",
        "_leaked",
        "_limit",
        "_opened",
        "_overloads",
        "_queries",
        "_retries",
        "_retries_by_attempt",
        "_retries_by_reason",
        "_slow",
        "_transitions",
        "_warmups_failed",
        "_warmups_ok",
        "acquire_wait",
        "connection_setup",
        "connection_use",
        "query_duration",
        "warmup_duration",
    )

    def __init__(self) -> None:
        self.acquire_wait = Histogram()
        self.connection_use = Histogram()
        self.query_duration = Histogram()
        self.connection_setup = Histogram()
        self.warmup_duration = Histogram()
        self._init_counters()

    def _init_counters(self) -> None:
        self._queries = 0
        self._errors: dict[str, int] = {}
        self._acquire_timeouts = 0
        self._retries = 0
        self._retries_by_attempt: dict[int, int] = {}
        self._retries_by_reason: dict[str, int] = {}
        self._opened = 0
        self._closed: dict[str, int] = {}
        self._connect_failures: dict[str, int] = {}
        self._warmups_ok = 0
        self._warmups_failed = 0
        self._overloads = 0
        self._transitions: dict[tuple[str, str], int] = {}
        self._ambiguous: dict[str, int] = {}
        self._health_passed = 0
        self._health_failed = 0
        self._slow = 0
        self._leaked = 0
        self._last_warmup: float | None = None
        self._limit: int | None = None

    def query(self, duration: float) -> None:
        self._queries += 1
        self.query_duration.record(duration)

    def query_error(self, kind: str) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + 1

    def acquire(self, wait: float) -> None:
        self.acquire_wait.record(wait)

    def acquire_timeout(self) -> None:
        self._acquire_timeouts += 1

    def connection_used(self, seconds: float) -> None:
        self.connection_use.record(seconds)

    def connection_opened(self, setup: float) -> None:
        self._opened += 1
        self.connection_setup.record(setup)

    def connection_closed(self, reason: str) -> None:
        self._closed[reason] = self._closed.get(reason, 0) + 1

    def connect_failed(self, kind: str) -> None:
        self._connect_failures[kind] = self._connect_failures.get(kind, 0) + 1

    def warmup(self, duration: float, ok: bool) -> None:
        self.warmup_duration.record(duration)
        if ok:
            self._warmups_ok += 1
            self._last_warmup = duration
        else:
            self._warmups_failed += 1

    def retry(self, reason: str, attempt: int) -> None:
        self._retries += 1
        self._retries_by_attempt[attempt] = self._retries_by_attempt.get(attempt, 0) + 1
        self._retries_by_reason[reason] = self._retries_by_reason.get(reason, 0) + 1

    def overload(self) -> None:
        self._overloads += 1

    def breaker_transition(self, from_state: str, to_state: str) -> None:
        key = (from_state, to_state)
        self._transitions[key] = self._transitions.get(key, 0) + 1

    def ambiguous_commit(self, outcome: str) -> None:
        self._ambiguous[outcome] = self._ambiguous.get(outcome, 0) + 1

    def health_check(self, ok: bool) -> None:
        if ok:
            self._health_passed += 1
        else:
            self._health_failed += 1

    def slow_query(self) -> None:
        self._slow += 1

    def leaked_connection(self) -> None:
        self._leaked += 1

    def limit_changed(self, new_limit: int) -> None:
        self._limit = new_limit

    @property
    def histograms(self) -> dict[str, Histogram]:
        """The histograms under their snapshot keys (``*_seconds``), for exporters."""
        return {
            "acquire_wait_seconds": self.acquire_wait,
            "connection_use_seconds": self.connection_use,
            "query_duration_seconds": self.query_duration,
            "connection_setup_seconds": self.connection_setup,
            "warmup_duration_seconds": self.warmup_duration,
        }

    def snapshot(self) -> dict[str, object]:
        """A fresh, plain, JSON-serialisable nested dict (safe for the caller to mutate).

        Keys: ``counters`` (``queries``, ``errors``, ``retries``, ``connections_opened``,
        ``connections_closed``, ``connect_failures``, ``acquire_timeouts``, ``warmups``,
        ``overload_events``, ``breaker_transitions`` keyed ``"from->to"``,
        ``ambiguous_commits``, ``health_checks``, ``slow_queries``, ``leaked_connections``),
        ``histograms`` (see :attr:`histograms`), ``last_warmup_seconds`` and ``pool_limit``
        (``None`` until first reported).
        """
        transitions: dict[str, int] = {}
        for (src, dst), n in list(self._transitions.items()):
            key = f"{_label(src)}->{_label(dst)}"
            transitions[key] = transitions.get(key, 0) + n
        counters: dict[str, object] = {
            "queries": self._queries,
            "errors": _labelled(self._errors),
            "retries": {
                "total": self._retries,
                "by_attempt": _labelled(self._retries_by_attempt),
                "by_reason": _labelled(self._retries_by_reason),
            },
            "connections_opened": self._opened,
            "connections_closed": _labelled(self._closed),
            "connect_failures": _labelled(self._connect_failures),
            "acquire_timeouts": self._acquire_timeouts,
            "warmups": {"ok": self._warmups_ok, "failed": self._warmups_failed},
            "overload_events": self._overloads,
            "breaker_transitions": transitions,
            "ambiguous_commits": _labelled(self._ambiguous),
            "health_checks": {"passed": self._health_passed, "failed": self._health_failed},
            "slow_queries": self._slow,
            "leaked_connections": self._leaked,
        }
        return {
            "counters": counters,
            "histograms": {name: h.snapshot() for name, h in self.histograms.items()},
            "last_warmup_seconds": self._last_warmup,
            "pool_limit": self._limit,
        }

    def reset(self) -> None:
        """Zero every counter and histogram (``pool_limit`` is forgotten too)."""
        for h in self.histograms.values():
            h.reset()
        self._init_counters()


_NOOP = NoopTracker()  # the extra of a tee built without one


class TeeTracker(MetricsTracker):
    """Reports every event to a *primary* tracker, then to each *extra* one (an exporter's).

    ``TeeTracker(StatsTracker(), OTelTracker(meter, "orders"))`` is what
    ``db.add_tracker(OTelTracker(meter, "orders"))`` installs.

    * :meth:`snapshot` and :attr:`histograms` are the primary's, so ``db.stats()`` keeps its
      shape whatever is attached.
    * An exception from the primary propagates (it is pgwarden's own tracker; a failure there
      is a bug to see).  An exception from an extra is swallowed: an exporter must never fail a
      query, and the remaining extras are still called.
    * Construction checks that every argument implements :class:`MetricsTracker`, so a
      tracker missing a method fails here (naming the methods) rather than silently on every
      event.

    The event methods are generated, one per name in :data:`TRACKER_EVENTS`, with the
    protocol's signature and docstring.  Each is the same straight-line code a hand-written
    one would be (the primary unguarded, then the extra under a ``try``, which costs nothing
    in CPython 3.11+ when nothing is raised), copied at import from a precompiled template
    (see `_forwarder`): no ``getattr`` or ``*args`` per event, so the generated methods run as
    fast as hand copies.

    Cost: the single-extra case is two method calls and a zero-cost ``try`` per event, with no
    loop (``bench/metrics_overhead.py``).  More extras are folded to the left,
    ``TeeTracker(p, a, b)`` being ``TeeTracker(TeeTracker(p, a), b)``: one more nested call per
    extra, each extra guarded on its own.  Attaching to a handle twice builds the same shape.
    """

    __slots__ = ("_extra", "_primary")

    def __init__(self, primary: MetricsTracker, *extras: MetricsTracker) -> None:
        for tracker in (primary, *extras):
            if not isinstance(tracker, MetricsTracker):
                missing = [n for n in (*TRACKER_EVENTS, "snapshot") if not hasattr(tracker, n)]
                hint = f" (missing {', '.join(missing)}; subclass NoopTracker to ignore events)"
                raise TypeError(
                    f"{type(tracker).__name__} does not implement MetricsTracker"
                    + (hint if missing else "")
                )
        if len(extras) > 1:
            primary = TeeTracker(primary, *extras[:-1])
        self._primary: MetricsTracker = primary
        self._extra: MetricsTracker = extras[-1] if extras else _NOOP

    @property
    def primary(self) -> MetricsTracker:
        """The tracker whose :meth:`snapshot` this tee returns (never a tee itself)."""
        tracker = self._primary
        while isinstance(tracker, TeeTracker):
            tracker = tracker._primary
        return tracker

    @property
    def extras(self) -> tuple[MetricsTracker, ...]:
        """The extra trackers, in call order."""
        found: list[MetricsTracker] = []
        tracker: MetricsTracker = self
        while isinstance(tracker, TeeTracker):
            if tracker._extra is not _NOOP:
                found.append(tracker._extra)
            tracker = tracker._primary
        return tuple(reversed(found))

    @property
    def histograms(self) -> Mapping[str, Histogram]:
        """The primary's histograms (``{}`` if it has none), for exporters."""
        found = getattr(self.primary, "histograms", None)
        return found if isinstance(found, Mapping) else {}

    def snapshot(self) -> dict[str, object]:
        """The primary's snapshot, unchanged."""
        return self._primary.snapshot()

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in (self.primary, *self.extras))
        return f"<TeeTracker {names}>"


_CO_STAR_ARGS = 0x04 | 0x08  # inspect.CO_VARARGS | inspect.CO_VARKEYWORDS
_EVENT_PLACEHOLDER = "_event_"


# One template per number of event parameters. `_forwarder` copies a template's code with
# `_event_` renamed to the event and the parameters renamed to the protocol's, so each method is
# the same bytecode a hand-written one would be, without compiling anything at import
# (compiling the 17 methods from source took about 0.5 ms of every cold start).
def _forward_0(self: Any) -> None:
    self._primary._event_()
    try:  # noqa: SIM105 - suppress() would cost a call per event
        self._extra._event_()
    except Exception:  # noqa: S110 - an extra tracker must never fail a query
        pass


def _forward_1(self: Any, a: Any) -> None:
    self._primary._event_(a)
    try:  # noqa: SIM105 - suppress() would cost a call per event
        self._extra._event_(a)
    except Exception:  # noqa: S110 - an extra tracker must never fail a query
        pass


def _forward_2(self: Any, a: Any, b: Any) -> None:
    self._primary._event_(a, b)
    try:  # noqa: SIM105 - suppress() would cost a call per event
        self._extra._event_(a, b)
    except Exception:  # noqa: S110 - an extra tracker must never fail a query
        pass


def _forward_3(self: Any, a: Any, b: Any, c: Any) -> None:
    self._primary._event_(a, b, c)
    try:  # noqa: SIM105 - suppress() would cost a call per event
        self._extra._event_(a, b, c)
    except Exception:  # noqa: S110 - an extra tracker must never fail a query
        pass


_FORWARD_TEMPLATES: tuple[Callable[..., None], ...] = (
    _forward_0,
    _forward_1,
    _forward_2,
    _forward_3,
)


def _forwarder(name: str) -> Callable[..., None]:
    """TeeTracker's method for event *name*: the primary, then the extra under a ``try``.

    Built from the template for its number of parameters, with the protocol's method and
    parameter names, so the method is as fast as a hand-written one (closures over
    ``getattr`` and ``*args`` measured 2 to 3 times slower) and has the protocol's signature.
    """
    spec = getattr(MetricsTracker, name)
    code = spec.__code__
    params = code.co_varnames[1 : code.co_argcount]  # after self; the events take no *args
    plain = not code.co_kwonlyargcount and not code.co_flags & _CO_STAR_ARGS
    if not plain or not all(p.isidentifier() for p in (name, *params)):
        raise TypeError(f"MetricsTracker.{name} must take plain positional parameters")
    if len(params) >= len(_FORWARD_TEMPLATES):
        raise TypeError(
            f"MetricsTracker.{name} takes {len(params)} parameters; add a _forward_{len(params)}"
        )
    template = _FORWARD_TEMPLATES[len(params)].__code__
    method = FunctionType(
        template.replace(
            co_name=name,
            co_names=tuple(name if n == _EVENT_PLACEHOLDER else n for n in template.co_names),
            co_varnames=("self", *params),
        ),
        globals(),
        name,
    )
    method.__qualname__ = f"TeeTracker.{name}"
    method.__module__ = __name__
    method.__doc__ = spec.__doc__
    method.__annotations__ = dict(spec.__annotations__)
    return method


for _name in TRACKER_EVENTS:
    setattr(TeeTracker, _name, _forwarder(_name))
del _name


def pool_gauges(size: int, idle: int, in_use: int, waiting: int, max_size: int) -> dict[str, float]:
    """Pool gauges as a plain dict, adding ``utilization = in_use / max_size`` (0.0 if no max).

    ``idle_max`` equals ``max_size``: psycopg_pool never keeps more idle connections than its
    maximum, and it is reported so that OTel's ``db.client.connection.idle.max`` has a source.
    """
    return {
        "size": size,
        "idle": idle,
        "in_use": in_use,
        "waiting": waiting,
        "max_size": max_size,
        "idle_max": max_size,
        "utilization": in_use / max_size if max_size > 0 else 0.0,
    }
