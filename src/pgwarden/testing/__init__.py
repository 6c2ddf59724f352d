"""Real servers and real network faults for tests: pgwarden's own, and yours.

* :class:`PostgresServer`: a throwaway PostgreSQL cluster on a free loopback port, with
  restart (fast or crash-like), backend termination and ``ALTER SYSTEM`` helpers;
* :class:`PgBouncerServer`: a real PgBouncer in front of one;
* :class:`PgpoolServer`: a real pgpool-II in front of one;
* :class:`StandbyPair`: a primary with a synchronous streaming standby, promotion, and a
  demoted primary that comes back as a standby (real failover);
* :class:`FaultProxy`: a TCP proxy that adds latency, blackholes, resets, refuses, drops
  connections, or cuts one at a chosen message (such as ``COMMIT``);
* a pytest plugin (:mod:`pgwarden.testing.plugin`, loaded automatically) with fixtures
  for all of them.

Everything started is stopped, and every file removed, on ``close()``, at exit, on
SIGTERM, and (by a watchdog process) even when Python is killed. See ``docs/testing.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._binaries import find_pgbouncer, find_postgres_bindir
    from ._errors import ServerStartError, ServerUnavailable
    from .pgbouncer import PgBouncerServer
    from .pgpool import PgpoolServer, find_pgpool
    from .postgres import DEFAULT_SETTINGS, PostgresServer, StopMode
    from .proxy import FaultProxy
    from .replication import Failover, StandbyPair

__all__ = [
    "DEFAULT_SETTINGS",
    "Failover",
    "FaultProxy",
    "PgBouncerServer",
    "PgpoolServer",
    "PostgresServer",
    "ServerStartError",
    "ServerUnavailable",
    "StandbyPair",
    "StopMode",
    "find_pgbouncer",
    "find_pgpool",
    "find_postgres_bindir",
]

# Imported on first use, so that loading the pytest plugin (which pytest does in every
# session once pgwarden is installed) does not import psycopg or asyncio.
_WHERE = {
    "DEFAULT_SETTINGS": ".postgres",
    "Failover": ".replication",
    "FaultProxy": ".proxy",
    "PgBouncerServer": ".pgbouncer",
    "PgpoolServer": ".pgpool",
    "PostgresServer": ".postgres",
    "ServerStartError": "._errors",
    "ServerUnavailable": "._errors",
    "StandbyPair": ".replication",
    "StopMode": ".postgres",
    "find_pgbouncer": "._binaries",
    "find_pgpool": ".pgpool",
    "find_postgres_bindir": "._binaries",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
