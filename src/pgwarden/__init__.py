"""pgwarden: one shared, self-healing PostgreSQL handle per process.

    import pgwarden
    db = pgwarden.connect_async()          # no I/O yet; DATABASE_URL by default
    rows = await db.fetch("SELECT * FROM po WHERE vendor = %s", [vendor])

Importing this package is cheap: psycopg and the pool load on first use of a
handle, and optional integrations load only from their own modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgwarden.errors import (
    AcquireTimeout,
    AmbiguousCommitError,
    DatabaseUnavailable,
    DatabaseUnusable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
    PgwardenError,
    SettingsError,
)
from pgwarden.settings import Settings

if TYPE_CHECKING:
    from pgwarden._async.database import AsyncDatabase
    from pgwarden._async.transaction import AsyncTransaction
    from pgwarden._registry import connect, connect_async
    from pgwarden._sync.database import Database
    from pgwarden._sync.transaction import Transaction
    from pgwarden.core.deadline import deadline
    from pgwarden.core.listen import Gap, Notification
    from pgwarden.core.rows import RowShapeError

__version__ = "0.1.0"

__all__ = [
    "AcquireTimeout",
    "AmbiguousCommitError",
    "AsyncDatabase",
    "AsyncTransaction",
    "Database",
    "DatabaseUnavailable",
    "DatabaseUnusable",
    "DeadlineExceeded",
    "Gap",
    "HandleClosed",
    "NotCommitted",
    "NotReady",
    "Notification",
    "OutcomeUnknown",
    "PgwardenError",
    "RowShapeError",
    "Settings",
    "SettingsError",
    "Transaction",
    "connect",
    "connect_async",
    "deadline",
]

# name -> module that defines it; loaded on first attribute access (PEP 562) so
# `import pgwarden` does not pay for psycopg until a handle is used.
_LAZY = {
    "AsyncDatabase": "pgwarden._async.database",
    "AsyncTransaction": "pgwarden._async.transaction",
    "Database": "pgwarden._sync.database",
    "Transaction": "pgwarden._sync.transaction",
    "connect": "pgwarden._registry",
    "connect_async": "pgwarden._registry",
    "deadline": "pgwarden.core.deadline",
    "Gap": "pgwarden.core.listen",
    "Notification": "pgwarden.core.listen",
    "RowShapeError": "pgwarden.core.rows",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pgwarden' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
