"""Exceptions of the test harness (re-exported by :mod:`pgwarden.testing`)."""

from __future__ import annotations

__all__ = ["ServerStartError", "ServerUnavailable"]


class ServerUnavailable(RuntimeError):
    """A server cannot be provided on this machine: a binary or the system user is missing.

    The message says what is missing and how to install it. The pytest plugin turns this
    into a skip, or into a failure when the environment variable ``CI`` is true.
    """


class ServerStartError(RuntimeError):
    """A server was found and launched, but it exited or did not become ready in time.

    The message ends with the last lines of the server's log. This is a real error (a bad
    setting, a port clash, a broken machine), so the pytest plugin never turns it into a skip.
    """
