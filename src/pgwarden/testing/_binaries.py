"""Finding the server binaries, the user to run them as, and free ports.

Environment variables read here (all optional):

``PGWARDEN_TEST_PG_BINDIR``
    directory holding ``postgres`` and ``initdb``; overrides discovery.
``PGWARDEN_TEST_PGBOUNCER``
    path of the ``pgbouncer`` executable; overrides discovery.
``PGWARDEN_TEST_RUN_AS``
    system user that runs the servers when Python runs as root (default ``postgres``).
``PGWARDEN_TEST_TMPDIR``
    where servers keep their data directories (default: ``/dev/shm`` when it is a
    shared tmpfs with at least 1 GiB free, else the temporary directory).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ServerUnavailable

__all__ = [
    "RunAs",
    "find_pgbouncer",
    "find_postgres_bindir",
    "free_port",
    "pgbouncer_version",
    "postgres_version",
    "run_as_user",
    "scratch_dir",
    "user_kwargs",
]

_INSTALL_HINT = (
    "install PostgreSQL (Debian/Ubuntu: apt-get install postgresql), "
    "or point PGWARDEN_TEST_PG_BINDIR at a directory holding postgres and initdb"
)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged system user that runs the servers when Python runs as root."""

    name: str
    uid: int
    gid: int

    def chown(self, path: Path) -> None:
        """Give ``path`` (not recursively) to this user."""
        os.chown(path, self.uid, self.gid)


def user_kwargs(run_as: RunAs | None) -> dict[str, Any]:
    """Keyword arguments for :mod:`subprocess` that run a child as ``run_as`` (if any)."""
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}


def run_as_user() -> RunAs | None:
    """Return the user to run servers as, or None to run them as the current user.

    PostgreSQL and PgBouncer refuse to run as root, so as root this is the system user
    named by ``PGWARDEN_TEST_RUN_AS`` (default ``postgres``). Raises :class:`ServerUnavailable`
    when that user does not exist.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get("PGWARDEN_TEST_RUN_AS") or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServerUnavailable(
            f"running as root, but PostgreSQL and PgBouncer refuse to run as root and the "
            f"system user {name!r} does not exist; create it (useradd --system {name}) or "
            f"set PGWARDEN_TEST_RUN_AS to an existing unprivileged user"
        ) from None
    if entry.pw_uid == 0:
        raise ServerUnavailable(f"PGWARDEN_TEST_RUN_AS={name!r} is root; name an unprivileged user")
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def _has_server(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("postgres", "initdb"))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); unknown names sort first.
    numbers = re.findall(r"\d+", path.parent.name)
    return tuple(int(n) for n in numbers) or (-1,)


def find_postgres_bindir(bindir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory holding ``postgres`` and ``initdb``.

    Order: ``bindir`` if given, ``$PGWARDEN_TEST_PG_BINDIR``, ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian), ``/usr/pgsql-*/bin`` (RHEL), the directory of
    ``postgres`` on ``PATH``. Raises :class:`ServerUnavailable` if none has both binaries.
    """
    return _find_postgres_bindir(
        None if bindir is None else os.fspath(bindir), os.environ.get("PGWARDEN_TEST_PG_BINDIR")
    )


@functools.lru_cache(maxsize=16)
def _find_postgres_bindir(explicit: str | None, from_env: str | None) -> Path:
    for given, origin in ((explicit, "bindir"), (from_env, "PGWARDEN_TEST_PG_BINDIR")):
        if given:
            path = Path(given)
            if _has_server(path):
                return path
            raise ServerUnavailable(
                f"{origin}={given!r} does not contain executable postgres and initdb; "
                f"{_INSTALL_HINT}"
            )
    looked: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            looked.append(out)
            if _has_server(Path(out)):
                return Path(out)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    candidates += sorted(Path("/usr").glob("pgsql-*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("postgres")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        looked.append(str(candidate))
        if _has_server(candidate):
            return candidate
    where = ", ".join(looked) or "pg_config, /usr/lib/postgresql/*/bin and PATH"
    raise ServerUnavailable(
        f"PostgreSQL server binaries (postgres, initdb) not found (looked in: {where}); "
        f"{_INSTALL_HINT}"
    )


@functools.lru_cache(maxsize=16)
def postgres_version(bindir: Path, run_as: RunAs | None) -> str:
    """Return the server version (``"15.20"``) by running ``postgres -V`` as ``run_as``.

    Running it as that user also proves the user may execute the binaries; if it may not,
    raises :class:`ServerUnavailable`.
    """
    return _version_of(
        [str(bindir / "postgres"), "-V"], r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?)", run_as
    )


@functools.lru_cache(maxsize=4)
def pgbouncer_version(binary: Path, run_as: RunAs | None) -> str:
    """Return the PgBouncer version (``"1.18.0"``) by running ``pgbouncer --version``."""
    return _version_of([str(binary), "--version"], r"PgBouncer\s+(\d+(?:\.\d+)*)", run_as)


def _version_of(argv: list[str], pattern: str, run_as: RunAs | None) -> str:
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            **user_kwargs(run_as),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        who = f" as user {run_as.name!r}" if run_as else ""
        raise ServerUnavailable(f"cannot run {argv[0]}{who}: {exc}") from exc
    match = re.search(pattern, proc.stdout + proc.stderr)
    if proc.returncode != 0 or match is None:
        who = f" as user {run_as.name!r}" if run_as else ""
        detail = (proc.stderr or proc.stdout).strip()
        raise ServerUnavailable(
            f"{' '.join(argv)}{who} failed (exit {proc.returncode}): {detail or 'no output'}"
        )
    return match.group(1)


def find_pgbouncer(binary: str | os.PathLike[str] | None = None) -> Path:
    """Return the ``pgbouncer`` executable: ``binary``, ``$PGWARDEN_TEST_PGBOUNCER``, ``PATH``,
    or ``/usr/sbin``. Raises :class:`ServerUnavailable` with install advice if missing."""
    hint = (
        "install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer) "
        "or point PGWARDEN_TEST_PGBOUNCER at the executable"
    )
    for given, origin in ((binary, "binary"), (os.environ.get("PGWARDEN_TEST_PGBOUNCER"), "env")):
        if given:
            path = Path(given)
            if os.access(path, os.X_OK) and path.is_file():
                return path
            name = "PGWARDEN_TEST_PGBOUNCER" if origin == "env" else "binary"
            raise ServerUnavailable(f"{name}={os.fspath(given)!r} is not an executable; {hint}")
    found = shutil.which("pgbouncer")
    if found is not None:
        return Path(found)
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ServerUnavailable(f"PgBouncer is not installed (pgbouncer not found); {hint}")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_linux() -> bool:
    """True on Linux (GNU ``cp`` with ``--reflink`` and ``/proc`` are available)."""
    return sys.platform.startswith("linux")


def scratch_dir() -> str:
    """Return the directory under which servers keep their files.

    ``$PGWARDEN_TEST_TMPDIR`` if set; else ``/dev/shm`` when it is a world-writable sticky
    directory with at least 1 GiB free (RAM is several times faster than a disk to copy
    a data directory into); else :func:`tempfile.gettempdir`.
    """
    configured = os.environ.get("PGWARDEN_TEST_TMPDIR")
    if configured:
        return configured
    shm = "/dev/shm"  # noqa: S108 (only ever used as mkdtemp's parent)
    try:
        st = os.stat(shm)
        vfs = os.statvfs(shm)
    except OSError:
        return tempfile.gettempdir()
    shared = st.st_mode & 0o1777 == 0o1777
    if shared and os.access(shm, os.W_OK | os.X_OK) and vfs.f_bavail * vfs.f_frsize >= 1 << 30:
        return shm
    return tempfile.gettempdir()
