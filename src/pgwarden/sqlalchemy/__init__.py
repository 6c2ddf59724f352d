"""SQLAlchemy on pgwarden: the ``postgresql+pgwarden://`` dialect and run_transaction.

    from sqlalchemy import create_engine
    engine = create_engine("postgresql+pgwarden://app:secret@db/app")   # the one-line switch

    from pgwarden.sqlalchemy import run_transaction
    order_id = run_transaction(Session, lambda session: place_order(session, cart))

Importing ``pgwarden`` does not import SQLAlchemy; importing this package does.
See docs/sqlalchemy.md.
"""

from __future__ import annotations

from pgwarden.sqlalchemy.dialect import (
    PGDialect_pgwarden,
    PGDialectAsync_pgwarden,
    PgwardenPool,
    handle_of,
)
from pgwarden.sqlalchemy.engine import create_async_engine, create_engine
from pgwarden.sqlalchemy.transaction import run_transaction, run_transaction_async

__all__ = [
    "PGDialectAsync_pgwarden",
    "PGDialect_pgwarden",
    "PgwardenPool",
    "create_async_engine",
    "create_engine",
    "handle_of",
    "run_transaction",
    "run_transaction_async",
]
