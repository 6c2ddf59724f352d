"""``ENGINE: "pgwarden.django"`` under real faults: Django ORM units of work with atomic_retry.

Each unit of work creates a `Write` (its request id; no unique constraint, so a unit of
work committed twice shows as two rows) and increments its worker's `Total` in the same
transaction, from worker threads that end each unit the way Django ends a request
(``close_if_unusable_or_obsolete``). Faults: server restarts (fast and immediate),
backend kills, connections cut at COMMIT (before and after it reaches the server), and
a failover to a new primary that leaves the old one up and read-only. After each: no
unit of work failed with deadline left, none ran twice, none acknowledged was lost, and
every total equals its worker's rows. Also: a forked worker gets its own connections.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("django")

from django.db import connections, transaction
from django.db.models import F

import pgwarden
from django_suite.inprocess import create_tables, use_database
from pgwarden.django import atomic_retry, handle_of

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

WORKERS = 8
UNIT_DEADLINE = 10.0


def models() -> tuple[Any, Any]:
    from django_suite.faultapp.models import Total, Write

    return Write, Total


def prepare(alias: str) -> None:
    write, total = models()
    create_tables(alias, write, total)
    total.objects.using(alias).bulk_create([total(worker=w, n=0) for w in range(WORKERS)])
    connections[alias].close()


def end_request(alias: str) -> None:
    """What Django's request_finished does to the connection."""
    connections[alias].close_if_unusable_or_obsolete()


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
    lock: threading.Lock = field(default_factory=threading.Lock)


def unit_of_work(alias: str, outcome: Outcome, w: int, request_id: str) -> None:
    """The ORM code of one request: two writes in one transaction."""
    write, total = models()
    with outcome.lock:
        outcome.calls[request_id] += 1
    write.objects.using(alias).create(request_id=request_id, worker=w)
    total.objects.using(alias).filter(worker=w).update(n=F("n") + 1)


def check(server: Any, outcome: Outcome, *, floor: int, crash: bool = False) -> None:
    """No unit of work failed, ran twice, was lost once acknowledged, or was split
    (*crash*: an AmbiguousCommitError is allowed after a crash, see
    tests/integration/test_sqlalchemy_faults.py: never re-run, committed at most once)."""
    rows = server.execute("SELECT request_id, worker FROM dj_fault_writes")
    counts = Counter(r[0] for r in rows)
    per_worker = Counter(r[1] for r in rows)
    totals = dict(server.execute("SELECT worker, n FROM dj_fault_totals"))
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


def run_workers(alias: str, outcome: Outcome, fault: Callable[[], None], seconds: float) -> None:
    """WORKERS threads run units of work (decorator form) while *fault* runs every 0.6 s."""
    stop = threading.Event()

    def worker(w: int) -> None:
        while not stop.is_set():
            request_id = str(uuid.uuid4())
            started = time.monotonic()

            try:
                atomic_retry(using=alias, timeout=UNIT_DEADLINE)(unit_of_work)(
                    alias, outcome, w, request_id
                )
            except Exception as exc:
                with outcome.lock:
                    left = UNIT_DEADLINE - (time.monotonic() - started)
                    outcome.failures.append(Failure(request_id, exc, left))
                time.sleep(0.01)
            else:
                with outcome.lock:
                    outcome.acked.append((w, request_id))
            finally:
                end_request(alias)
        connections[alias].close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    try:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            time.sleep(0.6)
            fault()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


FAULTS = ["fast", "immediate", "kill", "cut-before", "cut-after"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_orm_units_of_work_survive_faults(
    pg_server_factory: Any, fault_proxy_factory: Any, fault: str
) -> None:
    server = pg_server_factory()
    proxy = fault_proxy_factory(server.host, server.port)
    alias = use_database(proxy.url_for(server.url), max_size=4)
    prepare(alias)
    outcome = Outcome()

    def inject() -> None:
        if fault in ("fast", "immediate"):
            server.restart(fault)
        elif fault == "kill":
            server.terminate_backends()
        else:
            proxy.cut_on(b"COMMIT", when=fault.removeprefix("cut-"))

    run_workers(alias, outcome, inject, 3.0)
    db = handle_of(alias)
    stats = db.stats()
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
        assert max(outcome.calls.values()) >= 2  # some unit of work was re-run
    assert stats["in_flight"] == 0  # every connection went back
    db.close()


def kill_on_first_attempt(server: Any, alias: str) -> Callable[[], None]:
    """Inside the unit's transaction: on the first attempt only, the server terminates
    this connection's backend (the next statement finds it gone)."""
    attempts: list[int] = []

    def maybe_kill() -> None:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                (pid,) = cursor.fetchone()
            server.execute("SELECT pg_terminate_backend(%s)", [pid])

    return maybe_kill


@pytest.mark.parametrize("form", ["decorator", "loop"])
def test_a_connection_lost_inside_the_block_reruns_it_whole(pg_server: Any, form: str) -> None:
    alias = use_database(pg_server.url, max_size=2)
    prepare(alias)
    outcome = Outcome()
    kill = kill_on_first_attempt(pg_server, alias)
    request_id = str(uuid.uuid4())

    def body() -> None:
        kill()
        unit_of_work(alias, outcome, 0, request_id)

    if form == "decorator":
        atomic_retry(using=alias, timeout=10)(body)()
    else:
        for attempt in atomic_retry(using=alias, timeout=10):
            with attempt:
                body()
    end_request(alias)
    outcome.acked.append((0, request_id))
    assert outcome.calls[request_id] == 2
    check(pg_server, outcome, floor=1)
    stats = handle_of(alias).stats()
    assert stats["counters"]["retries"]["total"] >= 1
    assert stats["in_flight"] == 0


def test_a_lost_commit_outside_atomic_retry_raises_pgwardens_verdicts(
    pg_server: Any, fault_proxy: Any
) -> None:
    """Plain ``transaction.atomic()``: a COMMIT cut after it reached the server returns
    normally (resolved: committed); cut before, `NotCommitted` (which is also Django's
    OperationalError); with resolution off, `AmbiguousCommitError`."""
    from django.db import OperationalError

    alias = use_database(fault_proxy.url_for(pg_server.url))
    prepare(alias)
    write, _ = models()

    def write_and_cut(alias: str, request_id: str, when: str) -> None:
        with transaction.atomic(using=alias):
            write.objects.using(alias).create(request_id=request_id, worker=0)
            fault_proxy.cut_on(b"COMMIT", when=when)

    write_and_cut(alias, "after", "after")
    end_request(alias)
    with pytest.raises(pgwarden.NotCommitted) as info:
        write_and_cut(alias, "before", "before")
    assert isinstance(info.value, OperationalError)
    end_request(alias)
    off = use_database(fault_proxy.url_for(pg_server.url), resolve_commits=False)
    with pytest.raises(pgwarden.AmbiguousCommitError):
        write_and_cut(off, "off", "after")
    end_request(off)
    rows = sorted(r[0] for r in pg_server.execute("SELECT request_id FROM dj_fault_writes"))
    assert rows == ["after", "off"]
    assert handle_of(alias).stats()["counters"]["ambiguous_commits"] == {
        "committed": 1,
        "aborted": 1,
    }
    # The connection lost at COMMIT was discarded; the next request works.
    assert write.objects.using(alias).count() == 2
    end_request(alias)
    for a in (alias, off):
        assert handle_of(a).stats()["in_flight"] == 0


# --- failover: the old primary stays up, read-only; the endpoint moves ---------------------


@pytest.mark.slow
def test_a_demoted_primary_is_left_for_the_new_one(
    pg_server_factory: Any, fault_proxy_factory: Any
) -> None:
    """A failover as managed services do it: the old primary stays up but read-only, so
    pooled sessions to it answer reads but refuse writes with 25006; the endpoint (a
    TCP proxy, retargeted) sends new connections to the new primary. Django's own pool
    would keep its sessions to the old primary (its check is a SELECT 1)."""
    from psycopg import sql

    old = pg_server_factory({"cluster_name": "old"})
    new = pg_server_factory({"cluster_name": "new"})
    for server in (old, new):  # the same schema on both
        direct = use_database(server.url)
        prepare(direct)
        handle_of(direct).close()
    # One set of credentials for the endpoint, whichever node it leads to.
    new.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(old.password)))
    proxy = fault_proxy_factory(old.host, old.port)
    alias = use_database(proxy.url_for(old.url), max_size=4)
    hold_connections(alias, 4)  # four pooled sessions to the old primary

    old.set_config(default_transaction_read_only="on")  # demoted: its sessions read-only
    proxy.target_port = new.port  # the endpoint now leads to the new primary
    write, _ = models()
    labels: list[str] = []

    @atomic_retry(using=alias, timeout=5)
    def unit() -> None:
        write.objects.using(alias).create(request_id=str(uuid.uuid4()), worker=0)
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT current_setting('cluster_name')")
            labels.append(cursor.fetchone()[0])

    for _ in range(20):
        unit()
        end_request(alias)
    assert set(labels) == {"new"}  # the write that met the old primary never got this far
    stats = handle_of(alias).stats()
    assert stats["counters"]["errors"].get("failover", 0) >= 1
    # One 25006 drained the pool: every session to the old primary was closed.
    assert stats["counters"]["connections_closed"].get("failover", 0) >= 1
    assert old.execute("SELECT count(*) FROM dj_fault_writes")[0][0] == 0
    assert new.execute("SELECT count(*) FROM dj_fault_writes")[0][0] == 20
    # Without atomic_retry too: the next plain write goes to the new primary.
    write.objects.using(alias).create(request_id="plain", worker=0)
    end_request(alias)
    assert new.execute("SELECT count(*) FROM dj_fault_writes")[0][0] == 21
    handle_of(alias).close()


def hold_connections(alias: str, n: int) -> None:
    """Open *n* connections at once (one per thread), so the pool holds *n*."""
    barrier = threading.Barrier(n)

    def hold() -> None:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
        barrier.wait(10)
        connections[alias].close()

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


# --- fork: gunicorn --preload ---------------------------------------------------------------


def backend_pid(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)


@pytest.fixture
def forked_alias(pg_server: Any) -> Iterator[str]:
    alias = use_database(pg_server.url, max_size=2)
    yield alias
    connections[alias].close()
    handle_of(alias).close()


def test_a_forked_worker_gets_its_own_connections(forked_alias: str) -> None:
    """The parent holds a connection (a query at import time, as with ``--preload``) and
    forks; the child's queries run on backends of its own, and the parent's connection
    is untouched by them and by the child's exit."""
    alias = forked_alias
    parent_backend = backend_pid(alias)  # held: no request end in the parent
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            first = backend_pid(alias)
            end_request(alias)
            second = backend_pid(alias)
            os.write(write_fd, f"{first} {second}".encode())
            connections[alias].close()
            handle_of(alias).close()
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(child, 0)
    reported = os.read(read_fd, 64).decode().split()
    os.close(read_fd)
    assert os.waitstatus_to_exitcode(status) == 0
    child_backends = {int(p) for p in reported}
    assert parent_backend not in child_backends
    # The parent's connection survived the child (same backend, still usable).
    assert backend_pid(alias) == parent_backend
    end_request(alias)
    assert handle_of(alias).stats()["in_flight"] == 0
