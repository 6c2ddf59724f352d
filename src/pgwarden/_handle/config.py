"""Settings turned into psycopg and psycopg_pool arguments, and the secrets to mask."""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Mapping
from types import CodeType
from typing import Any

from pgwarden._redact import mask_secret
from pgwarden.core.prepared import connection_prepare_threshold
from pgwarden.settings import Settings

__all__ = [
    "CREDENTIALS_KEY",
    "LIBPQ_MIN_CONNECT_TIMEOUT",
    "CallSite",
    "call_site_ref",
    "connect_kwargs",
    "credential_params",
    "libpq_connect_timeout",
    "local_port",
    "looks_like_pgbouncer",
    "looks_relayed",
    "password_of",
    "pool_kwargs",
    "prepare_threshold_for",
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
    if settings.credentials is not None:
        # Not a libpq parameter: PgwConnection.connect takes it out and calls it, for
        # the pool's connects and the direct ones alike.
        extra[CREDENTIALS_KEY] = settings.credentials
    return {
        **extra,
        "autocommit": True,
        "row_factory": dict_row,
        "prepare_threshold": prepare_threshold_for(settings, pgbouncer=pgbouncer),
        "connect_timeout": libpq_connect_timeout(settings.connect_timeout),
        "keepalives": 1,
        "keepalives_idle": settings.keepalives_idle,
        "keepalives_interval": settings.keepalives_interval,
        "keepalives_count": settings.keepalives_count,
        "tcp_user_timeout": settings.tcp_user_timeout,
        "application_name": settings.application_name,
    }


#: The `connect_kwargs` key carrying `Settings.credentials` to `PgwConnection.connect`.
CREDENTIALS_KEY = "pgwarden_credentials"


def credential_params(value: object) -> dict[str, Any]:
    """What a credentials callable returned, as connection parameters: a string is the
    password, a mapping its parameters. Each secret in it is registered for masking
    (`pgwarden._redact.mask_secret`) before any error can echo it."""
    if isinstance(value, str):
        params: dict[str, Any] = {"password": value}
    elif isinstance(value, Mapping):
        params = {str(key): val for key, val in value.items()}
    else:
        # The type only: the value may be a secret in a form we did not expect.
        raise TypeError(
            "pgwarden: the credentials callable must return a password (str) or a mapping of "
            f"connection parameters, not {type(value).__name__}"
        )
    password = params.get("password")
    if password:
        mask_secret(str(password))
    return params


def prepare_threshold_for(settings: Settings, *, pgbouncer: bool) -> int | None:
    """psycopg's ``prepare_threshold`` for a connection: the setting, or None (no
    server-side prepares) behind PgBouncer unless ``pooler_prepared_statements``."""
    return connection_prepare_threshold(
        settings.prepare_threshold,
        pgbouncer=pgbouncer,
        opted_in=settings.pooler_prepared_statements,
    )


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
#: Where a call site is not looked for: pgwarden itself, and the libraries an
#: integration lends connections through (`skip_call_sites_under`).
_SKIPPED_DIRS: tuple[str, ...] = (_PACKAGE_DIR + os.sep,)
_SKIPPED_LOCK = threading.Lock()


def skip_call_sites_under(module_file: str, *, generated: str | None = None) -> None:
    """Report call sites from outside the package that holds *module_file* too (a
    library's ``__file__``): an integration calls this at import for the library it
    lends connections through (SQLAlchemy's pool checks out, not the user's code).
    *generated*: the pseudo file name prefix of code the library generates at run time
    (SQLAlchemy's ``<sqlalchemy generated ...>`` wrappers). Idempotent. Writers take
    `_SKIPPED_LOCK` (two integrations may be imported by two threads at once); the
    tuple is replaced whole, so readers need no lock."""
    global _SKIPPED_DIRS
    prefixes = [os.path.dirname(os.path.abspath(module_file)) + os.sep]
    if generated:
        prefixes.append(generated)
    with _SKIPPED_LOCK:
        _SKIPPED_DIRS = (*_SKIPPED_DIRS, *(p for p in prefixes if p not in _SKIPPED_DIRS))


#: Where `call_site_ref` last found the caller, by the code of the function that asked
#: (one entry per pgwarden function that takes a connection): tried first, with two
#: probes, since checkouts from one place come up the same path. A hint only, always
#: checked, so a stale one (another thread's, another path's) costs a search, never a
#: site inside a skipped library; one dict item set whole, so it needs no lock.
_depth_hints: dict[CodeType, int] = {}


def call_site_ref() -> CallSite:
    """Where the first caller outside pgwarden, contextlib and the skipped libraries
    is, formatted as ``file:line in function`` only when read (``str()``): the hot path
    keeps the caller's code object and instruction offset, not the frame (which would
    keep the caller's locals alive) nor a string nobody reads unless a leak is reported.

    Each `sys._getframe` makes one frame object, and making one per level was ~0.3 us
    a level on Python 3.11; behind SQLAlchemy the user's frame is ~20 levels down. So
    the depth found last time for the same asker is tried first, and otherwise the
    stack is searched by galloping (depths 1, 2, 4, ...) to a frame outside, then
    bisecting back to the boundary. The skipped frames are taken to be the top of the
    stack: when a library calls back into user code that then takes a connection, the
    site found is a user frame, but maybe not the innermost one."""
    asker = sys._getframe(1).f_code
    hint = _depth_hints.get(asker, 0)
    if hint > 1 and _skipped_at(hint - 1) and _skipped_at(hint) is False:
        depth = hint
    else:
        # Depths as sys._getframe counts them here: 0 is this function, inside pgwarden.
        inside, depth = 0, 1
        while _skipped_at(depth):
            inside, depth = depth, depth * 2
        # The first depth outside (or past the bottom) lies in (inside, depth].
        while depth - inside > 1:
            middle = (inside + depth) // 2
            if _skipped_at(middle):
                inside = middle
            else:
                depth = middle
    try:
        frame = sys._getframe(depth)
    except ValueError:  # past the bottom of the stack: only skipped frames
        return CallSite(None, 0)
    _depth_hints[asker] = depth
    return CallSite(frame.f_code, frame.f_lasti)


def _skipped_at(depth: int) -> bool | None:
    """Is the frame at *depth* of `call_site_ref` skipped? None past the bottom."""
    try:
        frame = sys._getframe(depth + 1)  # +1: this function
    except ValueError:
        return None
    filename = frame.f_code.co_filename
    return filename.startswith(_SKIPPED_DIRS) or "contextlib" in filename


class CallSite:
    """A caller's code object and instruction offset; ``str()`` gives
    ``file:line in function`` (``<unknown>`` when no caller was found)."""

    __slots__ = ("code", "offset")

    def __init__(self, code: CodeType | None, offset: int) -> None:
        self.code = code
        self.offset = offset

    def __str__(self) -> str:
        code = self.code
        if code is None:
            return "<unknown>"
        line = code.co_firstlineno  # if the offset maps to no line (it always should)
        for start, end, lineno in code.co_lines():
            if start <= self.offset < end:
                if lineno is not None:
                    line = lineno
                break
        return f"{code.co_filename}:{line} in {code.co_name}"


def looks_like_pgbouncer(server_pid: object, key_pid: int) -> bool:
    """True when a pooler sits between us and PostgreSQL.

    The client learns a backend pid from BackendKeyData at startup. PostgreSQL
    sends its own pid; PgBouncer sends a made-up key of its own, so it differs
    from what ``pg_backend_pid()`` returns on the server that runs the query.
    """
    return server_pid is not None and server_pid != key_pid


def looks_relayed(server_seen_port: object, local_port: int | None) -> bool:
    """True when the server saw the connection come from another port than the one
    this end connected from (``inet_client_port()`` against *local_port*): something
    relays it. pgpool-II does (its child opens its own connection to the server, and
    forwards the server's backend key, so `looks_like_pgbouncer` cannot tell); so do
    plain TCP proxies and NAT, which is why this only decides whether to ask
    pgpool-II's ``SHOW pool_version``. Over a Unix socket both sides see no port.
    """
    return server_seen_port != local_port


def local_port(fd: int) -> int | None:
    """The local TCP port of the connected socket *fd*; None for a Unix socket or if
    the socket cannot be read (the caller then asks as if relayed)."""
    import socket

    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[1], int):
        return address[1]
    return None
