"""Live stats for ``pgwarden stress --dashboard``: merge the pgwarden workers' ``stats()``.

Theory of operation
-------------------
With the dashboard on, every pgwarden worker process writes a compact
:func:`pgwarden.exporters.snapshot` of its handle (``db.stats()`` plus cumulative histogram
buckets) to stdout as one ``s {json}`` line about once a second, and once more when its
requests are done. The harness's reader thread keeps the latest snapshot per worker; the
dashboard's source is a :class:`LiveStats`, a callable that merges them on each request:

* ``counters``: summed, key by key (nested maps such as ``errors`` or ``retries.by_reason``
  too);
* ``buckets``: summed bound by bound (every worker uses the same fixed bounds), so the page's
  windowed percentiles, computed from bucket deltas, are exact for the whole fleet;
* ``histograms``: ``count`` and ``sum`` summed, ``min``/``max`` the extremes, and each of
  ``p50``/``p95``/``p99`` the **count-weighted mean** of the workers' values: an
  approximation (a percentile of a union is not a mean of percentiles), good enough for a
  summary line, which is why the charts use the buckets instead;
* ``pool``: the gauges (``size``, ``idle``, ``in_use``, ``waiting``, ``max_size``, ...)
  summed, ``utilization`` recomputed as ``in_use / max_size``;
* ``state`` and ``breaker``: the worst of the workers (:data:`STATE_ORDER`,
  :data:`BREAKER_ORDER`), with how many workers are in each under ``states`` and
  ``breakers``;
* ``stress``: which scenario and run this is, and how many workers have reported.

Counters, buckets and histograms also carry over the final figures of the pgwarden runs that
already finished, so they only grow for the whole ``pgwarden stress`` run and the page's rates
never see a reset; the pool gauges, state and breaker are those of the current run's workers.
Events are not forwarded: they stay in the worker processes.

:class:`DashboardServer` serves :func:`pgwarden.dashboard.app` on that callable with the
stdlib server of :mod:`pgwarden.dashboard._server`, on its own asyncio loop in a daemon
thread, until :meth:`DashboardServer.close`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "BREAKER_ORDER",
    "LIVE_STATS_INTERVAL",
    "MAX_STATS_LINE",
    "STATE_ORDER",
    "DashboardServer",
    "LiveStats",
    "merge_live",
]

#: Seconds between two snapshots a worker sends.
LIVE_STATS_INTERVAL = 1.0
#: A snapshot line longer than this (bytes) is dropped by the worker and by the harness.
MAX_STATS_LINE = 256 * 1024
#: Lifecycle states from best to worst: an outage outranks a shutdown, which outranks a
#: start.
STATE_ORDER: tuple[str, ...] = (
    "ready",
    "new",
    "warming",
    "closing",
    "closed",
    "degraded",
    "open",
)
#: Breaker states from best to worst.
BREAKER_ORDER: tuple[str, ...] = ("closed", "half_open", "open")
_PERCENTILES = ("p50", "p95", "p99")
_RATIO_KEYS = ("utilization",)

WorkerStats = Callable[[], Sequence[Mapping[str, Any] | None]]


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sum_into(into: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if _num(value):
            current = into.get(key, 0)
            into[key] = (current if _num(current) else 0) + value
        elif isinstance(value, Mapping):
            sub = into.get(key)
            if not isinstance(sub, dict):
                sub = into[key] = {}
            _sum_into(sub, value)


def _sum_buckets(into: dict[str, list[list[Any]]], src: Mapping[str, Any]) -> None:
    for key, pairs in src.items():
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and _num(p[1]) for p in pairs
        ):
            continue
        have = into.get(key)
        if have is None:
            into[key] = [[le, n] for le, n in pairs]
        elif [p[0] for p in have] == [p[0] for p in pairs]:
            for pair, (_, n) in zip(have, pairs, strict=True):
                pair[1] += n
        # Different bounds cannot be added up; the first worker's layout wins.


def _merge_histograms(hists: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    acc: dict[str, dict[str, float]] = {}
    for per_worker in hists:
        for key, h in per_worker.items():
            if not isinstance(h, Mapping) or not _num(h.get("count")):
                continue
            count = float(h["count"])
            a = acc.setdefault(key, {"count": 0.0, "sum": 0.0})
            a["count"] += count
            if _num(h.get("sum")):
                a["sum"] += float(h["sum"])
            if count <= 0:
                continue
            for bound, pick in (("min", min), ("max", max)):
                if _num(h.get(bound)):
                    value = float(h[bound])
                    a[bound] = pick(a[bound], value) if bound in a else value
            for p in _PERCENTILES:
                if _num(h.get(p)):
                    a["w_" + p] = a.get("w_" + p, 0.0) + count * float(h[p])
                    a["n_" + p] = a.get("n_" + p, 0.0) + count
    out: dict[str, Any] = {}
    for key, a in acc.items():
        merged: dict[str, Any] = {"count": int(a["count"]), "sum": a["sum"]}
        merged["min"] = a.get("min")
        merged["max"] = a.get("max")
        for p in _PERCENTILES:
            n = a.get("n_" + p, 0.0)
            merged[p] = a["w_" + p] / n if n > 0 else None
        out[key] = merged
    return out


def _worst(values: Iterable[object], order: Sequence[str]) -> tuple[str | None, dict[str, int]]:
    counts: dict[str, int] = {}
    for v in values:
        if isinstance(v, str) and v:
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None, counts
    rank = {name: i for i, name in enumerate(order)}
    worst = max(counts, key=lambda s: rank.get(s, len(order)))
    return worst, counts


def merge_live(
    workers: Sequence[Mapping[str, Any] | None], base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Merge per-worker snapshots (see the module docstring); ``None`` entries (workers that
    have not reported yet) are skipped. *base* (counters, buckets, histograms of finished
    runs) is added to the cumulative parts only."""
    live = [w for w in workers if isinstance(w, Mapping)]
    cumulative = [*([base] if base else []), *live]
    counters: dict[str, Any] = {}
    buckets: dict[str, list[list[Any]]] = {}
    for s in cumulative:
        c = s.get("counters")
        if isinstance(c, Mapping):
            _sum_into(counters, c)
        b = s.get("buckets")
        if isinstance(b, Mapping):
            _sum_buckets(buckets, b)
    histograms = _merge_histograms(
        h for s in cumulative if isinstance(h := s.get("histograms"), Mapping)
    )
    pool: dict[str, Any] = {}
    for s in live:
        p = s.get("pool")
        if isinstance(p, Mapping):
            _sum_into(pool, {k: v for k, v in p.items() if k not in _RATIO_KEYS})
    if pool:
        max_size = pool.get("max_size", 0)
        in_use = pool.get("in_use", 0)
        pool["utilization"] = in_use / max_size if max_size > 0 else 0.0
    state, states = _worst((s.get("state") for s in live), STATE_ORDER)
    breaker, breakers = _worst((s.get("breaker") for s in live), BREAKER_ORDER)
    out: dict[str, Any] = {
        "counters": counters,
        "histograms": histograms,
        "pool": pool,
        "state": state or "new",
        "breaker": breaker or "closed",
        "states": states,
        "breakers": breakers,
        "in_flight": sum(int(s["in_flight"]) for s in live if _num(s.get("in_flight"))),
        "pgbouncer": any(s.get("pgbouncer") is True for s in live),
    }
    if buckets:
        out["buckets"] = buckets
    return out


def _cumulative(merged: Mapping[str, Any]) -> dict[str, Any]:
    return {k: merged[k] for k in ("counters", "histograms", "buckets") if k in merged}


class LiveStats:
    """The dashboard's source: a callable returning the merged stats of the current run's
    pgwarden workers (plus the cumulative figures of the runs that finished)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: WorkerStats | None = None
        self._base: dict[str, Any] | None = None
        self._meta: dict[str, Any] = {"status": "waiting", "runs_finished": 0}

    def attach(self, workers: WorkerStats, *, scenario: str, client: str, processes: int) -> None:
        """A run starts: *workers* returns each worker's latest snapshot (or None)."""
        with self._lock:
            self._workers = workers
            self._meta.update(
                status="running", scenario=scenario, client=client, processes=processes
            )

    def finish(self) -> None:
        """The current run is over: fold its final figures into the cumulative base."""
        with self._lock:
            workers, self._workers = self._workers, None
            if workers is not None:
                self._base = _cumulative(merge_live(list(workers()), self._base))
                self._meta["runs_finished"] = int(self._meta["runs_finished"]) + 1
            self._meta["status"] = "between runs"

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            workers = self._workers
            base = self._base
            meta = dict(self._meta)
        snaps = list(workers()) if workers is not None else []
        merged = merge_live(snaps, base)
        meta["reporting"] = sum(1 for s in snaps if isinstance(s, Mapping))
        merged["stress"] = meta
        return merged


class DashboardServer:
    """:func:`pgwarden.dashboard.app` on *source*, served on *host*:*port* from a thread."""

    def __init__(
        self,
        source: Callable[[], Mapping[str, Any]],
        port: int,
        host: str = "127.0.0.1",
        name: str = "pgwarden stress",
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.name = name
        self.url = ""
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="stress-dashboard", daemon=True)

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """Listen and serve; raises :class:`OSError` if the port cannot be bound."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.close()
            raise OSError(f"the dashboard did not start within {timeout:g}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def _run(self) -> None:
        import asyncio  # here, not at the top: the worker imports this module before "go"

        try:
            asyncio.run(self._main())
        except Exception as exc:  # reported to start(), never raised in this thread
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()

    async def _main(self) -> None:
        import asyncio

        from pgwarden.dashboard import app
        from pgwarden.dashboard._server import HTTPServer

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        dashboard = app(self.source, name=self.name, capture_events=False)
        server = HTTPServer(dashboard, self.host, self.port)
        try:
            try:
                await server.start()
            except OSError as exc:
                self._error = exc
                self._ready.set()
                return
            self.port = server.port
            self.url = server.url
            dashboard.start_sampling()
            self._ready.set()
            await self._stop.wait()
        finally:
            await server.close()
            dashboard.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and wait (bounded) for the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
