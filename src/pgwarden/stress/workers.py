"""The worker processes of one client run: spawning them, the start barrier, reading their
progress, killing them; and compiling the clients' bytecode before any is spawned.

Each worker (``python -m pgwarden.stress.worker CONFIG``) runs in its own session, so that a
process-group kill reaches everything it started. One reader thread follows every worker's
stdout (``ready``, ``p <ok> <failed>``, ``s <json>``, ``done``).

Bytecode: an installed package has its modules compiled (pip does it), but an editable
install on a machine with ``PYTHONDONTWRITEBYTECODE=1`` compiles pgwarden again in every new
process, which would charge pgwarden's cold start for something no deployment pays.
:func:`compile_bytecode` runs ``compileall`` on pgwarden's package and the peers' before the
first worker is spawned, so every client starts from compiled modules (workers keep the
inherited environment: they read the ``.pyc`` files and write none).
"""

from __future__ import annotations

import compileall
import contextlib
import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypedDict

from pgwarden.stress.live import MAX_STATS_LINE
from pgwarden.stress.worker import WorkerConfig

__all__ = [
    "BYTECODE_PACKAGES",
    "BytecodeInfo",
    "WorkerGroup",
    "WorkerProc",
    "compile_bytecode",
    "log_tail",
    "worker_env",
]

#: The packages whose modules the workers import: pgwarden and its peers.
BYTECODE_PACKAGES = ("pgwarden", "psycopg", "psycopg_pool", "sqlalchemy", "django")


class BytecodeInfo(TypedDict):
    """What :func:`compile_bytecode` did (``bytecode`` in ``results.json``)."""

    #: Package -> ``"compiled"``, ``"errors"`` (some module did not compile) or
    #: ``"not installed"``.
    packages: dict[str, str]
    seconds: float
    #: The environment's ``PYTHONDONTWRITEBYTECODE`` (the workers inherit it).
    dont_write_bytecode: bool


def compile_bytecode(packages: tuple[str, ...] = BYTECODE_PACKAGES) -> BytecodeInfo:
    """``compileall`` every package of ``packages`` that is installed, in place (modules
    whose ``.pyc`` is up to date are only checked). Imports none of them."""
    started = time.monotonic()
    done: dict[str, str] = {}
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            done[name] = "not installed"
            continue
        ok = True
        for location in locations:
            # quiet=2: no listing and no tracebacks (a module that does not compile is the
            # worker's error to report, not ours); force=False keeps up-to-date files.
            ok = bool(compileall.compile_dir(location, quiet=2, force=False)) and ok
        done[name] = "compiled" if ok else "errors"
    return {
        "packages": done,
        "seconds": round(time.monotonic() - started, 3),
        "dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
    }


@dataclass
class WorkerProc:
    """One worker process and what its stdout said so far."""

    index: int
    popen: subprocess.Popen[bytes]
    out: Path
    log: Path
    #: ``time.monotonic()`` just before the process was spawned.
    spawned_at: float
    ready: bool = False
    done: bool = False
    ok: int = 0
    failed: int = 0
    buffer: bytes = b""
    stats: dict[str, Any] | None = None  # the latest ``s`` line (live dashboard)


def worker_env() -> dict[str, str]:
    """The workers' environment: ours without libpq's and pgwarden's variables (every
    client must get its settings from its config alone), with this source tree first on
    ``PYTHONPATH``."""
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
        self.procs: list[WorkerProc] = []
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        env = worker_env()
        try:
            for cfg in configs:
                cfg_path = workdir / f"worker-{cfg.worker}.json"
                cfg_path.write_text(json.dumps(cfg.to_dict()))
                log = workdir / f"worker-{cfg.worker}.log"
                with open(log, "wb") as err:
                    spawned_at = time.monotonic()
                    popen = subprocess.Popen(
                        [sys.executable, "-m", "pgwarden.stress.worker", str(cfg_path)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=env,
                        cwd=workdir,
                        start_new_session=True,  # its own process group: killpg reaches all
                    )
                proc = WorkerProc(cfg.worker, popen, Path(cfg.out), log, spawned_at)
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
                proc: WorkerProc = key.data
                stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    continue
                except (OSError, ValueError):  # ValueError: closed meanwhile (the group ended)
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
    def _line(proc: WorkerProc, line: str) -> None:
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
    def _send(p: WorkerProc, data: bytes) -> None:
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


def log_tail(path: Path, lines: int = 5) -> str:
    """The last ``lines`` lines of a worker's stderr log ("" if it has none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
