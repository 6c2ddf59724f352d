"""Run stress scenarios: servers, worker processes, faults, sampling, verification.

Theory of operation
-------------------
For each scenario the harness opens a *target*: by default a throwaway PostgreSQL started
with the scenario's settings (``max_connections``, ``idle_session_timeout``), plus a
PgBouncer or a fault proxy in front when the scenario needs one; or, with ``--url``, the
given server (loopback only), on which scenarios that must restart or reconfigure the
server are skipped with the reason. It creates the table ``pgwarden_stress_writes`` and, on
its own server, an ordinary login role for the clients, so ``max_connections=20`` leaves
them 17 slots and the harness's superuser connections never compete with them.

Then, for each client in turn, it runs the same *plan* (see :mod:`.scenarios`):

1. start ``processes`` workers (``python -m pgwarden.stress.worker``), each in its own
   session so that a process-group kill reaches everything it started, and wait until all
   have printed ``ready``;
2. start the sampler (``pg_stat_activity`` every 100 ms on its own superuser connection,
   through the Unix socket when the server is ours) and write ``go`` to every worker at
   once;
3. inject the plan's faults from a separate thread at their planned times, while the main
   thread prints a progress line every second;
4. wait for the workers (bounded by the plan's hard limit), stop and kill what is left,
   read their result files, and check every write against the table: duplicates, and
   acknowledged writes that are missing;
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

import contextlib
import ipaddress
import json
import os
import platform
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgwarden._redact import redact
from pgwarden.stress import failover
from pgwarden.stress.analysis import summarize
from pgwarden.stress.clients import (
    CLIENTS,
    LINES_PER_UNIT,
    LINES_TABLE,
    TABLE,
    missing_requirement,
)
from pgwarden.stress.live import LIVE_STATS_INTERVAL, MAX_STATS_LINE, LiveStats
from pgwarden.stress.scenarios import SCENARIOS, FaultStep, Plan, Scenario, Size
from pgwarden.stress.worker import WorkerConfig

__all__ = [
    "FORMAT",
    "HarnessError",
    "Options",
    "loopback_problem",
    "run_stress",
]

FORMAT = "pgwarden-stress/1"
ROLE = "pgwarden_stress"
ADMIN_APP = "pgwarden-stress-admin"
APP_PREFIX = "pgwstress-"
SAMPLE_INTERVAL = 0.1
PROGRESS_INTERVAL = 1.0

Say = Callable[[str], None]


class HarnessError(Exception):
    """The harness could not do its job (a server would not start, and so on)."""


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
    on_scenario: Callable[[dict[str, Any]], None] | None = None
    #: With ``--dashboard``: pgwarden workers send their live stats, merged here.
    live: LiveStats | None = None


# --------------------------------------------------------------------------------------------
# URL checks


def loopback_problem(url: str) -> str | None:
    """Why ``url`` is not a server on this machine, or None if it is (or is a socket)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        return f"cannot parse the URL: {redact(str(exc))}"
    hosts = [h for h in str(params.get("hostaddr") or params.get("host") or "").split(",") if h]
    if not hosts:
        env = os.environ.get("PGHOST", "")
        hosts = [h for h in env.split(",") if h]
    for host in hosts:
        if host.startswith(("/", "@")) or host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host.strip("[]")).is_loopback:
                continue
        except ValueError:
            pass
        return f"host {host!r} is not a loopback address (127.0.0.0/8, ::1, localhost)"
    return None


def _tcp_endpoint(url: str) -> tuple[str, int] | None:
    params = conninfo_to_dict(url)
    host = str(params.get("hostaddr") or params.get("host") or "")
    if not host or "," in host or host.startswith(("/", "@")):
        return None
    if host == "localhost":
        host = "127.0.0.1"
    return host, int(str(params.get("port") or 5432))


# --------------------------------------------------------------------------------------------
# Targets


class Target:
    """Where one scenario runs: the URL the clients use and what the harness controls."""

    def __init__(self) -> None:
        self.client_url = ""
        self.description = ""
        self.server: Any = None  # PostgresServer when the server is ours
        self.embedded: Any = None
        self.bouncer: Any = None
        self.proxy: Any = None
        self.pair: Any = None  # StandbyPair (the failover scenario, see .failover)
        self.admin_params: dict[str, Any] = {}
        self.only_ours = False  # count only our clients' backends (a shared server)
        self.max_connections: int | None = None
        self.server_version = ""
        self.pgbouncer_version: str | None = None
        self.drop_table = False
        self.closers: list[Callable[[], None]] = []

    def admin(self, timeout: int = 3) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(
            **self.admin_params,
            autocommit=True,
            connect_timeout=timeout,
            application_name=ADMIN_APP,
        )

    def kill_ours(self, fraction: float = 1.0) -> int:
        """``pg_terminate_backend`` a random ``fraction`` of the clients' backends."""
        query = (
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND application_name LIKE %s AND random() < %s"
        )
        with self.admin() as conn:
            conn.add_notice_handler(lambda diag: None)
            row = conn.execute(query, [APP_PREFIX + "%", fraction]).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        self.closers.clear()


_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    " seq bigserial PRIMARY KEY,"
    " run text NOT NULL,"
    " req_id uuid NOT NULL,"
    " worker integer NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now())",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_req_id ON {TABLE} (req_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_run ON {TABLE} (run, req_id)",
    # The child rows of the ORM units of work (pgwarden.stress.orm).
    f"CREATE TABLE IF NOT EXISTS {LINES_TABLE} ("
    " seq bigserial PRIMARY KEY,"
    f" write_seq bigint NOT NULL REFERENCES {TABLE} (seq),"
    " run text NOT NULL,"
    " req_id uuid NOT NULL,"
    " n integer NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {LINES_TABLE}_run ON {LINES_TABLE} (run, req_id)",
    f"CREATE INDEX IF NOT EXISTS {LINES_TABLE}_write ON {LINES_TABLE} (write_seq)",
)


def _why_skip(scenario: Scenario, plan: Plan, url: str | None) -> str | None:
    if url is None:
        return None
    needs = scenario.needs
    if "control" in needs:
        return (
            "needs to restart the server, which only works on the server pgwarden stress "
            "starts itself (run without --url)"
        )
    if "pgbouncer" in needs:
        return "needs its own PostgreSQL and PgBouncer (run without --url)"
    if "own_server" in needs:
        settings = ", ".join(f"{k}={v}" for k, v in plan.server_settings.items())
        return f"needs its own server with {settings} (run without --url)"
    if "proxy" in needs and _tcp_endpoint(url) is None:
        return "needs a TCP URL (host and port) to put the fault proxy in front of"
    return None


@contextlib.contextmanager
def open_target(plan: Plan, url: str | None, say: Say) -> Iterator[Target]:
    target = Target()
    try:
        if url is None and plan.via == "pair":
            failover.open_pair(target, plan, say)
        elif url is None:
            _own_server(target, plan, say)
        else:
            _given_server(target, url)
        if plan.via == "proxy":
            from pgwarden.testing import FaultProxy

            if target.server is not None:
                upstream: tuple[str, int] | None = (target.server.host, target.server.port)
            else:
                upstream = _tcp_endpoint(target.client_url)
            assert upstream is not None
            proxy = FaultProxy(*upstream).start()
            target.closers.append(proxy.close)
            target.proxy = proxy
            target.client_url = proxy.url_for(target.client_url)
            target.description += f", through a fault proxy on 127.0.0.1:{proxy.port}"
        yield target
    finally:
        target.close()


def _own_server(target: Target, plan: Plan, say: Say) -> None:
    from pgwarden.embedded import start_embedded

    settings = dict(plan.server_settings)
    try:
        embedded = start_embedded(settings)
    except Exception as exc:
        raise HarnessError(f"cannot start the embedded PostgreSQL: {redact(str(exc))}") from exc
    target.closers.append(embedded.close)
    server = embedded.server
    if server is None:
        raise HarnessError("the embedded PostgreSQL cannot be controlled (no local binaries)")
    target.embedded = embedded
    target.server = server
    target.server_version = str(server.version)
    target.admin_params = {
        "host": str(server.socket_dir),
        "port": server.port,
        "user": server.user,
        "dbname": server.dbname,
    }
    password = prepare_schema_and_role(target)
    target.client_url = server.url_for(user=ROLE, password=password)
    target.description = f"embedded PostgreSQL {target.server_version} on 127.0.0.1:{server.port}"
    if plan.via == "pgbouncer":
        from pgwarden.testing import PgBouncerServer

        try:
            bouncer = PgBouncerServer(
                server,
                pool_mode="transaction",
                default_pool_size=plan.pgbouncer_pool_size,
                max_client_conn=plan.pgbouncer_max_clients,
            )
            target.closers.append(bouncer.close)
            bouncer.start()
        except Exception as exc:
            raise HarnessError(f"cannot start PgBouncer: {redact(str(exc))}") from exc
        target.bouncer = bouncer
        target.pgbouncer_version = str(bouncer.version)
        target.client_url = bouncer.url
        target.description += (
            f", through PgBouncer {bouncer.version} (transaction mode) on 127.0.0.1:{bouncer.port}"
        )


def prepare_schema_and_role(target: Target) -> str:
    """On a server of our own (``target.admin_params`` set): the tables, and an ordinary
    login role for the clients with a random password, which is returned. Also reads
    ``max_connections``."""
    password = secrets.token_urlsafe(18)
    with target.admin() as conn:
        for stmt in _SCHEMA:
            conn.execute(stmt)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(password)
            )
        )
        for table in (TABLE, LINES_TABLE):
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(
                    sql.Identifier(table), sql.Identifier(ROLE)
                )
            )
            conn.execute(
                sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                    sql.Identifier(f"{table}_seq_seq"), sql.Identifier(ROLE)
                )
            )
        row = conn.execute("SHOW max_connections").fetchone()
        target.max_connections = int(row[0]) if row else None
    return password


def _given_server(target: Target, url: str) -> None:
    target.admin_params = {"conninfo": url}
    target.client_url = url
    target.only_ours = True
    try:
        with target.admin(timeout=5) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NULL", [TABLE]).fetchone()
            target.drop_table = bool(row and row[0])
            for stmt in _SCHEMA:
                conn.execute(stmt)
            row = conn.execute("SHOW server_version").fetchone()
            target.server_version = str(row[0]) if row else ""
            row = conn.execute("SHOW max_connections").fetchone()
            target.max_connections = int(row[0]) if row else None
    except psycopg.Error as exc:
        raise HarnessError(f"cannot prepare {redact(url)}: {redact(str(exc))}") from exc
    if target.drop_table:

        def drop() -> None:
            with target.admin() as conn:
                for table in (LINES_TABLE, TABLE):  # the lines refer to the writes
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))

        target.closers.append(drop)
    target.description = f"PostgreSQL {target.server_version} at {redact(url)}"


# --------------------------------------------------------------------------------------------
# Sampling server connections


class Sampler:
    """Counts client backends in ``pg_stat_activity`` every 100 ms, on its own thread."""

    def __init__(self, target: Target, t0: float) -> None:
        self.target = target
        self.t0 = t0
        self.samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-sampler", daemon=True)
        cond = "application_name LIKE %s" if target.only_ours else "application_name <> %s"
        self._query = (
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "  # noqa: S608
            f"AND pid <> pg_backend_pid() AND {cond} "
            "AND application_name <> 'pgwarden-testing-admin'"
        )
        self._param = APP_PREFIX + "%" if target.only_ours else ADMIN_APP

    @property
    def last(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                count: int | None = None
                try:
                    if conn is None or conn.closed:
                        conn = self.target.admin(timeout=2)
                    row = conn.execute(self._query, [self._param]).fetchone()
                    count = int(row[0]) if row else None
                except psycopg.Error:
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
                now = time.monotonic()
                self.samples.append((now - self.t0, count))
                next_at = max(next_at + SAMPLE_INTERVAL, now)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


# --------------------------------------------------------------------------------------------
# Faults


class Injector(threading.Thread):
    """Applies a plan's faults at their times (relative to ``t_go``), on its own thread."""

    def __init__(self, plan: Plan, target: Target, t_go: float, say: Say) -> None:
        super().__init__(name="stress-faults", daemon=True)
        self.plan = plan
        self.target = target
        self.t_go = t_go
        self.say = say
        self.abort = threading.Event()
        self.faults: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.current = ""

    def _now(self) -> float:
        return time.monotonic() - self.t_go

    def run(self) -> None:
        timeline: list[tuple[float, int, str, FaultStep, int]] = []
        for i, step in enumerate(self.plan.faults):
            timeline.append((step.at, 0, "apply", step, i))
            if step.duration > 0:
                timeline.append((step.at + step.duration, 1, "heal", step, i))
        timeline.sort(key=lambda item: (item[0], item[1]))
        records: dict[int, dict[str, Any]] = {}
        for at, _, what, step, i in timeline:
            if self.abort.wait(max(0.0, at - self._now())):
                break
            try:
                if what == "apply":
                    records[i] = self._apply(step)
                else:
                    self._heal(step, records.get(i))
            except Exception as exc:
                message = f"{step.label} ({what}) at {self._now():.1f}s failed: {exc}"
                self.errors.append(redact(message))
                self.say(f"    ! {redact(message)}")
        self.current = ""

    def _apply(self, step: FaultStep) -> dict[str, Any]:
        target = self.target
        record: dict[str, Any] = {
            "label": step.label,
            "action": step.action,
            "start": round(self._now(), 3),
            "end": None,
            "recover": step.recover,
        }
        self.faults.append(record)
        self.current = step.label
        if step.action in ("restart_fast", "restart_immediate"):
            mode = "fast" if step.action == "restart_fast" else "immediate"
            target.server.restart(mode)
            record["end"] = round(self._now(), 3)
            record["detail"] = f"down for {record['end'] - record['start']:.2f}s"
            self.current = ""
        elif step.action == "kill":
            killed = target.kill_ours(step.value)
            record["end"] = round(self._now(), 3)
            record["detail"] = f"{killed} backend(s) terminated"
            self.current = ""
        elif step.action == "latency":
            target.proxy.set_latency(step.value)
        elif step.action == "reset":
            target.proxy.reset()
        elif step.action == "blackhole":
            target.proxy.blackhole()
        elif step.action == "mark":
            pass
        elif step.action in failover.ACTIONS:
            record.update(failover.apply(step.action, target, self.t_go))
            record["end"] = round(self._now(), 3)
            self.current = ""
        else:  # pragma: no cover - Action is a closed Literal
            raise ValueError(step.action)
        return record

    def _heal(self, step: FaultStep, record: dict[str, Any] | None) -> None:
        if step.action == "latency":
            self.target.proxy.set_latency(0.0)
        elif step.action in ("reset", "blackhole"):
            self.target.proxy.heal()
        if record is not None:
            record["end"] = round(self._now(), 3)
        self.current = ""


# --------------------------------------------------------------------------------------------
# Workers


@dataclass
class _Proc:
    index: int
    popen: subprocess.Popen[bytes]
    out: Path
    log: Path
    ready: bool = False
    done: bool = False
    ok: int = 0
    failed: int = 0
    buffer: bytes = b""
    stats: dict[str, Any] | None = None  # the latest ``s`` line (live dashboard)


def _worker_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "PGWARDEN_")) and k != "DATABASE_URL"
    }
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONWARNINGS", None)
    return env


class WorkerGroup:
    """The worker processes of one client run."""

    def __init__(self, configs: list[WorkerConfig], workdir: Path) -> None:
        self.procs: list[_Proc] = []
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        env = _worker_env()
        try:
            for cfg in configs:
                cfg_path = workdir / f"worker-{cfg.worker}.json"
                cfg_path.write_text(json.dumps(cfg.to_dict()))
                log = workdir / f"worker-{cfg.worker}.log"
                with open(log, "wb") as err:
                    popen = subprocess.Popen(
                        [sys.executable, "-m", "pgwarden.stress.worker", str(cfg_path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=env,
                        cwd=workdir,
                        start_new_session=True,  # its own process group: killpg reaches all
                    )
                proc = _Proc(cfg.worker, popen, Path(cfg.out), log)
                self.procs.append(proc)
                assert popen.stdout is not None
                os.set_blocking(popen.stdout.fileno(), False)
                self._selector.register(popen.stdout, selectors.EVENT_READ, proc)
        except BaseException:
            self.kill()
            raise
        self._reader = threading.Thread(target=self._read, name="stress-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                events = self._selector.select(0.1)
            except (OSError, ValueError):
                return
            for key, _ in events:
                proc: _Proc = key.data
                stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(stream)
                    proc.done = True
                    continue
                proc.buffer += chunk
                *lines, proc.buffer = proc.buffer.split(b"\n")
                if len(proc.buffer) > MAX_STATS_LINE:
                    proc.buffer = b""  # no line is that long: drop it, resync at the next
                for line in lines:
                    self._line(proc, line.decode("ascii", "replace").strip())

    @staticmethod
    def _line(proc: _Proc, line: str) -> None:
        if line == "ready":
            proc.ready = True
        elif line == "done":
            proc.done = True
        elif line.startswith("p "):
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                proc.ok, proc.failed = int(parts[1]), int(parts[2])
        elif line.startswith("s {"):
            try:
                stats = json.loads(line[2:])
            except ValueError:
                return
            if isinstance(stats, dict):
                proc.stats = stats

    def wait_ready(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(p.ready or p.popen.poll() is not None for p in self.procs):
                break
            time.sleep(0.02)
        return sum(1 for p in self.procs if p.ready)

    def go(self) -> None:
        for p in self.procs:
            self._send(p, b"go\n")

    def stop(self) -> None:
        for p in self.procs:
            self._send(p, b"stop\n")
            with contextlib.suppress(OSError):
                if p.popen.stdin is not None:
                    p.popen.stdin.close()

    @staticmethod
    def _send(p: _Proc, data: bytes) -> None:
        stdin = p.popen.stdin
        if stdin is None or stdin.closed:
            return
        with contextlib.suppress(OSError, ValueError):
            stdin.write(data)
            stdin.flush()

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.popen.poll() is None)

    def counts(self) -> tuple[int, int]:
        return sum(p.ok for p in self.procs), sum(p.failed for p in self.procs)

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.alive() == 0:
                return True
            time.sleep(0.05)
        return self.alive() == 0

    def kill(self) -> None:
        """SIGKILL every worker's process group, reap them, and stop reading."""
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(10)
            for stream in (p.popen.stdin, p.popen.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._closed.set()
        if self._reader is not None:
            self._reader.join(2)
        with contextlib.suppress(Exception):
            self._selector.close()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# One client in one scenario


def _run_client(
    scenario: Scenario,
    plan: Plan,
    target: Target,
    client: str,
    options: Options,
    workdir: Path,
    run_id: str,
) -> dict[str, Any]:
    say = options.say
    wl = plan.workload
    rundir = workdir / client
    live = options.live if client == "pgwarden" else None
    rundir.mkdir()
    configs = [
        WorkerConfig(
            client=client,
            url=target.client_url,
            worker=i,
            run=run_id,
            out=str(rundir / f"result-{i}.json"),
            threads=wl.threads,
            pool_size=wl.pool_size,
            deadline=plan.deadline,
            write_ratio=wl.write_ratio,
            read_work=wl.read_work,
            phases=wl.phases,
            max_requests=wl.max_requests,
            hard_limit=plan.hard_limit,
            seed=options.seed + i,
            application_name=APP_PREFIX + client,
            stats_interval=LIVE_STATS_INTERVAL if live is not None else 0.0,
            orm_share=wl.orm_share,
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
        sampler = Sampler(target, t_go)
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
                    f"  {scenario.name:<17} {client:<12} {now - t_go:5.1f}s  ok {ok:>6}  "
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
    return _collect(plan, target, group, sampler, injector, run_id, ready_count=ready)


def _collect(
    plan: Plan,
    target: Target,
    group: WorkerGroup,
    sampler: Sampler | None,
    injector: Injector | None,
    run_id: str,
    *,
    ready_count: int,
) -> dict[str, Any]:
    t_go = sampler.t0 if sampler is not None else 0.0
    records: list[list[Any]] = []
    acked: list[str] = []
    unacked: list[str] = []
    orm_acked: list[str] = []
    orm_unacked: list[str] = []
    first_ok: list[float | None] = []
    samples: dict[str, str] = {}
    worker_errors: list[str] = []
    client_setup: list[float] = []
    stats: list[dict[str, Any]] = []
    for p in group.procs:
        try:
            data = json.loads(p.out.read_text())
        except (OSError, ValueError):
            tail = _log_tail(p.log)
            worker_errors.append(
                f"worker {p.index} wrote no results (exit {p.popen.returncode})"
                + (f": {redact(tail)}" if tail else "")
            )
            first_ok.append(None)
            continue
        for r in data["records"]:
            records.append([float(r[0]) - t_go, r[1], r[2], r[3]])
        acked.extend(data["acked"])
        unacked.extend(data["unacked"])
        orm_acked.extend(data.get("orm_acked", []))
        orm_unacked.extend(data.get("orm_unacked", []))
        t_first = data.get("t_first_ok")
        first_ok.append(None if t_first is None else float(t_first) - t_go)
        if data.get("t_client") is not None:
            client_setup.append(float(data["t_client"]) - float(data["t_go"]))
        if data.get("client_error"):
            worker_errors.append(f"worker {p.index}: {data['client_error']}")
        for kind, message in data.get("samples", {}).items():
            samples.setdefault(kind, message)
        if data.get("stats"):
            stats.append(data["stats"])
    records.sort(key=lambda r: float(r[0]))
    rows = _rows_for(target, run_id)
    line_rows = _rows_for(target, run_id, LINES_TABLE) if orm_acked or orm_unacked else {}
    faults = list(injector.faults) if injector is not None else []
    for fault in faults:
        if fault["end"] is None:
            fault["end"] = fault["start"]
    result = summarize(
        records,
        deadline=plan.deadline,
        faults=faults,
        samples=sampler.samples if sampler is not None else [],
        acked=acked,
        unacked=unacked,
        rows=rows,
        first_ok=first_ok,
        orm_acked=orm_acked,
        orm_unacked=orm_unacked,
        line_rows=line_rows,
        lines_per_unit=LINES_PER_UNIT,
    )
    client_setup.sort()
    result.update(
        {
            "faults": faults,
            "error_samples": samples,
            "harness_errors": list(injector.errors) if injector is not None else [],
            "worker_errors": worker_errors[:20],
            "workers": {
                "started": len(group.procs),
                "ready": ready_count,
                "reported": len(group.procs) - sum(1 for e in worker_errors if "wrote no" in e),
            },
            "client_setup_s": {
                "p50": round(client_setup[len(client_setup) // 2], 3) if client_setup else None,
                "max": round(client_setup[-1], 3) if client_setup else None,
            },
            "client_stats": _merge_stats(stats),
        }
    )
    if target.pair is not None:
        result["failover"] = failover.figures(records, faults, result["client_stats"])
    return result


def _merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the numeric counters of every worker's client stats (pgwarden: ``counters``)."""
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


def _rows_for(target: Target, run_id: str, table: str = TABLE) -> dict[str, int]:
    """Request id -> rows in ``table`` (one of ours, a constant), for one run (retrying
    while the server restarts)."""
    query = f"SELECT req_id::text, count(*) FROM {table} WHERE run = %s GROUP BY 1"  # noqa: S608
    last: Exception | None = None
    for _ in range(50):
        try:
            with target.admin() as conn:
                return {str(rid): int(n) for rid, n in conn.execute(query, [run_id]).fetchall()}
        except psycopg.Error as exc:
            last = exc
            time.sleep(0.2)
    raise HarnessError(f"cannot read back the writes: {redact(str(last))}")


def _reset(target: Target) -> None:
    """Between clients: everything back to normal, and no client connections left."""
    if target.pair is not None:
        failover.reset(target)
    if target.proxy is not None:
        target.proxy.heal()
    if target.server is not None and not target.server.is_running():
        target.server.start()
    if target.bouncer is not None:
        target.bouncer.restart()
    with contextlib.suppress(psycopg.Error):
        target.kill_ours(1.0)
    time.sleep(0.3)


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
    }


def run_scenario(name: str, options: Options, workdir: Path) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    plan = scenario.build(options.size, options.deadline)
    entry: dict[str, Any] = {
        "name": name,
        "title": scenario.title,
        "description": scenario.description,
        "params": _params(scenario, plan, options.size),
        "skipped": None,
        "target": None,
        "results": {},
    }
    reason = _why_skip(scenario, plan, options.url)
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
        for i, client in enumerate(options.clients):
            if i:
                _reset(target)
            run_id = f"{name}/{client}/{secrets.token_hex(4)}"
            entry["results"][client] = _run_client(
                scenario, plan, target, client, options, scenario_dir, run_id
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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, so ``finally`` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def new_report(options: Options) -> dict[str, Any]:
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


def run_stress(options: Options, report: dict[str, Any] | None = None) -> dict[str, Any]:
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
    workdir = Path(tempfile.mkdtemp(prefix="pgwarden-stress-"))
    try:
        with _sigterm_as_interrupt():
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
