# WARNING: generated from tests/_async/test_truthful_health.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""The waiting gauge and health() tell the truth, against real servers.

The waiting gauge counts each caller waiting for a pooled connection once (psycopg_pool's
``requests_waiting`` also counts every timed-out ``getconn()`` slice still in its queue).
``health()`` answers within ``health_timeout`` whatever the database does, reports a known
outage at once, and a failure seen after its cached check began makes the cache stale.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pgwarden import Database, Settings
from pgwarden.testing import FaultProxy, PostgresServer

from ._compat import gather, run, sleep, spawn

SLACK = 0.5  # on top of health_timeout, for a loaded test machine


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def waiting(db: Database) -> int:
    return int(db.stats()["pool"]["waiting"])


def pool_requests_waiting(db: Database) -> int:
    """psycopg_pool's own count, for comparison (it counts dead queue entries too)."""
    stats = db._connections.pool_stats() or {}
    return int(stats.get("requests_waiting", 0))


def timed_health(db: Database) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    report = db.health()
    return time.monotonic() - started, report


def test_waiting_gauge_counts_each_waiting_caller_once(pg_server: Any) -> None:
    callers = 5

    def main() -> None:
        with make(pg_server.url, max_size=1, application_name="pgw-waiting") as db:
            db.ready()
            # A caller served at once is never counted, however often it checks out.
            quiet: list[int] = []
            for _ in range(200):
                db.fetchval("SELECT 1")
                quiet.append(waiting(db))
            assert max(quiet) == 0

            ours: list[int] = []
            theirs: list[int] = []
            with db.connection():  # the only connection: everyone else waits
                tasks = [spawn(db.fetchval, ("SELECT 1",)) for _ in range(callers)]
                for _ in range(60):  # 1.2 s: about five 0.25 s getconn slices each
                    sleep(0.02)
                    ours.append(waiting(db))
                    theirs.append(pool_requests_waiting(db))
            assert gather(*tasks) == [1] * callers
            print(f"\nwaiting gauge max {max(ours)}; psycopg_pool's own count max {max(theirs)}")
            assert max(ours) == callers
            assert ours[-1] == callers
            assert max(theirs) > callers  # the overcount the gauge no longer reads
            assert waiting(db) == 0

    run(main)


def test_health_on_a_cold_handle_with_the_server_down_is_bounded(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    fault_proxy.refuse()

    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url), health_timeout=0.5) as db:
            first_latency, first = timed_health(db)  # waits for readiness, bounded
            again_latency, again = timed_health(db)  # the warmup's failures are known
            print(f"\ncold: first {first_latency:.3f}s, then {again_latency:.3f}s")
            assert first["ok"] is False
            assert first_latency < 0.5 + SLACK
            assert again["ok"] is False
            assert again_latency < 0.1  # at once, without waiting
            assert again["error"]
            assert pg_server.password not in repr(first) + repr(again)

    run(main)


def test_health_reports_a_fresh_outage_at_once_and_recovers(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    def main() -> None:
        with make(
            fault_proxy.url_for(pg_server.url), health_interval=60.0, application_name="pgw-h"
        ) as db:
            assert (db.health())["ok"] is True  # cached for a minute...
            fault_proxy.refuse()
            fault_proxy.drop_connections()
            with pytest.raises(Exception):  # whichever error: the handle saw the outage
                db.fetchval("SELECT 1", timeout=0.5)
            latency, report = timed_health(db)  # ...but the outage is news
            print(f"\nfresh outage reported in {latency:.3f}s: {report['error']}")
            assert report["ok"] is False
            assert latency < 0.1
            assert report["error"]
            assert pg_server.password not in repr(report)

            fault_proxy.heal()
            give_up = time.monotonic() + 5.0
            while True:
                latency, report = timed_health(db)
                assert latency < db.settings.health_timeout + SLACK
                if report["ok"] or time.monotonic() > give_up:
                    break
                sleep(0.1)
            assert report["ok"] is True, report

    run(main)


def test_health_is_bounded_when_the_network_goes_silent(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url), health_interval=0.2) as db:
            assert (db.health())["ok"] is True
            sleep(0.3)  # the cached report expired; nothing was seen failing
            fault_proxy.blackhole()
            # Ten callers share one check; each gets an answer within its own bound.
            results = gather(*[spawn(timed_health, (db,)) for _ in range(10)])
            latencies = [latency for latency, _ in results]
            print(f"\nsilent network: concurrent health latencies max {max(latencies):.3f}s")
            assert all(report["ok"] is False for _, report in results)
            assert max(latencies) < db.settings.health_timeout + SLACK
            # Later calls while it stays silent stay bounded too.
            for _ in range(10):
                latency, report = timed_health(db)
                assert report["ok"] is False
                assert latency < db.settings.health_timeout + SLACK
                sleep(0.1)
            fault_proxy.heal()

    run(main)


# --- the acceptance test: a 10 s outage under load ---------------------------------------------

CALLERS = 17
WRITERS = 3  # of the callers, these run run_transaction writes
OUTAGE = 10.0
STEADY = 2.0
AFTER = 4.0
SAMPLE_EVERY = 0.02
HEALTH_EVERY = 0.1
DOWN_WITHIN = 1.0  # health says not ok this soon after stop() was called
UP_WITHIN = 3.0  # and ok again this soon after the server accepts again


@dataclass
class Outage:
    stop_called: float = 0.0
    stopped: float = 0.0
    start_called: float = 0.0
    accepting: float = 0.0
    done: bool = False
    error: BaseException | None = None


@dataclass
class Observed:
    waiting: list[int] = field(default_factory=list)
    pool_waiting: list[int] = field(default_factory=list)
    health: list[tuple[float, float, bool]] = field(default_factory=list)  # start, latency, ok
    errors: dict[str, int] = field(default_factory=dict)  # raised to callers, by type
    ok_calls: int = 0


def control(server: PostgresServer, outage: Outage) -> None:
    """Stop the server for OUTAGE seconds, start it again, note when it accepts."""
    try:
        time.sleep(STEADY)
        outage.stop_called = time.monotonic()
        server.stop()
        outage.stopped = time.monotonic()
        time.sleep(OUTAGE - (outage.stopped - outage.stop_called))
        outage.start_called = time.monotonic()
        starter = threading.Thread(target=server.start, name="server-start", daemon=True)
        starter.start()
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                psycopg.connect(server.url, connect_timeout=2).close()
            except psycopg.OperationalError:
                time.sleep(0.005)
                continue
            outage.accepting = time.monotonic()
            break
        starter.join(30)
        time.sleep(AFTER)
    except BaseException as exc:
        outage.error = exc
    finally:
        outage.done = True


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_outage_under_load_waiting_and_health_tell_the_truth(pg_server_factory: Any) -> None:
    server: PostgresServer = pg_server_factory()
    outage = Outage()
    seen = Observed()

    def main() -> None:
        db = make(server.url, application_name="pgw-truthful")
        db.execute("CREATE TABLE IF NOT EXISTS truthful (id serial primary key, n int)")

        def failed(exc: BaseException) -> None:
            name = type(exc).__name__
            seen.errors[name] = seen.errors.get(name, 0) + 1

        def reader(i: int) -> None:
            # Half without a deadline (fail fast once the breaker opens), half with one
            # (they wait for the breaker's probe).
            timeout = None if i % 2 else 1.0
            while not outage.done:
                try:
                    db.fetchval("SELECT 1", timeout=timeout)
                except Exception as exc:
                    failed(exc)
                    sleep(0.01)
                else:
                    seen.ok_calls += 1

        def add(tx: Any) -> None:
            tx.execute("INSERT INTO truthful (n) VALUES (%s)", (1,))

        def writer() -> None:
            while not outage.done:
                try:
                    db.run_transaction(add, timeout=2.0)
                except Exception as exc:
                    failed(exc)
                    sleep(0.01)
                else:
                    seen.ok_calls += 1

        def sampler() -> None:
            while not outage.done:
                seen.waiting.append(waiting(db))
                seen.pool_waiting.append(pool_requests_waiting(db))
                sleep(SAMPLE_EVERY)

        def prober() -> None:
            while not outage.done:
                started = time.monotonic()
                report = db.health()
                seen.health.append((started, time.monotonic() - started, bool(report["ok"])))
                sleep(HEALTH_EVERY)

        controller = threading.Thread(target=control, args=(server, outage), daemon=True)
        controller.start()
        try:
            workers = [spawn(reader, (i,)) for i in range(CALLERS - WRITERS)]
            workers += [spawn(writer) for _ in range(WRITERS)]
            gather(*workers, spawn(sampler), spawn(prober))
        finally:
            controller.join(60)
            stats = db.stats()
            db.close()
        errors_by_kind = stats["counters"]["errors"]
        print(f"\nerrors counted by kind: {errors_by_kind}; raised to callers: {seen.errors}")
        assert errors_by_kind.get("permanent", 0) == 0, errors_by_kind

    run(main)
    assert outage.error is None, f"the controller failed: {outage.error!r}"
    assert outage.accepting > 0, "the server never accepted again"

    bound = Settings().health_timeout
    latencies = [latency for _, latency, _ in seen.health]
    down = [s + lat for s, lat, ok in seen.health if not ok and s + lat >= outage.stop_called]
    first_down = min(down) if down else float("inf")
    time_to_down = first_down - outage.stop_called if down else None
    up = [s + lat for s, lat, ok in seen.health if ok and s >= outage.accepting]
    time_to_up = min(up) - outage.accepting if up else None
    # Once it said down, it never said ok again until the server was started.
    false_ok = [s for s, _, ok in seen.health if ok and first_down <= s < outage.start_called]
    print(
        f"callers {CALLERS}: max waiting {max(seen.waiting)} "
        f"(psycopg_pool requests_waiting max {max(seen.pool_waiting)}); "
        f"{len(latencies)} health calls, max latency {max(latencies):.3f}s (bound {bound}s); "
        f"time to down {time_to_down if time_to_down is None else round(time_to_down, 3)}s "
        f"(stop took {outage.stopped - outage.stop_called:.3f}s); "
        f"time to up {time_to_up if time_to_up is None else round(time_to_up, 3)}s; "
        f"ok calls {seen.ok_calls}"
    )
    assert max(seen.waiting) <= CALLERS
    assert max(latencies) < bound + SLACK
    assert time_to_down is not None
    assert time_to_down <= DOWN_WITHIN
    assert not false_ok, f"health said ok during the outage at {false_ok}"
    assert time_to_up is not None
    assert time_to_up <= UP_WITHIN
