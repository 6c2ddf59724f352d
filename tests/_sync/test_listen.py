# WARNING: generated from tests/_async/test_listen.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""LISTEN/NOTIFY subscriptions against real servers: delivery, outages, gaps, close.

The outage tests send numbered notifications with a bare psycopg connection before
the outage and after the gap event, plus a continuous sender through the whole outage,
and check that nothing arrives twice, that everything sent before the outage or after
the gap arrives, that the outage yields exactly one `Gap`, and that the gap (delivered
once every channel is LISTENed again) arrives within `RESUME` seconds of the server
accepting connections again, as seen by a probe connecting every few milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from pgwarden import Database, DeadlineExceeded, HandleClosed, Settings
from pgwarden._sync.listen import HEARTBEAT
from pgwarden.core.listen import Gap, ListenEvent, Notification
from pgwarden.testing import FaultProxy, PostgresServer, StandbyPair

from ._compat import gather, run, sleep, spawn


def live_workers() -> int:
    """Threads in the process: the listener's is one of them while it runs."""
    return threading.active_count()


RESUME = 0.5  # listening resumes (the gap arrives) this soon after the server accepts
BATCH = 40  # notifications sent before the outage, and again after the gap
CHANNELS = ("orders", "Invoices-2")  # a mixed-case name with a dash needs quoting


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def notify(url: str, channel: str, payloads: list[str]) -> None:
    """Send each payload on *channel*, one committed NOTIFY each (autocommit)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def send_batch(url: str, prefix: str) -> set[tuple[str, str]]:
    sent: set[tuple[str, str]] = set()
    for channel in CHANNELS:
        payloads = [f"{prefix}-{i}" for i in range(BATCH // len(CHANNELS))]
        notify(url, channel, payloads)
        sent.update((channel, p) for p in payloads)
    return sent


def collect(sub: Any, count: int, timeout: float) -> list[ListenEvent]:
    """The next *count* events, or fewer if *timeout* passes first."""
    events: list[ListenEvent] = []
    give_up_at = time.monotonic() + timeout
    while len(events) < count:
        event = sub.get(timeout=give_up_at - time.monotonic())
        if event is None:
            break
        events.append(event)
    return events


def notes_of(events: list[ListenEvent]) -> list[tuple[str, str]]:
    return [(e.channel, e.payload) for e in events if isinstance(e, Notification)]


def backend_alive(server: Any, pid: int | None) -> bool:
    assert pid is not None, "the listener has no backend"
    rows = server.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    return int(rows[0][0]) > 0


def test_listen_routes_notifications_to_their_subscribers(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            with db.listen(*CHANNELS) as both, db.listen(CHANNELS[1]) as second:
                stats = db.stats()["listen"]
                assert stats["connected"] is True
                assert stats["channels"] == 2
                assert stats["subscribers"] == 2
                notify(pg_server.url, CHANNELS[0], ["a"])
                notify(pg_server.url, CHANNELS[1], ["b", "c"])
                got = collect(both, 3, 5)
                assert notes_of(got) == [(CHANNELS[0], "a"), (CHANNELS[1], "b"), (CHANNELS[1], "c")]
                assert all(isinstance(e, Notification) and e.pid > 0 for e in got)
                assert notes_of(collect(second, 2, 5)) == [
                    (CHANNELS[1], "b"),
                    (CHANNELS[1], "c"),
                ]
                assert second.get(timeout=0.3) is None  # nothing from "orders"
                pid = db.stats()["listen"]["backend_pid"]
            assert both.closed
            assert second.closed
            # Nobody listens: the dedicated connection is closed, not kept.
            give_up_at = time.monotonic() + 5
            while backend_alive(pg_server, pid) and time.monotonic() < give_up_at:
                sleep(0.05)
            assert not backend_alive(pg_server, pid)
            stats = db.stats()["listen"]
            assert stats["connected"] is False
            assert stats["notifications_total"] == 3
            assert stats["gaps_total"] == 0

    run(main)


def test_callback_receives_each_event_on_the_listener(pg_server: Any) -> None:
    def main() -> None:
        received: list[ListenEvent] = []

        def on_event(event: ListenEvent) -> None:
            received.append(event)

        with make(pg_server.url) as db, db.listen("cb_chan", callback=on_event):
            notify(pg_server.url, "cb_chan", ["x", "y"])
            give_up_at = time.monotonic() + 5
            while len(received) < 2 and time.monotonic() < give_up_at:
                sleep(0.02)
        assert notes_of(received) == [("cb_chan", "x"), ("cb_chan", "y")]

    run(main)


@dataclass
class Outage:
    """What the controller thread saw, in monotonic seconds."""

    began: float = 0.0  # the restart (or the kill) was started
    accepting: float = 0.0  # first probe connect that succeeded after the outage began
    error: BaseException | None = None


def restart_and_probe(server: PostgresServer, mode: str, down: float, outage: Outage) -> None:
    """Stop *server* with *mode*, start it again *down* seconds later, and record when it
    accepts (a thread)."""
    try:
        outage.began = time.monotonic()
        server.stop(mode)  # type: ignore[arg-type]
        time.sleep(down)
        starter = threading.Thread(target=server.start, name="server-start", daemon=True)
        starter.start()
        give_up_at = time.monotonic() + 30
        while time.monotonic() < give_up_at:
            attempt_began = time.monotonic()
            try:
                psycopg.connect(server.url, connect_timeout=2).close()
            except psycopg.OperationalError:
                time.sleep(0.002)
                continue
            # When the attempt that succeeded began: the stricter of the two ends.
            outage.accepting = attempt_began
            break
        starter.join(30)
    except BaseException as exc:
        outage.error = exc


class Sender(threading.Thread):
    """Sends ``c-<n>`` on one channel every few ms through the whole outage, on its own
    connection (reconnecting while the server is down), and records when each send
    began: one that began after the gap was received must arrive."""

    def __init__(self, url: str, channel: str) -> None:
        super().__init__(name="notify-sender", daemon=True)
        self.url = url
        self.channel = channel
        self.began: dict[str, float] = {}  # payload -> when its send began
        self.stop = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                payload = f"c-{n}"
                self.began[payload] = time.monotonic()
                n += 1
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.005)
        if conn is not None:
            conn.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("fault", "down"),
    [
        pytest.param("fast", 0.0, id="fast-restart"),
        pytest.param("immediate", 0.0, id="immediate-restart"),
        # Down long enough for many reconnect attempts: the backoff's cap decides.
        pytest.param("fast", 2.0, id="fast-down-2s"),
        pytest.param("terminate", 0.0, id="terminate-listener"),
    ],
)
def test_listen_survives_an_outage_with_exactly_one_gap(
    pg_server_factory: Any, fault: str, down: float
) -> None:
    server: PostgresServer = pg_server_factory()

    def main() -> None:
        with make(server.url) as db, db.listen(*CHANNELS) as sub:
            before = send_batch(server.url, "before")
            events = collect(sub, len(before), 10)
            assert sorted(notes_of(events)) == sorted(before)
            pid = db.stats()["listen"]["backend_pid"]
            sender = Sender(server.url, CHANNELS[0])
            sender.start()
            sleep(0.2)  # some continuous sends while connected, before the fault
            outage = Outage()
            if fault == "terminate":
                outage.began = time.monotonic()
                rows = server.execute("SELECT pg_terminate_backend(%s)", (pid,))
                assert rows == [(True,)]
                outage.accepting = outage.began  # the server accepted all along
            else:
                controller = threading.Thread(
                    target=restart_and_probe, args=(server, fault, down, outage), daemon=True
                )
                controller.start()
            give_up_at = time.monotonic() + 40
            gap: ListenEvent | None = None
            while gap is None and time.monotonic() < give_up_at:
                event = sub.get(timeout=give_up_at - time.monotonic())
                if isinstance(event, Gap):
                    gap = event
                elif event is not None:
                    events.append(event)
            gap_at = time.monotonic()
            if fault != "terminate":
                while controller.is_alive():  # the probe may still be joining the starter
                    sleep(0.01)
            assert outage.error is None, outage.error
            assert isinstance(gap, Gap), "no gap event"
            events.append(gap)
            assert set(gap.channels) == set(CHANNELS)
            assert gap.since >= time.time() - 60
            assert outage.accepting > 0
            resumed_after = gap_at - outage.accepting
            failed = db.stats()["listen"]["connect_failures_total"]
            print(
                f"{fault} (down {down} s): listening resumed {resumed_after * 1000:.0f} ms "
                f"after accepting ({failed} failed connects meanwhile)"
            )
            assert resumed_after <= RESUME
            stats = db.stats()["listen"]
            assert stats["connected"] is True
            assert stats["backend_pid"] != pid
            after = send_batch(server.url, "after")
            sleep(0.2)
            sender.stop.set()
            sender.join(10)
            # Everything sent is in by now (same host); a half second more for stragglers.
            while (event := sub.get(timeout=0.5)) is not None:
                events.append(event)
            assert sum(isinstance(e, Gap) for e in events) == 1  # one gap for one outage
            counts = Counter(notes_of(events))
            assert set(counts.values()) == {1}  # nothing twice
            received = set(counts)
            assert before | after <= received
            continuous = {(CHANNELS[0], p) for p in sender.began}
            assert received <= before | after | continuous  # nothing made up
            since_gap = {(CHANNELS[0], p) for p, t in sender.began.items() if t >= gap_at}
            assert len(since_gap) >= 10  # the check below is not vacuous
            assert since_gap <= received  # everything sent after the gap arrived
            stats = db.stats()["listen"]
            assert stats["gaps_total"] == 1
            assert stats["reconnects_total"] == 1
            assert stats["last_gap_at"] is not None

    run(main)


def test_close_ends_subscriptions_and_leaves_nothing_behind(pg_server: Any) -> None:
    def main() -> None:
        baseline = live_workers()
        db = make(pg_server.url)
        sub = db.listen("closing_chan").open()
        pid = db.stats()["listen"]["backend_pid"]
        assert live_workers() > baseline

        def drain() -> int:
            seen = 0
            for _ in sub:
                seen += 1
            return seen

        reader = spawn(drain)
        notify(pg_server.url, "closing_chan", ["one"])
        sleep(0.3)
        db.close(timeout=5)
        assert gather(reader) == [1]  # iteration ended at close
        assert sub.closed
        assert db.stats()["listen"]["connected"] is False
        assert not backend_alive(pg_server, pid)
        give_up_at = time.monotonic() + 2
        while live_workers() > baseline and time.monotonic() < give_up_at:
            sleep(0.02)
        assert live_workers() <= baseline
        with pytest.raises(HandleClosed):
            db.listen("closing_chan").open()

    run(main)


def test_open_gives_up_at_its_timeout_when_the_server_is_down(pg_server_factory: Any) -> None:
    server: PostgresServer = pg_server_factory()
    url = server.url
    server.stop("fast")

    def main() -> None:
        with make(url, connect_timeout=1.0) as db:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                db.listen("down_chan", timeout=0.5).open()
            assert time.monotonic() - started < 1.5
            assert server.password not in str(info.value)
            stats = db.stats()["listen"]
            assert stats["subscribers"] == 0
            assert stats["connect_failures_total"] >= 1

    run(main)


def check_after_gap(
    db: Database, sub: Any, url: str, first: list[ListenEvent], gap: ListenEvent | None
) -> None:
    """After the gap: a new batch arrives, and over the whole run every notification
    arrived exactly once, with exactly one gap."""
    assert isinstance(gap, Gap), gap
    before = set(notes_of(first))
    after = send_batch(url, "after")
    rest = collect(sub, len(after), 10)
    assert sub.get(timeout=0.5) is None  # no duplicate, no second gap
    events = [*first, gap, *rest]
    assert sum(isinstance(e, Gap) for e in events) == 1
    counts = Counter(notes_of(events))
    assert set(counts) == before | after
    assert set(counts.values()) == {1}
    assert db.stats()["listen"]["gaps_total"] == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_listen_finds_a_silent_network_by_its_heartbeat(
    pg_server: Any, fault_proxy: FaultProxy
) -> None:
    # The listener's connection goes silent for good (a partition, a vanished host);
    # new connections work. Only the heartbeat, cut at connect_timeout, can tell.
    def main() -> None:
        url = fault_proxy.url_for(pg_server.url)
        with make(url, connect_timeout=1.0) as db, db.listen(*CHANNELS) as sub:
            send_batch(pg_server.url, "before")
            first = collect(sub, BATCH, 10)
            assert len(notes_of(first)) == BATCH
            silenced = time.monotonic()
            fault_proxy.swallow()
            fault_proxy.heal()  # the swallowed connection stays silent; new ones work
            gap = sub.get(timeout=HEARTBEAT + 10)
            found_after = time.monotonic() - silenced
            print(f"silent network: gap after {found_after:.2f} s")
            assert found_after <= HEARTBEAT + 1.0 + 1.5  # heartbeat, its bound, slack
            check_after_gap(db, sub, pg_server.url, first, gap)

    run(main)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("demote", ["fence", "crash"])
def test_listen_follows_a_failover(standby_pair_factory: Any, demote: str) -> None:
    pair: StandbyPair = standby_pair_factory()
    url = pair.url  # both nodes, target_session_attrs=read-write

    def main() -> None:
        with make(url) as db, db.listen(*CHANNELS) as sub:
            send_batch(url, "before")
            first = collect(sub, BATCH, 10)
            assert len(notes_of(first)) == BATCH
            done: list[Any] = []
            mover = threading.Thread(
                target=lambda: done.append(pair.failover(demote)),  # type: ignore[arg-type]
                daemon=True,
            )
            mover.start()
            gap = sub.get(timeout=HEARTBEAT + 30)
            gap_at = time.monotonic()
            while mover.is_alive():
                sleep(0.01)
            assert done, "failover() failed"
            resumed_after = gap_at - done[0].promoted_at
            print(f"failover {demote}: listening resumed {resumed_after:.2f} s after promotion")
            # A crash breaks the connection at once; a fence leaves it open and silent,
            # so only the heartbeat (every HEARTBEAT quiet seconds) finds it.
            bound = RESUME if demote == "crash" else HEARTBEAT + 1.0
            assert resumed_after <= bound
            check_after_gap(db, sub, url, first, gap)

    run(main)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_write_refused_by_a_fenced_primary_moves_the_listener_at_once(
    standby_pair_factory: Any,
) -> None:
    """A fence leaves the listener's session open and silent; the handle's own 25006
    (a write the fenced primary refused) makes the listener check its server at its
    next poll instead of at its next heartbeat."""
    pair: StandbyPair = standby_pair_factory()
    url = pair.url  # both nodes, target_session_attrs=read-write

    def main() -> None:
        with make(url) as db, db.listen(*CHANNELS) as sub:
            db.execute("CREATE TABLE pgw_writes (n int)")
            send_batch(url, "before")
            first = collect(sub, BATCH, 10)
            assert len(notes_of(first)) == BATCH
            done: list[Any] = []
            mover = threading.Thread(
                target=lambda: done.append(pair.failover("fence")),
                daemon=True,
            )
            writing = True

            def write_until_the_gap() -> int:
                writes = 0
                while writing:
                    # Refused (25006) by the fenced primary, then re-sent to the new one.
                    db.execute("INSERT INTO pgw_writes VALUES (1)", timeout=10)
                    writes += 1
                    sleep(0.05)
                return writes

            writer = spawn(write_until_the_gap)
            mover.start()
            gap = sub.get(timeout=HEARTBEAT + 30)
            gap_at = time.monotonic()
            writing = False
            writes = (gather(writer))[0]
            while mover.is_alive():
                sleep(0.01)
            assert done, "failover() failed"
            resumed_after = gap_at - done[0].promoted_at
            print(f"fence with writes ({writes}): listening resumed {resumed_after:.2f} s after")
            assert isinstance(gap, Gap)
            # Without the hook the fence is found by the heartbeat alone (HEARTBEAT s).
            assert resumed_after <= HEARTBEAT / 2
            check_after_gap(db, sub, url, first, gap)

    run(main)


def test_a_serverless_snapshot_ends_subscriptions_and_cuts_the_listener(pg_server: Any) -> None:
    # before_snapshot() forgets the handle's state; no session may outlive it.
    import pgwarden.serverless

    def main() -> None:
        with make(pg_server.url) as db:
            sub = db.listen("snap_chan").open()
            pid = db.stats()["listen"]["backend_pid"]
            pgwarden.serverless.before_snapshot(handles=[db])
            assert sub.get(timeout=2) is None
            assert sub.closed
            give_up_at = time.monotonic() + 3
            while backend_alive(pg_server, pid) and time.monotonic() < give_up_at:
                sleep(0.05)
            assert not backend_alive(pg_server, pid)
            # The handle listens again after the reset, on a new connection.
            with db.listen("snap_chan") as again:
                notify(pg_server.url, "snap_chan", ["after"])
                assert notes_of(collect(again, 1, 5)) == [("snap_chan", "after")]

    run(main)
