# WARNING: generated from tests/_async/test_probe_deadline.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""The breaker's probe under a caller's nearly spent deadline.

A probe's connect is bounded by a time learnt from this server's connects and by the
caller's deadline. When the deadline is the shorter of the two and runs out, the probe
proved nothing against the server (one still warming up after a restart answers later
than that): it is abandoned, not counted as a failed probe, so the breaker does not
re-open with a doubled cooldown and refuse every caller meanwhile; the caller gets its
deadline error. A probe that had its whole bound and timed out still counts.

The server is made unreachable through the fault proxy: refused until the breaker opens,
then blackholed (connections accepted, never answered), so every probe times out.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import pgwarden
from pgwarden import Database, DatabaseUnavailable, DeadlineExceeded, Settings
from pgwarden.testing import FaultProxy, PostgresServer

from ._compat import run, sleep

pytestmark = [pytest.mark.proxy, pytest.mark.timeout(60)]

# The breaker's wait before a probe (jittered to 50-100%), not doubled (max_cooldown): a
# failed probe re-opens it for 0.25-0.5 s, longer than a cut probe takes.
COOLDOWN = 0.5
SHORT = 0.08  # a caller's deadline, below the learnt connect bound (at least 0.25 s)


def _opened_again(db: Database) -> int:
    """Failed probes so far: the breaker's half_open -> open transitions."""
    transitions: dict[str, int] = db.stats()["counters"]["breaker_transitions"]
    return transitions.get("half_open->open", 0)


def _open_breaker(db: Database, proxy: FaultProxy) -> None:
    """Refuse connections (and drop the pooled one) until the breaker opens, then
    blackhole them and wait out the cooldown: the next caller is the probe. (The call
    that saw the breaker open may have probed and re-opened it before it returned.)"""
    proxy.refuse()
    proxy.drop_connections()
    give_up = time.monotonic() + 15
    seen: list[str] = []
    while db.stats()["breaker"] != "open":
        assert time.monotonic() < give_up, f"the breaker never opened; callers got {seen}"
        try:
            db.fetchval("SELECT 1", timeout=0.5)
        except Exception as exc:
            seen.append(type(exc).__name__)
            sleep(0.02)
    proxy.heal()
    proxy.blackhole()
    sleep(COOLDOWN + 0.05)


def _handle(pg_server: PostgresServer, proxy: FaultProxy) -> Database:
    return pgwarden.connect(
        settings=Settings(
            url=proxy.url_for(pg_server.url),
            min_size=0,
            max_size=2,
            breaker_threshold=2,
            breaker_min_outage=0.01,
            breaker_cooldown=COOLDOWN,
            breaker_max_cooldown=COOLDOWN,
            connect_timeout=2.0,
            retry_attempts=1,
        )
    )


def test_a_probe_cut_by_its_callers_deadline_is_abandoned(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    def main() -> tuple[BaseException, float, int, int, Any]:
        db = _handle(pg_server, fault_proxy)
        try:
            assert db.fetchval("SELECT 1") == 1  # connects learnt: bound >= 0.25 s
            _open_breaker(db, fault_proxy)
            failed_probes = _opened_again(db)
            started = time.monotonic()
            try:
                with pgwarden.deadline(SHORT):
                    db.fetchval("SELECT 1")
            except Exception as exc:
                short: BaseException = exc
            else:
                raise AssertionError("a call against a blackholed server succeeded")
            took = time.monotonic() - started
            after_short = _opened_again(db)
            # The server answers again: a caller without a deadline is not refused by a
            # re-opened breaker, it probes at once and is served.
            fault_proxy.heal()
            value = db.fetchval("SELECT 1")
            return short, took, failed_probes, after_short, value
        finally:
            fault_proxy.heal()
            db.close()

    short, took, failed_probes, after_short, value = run(main)
    assert isinstance(short, DeadlineExceeded), repr(short)
    assert not isinstance(short, DatabaseUnavailable), repr(short)
    assert took < SHORT + 0.3, f"the cut probe took {took:.3f}s under a {SHORT}s deadline"
    assert after_short == failed_probes, "the cut probe was counted as a failed probe"
    assert value == 1


def test_a_probe_with_its_whole_bound_still_counts(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    def main() -> tuple[BaseException, int, int, BaseException]:
        db = _handle(pg_server, fault_proxy)
        try:
            assert db.fetchval("SELECT 1") == 1
            _open_breaker(db, fault_proxy)
            failed_probes = _opened_again(db)
            try:
                # Longer than any bound (at most connect_timeout): the first probe is not cut.
                with pgwarden.deadline(2.5):
                    db.fetchval("SELECT 1")
            except Exception as exc:
                roomy: BaseException = exc
            else:
                raise AssertionError("a call against a blackholed server succeeded")
            # Re-opened with a doubled cooldown: a caller without a deadline is refused.
            try:
                db.fetchval("SELECT 1")
            except Exception as exc:
                refused: BaseException = exc
            else:
                raise AssertionError("a call against a blackholed server succeeded")
            return roomy, failed_probes, _opened_again(db), refused
        finally:
            fault_proxy.heal()
            db.close()

    roomy, failed_probes, after, refused = run(main)
    assert after > failed_probes, (
        f"a timed-out probe with its whole bound was not counted {roomy!r}"
    )
    assert isinstance(refused, DatabaseUnavailable), repr(refused)
