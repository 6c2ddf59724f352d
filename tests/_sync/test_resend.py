# WARNING: generated from tests/_async/test_resend.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""A statement is sent again only if it cannot have written (real server, fault proxy).

``SELECT add_row(...)`` (a SQL function that inserts) and ``SELECT nextval(...)`` read
as reads by their text. The proxy cuts the connection right after the server ran them,
so the client never hears the answer; pgwarden must not run them a second time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from pgwarden import Database, DatabaseUnusable, OutcomeUnknown, Settings

from ._compat import run

METHODS = ["fetch", "fetchrow", "fetchval", "execute"]


def make(url: str, **overrides: Any) -> Database:
    overrides.setdefault("retry_base_delay", 0.01)
    return Database(Settings(url=url, **overrides))


@pytest.fixture
def writer(pg_server: Any) -> Iterator[str]:
    """A table, a function that inserts into it and a sequence, all named by one suffix."""
    name = "rs_" + uuid.uuid4().hex[:10]
    pg_server.execute(f"CREATE TABLE {name} (id serial primary key, v int)")
    pg_server.execute(
        f"CREATE FUNCTION {name}_add(v int) RETURNS int LANGUAGE sql "
        f"AS $$ INSERT INTO {name}(v) VALUES (v) RETURNING id $$"
    )
    pg_server.execute(f"CREATE SEQUENCE {name}_seq")
    yield name
    pg_server.execute(f"DROP FUNCTION {name}_add(int)")
    pg_server.execute(f"DROP TABLE {name}")
    pg_server.execute(f"DROP SEQUENCE {name}_seq")


def rows_in(pg_server: Any, name: str) -> int:
    return int(pg_server.execute(f"SELECT count(*) FROM {name}")[0][0])


def sequence_calls(pg_server: Any, name: str) -> int:
    """How many times nextval() ran on the sequence (0 if never)."""
    last, called = pg_server.execute(f"SELECT last_value, is_called FROM {name}_seq")[0]
    return int(last) if called else 0


def call(db: Database, method: str, query: str, params: Any, **kwargs: Any) -> Any:
    return getattr(db, method)(query, params, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("timeout", [None, 10.0])
def test_hidden_insert_cut_after_it_ran_is_not_run_again(
    pg_server: Any, fault_proxy: Any, writer: str, method: str, timeout: float | None
) -> None:
    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(f"{writer}_add".encode(), when="after")
            # With or without a deadline the read-shaped statement is sent as is; once
            # cut after it ran, it is sent again only READ ONLY: the server refuses it,
            # which proves it writes, so its outcome is unknown and it is not run twice.
            with pytest.raises(OutcomeUnknown) as caught:
                call(db, method, f"SELECT {writer}_add(%s)", [1], timeout=timeout)
            assert caught.value.__cause__ is not None
            assert fault_proxy.cuts == 1

    run(main)
    assert rows_in(pg_server, writer) == 1  # it ran once, and only once


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("timeout", [None, 10.0])
def test_nextval_cut_after_it_ran_is_not_run_again(
    pg_server: Any, fault_proxy: Any, writer: str, method: str, timeout: float | None
) -> None:
    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(f"{writer}_seq".encode(), when="after")
            query = f"SELECT nextval('{writer}_seq')"
            with pytest.raises(OutcomeUnknown):
                call(db, method, query, None, timeout=timeout)

    run(main)
    assert sequence_calls(pg_server, writer) == 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("timeout", [None, 10.0])
def test_plain_read_cut_after_it_ran_is_sent_again_and_served(
    pg_server: Any, fault_proxy: Any, method: str, timeout: float | None
) -> None:
    def main() -> Any:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(b"plain_read_marker", when="after")
            result = call(
                db, method, "SELECT 42 AS answer /* plain_read_marker */", None, timeout=timeout
            )
            assert fault_proxy.cuts == 1  # the cut did happen; the retry served the read
            return result, db.stats()

    result, stats = run(main)
    expected = {"fetch": [{"answer": 42}], "fetchrow": {"answer": 42}, "fetchval": 42}
    assert result == expected.get(method, 1)
    assert stats["counters"]["retries"]["total"] >= 1


def test_a_text_write_cut_after_it_ran_raises_outcome_unknown_and_is_not_resent(
    pg_server: Any, fault_proxy: Any, writer: str
) -> None:
    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(b"INSERT INTO", when="after")
            with pytest.raises(OutcomeUnknown) as caught:
                db.execute(f"INSERT INTO {writer}(v) VALUES (%s)", [7])
            assert not isinstance(caught.value, DatabaseUnusable)

    run(main)
    assert rows_in(pg_server, writer) == 1


def test_a_text_write_cut_before_commit_under_a_deadline_is_resent_once(
    pg_server: Any, fault_proxy: Any, writer: str
) -> None:
    def main() -> int:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(b"INSERT INTO", when="after")
            # BEGIN ... INSERT ran, the connection died before COMMIT was sent: the
            # server rolled back, so sending it again is safe.
            count: int = db.execute(f"INSERT INTO {writer}(v) VALUES (%s)", [7], timeout=10)
            return count

    assert run(main) == 1
    assert rows_in(pg_server, writer) == 1


def test_write_true_marks_a_read_shaped_statement_as_a_write(
    pg_server: Any, fault_proxy: Any, writer: str
) -> None:
    def main() -> None:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(f"{writer}_add".encode(), when="after")
            with pytest.raises(OutcomeUnknown):
                db.fetchval(f"SELECT {writer}_add(%s)", [1], write=True)

    run(main)
    assert rows_in(pg_server, writer) == 1


def test_idempotent_true_lets_the_caller_have_it_sent_again(
    pg_server: Any, fault_proxy: Any, writer: str
) -> None:
    def main() -> Any:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(f"{writer}_add".encode(), when="after")
            return db.fetchval(f"SELECT {writer}_add(%s)", [1], idempotent=True)

    assert run(main) == 2  # the caller vouched: sent again, and it ran twice
    assert rows_in(pg_server, writer) == 2


def test_a_hidden_write_is_learnt_and_sent_as_a_write_next_time(
    pg_server: Any, fault_proxy: Any, writer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgwarden")
    query = f"SELECT {writer}_add(%s)"

    def main() -> tuple[Any, Mapping[str, Any], Mapping[str, Any]]:
        with make(fault_proxy.url_for(pg_server.url)) as db:
            db.ready()
            fault_proxy.cut_on(f"{writer}_add".encode(), when="after")
            # Cut after it ran; the READ ONLY re-send is refused: learnt as a write.
            with pytest.raises(OutcomeUnknown):
                db.fetchval(query, [1], timeout=10)
            before = db.stats()
            assert db._state.statement_writes(query)
            # Next time it goes straight to the write path (its COMMIT resolvable).
            second = db.fetchval(query, [2], timeout=10)
            return second, before, db.stats()

    second, before, after = run(main)
    assert second == 2
    assert rows_in(pg_server, writer) == 2
    events = [r for r in caplog.records if getattr(r, "event", None) == "hidden_write"]
    assert len(events) == 1
    assert "%s" in events[0].getMessage() or "?" in events[0].getMessage()
    # The cut is a database error; the refusal that proved the write is not one.
    assert sum(before["counters"]["errors"].values()) == 1
    assert after["counters"]["errors"] == before["counters"]["errors"]
