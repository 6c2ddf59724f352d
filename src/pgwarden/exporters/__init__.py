"""Exporters: what turns a handle's ``stats()`` into Prometheus, OpenTelemetry or JSON.

This package imports only the standard library and pgwarden's pure core. The optional
integrations live in their own modules and import their third-party library there and
nowhere else, so ``import pgwarden`` (and ``import pgwarden.exporters``) never loads them:

* :mod:`pgwarden.exporters.prometheus` (extra ``prometheus``): a collector, ``/metrics`` apps;
* :mod:`pgwarden.exporters.otel` (extra ``otel``): OpenTelemetry instruments and spans.

What lives here is shared by both and by :mod:`pgwarden.dashboard`:

* :func:`stats_source` turns a handle, a callable or a dict into a zero-argument callable;
* :func:`snapshot` is ``stats()`` plus cumulative histogram buckets, redacted, JSON-ready
  (what ``/stats.json`` serves, and what a remote exporter can consume);
* :func:`histograms_of` returns a handle's live :class:`~pgwarden.core.histogram.Histogram`
  objects (``db.histograms()``);
* :func:`attach_tracker` and :func:`attach_statement_observer` call the handle's
  ``add_tracker`` / ``add_statement_observer`` with a clear error for anything else;
* :func:`pool_name` is the bounded ``pool`` label of a handle;
* the fixed label vocabularies (:data:`KINDS`, :data:`CLOSE_REASONS`, ...) and
  :func:`bounded`, which maps any other value to ``"other"`` so that label cardinality stays
  bounded whatever a custom tracker reports (re-exported from :mod:`pgwarden.core.catalog`,
  which names every metric; the shape of ``stats()`` is :mod:`pgwarden.core.stats`).

Labels never carry SQL text, parameters, URLs or passwords: every label value is either drawn
from a fixed vocabulary or is the pool name, which is redacted and truncated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from pgwarden._redact import redact
from pgwarden.core.catalog import (
    AMBIGUOUS_OUTCOMES,
    BREAKER_STATES,
    CLOSE_REASONS,
    HISTOGRAMS,
    KINDS,
    MAX_ATTEMPT_LABEL,
    OTHER,
    STATES,
    attempt_label,
    bounded,
    parse_buckets,
)
from pgwarden.core.histogram import PROMETHEUS_BOUNDS, Histogram
from pgwarden.core.metrics import MetricsTracker
from pgwarden.core.stats import Histograms
from pgwarden.core.tracing import StatementObserver

__all__ = [
    "AMBIGUOUS_OUTCOMES",
    "BREAKER_STATES",
    "BUCKET_BOUNDS",
    "CLOSE_REASONS",
    "HISTOGRAMS",
    "KINDS",
    "MAX_ATTEMPT_LABEL",
    "OTHER",
    "STATES",
    "HistogramSource",
    "StatsHandle",
    "attach_statement_observer",
    "attach_tracker",
    "attempt_label",
    "bounded",
    "histograms_of",
    "parse_buckets",
    "password_of",
    "pool_name",
    "redact_tree",
    "snapshot",
    "stats_source",
]

_POOL_NAME_MAX = 64


@runtime_checkable
class StatsHandle(Protocol):
    """What the exporters need of a handle: :class:`pgwarden.AsyncDatabase` and
    :class:`pgwarden.Database` both qualify.  ``stats()`` is shaped as
    :class:`pgwarden.core.stats.Stats`."""

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class HistogramSource(Protocol):
    """A handle with live histograms: ``histograms()`` is
    :data:`pgwarden.core.stats.Histograms` (``{}`` when metrics are off)."""

    def histograms(self) -> Histograms: ...


def password_of(handle: object) -> str | None:
    """The password in a handle's URL, to mask wherever it might be echoed (or None)."""
    from pgwarden._handle.config import password_of as password_in_url

    settings = getattr(handle, "settings", None)
    url = getattr(settings, "url", None)
    return password_in_url(url) if isinstance(url, str) else None


def pool_name(handle: object, name: str | None = None) -> str:
    """The ``pool`` label: *name* if given, else the handle's ``application_name``.

    Redacted and cut to 64 characters; ``"default"`` when nothing better is known.
    """
    if name is None:
        settings = getattr(handle, "settings", None)
        app = getattr(settings, "application_name", None)
        name = app if isinstance(app, str) and app else "default"
    text = redact(name, password_of(handle)).strip() or "default"
    return text[:_POOL_NAME_MAX]


def histograms_of(handle: object) -> Histograms:
    """The live :class:`Histogram` objects behind a handle's ``stats()``, by key.

    What the handle's public ``histograms()`` returns (``{}`` when metrics are off).  Returns
    ``{}`` for anything without that method (a stats callable, an older handle) or whose
    answer is not a mapping of histograms.
    """
    if not isinstance(handle, HistogramSource) or not callable(handle.histograms):
        return {}
    found: object = handle.histograms()
    if isinstance(found, Mapping) and all(isinstance(h, Histogram) for h in found.values()):
        return found
    return {}


def redact_tree(value: Any, *secrets: str | None) -> Any:
    """A copy of a JSON-like tree with every string (keys too) passed through ``redact``."""
    if isinstance(value, str):
        return redact(value, *secrets)
    if isinstance(value, Mapping):
        return {redact(str(k), *secrets): redact_tree(v, *secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, *secrets) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan
    return value


def _buckets_json(h: Histogram) -> list[list[float | int | str]]:
    return [["+Inf" if math.isinf(le) else le, n] for le, n in h.buckets()]


def snapshot(handle: object, *, name: str | None = None) -> dict[str, Any]:
    """``handle.stats()`` made ready to serve: redacted, JSON-safe, with bucket counts
    (shaped as :class:`pgwarden.core.stats.ServedStats`).

    Adds ``ts`` (Unix time), ``name`` (the pool label, see :func:`pool_name`) and
    ``buckets``: for each histogram, cumulative ``[le, count]`` pairs over
    :data:`~pgwarden.core.histogram.PROMETHEUS_BOUNDS` and ``"+Inf"``.  A Prometheus
    collector or the dashboard pointed at this dict (e.g. over HTTP) can then rebuild real
    histograms and windowed percentiles.
    """
    stats = handle.stats() if isinstance(handle, StatsHandle) else {}
    out: dict[str, Any] = redact_tree(stats, password_of(handle))
    out["ts"] = time.time()
    out["name"] = pool_name(handle, name)
    hists = histograms_of(handle)
    if hists:
        out["buckets"] = {key: _buckets_json(h) for key, h in hists.items()}
    return out


def stats_source(source: object, *, name: str | None = None) -> Callable[[], dict[str, Any]]:
    """Turn *source* into a zero-argument callable returning a :func:`snapshot`-shaped dict.

    *source* is a handle (anything with ``stats()``), or a callable returning a stats dict
    (optionally with ``buckets`` as :func:`snapshot` adds them), or a dict (served as is,
    useful in tests).
    """
    if isinstance(source, StatsHandle):
        handle = source
        return lambda: snapshot(handle, name=name)
    if callable(source):
        fn: Callable[[], Any] = source

        def call() -> dict[str, Any]:
            got = fn()
            if not isinstance(got, Mapping):
                raise TypeError(f"stats source returned {type(got).__name__}, not a dict")
            return dict(got)

        return call
    if isinstance(source, Mapping):
        fixed = dict(source)
        return lambda: dict(fixed)
    raise TypeError(
        "source must be a pgwarden handle, a callable returning a stats dict, or a dict; "
        f"got {type(source).__name__}"
    )


#: The export bounds, re-exported for exporters that want to advise bucket layouts.
BUCKET_BOUNDS: tuple[float, ...] = PROMETHEUS_BOUNDS


def attach_tracker(handle: object, extra: MetricsTracker) -> Callable[[], None]:
    """Make *handle* report every metrics event to *extra* as well; return ``detach()``.

    Calls the handle's public ``add_tracker(extra)`` (see
    :class:`~pgwarden.core.metrics.TeeTracker`): ``stats()`` is unchanged and an exception
    from *extra* never fails a query.  ``detach()`` removes *extra* again if nothing else was
    attached after it.  Raises :class:`TypeError` for an object without ``add_tracker``.
    """
    return _attach(handle, "add_tracker", extra, "exporters")


def attach_statement_observer(handle: object, observer: StatementObserver) -> Callable[[], None]:
    """Make *handle* report each statement it runs to *observer*; return ``remove()``.

    Calls the handle's public ``add_statement_observer(observer)`` (see
    :mod:`pgwarden.core.tracing`): once per attempt, before and after the statement, never for
    internal probes; an exception from *observer* never fails the statement.  Raises
    :class:`TypeError` for an object without ``add_statement_observer``.
    """
    return _attach(handle, "add_statement_observer", observer, "statement observers")


def _attach(handle: object, method: str, thing: object, what: str) -> Callable[[], None]:
    """``handle.<method>(thing)``, the remover it returns, or a TypeError naming *what*."""
    add = getattr(handle, method, None)
    if not callable(add):
        raise TypeError(
            f"{type(handle).__name__} has no {method}(); "
            f"attach {what} to a pgwarden Database or AsyncDatabase"
        )
    remove: Callable[[], None] = add(thing)
    return remove
