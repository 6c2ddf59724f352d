"""``pgwarden stress``: every scenario at size ``tiny``, plus the pure parts without a server.

The scenario tests assert the report's structure (the table printed, the JSON keys, an HTML
file that loads nothing from the network) and pgwarden's invariants: no duplicate writes
and no lost acknowledged writes. They assert no timings; timings are what the report is
for. Each scenario test starts its own throwaway servers, as ``pgwarden stress`` does.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pgwarden.cli.main import main
from pgwarden.stress import analysis, clients, harness, live, report, scenarios, workers
from pgwarden.testing.plugin import unavailable

RESULT_KEYS = {
    "requests",
    "ok",
    "success_pct",
    "failed",
    "failed_with_deadline_left",
    "errors",
    "latency_ms",
    "peak_server_connections",
    "recovery_s",
    "recoveries",
    "duplicates",
    "lost_writes",
    "writes_acked",
    "faults",
    "series",
    "workers",
}
HEADER = re.compile(
    r"^client\s+reqs\s+success\s+fail-left\s+p50\s+p95\s+p99\s+max\s+conns\s+", re.M
)


@pytest.fixture
def postgres_binaries() -> None:
    from pgwarden.testing import ServerUnavailable, find_postgres_bindir

    try:
        find_postgres_bindir()
    except ServerUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def pgbouncer_binary(postgres_binaries: None) -> None:
    from pgwarden.testing import ServerUnavailable, find_pgbouncer

    try:
        find_pgbouncer()
    except ServerUnavailable as exc:
        unavailable(str(exc))


def run_cli(
    capsys: pytest.CaptureFixture[str], out: Path, *args: str
) -> tuple[int, str, str, dict[str, Any]]:
    code = main(["stress", "--size", "tiny", "--out", str(out), *args])
    captured = capsys.readouterr()
    data = json.loads((out / "results.json").read_text())
    return code, captured.out, captured.err, data


def check_html(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("<!doctype html>")
    assert "<svg" in text
    for needle in ("http://", "https://", "<script", "<link", " src=", "url("):
        assert needle not in text, f"the report must load nothing: found {needle!r}"


def check_report(
    data: dict[str, Any], names: list[str], client_names: list[str], stdout: str
) -> None:
    """Structure of the JSON and the printed tables, and pgwarden's invariants."""
    assert data["format"] == harness.FORMAT
    assert data["finished_at"]
    assert not data["interrupted"]
    assert {"platform", "cpus", "python", "packages"} <= set(data["machine"])
    assert [e["name"] for e in data["scenarios"]] == names
    assert len(HEADER.findall(stdout)) == sum(1 for e in data["scenarios"] if not e["skipped"])
    for entry in data["scenarios"]:
        assert {"name", "title", "description", "params", "skipped", "results"} <= set(entry)
        if entry["skipped"]:
            continue
        assert f"== {entry['name']}: {entry['title']}" in stdout
        assert list(entry["results"]) == client_names
        for client, r in entry["results"].items():
            assert set(r) >= RESULT_KEYS, f"{entry['name']}/{client}: missing keys"
            assert r["requests"] > 0, f"{entry['name']}/{client}: no requests ran"
            assert r["workers"]["reported"] == entry["params"]["processes"], r["worker_errors"]
            assert set(r["latency_ms"]) == {"p50", "p95", "p99", "max"}
            assert r["series"]["connections"], "the sampler recorded nothing"
            assert re.search(rf"^{re.escape(client)}\s+{r['requests']}\s", stdout, re.M)
        for name in clients.PGWARDEN_CLIENTS:
            pgw = entry["results"].get(name)
            if pgw is None:
                continue
            assert pgw["duplicates"] == 0, f"{entry['name']}: {name} wrote duplicates"
            assert pgw["lost_writes"] == 0, f"{entry['name']}: {name} lost acked writes"
            assert pgw["harness_errors"] == [], pgw["harness_errors"]
            assert not (pgw["orm"] or {}).get("torn"), f"{entry['name']}: {name} tore a unit"
    assert "pgwarden invariants" in stdout


# --------------------------------------------------------------------------------------------
# Scenarios (each at size tiny, each with its own servers)


@pytest.mark.slow
def test_flagship_all_clients(
    postgres_binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--quick`` (storm + restart) with every client: what ``make demo`` runs."""
    markdown = tmp_path / "bench.md"
    code, out, err, data = run_cli(capsys, tmp_path, "--quick", "--markdown", str(markdown))
    check_report(data, ["storm", "restart"], list(clients.CLIENTS), out)
    assert code == 0
    assert re.search(r"restart\s+pgwarden\s+\d+\.\ds\s+ok\s+\d+", err), "no progress lines"
    restart = data["scenarios"][1]
    for r in restart["results"].values():
        assert [f["action"] for f in r["faults"]] == ["restart_fast", "restart_immediate"]
        assert all(f["end"] >= f["start"] for f in r["faults"])
        assert len(r["recoveries"]) == 2
    storm = data["scenarios"][0]
    assert storm["max_connections"] == 20
    assert "first success per process" in out
    # Every client from compiled bytecode, and its time from spawn to first row reported.
    assert data["bytecode"]["packages"]["pgwarden"] == "compiled"
    assert "bytecode: compiled pgwarden" in out
    assert "from process spawn to first row" in out
    for r in storm["results"].values():
        spawn = r["first_row_from_spawn_s"]
        assert spawn["p50"] is not None
        # It includes the start-signal-to-first-success time, and the interpreter start.
        assert spawn["p50"] > r["first_success_s"]["p50"] > 0
    check_html(tmp_path / "report.html")
    assert str(tmp_path / "report.html") in out
    text = markdown.read_text()
    assert "### storm: cold-start storm" in text
    assert "### restart: restart under load" in text
    assert len(HEADER.findall(text)) == 2


@pytest.mark.slow
def test_sqlalchemy_clients_with_the_orm_workload(
    postgres_binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """restart and kills with both SQLAlchemy clients: Core reads and writes plus ORM units of
    work; sqlalchemy-pgwarden (run_transaction) has no duplicate, lost or torn write."""
    names = ["sqlalchemy", "sqlalchemy-pgwarden"]
    code, out, _, data = run_cli(
        capsys, tmp_path, "--scenario", "restart,kills", "--clients", ",".join(names), "-q"
    )
    check_report(data, ["restart", "kills"], names, out)
    assert code == 0
    assert re.search(r"^pgwarden invariants \(.*sqlalchemy-pgwarden\): held", out, re.M)
    for entry in data["scenarios"]:
        assert entry["params"]["orm_share"] == scenarios.ORM_SHARE
        for client in names:
            r = entry["results"][client]
            orm = r["orm"]
            assert orm is not None, f"{entry['name']}/{client}: no unit of work ran"
            assert orm["units"] > 0
            assert orm["ok"] > 0
            assert orm["torn"] == 0, f"{entry['name']}/{client}: a unit committed in pieces"
            ops = {rec[3] for rec in r["series"]["requests"]}
            assert "o" in ops
            stats = r["client_stats"]
            assert stats["orm_units"] == orm["units"], stats
            assert stats["orm_attempts"] >= stats["orm_units"]
            assert re.search(rf"^   {client}: ORM units of work {orm['units']} ", out, re.M)
        pgw = entry["results"]["sqlalchemy-pgwarden"]
        assert pgw["duplicates"] == 0
        assert pgw["lost_writes"] == 0
        assert pgw["orm"]["duplicates"] == 0
        assert pgw["orm"]["lost"] == 0
    check_html(tmp_path / "report.html")
    assert "ORM units of work" in (tmp_path / "report.html").read_text()


OTHER_SCENARIOS = [
    pytest.param("kills", marks=pytest.mark.slow),
    pytest.param("overload", marks=pytest.mark.slow),
    pytest.param("flaky", marks=[pytest.mark.slow, pytest.mark.proxy]),
    pytest.param("idle", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", OTHER_SCENARIOS)
def test_scenario(
    name: str, postgres_binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _, data = run_cli(
        capsys, tmp_path, "--scenario", name, "--clients", "pgwarden,psycopg_pool", "-q"
    )
    check_report(data, [name], ["pgwarden", "psycopg_pool"], out)
    assert code == 0
    entry = data["scenarios"][0]
    planned = [f["action"] for f in entry["params"]["faults"]]
    for r in entry["results"].values():
        assert [f["action"] for f in r["faults"]] == planned
    check_html(tmp_path / "report.html")


@pytest.mark.slow
def test_failover_scenario(
    postgres_binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both failovers (fence, then crash) against pgwarden and psycopg_pool: pgwarden's
    writes come back soon after each promotion and none fails with 25006 after it, while
    psycopg_pool's pooled sessions to the fenced primary keep refusing writes (the
    contrast shows the scenario reaches 25006 at all). Bounds are generous."""
    code, out, _, data = run_cli(
        capsys, tmp_path, "--scenario", "failover", "--clients", "pgwarden,psycopg_pool", "-q"
    )
    check_report(data, ["failover"], ["pgwarden", "psycopg_pool"], out)
    assert code == 0
    entry = data["scenarios"][0]
    assert "synchronous standby" in entry["target"]
    planned = [f["action"] for f in entry["params"]["faults"]]
    assert planned == ["failover_fence", "rejoin", "failover_crash", "rejoin"]
    for r in entry["results"].values():
        assert [f["action"] for f in r["faults"]] == planned
        assert r["harness_errors"] == [], r["harness_errors"]
        assert [p["demote"] for p in r["failover"]["promotions"]] == ["fence", "crash"]
    result = entry["results"]["pgwarden"]
    pgw = result["failover"]
    why = (pgw, result["error_samples"], result["client_stats"].get("errors"))
    assert pgw["never"] == 0, why
    assert pgw["first_write_s"] < 3.0, why
    assert pgw["stuck_writes"] == 0, why
    assert entry["results"]["psycopg_pool"]["failover"]["stuck_writes"] > 0
    assert "after promotion (worst of each failover): pgwarden first write" in out
    check_html(tmp_path / "report.html")
    assert "after promotion" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_fleet_scenario(
    postgres_binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Processes arriving in waves; pgwarden runs twice (without and with fleet_budget),
    right after each other; per process, first success and connections over time."""
    code, out, _, data = run_cli(
        capsys, tmp_path, "--scenario", "fleet", "--clients", "pgwarden,psycopg_pool", "-q"
    )
    check_report(data, ["fleet"], ["pgwarden", "pgwarden+budget", "psycopg_pool"], out)
    assert code == 0
    entry = data["scenarios"][0]
    params = entry["params"]
    budget = params["variants"]["pgwarden+budget"]["fleet_budget"]
    # The point of the scenario: the budget is below the processes' combined max_size.
    assert budget < params["processes"] * params["pool_size"]
    waves = params["waves"]
    for client, r in entry["results"].items():
        fleet = r["fleet"]
        assert [p["worker"] for p in fleet["processes"]] == list(range(params["processes"]))
        assert {p["wave"] for p in fleet["processes"]} == set(range(waves["count"]))
        late = [p for p in fleet["processes"] if p["wave"] == waves["count"] - 1]
        assert all(p["arrived_s"] == (waves["count"] - 1) * waves["every_s"] for p in late)
        assert set(fleet["connections"]) == {str(i) for i in range(params["processes"])}
        # A process has no connection before it arrives.
        for p in fleet["processes"]:
            steps = fleet["connections"][str(p["worker"])]
            assert all(n == 0 for t, n in steps if t < p["arrived_s"] - 0.2), (client, p)
        assert fleet["never"] == 0, f"{client}: a process never succeeded"
    pgw = entry["results"]["pgwarden+budget"]
    assert pgw["fleet"]["share_all_arrived"]["min_pct"] is not None
    assert "share of connections while all were in" in out
    html_text = (tmp_path / "report.html").read_text()
    check_html(tmp_path / "report.html")
    assert "connections per process" in html_text
    assert "fleet_budget" in html_text


@pytest.mark.slow
@pytest.mark.pgbouncer
def test_pgbouncer_scenarios(
    pgbouncer_binary: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _, data = run_cli(
        capsys, tmp_path, "--scenario", "pgbouncer", "--clients", "pgwarden,naive", "-q"
    )
    check_report(data, ["pgbouncer-storm", "pgbouncer-restart"], ["pgwarden", "naive"], out)
    assert code == 0
    for entry in data["scenarios"]:
        assert "PgBouncer" in entry["target"]
        assert entry["params"]["pgbouncer"]["pool_mode"] == "transaction"
    check_html(tmp_path / "report.html")


@pytest.mark.slow
def test_given_url_skips_what_needs_control(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err, data = run_cli(
        capsys,
        tmp_path,
        "--url",
        pg_url,
        "--scenario",
        "storm,restart,overload",
        "--clients",
        "pgwarden,naive",
    )
    assert code == 0
    check_report(data, ["storm", "restart", "overload"], ["pgwarden", "naive"], out)
    storm, restart, overload = data["scenarios"]
    assert storm["skipped"] is None
    assert "restart the server" in restart["skipped"]
    assert "max_connections=20" in overload["skipped"]
    assert "restart: restart under load: SKIPPED" in out
    assert "need their own server are skipped" in err
    assert "***" in data["options"]["target"]  # the password is masked
    assert str(pg_url) not in json.dumps(data)
    check_html(tmp_path / "report.html")


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) for every process, from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every process below ``root``."""
    table = _process_table()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_ctrl_c_stops_everything(postgres_binaries: None, tmp_path: Path) -> None:
    """SIGINT mid-run: exit 130, partial report written, no worker or server left."""
    import signal

    out = tmp_path / "out"
    argv = ["stress", "--scenario", "restart", "--size", "tiny", "--clients", "pgwarden"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgwarden.cli.main", *argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            line = proc.stderr.readline()
            if not line or re.search(r"restart\s+pgwarden\s+\d", line):
                break
        children = _descendants(proc.pid)
        assert len(children) >= 4, "expected the server and the workers to be running"
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "report:" in stdout
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is True
    left: dict[int, str] = {}
    for _ in range(50):  # a server's last children exit a moment after it returns
        table = _process_table()
        left = {pid: st for pid, st in children.items() if table.get(pid, (0, ""))[1] == st}
        if not left:
            break
        time.sleep(0.1)
    assert left == {}


def _get(url: str, timeout: float = 5.0) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        return response.headers.get("content-type", ""), response.read().decode()


@pytest.mark.slow
def test_dashboard_shows_merged_worker_stats(postgres_binaries: None, tmp_path: Path) -> None:
    """``--dashboard 0``: the printed URL serves the page and the workers' merged stats while
    the scenario runs, and nothing listens once the run is over."""
    argv = ["stress", "--scenario", "kills", "--size", "tiny", "--clients", "pgwarden", "-q"]
    argv += ["--dashboard", "0", "--out", str(tmp_path / "out")]
    with open(tmp_path / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgwarden.cli.main", *argv],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.stderr is not None
    stderr = proc.stderr
    lines: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        for line in iter(stderr.readline, ""):
            lines.put(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    url = ""
    stats: dict[str, Any] = {}
    page = ("", "")
    try:
        end = time.monotonic() + 60
        while not url and time.monotonic() < end and proc.poll() is None:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            found = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", line)
            url = found.group(1) if found else ""
        assert url, "the dashboard URL was never printed"
        page = _get(url)
        end = time.monotonic() + 60
        while time.monotonic() < end and proc.poll() is None:
            _, body = _get(url + "stats.json")
            got = json.loads(body)
            assert got["error"] is None, got["error"]
            stats = got["stats"]
            if stats["counters"].get("queries", 0) > 0 and stats["stress"]["reporting"] > 0:
                break
            time.sleep(0.2)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        stderr.close()
    assert proc.returncode == 0
    assert stats["counters"]["queries"] > 0, stats
    assert stats["stress"]["scenario"] == "kills"
    assert stats["stress"]["client"] == "pgwarden"
    assert stats["pool"]["max_size"] > 0
    assert stats["state"] in live.STATE_ORDER
    assert stats["breaker"] in live.BREAKER_ORDER
    assert stats["buckets"]["query_duration_seconds"][-1][0] == "+Inf"
    content_type, html = page
    assert content_type.startswith("text/html")
    assert html.lstrip().lower().startswith("<!doctype html>")
    for needle in ("http://", "https://", "<link", " src=", "url("):
        assert needle not in html, f"the page must load nothing: found {needle!r}"
    with pytest.raises(OSError):
        _get(url, timeout=2)  # stopped with the run


def test_dashboard_server_serves_live_stats() -> None:
    """In-process, no database: LiveStats behind DashboardServer, through a run's life."""
    snaps: list[dict[str, Any] | None] = [None, None]
    source = live.LiveStats()
    with live.DashboardServer(source, 0) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
        got = json.loads(_get(server.url + "stats.json")[1])
        assert got["error"] is None
        assert got["stats"]["stress"]["status"] == "waiting"
        source.attach(lambda: snaps, scenario="restart", client="pgwarden", processes=2)
        snaps[0] = _snap(queries=5, in_use=1, state="ready")
        got = json.loads(_get(server.url + "stats.json")[1])["stats"]
        assert got["counters"]["queries"] == 5
        assert got["stress"]["reporting"] == 1
        snaps[1] = _snap(queries=7, in_use=2, state="degraded")
        got = json.loads(_get(server.url + "stats.json")[1])["stats"]
        assert got["counters"]["queries"] == 12
        assert got["state"] == "degraded"
        source.finish()
        got = json.loads(_get(server.url + "stats.json")[1])["stats"]
        assert got["counters"]["queries"] == 12  # carried over: counters never go back
        assert got["pool"] == {}
        assert got["stress"]["runs_finished"] == 1
        url = server.url
    with pytest.raises(OSError):
        _get(url, timeout=2)


def _snap(*, queries: int, in_use: int, state: str) -> dict[str, Any]:
    return {
        "counters": {"queries": queries, "errors": {"conn_lost": 1}, "retries": {"total": 1}},
        "histograms": {
            "query_duration_seconds": {
                "count": queries,
                "sum": 0.01 * queries,
                "min": 0.001,
                "max": 0.05 * queries,
                "p50": 0.01,
                "p95": 0.02,
                "p99": 0.01 * queries,
            }
        },
        "buckets": {"query_duration_seconds": [[0.01, queries - 1], ["+Inf", queries]]},
        "pool": {"size": 4, "idle": 4 - in_use, "in_use": in_use, "max_size": 4, "utilization": 1},
        "state": state,
        "breaker": "closed",
        "in_flight": in_use,
        "pgbouncer": False,
    }


def test_merge_live_sums_counters_buckets_and_takes_the_worst_state() -> None:
    a = _snap(queries=10, in_use=1, state="ready")
    b = _snap(queries=30, in_use=3, state="open")
    b["breaker"] = "half_open"
    merged = live.merge_live([a, None, b])
    assert merged["counters"] == {
        "queries": 40,
        "errors": {"conn_lost": 2},
        "retries": {"total": 2},
    }
    assert merged["buckets"]["query_duration_seconds"] == [[0.01, 38], ["+Inf", 40]]
    h = merged["histograms"]["query_duration_seconds"]
    assert h["count"] == 40
    assert h["min"] == 0.001
    assert h["max"] == pytest.approx(1.5)
    assert h["p50"] == pytest.approx(0.01)
    assert h["p99"] == pytest.approx((10 * 0.1 + 30 * 0.3) / 40)  # count-weighted
    assert merged["pool"]["in_use"] == 4
    assert merged["pool"]["max_size"] == 8
    assert merged["pool"]["utilization"] == pytest.approx(0.5)
    assert merged["state"] == "open"
    assert merged["states"] == {"ready": 1, "open": 1}
    assert merged["breaker"] == "half_open"
    assert merged["in_flight"] == 4
    base = {k: merged[k] for k in ("counters", "histograms", "buckets")}
    again = live.merge_live([], base)
    assert again["counters"]["queries"] == 40
    assert again["pool"] == {}
    assert again["state"] == "new"


# --------------------------------------------------------------------------------------------
# Command line errors (no server needed)


def test_unknown_scenario_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stress", "--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown scenario(s): nope" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_unknown_client_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--clients", "pgwarden,asyncpg"]) == 2
    assert "unknown client(s): asyncpg" in capsys.readouterr().err


def test_dashboard_needs_the_pgwarden_client(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--clients", "naive", "--dashboard"]) == 2
    assert "--dashboard shows the pgwarden client" in capsys.readouterr().err


def test_dashboard_port_in_use_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["stress", "--dashboard", str(port), "--out", str(tmp_path)])
    assert code == 2
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_remote_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://u:secret@db.example.com:5432/app"
    assert main(["stress", "--url", url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a loopback address" in err
    assert "secret" not in err


def test_help_lists_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stress", "--help"]) == 0
    out = capsys.readouterr().out
    for name in scenarios.SCENARIOS:
        assert name in out
    assert "--quick" in out
    # Every client is named, and the count is theirs (it once said five of seven).
    assert f"with {len(clients.CLIENTS)} clients" in " ".join(out.split())
    assert "fleet" in out
    assert "(opt-in)" in out


def test_help_subprocess_lists_stress() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgwarden.cli.main", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "stress" in proc.stdout


# --------------------------------------------------------------------------------------------
# Pure parts


def test_resolve_aliases() -> None:
    assert scenarios.resolve(["all"]) == list(scenarios.SCENARIOS)
    assert scenarios.resolve(["default"]) == [
        n for n in scenarios.SCENARIOS if n not in scenarios.OPT_IN
    ]
    assert "fleet" not in scenarios.resolve(["default"])
    assert scenarios.resolve(["fleet"]) == ["fleet"]
    assert scenarios.resolve(["pgbouncer", "storm"]) == [
        "storm",
        "pgbouncer-storm",
        "pgbouncer-restart",
    ]
    assert scenarios.resolve(["restart-under-load", "restart"]) == ["restart"]
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.resolve(["storm", "bogus"])


@pytest.mark.parametrize("size", scenarios.SIZES)
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_plans_are_bounded(name: str, size: scenarios.Size) -> None:
    plan = scenarios.SCENARIOS[name].build(size, 5.0)
    wl = plan.workload
    assert 1 <= wl.processes <= 64
    assert 1 <= wl.threads <= 8
    assert plan.hard_limit < 120
    for phase in wl.phases:
        assert phase.requests is not None or phase.duration is not None
    for fault in plan.faults:
        assert 0 < fault.at < plan.hard_limit


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("postgresql://u:p@127.0.0.1:5432/db", True),
        ("postgresql://u:p@localhost/db", True),
        ("postgresql://u:p@[::1]:5432/db", True),
        ("host=/var/run/postgresql dbname=x", True),
        ("postgresql://u:p@10.0.0.5/db", False),
        ("postgresql://u:p@db.internal/db", False),
    ],
)
def test_loopback_problem(url: str, ok: bool) -> None:
    assert (harness.loopback_problem(url) is None) is ok


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert analysis.percentile(values, 50) == 50
    assert analysis.percentile(values, 99) == 99
    assert analysis.percentile(values, 100) == 100
    assert analysis.percentile([], 50) is None


def test_summarize_counts_duplicates_lost_and_deadline_left() -> None:
    records = [
        [0.0, 0.010, "w", "ok"],  # a
        [0.1, 0.020, "w", "ok"],  # b: acked but missing -> lost
        [0.2, 0.030, "w", "conn_lost"],  # c: failed fast -> deadline left
        [0.3, 4.900, "r", "deadline"],  # used the deadline
        [0.4, 6.000, "r", "late"],  # returned after the deadline
        [2.5, 0.005, "r", "ok"],  # first success after the fault ended at 2.0
    ]
    result = analysis.summarize(
        records,
        deadline=5.0,
        faults=[{"label": "restart", "start": 1.0, "end": 2.0, "recover": True}],
        samples=[(0.0, 3), (0.1, None), (0.2, 7)],
        acked=["a", "b"],
        unacked=["c"],
        rows={"a": 2, "c": 1},
        first_ok=[0.01, None],
    )
    assert result["requests"] == 6
    assert result["ok"] == 3
    assert result["failed_with_deadline_left"] == 1
    assert result["errors"] == {"conn_lost": 1, "deadline": 1, "late": 1}
    assert result["duplicates"] == 1
    assert result["lost_writes"] == 1
    assert result["unacked_writes_committed"] == 1
    assert result["peak_server_connections"] == 7
    assert result["recovery_s"] == pytest.approx(0.505)
    assert result["processes_without_success"] == 1
    assert result["latency_ms"]["max"] == 6000.0


def test_failover_figures_first_write_and_stuck_writes() -> None:
    from pgwarden.stress import failover

    faults = [
        {"label": "fence", "start": 1.0, "promoted_at": 1.1, "demote": "fence"},
        {"label": "rejoin", "start": 2.0},
        {"label": "crash", "start": 3.0, "promoted_at": 3.05, "demote": "crash"},
        {"label": "rejoin", "start": 4.0},
    ]
    records: list[list[Any]] = [
        [1.05, 0.01, "w", "read_only"],  # refused before the promotion: not stuck
        [1.08, 0.04, "w", "read_only"],  # refused after it: stuck
        [1.09, 0.2, "w", "ok"],  # issued before the promotion: not the first write after
        [1.2, 0.01, "w", "read_only"],  # stuck, the last one (0.11 s after)
        [1.3, 0.02, "r", "ok"],  # a read
        [1.5, 0.1, "w", "ok"],  # the first write after the first promotion: 0.5 s
        [3.1, 0.05, "o", "ok"],  # after the second: 0.1 s
    ]
    figures = failover.figures(records, faults, {"errors": {"lost": 1}})
    first, second = figures["promotions"]
    assert first["first_write_s"] == pytest.approx(0.5)
    assert (first["stuck_writes"], first["stuck_for_s"]) == (2, pytest.approx(0.11))
    assert (first["writes_issued"], first["writes_failed"]) == (2, 1)
    assert second["first_write_s"] == pytest.approx(0.1)
    assert second["stuck_writes"] == 0
    assert figures["first_write_s"] == pytest.approx(0.5)
    assert (figures["never"], figures["stuck_writes"]) == (0, 2)
    assert figures["read_only_errors_absorbed"] == 0
    assert failover.figures(records, faults)["read_only_errors_absorbed"] is None
    line = failover.describe({"pgwarden": {"failover": figures, "lost_writes": 0}, "x": {}})
    assert line is not None
    assert "pgwarden first write 500ms, 2 stuck (25006, up to 0.11s after), 0 lost" in line
    assert failover.describe({"x": {}}) is None
    # No successful write after a promotion: never, and no worst figure.
    silent = failover.figures([r for r in records if r[0] < 3.0], faults)
    assert (silent["first_write_s"], silent["never"]) == (None, 1)
    assert "(1 of 2 never)" in (failover.describe({"c": {"failover": silent}}) or "")


def test_summarize_never_recovered() -> None:
    result = analysis.summarize(
        [[0.0, 0.01, "r", "ok"], [3.0, 0.01, "r", "refused"]],
        deadline=5.0,
        faults=[{"label": "blackhole", "start": 1.0, "end": 2.0, "recover": True}],
        samples=[],
        acked=[],
        unacked=[],
        rows={},
    )
    assert result["recovery_s"] is None
    assert result["unrecovered_faults"] == 1
    assert report.fmt_recovery(result) == "never"


def test_summarize_orm_units_duplicates_lost_and_torn() -> None:
    records = [
        [0.0, 0.01, "o", "ok"],  # a: whole
        [0.1, 0.01, "o", "ok"],  # b: ran twice (2 parents, 4 lines): a duplicate, not torn
        [0.2, 0.01, "o", "ok"],  # c: acked but missing: lost
        [0.3, 0.01, "o", "ok"],  # d: a parent without its lines: torn
        [0.4, 0.01, "o", "conn_lost"],  # e: failed, committed anyway
        [0.5, 0.01, "w", "ok"],  # f: a plain write
        [0.6, 0.01, "r", "ok"],
    ]
    result = analysis.summarize(
        records,
        deadline=5.0,
        faults=[],
        samples=[],
        acked=["a", "b", "c", "d", "f"],
        unacked=["e"],
        rows={"a": 1, "b": 2, "d": 1, "e": 1, "f": 1},
        orm_acked=["a", "b", "c", "d"],
        orm_unacked=["e"],
        line_rows={"a": 2, "b": 4, "d": 0, "e": 2},
        lines_per_unit=2,
    )
    assert result["writes"] == 6
    assert result["duplicates"] == 1
    assert result["lost_writes"] == 1
    assert result["unacked_writes_committed"] == 1
    assert result["orm"] == {
        "units": 5,
        "ok": 4,
        "failed": 1,
        "acked": 4,
        "duplicates": 1,
        "lost": 1,
        "torn": 1,
        "unacked_committed": 1,
        "lines_per_unit": 2,
    }
    plain = analysis.summarize(
        records[5:], deadline=5.0, faults=[], samples=[], acked=["f"], unacked=[], rows={"f": 1}
    )
    assert plain["orm"] is None


def test_invariants_cover_sqlalchemy_pgwarden_and_torn_units() -> None:
    data = _fake_report()
    entry = data["scenarios"][0]
    broken = json.loads(json.dumps(entry["results"]["pgwarden"]))
    broken["duplicates"] = 1
    broken["orm"] = {
        "units": 3,
        "ok": 3,
        "failed": 0,
        "acked": 3,
        "duplicates": 1,
        "lost": 0,
        "torn": 1,
        "unacked_committed": 0,
        "lines_per_unit": 2,
    }
    broken["client_stats"] = {"orm_units": 3, "orm_attempts": 4}
    entry["results"]["sqlalchemy"] = broken  # a baseline's duplicates are not pgwarden's
    entry["results"]["sqlalchemy-pgwarden"] = broken
    assert report.invariant_failures(data) == [
        "restart (sqlalchemy-pgwarden): 1 duplicate write(s)",
        "restart (sqlalchemy-pgwarden): 1 torn unit(s) of work",
    ]
    assert report.invariant_failures(data, "pgwarden") == []
    text = report.format_scenario(entry)
    assert (
        "   sqlalchemy-pgwarden: ORM units of work 3 (3 ok, 0 failed, 1 re-run(s)): "
        "1 duplicate(s), 0 lost, 1 torn"
    ) in text
    assert re.search(r"^sqlalchemy-pgwarden\s+51\s", text, re.M)
    md = report.render_markdown(data)
    assert "for pgwarden and sqlalchemy-pgwarden): **FAILED**: restart (sqlalchemy" in md
    page = report.render_html(data)
    assert "<b>FAILED</b>" in page
    assert "ORM units of work 3" in page


def test_sqlalchemy_clients_share_their_code() -> None:
    """sqlalchemy-pgwarden runs the sqlalchemy client's code: it overrides only how the engine
    is made, how the deadline is expressed, how a unit of work commits, its stats and closing
    its pgwarden handle."""
    base, ours = clients.SqlAlchemyClient, clients.SqlAlchemyPgwardenClient
    assert issubclass(ours, base)
    own = {k for k in vars(ours) if not k.startswith("__")}
    assert own == {"_make_engine", "_scope", "_unit_of_work", "stats", "close"}
    assert set(clients.ORM_CLIENTS) == {"sqlalchemy", "sqlalchemy-pgwarden"}
    assert set(clients.PGWARDEN_CLIENTS) <= set(clients.CLIENTS)


class _Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def read(self, key: str, work: float) -> None:
        self.calls.append(("r", key))

    def write(self, run: str, req_id: str, worker: int) -> None:
        self.calls.append(("w", req_id))


class _RecordingOrm(_Recording):
    def orm_write(self, run: str, req_id: str, worker: int) -> None:
        self.calls.append(("o", req_id))


def test_every_client_gets_the_same_requests(tmp_path: Path) -> None:
    """With orm_share, a client without an ORM does a plain write where the SQLAlchemy ones
    run a unit of work: the same requests, in the same order, with the same ids."""
    import random

    from pgwarden.stress.worker import WorkerConfig, _Worker

    cfg = WorkerConfig(
        client="naive",
        url="postgresql://u:p@127.0.0.1:1/db",
        worker=0,
        run="r",
        out=str(tmp_path / "out.json"),
        threads=1,
        pool_size=1,
        deadline=5.0,
        write_ratio=0.5,
        read_work=0.0,
        phases=(),
        max_requests=1,
        hard_limit=1.0,
        seed=1,
        application_name="pgwstress-test",
        orm_share=0.5,
    )

    def run(client: _Recording, orm: bool) -> tuple[list[tuple[str, str]], Any]:
        worker = _Worker(cfg)
        worker.client = client
        worker.orm = orm
        rng = random.Random(7)
        for _ in range(300):
            worker.one_request(0, rng)
        return client.calls, worker.rec

    plain, _ = run(_Recording(), False)
    orm, rec = run(_RecordingOrm(), True)
    assert [rid for _, rid in plain] == [rid for _, rid in orm]
    assert [("w" if op == "o" else op) for op, _ in orm] == [op for op, _ in plain]
    assert {op for op, _ in orm} == {"r", "w", "o"}
    assert rec.orm_acked == [rid for op, rid in orm if op == "o"]
    assert set(rec.orm_acked) <= set(rec.acked)
    assert [r[2] for r in rec.records] == [op for op, _ in orm]


def test_missing_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert clients.missing_requirement("naive") is None
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name.startswith("pgwarden.sqlalchemy") else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert clients.missing_requirement("sqlalchemy") is None
    why = clients.missing_requirement("sqlalchemy-pgwarden")
    assert why is not None
    assert "postgresql+pgwarden" in why


def test_a_client_that_cannot_run_is_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is started when no client can run; the reason is printed (exit 2)."""
    monkeypatch.setattr(harness, "missing_requirement", lambda name: f"{name} is not here")
    code = main(["stress", "--clients", "sqlalchemy-pgwarden", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no client left to run: sqlalchemy-pgwarden is not here" in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["options"]["left_out"] == {"sqlalchemy-pgwarden": "sqlalchemy-pgwarden is not here"}
    assert data["scenarios"] == []


def test_classify_common_errors() -> None:
    import psycopg
    from psycopg_pool import PoolTimeout

    import pgwarden

    def op(message: str) -> psycopg.OperationalError:
        return psycopg.OperationalError(message)

    assert clients.classify(pgwarden.DeadlineExceeded("x")) == "deadline"
    assert clients.classify(pgwarden.DatabaseUnavailable("x")) == "breaker_open"
    assert clients.classify(PoolTimeout("x")) == "pool_timeout"
    assert clients.classify(op("FATAL:  sorry, too many clients already")) == "too_many_clients"
    assert clients.classify(op("connection failed: Connection refused")) == "refused"
    assert clients.classify(op("server closed the connection unexpectedly")) == "conn_lost"
    assert clients.classify(op("cannot exit pipeline mode while busy")) == "conn_lost"
    assert clients.classify(op("the database system is shutting down")) == "server_starting"
    assert (
        clients.classify(op("server login has been failing, try again later"))
        == "pooler_login_failing"
    )
    assert clients.classify(ValueError("x")) == "other"


def test_classify_unwraps_sqlalchemy() -> None:
    import psycopg
    import sqlalchemy.exc

    inner = psycopg.OperationalError("FATAL: remaining connection slots are reserved")
    wrapped = sqlalchemy.exc.OperationalError("SELECT 1", {}, inner)
    assert clients.classify(wrapped) == "too_many_clients"
    assert clients.classify(sqlalchemy.exc.TimeoutError("QueuePool limit")) == "pool_timeout"


def test_classify_unwraps_django() -> None:
    """django.db.utils raises its own class from the driver's error; the kind is the
    driver's (a failover's 25006 must count as read_only, not other)."""
    import psycopg

    wrapper = type("InternalError", (Exception,), {"__module__": "django.db.utils"})
    wrapped = wrapper("cannot execute INSERT in a read-only transaction")
    wrapped.__cause__ = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT")
    assert clients.classify(wrapped) == "read_only"
    assert clients.classify(wrapper("no cause")) == "other"


def test_describe_masks_passwords() -> None:
    import psycopg

    exc = psycopg.OperationalError("cannot connect to postgresql://u:hunter2@127.0.0.1/db")
    assert "hunter2" not in clients.describe(exc)


def _fake_report() -> dict[str, Any]:
    records = [[i * 0.1, 0.002 + (i % 7) * 0.001, "r", "ok"] for i in range(50)]
    records.append([2.2, 0.030, "w", "conn_lost"])
    result = analysis.summarize(
        records,
        deadline=5.0,
        faults=[{"label": "restart <fast>", "start": 2.0, "end": 2.4, "recover": True}],
        samples=[(t / 10, 5) for t in range(50)],
        acked=[],
        unacked=[],
        rows={},
        first_ok=[0.05],
    )
    result.update({"faults": [{"label": "restart <fast>", "start": 2.0, "end": 2.4}]})
    entry = {
        "name": "restart",
        "title": "restart under load",
        "description": "d & d",
        "params": {
            "processes": 1,
            "threads": 1,
            "pool_size": 1,
            "deadline_s": 5.0,
            "server_settings": {"max_connections": 20},
            "faults": [{"label": "restart <fast>", "at": 2.0}],
        },
        "skipped": None,
        "target": "embedded",
        "max_connections": 20,
        "results": {"pgwarden": result},
    }
    skipped = dict(entry, name="idle", skipped="needs its own server", results={})
    return {
        "format": harness.FORMAT,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:01:00+00:00",
        "interrupted": False,
        "machine": harness.machine_info(),
        "options": {"size": "tiny", "deadline_s": 5.0, "target": "embedded"},
        "scenarios": [entry, skipped],
    }


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    data = _fake_report()
    path = tmp_path / "r" / "report.html"
    report.write_html(data, path)
    check_html(path)
    text = path.read_text()
    assert "restart &lt;fast&gt;" in text
    assert "restart <fast>" not in text
    assert "Skipped:" in text


def test_markdown_has_machine_tables_and_skips() -> None:
    text = report.render_markdown(_fake_report())
    assert text.startswith("## Stress scenarios")
    assert "CPUs, Python" in text
    assert "pgwarden invariants (no duplicates, no lost acknowledged writes): held." in text
    assert HEADER.search(text)
    assert "Skipped: needs its own server" in text


def test_table_format() -> None:
    text = report.format_scenario(_fake_report()["scenarios"][0])
    assert HEADER.search(text)
    assert re.search(r"^pgwarden\s+51\s+98\.03%\s+1\s", text, re.M)
    assert "conn_lost 1" in text
    skipped = report.format_scenario(_fake_report()["scenarios"][1])
    assert "SKIPPED: needs its own server" in skipped


# --------------------------------------------------------------------------------------------
# The worker on its own: bounded even when the server never answers


def test_worker_stops_at_its_hard_limit(tmp_path: Path) -> None:
    """A worker whose server never answers still reports and exits at its hard limit."""
    import socket

    from pgwarden.stress.worker import Phase, WorkerConfig

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (kernel backlog) and never answers
    port = listener.getsockname()[1]
    try:
        cfg = WorkerConfig(
            client="naive",
            url=f"postgresql://u:p@127.0.0.1:{port}/db",
            worker=0,
            run="test",
            out=str(tmp_path / "out.json"),
            threads=2,
            pool_size=1,
            deadline=30.0,
            write_ratio=0.5,
            read_work=0.0,
            phases=(Phase(start=0.0, interval=0.01, duration=60.0),),
            max_requests=100,
            hard_limit=1.5,
            seed=1,
            application_name="pgwstress-test",
        )
        cfg_path = tmp_path / "cfg.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgwarden.stress.worker", str(cfg_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=workers.worker_env(),
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdin.close()
            proc.stdout.close()
        assert time.monotonic() - started < 15
        data = json.loads((tmp_path / "out.json").read_text())
        assert data["reason"] == "hard_limit"
        assert [r[3] for r in data["records"]] == ["hung", "hung"]
        assert data["acked"] == []
    finally:
        listener.close()
