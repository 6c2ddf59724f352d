"""The connection sampler: client backends in ``pg_stat_activity`` every 100 ms.

It runs on its own thread with its own superuser session (through the Unix socket when the
server is ours), so it never competes with the clients for their slots. With ``by_app`` it
also keeps the count per ``application_name`` (the ``fleet`` scenario gives every worker
process its own), from which the report draws each process's share of the connections.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg

from pgwarden.stress.targets import ADMIN_APP, APP_PREFIX, Target

__all__ = ["SAMPLE_INTERVAL", "Sampler"]

#: Seconds between two samples.
SAMPLE_INTERVAL = 0.1


class Sampler:
    """Counts client backends every :data:`SAMPLE_INTERVAL` seconds, on its own thread.

    ``samples`` are ``(seconds since t0, count or None when the server did not answer)``;
    with ``by_app``, ``by_app_samples`` are ``(seconds since t0, {application_name: count})``
    taken by the same query.
    """

    def __init__(self, target: Target, t0: float, *, by_app: bool = False) -> None:
        self.target = target
        self.t0 = t0
        self.by_app = by_app
        self.samples: list[tuple[float, int | None]] = []
        self.by_app_samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stress-sampler", daemon=True)
        cond = "application_name LIKE %s" if target.only_ours else "application_name <> %s"
        # Constant text apart from cond, itself one of two constants: not injectable.
        self._query = (
            "SELECT application_name, count(*) FROM pg_stat_activity "  # noqa: S608
            "WHERE backend_type = 'client backend' "
            f"AND pid <> pg_backend_pid() AND {cond} "
            "AND application_name <> 'pgwarden-testing-admin' GROUP BY 1"
        )
        self._param = APP_PREFIX + "%" if target.only_ours else ADMIN_APP

    @property
    def last(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                counts: dict[str, int] | None = None
                try:
                    if conn is None or conn.closed:
                        conn = self.target.admin(timeout=2)
                    rows = conn.execute(self._query, [self._param]).fetchall()
                    counts = {str(app): int(n) for app, n in rows}
                except psycopg.Error:
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
                now = time.monotonic()
                t = now - self.t0
                self.samples.append((t, None if counts is None else sum(counts.values())))
                if self.by_app and counts is not None:
                    self.by_app_samples.append((t, counts))
                next_at = max(next_at + SAMPLE_INTERVAL, now)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
