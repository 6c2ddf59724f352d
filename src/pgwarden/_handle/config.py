"""Settings turned into psycopg and psycopg_pool arguments, and the secrets to mask."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from pgwarden.settings import Settings

__all__ = [
    "LIBPQ_MIN_CONNECT_TIMEOUT",
    "call_site",
    "connect_kwargs",
    "libpq_connect_timeout",
    "looks_like_pgbouncer",
    "password_of",
    "pool_kwargs",
]

#: libpq (and psycopg, which enforces it itself) treat a connect_timeout below
#: 2 s as 2 s, and only whole seconds exist.
LIBPQ_MIN_CONNECT_TIMEOUT = 2

# psycopg_pool gives up a connection slot after failing to reconnect for this
# long. pgwarden's breaker already keeps the pool off a server that is down
# (a refused attempt costs nothing), so the pool keeps trying for as long as
# any outage lasts and capacity comes back without waiting for new demand.
POOL_RECONNECT_TIMEOUT = 24 * 3600.0


def libpq_connect_timeout(seconds: float) -> int:
    """The one rounding rule for libpq's ``connect_timeout``: whole seconds,
    rounded up, at least :data:`LIBPQ_MIN_CONNECT_TIMEOUT`. pgwarden bounds
    every connect on behalf of a call more tightly itself; this is a backstop."""
    return max(LIBPQ_MIN_CONNECT_TIMEOUT, math.ceil(seconds))


def connect_kwargs(settings: Settings, *, pgbouncer: bool, adapters: Any = None) -> dict[str, Any]:
    """Keyword arguments for every new psycopg connection of a handle. *adapters*:
    a consumer's ``psycopg.adapt.AdaptersMap`` (an ORM's loaders and dumpers),
    the ``context`` every connection of the handle starts from."""
    from psycopg.rows import dict_row

    extra: dict[str, Any] = {} if adapters is None else {"context": adapters}
    return {
        **extra,
        "autocommit": True,
        "row_factory": dict_row,
        "prepare_threshold": None if pgbouncer else settings.prepare_threshold,
        "connect_timeout": libpq_connect_timeout(settings.connect_timeout),
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle,
        "keepalives_interval": settings.keepalives_interval,
        "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": settings.tcp_user_timeout,
        "application_name": settings.application_name,
    }


def pool_kwargs(settings: Settings, *, max_size: int, max_lifetime: float) -> dict[str, Any]:
    """Keyword arguments for the psycopg_pool pool (besides conninfo and kwargs)."""
    return {
        "min_size": min(settings.min_size, max_size),
        "max_size": max_size,
        "timeout": settings.acquire_timeout,
        "max_lifetime": max_lifetime,
        "max_idle": settings.max_idle,
        "reconnect_timeout": POOL_RECONNECT_TIMEOUT,
        "name": f"pgwarden-{os.getpid()}",
    }


def password_of(url: str | None) -> str | None:
    """The password in a libpq URL or ``key=value`` string, to mask wherever text
    might echo it; None when there is none or the string does not parse."""
    if not url:
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict

        value = conninfo_to_dict(url).get("password")
    except Exception:  # an unparsable URL fails later with a clear message
        return None
    return str(value) if value else None


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_site() -> str:
    """``file:line in function`` of the first caller outside pgwarden and contextlib."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and "contextlib" not in filename:
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


def looks_like_pgbouncer(server_pid: object, key_pid: int) -> bool:
    """True when a pooler sits between us and PostgreSQL.

    The client learns a backend pid from BackendKeyData at startup. PostgreSQL
    sends its own pid; PgBouncer sends a made-up key of its own, so it differs
    from what ``pg_backend_pid()`` returns on the server that runs the query.
    """
    return server_pid is not None and server_pid != key_pid
