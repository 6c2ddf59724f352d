"""The sync shell's watchdog thread: timers fire at their time, in order, and an
earlier timer armed while the thread sleeps toward a later one still fires on time."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

from pgwarden._sync._compat import Watchdog


def _recorder() -> tuple[list[tuple[str, float]], threading.Event, Callable[..., None]]:
    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def record(name: str, last: bool = False) -> None:
        fired.append((name, time.monotonic()))
        if last:
            done.set()

    return fired, done, record


def test_an_earlier_timer_wakes_a_thread_sleeping_toward_a_later_one() -> None:
    dog = Watchdog()
    fired, done, record = _recorder()
    start = time.monotonic()
    dog.arm(start + 5.0, record, "late")
    time.sleep(0.05)  # the thread now waits toward +5 s
    dog.arm(time.monotonic() + 0.05, record, "early", True)
    assert done.wait(2.0), "the earlier timer did not fire while the thread slept"
    assert [name for name, _ in fired] == ["early"]
    assert fired[0][1] - start < 2.0
    dog.close()


def test_a_later_timer_does_not_delay_an_armed_earlier_one() -> None:
    dog = Watchdog()
    fired, done, record = _recorder()
    start = time.monotonic()
    dog.arm(start + 0.1, record, "first")
    for offset in (0.2, 0.3, 10.0):
        dog.arm(start + offset, record, f"at {offset}", offset == 0.3)
    assert done.wait(3.0)
    assert [name for name, _ in fired] == ["first", "at 0.2", "at 0.3"]
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(fired))
    dog.close()


def test_a_disarmed_timer_never_fires() -> None:
    dog = Watchdog()
    fired, done, record = _recorder()
    token = dog.arm(time.monotonic() + 0.05, record, "disarmed")
    dog.disarm(token)
    dog.arm(time.monotonic() + 0.15, record, "kept", True)
    assert done.wait(2.0)
    assert [name for name, _ in fired] == ["kept"]
    dog.close()


def test_a_rewatched_entry_runs_the_new_callback_at_the_new_time_only() -> None:
    from pgwarden._sync._compat import COARSE_TICK

    dog = Watchdog()
    fired, done, record = _recorder()
    token = dog.watch(time.monotonic() + 0.05, lambda: record("old"))
    assert dog.rewatch(token, time.monotonic() + 0.2, lambda: record("new", True))
    assert done.wait(0.2 + COARSE_TICK + 2.0), "the re-pointed watch did not fire"
    time.sleep(0.1)
    assert [name for name, _ in fired] == ["new"]
    # Fired (or unwatched) already: nothing to re-point, the caller watches anew.
    assert not dog.rewatch(token, time.monotonic(), lambda: record("late"))
    gone = dog.watch(time.monotonic() + 60.0, lambda: record("never"))
    dog.unwatch(gone)
    assert not dog.rewatch(gone, time.monotonic(), lambda: record("never"))
    time.sleep(COARSE_TICK + 0.2)
    assert [name for name, _ in fired] == ["new"]
    dog.close()


def test_a_callback_may_arm_another_timer() -> None:
    """Callbacks run without the watchdog's lock held, so one may arm (the deadline's
    cancel arms the sever this way) without deadlocking the thread."""
    dog = Watchdog()
    fired, done, record = _recorder()

    def first() -> None:
        record("first")
        dog.arm(time.monotonic() + 0.01, record, "second", True)

    dog.arm(time.monotonic() + 0.01, first)
    assert done.wait(2.0), "the timer armed from a callback never fired"
    assert [name for name, _ in fired] == ["first", "second"]
    dog.close()


def test_disarm_returns_only_after_the_running_callback_ended() -> None:
    """A lease's release disarms its timers and relies on this: a sever or cancel
    still running must end before the connection can serve someone else."""
    dog = Watchdog()
    entered = threading.Event()
    ended = threading.Event()

    def slow() -> None:
        entered.set()
        time.sleep(0.2)
        ended.set()

    token = dog.arm(time.monotonic() + 0.01, slow)
    assert entered.wait(2.0)
    dog.disarm(token)
    assert ended.is_set(), "disarm returned while the callback was still running"
    watched = dog.watch(time.monotonic(), slow)
    entered.clear()
    ended.clear()
    assert entered.wait(2.0)  # a coarse entry fires within a tick
    dog.unwatch(watched)
    assert ended.is_set(), "unwatch returned while the callback was still running"
    dog.close()
