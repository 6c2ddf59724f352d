"""``pgwarden check`` against real servers, run in-process (``main(argv)``) and as a subprocess.

Fixtures (``pg_server``, ``pg_server_factory``, ``pgbouncer``) come from the
``pgwarden.testing.plugin`` pytest plugin. The pure helpers of the check (the settings
assessment, the error summary) are tested at the end without a server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest

from pgwarden.cli.main import main


class Server(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def password(self) -> str: ...


class Bouncer(Protocol):
    @property
    def url(self) -> str: ...


CLI = [sys.executable, "-m", "pgwarden.cli.main"]


def child_env(*, settings_only: bool = False, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no inherited URL or password. With
    *settings_only*, no inherited ``PGWARDEN_*`` either (the test harness reads some, such as
    ``PGWARDEN_PG_BINDIR``, that ``Settings.from_env`` rejects as unknown)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "PGWARDEN_URL", "PGPASSWORD", "PGPASSFILE")
        and not (settings_only and k.startswith("PGWARDEN_"))
    }
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 60, settings_only: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(settings_only=settings_only, **env),
        check=False,
    )


def with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(parts.username or "")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{urllib.parse.quote(user)}:{urllib.parse.quote(password)}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, dbname: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{dbname}"))


def refused_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_closed(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def descendants(pid: int) -> dict[int, list[str]]:
    """Running descendants of *pid*: pid -> argv."""
    parents: dict[int, int] = {}
    argvs: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        argvs[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    found: dict[int, list[str]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = argvs[child]
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "PGWARDEN_URL", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------
# Command line shape


def test_help_lists_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "check" in out
    assert "COMMAND" in out


def test_check_help_shows_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--timeout", "--json", "--pgbouncer", "URL"):
        assert option in out


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version_goes_to_stdout() -> None:
    from importlib.metadata import version

    proc = subprocess.run(
        [*CLI, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        f"pgwarden {version('pgwarden')}\n",
        "",
    )


def test_main_import_is_cheap() -> None:
    code = (
        "import sys, pgwarden.cli.main; "
        "print(sorted(m for m in ('psycopg', 'psycopg_pool', 'pgwarden.cli.check') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


def test_bad_url_is_clear(capsys: pytest.CaptureFixture[str], no_env_url: None) -> None:
    for url, reason in [
        ("http://user:secret@example.com/db", "unsupported scheme"),
        ("postgresql://user:secret@localhost:notaport/db", "invalid port"),
        ("postgresql://user:secret@localhost/db?bogus=1", "bogus"),
        ("not a url", "missing"),
    ]:
        assert main(["check", url]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith("pgwarden check: invalid connection URL ")
        assert reason in lines[0]
        assert "secret" not in captured.err


# --------------------------------------------------------------------------------------------
# Failing connections: one line, exit 2, no secrets, fast


def test_refused_exits_fast_without_secret() -> None:
    url = f"postgresql://nobody:secret@127.0.0.1:{refused_port()}/x"
    started = time.monotonic()
    proc = run_cli("check", url)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2
    assert elapsed < 2.0
    assert "secret" not in proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"pgwarden check: cannot connect to {url.replace('secret', '***')}: connection refused"
    ]


def test_refused_on_port_1_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["check", "postgresql://nobody:secret@127.0.0.1:1/x"]) == 2
    assert time.monotonic() - started < 2.0
    captured = capsys.readouterr()
    assert "secret" not in captured.out + captured.err
    assert captured.err == (
        "pgwarden check: cannot connect to postgresql://nobody:***@127.0.0.1:1/x: "
        "connection refused\n"
    )


def test_connect_timeout_is_reported() -> None:
    # A listener that accepts and never answers: the startup packet gets no reply.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        url = f"postgresql://nobody:secret@127.0.0.1:{port}/x"
        started = time.monotonic()
        proc = run_cli("check", "--timeout", "1", url)
        elapsed = time.monotonic() - started
    assert proc.returncode == 2
    assert 1.5 < elapsed < 10
    assert "timed out after 2s" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr


def test_wrong_password(pg_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = "wrong-" + pg_server.password[::-1]
    assert main(["check", with_password(pg_server.url, wrong)]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert wrong not in text
    assert pg_server.password not in text
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "cannot connect to" in lines[0]
    assert "authentication failed" in lines[0]


def test_unknown_database(pg_server: Server) -> None:
    proc = run_cli("check", with_database(pg_server.url, "no_such_db_pgwarden"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith('database "no_such_db_pgwarden" does not exist')
    assert pg_server.password not in proc.stderr


# --------------------------------------------------------------------------------------------
# Reports from a real server


def test_report_in_process(
    pg_server: Server, capsys: pytest.CaptureFixture[str], no_env_url: None
) -> None:
    assert main(["check", pg_server.url]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert pg_server.password not in out + captured.err
    assert re.search(r"^server_version\s+\d+", out, re.M)
    assert re.search(r"^server\s+PostgreSQL \d+", out, re.M)
    assert re.search(r"^connect time\s+[\d.]+ ms", out, re.M)
    latency = r"^latency\s+p50 [\d.]+ ms \(min [\d.]+, max [\d.]+; 10 x SELECT 1\)"
    assert re.search(latency, out, re.M)
    assert re.search(r"^max_connections\s+\d+ \(\d+ reserved for superusers", out, re.M)
    assert re.search(r"^connections\s+\d+ in use", out, re.M)
    assert re.search(r"^pgbouncer\s+no$", out, re.M)
    assert re.search(r"^tls\s+(on|off)", out, re.M)
    assert re.search(r"^protocol\s+3\.\d", out, re.M)


def test_report_json_subprocess(pg_server: Server) -> None:
    proc = run_cli("check", "--json", "--pings", "5", pg_server.url)
    assert proc.returncode == 0, proc.stderr
    assert pg_server.password not in proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["version"].startswith("PostgreSQL ")
    assert report["server_version_num"] >= 100000
    assert report["latency_ms"]["samples"] == 5
    assert 0 < report["latency_ms"]["min"] <= report["latency_ms"]["p50"]
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
    assert report["connect_ms"] > 0
    assert report["max_connections"] > 0
    assert report["usable_connections"] <= report["max_connections"]
    assert report["connections_in_use"] >= 1  # this check's own connection
    assert report["pgbouncer"]["detected"] == "no"
    assert report["pgbouncer"]["in_front"] is False
    assert report["target"] == pg_server.url.replace(pg_server.password, "***")
    assert report["embedded"] is None


def test_database_url_is_used_when_no_argument(pg_server: Server) -> None:
    proc = run_cli("check", "--json", DATABASE_URL=pg_server.url)
    assert proc.returncode == 0, proc.stderr
    assert "embedded" not in proc.stderr
    assert json.loads(proc.stdout)["pgbouncer"]["detected"] == "no"


def test_idle_session_timeout_warning(
    pg_server_factory: Callable[..., Server], capsys: pytest.CaptureFixture[str]
) -> None:
    server = pg_server_factory(settings={"idle_session_timeout": "5s"})
    assert main(["check", server.url]) == 0
    out = capsys.readouterr().out
    assert "! idle_session_timeout = 5s" in out
    assert "shorter than pgwarden's max_lifetime" in out

    # pgwarden's own settings decide: a max_lifetime below the server's limit is fine.
    proc = run_cli("check", "--json", server.url, settings_only=True, PGWARDEN_MAX_LIFETIME="4")
    assert proc.returncode == 0, proc.stderr
    codes = [f["code"] for f in json.loads(proc.stdout)["findings"]]
    assert "idle_session_timeout" not in codes


def test_bad_pgwarden_settings_fall_back_to_defaults(pg_server: Server) -> None:
    proc = run_cli("check", pg_server.url, settings_only=True, PGWARDEN_MAX_SIZE="lots")
    assert proc.returncode == 0, proc.stderr
    assert "(compared with pgwarden's defaults: invalid PGWARDEN_MAX_SIZE='lots'" in proc.stdout


def test_no_idle_session_warning_by_default(pg_server: Server) -> None:
    proc = run_cli("check", "--json", pg_server.url)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    codes = [f["code"] for f in report["findings"]]
    assert "idle_session_timeout" not in codes
    assert report["settings"]["max_connections"]["value"] == str(report["max_connections"])


def test_pgbouncer_forced_off(pg_server: Server) -> None:
    proc = run_cli("check", "--json", "--pgbouncer", "off", pg_server.url)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pgbouncer"]["detected"] == "off"


@pytest.mark.pgbouncer
def test_pgbouncer_detected(pgbouncer: Bouncer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", pgbouncer.url]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^pgbouncer\s+(yes|likely)", out, re.M), out
    assert "cancel-key pid" in out
    assert "between this client and the pooler" in out

    proc = run_cli("check", "--json", pgbouncer.url)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["pgbouncer"]
    assert info["detected"] in ("yes", "likely")
    assert info["in_front"] is True
    if info["detected"] == "yes":
        assert info["version"].startswith("PgBouncer ")


def test_pgpool_detected_as_the_handle_does(pgpool: Bouncer) -> None:
    """pgpool-II forwards the server's backend key, so the pids agree; the other client port
    the server sees makes the check ask ``SHOW pool_version``, like the handle's warmup."""
    proc = run_cli("check", "--json", pgpool.url)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)["pgbouncer"]
    assert info["detected"] == "yes", info
    assert info["in_front"] is True
    assert info["version"].startswith("pgpool-II")
    assert any("pgpool-II" in line for line in info["evidence"])


# --------------------------------------------------------------------------------------------
# A Unix tool: stdout may be closed early by its reader


def test_piped_to_head_ends_quietly(pg_server: Server) -> None:
    """``pgwarden check URL | head -1``: the first line, and no traceback whoever wins the race
    between head exiting and the report being written."""
    cli = " ".join(f"'{a}'" for a in [*CLI, "check", pg_server.url])
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{cli} | head -1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert proc.returncode in (0, 141), proc.stderr
    assert proc.stdout.startswith("target ")
    assert proc.stdout.count("\n") == 1
    assert proc.stderr == ""


def test_closed_stdout_ends_quietly_with_141(pg_server: Server) -> None:
    """The reader is gone before the report is written (deterministic: the pipe's read end
    is closed at once): exit 141 like a tool ended by SIGPIPE, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [*CLI, "check", "--json", pg_server.url],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=child_env(),
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert proc.stderr == ""


# --------------------------------------------------------------------------------------------
# Embedded default (no URL, no DATABASE_URL)


def _embedded_location(stderr: str) -> str:
    m = re.search(r"^using embedded default: (.+)$", stderr, re.M)
    assert m, stderr
    return m.group(1)


def _run_embedded(*, interrupt: signal.Signals | None = None) -> tuple[int, str, str, int, Path]:
    """Run ``pgwarden check --json`` with no URL; find the postmaster it starts while the
    check runs (many pings keep it busy); optionally send it *interrupt*.

    Returns (exit code, stdout, stderr, postmaster pid, data directory).
    """
    proc = subprocess.Popen(
        [*CLI, "check", "--json", "--pings", "5000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert proc.stderr is not None
    seen: list[str] = []
    postmaster: tuple[int, Path] | None = None
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("using embedded default: "):
                for pid, argv in descendants(proc.pid).items():
                    if "-D" in argv and Path(argv[0]).name == "postgres":
                        postmaster = pid, Path(argv[argv.index("-D") + 1])
                if interrupt is not None:
                    proc.send_signal(interrupt)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(seen) + err
    assert postmaster is not None, f"no postmaster found under the CLI process: {stderr}"
    return proc.returncode, out, stderr, *postmaster


def test_embedded_default_is_used_and_removed() -> None:
    code, out, err, pid, data_dir = _run_embedded()
    assert code == 0, err
    assert err.splitlines()[:2] == [
        "pgwarden check: no URL given (nor PGWARDEN_URL or DATABASE_URL): checking a "
        "throwaway embedded PostgreSQL, removed afterwards",
        "starting embedded PostgreSQL...",
    ]
    description = _embedded_location(err)
    assert "embedded PostgreSQL stopped and removed" in err
    report = json.loads(out)
    assert report["embedded"] == description
    assert report["pgbouncer"]["detected"] == "no"
    assert report["latency_ms"]["samples"] == 5000
    assert not alive(pid)
    assert not data_dir.exists()
    if not report["host"].startswith("/"):
        assert port_closed(report["host"], int(report["port"]))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_embedded_default_removed_on_interrupt(sig: signal.Signals) -> None:
    code, out, err, pid, data_dir = _run_embedded(interrupt=sig)
    assert code == 130, err
    assert out == ""
    assert "embedded PostgreSQL stopped and removed" in err
    assert not alive(pid)
    assert not data_dir.exists()


def test_embedded_text_report_says_so_on_its_first_line() -> None:
    proc = run_cli("check", "--pings", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("checking a throwaway embedded server, removed afterwards (")
    assert proc.stderr.splitlines()[0].startswith("pgwarden check: no URL given")
    assert "embedded PostgreSQL stopped and removed" in proc.stderr


def test_fleet_plan_for_instances(pg_server: Server) -> None:
    proc = run_cli(
        "check", "--json", "--pings", "1", "--instances", "30", pg_server.url, settings_only=True
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    fleet = report["fleet"]
    assert fleet["instances"] == 30
    assert len(fleet["shares"]) == 30
    # The server's budget, less this check's own connection not counted as another's.
    others = report["connections_in_use"] - 1
    assert fleet["budget"] == report["usable_connections"] - others
    assert "fleet_budget" in [f["code"] for f in report["findings"]]

    text = run_cli("check", "--instances", "3", "--fleet-budget", "6", pg_server.url)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^fleet\s+budget 6 connection\(s\): fleet_budget=6$", text.stdout, re.M)


def test_fleet_budget_needs_instances() -> None:
    proc = run_cli("check", "--fleet-budget", "10", "postgresql://u@127.0.0.1:1/x")
    assert proc.returncode == 2
    assert "give --instances N too" in proc.stderr
