"""The sync handle on many threads while psycopg_pool's worker threads report connects.

Application threads admit calls (and race for the breaker's probe) while the
pool's own threads report connect failures and successes, across a server
outage; the handle's one lock must keep the breaker to one probe at a time and
the in-flight count exact for close()'s drain.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import pgwarden
from pgwarden import Database, Settings
from pgwarden.core.breaker import Admission
from pgwarden.errors import PgwardenError


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_threads_and_pool_workers_keep_one_probe_and_an_exact_in_flight_count(
    pg_server_factory: Any,
) -> None:
    server = pg_server_factory()
    db = Database(Settings(url=server.url, max_size=4, breaker_min_outage=0.2))
    db.ready()
    state = db._state  # the one owner; wrapped to watch probes from outside

    outstanding = 0
    most_outstanding = 0
    probes = 0
    watch = threading.Lock()
    original_admit = state.admit
    original_succeeded = state.connect_succeeded
    original_failed = state.connect_failed
    probe_threads: set[int] = set()

    def admit() -> Any:
        nonlocal outstanding, most_outstanding, probes
        verdict = original_admit()
        if verdict[0] is Admission.PROBE:
            with watch:
                probes += 1
                outstanding += 1
                most_outstanding = max(most_outstanding, outstanding)
                probe_threads.add(threading.get_ident())
        return verdict

    def settle() -> None:
        nonlocal outstanding
        with watch:
            if threading.get_ident() in probe_threads:
                probe_threads.discard(threading.get_ident())
                outstanding -= 1

    def succeeded(*args: Any, **kwargs: Any) -> None:
        original_succeeded(*args, **kwargs)
        settle()

    def failed(*args: Any, **kwargs: Any) -> Any:
        kind = original_failed(*args, **kwargs)
        settle()
        return kind

    state.admit = admit  # type: ignore[method-assign]
    state.connect_succeeded = succeeded  # type: ignore[method-assign]
    state.connect_failed = failed  # type: ignore[method-assign]

    stop = threading.Event()
    served = [0] * 16
    unexpected: list[BaseException] = []

    def worker(i: int) -> None:
        while not stop.is_set():
            try:
                with pgwarden.deadline(0.3):
                    db.fetchval("SELECT 1")
                served[i] += 1
            except (PgwardenError, OSError) as exc:
                del exc
                time.sleep(0.005)
            except Exception as exc:  # psycopg errors of a dying server are expected too
                if type(exc).__module__.split(".")[0] != "psycopg":
                    unexpected.append(exc)
                time.sleep(0.005)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.stop()
    time.sleep(3.0)  # long enough for the breaker to open and probe many times
    server.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(10)

    assert not unexpected, unexpected[:3]
    assert probes >= 3, f"the breaker never probed repeatedly ({probes})"
    assert most_outstanding == 1, f"{most_outstanding} probes were outstanding at once"
    assert db.stats()["in_flight"] == 0
    assert sum(served) > 100

    # The close() check below needs a served handle first. The last probes of the outage
    # ran under the workers' nearly spent 0.3 s deadlines and may have timed out against a
    # server still warming up (CI saw this on a loaded machine): an explicit deadline waits
    # for the breaker's next probe, with the server's whole connect bound.
    assert db.fetchval("SELECT 1", timeout=15) == 1

    # close() while calls are in flight waits for exactly those.
    release = threading.Event()
    started = threading.Barrier(9)

    def slow() -> None:
        started.wait()
        db.fetchval("SELECT pg_sleep(0.3)")
        release.set()

    slow_threads = [threading.Thread(target=slow) for _ in range(8)]
    for t in slow_threads:
        t.start()
    started.wait()
    time.sleep(0.1)
    assert db.stats()["in_flight"] == 8
    began = time.monotonic()
    db.close(timeout=10)
    assert time.monotonic() - began < 5
    for t in slow_threads:
        t.join(5)
    assert release.is_set()
    assert db.stats()["in_flight"] == 0
