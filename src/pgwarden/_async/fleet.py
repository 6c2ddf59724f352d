"""The fleet budget's sampler: the thin shell around `pgwarden.core.fleet`.

Started once the handle's pool exists (with ``fleet_budget`` set), it runs in
the background, never on a caller's path: every ``fleet_interval`` it asks
``pg_stat_activity`` for the fleet's members (one statement on a pooled
connection, under a deadline of one interval), and at every turn boundary it
applies this process's share: the pool's limit (`AsyncConnections.apply_limit`
via the handle's wanted limit) and its idle connections (`PgwAsyncPool.shrink_to`).
A process whose share is zero does not sample (that would take a slot); its
last view tells it when its next turn is.

It stops when the handle closes or the fleet turns itself off (behind a pooler).
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING

import psycopg

from pgwarden._async._compat import WaitTimeout, sleep, spawn
from pgwarden.core.fleet import FLEET_QUERY
from pgwarden.core.lifecycle import State

if TYPE_CHECKING:
    from pgwarden._async.acquire import AsyncConnections

__all__ = ["AsyncFleetSampler"]

logger = logging.getLogger("pgwarden")

#: The longest the loop sleeps, so it notices a close promptly.
TICK = 0.1
_DONE = (State.CLOSING, State.CLOSED)


class AsyncFleetSampler:
    """Samples the fleet and applies this process's share until the handle closes."""

    def __init__(self, connections: AsyncConnections) -> None:
        self.connections = connections
        self.state = connections.state
        self._next_sample = 0.0

    def start(self) -> None:
        spawn(self._run)

    async def _run(self) -> None:
        state = self.state
        interval = state.settings.fleet_interval
        state.fleet_pooler_seen()
        while state.state not in _DONE and state.fleet_enabled:
            cap, _ = state.fleet_cap()
            now = monotonic()
            if now >= self._next_sample and cap != 0 and state.state is not State.WARMING:
                self._next_sample = now + interval
                await self._sample(interval)
            await self._apply()
            _, until_turn = state.fleet_cap()
            wake = min(until_turn, max(0.0, self._next_sample - monotonic()), TICK)
            await sleep(max(0.005, wake))
        await self.connections.apply_fleet_cap(None)

    async def _sample(self, bound: float) -> None:
        """One statement under a deadline of *bound*; a failure skips this sample."""
        state = self.state
        try:
            lease = await self.connections.lease(monotonic() + bound, explicit=True, internal=True)
        except Exception as exc:  # the handle is down or closed: callers see why
            logger.debug("fleet sample skipped: %s", type(exc).__name__)
            return
        try:
            cur = await lease.conn.execute(
                FLEET_QUERY, {"pattern": state.fleet_pattern()}, prepare=False
            )
            row = await cur.fetchone()
        except (psycopg.Error, OSError, WaitTimeout) as exc:
            logger.debug("fleet sample failed: %s", type(exc).__name__)
            await lease.release()
            return
        except BaseException:
            await lease.release()
            raise
        await lease.release()
        if row is not None:
            state.fleet_observed(row)

    async def _apply(self) -> None:
        cap, _ = self.state.fleet_cap()
        await self.connections.apply_fleet_cap(cap)
