"""Connection parameters of ``postgresql+pgwarden://`` split three ways (no SQLAlchemy here).

What SQLAlchemy hands the dialect's ``connect()`` (the URL's parts and query, merged
with ``connect_args``) holds three kinds of names:

``pgwarden_<setting>``
    a pgwarden setting (``pgwarden_max_size=5``, ``pgwarden_default_timeout=none``).
    From the URL the value is text, parsed by the setting's type; from
    ``connect_args`` it may also be the value itself (``{"pgwarden_max_size": 5}``).
    An unknown name raises `SettingsError` naming it (never a value of the URL).
libpq parameters that pgwarden sets itself
    ``application_name``, ``connect_timeout``, ``keepalives_idle``,
    ``keepalives_interval``, ``keepalives_count`` and ``tcp_user_timeout`` become the
    pgwarden setting of the same name (pgwarden's value would otherwise win in silence).
psycopg keyword arguments
    ``context`` (the adapters map), ``cursor_factory`` and ``prepare_threshold`` (the
    pgwarden setting); ``autocommit`` and ``row_factory`` are refused: SQLAlchemy needs
    its own.

Everything else is a libpq parameter, joined into the conninfo string the handle
connects with (libpq rejects an unknown one by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pgwarden.errors import SettingsError
from pgwarden.settings import Settings

__all__ = ["PREFIX", "ConnectParams", "parse_setting", "split_connect_params"]

#: URL query parameters and ``connect_args`` keys that are pgwarden settings.
PREFIX = "pgwarden_"

# libpq parameters pgwarden passes itself (pgwarden._handle.config.connect_kwargs):
# given by the user, they become the setting, with the setting's type.
_LIBPQ_OWNED = (
    "application_name",
    "connect_timeout",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_REFUSED = {
    "autocommit": "SQLAlchemy begins transactions implicitly, so its connections are never "
    "in autocommit (use the AUTOCOMMIT isolation level instead)",
    "row_factory": "SQLAlchemy needs tuple rows",
    "async_fallback": "postgresql+pgwarden is real asyncio only (create_async_engine)",
    "url": "the engine's URL is the connection URL",
}
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}


@dataclasses.dataclass
class ConnectParams:
    """What one ``connect()`` call's parameters mean to pgwarden."""

    #: libpq parameters (host, port, user, password, dbname, sslmode, ...).
    libpq: dict[str, Any]
    #: pgwarden settings, typed.
    settings: dict[str, Any]
    #: psycopg ``context`` (an AdaptersMap) when the caller passed one.
    context: Any = None
    #: psycopg ``cursor_factory`` when the caller passed one.
    cursor_factory: Any = None


def split_connect_params(params: Mapping[str, Any]) -> ConnectParams:
    """Split the keyword arguments SQLAlchemy passes to ``connect()``."""
    out = ConnectParams(libpq={}, settings={})
    for key, value in params.items():
        if key.startswith(PREFIX):
            name = key[len(PREFIX) :]
            _put(out.settings, name, parse_setting(name, value))
        elif key in _REFUSED:
            raise SettingsError(f"postgresql+pgwarden does not take {key!r}: {_REFUSED[key]}")
        elif key in _LIBPQ_OWNED or key == "prepare_threshold":
            _put(out.settings, key, parse_setting(key, value))
        elif key == "keepalives":
            if str(value).strip() not in ("1", "True", "true"):
                raise SettingsError(
                    "postgresql+pgwarden always enables TCP keepalives; tune them with "
                    "keepalives_idle, keepalives_interval and keepalives_count"
                )
        elif key == "context":
            out.context = value
        elif key == "cursor_factory":
            out.cursor_factory = value
        elif value is not None:
            out.libpq[key] = value
    return out


def _put(settings: dict[str, Any], name: str, value: Any) -> None:
    if name in settings and settings[name] != value:
        raise SettingsError(
            f"pgwarden setting {name} is given twice with different values "
            f"(as {name} and {PREFIX}{name})"
        )
    settings[name] = value


def parse_setting(name: str, value: Any) -> Any:
    """*value* (text from a URL, or a value from ``connect_args``) for setting *name*.

    Raises `SettingsError` for an unknown name (listing the known ones) or a value
    its type cannot take. Range checks are `Settings`' own, when the handle is built.
    """
    field = _FIELDS.get(name)
    if field is None or name in _REFUSED:
        known = ", ".join(PREFIX + n for n in sorted(_FIELDS) if n not in _REFUSED)
        raise SettingsError(f"unknown pgwarden setting {PREFIX}{name} (known: {known})")
    if isinstance(value, (tuple, list)):
        raise SettingsError(f"pgwarden setting {PREFIX}{name} is given more than once")
    kind = str(field.type)
    if not isinstance(value, str):
        return value  # a typed value from connect_args; Settings validates it
    text = value.strip()
    try:
        if "None" in kind and text.lower() in _NONE:
            return None
        if kind.startswith("bool"):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError as exc:
        raise SettingsError(f"invalid pgwarden setting {PREFIX}{name}={value!r}: {exc}") from None
    return value
