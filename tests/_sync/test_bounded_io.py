# WARNING: generated from tests/_async/test_bounded_io.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""Every byte under the deadline: a connection that goes silent in any phase of a call costs
the caller its deadline and no more, and the handle serves again within 1 s of the network
healing.

The fault is ``FaultProxy.swallow()``: every connection open at that moment drops all bytes
for good (the proxy's kernel still ACKs, so TCP keepalives and ``tcp_user_timeout`` never
fire, and ``heal()`` does not revive it), and new connections are accepted and never
answered. Each test places it in one phase, says in a comment how, and checks the
placement (``FaultProxy.swallowed`` holds what the client sent into the void;
``pg_stat_activity`` shows what the server saw) before judging the handle.

Every call runs under ``pgwarden.deadline()`` and must return or raise within its deadline
plus ``SLACK``. A call still running ``HANG`` seconds past its deadline is reported as hung
and left behind; closing the proxy at the end of the test (which ends swallowed
connections) lets it finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

import pgwarden
from pgwarden import (
    AmbiguousCommitError,
    Database,
    DatabaseUnavailable,
    DeadlineExceeded,
    Settings,
)
from pgwarden.testing import FaultProxy, PostgresServer

from ._compat import gather, run, sleep, spawn

T = TypeVar("T")

pytestmark = [pytest.mark.proxy, pytest.mark.timeout(60)]

DEADLINE = 1.0  # the deadline of the call that meets the fault
SLACK = 0.1  # every call returns or raises within its deadline + SLACK
RECOVERY = 1.0  # after heal(), the first success comes within this
POLL_DEADLINE = 0.2  # deadline of each call that polls for recovery
POLL_FOR = 10.0  # give up polling for recovery after this long
HANG = 3.0  # still running this long past its deadline: reported as hung, left behind
LINGER = 6.0  # at the end, calls that hung get this long to end on their own (reported)
OUTLAST = 0.3  # the silence outlasts the failed call by this long before heal()

# The first message of a PostgreSQL connection: SSLRequest, GSSENCRequest or a v3 startup.
OPENING_CODES = (b"\x04\xd2\x16\x2f", b"\x04\xd2\x16\x30", b"\x00\x03\x00\x00")


@dataclass
class Call:
    label: str
    budget: float
    started: float
    elapsed: float | None = None  # None while it runs
    finished: float | None = None
    error: BaseException | None = None
    hung: bool = False  # still running HANG s past its deadline (it may end later)

    @property
    def ok(self) -> bool:
        return not self.hung and self.elapsed is not None and self.error is None

    @property
    def outcome(self) -> str:
        if self.hung or self.elapsed is None:
            ended = "" if self.error is None else f"; later {type(self.error).__name__}"
            return f"hung (still running {HANG:.0f}s past its deadline{ended})"
        if self.error is None:
            return "ok"
        text = str(self.error).splitlines()[0] if str(self.error) else ""
        return f"{type(self.error).__name__}({text[:120]})"

    ended_alone: bool | None = None  # for a hung call: did it end before the proxy closed?

    def describe(self) -> str:
        took = f">{self.budget + HANG:.1f}s" if self.hung else f"{self.elapsed or 0:.3f}s"
        text = f"{self.label}: {self.outcome} after {took} (deadline {self.budget}s)"
        if self.hung and self.ended_alone and self.elapsed is not None:
            text += f", ended on its own after {self.elapsed:.3f}s"
        elif self.hung and self.ended_alone is not None:
            text += f", still running {HANG + LINGER:.0f}s past its deadline (ended by proxy close)"
        return text


@dataclass
class Calls:
    """Every call a test makes, timed; calls that hung are kept to be joined at the end."""

    calls: list[Call] = field(default_factory=list)
    stragglers: list[Any] = field(default_factory=list)

    def call(self, label: str, budget: float, fn: Callable[[], T]) -> Call:
        """Run ``fn()`` under ``pgwarden.deadline(budget)`` and time it (monotonic clock)."""
        call = Call(label, budget, time.monotonic())
        self.calls.append(call)

        def body() -> None:
            started = time.monotonic()
            try:
                with pgwarden.deadline(budget):
                    fn()
            except Exception as exc:
                call.error = exc
            finally:
                call.finished = time.monotonic()
                call.elapsed = call.finished - started

        task = spawn(body)
        give_up = call.started + budget + HANG
        while call.elapsed is None and time.monotonic() < give_up:
            sleep(0.005)
        if call.elapsed is None:
            call.hung = True
            self.stragglers.append(task)
        else:
            gather(task)
        return call

    def late(self) -> list[str]:
        return [
            c.describe()
            for c in self.calls
            if c.hung or c.elapsed is None or c.elapsed > c.budget + SLACK
        ]


def recover(calls: Calls, db: Database, healed_at: float) -> float | None:
    """Poll with short deadlines; seconds from heal() to the end of the first success."""
    while time.monotonic() - healed_at < POLL_FOR:
        call = calls.call("after heal", POLL_DEADLINE, lambda: db.fetchval("SELECT 1"))
        if call.ok and call.finished is not None:
            return call.finished - healed_at
        sleep(0.01)
    return None


def finish(calls: Calls, db: Database, proxy: FaultProxy) -> None:
    """Give calls that hung LINGER s to end on their own, then close the proxy (which ends
    the swallowed connections, so whatever still waits on them returns) and the handle."""
    hung = [c for c in calls.calls if c.hung]
    give_up = time.monotonic() + LINGER
    while any(c.finished is None for c in hung) and time.monotonic() < give_up:
        sleep(0.01)
    for c in hung:
        c.ended_alone = c.finished is not None
    proxy.close()
    gather(*calls.stragglers, return_exceptions=True)
    db.close()


def outlast() -> None:
    """Keep the network silent OUTLAST s past the failed call, then the caller heals.

    Whatever the handle starts right after the failure (a replacement connection, a pool
    check) then meets the silence too; without this, whether it does is a race."""
    sleep(OUTLAST)


def judge(
    phase: Call,
    expected: tuple[type[BaseException], ...],
    calls: Calls,
    recovery: float | None,
    placement: list[str],
    notes: str = "",
) -> None:
    """Placement first (a failure there is the test's fault), then the handle's behaviour."""
    took = "never" if recovery is None else f"{recovery:.3f}s"
    summary = f"{phase.describe()}; first success {took} after heal ({len(calls.calls)} calls)" + (
        f"; {notes}" if notes else ""
    )
    print(summary)
    assert not placement, "the fault was not placed as intended: " + "; ".join(placement)
    problems: list[str] = []
    if not phase.hung and not isinstance(phase.error, expected):
        names = " or ".join(e.__name__ for e in expected)
        problems.append(f"{phase.label}: expected {names}, got {phase.outcome}")
    problems += [f"not within deadline + {SLACK}s: {d}" for d in calls.late()]
    if recovery is None or recovery > RECOVERY:
        problems.append(f"no success within {RECOVERY}s of heal() (first success: {took})")
    assert not problems, "\n".join([*problems, summary])


def make(proxy: FaultProxy, server: PostgresServer, app: str, **overrides: Any) -> Database:
    # validation_window=30: a pooled connection is never validated in these tests unless a
    # test asks for it, so the phase under test is the first thing sent after swallow().
    options: dict[str, Any] = {"max_size": 4, "validation_window": 30.0}
    options.update(overrides)
    return Database(Settings(url=proxy.url_for(server.url), application_name=app, **options))


def app_backends(server: PostgresServer, app: str) -> list[tuple[Any, ...]]:
    """(pid, state, query) of the handle's sessions, as the server sees them."""
    return server.execute(
        "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
        [app],
    )


class SwallowWhenActive(threading.Thread):
    """``proxy.swallow()`` as soon as the server runs a statement of *app* matching
    *pattern* (``LIKE``); then checks it is still running, so its answer is what the proxy
    swallows. A thread, so it also works while an async test's loop waits on the call."""

    def __init__(self, server: PostgresServer, proxy: FaultProxy, app: str, pattern: str):
        super().__init__(name="swallow-when-active", daemon=True)
        self.server, self.proxy, self.app, self.pattern = server, proxy, app, pattern
        self.seen: str | None = None
        self.running_after_swallow = False

    def _active(self) -> str | None:
        rows = self.server.execute(
            "SELECT query FROM pg_stat_activity"
            " WHERE application_name = %s AND state = 'active' AND query LIKE %s",
            [self.app, self.pattern],
        )
        return str(rows[0][0]) if rows else None

    def run(self) -> None:
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:
            query = self._active()
            if query is not None:
                self.proxy.swallow()
                self.seen = query
                self.running_after_swallow = self._active() is not None
                return
            time.sleep(0.002)

    def placement(self) -> list[str]:
        self.join(15)
        if self.seen is None:
            return [f"the server never ran a statement LIKE {self.pattern!r}"]
        if not self.running_after_swallow:
            return [f"{self.seen!r} had finished before swallow() took effect"]
        return []


class SwallowAfterCut(threading.Thread):
    """``proxy.swallow()`` as soon as an armed ``cut_on`` has cut its connection."""

    def __init__(self, proxy: FaultProxy):
        super().__init__(name="swallow-after-cut", daemon=True)
        self.proxy = proxy
        self.lag: float | None = None  # seconds from seeing the cut to swallow() returning

    def run(self) -> None:
        cuts = self.proxy.cuts
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:
            if self.proxy.cuts > cuts:
                seen = time.monotonic()
                self.proxy.swallow()
                self.lag = time.monotonic() - seen
                return
            time.sleep(0.001)


def swallow_report(proxy: FaultProxy) -> str:
    """What the client sent into the silence: connection openings and other chunks."""
    chunks = proxy.swallowed
    openings = sum(c[4:8] in OPENING_CODES for c in chunks)
    first = next((c[:60] for c in chunks if c[4:8] not in OPENING_CODES), None)
    return (
        f"swallowed {openings} connection opening(s) and {len(chunks) - openings} other"
        f" chunk(s), the first {first!r}"
    )


def warm(db: Database) -> None:
    """Ready, and one pooled connection that has just been used."""
    db.ready()
    assert db.fetchval("SELECT 1") == 1


# --- the phases -------------------------------------------------------------------------------


def heal_and_recover(
    calls: Calls, db: Database, fault_proxy: FaultProxy
) -> tuple[str, float | None]:
    """Keep the silence a little longer, note what it swallowed, heal, and time the
    handle's first success after healing."""
    outlast()
    report = swallow_report(fault_proxy)
    fault_proxy.heal()
    return report, recover(calls, db, time.monotonic())


def test_connect(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """The handle's very first connect (its warmup) meets a server that never answers."""
    app = "pgw-bounded-connect"
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            # Placement: swallow() before the first call, so the warmup's TCP connect is
            # accepted and its first message (SSLRequest or startup) goes nowhere.
            fault_proxy.swallow()
            phase = calls.call("connect", DEADLINE, lambda: db.fetchval("SELECT 1"))
            swallowed = fault_proxy.swallowed
            placement = []
            if not swallowed or swallowed[0][4:8] not in OPENING_CODES:
                placement.append(f"first swallowed chunk is not a connection opening: {swallowed}")
            if app_backends(pg_server, app):
                placement.append("a session reached the server despite swallow()")
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        judge(phase, (DeadlineExceeded,), calls, recovery, placement, report)

    run(main)


def test_begin(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """BEGIN of a transaction is sent on a pooled connection that has gone silent."""
    app = "pgw-bounded-begin"
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            warm(db)
            # Placement: the one pooled connection is idle (and recently used, so not
            # validated) when swallow() silences it; the first bytes then sent on it are the
            # transaction's BEGIN.
            fault_proxy.swallow()

            def transaction() -> None:
                with db.transaction() as tx:
                    tx.fetchval("SELECT 'bounded-begin body'")

            phase = calls.call("BEGIN", DEADLINE, transaction)
            swallowed = fault_proxy.swallowed
            placement = []
            if not swallowed or b"BEGIN" not in swallowed[0]:
                placement.append(f"the first swallowed chunk is not BEGIN: {swallowed[:1]}")
            if any(b"bounded-begin body" in chunk for chunk in swallowed):
                placement.append("the transaction body was sent: BEGIN was answered")
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        judge(phase, (DeadlineExceeded,), calls, recovery, placement, report)

    run(main)


def test_read(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """A plain read is running on the server when the network goes silent."""
    app = "pgw-bounded-read"
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            warm(db)
            # Placement: the statement sleeps 0.3 s on the server; a thread swallows as
            # soon as pg_stat_activity shows it running, and checks it is still running
            # after, so the answer (and everything after) is what goes nowhere.
            watcher = SwallowWhenActive(pg_server, fault_proxy, app, "%bounded-read%")
            watcher.start()
            phase = calls.call(
                "read",
                DEADLINE,
                lambda: db.fetchval("SELECT 'bounded-read' FROM pg_sleep(0.3)"),
            )
            placement = watcher.placement()
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        judge(phase, (DeadlineExceeded,), calls, recovery, placement, report)

    run(main)


def test_write(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """A write is running on the server when the network goes silent; it never commits."""
    app = "pgw-bounded-write"
    table = "bounded_io_write"
    pg_server.execute(f"DROP TABLE IF EXISTS {table}")
    pg_server.execute(f"CREATE TABLE {table} (tag text)")
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            warm(db)
            # Placement: as for the read, the INSERT sleeps 0.3 s on the server and is
            # swallowed while it runs. Under a deadline the handle sends BEGIN first and
            # COMMIT only after the INSERT's answer, which never comes: nothing commits.
            watcher = SwallowWhenActive(pg_server, fault_proxy, app, "%bounded-write%")
            watcher.start()
            phase = calls.call(
                "write",
                DEADLINE,
                lambda: db.execute(
                    f"INSERT INTO {table} SELECT 'bounded-write' FROM pg_sleep(0.3)"
                ),
            )
            placement = watcher.placement()
            # The swallowed session is still open on the server, inside its transaction.
            states = [row[1] for row in app_backends(pg_server, app)]
            if "idle in transaction" not in states:
                placement.append(f"no session left idle in the transaction: {states}")
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        judge(phase, (DeadlineExceeded,), calls, recovery, placement, report)

    try:
        run(main)
        assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(0,)]
    finally:
        pg_server.execute(f"DROP TABLE IF EXISTS {table}")


def test_commit(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """COMMIT is running on the server when the network goes silent: the outcome is unknown
    to the client, and resolving it cannot reach the server either."""
    app = "pgw-bounded-commit"
    table = "bounded_io_commit"
    pg_server.execute(f"DROP TABLE IF EXISTS {table}")
    pg_server.execute(f"CREATE TABLE {table} (id int)")
    # A deferred constraint trigger runs at COMMIT: it makes COMMIT take 0.3 s on the server.
    pg_server.execute(
        "CREATE OR REPLACE FUNCTION bounded_io_slow_commit() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$"
    )
    pg_server.execute(
        f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table}"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bounded_io_slow_commit()"
    )
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            warm(db)
            # Placement: a thread swallows as soon as pg_stat_activity shows the session's
            # COMMIT running (in the trigger's sleep) and checks it still runs after: the
            # server commits, its answer goes nowhere, and so does every later byte,
            # including the txid_status() lookup on a new connection.
            watcher = SwallowWhenActive(pg_server, fault_proxy, app, "COMMIT")

            def transaction() -> None:
                with db.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (1)")
                    watcher.start()

            phase = calls.call("COMMIT", DEADLINE, transaction)
            placement = watcher.placement()
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        # The outcome is unknown to the client (the server did commit): AmbiguousCommitError
        # is the honest answer; DeadlineExceeded would invite a blind re-run.
        judge(phase, (AmbiguousCommitError,), calls, recovery, placement, report)

    try:
        run(main)
        assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(1,)]
    finally:
        pg_server.execute(f"DROP TABLE IF EXISTS {table}")
        pg_server.execute("DROP FUNCTION IF EXISTS bounded_io_slow_commit()")


def test_commit_resolution(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """COMMIT is cut after the server committed; the txid_status() lookup that should tell
    the outcome then meets a silent network."""
    app = "pgw-bounded-resolve"
    table = "bounded_io_resolve"
    pg_server.execute(f"DROP TABLE IF EXISTS {table}")
    pg_server.execute(f"CREATE TABLE {table} (id int)")
    calls = Calls()
    cutter = SwallowAfterCut(fault_proxy)

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            warm(db)

            # Placement: at the end of the body, 0.1 s latency and a cut after COMMIT. The
            # proxy forwards COMMIT, reads the server's answer and closes the connection
            # without relaying it. A thread swallows within a few ms of the cut, while the
            # latency still holds back whatever the client sends next (a new connection's
            # startup or txid_status() itself), so the lookup is what gets swallowed.
            def transaction() -> None:
                with db.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (1)")
                    fault_proxy.set_latency(0.1)
                    fault_proxy.cut_on(b"COMMIT", when="after")
                    cutter.start()

            phase = calls.call("commit resolution", DEADLINE, transaction)
            cutter.join(15)
            swallowed = fault_proxy.swallowed
            placement = []
            if cutter.lag is None:
                placement.append("the COMMIT was never cut")
            lookup = [c for c in swallowed if b"txid_status" in c or c[4:8] in OPENING_CODES]
            if not lookup:
                placement.append(f"no lookup (or connection for one) was swallowed: {swallowed}")
            seen = [row for row in app_backends(pg_server, app) if "txid_status" in row[2]]
            if seen:
                placement.append(f"txid_status() reached the server: {seen}")
            report, recovery = heal_and_recover(calls, db, fault_proxy)
            ambiguous = db.stats()["counters"]["ambiguous_commits"]
        finally:
            finish(calls, db, fault_proxy)
        lag = "-" if cutter.lag is None else f"{cutter.lag * 1000:.1f}ms"
        judge(
            phase,
            (AmbiguousCommitError,),
            calls,
            recovery,
            placement,
            notes=f"swallow {lag} after the cut; ambiguous_commits={ambiguous}; {report}",
        )

    try:
        run(main)
        assert pg_server.execute(f"SELECT count(*) FROM {table}") == [(1,)]
    finally:
        pg_server.execute(f"DROP TABLE IF EXISTS {table}")


def test_validation(pg_server: PostgresServer, fault_proxy: FaultProxy) -> None:
    """The check of a connection idle past validation_window meets a silent network."""
    app = "pgw-bounded-validate"
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app, validation_window=0.5)
        try:
            warm(db)
            # Placement: the pooled connection idles 0.8 s, past the 0.5 s window, and is
            # swallowed; the next call must validate it before sending its statement, so the
            # first swallowed bytes are the validation, not the statement.
            sleep(0.8)
            fault_proxy.swallow()
            phase = calls.call(
                "validation", DEADLINE, lambda: db.fetchval("SELECT 'bounded-validate'")
            )
            swallowed = fault_proxy.swallowed
            placement = []
            if not swallowed:
                placement.append("nothing was sent on the idle connection")
            report, recovery = heal_and_recover(calls, db, fault_proxy)
        finally:
            finish(calls, db, fault_proxy)
        problems = []
        if swallowed and b"bounded-validate" in swallowed[0]:
            problems.append(f"the idle connection was not validated: {swallowed[0]!r}")
        assert not problems, problems
        judge(phase, (DeadlineExceeded,), calls, recovery, placement, report)

    run(main)


def test_silent_connections_are_never_handed_out_again(
    pg_server: PostgresServer, fault_proxy: FaultProxy
) -> None:
    """After swallow() and heal(), 50 sequential queries with 0.5 s deadlines all succeed."""
    app = "pgw-bounded-never-again"
    calls = Calls()

    def main() -> None:
        db = make(fault_proxy, pg_server, app)
        try:
            db.ready()

            def hold() -> None:
                db.fetchval("SELECT pg_sleep(0.2)")

            gather(*[spawn(hold) for _ in range(4)])
            opened = len(app_backends(pg_server, app))
            # Placement: four pooled connections (max_size) go silent at once. Four
            # concurrent calls take one each and meet the silence; two more calls then need
            # connections of their own, whose startup is swallowed too. Then heal().
            fault_proxy.swallow()

            def silent(i: int) -> None:
                calls.call(f"silent {i}", 0.5, lambda: db.fetchval("SELECT 'silent'"))

            gather(*[spawn(silent, (i,)) for i in range(4)])
            for i in range(4, 6):
                silent(i)
            swallowed = fault_proxy.swallowed
            outlast()
            fault_proxy.heal()
            healed_at = time.monotonic()
            for i in range(50):
                calls.call(f"after heal {i}", 0.5, lambda: db.fetchval("SELECT 1"))
        finally:
            finish(calls, db, fault_proxy)
        statements = sum(b"silent" in chunk for chunk in swallowed)
        placement = []
        if opened < 4 or statements < 4:
            placement.append(f"{opened} pooled connections, {statements} statements swallowed")
        print(f"{opened} pooled connections silenced, {statements} statements swallowed")
        assert not placement, placement
        after = [c for c in calls.calls if c.label.startswith("after heal")]
        # Right after heal() the breaker may still be open from the swallowed connects
        # (its probe can be one of them); refusing is not handing out a silent
        # connection. Every other failure is: a silent connection reused.
        failed = [
            c.describe()
            for c in after
            if not c.ok
            and not (isinstance(c.error, DatabaseUnavailable) and c.started - healed_at < RECOVERY)
        ]
        first = next((c.finished - healed_at for c in after if c.ok and c.finished), None)
        problems = [f"{len(failed)} of 50 failed after heal: {failed[:5]}"] if failed else []
        problems += [f"not within deadline + {SLACK}s: {d}" for d in calls.late()]
        silent_outcomes = {c.outcome for c in calls.calls if c.label.startswith("silent")}
        summary = f"first success {first}s after heal; silent calls: {silent_outcomes}"
        print(summary)
        assert not problems, "\n".join([*problems, summary])

    run(main)
