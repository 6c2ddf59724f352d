# WARNING: generated from src/pgwarden/_async/connection.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""The connection class of every pgwarden connection, pooled or direct.

Kept apart from `pgwarden._sync.pool` so that a handle whose first query runs on
the warmup's own connection (no pool built yet: see `Connections.solo`) never
imports psycopg_pool: its import is a third of what a cold start's first query
would otherwise import beyond psycopg.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from psycopg import Connection, OperationalError
from psycopg.rows import DictRow

from pgwarden._handle.config import CREDENTIALS_KEY, credential_params

__all__ = ["CredentialsFailed", "PgwConnection"]


def _resolve_credentials(source: Any) -> dict[str, Any]:
    """Call a credentials callable; a failure is a connect failure that shows no value."""
    try:
        value = source()
        if inspect.isawaitable(value):
            close = getattr(value, "close", None)
            if close is not None:
                close()  # a coroutine never awaited: no "never awaited" warning
            raise CredentialsFailed(
                "pgwarden: the credentials callable returned an awaitable, which the "
                "sync handle cannot await; pass a sync callable (or use connect_async)"
            )
        return credential_params(value)
    except CredentialsFailed:
        raise
    except Exception as exc:
        # Its type only, and not chained: a callable's error text may hold the secret.
        raise CredentialsFailed(
            f"pgwarden: the credentials callable failed ({type(exc).__name__})"
        ) from None


class CredentialsFailed(OperationalError):
    """The credentials callable raised or returned something unusable: the attempt
    failed before reaching the server, like any connect failure (retried on backoff)."""


class PgwConnection(Connection[DictRow]):
    """A psycopg connection that remembers when pgwarden last used it."""

    last_used: float = 0.0
    poller: Any = None  # see pgwarden._handle.net.has_pending_input
    _pgwarden_owned: ClassVar[bool] = True  # psycopg_pool's records about it are events

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> PgwConnection:
        """psycopg's connect, after calling the handle's credentials callable, if any
        (`Settings.credentials`, passed as ``CREDENTIALS_KEY``): every new connection,
        pooled or direct, asks it again, so a rotated secret is used at once and
        nothing keeps one that was rejected."""
        source = kwargs.pop(CREDENTIALS_KEY, None)
        if source is not None:
            kwargs.update(_resolve_credentials(source))
        conn = super().connect(conninfo, **kwargs)
        return conn
