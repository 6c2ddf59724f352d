"""A Django database's configuration as pgwarden `Settings` (no Django import here).

What the backend reads, and where each part goes:

``OPTIONS["pgwarden"]``
    a dict of pgwarden settings by name (``{"max_size": 5, "acquire_timeout": 2}``), plus
    the backend's own ``release_between_queries``. An unknown name raises `SettingsError`
    naming it and listing the known ones (never a value: a URL there may carry a
    password); a bad value is `Settings`' own error, which never prints a password
    either.
``OPTIONS["pool"]`` (Django's native pool)
    kept working when only ``ENGINE`` changes: ``min_size``, ``max_size``, ``timeout``
    (pgwarden's ``acquire_timeout``), ``max_lifetime`` and ``max_idle`` become the pgwarden
    settings of those names unless ``OPTIONS["pgwarden"]`` sets them; ``name``,
    ``num_workers``, ``reconnect_timeout`` and ``open`` are psycopg_pool's business and are
    ignored; anything else (``check``, ``configure``, ``reset``, ``kwargs``...) is refused,
    since pgwarden's pool would silently not do it.
Django's connection parameters (``get_connection_params()``)
    ``context`` (Django's adapters template), ``cursor_factory`` and ``prepare_threshold``
    are psycopg's keyword arguments: the first keys the handle, the second is set on each
    checked-out connection, the third is the pgwarden setting of that name (Django's
    default, None, turns server-side prepared statements off). ``application_name``,
    ``connect_timeout`` and the TCP keepalive parameters become the pgwarden settings of
    those names (pgwarden passes them to libpq itself). The rest (``dbname``, ``user``,
    ``password``, ``host``, ``port``, ``sslmode``...) is the libpq connection string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden.errors import SettingsError
from pgwarden.settings import Settings

__all__ = ["BackendOptions", "ConnectTarget", "parse_options", "split_params"]

#: The backend's own options (not pgwarden `Settings`), with their types.
BACKEND_OPTIONS: Mapping[str, type] = {"release_between_queries": bool}

_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))
_REFUSED = {
    "url": "the connection comes from NAME, USER, PASSWORD, HOST, PORT and OPTIONS",
}
# libpq parameters pgwarden passes itself (pgwarden._handle.config.connect_kwargs): given
# in OPTIONS, they become the setting of the same name.
_LIBPQ_OWNED = (
    "application_name",
    "connect_timeout",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
# Django's native pool options (OPTIONS["pool"]) that pgwarden's settings express.
_POOL_SETTINGS = {
    "min_size": "min_size",
    "max_size": "max_size",
    "timeout": "acquire_timeout",
    "max_lifetime": "max_lifetime",
    "max_idle": "max_idle",
}
_POOL_IGNORED = frozenset({"name", "num_workers", "reconnect_timeout", "open"})


@dataclass(frozen=True)
class BackendOptions:
    """``OPTIONS["pgwarden"]`` (and ``OPTIONS["pool"]``), validated."""

    #: pgwarden settings by name (values checked by `Settings` when the handle is made).
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Return the connection to the pool whenever no cursor is open outside atomic().
    release_between_queries: bool = False


@dataclass(frozen=True)
class ConnectTarget:
    """What one set of Django connection parameters resolves to."""

    settings: Settings
    #: Django's psycopg ``AdaptersMap`` template (the handle's connections start from it).
    adapters: Any
    #: Django's cursor class, set on each checked-out connection.
    cursor_factory: Any


def parse_options(pgwarden_options: object, pool_options: object = None) -> BackendOptions:
    """Validate ``OPTIONS["pgwarden"]`` (a dict or None) and fold ``OPTIONS["pool"]`` in."""
    if pgwarden_options is None:
        given: Mapping[str, Any] = {}
    elif isinstance(pgwarden_options, Mapping):
        given = pgwarden_options
    else:
        raise SettingsError(
            f'OPTIONS["pgwarden"] must be a dict of settings, not a '
            f"{type(pgwarden_options).__name__}"
        )
    settings: dict[str, Any] = {}
    release = False
    for name, value in given.items():
        if not isinstance(name, str):
            raise SettingsError(f'OPTIONS["pgwarden"] keys must be setting names, got {name!r}')
        if name in BACKEND_OPTIONS:
            if not isinstance(value, BACKEND_OPTIONS[name]):
                raise SettingsError(
                    f'OPTIONS["pgwarden"]["{name}"] must be a '
                    f"{BACKEND_OPTIONS[name].__name__}, not a {type(value).__name__}"
                )
            release = bool(value)
        elif name in _FIELDS and name not in _REFUSED:
            settings[name] = value
        else:
            why = f": {_REFUSED[name]}" if name in _REFUSED else ""
            known = ", ".join(sorted((_FIELDS - set(_REFUSED)) | set(BACKEND_OPTIONS)))
            raise SettingsError(
                f'unknown pgwarden setting OPTIONS["pgwarden"]["{name}"]{why} (known: {known})'
            )
    for name, value in _pool_settings(pool_options).items():
        settings.setdefault(name, value)
    return BackendOptions(settings=settings, release_between_queries=release)


def _pool_settings(pool_options: object) -> dict[str, Any]:
    if pool_options is None or pool_options is False or pool_options is True:
        return {}
    if not isinstance(pool_options, Mapping):
        raise SettingsError(
            f'OPTIONS["pool"] must be True or a dict, not a {type(pool_options).__name__}'
        )
    out: dict[str, Any] = {}
    for name, value in pool_options.items():
        if name in _POOL_SETTINGS:
            out[_POOL_SETTINGS[name]] = value
        elif name not in _POOL_IGNORED:
            raise SettingsError(
                f'OPTIONS["pool"]["{name}"] has no pgwarden equivalent: pgwarden\'s pool is '
                "the pool with pgwarden.django (it validates, configures and resets connections "
                'itself); remove it, or set pgwarden settings in OPTIONS["pgwarden"]'
            )
    return out


def split_params(conn_params: Mapping[str, Any], options: BackendOptions) -> ConnectTarget:
    """Django's ``get_connection_params()`` (without ``"pgwarden"``) as a `ConnectTarget`."""
    from psycopg.conninfo import make_conninfo

    settings = dict(options.settings)
    libpq: dict[str, Any] = {}
    adapters = cursor_factory = None
    for key, value in conn_params.items():
        if key == "context":
            adapters = value
        elif key == "cursor_factory":
            cursor_factory = value
        elif key == "prepare_threshold" and value is None:
            # Django's default: no server-side prepares (poolers), unless set either way.
            settings.setdefault(key, None)
        elif key == "prepare_threshold" or key in _LIBPQ_OWNED:
            _put(settings, key, value)
        elif key == "keepalives":
            if str(value).strip() not in ("1", "True", "true"):
                raise SettingsError(
                    "pgwarden.django always enables TCP keepalives; tune them with "
                    "keepalives_idle, keepalives_interval and keepalives_count"
                )
        elif key in ("autocommit", "row_factory"):
            raise SettingsError(
                f"pgwarden.django does not take OPTIONS[{key!r}]: Django sets it on every "
                "connection itself (use DATABASES AUTOCOMMIT)"
            )
        elif key == "password" and callable(value):
            # A token provider (RDS IAM, a rotating secret): asked for every new
            # connection by the handle, never frozen into the connection string.
            _put(settings, "credentials", value)
        elif key == "password":
            libpq.update({"password": value} if value else {})
        elif value is not None:
            libpq[key] = value
    url = make_conninfo("", **libpq)
    try:
        built = Settings.from_env(url=url, **settings)
    except TypeError as exc:  # a value of the wrong kind reached a comparison
        raise SettingsError(f'invalid OPTIONS["pgwarden"]: {exc}') from None
    return ConnectTarget(settings=built, adapters=adapters, cursor_factory=cursor_factory)


def _put(settings: dict[str, Any], name: str, value: Any) -> None:
    if name in settings and settings[name] != value:
        raise SettingsError(
            f"pgwarden setting {name} is given twice with different values "
            '(in OPTIONS and in OPTIONS["pgwarden"])'
        )
    settings[name] = value
