"""What PostgresServer and PgBouncerServer share: a scratch directory, an idempotent
close that also works after fork, the context manager, and the log tail."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from . import _lifecycle
from ._binaries import scratch_dir

__all__ = ["ScratchServer"]

_S = TypeVar("_S", bound="ScratchServer")


class ScratchServer:
    """Base of a throwaway server process living in its own scratch directory.

    Subclasses set ``_run_as`` and implement ``start()``, ``stop()`` and
    ``_stop_for_close()``; they point ``log_path`` at their log file.
    """

    _proc: subprocess.Popen[bytes] | None
    _run_as: Any

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._root: Path | None = None
        self._root_key: str | None = None
        self._closed = False
        self._owner_pid = os.getpid()  # a forked child must not stop our processes

    @property
    def base_dir(self) -> Path:
        """The scratch directory (config, data, socket, log); exists after start()."""
        if self._root is None:
            raise RuntimeError(f"{type(self).__name__} has not been started yet")
        return self._root

    @property
    def pid(self) -> int | None:
        """PID of the server process while it runs, else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def start(self: _S, timeout: float = 30) -> _S:
        raise NotImplementedError

    def _stop_for_close(self) -> None:
        """Stop the process on close(); escalation is the caller's fallback."""
        raise NotImplementedError

    def _reap(self, *, kill: bool) -> None:
        raise NotImplementedError

    def _make_root(self, prefix: str) -> Path:
        """Create the scratch directory, registered for cleanup even after a crash."""
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_dir()))
        self._root = root
        self._root_key = _lifecycle.new_key()
        _lifecycle.register(self)
        _lifecycle.watch_path(self._root_key, root)
        if self._run_as is not None:
            self._run_as.chown(root)
        return root

    def close(self) -> None:
        """Stop the process and remove its files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._owner_pid:
                # Inherited through fork: the process is the parent's child, not ours, to
                # stop and wait for (marking it finished also silences Popen.__del__).
                if self._proc is not None:
                    self._proc.returncode = 0
                return
            try:
                self._stop_for_close()
            except Exception:
                self._reap(kill=True)
            finally:
                if self._root is not None:
                    shutil.rmtree(self._root, ignore_errors=True)
                if self._root_key is not None:
                    _lifecycle.forget(self._root_key)
                _lifecycle.unregister(self)

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the log ("" if there is none yet)."""
        if self._root is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 512 * 1024))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:]) if n > 0 else ""

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
