"""The embedded default that subcommands fall back to when no URL is given."""

from __future__ import annotations

from collections.abc import Callable

from pgwarden._redact import redact
from pgwarden.cli._common import err

__all__ = ["banner", "with_embedded"]


def banner(prog: str, doing: str) -> str:
    """The first line a command prints when it falls back to the embedded server:
    ``pgwarden check: no URL given (nor PGWARDEN_URL or DATABASE_URL): checking a
    throwaway embedded PostgreSQL, removed afterwards``."""
    return (
        f"{prog}: no URL given (nor PGWARDEN_URL or DATABASE_URL): {doing} a throwaway "
        f"embedded PostgreSQL, removed afterwards"
    )


def with_embedded(prog: str, body: Callable[[str, str], int], *, doing: str = "using") -> int:
    """Say so on the first line (stderr, see :func:`banner`), start a throwaway PostgreSQL,
    return ``body(url, description)``, and always remove the server afterwards. Exit code 2,
    with a one-line reason, if it cannot start."""
    err(banner(prog, doing))
    try:
        from pgwarden.embedded import start_embedded
    except ImportError as exc:
        err(f"{prog}: the embedded server is unavailable: {exc}")
        return 2
    err("starting embedded PostgreSQL...")
    try:
        server = start_embedded()
    except Exception as exc:
        err(f"{prog}: cannot start the embedded PostgreSQL: {redact(str(exc))}")
        return 2
    try:
        err(f"using embedded default: {server.description}")
        return body(server.url, server.description)
    finally:
        server.close()
        err("embedded PostgreSQL stopped and removed")
