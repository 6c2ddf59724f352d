"""The embedded default that subcommands fall back to when no URL is given."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pgwarden._redact import redact

__all__ = ["with_embedded"]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def with_embedded(prog: str, body: Callable[[str, str], int]) -> int:
    """Start a throwaway PostgreSQL, return ``body(url, description)``, and always remove
    the server afterwards. Exit code 2, with a one-line reason, if it cannot start."""
    try:
        from pgwarden.embedded import start_embedded
    except ImportError as exc:
        _err(
            f"{prog}: no URL given, DATABASE_URL is not set, and the embedded server is "
            f"unavailable: {exc}"
        )
        return 2
    _err("starting embedded PostgreSQL...")
    try:
        server = start_embedded()
    except Exception as exc:
        _err(f"{prog}: cannot start the embedded PostgreSQL: {redact(str(exc))}")
        return 2
    try:
        _err(f"using embedded default: {server.description}")
        return body(server.url, server.description)
    finally:
        server.close()
        _err("embedded PostgreSQL stopped and removed")
