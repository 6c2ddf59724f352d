"""A real PgBouncer in front of a :class:`~pgwarden.testing.PostgresServer`.

PgBouncer refuses to run as root, so when Python is root it runs as the same unprivileged
user as PostgreSQL. Its configuration, its ``auth_file`` (the superuser's password, in
plain text, which PgBouncer needs to log in to the server with SCRAM) and its log live in a
private temporary directory that :meth:`PgBouncerServer.close` removes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import psycopg

from . import _lifecycle
from ._binaries import find_pgbouncer, free_port, pgbouncer_version, user_kwargs
from ._binaries import run_as_user as _run_as_user
from ._errors import ServerStartError, ServerUnavailable
from ._front import FrontServer
from .postgres import PostgresServer

__all__ = ["PgBouncerServer", "PoolMode"]

PoolMode = Literal["session", "transaction", "statement"]


def _conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    if "\n" in text:
        raise ValueError(f"PgBouncer setting values cannot contain newlines: {text!r}")
    return text


class PgBouncerServer(FrontServer):
    """A PgBouncer process listening on ``127.0.0.1`` and a free (or given) port.

    Every database name is forwarded to ``postgres`` over TCP; clients log in as
    ``postgres`` with the server's password (``auth_type = scram-sha-256``). ``extra``
    adds or overrides ``[pgbouncer]`` settings. Defaults differ from PgBouncer's in two
    places, to keep tests fast and psycopg-friendly: ``server_login_retry = 1`` (not 15 s)
    and ``ignore_startup_parameters = extra_float_digits,options``.

    Raises :class:`ServerUnavailable` at once if PgBouncer is not installed (``binary``
    overrides discovery, see :func:`pgwarden.testing.find_pgbouncer`).
    """

    def __init__(
        self,
        postgres: PostgresServer,
        *,
        pool_mode: PoolMode = "transaction",
        default_pool_size: int = 5,
        max_client_conn: int = 200,
        query_wait_timeout: float = 120,
        port: int | None = None,
        extra: Mapping[str, object] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self._binary = find_pgbouncer(binary)
        self._run_as = _run_as_user()
        self.postgres = postgres
        self._settings: dict[str, object] = {
            "pool_mode": pool_mode,
            "default_pool_size": default_pool_size,
            "max_client_conn": max_client_conn,
            "query_wait_timeout": query_wait_timeout,
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": 1,
        }
        self._settings.update(extra or {})
        super().__init__()
        self._port = free_port(self.host) if port is None else int(port)
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_key: str | None = None
        self._version: str | None = None

    @property
    def version(self) -> str:
        """PgBouncer version, such as ``"1.18.0"``."""
        if self._version is None:
            self._version = pgbouncer_version(self._binary, self._run_as)
        return self._version

    @property
    def settings(self) -> Mapping[str, object]:
        """The ``[pgbouncer]`` settings it runs with (besides addresses and auth)."""
        return dict(self._settings)

    @property
    def log_path(self) -> Path:
        """PgBouncer's log file."""
        return self.base_dir / "pgbouncer.log"

    def start(self, timeout: float = 30) -> PgBouncerServer:
        """Start PgBouncer and wait until it serves a query (or, while PostgreSQL is down,
        until it accepts TCP connections); no-op if running. Returns ``self``."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this PgBouncerServer is closed")
            if self.is_running():
                return self
            if self._root is None:
                self._prepare()
            self._write_config()
            self._spawn()
            try:
                self.wait_ready(timeout)
            except BaseException:
                self._reap(kill=True)
                raise
            return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until PgBouncer answers (see :meth:`start`); raise
        :class:`ServerStartError` with its log tail if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        last_error: list[str] = []

        def attempt() -> bool | None:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"PgBouncer exited (code {code}) before accepting connections on port "
                    f"{self._port}; last log lines:\n{self.log_tail(20)}"
                )
            try:
                if not self.postgres.is_running():
                    with socket.create_connection((self.host, self._port), timeout=1):
                        return True
                with psycopg.connect(self.url, connect_timeout=2, prepare_threshold=None) as c:
                    c.execute("SELECT 1")
                return True
            except (OSError, psycopg.OperationalError) as exc:
                last_error[:] = [str(exc).strip()]
                return None

        if _lifecycle.poll_until(deadline, attempt) is None:
            raise ServerStartError(
                f"PgBouncer on port {self._port} did not become ready within {timeout:.1f}s "
                f"({last_error[0] if last_error else 'no attempt'}); last log lines:\n"
                f"{self.log_tail(20)}"
            )

    def stop(self, timeout: float = 30) -> None:
        """Shut PgBouncer down at once (SIGTERM, as ``SHUTDOWN``): clients are cut off."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
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

    def _prepare(self) -> None:
        self._make_root("pgwarden-bouncer-")

    def _write_file(self, name: str, text: str) -> Path:
        path = self.base_dir / name
        path.write_text(text)
        path.chmod(0o600)
        if self._run_as is not None:
            self._run_as.chown(path)
        return path

    def _write_config(self) -> None:
        userlist = self._write_file(
            "userlist.txt", f'"{self.user}" "{self.password.replace(chr(34), chr(34) * 2)}"\n'
        )
        settings: dict[str, object] = {
            "listen_addr": self.host,
            "listen_port": self._port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": userlist,
            "admin_users": self.user,
            "stats_users": self.user,
            **self._settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.postgres.host} port={self.postgres.port}",
            "",
            "[pgbouncer]",
            *(f"{name} = {_conf_value(value)}" for name, value in settings.items()),
        ]
        self._write_file("pgbouncer.ini", "\n".join(lines) + "\n")

    def _spawn(self) -> None:
        root = self.base_dir
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(root / "pgbouncer.log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(self._binary), str(root / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
                start_new_session=True,
                **user_kwargs(self._run_as),
            )
        self._proc_key = _lifecycle.new_key()
        _lifecycle.watch_process(self._proc_key, self._proc.pid, signal.SIGTERM)

    def _reap(self, *, kill: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._proc = None
        if self._proc_key is not None:
            _lifecycle.forget(self._proc_key)
            self._proc_key = None


__all__ += ["ServerStartError", "ServerUnavailable"]
