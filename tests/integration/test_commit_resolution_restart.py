"""Commit resolution across a crash restart, against real servers.

A crash hands out again every transaction id that never reached the WAL, so after one
``txid_status()`` may say "committed" about another transaction's work. These tests
build that situation for real: transactions whose commit reached the WAL, whose records
did but whose commit did not, and whose commit was still in ``wal_buffers`` (an
asynchronous commit, with the WAL writer asleep) when the server crashed; then, after
recovery, new transactions take the lost id and commit. What the handle resolves is
checked against what is in the table. Two kinds of crash: the postmaster killed and
started again (a new start time), and one backend killed (the postmaster kills the
others and recovers, keeping its start time). And one lost COMMIT end to end: cut at
COMMIT through a proxy, the server crashed before anything can ask, run_transaction's
verdict checked against the table.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgwarden
from pgwarden import Database, Settings
from pgwarden._handle.sql import MARKER_IF_ASSIGNED
from pgwarden.core.commit import Marker, full_xid

# The WAL writer asleep (its longest delay) and no autovacuum: nothing flushes the WAL
# between a test's asynchronous commit and its crash.
QUIET = {"wal_writer_delay": "10s", "autovacuum": False}
REPLICA = {"wal_level": "replica", **QUIET}
LOST = psycopg.OperationalError("connection lost during COMMIT (simulated by the test)")


def crash(server: Any, how: str) -> None:
    """``immediate``: the postmaster quits at once and starts again. ``backend``: one
    backend is killed; the postmaster ends the rest and recovers, same start time."""
    if how == "immediate":
        server.restart("immediate")
        return
    victim = psycopg.connect(server.url, autocommit=True)
    os.kill(victim.info.backend_pid, signal.SIGKILL)
    victim.close()
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.05)
        try:
            with psycopg.connect(server.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise


def recovery_next_xid(server: Any) -> int:
    """The id the recovered server hands out first (its end-of-recovery checkpoint's)."""
    (next_xid,) = server.execute("SELECT next_xid FROM pg_control_checkpoint()")[0]
    return full_xid(next_xid)


def take_ids_up_to(server: Any, txid: int, table: str) -> list[int]:
    """Commit new transactions until one is given *txid* (or a later id): the lost id
    goes to someone else's work. Returns the ids they got."""
    got: list[int] = []
    with psycopg.connect(server.url, autocommit=True) as conn:
        while not got or got[-1] < txid:
            with conn.transaction():
                (taken,) = conn.execute("SELECT txid_current()").fetchone() or (None,)
                conn.execute(f"INSERT INTO {table} VALUES (%s)", [f"other-{taken}"])
            got.append(int(taken))
    return got


@dataclass
class Before:
    """Three transactions before the crash, and what really became of each."""

    durable: Marker  # committed and flushed
    records: Marker  # its row reached the WAL (flushed by durable's commit); no commit
    lost: Marker  # committed asynchronously: the commit was still in wal_buffers
    open_conn: psycopg.Connection[Any]  # records' transaction, left open to the crash


def marker_of(conn: psycopg.Connection[Any]) -> Marker:
    row = conn.cursor(row_factory=dict_row).execute(MARKER_IF_ASSIGNED).fetchone()
    assert row is not None
    return Marker(row["txid"], row["started"], row["stats_reset"])


def before_the_crash(server: Any, table: str) -> Before:
    server.execute("SELECT pg_switch_wal()")  # the next records start a fresh WAL page
    records = psycopg.connect(server.url)
    records.execute(f"INSERT INTO {table} VALUES ('records')")
    records_marker = marker_of(records)
    with psycopg.connect(server.url) as conn:
        conn.execute(f"INSERT INTO {table} VALUES ('durable')")
        durable = marker_of(conn)
        conn.commit()  # flushes the WAL: records' row too
    with psycopg.connect(server.url) as conn:
        conn.execute("SET synchronous_commit TO off")
        conn.execute(f"INSERT INTO {table} VALUES ('lost')")
        lost = marker_of(conn)
        conn.commit()  # returns before the flush the crash prevents
    return Before(durable, records_marker, lost, records)


def resolve(db: Database, marker: Marker, deadline: float = 10.0) -> str:
    """What the handle's resolution makes of *marker*'s lost COMMIT."""
    db.ready()
    try:
        db._transactions.resolve_lost_commit(
            LOST, marker, resolve=True, deadline=time.monotonic() + deadline
        )
    except pgwarden.NotCommitted:
        return "aborted"
    except pgwarden.AmbiguousCommitError:
        return "unknown"
    return "committed"


def crashed_history(server: Any, how: str, table: str) -> Before:
    """Before the crash, the crash, and the lost id taken by someone else's commit. The
    premise is checked: the lost commit never became durable, the others' ids did. A
    rare WAL flush by the server itself spoils it; then it is built again."""
    server.execute(f"CREATE TABLE {table} (id text)")
    for _ in range(3):
        before = before_the_crash(server, table)
        crash(server, how)
        before.open_conn.close()
        recovered = recovery_next_xid(server)
        if before.durable.txid is not None and before.durable.txid < recovered:
            assert before.lost.txid is not None
            if before.lost.txid >= recovered:
                assert before.lost.txid in take_ids_up_to(server, before.lost.txid, table)
                return before
    raise AssertionError("the server flushed the lost commit before the crash every time")


def rows(server: Any, table: str) -> set[str]:
    return {r[0] for r in server.execute(f"SELECT id FROM {table}")}


@pytest.mark.parametrize("how", ["immediate", "backend"])
def test_resolution_after_a_crash_matches_the_table(pg_server_factory: Any, how: str) -> None:
    server = pg_server_factory(REPLICA)
    before = crashed_history(server, how, "resolved")
    with Database(Settings(url=server.url)) as db:
        outcomes = {
            name: resolve(db, getattr(before, name)) for name in ("durable", "records", "lost")
        }
        counted = db.stats()["counters"]["ambiguous_commits"]
    # The lost id now belongs to another committed transaction; ours is not in the table.
    assert before.lost.txid is not None
    assert f"other-{before.lost.txid}" in rows(server, "resolved")
    assert rows(server, "resolved") & {"durable", "records", "lost"} == {"durable"}
    assert outcomes == {"durable": "committed", "records": "aborted", "lost": "aborted"}
    assert counted == {"committed": 1, "aborted": 2}


def test_without_privileges_a_postmaster_crash_restart_is_never_misread(
    pg_server_factory: Any,
) -> None:
    """A role without pg_read_all_stats cannot see when the WAL writer started, so a
    backend's crash (same start time) and statistics reset by hand look alike: the id
    handed out again is not claimed either way; the ids below the recovery point are."""
    server = pg_server_factory(REPLICA)
    before = crashed_history(server, "backend", "unprivileged")
    server.execute("CREATE ROLE app LOGIN PASSWORD 'app-secret'")
    with Database(Settings(url=server.url_for(user="app", password="app-secret"))) as db:
        outcomes = {
            name: resolve(db, getattr(before, name), deadline=1.0)
            for name in ("durable", "records", "lost")
        }
    assert rows(server, "unprivileged") & {"durable", "records", "lost"} == {"durable"}
    assert outcomes == {"durable": "committed", "records": "aborted", "lost": "unknown"}


@pytest.mark.parametrize(
    ("settings", "durable"),
    [
        ({"wal_level": "minimal", **QUIET}, "unknown"),
        ({"wal_level": "minimal", "track_commit_timestamp": True, **QUIET}, "committed"),
    ],
    ids=["minimal", "minimal+commit-timestamps"],
)
def test_with_wal_level_minimal(pg_server_factory: Any, settings: Any, durable: str) -> None:
    """Under wal_level=minimal an online checkpoint looks like the end-of-recovery one,
    so the recovery point is only an upper bound: an id below it that says committed
    stays unknown, unless its commit timestamp predates the restart."""
    server = pg_server_factory(settings)
    before = crashed_history(server, "immediate", "minimal")
    with Database(Settings(url=server.url)) as db:
        outcomes = {
            name: resolve(db, getattr(before, name), deadline=1.0)
            for name in ("durable", "records", "lost")
        }
    assert rows(server, "minimal") & {"durable", "records", "lost"} == {"durable"}
    assert outcomes == {"durable": durable, "records": "aborted", "lost": "aborted"}


def test_without_a_restart_the_status_is_the_truth(pg_server_factory: Any) -> None:
    server = pg_server_factory(REPLICA)
    server.execute("CREATE TABLE steady (id text)")
    before = before_the_crash(server, "steady")
    with Database(Settings(url=server.url)) as db:
        assert resolve(db, before.durable) == "committed"
        assert resolve(db, before.lost) == "committed"  # no crash: it was flushed in time
        started = time.monotonic()
        assert resolve(db, before.records, deadline=0.5) == "unknown"  # still open
        assert time.monotonic() - started >= 0.4  # it waited for the open one to finish
        before.open_conn.rollback()
        assert resolve(db, before.records) == "aborted"
    before.open_conn.close()


@pytest.mark.parametrize("how", ["immediate", "backend"])
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_commit_lost_in_a_crash_end_to_end(
    pg_server_factory: Any, fault_proxy_factory: Any, how: str, when: str
) -> None:
    """COMMIT is cut (after the server committed, or before it saw it); nothing can
    reach the server until it has crashed and recovered, and (cut before) someone else
    has committed with the lost id. run_transaction returns once if it committed, runs
    the unit again once if not; the unit's row is in the table exactly once."""
    server = pg_server_factory(REPLICA)
    server.execute("CREATE TABLE e2e (id text)")
    proxy = fault_proxy_factory(server.host, server.port)
    calls: list[int] = []
    troubles: list[BaseException] = []

    def crash_then_reopen() -> None:
        try:
            deadline = time.monotonic() + 10
            while proxy.cuts < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            crash(server, how)
            take_ids_up_to(server, calls[0], "e2e")
        except BaseException as exc:
            troubles.append(exc)
        finally:
            proxy.heal()

    def unit(tx: Any) -> str:
        calls.append(tx.fetchval("SELECT txid_current()"))
        if len(calls) == 1:
            server.execute("SELECT pg_switch_wal()")  # the unit's records on a fresh page
        tx.execute("INSERT INTO e2e VALUES ('unit')")
        if len(calls) == 1:
            proxy.refuse()  # the resolution cannot ask before the crash
            proxy.cut_on(b"COMMIT", when=when)
            threading.Thread(target=crash_then_reopen, daemon=True).start()
        return "done"

    with Database(Settings(url=proxy.url_for(server.url), connect_timeout=10)) as db:
        assert db.run_transaction(unit, timeout=30) == "done"
        counted = db.stats()["counters"]["ambiguous_commits"]
    assert troubles == []
    assert server.execute("SELECT count(*) FROM e2e WHERE id = 'unit'")[0][0] == 1
    if when == "after":
        assert len(calls) == 1
        assert counted == {"committed": 1}
    else:
        assert len(calls) == 2
        assert counted == {"aborted": 1}
