# WARNING: generated from tests/_async/test_checkout.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""`checkout()`: a pooled connection lent to a consumer (an ORM), against a real server."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg.adapt import AdaptersMap
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads

import pgwarden
import pgwarden._sync.acquire as acquire_module
from pgwarden import Database, DeadlineExceeded, Settings
from pgwarden._sync._compat import COARSE_TICK
from pgwarden.core.classify import FailureKind

from ._compat import run, sleep


def make(url: str, **overrides: Any) -> Database:
    return Database(Settings(url=url, **overrides))


def test_checkout_in_the_consumers_shape_and_release_puts_pgwardens_back(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url, max_size=1) as db:
            out = db.checkout(autocommit=False, row_factory=tuple_row)
            conn = out.connection
            assert db.stats()["in_flight"] == 1
            cur = conn.execute("SELECT 1, 'a'")
            row: Any = cur.fetchone()  # the connection is typed for pgwarden's dict rows
            assert row == (1, "a")
            assert conn.info.transaction_status == TransactionStatus.INTRANS  # not autocommit
            conn.rollback()
            conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
            conn.execute("SELECT 2")  # and leave a transaction open
            out.release()
            out.release()  # idempotent
            assert db.stats()["in_flight"] == 0
            # max_size=1: the same connection, back in pgwarden's own shape.
            with db.connection() as same:
                assert same is conn
                assert same.autocommit
                assert same.isolation_level is None
                cur = same.execute("SELECT 1 AS one")
                assert cur.fetchone() == {"one": 1}

    run(main)


def test_a_checkout_that_fails_before_lending_leaves_no_connection_out_of_autocommit(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted between shaping the connection (autocommit off) and lending it: the
    pool must not get it back in that shape, or pgwarden's next write would run in a
    transaction nobody commits."""
    pg_server.execute("DROP TABLE IF EXISTS checkout_interrupted")
    pg_server.execute("CREATE TABLE checkout_interrupted (id int)")

    def main() -> None:
        with make(pg_server.url, max_size=1) as db:
            db.fetchval("SELECT 1")  # the one connection exists and is idle

            def interrupted(*args: Any, **kwargs: Any) -> Any:
                raise KeyboardInterrupt

            with monkeypatch.context() as patch:
                patch.setattr(db._connections, "lend", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    db.checkout(autocommit=False)
            assert db.stats()["in_flight"] == 0
            db.execute("INSERT INTO checkout_interrupted VALUES (1)")

    run(main)
    assert pg_server.execute("SELECT id FROM checkout_interrupted") == [(1,)]


def test_a_release_interrupted_while_resetting_still_gives_the_connection_back(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled or interrupted while the shape is put back: the connection (its shape
    unknown) is closed and still returned, so nothing stays checked out forever."""
    pg_server.execute("DROP TABLE IF EXISTS release_interrupted")
    pg_server.execute("CREATE TABLE release_interrupted (id int)")

    def interrupted(conn: Any) -> Any:
        raise KeyboardInterrupt

    def main() -> None:
        with make(pg_server.url, max_size=1) as db:
            out = db.checkout(autocommit=False)
            with monkeypatch.context() as patch:
                patch.setattr(acquire_module, "_restore_shape", interrupted)
                with pytest.raises(KeyboardInterrupt):
                    out.release()
            assert db.stats()["in_flight"] == 0
            assert out.connection.closed
            db.execute("INSERT INTO release_interrupted VALUES (1)")  # a new connection

    run(main)
    assert pg_server.execute("SELECT id FROM release_interrupted") == [(1,)]


def test_discard_closes_the_connection_and_the_pool_replaces_it(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url, max_size=1) as db:
            out = db.checkout()
            pid = out.connection.info.backend_pid
            out.discard()
            assert out.connection.closed
            assert db.fetchval("SELECT pg_backend_pid()") != pid

    run(main)


def test_an_explicit_deadline_bounds_every_byte_until_release(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            out = db.checkout(timeout=0.5)
            assert out.deadline is not None
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                out.connection.execute("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 2.0  # severed at the deadline
            assert out.lost
            out.release()
            assert db.fetchval("SELECT 1") == 1

    run(main)


def test_a_checkout_without_a_deadline_is_not_severed(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url, default_timeout=0.3) as db:
            out = db.checkout()
            assert out.deadline is None
            # Past the backstop's coarse watch (its entry became the leak watch at lend).
            out.connection.execute("SELECT pg_sleep(%s)", [0.3 + COARSE_TICK + 0.3])
            assert not out.lost
            out.release()

    run(main)


def test_checkout_waits_for_readiness_and_raises_pgwardens_errors(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url, max_size=1, acquire_timeout=0.3) as db:
            held = db.checkout()
            with pytest.raises(pgwarden.AcquireTimeout):
                db.checkout()
            assert db.stats()["in_flight"] == 1  # the failed checkout left nothing behind
            held.release()
            down = make("postgresql://nobody@127.0.0.1:1/x", ready_timeout=5)
            try:
                with pytest.raises(DeadlineExceeded):
                    down.checkout(timeout=0.3)
            finally:
                down.close()

    run(main)


def test_a_handle_with_a_consumers_adapters_uses_them_and_others_do_not(pg_server: Any) -> None:
    adapters = AdaptersMap(psycopg.adapters)
    set_json_loads(
        lambda raw: ("custom", raw if isinstance(raw, str) else bytes(raw).decode()), adapters
    )

    def main() -> None:
        with (
            Database(Settings(url=pg_server.url), adapters=adapters) as orm,
            make(pg_server.url) as plain,
        ):
            assert orm.fetchval("""SELECT '{"a": 1}'::json""") == ("custom", '{"a": 1}')
            assert plain.fetchval("""SELECT '{"a": 1}'::json""") == {"a": 1}

    run(main)


def test_the_registry_keeps_a_separate_handle_per_adapters_map(pg_server: Any) -> None:
    adapters = AdaptersMap(psycopg.adapters)
    a = pgwarden.connect(pg_server.url, application_name="co-test")
    b = pgwarden.connect(pg_server.url, application_name="co-test", adapters=adapters)
    assert a is not b
    assert b is pgwarden.connect(pg_server.url, application_name="co-test", adapters=adapters)
    assert b.adapters is adapters


def test_a_checkout_held_past_the_leak_threshold_is_reported_once(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def main() -> None:
        with make(pg_server.url, leak_threshold=0.1) as db:
            quick = db.checkout()
            quick.release()  # returned before the threshold: no report, ever
            out = db.checkout()
            # The leak watch is coarse: reported within COARSE_TICK after the threshold.
            out.connection.execute("SELECT pg_sleep(%s)", [0.1 + COARSE_TICK + 0.4])
            out.release()
            sleep(0.1 + COARSE_TICK + 0.2)  # the first checkout's time has long passed
            assert db.stats()["counters"]["leaked_connections"] == 1
        leaks = [r for r in caplog.records if getattr(r, "event", None) == "leak"]
        assert len(leaks) == 1
        assert "test_checkout.py" in leaks[0].getMessage()  # the acquiring call site

    run(main)


# --- the public calls integrations make instead of reaching into the handle ---------------------
def test_rerun_after_failure_counts_decides_and_backs_off(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            db.ready()
            conflict = psycopg.errors.SerializationFailure("could not serialize access")
            kind = db.rerun_after_failure(conflict, attempt=1, deadline=time.monotonic() + 5.0)
            assert kind is FailureKind.CONFLICT
            assert db.stats()["counters"]["errors"] == {"conflict": 1}
            # The budget of attempts is the caller's: the last one is not re-run.
            with pytest.raises(psycopg.errors.SerializationFailure):
                db.rerun_after_failure(
                    conflict, attempt=2, deadline=time.monotonic() + 5.0, attempts=2
                )
            # The caller's own error wraps the driver's: classified by the cause, raised as is.
            wrapper = RuntimeError("the framework's wrapper")
            with pytest.raises(RuntimeError):
                db.rerun_after_failure(
                    wrapper,
                    cause=psycopg.errors.UniqueViolation("duplicate key"),
                    attempt=1,
                    deadline=None,
                )
            # Out of time: DeadlineExceeded from the failure.
            with pytest.raises(DeadlineExceeded) as info:
                db.rerun_after_failure(conflict, attempt=1, deadline=time.monotonic())
            assert info.value.__cause__ is conflict

    run(main)


def test_rerun_after_failure_resends_a_single_statement_only_if_it_did_not_run(
    pg_server: Any,
) -> None:
    def main() -> None:
        with make(pg_server.url) as db:
            db.ready()
            bound = time.monotonic() + 5.0
            # A serialization failure is no proof that a lone statement did not run.
            with pytest.raises(psycopg.errors.SerializationFailure):
                db.rerun_after_failure(
                    psycopg.errors.SerializationFailure("x"),
                    attempt=1,
                    deadline=bound,
                    whole_transaction=False,
                )
            # A session the server ended before running it (57P01): sent again.
            ended = psycopg.errors.AdminShutdown("terminating connection")
            kind = db.rerun_after_failure(
                ended, attempt=1, deadline=bound, whole_transaction=False, connection_lost=True
            )
            assert kind is FailureKind.STALE

    run(main)


def test_resolve_lost_commit_returns_or_raises_the_handles_verdict(pg_server: Any) -> None:
    from pgwarden.core.commit import Marker

    def main() -> None:
        with make(pg_server.url) as db:
            lost = psycopg.OperationalError("server closed the connection unexpectedly")
            db.resolve_lost_commit(lost, None)  # wrote nothing: nothing to lose
            with db.transaction() as tx:
                row = tx.fetchrow(
                    "SELECT txid_current() AS txid, pg_postmaster_start_time() AS started, "
                    "pg_stat_get_bgwriter_stat_reset_time() AS reset"
                )
            assert row is not None
            committed = Marker(row["txid"], row["started"], row["reset"])
            db.resolve_lost_commit(lost, committed, deadline=time.monotonic() + 5.0)
            with pytest.raises(pgwarden.AmbiguousCommitError, match="my_switch"):
                db.resolve_lost_commit(lost, committed, resolve=False, setting="my_switch")
            assert db.stats()["counters"]["ambiguous_commits"]

    run(main)
