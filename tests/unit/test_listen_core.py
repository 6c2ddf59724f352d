"""The pure LISTEN bookkeeping: gaps once per outage, who gets them, plans, backoff."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core.classify import FailureKind
from pgwarden.core.listen import (
    MAX_CHANNEL_BYTES,
    Gap,
    ListenBook,
    check_channels,
    off_primary,
    reconnect_delay,
    wants_primary,
)


def connected_book(*channel_sets: tuple[str, ...]) -> tuple[ListenBook, list[int]]:
    """A book with one active subscriber per channel set, on a live connection."""
    book = ListenBook()
    ids = [book.subscribe(channels)[0] for channels in channel_sets]
    book.connected(100)
    plan = book.plan()
    activated, gap, _ = book.listened(plan.listen, plan.unlisten, 1.0)
    assert sorted(activated) == sorted(ids)
    assert gap is None
    return book, ids


def relisten(book: ListenBook, now: float) -> tuple[list[int], Gap | None, list[int]]:
    book.connected(200)
    plan = book.plan()
    return book.listened(plan.listen, plan.unlisten, now)


def test_plan_listens_to_the_union_and_unlistens_what_nobody_wants() -> None:
    book = ListenBook()
    a, _ = book.subscribe(("x", "y"))
    book.subscribe(("y", "z"))
    book.connected(1)
    plan = book.plan()
    assert (plan.stop, plan.listen, plan.unlisten) == (False, ("x", "y", "z"), ())
    book.listened(plan.listen, plan.unlisten, 0.0)
    book.unsubscribe(a)
    plan = book.plan()
    assert (plan.listen, plan.unlisten) == ((), ("x",))


def test_a_subscriber_to_listened_channels_is_active_at_once() -> None:
    book, _ = connected_book(("x", "y"))
    assert book.subscribe(("y",))[1] is True
    assert book.subscribe(("y", "new"))[1] is False


def test_one_outage_is_one_gap_however_many_connects_fail() -> None:
    book, (a, b) = connected_book(("x",), ("y",))
    book.lost(10.0, "lost: admin shutdown")
    for when in (10.1, 10.3, 10.6):
        book.lost(when, "refused", connect_failed=True)
    assert book.recipients("x") == []  # inactive during the outage
    _, gap, recipients = relisten(book, 11.0)
    assert gap == Gap(("x", "y"), 10.0, "lost: admin shutdown")
    assert sorted(recipients) == sorted([a, b])
    assert book.recipients("x") == [a]
    stats = book.stats()
    assert stats["gaps_total"] == 1
    assert stats["reconnects_total"] == 1
    assert stats["connect_failures_total"] == 3
    assert stats["last_gap_at"] == 11.0
    # Another LISTEN on the same connection is no new gap.
    book.subscribe(("z",))
    plan = book.plan()
    assert book.listened(plan.listen, plan.unlisten, 12.0)[1] is None


def test_the_gap_waits_until_every_wanted_channel_is_listened_again() -> None:
    book, _ = connected_book(("x", "y"))
    book.lost(1.0, "lost")
    book.connected(2)
    assert book.listened(("x",), (), 2.0)[1] is None  # "y" still missing
    book.lost(3.0, "lost again")  # the same outage: its first reason and time stay
    _, gap, _ = relisten(book, 4.0)
    assert gap is not None
    assert (gap.since, gap.reason) == (1.0, "lost")
    assert book.stats()["gaps_total"] == 1


def test_who_joined_during_the_outage_or_left_it_gets_no_gap() -> None:
    book, (a, b) = connected_book(("x",), ("x",))
    book.lost(1.0, "lost")
    joined, active = book.subscribe(("x",))
    assert not active
    book.unsubscribe(b)
    activated, gap, recipients = relisten(book, 2.0)
    assert joined in activated
    assert gap is not None
    assert recipients == [a]


def test_an_outage_nobody_was_active_for_yields_no_gap() -> None:
    book = ListenBook()
    book.subscribe(("x",))
    book.lost(1.0, "refused", connect_failed=True)  # the very first connect failed
    activated, gap, _ = relisten(book, 2.0)
    assert activated
    assert gap is None
    assert book.stats()["gaps_total"] == 0
    assert book.stats()["reconnects_total"] == 0


def test_stopping_when_idle_and_closing() -> None:
    book, (a,) = connected_book(("x",))
    book.unsubscribe(a)
    assert book.plan().stop
    book.stopped()
    assert book.stats()["connected"] is False
    book.subscribe(("x",))
    assert not book.plan().stop
    book.close()
    assert book.plan().stop
    assert book.closing
    assert book.stats()["subscribers"] == 0


def test_check_channels() -> None:
    assert check_channels(("a", "b", "a")) == ("a", "b")
    assert check_channels(("x" * MAX_CHANNEL_BYTES,)) == ("x" * MAX_CHANNEL_BYTES,)
    for bad in [(), ("",), ("é" * 32,), (3,)]:
        with pytest.raises(ValueError):
            check_channels(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0, max_value=0.999999))
def test_reconnect_delay_is_short_after_transient_failures(retry: int, rand: float) -> None:
    for kind in (FailureKind.NOTHING_RAN, FailureKind.LOST, FailureKind.OVERLOAD):
        assert 0 <= reconnect_delay(retry, rand, kind) < 0.25
    assert reconnect_delay(retry, rand, FailureKind.PERMANENT) < 5.0
    assert reconnect_delay(1, rand, FailureKind.NOTHING_RAN) < 0.05


def test_off_primary() -> None:
    assert wants_primary("read-write")
    assert wants_primary("primary")
    assert not wants_primary(None)
    assert not wants_primary("any")
    assert off_primary(True, False, primary_wanted=False) is not None
    assert off_primary(False, True, primary_wanted=True) is not None
    assert off_primary(False, True, primary_wanted=False) is None
    assert off_primary(False, False, primary_wanted=True) is None
