"""Making sure nothing the harness starts outlives the Python process.

Three layers, from gentlest to bluntest:

1. every live server and proxy is in a registry that an ``atexit`` hook closes;
2. SIGTERM and SIGHUP, when their handler is still the default one, first close the registry
   and then die of the same signal as before;
3. a watchdog process (one per Python process) holds the read end of a pipe. When this
   process dies in any way, even by SIGKILL, the pipe closes and the watchdog stops every
   server process it was told about and removes every directory it was told about.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import IO, Protocol, TypeVar

__all__ = [
    "forget",
    "new_key",
    "poll_until",
    "register",
    "unregister",
    "watch_path",
    "watch_process",
]

_T = TypeVar("_T")


def poll_until(deadline: float, attempt: Callable[[], _T | None]) -> _T | None:
    """Call ``attempt`` until it returns non-None or ``deadline`` (monotonic) passes.

    Sleeps between attempts start at 5 ms and grow to 100 ms: readiness is noticed fast,
    and a slow machine is not hammered. Returns the result, or None on timeout.
    """
    delay = 0.005
    while True:
        result = attempt()
        if result is not None:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.5, 0.1)


class _Closeable(Protocol):
    def close(self) -> None: ...


_lock = threading.RLock()
_live: dict[int, _Closeable] = {}
_owner_pid = os.getpid()
_atexit_installed = False
_signals_installed = False
_keys = itertools.count(1)


def new_key() -> str:
    """Return a fresh key naming one watched process or directory."""
    return f"{os.getpid()}-{next(_keys)}"


def _ensure_atexit() -> None:
    global _atexit_installed
    with _lock:
        if not _atexit_installed:
            atexit.register(_at_exit)
            _atexit_installed = True


def register(obj: _Closeable) -> None:
    """Close ``obj`` at interpreter exit or on SIGTERM/SIGHUP unless unregistered first."""
    _ensure_atexit()
    with _lock:
        _install_signal_handlers()
        _live[id(obj)] = obj


def unregister(obj: _Closeable) -> None:
    """Forget ``obj`` (call this from its ``close()``)."""
    with _lock:
        _live.pop(id(obj), None)


def close_all() -> None:
    """Close every registered object, newest first (proxies and poolers before servers)."""
    if os.getpid() != _owner_pid:
        return
    with _lock:
        objs = list(_live.values())
    for obj in reversed(objs):
        with contextlib.suppress(Exception):
            obj.close()


def _at_exit() -> None:
    close_all()
    _watchdog.shutdown()


def _install_signal_handlers() -> None:
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    close_all()
    _watchdog.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# The watchdog reads commands from stdin, one per line, tab-separated:
#   P <key> <pid> <signal>   stop this process (with <signal>, then SIGKILL) if we die
#   D <key> <path>           remove this directory tree if we die
#   F <key>                  forget <key>
# At end of input it does what it was told; a clean shutdown forgets everything first.
_WATCHDOG_SOURCE = r"""
import os, shutil, signal, sys, time
for name in ("SIGINT", "SIGHUP", "SIGPIPE"):
    try:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    except (AttributeError, OSError, ValueError):
        pass

def stat(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0], fields[19]

def alive(pid, started):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = stat(pid)
    if now is None:
        return started is None
    return now[0] != b"Z" and (started is None or now[1] == started)

procs, paths = {}, {}
for raw in sys.stdin.buffer:
    parts = raw.rstrip(b"\n").decode("utf-8", "surrogateescape").split("\t")
    try:
        if parts[0] == "P":
            pid = int(parts[2])
            st = stat(pid)
            procs[parts[1]] = (pid, int(parts[3]), None if st is None else st[1])
        elif parts[0] == "D":
            paths[parts[1]] = parts[2]
        elif parts[0] == "F":
            procs.pop(parts[1], None)
            paths.pop(parts[1], None)
    except (IndexError, ValueError):
        pass

pending = []
for pid, sig, started in procs.values():
    if alive(pid, started):
        try:
            os.kill(pid, sig)
            pending.append((pid, started))
        except OSError:
            pass
deadline = time.monotonic() + 10
while pending and time.monotonic() < deadline:
    pending = [p for p in pending if alive(*p)]
    time.sleep(0.05)
for pid, started in pending:
    if alive(pid, started):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
time.sleep(0.2 if pending else 0)
for path in paths.values():
    shutil.rmtree(path, ignore_errors=True)
"""


class _Watchdog:
    """The per-process watchdog (started lazily, on the first thing it must watch)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed = False

    def send(self, *fields: str) -> None:
        line = "\t".join(fields).encode("utf-8", "surrogateescape") + b"\n"
        with self._lock:
            stdin = self._ensure()
            if stdin is None:
                return
            try:
                stdin.write(line)
                stdin.flush()
            except OSError:
                self._failed = True

    def _ensure(self) -> IO[bytes] | None:
        if self._failed or os.getpid() != _owner_pid:
            return None
        if self._proc is None:
            _ensure_atexit()  # so that the watchdog is always waited for at exit
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _WATCHDOG_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd="/",
                )
            except OSError:
                self._failed = True
                return None
        return self._proc.stdin

    def shutdown(self) -> None:
        """Let the watchdog exit (after a clean close it has nothing left to do)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or os.getpid() != _owner_pid:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def after_fork_in_child(self) -> None:
        # The child must not keep the parent's watchdog alive, nor use it.
        proc, self._proc = self._proc, None
        self._lock = threading.Lock()
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()
            # Not this process's child: nothing to wait for, and no ResourceWarning.
            proc.returncode = 0
            _forked_away.append(proc)


_watchdog = _Watchdog()
_forked_away: list[subprocess.Popen[bytes]] = []


def _after_fork_in_child() -> None:
    # The parent's servers are the parent's to close; the child starts afresh, with its
    # own registry and (if it starts servers) its own watchdog.
    global _lock, _owner_pid
    _lock = threading.RLock()
    _live.clear()
    _watchdog.after_fork_in_child()
    _owner_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def watch_process(key: str, pid: int, sig: int) -> None:
    """If this process dies, send ``sig`` to ``pid`` (then SIGKILL after 10 s)."""
    _watchdog.send("P", key, str(pid), str(int(sig)))


def watch_path(key: str, path: str | os.PathLike[str]) -> None:
    """If this process dies, remove the directory tree ``path``."""
    _watchdog.send("D", key, os.fspath(path))


def forget(key: str) -> None:
    """Stop watching what ``key`` names (after it was cleaned up normally)."""
    _watchdog.send("F", key)
