"""Run stress scenarios: the orchestration of one run (scenarios, clients, the report).

Theory of operation
-------------------
For each scenario the harness opens a *target* (:mod:`.targets`): by default a throwaway
PostgreSQL started with the scenario's settings, plus a PgBouncer or a fault proxy in front
when the scenario needs one; or, with ``--url``, the given server (loopback only), on which
scenarios that must restart or reconfigure the server are skipped with the reason.

Before the first scenario it compiles the clients' bytecode (:func:`.workers.compile_bytecode`,
recorded as ``bytecode`` in the report), so no client's cold start pays for compiling its
modules. Then, for each client in turn, it runs the same *plan* (see :mod:`.scenarios`):

1. start ``processes`` workers (:mod:`.workers`) and wait until all have printed ``ready``;
2. start the sampler (:mod:`.sampler`) and write ``go`` to every worker at once;
3. inject the plan's faults (:mod:`.faults`) at their planned times, while the main thread
   prints a progress line every second;
4. wait for the workers (bounded by the plan's hard limit), stop and kill what is left,
   read their result files and check every write against the table (:mod:`.results`);
5. put the target back as it was (server running, proxy healed, backends closed).

With ``Options.live`` (``pgwarden stress --dashboard``) the pgwarden workers also send a
snapshot of their handle's ``stats()`` about once a second; the reader thread keeps the latest
per worker and :class:`~pgwarden.stress.live.LiveStats` merges them for the dashboard.

Everything is bounded: each worker stops itself at the hard limit, the harness kills
whatever outlives it, every wait has a timeout, and every server, proxy and process is
stopped in ``finally`` blocks, also on Ctrl-C and SIGTERM. Only loopback addresses are
used.
"""

from __future__ import annotations

import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pgwarden._redact import redact
from pgwarden._signals import signals_as_interrupt
from pgwarden.stress.clients import CLIENTS, missing_requirement
from pgwarden.stress.faults import Injector
from pgwarden.stress.live import LIVE_STATS_INTERVAL, LiveStats
from pgwarden.stress.results import ClientResult, ScenarioEntry, StressReport, collect
from pgwarden.stress.sampler import Sampler
from pgwarden.stress.scenarios import SCENARIOS, Plan, Scenario, Size
from pgwarden.stress.targets import (
    APP_PREFIX,
    HarnessError,
    Say,
    Target,
    loopback_problem,
    open_target,
    reset,
    why_skip,
)
from pgwarden.stress.worker import WorkerConfig
from pgwarden.stress.workers import WorkerGroup, compile_bytecode

__all__ = [
    "FORMAT",
    "HarnessError",
    "Options",
    "loopback_problem",
    "machine_info",
    "new_report",
    "run_stress",
]

FORMAT = "pgwarden-stress/1"
PROGRESS_INTERVAL = 1.0


@dataclass
class Options:
    scenarios: list[str]
    clients: list[str]
    size: Size
    out: Path
    url: str | None = None
    deadline: float = 5.0
    seed: int = 0
    say: Say = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    on_scenario: Callable[[ScenarioEntry], None] | None = None
    #: With ``--dashboard``: pgwarden workers send their live stats, merged here.
    live: LiveStats | None = None
    #: Compile the clients' bytecode before the first worker is spawned (see
    #: :func:`~pgwarden.stress.workers.compile_bytecode`).
    compile_bytecode: bool = True


# --------------------------------------------------------------------------------------------
# One client in one scenario


@dataclass(frozen=True)
class _Run:
    """One run of a scenario: a client, under its own name (a variant's, or the client's)."""

    name: str
    client: str
    fleet_budget: int | str | None = None


def _runs(plan: Plan, clients: list[str]) -> list[_Run]:
    """The clients in order, each followed by the plan's variants of it."""
    out = []
    for client in clients:
        out.append(_Run(client, client))
        out.extend(
            _Run(v.name, v.client, v.fleet_budget) for v in plan.variants if v.client == client
        )
    return out


def _application_name(plan: Plan, run: _Run, worker: int) -> str:
    """``pgwstress-<name>``; with waves, ``pgwstress-<name>.<worker>``, so the sampler can
    count each process's connections (pgwarden appends its fleet mark after a space)."""
    base = APP_PREFIX + run.name
    return base if plan.waves is None else f"{base}.{worker}"


def _run_client(
    scenario: Scenario,
    plan: Plan,
    target: Target,
    run: _Run,
    options: Options,
    workdir: Path,
    run_id: str,
) -> ClientResult:
    say = options.say
    wl = plan.workload
    client = run.name
    rundir = workdir / client
    live = options.live if client == "pgwarden" else None
    rundir.mkdir()
    # A tag of its own per run, so a run never counts the leftovers of the one before.
    fleet_tag = f"pgws-{secrets.token_hex(4)}" if run.fleet_budget is not None else ""
    configs = [
        WorkerConfig(
            client=run.client,
            url=target.client_url,
            worker=i,
            run=run_id,
            out=str(rundir / f"result-{i}.json"),
            threads=wl.threads,
            pool_size=wl.pool_size,
            deadline=plan.deadline,
            write_ratio=wl.write_ratio,
            read_work=wl.read_work,
            phases=wl.phases
            if plan.waves is None
            else plan.waves.phases_for(wl.phases, plan.waves.delay(i, wl.processes)),
            max_requests=wl.max_requests,
            hard_limit=plan.hard_limit,
            seed=options.seed + i,
            application_name=_application_name(plan, run, i),
            stats_interval=LIVE_STATS_INTERVAL if live is not None else 0.0,
            orm_share=wl.orm_share,
            start_delay=0.0 if plan.waves is None else plan.waves.delay(i, wl.processes),
            fleet_budget=run.fleet_budget,
            fleet_tag=fleet_tag,
        )
        for i in range(wl.processes)
    ]
    group = WorkerGroup(configs, rundir)
    sampler: Sampler | None = None
    injector: Injector | None = None
    try:
        if live is not None:
            procs = list(group.procs)
            live.attach(
                lambda: [p.stats for p in procs],
                scenario=scenario.name,
                client=client,
                processes=len(procs),
            )
        ready = group.wait_ready(30.0 + 0.5 * wl.processes)
        t_go = time.monotonic()
        sampler = Sampler(target, t_go, by_app=plan.waves is not None)
        sampler.start()
        group.go()
        injector = Injector(plan, target, t_go, say)
        injector.start()
        hard_end = t_go + plan.hard_limit + 5.0
        next_progress = t_go + PROGRESS_INTERVAL
        while True:
            now = time.monotonic()
            workers_done = group.alive() == 0
            if workers_done and injector.is_alive():
                injector.abort.set()
            if (workers_done and not injector.is_alive()) or now > hard_end:
                break
            if now >= next_progress:
                ok, failed = group.counts()
                conns = sampler.last
                fault = f"  [{injector.current}]" if injector.current else ""
                say(
                    f"  {scenario.name:<17} {client:<15} {now - t_go:5.1f}s  ok {ok:>6}  "
                    f"failed {failed:>5}  conns {'-' if conns is None else conns:>3}{fault}"
                )
                next_progress += PROGRESS_INTERVAL
            time.sleep(0.05)
        group.stop()
        group.wait(3.0)
    finally:
        group.kill()
        if live is not None:
            live.finish()
        if injector is not None:
            injector.abort.set()
            injector.join(60)
        if sampler is not None:
            sampler.stop()
    return collect(plan, target, group, sampler, injector, run_id, ready_count=ready)


# --------------------------------------------------------------------------------------------
# Scenarios and the whole run


def _params(scenario: Scenario, plan: Plan, size: Size) -> dict[str, Any]:
    wl = plan.workload
    return {
        "size": size,
        "processes": wl.processes,
        "threads": wl.threads,
        "pool_size": wl.pool_size,
        "deadline_s": plan.deadline,
        "write_ratio": wl.write_ratio,
        "read_work_s": wl.read_work,
        "orm_share": wl.orm_share,
        "phases": [p.__dict__ for p in wl.phases],
        "hard_limit_s": round(plan.hard_limit, 2),
        "server_settings": dict(plan.server_settings),
        "via": plan.via,
        "pgbouncer": (
            {
                "pool_mode": "transaction",
                "default_pool_size": plan.pgbouncer_pool_size,
                "max_client_conn": plan.pgbouncer_max_clients,
            }
            if plan.via == "pgbouncer"
            else None
        ),
        "faults": [
            {"at": f.at, "action": f.action, "label": f.label, "duration": f.duration}
            for f in plan.faults
        ],
        **(
            {}
            if plan.waves is None
            else {"waves": {"count": plan.waves.count, "every_s": plan.waves.every}}
        ),
        **(
            {}
            if not plan.variants
            else {
                "variants": {
                    v.name: {"client": v.client, "fleet_budget": v.fleet_budget}
                    for v in plan.variants
                }
            }
        ),
    }


def run_scenario(name: str, options: Options, workdir: Path) -> ScenarioEntry:
    scenario = SCENARIOS[name]
    plan = scenario.build(options.size, options.deadline)
    entry: ScenarioEntry = {
        "name": name,
        "title": scenario.title,
        "description": scenario.description,
        "params": _params(scenario, plan, options.size),
        "skipped": None,
        "target": None,
        "results": {},
    }
    reason = why_skip(scenario, plan, options.url)
    if reason is not None:
        entry["skipped"] = reason
        options.say(f"== {name}: skipped: {reason}")
        return entry
    wl = plan.workload
    options.say(
        f"== {name}: {scenario.title}: {wl.processes} processes x {wl.threads} threads, "
        f"pool {wl.pool_size}, deadline {plan.deadline:g}s, clients: {', '.join(options.clients)}"
    )
    started = time.monotonic()
    with open_target(plan, options.url, options.say) as target:
        entry["target"] = target.description
        entry["server_version"] = target.server_version
        entry["pgbouncer_version"] = target.pgbouncer_version
        entry["max_connections"] = target.max_connections
        scenario_dir = workdir / name
        scenario_dir.mkdir()
        for i, run in enumerate(_runs(plan, options.clients)):
            if i:
                reset(target)
            run_id = f"{name}/{run.name}/{secrets.token_hex(4)}"
            entry["results"][run.name] = _run_client(
                scenario, plan, target, run, options, scenario_dir, run_id
            )
    entry["duration_s"] = round(time.monotonic() - started, 2)
    return entry


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("pgwarden", "psycopg", "psycopg-pool", "sqlalchemy"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "packages": versions,
        "loadavg": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_report(options: Options) -> StressReport:
    return {
        "format": FORMAT,
        "started_at": _now_iso(),
        "finished_at": None,
        "interrupted": False,
        "machine": machine_info(),
        "options": {
            "scenarios": options.scenarios,
            "clients": options.clients,
            "size": options.size,
            "deadline_s": options.deadline,
            "seed": options.seed,
            "target": "embedded" if options.url is None else redact(options.url),
        },
        "scenarios": [],
    }


def run_stress(options: Options, report: StressReport | None = None) -> StressReport:
    """Run every scenario of ``options`` and return the report (see :mod:`.report`).

    ``report`` (from :func:`new_report`) is filled in place as scenarios finish, so a
    caller that catches KeyboardInterrupt still has the finished part.
    """
    unknown = [c for c in options.clients if c not in CLIENTS]
    if unknown:
        raise ValueError(f"unknown client(s): {', '.join(unknown)}")
    report = new_report(options) if report is None else report
    left_out = {c: why for c in options.clients if (why := missing_requirement(c)) is not None}
    for client, why in left_out.items():
        options.say(f"client {client} left out: {why}")
    options.clients = [c for c in options.clients if c not in left_out]
    report["options"]["clients"] = list(options.clients)
    if left_out:
        report["options"]["left_out"] = left_out
    if not options.clients:
        raise HarnessError("no client left to run: " + "; ".join(left_out.values()))
    random.seed(options.seed)
    if options.compile_bytecode:
        # Before any worker is spawned: every client starts from compiled modules, as an
        # installed package does (see pgwarden.stress.workers.compile_bytecode).
        report["bytecode"] = bytecode = compile_bytecode()
        compiled = ", ".join(k for k, v in bytecode["packages"].items() if v != "not installed")
        options.say(f"bytecode: compiled {compiled} before spawning ({bytecode['seconds']:.1f}s)")
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-stress-"))
    try:
        with signals_as_interrupt(("SIGTERM", "SIGHUP")):
            for name in options.scenarios:
                entry = run_scenario(name, options, workdir)
                report["scenarios"].append(entry)
                if options.on_scenario is not None:
                    options.on_scenario(entry)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        report["finished_at"] = _now_iso()
        report["machine"]["loadavg_end"] = _loadavg()
    return report
