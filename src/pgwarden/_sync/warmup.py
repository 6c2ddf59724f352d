# WARNING: generated from src/pgwarden/_async/warmup.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""Readiness: one shared, awaited warmup per handle (the "warmup guard").

However many callers arrive at once, one warmup runs (single flight) and
each caller waits for it up to its own deadline. The warmup connects outside
the pool, proves a real round trip, detects PgBouncer or pgpool-II, runs the optional
``probe_query``, and hands its connection to the pool (or, with ``min_size=0`` and no
fleet budget, keeps it as the handle's solo connection until calls overlap), so the
first caller does not pay a second connect. Connect failures are retried by the same
decision as every other retry (`pgwarden.core.retry.decide`) until
``ready_timeout``; permanent ones (bad password, unknown database) end it at once.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import psycopg

from pgwarden._handle.config import (
    local_port,
    looks_like_pgbouncer,
    looks_relayed,
    prepare_threshold_for,
)
from pgwarden._handle.state import HandleState
from pgwarden._sync._compat import SingleFlight, WaitTimeout, sleep
from pgwarden._sync.acquire import Connections
from pgwarden._sync.connection import PgwConnection
from pgwarden.core.failures import Phase, RetryContext
from pgwarden.core.lifecycle import State
from pgwarden.core.retry import Sleep

__all__ = ["Warmup"]

_PROBE_CONTEXT = RetryContext(is_write=False)


class Warmup:
    def __init__(self, state: HandleState, connections: Connections) -> None:
        self.state = state
        self.connections = connections
        self._flight: SingleFlight[None] = SingleFlight()

    def wait(self, deadline: float | None) -> None:
        """Return once the handle is warmed up; raise `NotReady` if the warmup failed,
        `DeadlineExceeded` if *deadline* passes first (the warmup goes on for others)."""
        state = self.state
        state.check_accepting()
        if state.state not in (State.NEW, State.WARMING):
            return
        timeout = None if deadline is None else deadline - monotonic()
        try:
            self._flight.run(self._warm_up, timeout)
        except WaitTimeout:
            raise state.deadline_error(state.last_connect_error, "readiness") from None

    def _warm_up(self) -> None:
        state = self.state
        if not state.start_warmup():
            return
        started = monotonic()
        give_up_at = started + self.state.settings.ready_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = self._connect_and_probe(give_up_at)
                break
            except (psycopg.Error, OSError, WaitTimeout) as exc:
                _, decision = state.failed(
                    exc,
                    Phase.CONNECT,
                    _PROBE_CONTEXT,
                    attempt=attempt,
                    deadline=give_up_at,
                    policy=state.warmup_policy,
                    operation="warmup",
                    user_call=False,
                )
                if isinstance(decision, Sleep):
                    state.warmup_retry(attempt, exc, decision.seconds)
                    sleep(decision.seconds)
                    state.check_accepting()  # close() stops a warmup that is still retrying
                    continue
                elapsed = monotonic() - started
                error = state.not_ready_error(exc, elapsed)
                state.warmup_finished(elapsed, attempt, error)
                # Permanent or not, the last failure is the cause (redacted in
                # place: a psycopg error keeps its type, sqlstate and diag).
                raise error from state.redacted_cause(exc)
        if state.state is not State.WARMING:
            # close() arrived while we were connecting: do not open a pool now.
            conn.close()
            state.check_accepting()
            return
        connections = self.connections
        if connections.solo_allowed:
            connections.keep_solo(conn)  # no pool until calls overlap (see `keep_solo`)
        else:
            pool = connections.ensure_pool()
            pool.open(wait=False)
            pool.adopt(conn)
        state.warmup_finished(monotonic() - started, attempt, None)

    def _connect_and_probe(self, give_up_at: float) -> PgwConnection:
        """Phase 1: connect and a real round trip, pooler detection; phase 2: the
        probe query. All of it before *give_up_at*."""
        state = self.state
        settings = state.settings
        bound, explorer = state.connect_bound()
        left = give_up_at - monotonic()
        conn = self.connections.connect_direct(
            min(bound, max(0.0, left)), feed_breaker=False, explorer=explorer
        )
        lease = self.connections.bound(conn, give_up_at)
        try:
            # Never prepared: before detection a low prepare_threshold would leave a
            # "_pg3_0" on a PgBouncer server connection for other clients to collide with.
            cur = conn.execute("SELECT pg_backend_pid(), inet_client_port()", prepare=False)
            row = cur.fetchone()
            if settings.pgbouncer == "auto" and not state.pgbouncer:
                self._detect_pooler(conn, [] if row is None else list(row.values()))
            if settings.probe_query:
                conn.execute(settings.probe_query)
            conn.last_used = monotonic()
        except BaseException:
            conn.close()
            raise
        finally:
            lease.rearm(None)
        return conn

    def _detect_pooler(self, conn: PgwConnection, row: list[Any]) -> None:
        """PgBouncer by the backend key it makes up; pgpool-II, which forwards the
        server's key, by its own ``SHOW pool_version``, asked only when the server saw
        the connection come from another port than ours (so a direct connection never
        gets the error that statement is on PostgreSQL). *row*: ``pg_backend_pid()``,
        ``inet_client_port()``."""
        state = self.state
        server_pid, client_port = [*row, None, None][:2]
        detected = looks_like_pgbouncer(server_pid, conn.info.backend_pid)
        state.set_pgbouncer(detected)
        if detected:
            conn.prepare_threshold = prepare_threshold_for(state.settings, pgbouncer=True)
        elif looks_relayed(client_port, local_port(conn.pgconn.socket)):
            state.set_pgpool(_answers_pool_version(conn))


# The comment shows in the server's log next to the error, where this is asked of a
# PostgreSQL behind a plain relay (a TCP proxy, NAT): it says why.
_POOL_VERSION = "SHOW pool_version /* pgwarden: is this pgpool-II? an error means no */"


def _answers_pool_version(conn: PgwConnection) -> bool:
    """Does the other end answer ``SHOW pool_version`` itself, as pgpool-II does (for
    the simple query protocol only, hence ``prepare=False``)? PostgreSQL has no such
    setting (42704); the connection stays usable (autocommit)."""
    try:
        cur = conn.execute(_POOL_VERSION, prepare=False)
    except psycopg.errors.UndefinedObject:
        return False
    description = cur.description or []
    return bool(description) and description[0].name == "pool_version"
