"""Failure classification, retry safety and read/write detection (pure, no database)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from typing import Any

import psycopg
import psycopg.errors
import psycopg_pool
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden._handle.waits import WaitTimeout
from pgwarden.core import classify as classify_module
from pgwarden.core.classify import (
    FailureKind,
    Phase,
    RetryContext,
    classify,
    classify_failure,
    classify_with_reason,
    is_retryable,
    is_transaction_retryable,
    is_write_sql,
    sqlstate_of,
)
from pgwarden.errors import (
    AcquireTimeout,
    AmbiguousCommitError,
    DatabaseUnavailable,
    DeadlineExceeded,
    HandleClosed,
    NotCommitted,
    PgwardenError,
)

K = FailureKind
ALL_PHASES = list(Phase)


class FakeError(Exception):
    """An exception shaped like a driver error, without importing one."""

    def __init__(self, message: str = "", sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def named(name: str, base: type[Exception] = Exception) -> type[Exception]:
    return type(name, (base,), {})


BROKEN = {
    Phase.CONNECT: K.NOTHING_RAN,
    Phase.FIRST_USE: K.STALE,
    Phase.STATEMENT: K.LOST,
    Phase.COMMIT: K.LOST_COMMIT,
}
TIMED_OUT = {
    Phase.CONNECT: K.NOTHING_RAN,
    Phase.FIRST_USE: K.TIMEOUT,
    Phase.STATEMENT: K.TIMEOUT,
    Phase.COMMIT: K.LOST_COMMIT,
}


def every_phase(kind: FailureKind) -> dict[Phase, FailureKind]:
    return dict.fromkeys(Phase, kind)


# --- SQLSTATE ----------------------------------------------------------------------------------

SQLSTATE_CASES: list[tuple[str, dict[Phase, FailureKind]]] = [
    ("57P03", every_phase(K.NOTHING_RAN)),
    ("08001", every_phase(K.NOTHING_RAN)),
    ("08004", every_phase(K.NOTHING_RAN)),
    ("53300", every_phase(K.OVERLOAD)),
    ("53200", every_phase(K.OVERLOAD)),
    ("53000", every_phase(K.OVERLOAD)),
    ("53100", every_phase(K.PERMANENT)),
    ("53400", every_phase(K.PERMANENT)),
    ("57P01", BROKEN),
    ("57P02", BROKEN),
    ("57P05", BROKEN),
    ("25P03", BROKEN),
    ("40003", BROKEN),
    ("08000", BROKEN),
    ("08003", BROKEN),
    ("08006", BROKEN),
    ("08007", BROKEN),
    ("08P01", BROKEN),
    ("40001", every_phase(K.CONFLICT)),
    ("40P01", every_phase(K.CONFLICT)),
    ("25006", every_phase(K.FAILOVER)),
    ("57014", every_phase(K.TIMEOUT)),
    ("55P03", every_phase(K.TIMEOUT)),
    ("25P04", every_phase(K.TIMEOUT)),
    ("57P04", every_phase(K.PERMANENT)),
    ("28P01", every_phase(K.PERMANENT)),
    ("28000", every_phase(K.PERMANENT)),
    ("3D000", every_phase(K.PERMANENT)),
    ("42P01", every_phase(K.PERMANENT)),
    ("42601", every_phase(K.PERMANENT)),
    ("23505", every_phase(K.PERMANENT)),
    ("22012", every_phase(K.PERMANENT)),
    ("0A000", every_phase(K.PERMANENT)),
    ("XX000", every_phase(K.PERMANENT)),
    ("P0001", every_phase(K.PERMANENT)),
    ("40002", every_phase(K.PERMANENT)),
]


@pytest.mark.parametrize(("sqlstate", "expected"), SQLSTATE_CASES)
def test_sqlstate_with_fake(sqlstate: str, expected: dict[Phase, FailureKind]) -> None:
    exc = FakeError("some server message", sqlstate)
    assert {phase: classify(exc, phase) for phase in Phase} == expected


@pytest.mark.parametrize(("sqlstate", "expected"), SQLSTATE_CASES)
def test_sqlstate_with_real_psycopg_class(
    sqlstate: str, expected: dict[Phase, FailureKind]
) -> None:
    exc = psycopg.errors.lookup(sqlstate)("some server message")
    assert {phase: classify(exc, phase) for phase in Phase} == expected


def test_sqlstate_beats_misleading_text() -> None:
    # A unique violation whose message happens to mention a connection word.
    exc = psycopg.errors.lookup("23505")('duplicate key "connection refused"')
    assert classify(exc, Phase.STATEMENT) is K.PERMANENT


def test_every_sqlstate_rule_is_documented() -> None:
    doc = classify_module.__doc__
    assert doc is not None
    for code in classify_module._BY_SQLSTATE:
        assert code in doc, code


def test_every_text_rule_is_documented() -> None:
    doc = " ".join((classify_module.__doc__ or "").lower().split())
    for pattern, _ in classify_module._BY_TEXT:
        words = pattern.split()
        assert any(w in doc for w in words), pattern


# --- connect failures without SQLSTATE (libpq / server FATAL texts) ---------------------------

LIBPQ = 'connection failed: connection to server at "10.0.0.5", port 5432 failed: '

CONNECT_TEXTS: list[tuple[str, FailureKind]] = [
    (LIBPQ + "FATAL:  sorry, too many clients already", K.OVERLOAD),
    (
        LIBPQ + "FATAL:  remaining connection slots are reserved for non-replication "
        "superuser connections",
        K.OVERLOAD,
    ),
    (
        LIBPQ + "FATAL:  remaining connection slots are reserved for roles with the "
        "SUPERUSER attribute",
        K.OVERLOAD,
    ),
    (LIBPQ + 'FATAL:  too many connections for role "app"', K.OVERLOAD),
    (LIBPQ + 'FATAL:  too many connections for database "app"', K.OVERLOAD),
    (LIBPQ + "FATAL:  the database system is starting up", K.NOTHING_RAN),
    (LIBPQ + "FATAL:  the database system is shutting down", K.NOTHING_RAN),
    (LIBPQ + "FATAL:  the database system is in recovery mode", K.NOTHING_RAN),
    (LIBPQ + "FATAL:  the database system is not yet accepting connections", K.NOTHING_RAN),
    (LIBPQ + "FATAL:  the database system is not accepting connections", K.NOTHING_RAN),
    (
        LIBPQ + "Connection refused\n\tIs the server running on that host and accepting "
        "TCP/IP connections?",
        K.NOTHING_RAN,
    ),
    (
        'connection failed: connection to server on socket "/run/postgresql/.s.PGSQL.5432" '
        "failed: No such file or directory\n\tIs the server running locally and accepting "
        "connections on that socket?",
        K.NOTHING_RAN,
    ),
    (LIBPQ + "timeout expired", K.NOTHING_RAN),
    (
        'connection failed: could not translate host name "db.example" to address: '
        "Name or service not known",
        K.NOTHING_RAN,
    ),
    ("connection failed: Temporary failure in name resolution", K.NOTHING_RAN),
    (LIBPQ + "Network is unreachable", K.NOTHING_RAN),
    (LIBPQ + "No route to host", K.NOTHING_RAN),
    ("could not connect to server: Connection refused", K.NOTHING_RAN),
    (LIBPQ + 'FATAL:  password authentication failed for user "app"', K.PERMANENT),
    (
        LIBPQ + 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "app", database '
        '"app", no encryption',
        K.PERMANENT,
    ),
    (LIBPQ + 'FATAL:  database "nope" does not exist', K.PERMANENT),
    (LIBPQ + 'FATAL:  role "nobody" does not exist', K.PERMANENT),
    (LIBPQ + 'FATAL:  Ident authentication failed for user "app"', K.PERMANENT),
    (LIBPQ + "fe_sendauth: no password supplied", K.PERMANENT),
    (LIBPQ + "server does not support SSL, but SSL was required", K.PERMANENT),
    (LIBPQ + "SSL error: certificate verify failed", K.PERMANENT),
    (LIBPQ + 'FATAL:  database "tmpl" is not currently accepting connections', K.PERMANENT),
    (
        LIBPQ + "server closed the connection unexpectedly\n\tThis probably means the server "
        "terminated abnormally\n\tbefore or while processing the request.",
        K.NOTHING_RAN,
    ),
    ("connection is bad: connection pointer is NULL", K.NOTHING_RAN),
    # PgBouncer, which prefixes its own errors with 08P01 or nothing at all
    (LIBPQ + "FATAL:  no more connections allowed (max_client_conn)", K.OVERLOAD),
    (
        LIBPQ + "ERROR:  server login has been failing, try again later (server_login_retry)",
        K.NOTHING_RAN,
    ),
    (LIBPQ + "ERROR:  pgbouncer cannot connect to server", K.NOTHING_RAN),
    (LIBPQ + "ERROR:  client_login_timeout (server down)", K.NOTHING_RAN),
    (LIBPQ + 'ERROR:  no such database: "nope"', K.PERMANENT),
    (LIBPQ + "ERROR:  no such user: app", K.PERMANENT),
    (LIBPQ + "ERROR:  unsupported startup parameter: options", K.PERMANENT),
    (LIBPQ + "ERROR:  SASL authentication failed", K.PERMANENT),
    # PgBouncer 1.18, query_timeout below query_wait_timeout, server down: the login
    # waited in the queue and never reached a server.
    (LIBPQ + "FATAL:  query_timeout", K.OVERLOAD),
    # libpq found no host that fits target_session_attrs (e.g. read-write while every
    # host is a standby during a failover): nothing ran, try again later.
    (LIBPQ + "session is read-only", K.NOTHING_RAN),
    (LIBPQ + "session is not read-only", K.NOTHING_RAN),
    (LIBPQ + "server is in hot standby mode", K.NOTHING_RAN),
    (LIBPQ + "server is not in hot standby mode", K.NOTHING_RAN),
    ('could not make a writable connection to server "10.0.0.5:5432"', K.NOTHING_RAN),
]


@pytest.mark.parametrize(("message", "expected"), CONNECT_TEXTS)
def test_connect_failure_texts(message: str, expected: FailureKind) -> None:
    exc = psycopg.OperationalError(message)
    assert sqlstate_of(exc) is None
    assert classify(exc, Phase.CONNECT) is expected


def test_the_brief_example() -> None:
    exc = psycopg.OperationalError("connection failed: ... FATAL:  sorry, too many clients already")
    assert classify(exc, Phase.CONNECT) is K.OVERLOAD
    assert classify_with_reason(exc, Phase.CONNECT) == (
        K.OVERLOAD,
        "text 'too many clients already'",
    )


def test_text_matching_ignores_case() -> None:
    assert classify(FakeError("SORRY, TOO MANY CLIENTS ALREADY"), Phase.CONNECT) is K.OVERLOAD


def test_several_hosts_permanent_beats_overload_beats_nothing_ran() -> None:
    joined = (
        LIBPQ + "Connection refused\nMultiple connection attempts failed. All failures were:\n"
        "- host: 'a', port: None, hostaddr: None: Connection refused\n"
        "- host: 'b', port: None, hostaddr: None: FATAL:  sorry, too many clients already"
    )
    assert classify(psycopg.OperationalError(joined), Phase.CONNECT) is K.OVERLOAD
    joined += "\n- host: 'c', port: None: FATAL:  password authentication failed for user \"x\""
    assert classify(psycopg.OperationalError(joined), Phase.CONNECT) is K.PERMANENT


# --- failures on an established connection -----------------------------------------------------

BROKEN_TEXTS = [
    "consuming input failed: server closed the connection unexpectedly",
    "consuming input failed: SSL connection has been closed unexpectedly",
    "SSL SYSCALL error: EOF detected",
    "the connection is closed",
    "flushing failed: the connection is closed",
    "the connection is lost",
    "could not receive data from server: Connection reset by peer",
    "could not send data to server: Broken pipe",
    "no connection to the server",
    'lost synchronization with server: got message type "x"',
    "could not receive data from server: Connection timed out",
    "terminating connection due to administrator command",
    "terminating connection due to idle-session timeout",
    # PgBouncer
    "server conn crashed?",
    "client_idle_timeout",
    "idle transaction timeout",
    "database removed",
    "database configuration changed",
]


@pytest.mark.parametrize("message", BROKEN_TEXTS)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_broken_connection_depends_on_phase(message: str, phase: Phase) -> None:
    assert classify(psycopg.OperationalError(message), phase) is BROKEN[phase]


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_pgbouncer_query_wait_timeout_is_overload_in_every_phase(phase: Phase) -> None:
    # PgBouncer never handed the query to a server, so even a write is safe to resend.
    exc = psycopg.errors.lookup("08P01")("query_wait_timeout")
    assert classify(exc, phase) is K.OVERLOAD
    assert classify(FakeError("ERROR:  query_wait_timeout"), phase) is K.OVERLOAD


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_pgbouncer_query_timeout(phase: Phase) -> None:
    exc = psycopg.errors.lookup("08P01")("query timeout")
    assert classify(exc, phase) is TIMED_OUT[phase]


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_pgbouncer_query_timeout_while_queued_is_overload(phase: Phase) -> None:
    # "query_timeout" (underscore) goes only to clients still waiting for a server, so
    # the query was never sent; "query timeout" (space) goes to one that was running.
    exc = psycopg.errors.lookup("08P01")("query_timeout")
    assert classify(exc, phase) is K.OVERLOAD


def test_several_hosts_none_fits_target_session_attrs() -> None:
    joined = (
        LIBPQ + "session is read-only\nMultiple connection attempts failed. All failures were:\n"
        "- host: 'a', port: '5432', hostaddr: '10.0.0.5': session is read-only\n"
        "- host: 'b', port: '5432', hostaddr: '10.0.0.6': Connection refused"
    )
    assert classify(psycopg.OperationalError(joined), Phase.CONNECT) is K.NOTHING_RAN


def test_pgbouncer_login_failing_during_a_statement_means_nothing_ran() -> None:
    exc = psycopg.errors.lookup("08P01")(
        "server login has been failing, try again later (server_login_retry)"
    )
    assert classify(exc, Phase.STATEMENT) is K.NOTHING_RAN


def test_class_08_without_useful_text_depends_on_phase() -> None:
    exc = psycopg.errors.lookup("08P01")("protocol violation")
    assert classify(exc, Phase.FIRST_USE) is K.STALE
    assert classify(exc, Phase.COMMIT) is K.LOST_COMMIT


def test_admin_shutdown_real_class() -> None:
    exc = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    assert classify(exc, Phase.FIRST_USE) is K.STALE
    assert classify(exc, Phase.STATEMENT) is K.LOST
    assert classify_with_reason(exc, Phase.STATEMENT)[1] == (
        "sqlstate 57P01 (connection broken in statement)"
    )


# --- classes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_pool_timeout_means_nothing_ran(phase: Phase) -> None:
    assert classify(psycopg_pool.PoolTimeout("couldn't get a connection"), phase) is K.NOTHING_RAN
    assert classify(named("PoolTimeout")("x"), phase) is K.NOTHING_RAN


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_pool_classes(phase: Phase) -> None:
    assert classify(psycopg_pool.TooManyRequests("queue full"), phase) is K.NOTHING_RAN
    assert classify(psycopg_pool.PoolClosed("the pool is closed"), phase) is K.PERMANENT


@pytest.mark.parametrize("phase", ALL_PHASES)
def test_psycopg_connection_timeout(phase: Phase) -> None:
    exc = psycopg.errors.ConnectionTimeout("connection timeout expired")
    assert classify(exc, phase) is K.NOTHING_RAN


def test_psycopg_cancellation_timeout() -> None:
    exc = psycopg.errors.CancellationTimeout("cancellation timeout expired")
    assert classify(exc, Phase.STATEMENT) is K.TIMEOUT
    assert classify(exc, Phase.COMMIT) is K.LOST_COMMIT


def test_psycopg_internal_wait_timeout_is_not_a_connect_timeout() -> None:
    # psycopg.errors._WaitTimeout exists only from psycopg 3.3.6 (the suite also runs
    # against 3.3.0); the rule matches it by class name, so a same-named class tests it.
    wait_timeout = getattr(psycopg.errors, "_WaitTimeout", None) or named(
        "_WaitTimeout", psycopg.OperationalError
    )
    exc = wait_timeout("wait timeout expired")
    assert classify(exc, Phase.STATEMENT) is K.TIMEOUT


def test_subclass_of_a_known_class_is_recognised_through_the_mro() -> None:
    sub = named("MyPoolTimeout", named("PoolTimeout"))
    assert classify(sub("x"), Phase.STATEMENT) is K.NOTHING_RAN


@pytest.mark.parametrize(
    "exc",
    [
        DeadlineExceeded("deadline passed", last_error=ConnectionRefusedError()),
        HandleClosed("closing: too many clients already"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(1),
        GeneratorExit(),
    ],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_our_own_errors_and_cancellation_are_never_retried(
    exc: BaseException, phase: Phase
) -> None:
    assert classify(exc, phase) is K.PERMANENT


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "Connection refused"), every_phase(K.NOTHING_RAN)),
        (ConnectionRefusedError(), every_phase(K.NOTHING_RAN)),
        (ConnectionResetError(), BROKEN),
        (BrokenPipeError(), BROKEN),
        (ConnectionAbortedError(), BROKEN),
        (TimeoutError(), TIMED_OUT),
        (
            named("gaierror", OSError)(-2, "nodename nor servname provided"),
            every_phase(K.NOTHING_RAN),
        ),
    ],
)
def test_python_builtin_network_errors(
    exc: BaseException, expected: dict[Phase, FailureKind]
) -> None:
    assert {phase: classify(exc, phase) for phase in Phase} == expected


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        RuntimeError("connection"),
        psycopg.OperationalError("sending query failed: another command is already in progress"),
        psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters were passed"),
        psycopg.InterfaceError("something odd"),
        FakeError(""),
    ],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_unknown_is_permanent(exc: Exception, phase: Phase) -> None:
    kind, reason = classify_with_reason(exc, phase)
    assert kind is K.PERMANENT
    assert reason.startswith("unrecognised ")


def test_reason_never_carries_the_message() -> None:
    secret = "hunter2"
    exc = psycopg.OperationalError(f"password={secret} FATAL:  sorry, too many clients already")
    _, reason = classify_with_reason(exc, Phase.CONNECT)
    assert secret not in reason


def test_classify_never_raises_on_hostile_exceptions() -> None:
    class Hostile(Exception):
        @property
        def sqlstate(self) -> str:
            raise RuntimeError("boom")

        def __str__(self) -> str:
            raise RuntimeError("boom")

    assert sqlstate_of(Hostile()) is None
    assert classify(Hostile(), Phase.STATEMENT) is K.PERMANENT


@given(
    message=st.text(max_size=200),
    sqlstate=st.one_of(
        st.none(), st.text(max_size=6), st.from_regex(r"[0-9A-Z]{5}", fullmatch=True)
    ),
    phase=st.sampled_from(Phase),
)
def test_classify_is_total(message: str, sqlstate: str | None, phase: Phase) -> None:
    kind, reason = classify_with_reason(FakeError(message, sqlstate), phase)
    assert isinstance(kind, FailureKind)
    assert reason


# --- sqlstate_of --------------------------------------------------------------------------------


def test_sqlstate_of_sources() -> None:
    assert sqlstate_of(FakeError("x", "40001")) == "40001"
    assert sqlstate_of(FakeError("x", "40p01")) == "40P01"
    assert sqlstate_of(psycopg.errors.lookup("57P01")("x")) == "57P01"

    class Psycopg2Style(Exception):
        pgcode = "23505"

    assert sqlstate_of(Psycopg2Style()) == "23505"

    class Diag:
        sqlstate = "53300"

    class WithDiag(Exception):
        sqlstate = None
        diag = Diag()

    assert sqlstate_of(WithDiag()) == "53300"


@pytest.mark.parametrize("bad", [None, "", "4000", "400011", 40001, b"40001", "40 01"])
def test_sqlstate_of_rejects_malformed(bad: Any) -> None:
    assert sqlstate_of(FakeError("x", bad)) is None


def test_sqlstate_of_plain_exceptions() -> None:
    assert sqlstate_of(ValueError("x")) is None
    assert sqlstate_of(psycopg.OperationalError("connection failed")) is None


# --- is_retryable --------------------------------------------------------------------------------

READ = RetryContext(is_write=False)
WRITE = RetryContext(is_write=True)
IDEMPOTENT_WRITE = RetryContext(is_write=True, idempotent=True)

RETRY_TABLE = {
    # kind:          (read,  write, idempotent write)
    K.NOTHING_RAN: (True, True, True),
    K.OVERLOAD: (True, True, True),
    K.STALE: (True, True, True),
    K.LOST: (True, False, True),
    K.LOST_COMMIT: (False, False, False),
    K.CONFLICT: (True, True, True),
    K.FAILOVER: (True, True, True),
    K.PERMANENT: (False, False, False),
    K.TIMEOUT: (False, False, False),
}


@pytest.mark.parametrize(("kind", "expected"), RETRY_TABLE.items())
def test_retry_table(kind: FailureKind, expected: tuple[bool, bool, bool]) -> None:
    got = (
        is_retryable(kind, READ),
        is_retryable(kind, WRITE),
        is_retryable(kind, IDEMPOTENT_WRITE),
    )
    assert got == expected


def test_retry_table_covers_every_kind() -> None:
    assert set(RETRY_TABLE) == set(FailureKind)


@given(kind=st.sampled_from(FailureKind), is_write=st.booleans(), idempotent=st.booleans())
def test_nothing_is_retried_statement_by_statement_inside_a_transaction(
    kind: FailureKind, is_write: bool, idempotent: bool
) -> None:
    ctx = RetryContext(is_write=is_write, idempotent=idempotent, in_transaction=True)
    assert not is_retryable(kind, ctx)


@given(kind=st.sampled_from(FailureKind))
def test_retry_monotonicity(kind: FailureKind) -> None:
    # A write is never more retryable than a read; vouching never makes it less.
    assert is_retryable(kind, WRITE) <= is_retryable(kind, IDEMPOTENT_WRITE)
    assert is_retryable(kind, WRITE) <= is_retryable(kind, READ)
    # For a read, "idempotent" changes nothing.
    assert is_retryable(kind, READ) == is_retryable(
        kind, RetryContext(is_write=False, idempotent=True)
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (K.NOTHING_RAN, True),
        (K.OVERLOAD, True),
        (K.STALE, True),
        (K.LOST, True),
        (K.CONFLICT, True),
        (K.FAILOVER, True),
        (K.LOST_COMMIT, False),
        (K.PERMANENT, False),
        (K.TIMEOUT, False),
    ],
)
def test_is_transaction_retryable(kind: FailureKind, expected: bool) -> None:
    assert is_transaction_retryable(kind) is expected


def test_end_to_end_serialization_failure_in_transaction() -> None:
    exc = psycopg.errors.lookup("40001")("could not serialize access")
    kind = classify(exc, Phase.STATEMENT)
    assert not is_retryable(kind, RetryContext(is_write=True, in_transaction=True))
    assert is_transaction_retryable(kind)


def test_end_to_end_lost_write_is_not_retried_unless_idempotent() -> None:
    exc = psycopg.OperationalError("consuming input failed: server closed the connection")
    kind = classify(exc, Phase.STATEMENT)
    assert kind is K.LOST
    assert is_retryable(kind, READ)
    assert not is_retryable(kind, WRITE)
    assert is_retryable(kind, IDEMPOTENT_WRITE)


def test_end_to_end_lost_commit_is_never_retried() -> None:
    exc = psycopg.OperationalError("consuming input failed: server closed the connection")
    kind = classify(exc, Phase.COMMIT)
    assert kind is K.LOST_COMMIT
    assert not any(is_retryable(kind, ctx) for ctx in (READ, WRITE, IDEMPOTENT_WRITE))
    assert not is_transaction_retryable(kind)


# --- is_write_sql --------------------------------------------------------------------------------

READS = [
    "SELECT 1",
    "select * from po where vendor = %s",
    "  \n\tSELECT 1",
    "-- leading comment\nSELECT 1",
    "/* block */ SELECT 1",
    "/* nested /* comment */ still comment; DELETE FROM t */ SELECT 1",
    "(SELECT 1) UNION (SELECT 2)",
    "((select 1))",
    "VALUES (1), (2)",
    "TABLE po",
    "SHOW server_version",
    "EXPLAIN DELETE FROM po",
    "EXPLAIN VERBOSE UPDATE po SET x = 1",
    "EXPLAIN (COSTS OFF) INSERT INTO po VALUES (1)",
    "EXPLAIN (ANALYZE false) DELETE FROM po",
    "EXPLAIN (ANALYZE off, VERBOSE) DELETE FROM po",
    "EXPLAIN ANALYZE SELECT * FROM po",
    "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
    "WITH x AS (SELECT * FROM po FOR UPDATE) SELECT * FROM x",
    "WITH x AS (SELECT * FROM po FOR NO KEY UPDATE) SELECT * FROM x",
    "SELECT * FROM po FOR UPDATE",
    "SELECT 'DELETE FROM po'",
    "SELECT E'it\\'s; DELETE FROM po'",
    "SELECT 'it''s; DELETE FROM po'",
    'SELECT "delete" FROM po',
    'SELECT "weird "" insert" FROM po',
    "SELECT $$; DELETE FROM po$$",
    "SELECT $tag$ $$ ; DELETE $$ $tag$",
    "SELECT 1; SELECT 2;",
    "SELECT 1 -- ; DELETE FROM po",
    "",
    "   ",
    "-- only a comment",
    ";;",
    "select löhne from gehälter",
]

WRITES = [
    "INSERT INTO po VALUES (1)",
    "insert into po values (1)",
    "UPDATE po SET x = 1",
    "DELETE FROM po",
    "MERGE INTO po USING x ON true WHEN MATCHED THEN DELETE",
    "TRUNCATE po",
    "CREATE TABLE t (x int)",
    "DROP TABLE t",
    "ALTER TABLE t ADD COLUMN y int",
    "COPY po FROM STDIN",
    "CALL do_things()",
    "DO $$ BEGIN DELETE FROM po; END $$",
    "BEGIN",
    "COMMIT",
    "SET statement_timeout = 1000",
    "LOCK TABLE po",
    "VACUUM po",
    "ANALYZE po",
    "REFRESH MATERIALIZED VIEW mv",
    "NOTIFY chan",
    "EXECUTE stmt",
    "FETCH 10 FROM c",
    "SELECT * INTO new_table FROM po",
    "SELECT 1; DELETE FROM po",
    "SELECT 1; /* c */ UPDATE po SET x = 1",
    "WITH d AS (DELETE FROM po RETURNING *) SELECT * FROM d",
    "WITH i AS (INSERT INTO po VALUES (1) RETURNING id) SELECT id FROM i",
    "WITH u AS (UPDATE po SET x = 1 RETURNING *) SELECT 1",
    "WITH x AS (SELECT 1) INSERT INTO po SELECT * FROM x",
    "(WITH d AS (DELETE FROM po RETURNING *) SELECT * FROM d)",
    "EXPLAIN ANALYZE DELETE FROM po",
    "EXPLAIN ANALYSE VERBOSE UPDATE po SET x = 1",
    "EXPLAIN (ANALYZE) INSERT INTO po VALUES (1)",
    "EXPLAIN (ANALYZE true, COSTS off) DELETE FROM po",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM po RETURNING *) SELECT 1",
    "/* SELECT */ DELETE FROM po",
    "-- SELECT\nDELETE FROM po",
    "something unknown",
    "SELECT 'unterminated; DELETE",  # degenerate, but must not crash
]


@pytest.mark.parametrize("sql", READS)
def test_reads(sql: str) -> None:
    assert is_write_sql(sql) is False


@pytest.mark.parametrize("sql", [s for s in WRITES if "unterminated" not in s])
def test_writes(sql: str) -> None:
    assert is_write_sql(sql) is True


def test_unterminated_literal_does_not_crash() -> None:
    assert isinstance(is_write_sql("SELECT 'unterminated; DELETE"), bool)
    assert isinstance(is_write_sql("SELECT $x$ never closed"), bool)
    assert isinstance(is_write_sql("SELECT /* never closed"), bool)


def test_is_write_sql_is_cached_and_bounded() -> None:
    is_write_sql.cache_clear()
    is_write_sql("SELECT 42")
    is_write_sql("SELECT 42")
    info = is_write_sql.cache_info()
    assert info.hits == 1
    assert info.maxsize == 1024


@given(st.text(max_size=300))
def test_is_write_sql_is_total(sql: str) -> None:
    assert isinstance(is_write_sql(sql), bool)


@given(
    read=st.sampled_from([r for r in READS if r.strip() and "--" not in r]),
    write=st.sampled_from([w for w in WRITES if "unterminated" not in w and "--" not in w]),
)
def test_a_write_anywhere_makes_the_batch_a_write(read: str, write: str) -> None:
    assert is_write_sql(f"{read}; {write}")
    assert is_write_sql(f"{write}; {read}")


# --- import cost ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        "pgwarden.core.classify",
        "pgwarden.core.retry",
        "pgwarden.core.breaker",
        "pgwarden.core.lifecycle",
        "pgwarden.core.sizing",
        "pgwarden.core.deadline",
        "pgwarden.core.hygiene",
    ],
)
def test_core_module_imports_only_light_stdlib(module: str) -> None:
    code = (
        "import sys; import pgwarden.core; before = set(sys.modules); "
        f"import {module}; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = set(out.stdout.split())
    assert module in new
    for name in new:
        top = name.partition(".")[0]
        assert name.startswith("pgwarden.core.") or top in sys.stdlib_module_names, name
        assert top not in {"asyncio", "threading", "psycopg", "psycopg_pool"}, name


def test_pipeline_exit_on_a_dead_connection_is_broken() -> None:
    exc = psycopg.OperationalError("cannot exit pipeline mode while busy")
    assert classify(exc, Phase.STATEMENT) is FailureKind.LOST
    assert classify(exc, Phase.FIRST_USE) is FailureKind.STALE


# --- class-name rules: NotCommitted, WaitTimeout ----------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        NotCommitted("connection lost before COMMIT was sent"),
        type("MyNotCommitted", (NotCommitted,), {})("x"),
        named("NotCommitted")("a fake of the same name"),
    ],
)
def test_not_committed_means_nothing_ran_although_it_is_ours(exc: Exception) -> None:
    # Checked before its base PgwardenError, which is PERMANENT.
    assert {phase: classify(exc, phase) for phase in Phase} == every_phase(K.NOTHING_RAN)
    assert classify_with_reason(exc, Phase.STATEMENT)[1] == "class NotCommitted"
    for lost in (False, True):
        for in_tx in (False, True):
            kind = classify_failure(
                exc, Phase.STATEMENT, connection_lost=lost, in_transaction=in_tx
            )
            assert kind is K.NOTHING_RAN


@pytest.mark.parametrize(
    "exc",
    [AmbiguousCommitError("lost COMMIT", txid=7), PgwardenError("x"), AcquireTimeout("pool")],
)
def test_other_pgwarden_errors_stay_permanent(exc: Exception) -> None:
    assert {phase: classify(exc, phase) for phase in Phase} == every_phase(K.PERMANENT)


@pytest.mark.parametrize("cls", [WaitTimeout, named("WaitTimeout")], ids=["real", "fake"])
def test_wait_timeout_is_timed_out(cls: type[Exception]) -> None:
    exc = cls()
    assert {phase: classify(exc, phase) for phase in Phase} == TIMED_OUT
    assert classify_with_reason(exc, Phase.STATEMENT)[1].startswith("class WaitTimeout")


def test_wait_timeout_text_cannot_pass_for_a_connect_timeout() -> None:
    # libpq's "timeout expired" is NOTHING_RAN in every phase; the class rule wins over it.
    exc = WaitTimeout("wait timeout expired")
    assert classify(exc, Phase.STATEMENT) is K.TIMEOUT
    assert classify(exc, Phase.COMMIT) is K.LOST_COMMIT


def _documented_class_names() -> set[str]:
    doc = classify_module.__doc__ or ""
    table = doc.split("Class-name rules", 1)[1]
    return set(re.findall(r"^(\w+)\s", table, re.MULTILINE))


@pytest.mark.parametrize(
    "name",
    [name for name in [*classify_module._BY_CLASS_NAME, *classify_module._BY_BUILTIN_NAME]],
)
def test_every_class_rule_is_documented(name: str) -> None:
    assert name in _documented_class_names()


# --- classify_failure ---------------------------------------------------------------------------

SERVER_ABORTED = ["57P01", "57P02"]


@pytest.mark.parametrize("sqlstate", SERVER_ABORTED)
@pytest.mark.parametrize("real", [False, True], ids=["fake", "psycopg"])
def test_server_terminated_statement_outside_a_transaction_is_stale(
    sqlstate: str, real: bool
) -> None:
    message = "terminating connection due to administrator command"
    exc: Exception = (
        psycopg.errors.lookup(sqlstate)(message) if real else FakeError(message, sqlstate)
    )
    assert classify(exc, Phase.STATEMENT) is K.LOST
    # No transaction block: the implicit transaction never reached Sync, so nothing committed.
    assert classify_failure(exc, Phase.STATEMENT) is K.STALE
    assert classify_failure(exc, Phase.STATEMENT, connection_lost=True) is K.STALE
    # Inside one, the statement's effect is gone with the transaction, but the transaction
    # function may have done other things: it stays LOST.
    assert classify_failure(exc, Phase.STATEMENT, in_transaction=True) is K.LOST
    assert (
        classify_failure(exc, Phase.STATEMENT, connection_lost=True, in_transaction=True) is K.LOST
    )


@pytest.mark.parametrize("sqlstate", SERVER_ABORTED)
@pytest.mark.parametrize("in_transaction", [False, True])
def test_server_terminated_in_other_phases_is_unchanged(
    sqlstate: str, in_transaction: bool
) -> None:
    exc = FakeError("terminating connection", sqlstate)
    expected = {**BROKEN, Phase.STATEMENT: K.STALE if not in_transaction else K.LOST}
    got = {phase: classify_failure(exc, phase, in_transaction=in_transaction) for phase in Phase}
    assert got == expected
    # In particular a lost COMMIT is never made safe by the refinement.
    assert got[Phase.COMMIT] is K.LOST_COMMIT


@pytest.mark.parametrize("sqlstate", ["57P05", "25P03", "40003", "08006", "08003", "08P01"])
def test_other_broken_codes_are_not_refined(sqlstate: str) -> None:
    exc = FakeError("", sqlstate)
    assert classify_failure(exc, Phase.STATEMENT) is K.LOST
    assert classify_failure(exc, Phase.STATEMENT, connection_lost=True) is K.LOST


def test_the_refinement_needs_the_sqlstate_not_the_text() -> None:
    exc = FakeError("FATAL:  terminating connection due to administrator command")
    assert classify_failure(exc, Phase.STATEMENT) is K.LOST


UNRECOGNISED = [
    psycopg.OperationalError("sending query failed: another command is already in progress"),
    psycopg.InterfaceError("something odd"),
    FakeError(""),
    FakeError("a message nobody has seen before"),
]


@pytest.mark.parametrize("exc", UNRECOGNISED)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_unrecognised_error_on_a_lost_connection_is_broken(exc: Exception, phase: Phase) -> None:
    assert classify_failure(exc, phase) is K.PERMANENT
    assert classify_failure(exc, phase, connection_lost=True) is BROKEN[phase]


@pytest.mark.parametrize(
    "exc",
    [TimeoutError(), WaitTimeout(), FakeError("query timeout")],
    ids=["TimeoutError", "WaitTimeout", "pgbouncer-query-timeout"],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_timed_out_without_sqlstate_on_a_lost_connection_is_broken(
    exc: Exception, phase: Phase
) -> None:
    # Without the connection it is unknown whether the statement ran: the phase's "broken".
    assert classify_failure(exc, phase) is TIMED_OUT[phase]
    assert classify_failure(exc, phase, connection_lost=True) is BROKEN[phase]


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [("42601", K.PERMANENT), ("23505", K.PERMANENT), ("57014", K.TIMEOUT), ("55P03", K.TIMEOUT)],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_a_server_verdict_survives_a_lost_connection(
    sqlstate: str, kind: FailureKind, phase: Phase
) -> None:
    exc = FakeError("the server said so", sqlstate)
    assert classify_failure(exc, phase, connection_lost=True) is kind
    assert classify_failure(exc, phase, connection_lost=True, in_transaction=True) is kind


@pytest.mark.parametrize(
    "exc",
    [
        DeadlineExceeded("deadline passed", last_error=TimeoutError()),
        AcquireTimeout("no connection in time"),
        HandleClosed("closed"),
        DatabaseUnavailable("circuit open", retry_after=1.0),
        AmbiguousCommitError("unknown", txid=1),
    ],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_our_own_errors_stay_permanent_on_a_lost_connection(exc: Exception, phase: Phase) -> None:
    assert classify_failure(exc, phase, connection_lost=True) is K.PERMANENT


@pytest.mark.parametrize(
    "exc",
    [
        FakeError("sorry, too many clients already", "53300"),
        FakeError("could not serialize access", "40001"),
        FakeError("", "25006"),
        ConnectionRefusedError(),
        psycopg_pool.PoolTimeout("x"),
    ],
)
@pytest.mark.parametrize("phase", ALL_PHASES)
def test_recognised_kinds_are_not_changed_by_a_lost_connection(
    exc: Exception, phase: Phase
) -> None:
    assert classify_failure(exc, phase, connection_lost=True) is classify(exc, phase)


def test_cancellation_stays_permanent_on_a_lost_connection() -> None:
    for exc in (asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)):
        assert {phase: classify(exc, phase) for phase in Phase} == every_phase(K.PERMANENT)
        got = {phase: classify_failure(exc, phase, connection_lost=True) for phase in Phase}
        assert got == every_phase(K.PERMANENT), type(exc).__name__


@given(
    message=st.text(max_size=120),
    sqlstate=st.one_of(st.none(), st.from_regex(r"[0-9A-Z]{5}", fullmatch=True)),
    phase=st.sampled_from(Phase),
    lost=st.booleans(),
    in_tx=st.booleans(),
)
def test_classify_failure_refines_classify_only_where_documented(
    message: str, sqlstate: str | None, phase: Phase, lost: bool, in_tx: bool
) -> None:
    exc = FakeError(message, sqlstate)
    base = classify(exc, phase)
    kind = classify_failure(exc, phase, connection_lost=lost, in_transaction=in_tx)
    assert isinstance(kind, FailureKind)
    if kind is base:
        return
    if base is K.LOST and sqlstate in SERVER_ABORTED and not in_tx:
        assert kind is K.STALE
    else:
        assert lost
        assert sqlstate is None
        assert base in (K.PERMANENT, K.TIMEOUT)
        assert kind is BROKEN[phase]
    assert classify_failure(exc, phase) is base  # the defaults change nothing
