"""Server down under load: fail fast, do not storm the server, and recover at once.

Eight workers call ``fetchval("SELECT 1")`` under ``pgwarden.deadline(0.5)`` in a loop and
record every call. A controller thread stops the test's own server, keeps it down for the
outage, starts it again on the same port (``PostgresServer`` keeps the port) and polls
with a bare ``psycopg.connect`` to record the moment it accepts again. A sampler records
``db.stats()`` every 50 ms, so connection attempts can be counted between two instants
inside the outage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import pgwarden
from pgwarden import AsyncDatabase, Settings
from pgwarden.testing import PostgresServer

from ._compat import gather, run, sleep, spawn

WORKERS = 8
CALL_DEADLINE = 0.5
STEADY = 3.0  # seconds of load before the outage (the first is warm-up)
AFTER = 5.0  # seconds of load after the server accepts again
FIRST_SUCCESS = 0.5  # first success within this of the server accepting
# [accepting + 1 s, accepting + 2 s) reaches this share of steady. Usually 70-150%; one
# clean-clone CI run saw 31% (784 of 2524/s) once, not reproduced in many local runs: the
# summary prints throughput per 0.2 s after accepting so a recurrence shows where it stalls.
THROUGHPUT_SHARE = 0.25
PROBE_INTERVAL = 0.2  # lower end of the breaker's probe interval (jittered 0.2-0.4 s)


@dataclass
class Outage:
    """What the controller did, in monotonic seconds."""

    seconds: float
    stop_called: float = 0.0
    stopped: float = 0.0  # stop() returned: the server is down
    start_called: float = 0.0
    start_returned: float = 0.0
    accepting: float = 0.0  # first bare psycopg.connect that succeeded
    done: bool = False
    error: BaseException | None = None


@dataclass
class Record:
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class Load:
    calls: list[Record] = field(default_factory=list)
    samples: list[tuple[float, int, str, int]] = field(default_factory=list)
    # (time, connect failures so far, breaker state, closed->open transitions so far)


def control(server: PostgresServer, outage: Outage) -> None:
    """Stop, wait, start; record when the server accepts again (runs in a thread)."""
    try:
        time.sleep(STEADY)
        outage.stop_called = time.monotonic()
        server.stop()
        outage.stopped = time.monotonic()
        time.sleep(outage.seconds)

        def start() -> None:
            server.start()
            outage.start_returned = time.monotonic()

        outage.start_called = time.monotonic()
        starter = threading.Thread(target=start, name="server-start", daemon=True)
        starter.start()
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            try:
                psycopg.connect(server.url, connect_timeout=2).close()
            except psycopg.OperationalError:
                time.sleep(0.002)
                continue
            outage.accepting = time.monotonic()
            break
        starter.join(30)
        time.sleep(AFTER)
    except BaseException as exc:
        outage.error = exc
    finally:
        outage.done = True


def connect_failures(stats: Mapping[str, Any]) -> int:
    return sum(stats["counters"]["connect_failures"].values())


def rate(calls: list[Record], start: float, end: float) -> float:
    """Successful calls per second that ended in [start, end)."""
    return sum(1 for c in calls if c.ok and start <= c.ended < end) / (end - start)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "seconds",
    [pytest.param(10.0, id="10s"), pytest.param(60.0, id="60s", marks=pytest.mark.slow)],
)
def test_server_down_under_load(pg_server_factory: Any, seconds: float) -> None:
    server: PostgresServer = pg_server_factory()
    outage = Outage(seconds)
    load = Load()

    async def main() -> None:
        db = AsyncDatabase(Settings(url=server.url, application_name="pgw-recovery"))
        await db.ready()

        async def worker() -> None:
            while not outage.done:
                started = time.monotonic()
                try:
                    with pgwarden.deadline(CALL_DEADLINE):
                        await db.fetchval("SELECT 1")
                except Exception as exc:
                    load.calls.append(Record(started, time.monotonic(), False, type(exc).__name__))
                    await sleep(0.005)  # a call that fails fast must not starve the others
                else:
                    load.calls.append(Record(started, time.monotonic(), True))

        async def sampler() -> None:
            while not outage.done:
                stats = db.stats()
                opened = stats["counters"]["breaker_transitions"].get("closed->open", 0)
                load.samples.append(
                    (time.monotonic(), connect_failures(stats), str(stats["breaker"]), opened)
                )
                await sleep(0.05)

        controller = threading.Thread(target=control, args=(server, outage), daemon=True)
        controller.start()
        try:
            await gather(*[spawn(worker) for _ in range(WORKERS)], spawn(sampler))
        finally:
            controller.join(60)
            await db.close()

    run(main)
    assert outage.error is None, f"the controller failed: {outage.error!r}"
    assert outage.accepting > 0, "the server never accepted again"
    calls = load.calls
    problems: list[str] = []

    # Steady throughput: the last two seconds before stop() (the first second warms up).
    steady = rate(calls, outage.stop_called - 2.0, outage.stop_called)
    # First success after the server came back: of a call that started once it was down
    # (a call's end is stamped when its worker resumes, which may be after stop() returned
    # even though the server answered before).
    back = [c.ended for c in calls if c.ok and c.started > outage.stopped]
    first = min(back) - outage.accepting if back else None
    if first is None or first > FIRST_SUCCESS:
        shown = "never" if first is None else f"{first:.3f}s"
        problems.append(f"first success {shown} after accepting (bound {FIRST_SUCCESS}s)")
    recovered = rate(calls, outage.accepting + 1.0, outage.accepting + 2.0)
    if recovered < THROUGHPUT_SHARE * steady:
        problems.append(
            f"throughput {recovered:.0f}/s in [accepting+1s, accepting+2s), below"
            f" {THROUGHPUT_SHARE:.0%} of the steady {steady:.0f}/s"
        )

    # Connection attempts while down, from the breaker's opening (at least 1 s after stop,
    # so the first burst of failures is not counted) to just before start() was called.
    opened_at = next(
        (t for t, _, _, opened in load.samples if opened > 0 and t > outage.stopped), None
    )
    window: tuple[float, float, int] | None = None
    if opened_at is None:
        problems.append("the breaker never opened while the server was down")
    else:
        begin = max(opened_at, outage.stopped + 1.0)
        inside = [s for s in load.samples if begin <= s[0] <= outage.start_called - 0.1]
        if len(inside) >= 2:
            t1, f1, t2, f2 = inside[0][0], inside[0][1], inside[-1][0], inside[-1][1]
            window = (t1 - outage.stopped, t2 - outage.stopped, f2 - f1)
            bound = (t2 - t1) / PROBE_INTERVAL + 2
            if f2 - f1 > bound:
                problems.append(
                    f"{f2 - f1} connection attempts in {t2 - t1:.1f}s of outage after the"
                    f" breaker opened (bound {bound:.0f}: one per {PROBE_INTERVAL}s + 2)"
                )
        else:
            problems.append("the breaker opened too late to count attempts inside the outage")

    down = [c for c in calls if outage.stopped <= c.started < outage.start_called]
    errors: dict[str, int] = {}
    for c in down:
        errors[c.error or "ok"] = errors.get(c.error or "ok", 0) + 1
    slowest = max((c.ended - c.started for c in calls), default=0.0)
    buckets = [
        sum(
            1
            for c in calls
            if c.error == ""
            and outage.accepting + i * 0.2 <= c.ended < outage.accepting + (i + 1) * 0.2
        )
        * 5
        for i in range(10)
    ]
    attempts = (
        "-"
        if window is None
        else f"{window[2]} connect failures between {window[0]:.1f}s and {window[1]:.1f}s"
    )
    summary = (
        f"outage {seconds:.0f}s: steady {steady:.0f}/s; start() returned"
        f" {outage.start_returned - outage.start_called:.3f}s after being called, accepting"
        f" {outage.accepting - outage.start_called:.3f}s after; first success"
        f" {'never' if first is None else f'{first:.3f}s'} after accepting; throughput"
        f" {recovered:.0f}/s at accepting+1s; {attempts} into the outage (breaker opened"
        f" {'never' if opened_at is None else f'{opened_at - outage.stopped:.2f}s'} after"
        f" stop); calls while down: {errors}; slowest call {slowest:.3f}s; per second in"
        f" 0.2 s steps after accepting: {buckets}"
    )
    print(summary)
    assert not problems, "\n".join([*problems, summary])
