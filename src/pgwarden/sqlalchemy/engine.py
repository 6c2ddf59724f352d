"""``create_engine()`` / ``create_async_engine()``: SQLAlchemy's, on ``postgresql+pgwarden``.

Optional: ``sqlalchemy.create_engine("postgresql+pgwarden://...")`` is the same thing.
These also take a plain ``postgresql://`` (or ``postgres://``, ``postgresql+psycopg://``)
URL, as found in ``DATABASE_URL``, and pgwarden settings as a mapping::

    engine = pgwarden.sqlalchemy.create_engine(os.environ["DATABASE_URL"],
                                               pgwarden={"max_size": 5})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy.engine import make_url

from pgwarden.sqlalchemy._params import PREFIX, parse_setting

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["create_async_engine", "create_engine"]

DRIVERNAME = "postgresql+pgwarden"
_POSTGRES_DRIVERS = frozenset(
    {"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg_async", DRIVERNAME}
)


def create_engine(
    url: str | URL | None = None, *, pgwarden: Mapping[str, Any] | None = None, **kwargs: Any
) -> Engine:
    """``sqlalchemy.create_engine`` on pgwarden's shared handle.

    *url*: any PostgreSQL URL (its driver becomes ``pgwarden``); None: the handle's
    ``DATABASE_URL``. *pgwarden*: settings by name (``{"max_size": 5}``), like the
    URL's ``pgwarden_*`` parameters. Everything else goes to SQLAlchemy.
    """
    return sqlalchemy.create_engine(_url(url), **_with_settings(pgwarden, kwargs))


def create_async_engine(
    url: str | URL | None = None, *, pgwarden: Mapping[str, Any] | None = None, **kwargs: Any
) -> AsyncEngine:
    """``sqlalchemy.ext.asyncio.create_async_engine`` on pgwarden; see `create_engine`."""
    # Imported here: sqlalchemy.ext.asyncio brings the ORM (about 0.1 s of a cold start).
    from sqlalchemy.ext.asyncio import create_async_engine as create

    return create(_url(url), **_with_settings(pgwarden, kwargs))


def _url(url: str | URL | None) -> URL:
    if url is None:
        return make_url(f"{DRIVERNAME}://")
    # postgres:// (Heroku and friends) is not a name SQLAlchemy knows.
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername not in _POSTGRES_DRIVERS:
        raise ValueError(
            f"not a PostgreSQL URL for pgwarden: driver {parsed.drivername!r} "
            f"(expected one of {sorted(_POSTGRES_DRIVERS)})"
        )
    return parsed.set(drivername=DRIVERNAME)


def _with_settings(settings: Mapping[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not settings:
        return kwargs
    connect_args = dict(kwargs.get("connect_args") or {})
    for name, value in settings.items():
        connect_args[PREFIX + name] = parse_setting(name, value)
    return {**kwargs, "connect_args": connect_args}
