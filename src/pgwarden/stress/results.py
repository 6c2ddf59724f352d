"""From what the workers wrote and the harness saw to one client's result record.

The worker's result file is a :class:`WorkerOutput`; :func:`collect` reads them all, checks
every write against the table (via :func:`~pgwarden.stress.targets.rows_for`), and returns
the client's result: the figures of :func:`pgwarden.stress.analysis.summarize` plus the
harness's own (:class:`HarnessFigures`). Its keys are the ``results.json`` keys of
``scenarios[].results[client]`` (see ``docs/stress.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

from pgwarden._redact import redact
from pgwarden.stress import failover
from pgwarden.stress.analysis import summarize
from pgwarden.stress.clients import LINES_PER_UNIT, LINES_TABLE
from pgwarden.stress.faults import FaultRecord, Injector
from pgwarden.stress.sampler import Sampler
from pgwarden.stress.scenarios import Plan
from pgwarden.stress.targets import Target, rows_for
from pgwarden.stress.workers import BytecodeInfo, WorkerGroup, WorkerProc, log_tail

__all__ = [
    "ClientResult",
    "FleetProcess",
    "HarnessFigures",
    "ScenarioEntry",
    "Spread",
    "StressReport",
    "WorkerCounts",
    "WorkerOutput",
    "collect",
    "merge_stats",
    "spread",
]

#: One client's result in one scenario: :func:`~pgwarden.stress.analysis.summarize`'s
#: figures and :class:`HarnessFigures`, as ``results.json`` holds them.
ClientResult = dict[str, Any]


class _ScenarioKeys(TypedDict):
    name: str
    title: str
    description: str
    params: dict[str, Any]  # the plan, as run (see harness._params)
    skipped: str | None  # why it did not run (None: it ran)
    target: str | None
    results: dict[str, ClientResult]  # by client (or variant) name, in run order


class ScenarioEntry(_ScenarioKeys, total=False):
    """One scenario of ``results.json`` (``scenarios[]``); the optional keys once it ran."""

    server_version: str
    pgbouncer_version: str | None
    max_connections: int | None
    duration_s: float


class _ReportKeys(TypedDict):
    format: str  # harness.FORMAT
    started_at: str
    finished_at: str | None
    interrupted: bool
    machine: dict[str, Any]
    options: dict[str, Any]
    scenarios: list[ScenarioEntry]


class StressReport(_ReportKeys, total=False):
    """``results.json``, filled in as scenarios finish."""

    bytecode: BytecodeInfo  # what was compiled before the first worker was spawned
    error: str  # the harness could not go on (HarnessError)


class WorkerOutput(TypedDict):
    """A worker's result file (written by :mod:`pgwarden.stress.worker`). Times are
    ``time.monotonic()`` seconds, one clock for every process on Linux and macOS."""

    worker: int
    client: str
    reason: str  # "finished" or "hard_limit"
    t_ready: float  # when it printed ready (before importing any client library)
    t_go: float  # when it read the start signal
    start_delay: float  # seconds after t_go before it built its client (its arrival)
    t_client: float | None  # when its client was built
    t_first_ok: float | None  # when its first request succeeded
    t_end: float
    client_error: str | None
    records: list[list[Any]]  # [start, latency, op, kind]
    acked: list[str]
    unacked: list[str]
    orm_acked: list[str]
    orm_unacked: list[str]
    samples: dict[str, str]  # kind -> first message
    stats: dict[str, Any]  # the client's stats() at the end


class Spread(TypedDict):
    """Median and worst of a per-process figure, in seconds (None: no process had it)."""

    p50: float | None
    max: float | None


class WorkerCounts(TypedDict):
    started: int
    ready: int  # printed ready before the start signal
    reported: int  # wrote a result file


class FleetProcess(TypedDict):
    """One process of the ``fleet`` scenario (``fleet.processes`` of a result)."""

    worker: int
    wave: int
    arrived_s: float  # seconds after the start
    first_success_s: float | None  # from its arrival; None: it never succeeded


class HarnessFigures(TypedDict):
    """What the harness adds to :func:`~pgwarden.stress.analysis.summarize`'s figures."""

    faults: list[FaultRecord]
    error_samples: dict[str, str]
    harness_errors: list[str]
    worker_errors: list[str]
    workers: WorkerCounts
    #: From the start signal (or the process's arrival) to its client being built.
    client_setup_s: Spread
    #: From spawning the process to its first successful request, without the time it
    #: waited at the start barrier: interpreter start, imports, client, first row.
    first_row_from_spawn_s: Spread
    client_stats: dict[str, Any]


def spread(values: Sequence[float], digits: int = 3) -> Spread:
    """The median (the upper one of an even count) and the worst of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "max": None}
    return {"p50": round(ordered[len(ordered) // 2], digits), "max": round(ordered[-1], digits)}


@dataclass
class _Gathered:
    """Every worker's output of one client run, put together (times relative to go)."""

    records: list[list[Any]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    unacked: list[str] = field(default_factory=list)
    orm_acked: list[str] = field(default_factory=list)
    orm_unacked: list[str] = field(default_factory=list)
    #: Per worker process: its first success, from its arrival.
    first_ok: list[float | None] = field(default_factory=list)
    error_samples: dict[str, str] = field(default_factory=dict)
    worker_errors: list[str] = field(default_factory=list)
    client_setup: list[float] = field(default_factory=list)
    first_row_from_spawn: list[float] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[int, WorkerOutput] = field(default_factory=dict)

    def add(self, p: WorkerProc, data: WorkerOutput, t_go: float) -> None:
        self.outputs[p.index] = data
        for r in data["records"]:
            self.records.append([float(r[0]) - t_go, r[1], r[2], r[3]])
        self.acked.extend(data["acked"])
        self.unacked.extend(data["unacked"])
        self.orm_acked.extend(data["orm_acked"])
        self.orm_unacked.extend(data["orm_unacked"])
        arrival = float(data["t_go"]) + float(data["start_delay"])
        t_first = data["t_first_ok"]
        self.first_ok.append(None if t_first is None else float(t_first) - arrival)
        if data["t_client"] is not None:
            self.client_setup.append(float(data["t_client"]) - arrival)
        if t_first is not None:
            # Spawn to ready (interpreter, standard library), then arrival to first row.
            startup = float(data["t_ready"]) - p.spawned_at
            self.first_row_from_spawn.append(startup + float(t_first) - arrival)
        if data["client_error"]:
            self.worker_errors.append(f"worker {p.index}: {data['client_error']}")
        for kind, message in data["samples"].items():
            self.error_samples.setdefault(kind, message)
        if data["stats"]:
            self.stats.append(data["stats"])


def collect(
    plan: Plan,
    target: Target,
    group: WorkerGroup,
    sampler: Sampler | None,
    injector: Injector | None,
    run_id: str,
    *,
    ready_count: int,
) -> ClientResult:
    """Read every worker's results, check the writes against the table, and return the
    client's result."""
    t_go = sampler.t0 if sampler is not None else 0.0
    got = _Gathered()
    reported = 0
    for p in group.procs:
        try:
            data = cast(WorkerOutput, json.loads(p.out.read_text()))
        except (OSError, ValueError):
            tail = log_tail(p.log)
            got.worker_errors.append(
                f"worker {p.index} wrote no results (exit {p.popen.returncode})"
                + (f": {redact(tail)}" if tail else "")
            )
            got.first_ok.append(None)
            continue
        reported += 1
        got.add(p, data, t_go)
    got.records.sort(key=lambda r: float(r[0]))
    rows = rows_for(target, run_id)
    line_rows = rows_for(target, run_id, LINES_TABLE) if got.orm_acked or got.orm_unacked else {}
    faults = list(injector.faults) if injector is not None else []
    for fault in faults:
        if fault["end"] is None:
            fault["end"] = fault["start"]
    result = summarize(
        got.records,
        deadline=plan.deadline,
        faults=cast(list[Mapping[str, Any]], faults),
        samples=sampler.samples if sampler is not None else [],
        acked=got.acked,
        unacked=got.unacked,
        rows=rows,
        first_ok=got.first_ok,
        orm_acked=got.orm_acked,
        orm_unacked=got.orm_unacked,
        line_rows=line_rows,
        lines_per_unit=LINES_PER_UNIT,
    )
    figures: HarnessFigures = {
        "faults": faults,
        "error_samples": got.error_samples,
        "harness_errors": list(injector.errors) if injector is not None else [],
        "worker_errors": got.worker_errors[:20],
        "workers": {"started": len(group.procs), "ready": ready_count, "reported": reported},
        "client_setup_s": spread(got.client_setup),
        "first_row_from_spawn_s": spread(got.first_row_from_spawn),
        "client_stats": merge_stats(got.stats),
    }
    result.update(figures)
    if target.pair is not None:
        result["failover"] = failover.figures(
            got.records, cast(list[Mapping[str, Any]], faults), figures["client_stats"]
        )
    if plan.waves is not None and sampler is not None:
        from pgwarden.stress.fleet import fleet_figures

        result["fleet"] = fleet_figures(plan, group, got.first_ok, sampler)
    return result


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the numeric counters of every worker's client stats (the ``counters`` of
    pgwarden's public ``stats()``)."""
    total: dict[str, Any] = {}

    def add(into: dict[str, Any], src: Mapping[str, Any]) -> None:
        for key, value in src.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                into[key] = into.get(key, 0) + value
            elif isinstance(value, Mapping):
                add(into.setdefault(key, {}), value)

    for s in stats:
        counters = s.get("counters") if isinstance(s.get("counters"), Mapping) else None
        add(total, counters if counters is not None else {})
    return total
