"""A throwaway PostgreSQL cluster on a free loopback port.

Theory of operation: the first server of a PostgreSQL version builds a *template* data
directory with ``initdb`` (once per machine: it is cached in the temporary directory under
``pgwarden-template-<version>-<uid>-<hash>``, built elsewhere and renamed into place so that
concurrent processes never see half of one). Every server copies the template, writes its
settings to ``postgresql.auto.conf``, starts ``postgres`` directly as a child process (as the
``postgres`` system user when Python runs as root), polls until it accepts connections, and
sets a random password for the ``postgres`` superuser. TCP clients must use that password
(``scram-sha-256``); the admin helpers use the private Unix socket, which trusts local users.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.abc import Params, QueryNoTemplate

from . import _lifecycle
from ._binaries import (
    RunAs,
    find_postgres_bindir,
    free_port,
    is_linux,
    postgres_version,
    user_kwargs,
)
from ._binaries import run_as_user as _run_as_user
from ._errors import ServerStartError, ServerUnavailable
from ._scratch import ScratchServer

__all__ = ["DEFAULT_SETTINGS", "PostgresServer", "StopMode"]

#: How `PostgresServer.stop` shuts the server down: ``pg_ctl stop -m <mode>``.
StopMode = Literal["smart", "fast", "immediate"]

#: Settings every server starts with; each can be overridden by ``settings``.
#: ``fsync`` and ``full_page_writes`` are off: data survives a server crash (the OS still
#: has it) but not a machine crash, which is right for throwaway servers only.
#: ``synchronous_commit`` stays on: with fsync off it costs microseconds, and turning it
#: off would let ``restart("immediate")`` lose commits that clients saw succeed.
DEFAULT_SETTINGS: Mapping[str, object] = {
    "listen_addresses": "127.0.0.1",
    "fsync": False,
    "synchronous_commit": True,
    "full_page_writes": False,
    "wal_level": "minimal",
    "max_wal_senders": 0,
    "shared_buffers": "16MB",
    "jit": False,
    "huge_pages": "off",
    "logging_collector": False,
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "password_encryption": "scram-sha-256",
    "unix_socket_permissions": "0700",
}

_SIGNALS: Mapping[str, int] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

_HBA = """\
# pgwarden test server: local socket trusted, TCP needs the password.
local   all   all                  trust
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""

_INITDB_ARGS = (
    "--username=postgres",
    "--auth=trust",
    "--encoding=UTF8",
    "--locale=C",
    "--no-sync",
    "--wal-segsize=1",
)
_TEMPLATE_FORMAT = "1"


def _quote_conf(value: object) -> str:
    """Render a setting value the way ``ALTER SYSTEM`` writes it."""
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _check_name(name: str) -> str:
    parts = name.split(".")
    if not name or len(parts) > 2 or not all(p.isidentifier() and p.isascii() for p in parts):
        raise ValueError(f"not a PostgreSQL setting name: {name!r}")
    return name.lower()


# -- template ------------------------------------------------------------------------------

_template_lock = threading.Lock()
_templates: dict[tuple[Path, str, RunAs | None], tuple[Path, float]] = {}


class _PrivateTemplate:
    """A template this process had to build for itself; removed at exit."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        _lifecycle.forget(self.key)
        _lifecycle.unregister(self)


def _template_ok(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        path.is_dir()
        and not path.is_symlink()
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o022
        and (path / "ok").is_file()
        and (path / "data" / "PG_VERSION").is_file()
    )


def _template_for(bindir: Path, version: str, run_as: RunAs | None) -> tuple[Path, float]:
    """Return (template directory, seconds spent in initdb here: 0.0 if it was cached)."""
    cache_key = (bindir, version, run_as)
    with _template_lock:
        if cache_key in _templates and _template_ok(_templates[cache_key][0]):
            return _templates[cache_key][0], 0.0
        digest = hashlib.sha256(
            "\0".join(
                [_TEMPLATE_FORMAT, str(bindir), version, *_INITDB_ARGS, _HBA, str(run_as)]
            ).encode()
        ).hexdigest()[:10]
        final = Path(tempfile.gettempdir()) / f"pgwarden-template-{version}-{os.geteuid()}-{digest}"
        if _template_ok(final):
            _templates[cache_key] = (final, 0.0)
            return final, 0.0
        build = Path(tempfile.mkdtemp(prefix=final.name + ".build-", dir=final.parent))
        key = _lifecycle.new_key()
        _lifecycle.watch_path(key, build)
        try:
            elapsed = _initdb(bindir, build, run_as)
            (build / "ok").write_text(version + "\n")
            try:
                os.rename(build, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if _template_ok(final):  # another process won the race: use theirs
                    shutil.rmtree(build, ignore_errors=True)
                    _lifecycle.forget(key)
                    _templates[cache_key] = (final, 0.0)
                    return final, 0.0
                # Something we do not trust sits at the shared path: keep ours private.
                private = _PrivateTemplate(build, key)
                _lifecycle.register(private)
                _templates[cache_key] = (build, elapsed)
                return build, elapsed
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            _lifecycle.forget(key)
            raise
        _lifecycle.forget(key)
        _templates[cache_key] = (final, elapsed)
        return final, elapsed


def _initdb(bindir: Path, build: Path, run_as: RunAs | None) -> float:
    build.chmod(0o755)
    data = build / "data"
    data.mkdir(mode=0o700)
    if run_as is not None:
        run_as.chown(data)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), *_INITDB_ARGS],
        capture_output=True,
        text=True,
        cwd=build,
        timeout=120,
        **user_kwargs(run_as),
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise ServerStartError(
            f"initdb failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    hba = data / "pg_hba.conf"
    hba.write_text(_HBA)
    if run_as is not None:
        run_as.chown(hba)
    return elapsed


def _copy_tree(src: Path, dst: Path, run_as: RunAs | None) -> None:
    if shutil.which("cp") is not None:
        argv = ["cp", "-a", "--reflink=auto"] if is_linux() else ["cp", "-pPR"]
        proc = subprocess.run([*argv, str(src), str(dst)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    if run_as is not None:
        for root, dirs, files in os.walk(dst):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), run_as.uid, run_as.gid)
        run_as.chown(dst)


# -- the server ----------------------------------------------------------------------------


#: How long the harness's admin connection waits for a slot on a full server.
ADMIN_SLOT_WAIT = 5.0


def _no_slot_left(exc: psycopg.OperationalError) -> bool:
    """The server refused the login for want of a connection slot (53300's texts)."""
    text = str(exc)
    return "too many clients already" in text or "connection slots are reserved" in text


class PostgresServer(ScratchServer):
    """A throwaway PostgreSQL server on ``127.0.0.1`` and a free (or given) port.

    Nothing runs until :meth:`start` (or ``with``). :meth:`close` stops the server and
    removes every file it made; it is also called at interpreter exit, on SIGTERM/SIGHUP,
    and, via a watchdog process, when Python is killed outright.

    ``settings`` are written to ``postgresql.auto.conf`` over :data:`DEFAULT_SETTINGS`,
    so :meth:`set_config` (``ALTER SYSTEM``) can change any of them later. ``bindir`` names
    the directory of ``postgres``/``initdb``; by default it is discovered (see
    :func:`pgwarden.testing.find_postgres_bindir`). Raises :class:`ServerUnavailable` at
    once if no binaries, or no unprivileged user to run them as, can be found.
    """

    host = "127.0.0.1"
    user = "postgres"
    dbname = "postgres"

    def __init__(
        self,
        settings: Mapping[str, object] | None = None,
        *,
        port: int | None = None,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._bindir = find_postgres_bindir(bindir)
        self._run_as = _run_as_user()
        self._settings: dict[str, object] = dict(DEFAULT_SETTINGS)
        for name, value in (settings or {}).items():
            self._settings[_check_name(name)] = value
        self._auto_port = port is None
        super().__init__()
        self._port = free_port(self.host) if port is None else int(port)
        self._password = secrets.token_urlsafe(18)
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_key: str | None = None
        self._password_set = False
        self._version: str | None = None
        #: Seconds spent in the phases of the last start: ``initdb`` (0.0 when the template
        #: was cached), ``copy`` (template to data directory), ``start`` (spawn until ready).
        self.timings: dict[str, float] = {}

    # -- properties --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port on :attr:`host` (fixed for the server's life, across restarts)."""
        return self._port

    @property
    def password(self) -> str:
        """The random password of the ``postgres`` superuser."""
        return self._password

    @property
    def url(self) -> str:
        """``postgresql://postgres:<password>@127.0.0.1:<port>/postgres``."""
        return self.url_for()

    @property
    def bindir(self) -> Path:
        """Directory of the PostgreSQL binaries this server runs."""
        return self._bindir

    @property
    def version(self) -> str:
        """Server version, such as ``"15.20"``."""
        if self._version is None:
            self._version = postgres_version(self._bindir, self._run_as)
        return self._version

    @property
    def data_dir(self) -> Path:
        """The data directory (``PGDATA``)."""
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory of the Unix socket (trusted: no password needed)."""
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self.base_dir / "postgres.log"

    @property
    def settings(self) -> Mapping[str, object]:
        """The settings the server was created with (defaults included)."""
        return dict(self._settings)

    def url_for(
        self, dbname: str | None = None, *, user: str | None = None, password: str | None = None
    ) -> str:
        """Return a TCP URL for ``dbname`` and ``user``.

        The password defaults to the superuser's when ``user`` is ``postgres`` (or not
        given); for other users it is left out unless passed.
        """
        user = user or self.user
        if password is None and user == self.user:
            password = self._password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return (
            f"postgresql://{auth}@{self.host}:{self._port}/{quote(dbname or self.dbname, safe='')}"
        )

    # -- lifecycle ---------------------------------------------------------------------

    def is_running(self) -> bool:
        """True while the postmaster process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def start(self, timeout: float = 30) -> PostgresServer:
        """Start the server and wait until it accepts connections; no-op if running.

        Raises :class:`ServerStartError` (with the log tail) if it exits or is not ready
        within ``timeout`` seconds. Returns ``self``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise RuntimeError("this PostgresServer is closed")
            if self.is_running():
                return self
            if self._root is None:
                self._prepare()
            started = time.perf_counter()
            attempts = 3 if self._auto_port and not self._password_set else 1
            for attempt in range(attempts):
                self._spawn()
                try:
                    self.wait_ready(max(0.0, deadline - time.monotonic()))
                    break
                except ServerStartError:
                    clash = self._port_clash()
                    self._reap(kill=True)
                    if not clash or attempt == attempts - 1:
                        raise
                    self._port = free_port(self.host)
            if not self._password_set:
                self._set_password()
            self.timings["start"] = time.perf_counter() - started
            return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until the server accepts a connection (bounded by ``timeout`` seconds).

        Raises :class:`ServerStartError` with the log tail if the server process exits or
        the deadline passes first.
        """
        deadline = time.monotonic() + timeout
        last_error: list[str] = []

        def attempt() -> bool | None:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"PostgreSQL exited (code {code}) before accepting connections on port "
                    f"{self._port}; last log lines:\n{self.log_tail(20)}"
                )
            try:
                with self._admin_connect(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError as exc:
                last_error[:] = [str(exc).strip()]
                return None

        if _lifecycle.poll_until(deadline, attempt) is None:
            raise ServerStartError(
                f"PostgreSQL on port {self._port} did not accept connections within "
                f"{timeout:.1f}s ({last_error[0] if last_error else 'no attempt'}); "
                f"last log lines:\n{self.log_tail(20)}"
            )

    def stop(self, mode: StopMode = "fast", timeout: float = 30) -> None:
        """Stop the server with ``pg_ctl``'s semantics for ``mode``; no-op if not running.

        ``smart`` waits for clients to leave, ``fast`` (SIGINT) disconnects them and shuts
        down cleanly, ``immediate`` (SIGQUIT) quits at once like a crash, so the next start
        runs crash recovery. After ``timeout`` seconds it escalates to SIGQUIT, then SIGKILL.
        """
        if mode not in _SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_SIGNALS)}, not {mode!r}")
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(_SIGNALS[mode])
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._reap(kill=True)
            self._reap(kill=False)

    def restart(self, mode: StopMode = "fast", timeout: float = 30) -> None:
        """Stop with ``mode`` and start again on the same port; open connections break."""
        with self._lock:
            self.stop(mode, timeout)
            self.start(timeout)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else ("closed" if self._closed else "stopped")
        return f"<PostgresServer {self.host}:{self._port} {state}>"

    # -- admin helpers -----------------------------------------------------------------

    def execute(self, sql: QueryNoTemplate, params: Params | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as superuser on a short-lived connection, in autocommit.

        Returns the rows (an empty list for statements without a result), so it can run
        ``CREATE DATABASE`` as well as queries.
        """
        with self._admin_connect() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def terminate_backends(self) -> int:
        """``pg_terminate_backend`` every client backend but the caller's; return how many.

        On PostgreSQL 14 and later it waits (up to 5 s each) until they have exited.
        """
        if int(self.version.split(".")[0]) >= 14:
            query = (
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
                "FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        else:
            query = (
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                "FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        with self._admin_connect() as conn:
            conn.add_notice_handler(lambda diag: None)  # "is not a PostgreSQL backend"
            row = conn.execute(query).fetchone()
        return int(row[0]) if row is not None else 0

    def set_config(self, **settings: object) -> list[str]:
        """``ALTER SYSTEM SET`` each setting (``None`` resets it), then reload.

        Returns once new connections see the reloaded configuration. Returns the names
        that need :meth:`restart` to take effect (such as ``max_connections``).
        """
        names = {_check_name(name): value for name, value in settings.items()}
        with self._admin_connect() as conn:
            row = conn.execute("SELECT pg_conf_load_time()").fetchone()
            before = None if row is None else row[0]
            for name, value in names.items():
                if value is None:
                    stmt = sql.SQL("ALTER SYSTEM RESET {}").format(sql.SQL(name))
                else:
                    text = "on" if value is True else "off" if value is False else str(value)
                    stmt = sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.SQL(name), sql.Literal(text)
                    )
                conn.execute(stmt)
                self._settings[name] = value
            conn.execute("SELECT pg_reload_conf()")

        def reloaded() -> bool | None:
            with self._admin_connect() as conn:
                now = conn.execute("SELECT pg_conf_load_time() > %s", [before]).fetchone()
            return True if now is not None and now[0] else None

        if _lifecycle.poll_until(time.monotonic() + 10, reloaded) is None:
            raise ServerStartError("the server did not reload its configuration within 10 s")
        rows = self.execute(
            "SELECT name FROM pg_settings WHERE pending_restart AND name = ANY(%s)",
            [list(names)],
        )
        return sorted(str(r[0]) for r in rows)

    def _stop_for_close(self) -> None:
        self.stop("fast", timeout=10)

    # -- internals ---------------------------------------------------------------------

    def _admin_connect(self, connect_timeout: int = 10) -> psycopg.Connection[tuple[Any, ...]]:
        # A session that just closed frees its slot only once its backend has exited, a
        # few milliseconds later: on a server a test filled up on purpose, the harness's
        # own connection waits for that instead of failing the test's cleanup.
        give_up = time.monotonic() + ADMIN_SLOT_WAIT
        while True:
            try:
                return psycopg.connect(
                    host=str(self.socket_dir),
                    port=self._port,
                    user=self.user,
                    dbname=self.dbname,
                    connect_timeout=connect_timeout,
                    autocommit=True,
                    application_name="pgwarden-testing-admin",
                )
            except psycopg.OperationalError as exc:
                if not _no_slot_left(exc) or time.monotonic() >= give_up:
                    raise
                time.sleep(0.01)

    def _prepare(self) -> None:
        """Make the directories, copy the template and write the settings."""
        template, initdb_seconds = _template_for(self._bindir, self.version, self._run_as)
        root = self._make_root("pgwarden-pg-")
        (root / "sock").mkdir(mode=0o700)
        if self._run_as is not None:
            self._run_as.chown(root / "sock")
        started = time.perf_counter()
        _copy_tree(template / "data", root / "data", self._run_as)
        self.timings = {"initdb": initdb_seconds, "copy": time.perf_counter() - started}
        auto = root / "data" / "postgresql.auto.conf"
        lines = [
            "# Do not edit this file manually!",
            "# It will be overwritten by the ALTER SYSTEM command.",
            *(f"{name} = {_quote_conf(value)}" for name, value in self._settings.items()),
        ]
        auto.write_text("\n".join(lines) + "\n")
        if self._run_as is not None:
            self._run_as.chown(auto)
        auto.chmod(0o600)

    def _spawn(self) -> None:
        root = self.base_dir
        stale_pid = root / "data" / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError):
            stale_pid.unlink()  # only ever ours, and our postmaster is known to be dead
        argv = [
            str(self._bindir / "postgres"),
            "-D",
            str(root / "data"),
            "-p",
            str(self._port),
            "-k",
            str(root / "sock"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        with open(self.log_path, "ab") as log:
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
        if self._run_as is not None:
            with contextlib.suppress(OSError):
                self._run_as.chown(self.log_path)
        self._proc_key = _lifecycle.new_key()
        _lifecycle.watch_process(self._proc_key, self._proc.pid, signal.SIGQUIT)

    def _reap(self, *, kill: bool) -> None:
        """Wait for the postmaster to be gone (SIGQUIT then SIGKILL if ``kill``)."""
        proc = self._proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 30.0)):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        proc.wait()
        self._proc = None
        if self._proc_key is not None:
            _lifecycle.forget(self._proc_key)
            self._proc_key = None

    def _port_clash(self) -> bool:
        if not self._auto_port or self._password_set:
            return False
        tail = self.log_tail(20)
        return "could not bind" in tail or "could not create any TCP/IP sockets" in tail

    def _set_password(self) -> None:
        with self._admin_connect() as conn:
            conn.execute("SET synchronous_commit TO on")  # must survive an immediate restart
            conn.execute(
                sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(self._password))
            )
        self._password_set = True


__all__ += ["ServerStartError", "ServerUnavailable"]
