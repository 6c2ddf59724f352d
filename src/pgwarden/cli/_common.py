"""Helpers every subcommand shares: stderr lines, the secrets of a URL, SIGTERM as Ctrl-C.

Standard library (and pgwarden's own light modules) only, so importing it costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.parse
from collections.abc import Mapping

from pgwarden._signals import signals_as_interrupt

__all__ = ["err", "sigterm_as_interrupt", "url_secrets"]


def err(message: str) -> None:
    """One line on stderr, flushed at once (progress and failures; stdout is for results)."""
    print(message, file=sys.stderr, flush=True)


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM raises ``KeyboardInterrupt`` inside, so a command's ``finally`` blocks stop
    what it started (an embedded server) and it exits 130 as on Ctrl-C."""
    return signals_as_interrupt(("SIGTERM",))


def url_secrets(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every secret that text about *url* might echo: its password (URL or ``key=value``
    form, parsed as libpq does, or as a URL when libpq cannot parse it) and
    ``PGPASSWORD``."""
    from pgwarden._handle.config import password_of

    env = os.environ if environ is None else environ
    found = [password_of(url), env.get("PGPASSWORD")]
    with contextlib.suppress(ValueError):  # a URL that does not parse has no netloc password
        found.append(urllib.parse.urlsplit(url).password)
    return tuple(dict.fromkeys(s for s in found if s))
