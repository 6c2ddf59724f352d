"""`FrontServer`: what a pooler in front of a `PostgresServer` shares with every other
(PgBouncer, pgpool-II): its address, the login it forwards, its URLs, its process."""

from __future__ import annotations

import subprocess
from urllib.parse import quote

from ._scratch import ScratchServer
from .postgres import PostgresServer

__all__ = ["FrontServer"]


class FrontServer(ScratchServer):
    """A process listening on ``127.0.0.1:port`` that logs clients in to `postgres` as
    its superuser. Subclasses set ``postgres``, ``_port`` and ``_proc``."""

    host = "127.0.0.1"
    postgres: PostgresServer
    _port: int
    _proc: subprocess.Popen[bytes] | None

    @property
    def port(self) -> int:
        """TCP port on :attr:`host` (kept across restarts)."""
        return self._port

    @property
    def user(self) -> str:
        """The login user (the server's superuser)."""
        return self.postgres.user

    @property
    def password(self) -> str:
        """The login password (the same as the server's)."""
        return self.postgres.password

    @property
    def dbname(self) -> str:
        """The default database name."""
        return self.postgres.dbname

    @property
    def url(self) -> str:
        """``postgresql://postgres:<password>@127.0.0.1:<port>/postgres``."""
        return self.url_for()

    def url_for(self, dbname: str | None = None) -> str:
        """Return a URL for ``dbname`` (default ``postgres``) through this front."""
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        db = quote(dbname or self.dbname, safe="")
        return f"postgresql://{auth}@{self.host}:{self._port}/{db}"

    def is_running(self) -> bool:
        """True while its main process is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None
