"""Socket helpers for connections the shells hold: no round trips, no waiting."""

from __future__ import annotations

import os
import select
import socket
from typing import Any

__all__ = ["has_pending_input", "sever"]


def sever(fileno: int) -> None:
    """Shut down the socket behind *fileno* so that a read blocked on it fails now.

    Used when a deadline passes and the server does not answer (a blackholed
    network): a cancel request would hang the same way, a shutdown does not.
    The descriptor is duplicated first, so closing our socket object leaves
    psycopg's descriptor for psycopg to close.
    """
    try:
        dup = os.dup(fileno)
    except OSError:
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def has_pending_input(conn: Any) -> bool:
    """True when an idle connection's socket has something to read.

    An idle PostgreSQL connection has nothing to say unless the server ended
    it (a FATAL such as 57P01 followed by EOF, or just EOF after a crash or a
    reset). Checking costs one ``poll`` syscall (about half a microsecond) and
    no round trip, and it catches dead connections before a statement is sent,
    when a retry is safe even for a write. The poll object is cached on the
    connection (``conn.poller``); where ``select.poll`` does not exist
    (Windows) a zero-timeout ``select`` does the same.
    """
    poller = conn.poller
    if poller is None:
        if not hasattr(select, "poll"):
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
            return bool(readable)
        poller = conn.poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))
