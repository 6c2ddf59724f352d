"""The ``fleet`` scenario's figures: per process, its time from arrival to its first
success and its share of the server's connections over time.

The processes arrive in waves (:class:`~pgwarden.stress.scenarios.Waves`); each has its own
``application_name`` (``pgwstress-<client>.<worker>``, to which pgwarden with a fleet budget
appends its fleet mark after a space), so the sampler's count per ``application_name`` is a
count per process. Pure apart from reading the harness's objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypedDict

from pgwarden.stress.targets import APP_PREFIX

if TYPE_CHECKING:
    from pgwarden.stress.results import FleetProcess, Spread
    from pgwarden.stress.sampler import Sampler
    from pgwarden.stress.scenarios import Plan
    from pgwarden.stress.workers import WorkerGroup

__all__ = ["FleetFigures", "fleet_figures", "worker_of"]


class ShareRange(TypedDict):
    """Each process's mean share of the clients' connections (percent) while every
    process had arrived and none had finished: the smallest and the largest."""

    min_pct: float | None
    max_pct: float | None


class FleetFigures(TypedDict):
    """``fleet`` in a client's result (the ``fleet`` scenario only)."""

    processes: list[FleetProcess]
    #: From each process's arrival to its first success (processes that had one).
    first_success_s: Spread
    never: int  # processes without any success
    share_all_arrived: ShareRange
    #: Per worker (as a string key, JSON's), its connections over time as steps:
    #: ``[seconds after the start, connections]`` at every change.
    connections: dict[str, list[list[float]]]


def worker_of(application_name: str) -> int | None:
    """The worker index in ``pgwstress-<client>.<worker>`` (with or without pgwarden's
    fleet mark after it), or None for anything else."""
    own = application_name.split(" ", 1)[0]
    if not own.startswith(APP_PREFIX):
        return None
    _, dot, index = own.rpartition(".")
    return int(index) if dot and index.isdigit() else None


def _steps(samples: Sequence[tuple[float, Mapping[int, int]]], worker: int) -> list[list[float]]:
    out: list[list[float]] = []
    last: int | None = None
    for t, counts in samples:
        n = counts.get(worker, 0)
        if n != last:
            out.append([round(t, 2), n])
            last = n
    if samples and out and out[-1][0] != round(samples[-1][0], 2):
        out.append([round(samples[-1][0], 2), last or 0])
    return out


def _share_range(
    samples: Sequence[tuple[float, Mapping[int, int]]],
    workers: Sequence[int],
    start: float,
    end: float,
) -> ShareRange:
    totals = dict.fromkeys(workers, 0.0)
    seen = 0
    for t, counts in samples:
        total = sum(counts.get(w, 0) for w in workers)
        if not start <= t < end or total == 0:
            continue
        seen += 1
        for w in workers:
            totals[w] += counts.get(w, 0) / total
    if not seen or not workers:
        return {"min_pct": None, "max_pct": None}
    shares = [100.0 * v / seen for v in totals.values()]
    return {"min_pct": round(min(shares), 1), "max_pct": round(max(shares), 1)}


def fleet_figures(
    plan: Plan,
    group: WorkerGroup,
    first_ok: Sequence[float | None],
    sampler: Sampler,
) -> FleetFigures:
    """The figures of one client's run. ``first_ok`` is per process, in ``group.procs``
    order, from its arrival (see :func:`pgwarden.stress.results.collect`)."""
    from pgwarden.stress.results import spread

    assert plan.waves is not None
    waves = plan.waves
    n = len(group.procs)
    processes: list[FleetProcess] = []
    for p, first in zip(group.procs, first_ok, strict=True):
        processes.append(
            {
                "worker": p.index,
                "wave": waves.wave_of(p.index, n),
                "arrived_s": waves.delay(p.index, n),
                "first_success_s": None if first is None else round(first, 3),
            }
        )
    reached = [float(p["first_success_s"]) for p in processes if p["first_success_s"] is not None]
    per_worker: list[tuple[float, dict[int, int]]] = []
    for t, counts in sampler.by_app_samples:
        by_worker: dict[int, int] = {}
        for app, count in counts.items():
            w = worker_of(app)
            if w is not None:
                by_worker[w] = by_worker.get(w, 0) + count
        per_worker.append((t, by_worker))
    workers = [p.index for p in group.procs]
    last_arrival = (waves.count - 1) * waves.every
    # While all are in: from the last arrival (plus a second to log in) to the common end.
    window_end = plan.workload.end(plan.deadline)
    figures: FleetFigures = {
        "processes": processes,
        "first_success_s": spread(reached),
        "never": n - len(reached),
        "share_all_arrived": _share_range(per_worker, workers, last_arrival + 1.0, window_end),
        "connections": {str(w): _steps(per_worker, w) for w in workers},
    }
    return figures
