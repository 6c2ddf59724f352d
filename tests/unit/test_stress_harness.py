"""Pure parts of the stress harness: waves, the fleet figures, the report's error kinds
from the library's classifier, and the bytecode step (on a throwaway package)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pgwarden.stress import clients, fleet, report, results, scenarios
from pgwarden.stress.worker import Phase
from pgwarden.stress.workers import compile_bytecode


def test_waves_split_processes_and_delay_arrivals() -> None:
    waves = scenarios.Waves(count=3, every=2.0)
    assert [waves.wave_of(i, 9) for i in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [waves.delay(i, 6) for i in range(6)] == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]


def test_phases_for_a_late_arrival_end_with_everyone() -> None:
    waves = scenarios.Waves(count=3, every=2.0)
    phases = (Phase(start=0.0, interval=0.02, duration=9.0),)
    assert waves.phases_for(phases, 0.0) == phases
    # Arriving at 4 s of a phase that ends at 9 s: 5 s left, from its arrival.
    assert waves.phases_for(phases, 4.0) == (Phase(start=0.0, interval=0.02, duration=5.0),)
    # A phase over before the arrival is dropped; a later one keeps its start.
    two = (Phase(0.0, 0.02, duration=1.0), Phase(6.0, 0.02, requests=5))
    assert waves.phases_for(two, 4.0) == (Phase(2.0, 0.02, requests=5),)


def test_fleet_plan_budget_is_below_combined_max_size() -> None:
    for size in scenarios.SIZES:
        plan = scenarios.SCENARIOS["fleet"].build(size, 5.0)
        wl = plan.workload
        assert plan.waves is not None
        assert plan.waves.count >= 2
        (variant,) = plan.variants
        assert variant.client == "pgwarden"
        assert isinstance(variant.fleet_budget, int)
        assert variant.fleet_budget < wl.processes * wl.pool_size
        # Every wave is in before the phases end: there is a window with all of them.
        assert (plan.waves.count - 1) * plan.waves.every + 1.0 < wl.end(plan.deadline)
    assert "fleet" in scenarios.OPT_IN
    assert "fleet" not in scenarios.DEFAULT


@pytest.mark.parametrize(
    ("name", "worker"),
    [
        ("pgwstress-pgwarden.3", 3),
        ("pgwstress-pgwarden+budget.12 pgwarden:pgws-1a2b:0123abcd", 12),
        ("pgwstress-psycopg_pool", None),
        ("pgwarden:default:0123abcd", None),
        ("psql", None),
    ],
)
def test_worker_of_application_name(name: str, worker: int | None) -> None:
    assert fleet.worker_of(name) == worker


def _sampler(samples: list[tuple[float, dict[str, int]]]) -> Any:
    return SimpleNamespace(by_app_samples=samples)


def test_fleet_figures_first_success_and_shares() -> None:
    plan = scenarios.Plan(
        workload=scenarios.Workload(
            processes=2, threads=1, pool_size=4, phases=(Phase(0.0, 0.1, duration=6.0),)
        ),
        waves=scenarios.Waves(count=2, every=2.0),
    )
    group = SimpleNamespace(procs=[SimpleNamespace(index=0), SimpleNamespace(index=1)])
    app = "pgwstress-pgwarden+budget.{} pgwarden:t:0123abcd"
    samples = [(0.5, {app.format(0): 4})]
    samples += [(t / 10, {app.format(0): 3, app.format(1): 1}) for t in range(30, 60)]
    got = fleet.fleet_figures(plan, group, [0.2, None], _sampler(samples))  # type: ignore[arg-type]
    assert got["processes"] == [
        {"worker": 0, "wave": 0, "arrived_s": 0.0, "first_success_s": 0.2},
        {"worker": 1, "wave": 1, "arrived_s": 2.0, "first_success_s": None},
    ]
    assert got["never"] == 1
    assert got["first_success_s"] == {"p50": 0.2, "max": 0.2}
    # From the last arrival plus a second (3 s) to the end (6 s): 3 of 4 and 1 of 4.
    assert got["share_all_arrived"] == {"min_pct": 25.0, "max_pct": 75.0}
    assert got["connections"]["1"][0] == [0.5, 0]
    assert [0.5, 4] in got["connections"]["0"]
    assert [3.0, 3] in got["connections"]["0"]


def test_fleet_chart_and_line_in_the_report() -> None:
    result = {
        "fleet": {
            "processes": [
                {"worker": 0, "wave": 0, "arrived_s": 0.0, "first_success_s": 0.1},
                {"worker": 1, "wave": 1, "arrived_s": 2.0, "first_success_s": 0.3},
            ],
            "first_success_s": {"p50": 0.3, "max": 0.3},
            "never": 0,
            "share_all_arrived": {"min_pct": 40.0, "max_pct": 60.0},
            "connections": {"0": [[0.0, 0], [0.2, 4], [3.0, 3]], "1": [[0.0, 0], [2.2, 2]]},
        }
    }
    svg = report.fleet_chart(result, 6.0, 10, "pgwarden+budget")
    assert svg.count("<polygon") == 2
    assert "fleet_budget" in svg
    line = report.fmt_fleet({"pgwarden+budget": result})
    assert line is not None
    assert "share 40-60%" in line
    assert "max 300ms" in line


def test_variants_of_pgwarden_count_in_its_invariants() -> None:
    bad = {"duplicates": 1, "lost_writes": 0, "orm": None}
    data = {"scenarios": [{"name": "fleet", "results": {"pgwarden+budget": bad}}]}
    assert report.invariant_failures(data) == ["fleet (pgwarden+budget): 1 duplicate write(s)"]
    data = {"scenarios": [{"name": "fleet", "results": {"psycopg_pool": bad}}]}
    assert report.invariant_failures(data) == []


def test_spread_is_median_and_worst() -> None:
    assert results.spread([]) == {"p50": None, "max": None}
    assert results.spread([0.3, 0.1, 0.2, 0.4]) == {"p50": 0.3, "max": 0.4}


class _Fake(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_Fake("canceling statement due to statement timeout", "57014"), "statement_timeout"),
        (_Fake("the database system is starting up", "57P03"), "server_starting"),
        (_Fake("terminating connection due to administrator command", "57P01"), "conn_lost"),
        (_Fake("duplicate key value", "23505"), "duplicate_key"),
        (_Fake('prepared statement "s1" does not exist', "26000"), "prepared_stmt"),
        (_Fake("cannot execute INSERT in a read-only transaction", "25006"), "read_only"),
        (_Fake("could not serialize access", "40001"), "conflict"),
        (_Fake("too many connections for role", "53300"), "too_many_clients"),
        (_Fake("connection to server failed: timeout expired"), "connect_timeout"),
        (_Fake("query_wait_timeout", "08P01"), "pooler_timeout"),
        (_Fake("connection failed: session is read-only"), "no_primary"),
        (_Fake("syntax error", "42601"), "other"),
        (TimeoutError(), "deadline"),
    ],
)
def test_report_kinds_come_from_the_library_classifier(exc: BaseException, kind: str) -> None:
    assert clients.classify(exc) == kind


def test_compile_bytecode_compiles_a_package_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pgws_bytecode_probe"
    package.mkdir()
    (package / "__init__.py").write_text("X = 1\n")
    (package / "mod.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    info = compile_bytecode(("pgws_bytecode_probe", "pgws_not_installed_anywhere"))
    assert info["packages"] == {
        "pgws_bytecode_probe": "compiled",
        "pgws_not_installed_anywhere": "not installed",
    }
    assert info["dont_write_bytecode"] is True
    tag = sys.implementation.cache_tag
    assert (package / "__pycache__" / f"mod.{tag}.pyc").exists()
    assert (package / "__pycache__" / f"__init__.{tag}.pyc").exists()
    assert "pgws_bytecode_probe" not in sys.modules  # looked up, never imported
