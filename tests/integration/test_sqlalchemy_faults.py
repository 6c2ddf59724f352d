"""``postgresql+pgwarden`` under real faults: ORM units of work with run_transaction.

Each unit of work inserts a row (its request id; no unique constraint, so a unit of
work committed twice shows as two rows) and increments its worker's total in the same
transaction. Faults: server restarts (fast and immediate), backend kills, connections
cut at COMMIT (before and after it reaches the server), and a failover to a new
primary that leaves the old one up and read-only. After each: no unit of work failed
with deadline left, none ran twice, none acknowledged was lost, and every total
equals its worker's rows (the two writes of a unit of work were never split).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from psycopg import sql
from sqlalchemy import Engine, create_engine, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import pgwarden
from pgwarden.sqlalchemy import handle_of, run_transaction, run_transaction_async

WORKERS = 8
UNIT_DEADLINE = 10.0


class Base(DeclarativeBase):
    pass


class Write(Base):
    __tablename__ = "sa_fault_writes"
    seq: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str]
    worker: Mapped[int]


class Total(Base):
    __tablename__ = "sa_fault_totals"
    worker: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


def sa_url(url: str, **settings: object) -> str:
    query = "&".join(f"pgwarden_{k}={v}" for k, v in settings.items())
    base = url.replace("postgresql://", "postgresql+pgwarden://", 1)
    return f"{base}?{query}" if query else base


def prepare(server: Any) -> None:
    engine = create_engine(server.url.replace("postgresql://", "postgresql+psycopg://", 1))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(Total), [{"worker": w, "n": 0} for w in range(WORKERS)])
    engine.dispose()


@dataclass
class Failure:
    request_id: str
    error: BaseException
    left: float  # seconds of its deadline left when it failed


@dataclass
class Outcome:
    acked: list[tuple[int, str]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)


def check(server: Any, outcome: Outcome, *, floor: int, crash: bool = False) -> None:
    """No unit of work failed, ran twice, was lost once acknowledged, or was split.

    *crash*: the server was killed outright (restart immediate). For a COMMIT in flight
    ``txid_status()`` may then say "committed" about someone else's transaction: an id
    assigned but never logged before the crash is handed out again after it (these
    runs show it: some such units of work are not in the table). pgwarden does not
    trust "committed" across a restart: `AmbiguousCommitError`, never re-run. Those
    units of work are allowed here; each committed at most once.
    """
    rows = server.execute(f"SELECT request_id, worker FROM {Write.__tablename__}")
    counts = Counter(r[0] for r in rows)
    per_worker = Counter(r[1] for r in rows)
    totals = dict(server.execute(f"SELECT worker, n FROM {Total.__tablename__}"))
    unknown = [
        f
        for f in outcome.failures
        if crash and isinstance(f.error, pgwarden.AmbiguousCommitError) and f.left > 0
    ]
    failed = [f"{type(f.error).__name__}: {f.error}" for f in outcome.failures if f not in unknown]
    assert failed == []  # every unit of work succeeded within its deadline
    assert {k: v for k, v in counts.items() if v > 1} == {}  # none committed twice
    assert [r for _, r in outcome.acked if r not in counts] == []  # no acknowledged one lost
    unacknowledged = set(counts) - {r for _, r in outcome.acked}
    assert unacknowledged <= {f.request_id for f in unknown}  # only ambiguous ones landed
    assert totals == {w: per_worker.get(w, 0) for w in range(WORKERS)}  # never split
    assert len(outcome.acked) >= floor


async def fault_loop(
    fault: str, server: Any, proxy: Any, seconds: float, stop: asyncio.Event
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.6)
        if fault in ("fast", "immediate"):
            await asyncio.to_thread(server.restart, fault)
        elif fault == "kill":
            await asyncio.to_thread(server.terminate_backends)
        else:  # cut-before / cut-after
            proxy.cut_on(b"COMMIT", when=fault.removeprefix("cut-"))
    stop.set()


FAULTS = ["fast", "immediate", "kill", "cut-before", "cut-after"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_async_orm_units_of_work_survive_faults(
    pg_server_factory: Any, fault_proxy_factory: Any, fault: str
) -> None:
    server = pg_server_factory()
    prepare(server)
    proxy = fault_proxy_factory(server.host, server.port)
    url = sa_url(proxy.url_for(server.url), max_size=4)
    outcome = Outcome()

    async def main() -> Mapping[str, Any]:
        engine = create_async_engine(url)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        stop = asyncio.Event()

        def unit_of_work(w: int, request_id: str) -> Callable[[AsyncSession], Awaitable[str]]:
            async def unit(session: AsyncSession) -> str:
                outcome.calls[request_id] += 1
                session.add(Write(request_id=request_id, worker=w))
                await session.execute(update(Total).where(Total.worker == w).values(n=Total.n + 1))
                return request_id

            return unit

        async def worker(w: int) -> None:
            while not stop.is_set():
                request_id = str(uuid.uuid4())
                started = time.monotonic()
                try:
                    await run_transaction_async(
                        sessions, unit_of_work(w, request_id), timeout=UNIT_DEADLINE
                    )
                except Exception as exc:
                    left = UNIT_DEADLINE - (time.monotonic() - started)
                    outcome.failures.append(Failure(request_id, exc, left))
                    await asyncio.sleep(0.01)
                else:
                    outcome.acked.append((w, request_id))

        await asyncio.gather(
            *(worker(w) for w in range(WORKERS)), fault_loop(fault, server, proxy, 3.0, stop)
        )
        db = handle_of(engine)
        assert isinstance(db, pgwarden.AsyncDatabase)
        stats = db.stats()
        await engine.dispose()
        await db.close()
        return stats

    stats = asyncio.run(main())
    check(server, outcome, floor=50, crash=fault == "immediate")
    ambiguous = stats["counters"]["ambiguous_commits"]
    if fault == "cut-after":
        assert proxy.cuts >= 2
        assert ambiguous.get("committed", 0) >= 2  # resolved by txid: not re-run
        assert ambiguous.get("unknown", 0) == 0
    if fault == "cut-before":
        assert proxy.cuts >= 2
        assert ambiguous.get("aborted", 0) >= 2  # resolved as aborted: re-run once
    if fault != "cut-after":
        # Some unit of work was re-run (the fault hit a transaction in progress).
        assert max(outcome.calls.values()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["immediate", "kill", "cut-after"])
def test_sync_orm_units_of_work_survive_faults_on_threads(
    pg_server_factory: Any, fault_proxy_factory: Any, fault: str
) -> None:
    server = pg_server_factory()
    prepare(server)
    proxy = fault_proxy_factory(server.host, server.port)
    engine = create_engine(sa_url(proxy.url_for(server.url), max_size=4))
    sessions = sessionmaker(engine, expire_on_commit=False)
    outcome = Outcome()
    lock = threading.Lock()
    stop = threading.Event()

    def unit_of_work(w: int, request_id: str) -> Callable[[Session], str]:
        def unit(session: Session) -> str:
            with lock:
                outcome.calls[request_id] += 1
            session.add(Write(request_id=request_id, worker=w))
            session.execute(update(Total).where(Total.worker == w).values(n=Total.n + 1))
            return request_id

        return unit

    def worker(w: int) -> None:
        while not stop.is_set():
            request_id = str(uuid.uuid4())
            started = time.monotonic()
            try:
                run_transaction(sessions, unit_of_work(w, request_id), timeout=UNIT_DEADLINE)
            except Exception as exc:
                with lock:
                    left = UNIT_DEADLINE - (time.monotonic() - started)
                    outcome.failures.append(Failure(request_id, exc, left))
                time.sleep(0.01)
            else:
                with lock:
                    outcome.acked.append((w, request_id))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    try:
        asyncio.run(fault_loop(fault, server, proxy, 3.0, asyncio.Event()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    db = handle_of(engine)
    assert db is not None
    stats = db.stats()
    db.close()
    check(server, outcome, floor=50, crash=fault == "immediate")
    if fault == "cut-after":
        assert stats["counters"]["ambiguous_commits"].get("committed", 0) >= 2


def test_a_lost_commit_resolved_committed_is_not_run_again(
    pg_server: Any, fault_proxy: Any
) -> None:
    pg_server.execute("DROP TABLE IF EXISTS sa_commit_once")
    pg_server.execute("CREATE TABLE sa_commit_once (id text)")
    # A pool of one: the lost connection's slot is given back before the resolution
    # asks txid_status() on another connection.
    engine = create_engine(sa_url(fault_proxy.url_for(pg_server.url), max_size=1))
    calls = 0

    def unit(connection: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            fault_proxy.cut_on(b"COMMIT", when="after")
        connection.execute(text("INSERT INTO sa_commit_once VALUES ('x')"))
        return "done"

    assert run_transaction(engine, unit, timeout=10) == "done"
    assert calls == 1
    assert pg_server.execute("SELECT count(*) FROM sa_commit_once")[0][0] == 1
    db = handle_of(engine)
    assert db is not None
    assert db.stats()["counters"]["ambiguous_commits"] == {"committed": 1}
    assert db.stats()["in_flight"] == 0
    db.close()


def test_a_lost_commit_outside_run_transaction_raises_pgwardens_verdicts(
    pg_server: Any, fault_proxy: Any
) -> None:
    pg_server.execute("DROP TABLE IF EXISTS sa_commit_plain")
    pg_server.execute("CREATE TABLE sa_commit_plain (id text)")
    engine = create_engine(sa_url(fault_proxy.url_for(pg_server.url)))
    sessions = sessionmaker(engine)
    # Cut after: it committed; session.commit() returns normally.
    with sessions() as session:
        session.execute(text("INSERT INTO sa_commit_plain VALUES ('after')"))
        fault_proxy.cut_on(b"COMMIT", when="after")
        session.commit()
    # Cut before: certainly not committed.
    with sessions() as session:
        session.execute(text("INSERT INTO sa_commit_plain VALUES ('before')"))
        fault_proxy.cut_on(b"COMMIT", when="before")
        with pytest.raises(pgwarden.NotCommitted):
            session.commit()
    # Resolution off: an unknown outcome, never a plain connection error.
    off = create_engine(sa_url(fault_proxy.url_for(pg_server.url), resolve_commits="false"))
    with sessionmaker(off)() as session:
        session.execute(text("INSERT INTO sa_commit_plain VALUES ('off')"))
        fault_proxy.cut_on(b"COMMIT", when="after")
        with pytest.raises(pgwarden.AmbiguousCommitError):
            session.commit()
    rows = sorted(r[0] for r in pg_server.execute("SELECT id FROM sa_commit_plain"))
    assert rows == ["after", "off"]
    for e in (engine, off):
        db = handle_of(e)
        assert db is not None
        db.close()


# --- failover: the old primary stays up, read-only; the endpoint moves ---------------------


def write_unit(server_label: list[str]) -> Callable[[Session], str]:
    def unit(session: Session) -> str:
        session.add(Write(request_id=str(uuid.uuid4()), worker=0))
        session.flush()  # the INSERT: refused (25006) on the old primary
        label = session.execute(text("SELECT current_setting('cluster_name')")).scalar_one()
        server_label.append(str(label))
        return str(label)

    return unit


@pytest.mark.slow
def test_a_demoted_primary_is_left_for_the_new_one(
    pg_server_factory: Any, fault_proxy_factory: Any
) -> None:
    """A failover as managed services do it (RDS/Aurora, Patroni behind a VIP or DNS
    name): the old primary stays up but read-only, so pooled sessions to it stay open
    and answer SELECT 1 (a pre-ping passes) but refuse writes with 25006; the endpoint
    (here a TCP proxy, retargeted) sends new connections to the new primary."""
    old = pg_server_factory({"cluster_name": "old"})
    new = pg_server_factory({"cluster_name": "new"})
    same_credentials(old, new)
    proxy = fault_proxy_factory(old.host, old.port)
    engine = create_engine(sa_url(proxy.url_for(old.url), max_size=4))
    sessions = sessionmaker(engine)
    warm(engine)  # four pooled sessions to the old primary

    old.set_config(default_transaction_read_only="on")  # demoted: its sessions read-only
    proxy.target_port = new.port  # the endpoint now leads to the new primary
    labels: list[str] = []
    for _ in range(20):
        assert run_transaction(sessions, write_unit(labels), timeout=5) == "new"
    assert set(labels) == {"new"}  # the write that met the old primary never got this far
    db = handle_of(engine)
    assert db is not None
    stats = db.stats()
    assert stats["counters"]["errors"].get("failover", 0) >= 1
    # One 25006 drained the pool: every session to the old primary was closed.
    assert stats["counters"]["connections_closed"].get("failover", 0) >= 1
    assert old.execute(f"SELECT count(*) FROM {Write.__tablename__}")[0][0] == 0
    assert new.execute(f"SELECT count(*) FROM {Write.__tablename__}")[0][0] == 20
    # Without run_transaction too: a plain session write goes to the new primary.
    with sessions.begin() as session:
        write_unit(labels)(session)
    assert labels[-1] == "new"
    db.close()


@pytest.mark.slow
def test_sqlalchemys_own_pool_with_pre_ping_stays_on_the_demoted_primary(
    pg_server_factory: Any, fault_proxy_factory: Any
) -> None:
    """The same failover with QueuePool + pool_pre_ping: the contrast that makes the
    test above realistic (SELECT 1 succeeds on the old primary, so nothing moves)."""
    old = pg_server_factory({"cluster_name": "old"})
    new = pg_server_factory({"cluster_name": "new"})
    same_credentials(old, new)
    proxy = fault_proxy_factory(old.host, old.port)
    url = proxy.url_for(old.url).replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=4, pool_pre_ping=True)
    warm(engine)
    old.set_config(default_transaction_read_only="on")
    proxy.target_port = new.port
    for _ in range(10):  # stuck on the old primary until restarted
        with pytest.raises(DBAPIError) as info, sessionmaker(engine).begin() as session:
            write_unit([])(session)
        assert getattr(info.value.orig, "sqlstate", None) == "25006"
    engine.dispose()


def same_credentials(old: Any, new: Any) -> None:
    """Both nodes get the schema and the old one's password (one set of credentials)."""
    for server in (old, new):
        prepare(server)
    new.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(old.password)))


def warm(engine: Engine) -> None:
    """Open four sessions at once, so the pool holds four connections."""
    barrier = threading.Barrier(4)

    def hold() -> None:
        with engine.connect() as conn:
            conn.execute(select(1))
            barrier.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


@pytest.mark.slow
def test_a_server_that_is_down_fails_orm_calls_fast_and_they_recover(
    pg_server_factory: Any,
) -> None:
    """The breaker sees the ORM's checkouts: once it is open, a checkout fails at once
    with `DatabaseUnavailable` instead of every caller waiting out its own timeout."""
    server = pg_server_factory()
    engine = create_engine(sa_url(server.url, breaker_min_outage=0.3))
    with engine.connect() as conn:
        conn.execute(select(1))
    db = handle_of(engine)
    assert db is not None
    server.stop()
    give_up = time.monotonic() + 15
    while db.stats()["breaker"] != "open":
        with pytest.raises(pgwarden.DatabaseUnusable), engine.connect() as conn:
            conn.execute(select(1))
        assert time.monotonic() < give_up
    started = time.monotonic()
    with pytest.raises(pgwarden.DatabaseUnavailable), engine.connect():
        pass
    assert time.monotonic() - started < 0.1  # failed fast: the breaker is open
    server.start()
    give_up = time.monotonic() + 15
    while True:
        try:
            with engine.connect() as conn:
                assert conn.execute(select(1)).scalar_one() == 1
            break
        except pgwarden.DatabaseUnusable:
            assert time.monotonic() < give_up
            time.sleep(0.05)
    assert db.stats()["breaker"] == "closed"
    assert db.stats()["counters"]["breaker_transitions"].get("closed->open", 0) >= 1
    db.close()
