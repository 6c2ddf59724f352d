"""Discrete-event simulation of a fleet sharing one connection budget (issue 16, item 5).

Every simulated instance runs the real policy, `pgwarden.core.fleet.FleetPolicy`
(no I/O), exactly as the sampler shell drives it: it samples the server's view
(who holds how many connections) every ``interval`` while it holds a connection,
applies its cap at every turn boundary, closes connections above it and opens
connections up to it (one attempt at a time, refused above the server's limit,
retried with pgwarden's backoffs). What is modelled rather than run: the time a
process takes to start (``cold_start``, calibrated from the real test), a connect
(``connect_time``), a round trip (``rtt``), and every instance wanting ``demand``
connections all the time.

Behind PgBouncer the fleet budget turns itself off; that scenario models the
pooler instead: each instance is a closed-loop client (one query, ``query_time``,
then ``think_time``) queued FIFO for one of ``pool_size`` server connections.

Figures per scenario: time to converge (after the last wave arrives, until every
instance has had its first row and every instance's view counts the whole fleet),
fairness (Jain's index over connection-seconds per instance, from convergence to
the end; behind PgBouncer over queries served), the database's peak connection
count, and how long instances wait for their first connection (quantiles and
buckets).

Usage::

    python bench/fleet_sim.py [--quick] [--write docs/fleet.md] [--svg-dir docs/fleet]
    python bench/fleet_sim.py --check real.json   # model vs the real 30-process test

``--check`` reads the figures ``tests/integration/test_fleet.py`` writes (set
``FLEET_REAL_JSON``), runs the model with the same inputs and fails outside the
stated tolerance (`TOLERANCE`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pgwarden.core.fleet import FleetPolicy, FleetSample

#: Seeds the model runs with for ``--check``.
CHECK_SEEDS = 20
#: Model vs real: how far outside the model's 5th-95th percentile band (over
#: `CHECK_SEEDS` seeds) a real figure may fall in ``--check``.
TOLERANCE = {
    "first_row_p50": 0.5,  # seconds
    "first_row_max": 1.5,  # seconds
    "peak_server_connections": 1,  # connections
    "zero_max": 0.25,  # seconds (a quarter of the default interval)
}


#: Converged: every instance's count of the fleet is within this share of the truth.
VIEW_ERROR = 0.05
#: Fairness is measured from this long after the last wave to the end.
STEADY_AFTER = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    instances: int
    waves: int
    wave_gap: float
    max_connections: int
    reserved: int = 3
    interval: float = 1.0
    max_size: int = 10
    demand: int = 1
    cold_start: float = 0.3
    cold_jitter: float = 0.5  # cold start is cold_start * uniform(1 - j, 1 + j)
    connect_time: float = 0.005
    rtt: float = 0.002
    duration: float = 30.0
    seed: int = 1
    pooler: bool = False
    pool_size: int = 20
    query_time: float = 0.01
    think_time: float = 0.02
    #: Explicit arrival times (overrides waves), e.g. the real test's.
    arrivals: tuple[float, ...] = ()


@dataclass
class Instance:
    index: int
    arrive: float
    policy: FleetPolicy
    held: int = 0
    connecting: bool = False
    attempts: int = 0
    first_row: float | None = None
    zero_since: float | None = None
    zero_max: float = 0.0
    next_sample: float = 0.0
    conn_seconds: float = 0.0
    changed_at: float = 0.0
    served: int = 0


@dataclass
class Result:
    scenario: Scenario
    first_waits: list[float]
    converge: float | None
    jain: float
    peak: int
    zero_max: float
    overloads: int
    view_error: float = math.nan
    #: pg_stat_activity scans per second, the whole fleet's (the sampler's load on the server).
    samples_per_s: float = math.nan
    #: The share of time an instance held a connection (mean, in the steady part).
    held_share: float = math.nan
    timeline: list[tuple[float, int]] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        waits = sorted(self.first_waits)
        if not waits:
            return math.nan
        return waits[min(len(waits) - 1, int(q * len(waits)))]

    def figures(self) -> dict[str, Any]:
        waits = self.first_waits
        buckets = {"<0.1s": 0, "<1s": 0, "<5s": 0, "<15s": 0, ">=15s": 0}
        for w in waits:
            key = (
                "<0.1s"
                if w < 0.1
                else "<1s"
                if w < 1
                else "<5s"
                if w < 5
                else "<15s"
                if w < 15
                else ">=15s"
            )
            buckets[key] += 1
        return {
            "instances": self.scenario.instances,
            "served": len(waits),
            "converge_s": None if self.converge is None else round(self.converge, 2),
            "jain": round(self.jain, 4),
            "view_error_median": round(self.view_error, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "held_share": round(self.held_share, 3),
            "peak_server_connections": self.peak,
            "first_row_p50": round(self.quantile(0.5), 3),
            "first_row_p99": round(self.quantile(0.99), 3),
            "first_row_max": round(max(waits), 3) if waits else None,
            "zero_max": round(self.zero_max, 3),
            "overloads": self.overloads,
            "first_wait_buckets": buckets,
        }


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one has everything."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


def arrivals_of(s: Scenario) -> list[float]:
    if s.arrivals:
        return list(s.arrivals)
    per = math.ceil(s.instances / s.waves)
    return [(i // per) * s.wave_gap for i in range(s.instances)]


class FleetModel:
    """The direct-to-PostgreSQL scenario: the fleet budget on, budget "server"."""

    def __init__(self, s: Scenario) -> None:
        self.s = s
        self.rng = random.Random(s.seed)
        self.hard_limit = s.max_connections - s.reserved  # an app role, not a superuser
        self.events: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.count = 0
        self.peak = 0
        self.overloads = 0
        self.version = 0
        self._snapshot: tuple[int, FleetSample] | None = None
        self.held_by_id: dict[str, int] = {}
        self.timeline: list[tuple[float, int]] = []
        self.instances = [
            Instance(
                index=i,
                arrive=at,
                policy=FleetPolicy(
                    instance_id=f"{self.rng.getrandbits(32):08x}",
                    source="server",
                    max_size=s.max_size,
                    interval=s.interval,
                ),
            )
            for i, at in enumerate(arrivals_of(s))
        ]

    def push(self, at: float, kind: str, index: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, index))

    def snapshot(self) -> FleetSample:
        if self._snapshot is None or self._snapshot[0] != self.version:
            sample = FleetSample(
                members=dict(self.held_by_id),
                others_server=0,
                others_role=0,
                role_limit=-1,
                max_connections=self.s.max_connections,
                reserved=self.s.reserved,
            )
            self._snapshot = (self.version, sample)
        return self._snapshot[1]

    def set_held(self, inst: Instance, held: int, now: float) -> None:
        if now > self.measure_from:
            inst.conn_seconds += inst.held * (now - max(inst.changed_at, self.measure_from))
        inst.changed_at = now
        self.count += held - inst.held
        if inst.first_row is not None:
            if held == 0 and inst.held > 0:
                inst.zero_since = now
            elif held > 0 and inst.zero_since is not None:
                inst.zero_max = max(inst.zero_max, now - inst.zero_since)
                inst.zero_since = None
        inst.held = held
        if held:
            self.held_by_id[inst.policy.instance_id] = held
        else:
            self.held_by_id.pop(inst.policy.instance_id, None)
        self.version += 1
        if self.count > self.peak:
            self.peak = self.count
        self.timeline.append((now, self.count))

    measure_from = math.inf

    def run(self) -> Result:
        s = self.s
        for inst in self.instances:
            cold = s.cold_start * self.rng.uniform(1 - s.cold_jitter, 1 + s.cold_jitter)
            self.push(inst.arrive + cold, "connect", inst.index)
        last_arrival = max(i.arrive for i in self.instances)
        converge: float | None = None
        # Fairness is measured over the steady part: from STEADY_AFTER past the last wave.
        self.measure_from = min(s.duration - 1.0, last_arrival + STEADY_AFTER)
        self.push(last_arrival, "probe", -1)
        while self.events:
            now, _, kind, index = heapq.heappop(self.events)
            if now > s.duration:
                break
            if kind == "probe":
                if converge is None and self.converged(now):
                    converge = now - last_arrival
                if converge is None:
                    self.push(now + 0.05, "probe", -1)
                continue
            inst = self.instances[index]
            if kind == "connect":
                self.connect(inst, now)
            elif kind == "tick":
                self.tick(inst, now)
        end = s.duration
        shares = []
        for inst in self.instances:
            self.set_held(inst, inst.held, end)
            if inst.zero_since is not None and inst.first_row is not None:
                inst.zero_max = max(inst.zero_max, end - inst.zero_since)
            shares.append(inst.conn_seconds)
        waits = [i.first_row - i.arrive for i in self.instances if i.first_row is not None]
        n = len(self.instances)
        errors = [abs(len(i.policy.members) + len(i.policy.away) - n) / n for i in self.instances]
        return Result(
            scenario=s,
            first_waits=waits,
            converge=converge,
            view_error=statistics.median(errors),
            samples_per_s=sum(i.policy.samples for i in self.instances) / s.duration,
            held_share=statistics.mean(
                min(1.0, x / max(1e-9, s.duration - self.measure_from)) for x in shares
            ),
            jain=jain(shares),
            peak=self.peak,
            zero_max=max(i.zero_max for i in self.instances),
            overloads=self.overloads,
            timeline=self.timeline,
        )

    def converged(self, now: float) -> bool:
        """Every instance has had its first row and counts the fleet within `VIEW_ERROR`."""
        n = len(self.instances)
        for inst in self.instances:
            if inst.first_row is None:
                return False
            seen = len(inst.policy.members) + len(inst.policy.away)
            if abs(seen - n) > VIEW_ERROR * n:
                return False
        return True

    def connect(self, inst: Instance, now: float) -> None:
        s = self.s
        first = inst.first_row is None
        cap = inst.policy.cap(now)
        target = 1 if first else self.target(cap)
        if inst.held >= target:
            inst.connecting = False
            return
        now += s.connect_time
        if self.count < self.hard_limit:
            inst.attempts = 0
            self.set_held(inst, inst.held + 1, now)
            if first:
                inst.first_row = now + s.rtt
                self.push(now, "tick", inst.index)  # the sampler starts with the pool
            elif now >= inst.next_sample:
                self.push(now, "tick", inst.index)  # a due sample was waiting for it
            if inst.held < self.target(inst.policy.cap(now)):
                self.push(now, "connect", inst.index)
            else:
                inst.connecting = False
            return
        self.overloads += 1
        inst.attempts += 1
        if first:  # the warmup: full jitter, 50 ms doubling, capped at 2 s
            delay = self.rng.uniform(0, min(2.0, 0.05 * 2 ** (inst.attempts - 1)))
        else:  # the pool's reconnection: 50 ms doubling, capped at 250 ms, +-10%
            delay = min(0.25, 0.05 * 2 ** (inst.attempts - 1)) * self.rng.uniform(0.9, 1.1)
        inst.connecting = True
        self.push(now + delay, "connect", inst.index)

    def target(self, cap: int | None) -> int:
        if cap is None:
            return min(self.s.max_size, self.s.demand)
        return min(cap, self.s.demand)

    def tick(self, inst: Instance, now: float) -> None:
        s, policy = self.s, inst.policy
        cap = policy.cap(now)
        if now >= inst.next_sample and cap != 0 and inst.held > 0:
            inst.next_sample = now + s.interval
            policy.observe(now + s.rtt, self.snapshot())
            cap = policy.cap(now)
        target = self.target(cap)
        if inst.held > target:
            self.set_held(inst, target, now)
        elif inst.held < target and not inst.connecting:
            inst.connecting = True
            self.push(now, "connect", inst.index)
        until_turn = policy.turn_ends(now) - now
        # A sample that is due waits for a connection (the real sampler's lease connects
        # one): the connect's success wakes the loop, so no wake-up for it here.
        due = inst.next_sample - now
        wake = min(until_turn, due) if cap != 0 and due > 0 else until_turn
        self.push(now + max(0.001, wake), "tick", inst.index)


class PoolerModel:
    """Behind PgBouncer (transaction mode): the fleet budget is off; the pooler queues."""

    def __init__(self, s: Scenario) -> None:
        self.s = s
        self.rng = random.Random(s.seed)

    def run(self) -> Result:
        s = self.s
        arrive = arrivals_of(s)
        events: list[tuple[float, int, str, int]] = []
        seq = 0

        def push(at: float, kind: str, index: int) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (at, seq, kind, index))

        for i, at in enumerate(arrive):
            cold = s.cold_start * self.rng.uniform(1 - s.cold_jitter, 1 + s.cold_jitter)
            push(at + cold + s.connect_time, "submit", i)
        first: list[float | None] = [None] * s.instances
        served = [0] * s.instances
        queue: deque[int] = deque()
        busy, peak = 0, 0
        timeline: list[tuple[float, int]] = []
        last_arrival = max(arrive)
        converge: float | None = None
        measure_from = min(s.duration - 1.0, last_arrival + STEADY_AFTER)
        while events:
            now, _, kind, i = heapq.heappop(events)
            if now > s.duration:
                break
            if kind == "submit":
                queue.append(i)
            else:  # "done"
                busy -= 1
                if first[i] is None:
                    first[i] = now
                    if converge is None and now >= last_arrival and all(first):
                        converge = now - last_arrival
                if now >= measure_from:
                    served[i] += 1
                push(now + s.think_time, "submit", i)
            while queue and busy < s.pool_size:
                busy += 1
                push(now + s.query_time + s.rtt, "done", queue.popleft())
            # The pooler opens server connections as it needs them, up to pool_size.
            if busy > peak:
                peak = busy
                timeline.append((now, peak))
        waits = [f - a for f, a in zip(first, arrive, strict=True) if f is not None]
        return Result(
            scenario=s,
            first_waits=waits,
            converge=converge,
            jain=jain([float(x) for x in served]),
            peak=peak,
            zero_max=math.nan,
            overloads=0,
            timeline=timeline,
        )


def simulate(s: Scenario) -> Result:
    return PoolerModel(s).run() if s.pooler else FleetModel(s).run()


def scenarios(quick: bool) -> list[Scenario]:
    big = 1_000 if quick else 10_000
    return [
        Scenario("1,000 in 5 waves, max_connections=500", 1_000, 5, 2.0, 500, duration=30),
        Scenario(f"{big:,} in 10 waves, max_connections=500", big, 10, 2.0, 500, duration=40),
        Scenario(
            "1,000 in 5 waves, behind PgBouncer (pool_size=20)",
            1_000,
            5,
            2.0,
            500,
            pooler=True,
            duration=30,
        ),
        Scenario(
            f"{big:,} in 10 waves, behind PgBouncer (pool_size=20)",
            big,
            10,
            2.0,
            500,
            pooler=True,
            duration=40,
        ),
    ]


# --- model vs real ------------------------------------------------------------------------------
def check(real_path: Path) -> int:
    """Run the model with the real 30-process test's inputs and compare."""
    real = json.loads(real_path.read_text())
    starts = real["starts"]
    t0 = min(starts)
    arrivals = tuple(sorted(t - t0 for t in starts))
    firsts = real["first_rows"]
    # Calibration: the first wave fits within the budget (no refusals), so its median
    # time to first row is the process's own cold start (imports, CPU, connect).
    order = sorted(range(len(starts)), key=lambda k: starts[k])
    wave1 = [firsts[k] for k in order[:10]]
    cold = statistics.median(wave1)
    s = Scenario(
        "the real test's inputs",
        instances=len(starts),
        waves=3,
        wave_gap=3.0,
        max_connections=20,
        interval=real["interval"],
        demand=1,
        cold_start=cold,
        arrivals=arrivals,
        duration=max(arrivals) + 6.0,
    )
    runs = [simulate(replace(s, seed=seed)).figures() for seed in range(1, CHECK_SEEDS + 1)]
    # The model's time at zero is the real test's longest gap between rows (less a row).
    real = {**real, "zero_max": real.get("gap_max", real["zero_max"])}
    failed = []
    print(f"calibrated cold start: {cold:.3f} s (median first row of wave 1)")
    print(f"model over {CHECK_SEEDS} seeds: median [5th, 95th percentile]")
    print(f"{'figure':26} {'real':>7} {'model median [p5, p95]':>26} {'tolerance':>9}")
    for key, tol in TOLERANCE.items():
        values = sorted(float(r[key]) for r in runs)
        low = values[int(0.05 * (len(values) - 1))]
        high = values[math.ceil(0.95 * (len(values) - 1))]
        mid = statistics.median(values)
        # One real run is one draw: it must fall within the model's spread, widened by
        # the tolerance (the maxima are single extreme events and vary run to run).
        ok = low - tol <= real[key] <= high + tol
        failed += [] if ok else [key]
        band = f"{mid:.3f} [{low:.3f}, {high:.3f}]"
        print(f"{key:26} {real[key]:>7} {band:>26} {tol:>9}  {'ok' if ok else 'OUT'}")
    return 1 if failed else 0


# --- output -------------------------------------------------------------------------------------
def svg_timeline(results: list[Result], title: str) -> str:
    """Server connections over time, one line per result (a self-contained SVG)."""
    width, height, pad = 640, 300, 40
    tmax = max(r.scenario.duration for r in results)
    ymax = max(max((c for _, c in r.timeline), default=1) for r in results)
    ymax = max(ymax, max(r.scenario.max_connections - r.scenario.reserved for r in results))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{pad}" y="16">{title}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" '
        'stroke="black"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{pad}" y2="24" stroke="black"/>',
        f'<text x="{width - 60}" y="{height - 8}">{tmax:.0f} s</text>',
        f'<text x="2" y="30">{ymax}</text>',
    ]

    def xy(t: float, c: float) -> str:
        x = pad + (width - pad - 10) * t / tmax
        y = height - pad - (height - pad - 24) * c / ymax
        return f"{x:.1f},{y:.1f}"

    for k, r in enumerate(results):
        points: list[str] = []
        step = max(1, len(r.timeline) // 2000)
        last = 0
        for t, c in r.timeline[::step]:
            points.append(xy(t, last))
            points.append(xy(t, c))
            last = c
        colour = colours[k % len(colours)]
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1" '
            f'points="{" ".join(points)}"/>'
        )
        out.append(
            f'<text x="{pad + 10}" y="{40 + 14 * k}" fill="{colour}">{r.scenario.name}</text>'
        )
        budget = r.scenario.max_connections - r.scenario.reserved
        out.append(
            f'<line x1="{pad}" x2="{width - 10}" y1="{xy(0, budget).split(",")[1]}" '
            f'y2="{xy(0, budget).split(",")[1]}" stroke="{colour}" stroke-dasharray="4 3"/>'
        )
    out.append("</svg>")
    return "\n".join(out)


def svg_cdf(results: list[Result], title: str) -> str:
    """The distribution of time to first connection (log-spaced x axis)."""
    width, height, pad = 640, 300, 40
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    lo, hi = 0.01, 60.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{pad}" y="16">{title}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" '
        'stroke="black"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{pad}" y2="24" stroke="black"/>',
        '<text x="2" y="30">100%</text>',
    ]

    def x_of(t: float) -> float:
        t = min(hi, max(lo, t))
        return pad + (width - pad - 10) * math.log(t / lo) / math.log(hi / lo)

    for tick in (0.01, 0.1, 1, 10, 60):
        out.append(f'<text x="{x_of(tick) - 8:.0f}" y="{height - 24}">{tick:g}s</text>')
    for k, r in enumerate(results):
        waits = sorted(r.first_waits)
        n = r.scenario.instances
        step = max(1, len(waits) // 1000)
        points = [
            f"{x_of(w):.1f},{height - pad - (height - pad - 24) * (j + 1) / n:.1f}"
            for j, w in list(enumerate(waits))[::step]
        ]
        colour = colours[k % len(colours)]
        out.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
            f'points="{" ".join(points)}"/>'
        )
        out.append(
            f'<text x="{pad + 10}" y="{40 + 14 * k}" fill="{colour}">{r.scenario.name}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def table(results: list[Result]) -> str:
    head = (
        "| scenario | converge | view error | Jain | time holding a connection "
        "| peak conns (budget) | first row p50 / p99 / max | longest at zero | refusals "
        "| samples/s | first waits <0.1s / <1s / <5s / <15s / more |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        f = r.figures()
        b = f["first_wait_buckets"]
        budget = (
            "PgBouncer pool"
            if r.scenario.pooler
            else str(r.scenario.max_connections - r.scenario.reserved)
        )
        zero = "n/a" if r.scenario.pooler else f"{f['zero_max']} s"
        view = "n/a" if r.scenario.pooler else f"{100 * f['view_error_median']:.1f}%"
        held = "n/a" if r.scenario.pooler else f"{100 * f['held_share']:.0f}%"
        samples = "n/a" if r.scenario.pooler else f"{f['samples_per_s']:.0f}"
        converge = "not by the end" if f["converge_s"] is None else f"{f['converge_s']} s"
        rows.append(
            f"| {r.scenario.name} | {converge} | {view} | {f['jain']} | {held} | "
            f"{f['peak_server_connections']} ({budget}) | {f['first_row_p50']} / "
            f"{f['first_row_p99']} / {f['first_row_max']} s | {zero} | {f['overloads']} | "
            f"{samples} | "
            f"{b['<0.1s']} / {b['<1s']} / {b['<5s']} / {b['<15s']} / {b['>=15s']} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 instead of 10,000")
    parser.add_argument("--check", type=Path, help="compare with the real test's figures")
    parser.add_argument("--write", type=Path, help="print the table into this markdown file")
    parser.add_argument("--svg-dir", type=Path, help="write the plots here")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check)
    results = []
    for s in scenarios(args.quick):
        result = simulate(s)
        print(s.name, json.dumps(result.figures()), flush=True)
        results.append(result)
    text = table(results)
    print(text)
    if args.svg_dir:
        args.svg_dir.mkdir(parents=True, exist_ok=True)
        direct = [r for r in results if not r.scenario.pooler]
        (args.svg_dir / "connections.svg").write_text(
            svg_timeline(direct, "Server connections over time (dashed: budget)")
        )
        (args.svg_dir / "first_connection.svg").write_text(
            svg_cdf(results, "Time to first row, cumulative share of instances")
        )
    if args.write:
        marker = "<!-- fleet_sim table -->"
        doc = args.write.read_text()
        start, end = doc.find(marker), doc.rfind(marker)
        if start >= 0 and end > start:
            doc = doc[: start + len(marker)] + "\n" + text + doc[end:]
            args.write.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
