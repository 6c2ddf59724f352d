"""Every public error, raised by a real fault against a real server (docs/errors.md).

Each test provokes one condition for real (a wrong password, a refused connection, a
pool with no free connection, a connection the fault proxy cuts right after the server
ran a statement, a COMMIT whose answer never arrives, ...) and checks what the caller
gets: the exact type, its family (`DatabaseUnusable` or not), what is kept of psycopg's
own error (type, ``sqlstate``, ``diag``), and that the password of the URL appears
nowhere: not in ``str()`` or ``repr()`` of the error, of its cause chain or its
``last_error``, not in the formatted traceback, and not in what a psycopg error in the
chain still holds (its ``pgconn``, whose repr a crash reporter would print).

Every handle connects as its own role with a distinctive password (`account`), so a
leak of that password cannot hide behind the test server's own random one.
"""

from __future__ import annotations

import secrets
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

import pgwarden
from pgwarden import (
    AcquireTimeout,
    AmbiguousCommitError,
    AsyncDatabase,
    DatabaseUnavailable,
    DatabaseUnusable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    NotReady,
    OutcomeUnknown,
    PgwardenError,
    Settings,
)

from ._compat import run, sleep

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Account:
    role: str
    password: str
    server: Any

    def url(self, *, dbname: str | None = None, password: str | None = None) -> str:
        return str(
            self.server.url_for(
                dbname, user=self.role, password=self.password if password is None else password
            )
        )


@pytest.fixture
def account(pg_server: Any) -> Iterator[Account]:
    """A login role with a distinctive password (superuser, so it may use every table)."""
    suffix = uuid.uuid4().hex[:10]
    role = f"pgw_err_{suffix}"
    password = f"Pw-{suffix}-{secrets.token_hex(8)}"
    pg_server.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    yield Account(role, password, pg_server)
    pg_server.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def table(pg_server: Any) -> Iterator[str]:
    """A table of tagged rows and ``<table>_add(tag)``, a function that inserts a row
    (so ``SELECT <table>_add(...)`` reads as a read and writes)."""
    name = "pe_" + uuid.uuid4().hex[:10]
    pg_server.execute(
        f"CREATE TABLE {name} (id serial CONSTRAINT {name}_pk PRIMARY KEY, tag text NOT NULL)"
    )
    pg_server.execute(
        f"CREATE FUNCTION {name}_add(t text) RETURNS int LANGUAGE sql"
        f" AS $$ INSERT INTO {name}(tag) VALUES (t) RETURNING id $$"
    )
    yield name
    pg_server.execute(f"DROP FUNCTION IF EXISTS {name}_add(text)")
    pg_server.execute(f"DROP TABLE IF EXISTS {name}")


def make(url: str, **overrides: Any) -> AsyncDatabase:
    overrides.setdefault("retry_base_delay", 0.01)
    return AsyncDatabase(Settings(url=url, **overrides))


def rows_tagged(server: Any, table: str, tag: str) -> int:
    return int(server.execute(f"SELECT count(*) FROM {table} WHERE tag = %s", [tag])[0][0])


def marker() -> str:
    """A tag that occurs in exactly one statement, for ``cut_on``."""
    return "mark_" + uuid.uuid4().hex[:12]


# --- what an error carries ------------------------------------------------------------------


def chain(exc: BaseException) -> list[BaseException]:
    """*exc*, its causes, the contexts a traceback shows, and ``last_error``s, each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        context = None if e.__suppress_context__ else e.__context__
        todo += [e.__cause__, context, getattr(e, "last_error", None)]
    return seen


def texts_of(exc: BaseException) -> dict[str, str]:
    """Every text a caller, a logger or a crash reporter may render from *exc*."""
    texts = {"traceback": "".join(traceback.format_exception(exc))}
    for i, e in enumerate(chain(exc)):
        where = f"[{i}] {type(e).__name__}"
        texts[f"{where} str"] = str(e)
        texts[f"{where} repr"] = repr(e)
        texts[f"{where} args"] = repr(e.args)
        if isinstance(e, psycopg.Error):
            texts[f"{where} pgconn"] = repr(e.pgconn)
            diag = e.diag
            for field in ("message_primary", "message_detail", "message_hint", "context"):
                texts[f"{where} diag.{field}"] = str(getattr(diag, field))
    return texts


def assert_no_secret(exc: BaseException, *secret_values: str) -> None:
    # The secret itself is never printed: only where it was found.
    leaks = [
        where
        for where, text in texts_of(exc).items()
        if any(value and value in text for value in secret_values)
    ]
    assert not leaks, f"the password is readable in: {leaks}"


def assert_unusable(exc: BaseException, cls: type[DatabaseUnusable]) -> None:
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, DatabaseUnusable)
    assert not isinstance(exc, (OutcomeUnknown, NotCommitted))


def assert_outcome(exc: BaseException, cls: type[PgwardenError]) -> None:
    assert type(exc) is cls, f"{type(exc).__name__}: {exc}"
    assert not isinstance(exc, DatabaseUnusable)
    assert not isinstance(exc, TimeoutError)


def connection_error(exc: BaseException) -> psycopg.OperationalError:
    """The cause of *exc*: a psycopg connection error without a SQLSTATE (the
    connection died; no server answered with an error)."""
    cause = exc.__cause__
    assert isinstance(cause, psycopg.OperationalError), repr(cause)
    assert cause.sqlstate is None, cause.sqlstate
    return cause


# --- psycopg's own errors pass through --------------------------------------------------------


def test_unique_violation_passes_through_with_sqlstate_and_diag(
    account: Account, table: str
) -> None:
    async def main() -> list[BaseException]:
        caught: list[BaseException] = []
        calls = 0
        async with make(account.url()) as db:
            await db.execute(f"INSERT INTO {table}(id, tag) VALUES (1, 'first')")
            with pytest.raises(psycopg.errors.UniqueViolation) as single:
                await db.execute(f"INSERT INTO {table}(id, tag) VALUES (1, 'again')")
            caught.append(single.value)

            async def body(tx: Any) -> None:
                nonlocal calls
                calls += 1
                await tx.execute(f"INSERT INTO {table}(id, tag) VALUES (1, 'in tx')")

            with pytest.raises(psycopg.errors.UniqueViolation) as whole:
                await db.run_transaction(body)
            caught.append(whole.value)
            assert calls == 1  # a permanent error is never re-run
            assert db.stats()["counters"]["retries"]["total"] == 0
        return caught

    for error in run(main):
        assert type(error) is psycopg.errors.UniqueViolation
        assert not isinstance(error, PgwardenError)
        assert isinstance(error, psycopg.errors.UniqueViolation)
        assert error.sqlstate == "23505"
        assert error.diag.sqlstate == "23505"
        assert error.diag.constraint_name == f"{table}_pk"
        assert error.diag.table_name == table
        assert_no_secret(error, account.password)


# --- NotReady ---------------------------------------------------------------------------------


def test_not_ready_at_once_for_a_wrong_password(account: Account) -> None:
    wrong = f"Wrong-{secrets.token_hex(8)}"

    async def main() -> tuple[BaseException, float]:
        async with make(account.url(password=wrong), ready_timeout=20) as db:
            started = time.monotonic()
            with pytest.raises(NotReady) as info:
                await db.fetchval("SELECT 1")
            return info.value, time.monotonic() - started

    error, elapsed = run(main)
    assert_unusable(error, NotReady)
    assert elapsed < 5, f"a permanent failure waited {elapsed:.2f}s (ready_timeout=20)"
    # psycopg reports a failed connection attempt as OperationalError without a SQLSTATE
    # (libpq has no error result before a session exists): the type and the text are
    # what the caller can rely on.
    cause = error.__cause__
    assert isinstance(cause, psycopg.OperationalError), repr(cause)
    assert "password authentication failed" in str(cause)
    assert_no_secret(error, wrong, account.password)


def test_not_ready_for_an_unknown_database_redacts_the_password_from_its_text(
    account: Account,
) -> None:
    # The database's name contains the password, so the server's own message carries it:
    # the cause must keep its type and say what is wrong, without the password.
    dbname = f"nodb_{account.password}"

    async def main() -> BaseException:
        async with make(account.url(dbname=dbname), ready_timeout=20) as db:
            with pytest.raises(NotReady) as info:
                await db.ready()
            return info.value

    error = run(main)
    assert_unusable(error, NotReady)
    cause = error.__cause__
    assert isinstance(cause, psycopg.OperationalError), repr(cause)
    assert "does not exist" in str(cause)
    assert_no_secret(error, account.password)


def test_not_ready_for_a_failing_probe_query_keeps_the_psycopg_error(account: Account) -> None:
    async def main() -> BaseException:
        probe = "SELECT * FROM pgw_no_such_table_for_probe"
        async with make(account.url(), probe_query=probe, ready_timeout=20) as db:
            with pytest.raises(NotReady) as info:
                await db.fetchval("SELECT 1")
            return info.value

    error = run(main)
    assert_unusable(error, NotReady)
    cause = error.__cause__
    assert type(cause) is psycopg.errors.UndefinedTable, repr(cause)
    assert cause.sqlstate == "42P01"
    assert cause.diag.sqlstate == "42P01"  # the server's own diagnostics, not a rebuilt error
    assert "pgw_no_such_table_for_probe" in str(cause.diag.message_primary)
    assert_no_secret(error, account.password)


def test_not_ready_after_ready_timeout_while_connections_are_refused(
    account: Account, fault_proxy: Any
) -> None:
    fault_proxy.refuse()

    async def main() -> tuple[list[BaseException], float]:
        async with make(fault_proxy.url_for(account.url()), ready_timeout=0.6) as db:
            started = time.monotonic()
            errors: list[BaseException] = []
            for _ in range(2):  # the second caller gets the warmup's verdict too
                with pytest.raises(NotReady) as info:
                    await db.fetchval("SELECT 1")
                errors.append(info.value)
            return errors, time.monotonic() - started

    errors, elapsed = run(main)
    assert 0.5 <= elapsed < 5, f"NotReady after {elapsed:.2f}s with ready_timeout=0.6"
    for error in errors:
        assert_unusable(error, NotReady)
        assert not isinstance(error, TimeoutError)
        assert_no_secret(error, account.password)


# --- AcquireTimeout and DeadlineExceeded ------------------------------------------------------


@pytest.mark.parametrize("operation", ["fetchval", "transaction"])
@pytest.mark.parametrize("bound", ["acquire_timeout", "timeout", "deadline"])
def test_acquire_timeout_whatever_the_caller_passed(
    account: Account, bound: str, operation: str
) -> None:
    """The one pooled connection is held; the next caller waits 0.3 s for it, bounded by
    acquire_timeout (no deadline), by timeout=, or by pgwarden.deadline()."""

    async def once(db: AsyncDatabase) -> None:
        timeout = 0.3 if bound == "timeout" else None
        if operation == "fetchval":
            await db.fetchval("SELECT 'never sent'", timeout=timeout)
        else:
            async with db.transaction(timeout=timeout) as tx:
                await tx.fetchval("SELECT 'never sent'")

    async def attempt(db: AsyncDatabase) -> None:
        if bound == "deadline":
            with pgwarden.deadline(0.3):
                await once(db)
        else:
            await once(db)

    async def main() -> tuple[BaseException, float]:
        acquire = 0.3 if bound == "acquire_timeout" else 10.0
        async with make(account.url(), max_size=1, acquire_timeout=acquire) as db:
            await db.ready()
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
                started = time.monotonic()
                with pytest.raises(AcquireTimeout) as info:
                    await attempt(db)
                elapsed = time.monotonic() - started
            assert await db.fetchval("SELECT 2") == 2  # the handle is fine afterwards
            return info.value, elapsed

    error, elapsed = run(main)
    assert_unusable(error, AcquireTimeout)
    assert isinstance(error, DeadlineExceeded)
    assert isinstance(error, TimeoutError)
    assert 0.25 <= elapsed < 2, f"AcquireTimeout after {elapsed:.2f}s for a 0.3 s bound"
    assert_no_secret(error, account.password)


def test_deadline_exceeded_mid_statement_keeps_the_last_error(account: Account) -> None:
    async def main() -> tuple[BaseException, float]:
        async with make(account.url()) as db:
            await db.ready()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await db.fetchval("SELECT pg_sleep(5)", timeout=0.4)
            elapsed = time.monotonic() - started
            assert await db.fetchval("SELECT 3") == 3
            return info.value, elapsed

    error, elapsed = run(main)
    assert_unusable(error, DeadlineExceeded)  # exactly DeadlineExceeded, not AcquireTimeout
    assert isinstance(error, TimeoutError)
    assert elapsed < 2
    assert isinstance(error, DeadlineExceeded)
    last = error.last_error
    assert type(last) is psycopg.errors.QueryCanceled, repr(last)
    assert last.sqlstate == "57014"
    assert last.diag.sqlstate == "57014"
    assert error.__cause__ is last
    assert_no_secret(error, account.password)


@pytest.mark.parametrize("operation", ["transaction", "run_transaction"])
def test_deadline_exceeded_in_a_transaction_body(account: Account, operation: str) -> None:
    """The same condition as above (the server stops a statement at the caller's
    deadline) inside a transaction: the same error, whichever way the work was called."""

    async def main() -> tuple[BaseException, float]:
        async with make(account.url()) as db:
            await db.ready()

            async def body(tx: Any) -> None:
                await tx.execute("SELECT pg_sleep(5)")

            async def work() -> None:
                if operation == "transaction":
                    async with db.transaction(timeout=0.4) as tx:
                        await body(tx)
                else:
                    await db.run_transaction(body, timeout=0.4)

            started = time.monotonic()
            with pytest.raises(Exception) as info:
                await work()
            return info.value, time.monotonic() - started

    error, elapsed = run(main)
    assert elapsed < 2
    assert_unusable(error, DeadlineExceeded)
    assert isinstance(error, DeadlineExceeded)
    assert type(error.last_error) is psycopg.errors.QueryCanceled, repr(error.last_error)
    assert_no_secret(error, account.password)


# --- DatabaseUnavailable ----------------------------------------------------------------------


def test_database_unavailable_when_the_breaker_is_open(account: Account, fault_proxy: Any) -> None:
    """The server becomes unreachable (connections dropped, new ones refused); callers
    without a deadline keep calling until the breaker opens, then fail fast."""

    async def main() -> tuple[BaseException, float, BaseException]:
        db = make(
            fault_proxy.url_for(account.url()),
            breaker_threshold=2,
            breaker_min_outage=0.05,
            breaker_cooldown=5.0,
            breaker_max_cooldown=5.0,
            connect_timeout=1.0,
            acquire_timeout=2.0,
            retry_attempts=1,
        )
        try:
            await db.ready()
            assert await db.fetchval("SELECT 1") == 1
            fault_proxy.refuse()
            fault_proxy.drop_connections()
            before: list[str] = []  # what callers got before the breaker opened
            error: BaseException | None = None
            give_up = time.monotonic() + 15
            while error is None and time.monotonic() < give_up:
                try:
                    await db.fetchval("SELECT 1")
                except DatabaseUnavailable as exc:
                    error = exc
                except Exception as exc:
                    before.append(type(exc).__name__)
                    await sleep(0.05)
            assert error is not None, f"the breaker never opened; callers got {before}"
            # Open: the next caller without a deadline fails at once, and so does one
            # whose deadline ends before the next probe.
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable):
                await db.fetchval("SELECT 1")
            with pytest.raises(DatabaseUnavailable) as short:
                await db.fetchval("SELECT 1", timeout=0.5)
            fast = time.monotonic() - started
            return error, fast, short.value
        finally:
            fault_proxy.heal()
            await db.close()

    error, fast, short = run(main)
    assert fast < 0.5, f"two calls on an open breaker took {fast:.3f}s"
    for exc in (error, short):
        assert_unusable(exc, DatabaseUnavailable)
        assert isinstance(exc, DatabaseUnavailable)
        assert exc.retry_after is not None
        assert 0 < exc.retry_after <= 5.0, exc.retry_after
        cause = exc.__cause__
        # The last connect failure itself, with its psycopg type.
        assert isinstance(cause, psycopg.OperationalError), repr(cause)
        assert "refused" in str(cause).lower(), str(cause)
        assert_no_secret(exc, account.password)


# --- HandleClosed -----------------------------------------------------------------------------


def test_handle_closed_for_every_entry_point(account: Account) -> None:
    async def main() -> list[BaseException]:
        db = make(account.url())
        assert await db.fetchval("SELECT 1") == 1
        await db.close()
        errors: list[BaseException] = []

        async def body(tx: Any) -> None:
            await tx.execute("SELECT 1")

        async def transaction() -> None:
            async with db.transaction() as tx:
                await body(tx)

        async def connection() -> None:
            async with db.connection():
                pass

        entry_points: list[Callable[[], Any]] = [
            lambda: db.fetchval("SELECT 1"),
            lambda: db.execute("SELECT 1", timeout=1),
            transaction,
            lambda: db.run_transaction(body),
            connection,
            db.ready,
        ]
        for entry_point in entry_points:
            with pytest.raises(HandleClosed) as info:
                await entry_point()
            errors.append(info.value)
        return errors

    for error in run(main):
        assert_unusable(error, HandleClosed)
        assert_no_secret(error, account.password)


# --- NotCommitted -----------------------------------------------------------------------------


def test_not_committed_when_the_connection_is_lost_before_commit(
    account: Account, fault_proxy: Any, table: str
) -> None:
    tag = marker()

    async def main() -> BaseException:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()

            async def transaction() -> None:
                async with db.transaction() as tx:
                    # The server runs the INSERT; its answer never arrives.
                    fault_proxy.cut_on(tag.encode(), when="after")
                    await tx.execute(f"INSERT INTO {table}(tag) VALUES (%s) /* {tag} */", [tag])

            with pytest.raises(NotCommitted) as info:
                await transaction()
            assert fault_proxy.cuts == 1
            return info.value

    error = run(main)
    assert_outcome(error, NotCommitted)
    assert not isinstance(error, OutcomeUnknown)
    connection_error(error)
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 0  # the server rolled it back


def test_not_committed_when_the_backend_is_terminated_in_a_transaction(
    account: Account, table: str
) -> None:
    """An administrator (or a failover) terminates the session mid-transaction: the
    server says so (57P01) and the connection is gone, so nothing committed."""
    tag = marker()

    async def main() -> BaseException:
        async with make(account.url()) as db:
            await db.ready()

            async def transaction() -> None:
                async with db.transaction() as tx:
                    await tx.execute(f"INSERT INTO {table}(tag) VALUES (%s)", [tag])
                    await tx.execute("SELECT pg_terminate_backend(pg_backend_pid())")

            with pytest.raises(Exception) as info:
                await transaction()
            return info.value

    error = run(main)
    assert_outcome(error, NotCommitted)
    cause = error.__cause__
    assert type(cause) is psycopg.errors.AdminShutdown, repr(cause)
    assert cause.sqlstate == "57P01"
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 0


def test_not_committed_when_a_lost_commit_resolves_as_aborted(
    account: Account, fault_proxy: Any, table: str
) -> None:
    tag = marker()

    async def main() -> tuple[BaseException, dict[str, int]]:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()

            async def transaction() -> None:
                async with db.transaction() as tx:
                    await tx.execute(f"INSERT INTO {table}(tag) VALUES (%s)", [tag])
                    # COMMIT never reaches the server: txid_status() then says aborted.
                    fault_proxy.cut_on(b"COMMIT", when="before")

            with pytest.raises(NotCommitted) as info:
                await transaction()
            return info.value, db.stats()["counters"]["ambiguous_commits"]

    error, ambiguous = run(main)
    assert_outcome(error, NotCommitted)
    connection_error(error)
    assert ambiguous == {"aborted": 1}
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 0


def test_run_transaction_reruns_work_that_was_not_committed(
    account: Account, fault_proxy: Any, table: str
) -> None:
    tag = marker()

    async def main() -> tuple[int, int]:
        calls = 0
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()

            async def body(tx: Any) -> int:
                nonlocal calls
                calls += 1
                if calls == 1:
                    fault_proxy.cut_on(tag.encode(), when="after")
                return int(
                    await tx.fetchval(
                        f"INSERT INTO {table}(tag) VALUES (%s) RETURNING id /* {tag} */", [tag]
                    )
                )

            row_id = await db.run_transaction(body)
            return calls, row_id

    calls, row_id = run(main)
    assert calls == 2
    assert row_id > 0
    assert rows_tagged(account.server, table, tag) == 1


def test_write_under_a_deadline_lost_before_commit_is_sent_again(
    account: Account, fault_proxy: Any, table: str
) -> None:
    # Under a deadline a write runs as BEGIN ... COMMIT: lost before COMMIT, nothing
    # committed (NotCommitted inside), so it is sent again and commits once.
    tag = marker()

    async def main() -> int:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()
            fault_proxy.cut_on(tag.encode(), when="after")
            count = await db.execute(
                f"INSERT INTO {table}(tag) VALUES (%s) /* {tag} */", [tag], timeout=10
            )
            assert fault_proxy.cuts == 1
            return count

    assert run(main) == 1
    assert rows_tagged(account.server, table, tag) == 1


# --- AmbiguousCommitError ---------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["transaction", "run_transaction"])
def test_ambiguous_commit_when_commit_resolution_is_off(
    account: Account, fault_proxy: Any, table: str, operation: str
) -> None:
    tag = marker()

    async def main() -> tuple[BaseException, int]:
        calls = 0
        async with make(fault_proxy.url_for(account.url()), resolve_commits=False) as db:
            await db.ready()

            async def body(tx: Any) -> None:
                nonlocal calls
                calls += 1
                await tx.execute(f"INSERT INTO {table}(tag) VALUES (%s)", [tag])
                # The server commits; its answer never arrives.
                fault_proxy.cut_on(b"COMMIT", when="after")

            async def work() -> None:
                if operation == "transaction":
                    async with db.transaction() as tx:
                        await body(tx)
                else:
                    await db.run_transaction(body)

            with pytest.raises(AmbiguousCommitError) as info:
                await work()
            return info.value, calls

    error, calls = run(main)
    assert_outcome(error, AmbiguousCommitError)
    assert isinstance(error, OutcomeUnknown)
    assert isinstance(error, AmbiguousCommitError)
    assert error.txid is None  # resolution is off: the id was never asked for
    assert calls == 1  # never re-run by run_transaction
    connection_error(error)
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 1  # it did commit


@pytest.mark.parametrize(
    ("operation", "timeout"),
    [
        ("transaction", None),
        ("transaction", 1.5),
        ("run_transaction", None),
        ("run_transaction", 1.5),
        ("execute", 6.0),
        ("execute", 1.5),
    ],
)
def test_ambiguous_commit_when_the_outcome_cannot_be_resolved(
    account: Account, fault_proxy: Any, table: str, operation: str, timeout: float | None
) -> None:
    """COMMIT is cut after the server committed, and nothing can ask txid_status(): new
    connections are refused, and the only pooled one (max_size=1) is the lost one.

    Resolution gives up after max(connect_timeout, 2 s) or at the deadline, whichever
    comes first. With timeout=1.5 it uses up the whole deadline: the answer must still be
    AmbiguousCommitError (the outcome is unknown), not DeadlineExceeded, which would read
    as "the database could not be used" and invite a blind re-run."""
    tag = marker()

    async def main() -> tuple[BaseException, int, float]:
        calls = 0
        url = fault_proxy.url_for(account.url())
        async with make(url, max_size=1, connect_timeout=1.0) as db:
            await db.ready()
            assert await db.fetchval("SELECT 1") == 1

            def arm() -> None:
                fault_proxy.refuse()  # open connections carry on; new ones are refused
                fault_proxy.cut_on(b"COMMIT", when="after")

            async def body(tx: Any) -> None:
                nonlocal calls
                calls += 1
                await tx.execute(f"INSERT INTO {table}(tag) VALUES (%s)", [tag])
                arm()

            async def work() -> None:
                nonlocal calls
                if operation == "transaction":
                    async with db.transaction(timeout=timeout) as tx:
                        await body(tx)
                elif operation == "run_transaction":
                    await db.run_transaction(body, timeout=timeout)
                else:
                    arm()
                    calls += 1
                    await db.execute(
                        f"INSERT INTO {table}(tag) VALUES (%s)", [tag], timeout=timeout
                    )

            started = time.monotonic()
            try:
                with pytest.raises(OutcomeUnknown) as info:
                    await work()
            finally:
                fault_proxy.heal()
            return info.value, calls, time.monotonic() - started

    error, calls, elapsed = run(main)
    assert_outcome(error, AmbiguousCommitError)
    assert isinstance(error, AmbiguousCommitError)
    assert isinstance(error.txid, int)  # for reconciliation
    assert calls == 1
    assert elapsed < (timeout or 30) + 0.5
    connection_error(error)
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 1  # it did commit


# --- OutcomeUnknown ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["by text", "write=True"])
def test_outcome_unknown_when_a_write_is_cut_after_it_ran(
    account: Account, fault_proxy: Any, table: str, how: str
) -> None:
    tag = marker()

    async def main() -> BaseException:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()
            fault_proxy.cut_on(tag.encode(), when="after")

            async def write() -> None:
                if how == "by text":
                    await db.execute(f"INSERT INTO {table}(tag) VALUES (%s) /* {tag} */", [tag])
                else:
                    await db.fetchval(f"SELECT {table}_add(%s) /* {tag} */", [tag], write=True)

            with pytest.raises(OutcomeUnknown) as info:
                await write()
            assert fault_proxy.cuts == 1
            return info.value

    error = run(main)
    assert_outcome(error, OutcomeUnknown)  # exactly OutcomeUnknown: no COMMIT was involved
    assert not isinstance(error, NotCommitted)
    assert isinstance(error, OutcomeUnknown)
    assert error.txid is None
    connection_error(error)
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 1  # it ran once and was not re-sent


def test_outcome_unknown_when_a_hidden_write_is_cut_after_it_ran(
    account: Account, fault_proxy: Any, table: str
) -> None:
    """``SELECT <table>_add(...)`` reads as a read; it is re-sent only inside BEGIN READ
    ONLY, the server refuses it (25006), and since the first attempt may have run (it
    did), the caller gets OutcomeUnknown caused by the lost connection, not by 25006."""
    tag = marker()

    async def main() -> BaseException:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()
            fault_proxy.cut_on(tag.encode(), when="after")
            with pytest.raises(OutcomeUnknown) as info:
                await db.fetchval(f"SELECT {table}_add(%s) /* {tag} */", [tag])
            return info.value

    error = run(main)
    assert_outcome(error, OutcomeUnknown)
    assert not isinstance(error.__cause__, psycopg.errors.ReadOnlySqlTransaction)
    connection_error(error)
    assert_no_secret(error, account.password)
    assert rows_tagged(account.server, table, tag) == 1  # ran once, never twice


def test_idempotent_write_cut_after_it_ran_is_sent_again(
    account: Account, fault_proxy: Any, table: str
) -> None:
    tag = marker()

    async def main() -> int:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()
            fault_proxy.cut_on(tag.encode(), when="after")
            count = await db.execute(
                f"INSERT INTO {table}(tag) VALUES (%s) /* {tag} */", [tag], idempotent=True
            )
            assert fault_proxy.cuts == 1
            return count

    assert run(main) == 1
    # The caller vouched that running it twice is harmless: it was re-sent.
    assert rows_tagged(account.server, table, tag) == 2


def test_read_cut_after_it_ran_is_sent_again(account: Account, fault_proxy: Any) -> None:
    tag = marker()

    async def main() -> Any:
        async with make(fault_proxy.url_for(account.url())) as db:
            await db.ready()
            fault_proxy.cut_on(tag.encode(), when="after")
            value = await db.fetchval(f"SELECT 'served' /* {tag} */")
            assert fault_proxy.cuts == 1
            return value

    assert run(main) == "served"
