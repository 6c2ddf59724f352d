"""A real pgpool-II in front of a :class:`~pgwarden.testing.PostgresServer`.

pgpool-II runs in ``raw`` clustering mode with the one backend, as the same unprivileged
user as PostgreSQL when Python is root (like :class:`~pgwarden.testing.PgBouncerServer`).
Clients log in to pgpool-II with SCRAM (``pool_hba.conf``), and pgpool-II logs in to the
backend with the password kept in its ``pool_passwd`` file, in plain text (pgpool-II needs
it in clear to answer the backend's SCRAM exchange). Configuration, sockets, pid file and
log live in a private temporary directory that :meth:`PgpoolServer.close` removes.

Environment variable read here (optional): ``PGWARDEN_TEST_PGPOOL``, the path of the
``pgpool`` executable (overrides discovery).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg

from . import _lifecycle
from ._binaries import RunAs, free_port, user_kwargs
from ._binaries import _version_of as _binary_version
from ._binaries import run_as_user as _run_as_user
from ._errors import ServerStartError, ServerUnavailable
from ._front import FrontServer
from .postgres import PostgresServer

__all__ = ["PgpoolServer", "find_pgpool", "pgpool_version"]

_HINT = (
    "install pgpool-II (Debian/Ubuntu: apt-get install pgpool2) "
    "or point PGWARDEN_TEST_PGPOOL at the executable"
)


def find_pgpool(binary: str | os.PathLike[str] | None = None) -> Path:
    """Return the ``pgpool`` executable: ``binary``, ``$PGWARDEN_TEST_PGPOOL``, ``PATH``, or
    ``/usr/sbin``. Raises :class:`ServerUnavailable` with install advice if missing."""
    for given, name in ((binary, "binary"), (os.environ.get("PGWARDEN_TEST_PGPOOL"), None)):
        if given:
            path = Path(given)
            if os.access(path, os.X_OK) and path.is_file():
                return path
            origin = name or "PGWARDEN_TEST_PGPOOL"
            raise ServerUnavailable(f"{origin}={os.fspath(given)!r} is not an executable; {_HINT}")
    found = shutil.which("pgpool")
    if found is not None:
        return Path(found)
    for candidate in ("/usr/sbin/pgpool", "/usr/local/sbin/pgpool", "/usr/bin/pgpool"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ServerUnavailable(f"pgpool-II is not installed (pgpool not found); {_HINT}")


def pgpool_version(binary: Path, run_as: RunAs | None = None) -> str:
    """Return the pgpool-II version (``"4.3.5"``) by running ``pgpool --version``."""
    return _binary_version(
        [str(binary), "--version"], r"pgpool-II version\s+(\d+(?:\.\d+)*)", run_as
    )


def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    text = str(value)
    if "\n" in text or "'" in text:
        raise ValueError(f"pgpool-II setting values cannot contain newlines or quotes: {text!r}")
    return f"'{text}'"


class PgpoolServer(FrontServer):
    """A pgpool-II process listening on ``127.0.0.1`` and a free (or given) port.

    ``num_init_children`` is how many clients it serves at once (one child process each);
    ``reserved_connections`` > 0 makes it refuse the client beyond
    ``num_init_children - reserved_connections`` with pgpool-II's own 53300 ("Sorry, too
    many clients already") instead of queueing it. ``extra`` adds or overrides settings.
    Defaults differ from pgpool-II's where a test needs them to: ``failover_on_backend_error``
    and ``failover_on_backend_shutdown`` are off (with one backend, a detached node would
    stay down until pgpool-II restarts), ``load_balance_mode`` is off, health checks are
    off, and the (unused) query cache's shared memory is 1 MB.

    Raises :class:`ServerUnavailable` at once if pgpool-II is not installed (``binary``
    overrides discovery, see :func:`find_pgpool`).
    """

    def __init__(
        self,
        postgres: PostgresServer,
        *,
        num_init_children: int = 8,
        reserved_connections: int = 0,
        port: int | None = None,
        extra: Mapping[str, object] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self._binary = find_pgpool(binary)
        self._run_as = _run_as_user()
        self.postgres = postgres
        self._settings: dict[str, object] = {
            "num_init_children": num_init_children,
            "reserved_connections": reserved_connections,
            "max_pool": 1,
            "failover_on_backend_error": False,
            "failover_on_backend_shutdown": False,
            "load_balance_mode": False,
            "health_check_period": 0,
            # pgpool-II sizes its query-cache shared memory by these even with the cache
            # off; its defaults (64 MB and more) make a start take 300 ms instead of 40.
            "memqcache_total_size": "1MB",
            "memqcache_max_num_cache": 100,
        }
        self._settings.update(extra or {})
        super().__init__()
        self._port = free_port(self.host) if port is None else int(port)
        self._pcp_port = free_port(self.host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_key: str | None = None
        self._version: str | None = None

    @property
    def version(self) -> str:
        """pgpool-II version, such as ``"4.3.5"``."""
        if self._version is None:
            self._version = pgpool_version(self._binary, self._run_as)
        return self._version

    @property
    def settings(self) -> Mapping[str, object]:
        """The settings it runs with (besides addresses, files and the backend)."""
        return dict(self._settings)

    @property
    def log_path(self) -> Path:
        """pgpool-II's log (its stderr)."""
        return self.base_dir / "pgpool.log"

    def start(self, timeout: float = 30) -> PgpoolServer:
        """Start pgpool-II and wait until it serves a query (or, while PostgreSQL is down,
        until it accepts TCP connections); no-op if running. Returns ``self``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this PgpoolServer is closed")
            if self.is_running():
                return self
            if self._root is None:
                self._make_root("pgwarden-pgpool-")
            self._write_config()
            self._spawn()
            try:
                self.wait_ready(timeout)
            except BaseException:
                self._reap(kill=True)
                raise
            return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until pgpool-II answers (see :meth:`start`); raise
        :class:`ServerStartError` with its log tail if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last_error: list[str] = []

        def attempt() -> bool | None:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"pgpool-II exited (code {code}) before accepting connections on port "
                    f"{self._port}; last log lines:\n{self.log_tail(20)}"
                )
            try:
                if not self.postgres.is_running():
                    with socket.create_connection((self.host, self._port), timeout=1):
                        return True
                with psycopg.connect(self.url, connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return True
            except (OSError, psycopg.OperationalError) as exc:
                last_error[:] = [str(exc).strip()]
                return None

        if _lifecycle.poll_until(deadline, attempt) is None:
            raise ServerStartError(
                f"pgpool-II on port {self._port} did not become ready within {timeout:.1f}s "
                f"({last_error[0] if last_error else 'no attempt'}); last log lines:\n"
                f"{self.log_tail(20)}"
            )

    def stop(self, timeout: float = 30) -> None:
        """Shut pgpool-II down at once (SIGINT, its "fast" mode): clients are cut off."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._reap(kill=True)
            self._reap(kill=False)

    def restart(self, timeout: float = 30) -> None:
        """Stop and start again on the same port; client connections break."""
        with self._lock:
            self.stop(timeout)
            self.start(timeout)

    def _stop_for_close(self) -> None:
        self.stop(timeout=10)

    # -- internals ---------------------------------------------------------------------

    def _write_file(self, name: str, text: str) -> Path:
        path = self.base_dir / name
        path.write_text(text)
        path.chmod(0o600)
        if self._run_as is not None:
            self._run_as.chown(path)
        return path

    def _write_config(self) -> None:
        root = self.base_dir
        self._write_file("pool_passwd", f"{self.user}:TEXT{self.password}\n")
        self._write_file(
            "pool_hba.conf",
            "# pgwarden test pgpool-II: TCP needs the password.\n"
            "host all all 127.0.0.1/32 scram-sha-256\n",
        )
        self._write_file("pcp.conf", "")
        settings: dict[str, object] = {
            "backend_clustering_mode": "raw",
            "listen_addresses": self.host,
            "port": self._port,
            "socket_dir": root,
            "pcp_listen_addresses": self.host,
            "pcp_port": self._pcp_port,
            "pcp_socket_dir": root,
            "wd_ipc_socket_dir": root,
            "pid_file_name": root / "pgpool.pid",
            "logdir": root,
            "memqcache_oiddir": root / "oiddir",
            "log_destination": "stderr",
            "logging_collector": False,
            "enable_pool_hba": True,
            "pool_passwd": "pool_passwd",
            "backend_hostname0": self.postgres.host,
            "backend_port0": self.postgres.port,
            "backend_weight0": 1,
            "backend_flag0": "ALLOW_TO_FAILOVER",
            **self._settings,
        }
        lines = [f"{name} = {_conf_value(value)}" for name, value in settings.items()]
        self._write_file("pgpool.conf", "\n".join(lines) + "\n")

    def _spawn(self) -> None:
        root = self.base_dir
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        # pgpool-II refuses to start over a pid file left by a killed run.
        with contextlib.suppress(FileNotFoundError):
            (root / "pgpool.pid").unlink()
        argv = [
            str(self._binary),
            "-n",
            "-f",
            str(root / "pgpool.conf"),
            "-F",
            str(root / "pcp.conf"),
            "-a",
            str(root / "pool_hba.conf"),
        ]
        with open(root / "pgpool.log", "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,
                **user_kwargs(self._run_as),
            )
        self._proc_key = _lifecycle.new_key()
        _lifecycle.watch_process(self._proc_key, self._proc.pid, signal.SIGINT)

    def _reap(self, *, kill: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            # The children are in pgpool's own session: take them down with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        if self._proc_key is not None:
            _lifecycle.forget(self._proc_key)
            self._proc_key = None


__all__ += ["ServerStartError", "ServerUnavailable"]
