"""The poolers' own errors, as their sources write them (no pooler runs here).

PgCat, Supavisor and RDS Proxy cannot run in this suite, so each row below is a
message copied from the pooler's source (or, for RDS Proxy, its documentation),
with the SQLSTATE the source sends, in the shape psycopg raises it: a statement
error carries the SQLSTATE (``psycopg.errors.lookup(code)``), a refused
connection attempt only libpq's text (``FATAL:  <message>``). The citations are
in :mod:`pgwarden.core.classify`'s "pooler text rules" table. pgpool-II and
PgBouncer also run for real in ``tests/integration/test_pgpool.py`` and
``tests/integration/test_classify_real.py``.

Also here: the pure decisions those errors feed, :func:`server_refused_slots` and
:func:`overload_shrinks` (behind a pooler, a forwarded 53300 backs off without
shrinking), and the prepared-statement fallback of :mod:`pgwarden.core.prepared`,
plus how ``HandleState`` acts on both.
"""

from __future__ import annotations

import random
from typing import Any

import psycopg
import psycopg.errors
import pytest

from pgwarden import Settings
from pgwarden._handle.config import connect_kwargs, looks_relayed, prepare_threshold_for
from pgwarden._handle.state import HandleState
from pgwarden.core import classify as classify_module
from pgwarden.core.classify import (
    FailureKind,
    Phase,
    RetryContext,
    classify,
    classify_failure,
    classify_with_reason,
    server_refused_slots,
)
from pgwarden.core.prepared import connection_prepare_threshold, lost_prepared_statement
from pgwarden.core.retry import Sleep
from pgwarden.core.sizing import overload_shrinks

K = FailureKind
CONNECT = Phase.CONNECT
FIRST_USE = Phase.FIRST_USE
STATEMENT = Phase.STATEMENT
COMMIT = Phase.COMMIT

LIBPQ = 'connection failed: connection to server at "10.0.0.5", port 6432 failed: '


def at_connect(message: str) -> psycopg.OperationalError:
    """A refused connection attempt: psycopg has libpq's text and no SQLSTATE."""
    return psycopg.OperationalError(LIBPQ + "FATAL:  " + message)


def answered(sqlstate: str, message: str) -> psycopg.Error:
    """An ErrorResponse on an open connection: psycopg's class for the SQLSTATE."""
    exc: psycopg.Error = psycopg.errors.lookup(sqlstate)(message)
    assert exc.sqlstate == sqlstate
    return exc


# (id, exception, phase, kind, pattern that decides)
Row = tuple[str, BaseException, Phase, FailureKind, str]

PGCAT: list[Row] = [
    # Every PgCat error is 58000 (src/messages.rs:351); at login it arrives as libpq text.
    (
        "checkout failed",
        answered("58000", "could not get connection from the pool - AllServersDown"),
        STATEMENT,
        K.OVERLOAD,
        "could not get connection from the pool",
    ),
    (
        "checkout failure limit",
        answered("58000", "checkout failure limit reached (3 / 3)"),
        STATEMENT,
        K.OVERLOAD,
        "checkout failure limit reached",
    ),
    (
        "pool down at login",
        at_connect('Pool down for database: "app", user: "app"'),
        CONNECT,
        K.NOTHING_RAN,
        "pool down for database",
    ),
    (
        "pool down answered",
        answered("58000", 'Pool down for database: "app", user: "app"'),
        CONNECT,
        K.NOTHING_RAN,
        "pool down for database",
    ),
    (
        "no pool configured",
        at_connect('No pool configured for database: "app", user: "nobody"'),
        CONNECT,
        K.PERMANENT,
        "no pool configured for database",
    ),
    (
        "no pool configured (get_pool)",
        answered("58000", "No pool configured for database: app, user: nobody"),
        STATEMENT,
        K.PERMANENT,
        "no pool configured for database",
    ),
    (
        "shutdown while idle",
        answered("58000", "terminating connection due to administrator command"),
        FIRST_USE,
        K.STALE,
        "terminating connection",
    ),
    (
        "idle transaction timeout",
        answered("58000", "idle transaction timeout"),
        STATEMENT,
        K.LOST,
        "idle transaction timeout",
    ),
    (
        "pool statement timeout",
        answered("58000", "pool statement timeout"),
        STATEMENT,
        K.TIMEOUT,
        "pool statement timeout",
    ),
    (
        "server gone mid-query",
        answered(
            "58000",
            'error receiving data from server: SocketError("Error reading message code '
            'from socket - Error Kind(UnexpectedEof)")',
        ),
        STATEMENT,
        K.LOST,
        "error receiving data from server",
    ),
]

SUPAVISOR: list[Row] = [
    # v2.9+: "(CODE) text", XX000 unless the error module overrides postgres_error/1.
    (
        "EMAXCONN transaction",
        at_connect("(EMAXCONN) max client connections reached, limit: 0"),
        CONNECT,
        K.OVERLOAD,
        "(emaxconn)",
    ),
    (
        "EMAXCONN answered",
        answered("XX000", "(EMAXCONN) max client connections reached, limit: 2"),
        CONNECT,
        K.OVERLOAD,
        "(emaxconn)",
    ),
    (
        "EMAXCONNSESSION",
        at_connect(
            "(EMAXCONNSESSION) max clients reached in session mode - max clients are "
            "limited to pool_size: 2"
        ),
        CONNECT,
        K.OVERLOAD,
        "(emaxconnsession)",
    ),
    (
        "ECHECKOUTTIMEOUT",
        answered(
            "XX000",
            "(ECHECKOUTTIMEOUT) unable to check out connection from the pool after 500ms "
            "in Transaction mode",
        ),
        STATEMENT,
        K.OVERLOAD,
        "(echeckouttimeout)",
    ),
    (
        "ECHECKOUTRETRIES",
        answered(
            "XX000", "(ECHECKOUTRETRIES) failed to check out a connection after multiple retries"
        ),
        STATEMENT,
        K.NOTHING_RAN,
        "(echeckoutretries)",
    ),
    (
        "ECIRCUITBREAKER get_secrets",
        at_connect(
            "(ECIRCUITBREAKER) failed to retrieve database credentials after multiple "
            "attempts, new connections are temporarily blocked"
        ),
        CONNECT,
        K.NOTHING_RAN,
        "(ecircuitbreaker)",
    ),
    (
        "ECIRCUITBREAKER db_connection",
        at_connect(
            "(ECIRCUITBREAKER) too many failed attempts to connect to the database, new "
            "connections are temporarily blocked"
        ),
        CONNECT,
        K.NOTHING_RAN,
        "(ecircuitbreaker)",
    ),
    (
        "ECIRCUITBREAKER auth_error",
        at_connect(
            "(ECIRCUITBREAKER) too many authentication failures, new connections are "
            "temporarily blocked"
        ),
        CONNECT,
        K.PERMANENT,
        "too many authentication failures",
    ),
    (
        "ESUBSCRIBERETRIES",
        at_connect(
            "(ESUBSCRIBERETRIES) failed to subscribe to tenant after multiple retries. Terminating"
        ),
        CONNECT,
        K.NOTHING_RAN,
        "(esubscriberetries)",
    ),
    (
        "EDBHANDLEREXITED",
        answered("XX000", "(EDBHANDLEREXITED) DbHandler exited. Check logs for more information"),
        STATEMENT,
        K.LOST,
        "(edbhandlerexited)",
    ),
    (
        "ENOTFOUND",
        at_connect("(ENOTFOUND) tenant/user postgres.abcdefghijklmnop not found"),
        CONNECT,
        K.PERMANENT,
        "(enotfound)",
    ),
    (
        "EWRONGPASSWORD (28P01, plain text)",
        at_connect('password authentication failed for user "postgres"'),
        CONNECT,
        K.PERMANENT,
        "password authentication failed",
    ),
    (
        "EPOOLTERMINATING sends the error beneath it: 57P01",
        answered("57P01", "terminating connection due to administrator command"),
        STATEMENT,
        K.LOST,
        "sqlstate 57P01",
    ),
    # Before v2.9 (85acdde2, lib/supavisor/client_handler/error.ex), XX000 as well.
    (
        "legacy max client connections",
        at_connect("Max client connections reached"),
        CONNECT,
        K.OVERLOAD,
        "max client connections reached",
    ),
    (
        "legacy session mode",
        at_connect(
            "MaxClientsInSessionMode: max clients reached - in Session mode max clients are "
            "limited to pool_size"
        ),
        CONNECT,
        K.OVERLOAD,
        "max clients reached",
    ),
    (
        "legacy checkout timeout",
        answered("XX000", "Unable to check out connection from the pool due to timeout"),
        STATEMENT,
        K.OVERLOAD,
        "unable to check out connection from the pool",
    ),
    (
        "legacy circuit breaker",
        at_connect("Circuit breaker open: Unable to establish connection to upstream database"),
        CONNECT,
        K.NOTHING_RAN,
        "circuit breaker open",
    ),
    (
        "legacy circuit breaker auth",
        at_connect("Circuit breaker open: Too many authentication errors"),
        CONNECT,
        K.PERMANENT,
        "too many authentication errors",
    ),
    (
        "legacy tenant not found",
        at_connect("Tenant or user not found"),
        CONNECT,
        K.PERMANENT,
        "tenant or user not found",
    ),
    (
        "legacy DbHandler exited",
        answered("XX000", "DbHandler exited. Check logs for more information."),
        STATEMENT,
        K.LOST,
        "dbhandler exited",
    ),
    (
        "legacy db closed",
        answered("XX000", "Connection to database closed. Check logs for more information"),
        STATEMENT,
        K.LOST,
        "connection to database closed",
    ),
    (
        "legacy subscribe",
        at_connect("Failed to subscribe to tenant after multiple retries. Terminating."),
        CONNECT,
        K.NOTHING_RAN,
        "failed to subscribe to tenant after multiple retries",
    ),
]

RDS_PROXY: list[Row] = [
    # AWS documents these texts and no SQLSTATE: matched without one (at login).
    (
        "checkout timeout",
        at_connect("Timed-out waiting to acquire database connection."),
        CONNECT,
        K.OVERLOAD,
        "timed-out waiting to acquire database connection",
    ),
    (
        "client connections",
        at_connect("The maximum number of client connections to the proxy exceeded 100."),
        CONNECT,
        K.OVERLOAD,
        "the maximum number of client connections to the proxy exceeded",
    ),
    (
        "connection rate",
        at_connect("Rate of connection to proxy exceeded 50."),
        CONNECT,
        K.OVERLOAD,
        "rate of connection to proxy exceeded",
    ),
    (
        "IAM rate",
        at_connect("The IAM authentication failed because of too many competing requests."),
        CONNECT,
        K.OVERLOAD,
        "the iam authentication failed because of too many competing requests",
    ),
    (
        "IAM token",
        at_connect(
            "IAM authentication failed for user app. Check the IAM token for this user and try "
            "again."
        ),
        CONNECT,
        K.PERMANENT,
        "authentication failed",
    ),
    (
        "no credentials",
        at_connect(
            "This RDS proxy has no credentials for the role app. Check the credentials for "
            "this role and try again."
        ),
        CONNECT,
        K.PERMANENT,
        "has no credentials for the role",
    ),
    (
        "wrong password",
        at_connect("The password that was provided for the role app is wrong."),
        CONNECT,
        K.PERMANENT,
        "the password that was provided for the role",
    ),
    (
        "database error passed on",
        at_connect('Request returned an error: database "orders" does not exist'),
        CONNECT,
        K.PERMANENT,
        "does not exist",
    ),
]

PGPOOL: list[Row] = [
    # pgpool-II 4.3.5; provoked for real in tests/integration/test_pgpool.py.
    (
        "backend died",
        answered(
            "XX000", "unable to read data from DB node 0\nDETAIL:  EOF encountered with backend"
        ),
        FIRST_USE,
        K.STALE,
        "unable to read data from db node",
    ),
    (
        "backend died mid-statement",
        answered(
            "XX000", "unable to read data from DB node 0\nDETAIL:  EOF encountered with backend"
        ),
        STATEMENT,
        K.LOST,
        "unable to read data from db node",
    ),
    (
        "backend down at login",
        at_connect(
            "failed to create a backend 0 connection\nDETAIL:  not executing failover "
            "because failover_on_backend_error is off"
        ),
        CONNECT,
        K.NOTHING_RAN,
        "failed to create a backend",
    ),
    (
        "failover at login",
        at_connect("failed to create a backend connection\nDETAIL:  executing failover on backend"),
        CONNECT,
        K.NOTHING_RAN,
        "failed to create a backend",
    ),
    (
        "all nodes down",
        answered("XX000", "all backend nodes are down, pgpool requires at least one valid node"),
        CONNECT,
        K.NOTHING_RAN,
        "all backend nodes are down",
    ),
    (
        "not accepting",
        at_connect(
            "pgpool is not accepting any new connections\nDETAIL:  all backend nodes are down,"
            " pgpool requires at least one valid node"
        ),
        CONNECT,
        K.NOTHING_RAN,
        "all backend nodes are down",
    ),
    (
        "the server refused pgpool-II's own login",
        psycopg.OperationalError(LIBPQ.rstrip()),
        CONNECT,
        K.NOTHING_RAN,
        "text <no reason>",
    ),
    (
        "reserved_connections",
        at_connect("Sorry, too many clients already"),
        CONNECT,
        K.OVERLOAD,
        "too many clients already",
    ),
    (
        "reserved_connections through SSLRequest",
        psycopg.OperationalError(LIBPQ + "server sent an error response during SSL exchange"),
        CONNECT,
        K.OVERLOAD,
        "server sent an error response during ssl exchange",
    ),
]

PGBOUNCER: list[Row] = [
    # 1.20+: the server's SQLSTATE is forwarded to clients waiting for a server.
    (
        "forwarded 53300",
        answered("53300", "sorry, too many clients already"),
        STATEMENT,
        K.OVERLOAD,
        "sqlstate 53300",
    ),
    (
        "forwarded 28P01",
        answered("28P01", 'password authentication failed for user "app"'),
        STATEMENT,
        K.PERMANENT,
        "sqlstate 28P01",
    ),
    (
        "forwarded 3D000",
        answered("3D000", 'database "orders" does not exist'),
        STATEMENT,
        K.PERMANENT,
        "sqlstate 3D000",
    ),
    # 1.24+: the cached login error, with 08P01; its own text decides first.
    (
        "cached connect failed",
        answered(
            "08P01",
            "server login has been failing, cached error: connect failed (server_login_retry)",
        ),
        CONNECT,
        K.NOTHING_RAN,
        "server login has been failing",
    ),
    (
        "cached too many clients",
        at_connect(
            "server login has been failing, cached error: sorry, too many clients already "
            "(server_login_retry)"
        ),
        CONNECT,
        K.OVERLOAD,
        "too many clients already",
    ),
    (
        "cached bad password",
        at_connect(
            "server login has been failing, cached error: password authentication failed "
            'for user "app" (server_login_retry)'
        ),
        CONNECT,
        K.PERMANENT,
        "password authentication failed",
    ),
    (
        "max_db_client_connections",
        at_connect("client connections exceeded (max_db_client_connections)"),
        CONNECT,
        K.OVERLOAD,
        "client connections exceeded",
    ),
    (
        "max_user_client_connections",
        at_connect("client connections exceeded (max_user_client_connections)"),
        CONNECT,
        K.OVERLOAD,
        "client connections exceeded",
    ),
    (
        "shutdown wait_for_servers",
        answered("08P01", "server shutting down"),
        STATEMENT,
        K.NOTHING_RAN,
        "server shutting down",
    ),
    (
        "login while shutting down",
        at_connect("pooler is shutting down"),
        CONNECT,
        K.NOTHING_RAN,
        "pooler is shutting down",
    ),
    (
        "transaction_timeout",
        answered("08P01", "transaction timeout"),
        STATEMENT,
        K.TIMEOUT,
        "transaction timeout",
    ),
    (
        "idle_transaction_timeout is still broken",
        answered("08P01", "idle transaction timeout"),
        STATEMENT,
        K.LOST,
        "idle transaction timeout",
    ),
]

ROWS = [
    *(("pgcat: " + r[0], *r[1:]) for r in PGCAT),
    *(("supavisor: " + r[0], *r[1:]) for r in SUPAVISOR),
    *(("rds proxy: " + r[0], *r[1:]) for r in RDS_PROXY),
    *(("pgpool: " + r[0], *r[1:]) for r in PGPOOL),
    *(("pgbouncer: " + r[0], *r[1:]) for r in PGBOUNCER),
]


@pytest.mark.parametrize(
    ("exc", "phase", "kind", "decides"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_pooler_error_is_classified(
    exc: BaseException, phase: Phase, kind: FailureKind, decides: str
) -> None:
    got, reason = classify_with_reason(exc, phase)
    assert got is kind, reason
    # The rule that decided is the one the row names (not another that happens to match).
    expected = decides if decides.startswith(("sqlstate ", "text <")) else f"text {decides!r}"
    assert reason.startswith(expected), reason


def test_no_reason_is_read_only_without_a_sqlstate_and_at_the_end() -> None:
    assert classify(psycopg.OperationalError(LIBPQ + "\n"), CONNECT) is K.NOTHING_RAN
    # With a SQLSTATE the server said what it was; text after "failed:" is a reason.
    assert classify(answered("42601", "syntax error: parse failed:"), STATEMENT) is K.PERMANENT
    assert classify(at_connect("something unheard of"), CONNECT) is K.PERMANENT


def test_every_pooler_rule_has_a_row() -> None:
    patterns = {rule.pattern for rule in classify_module._BY_POOLER_TEXT}
    decided = {row[4] for row in ROWS}
    assert patterns - decided == set()


def test_every_pooler_rule_is_cited_in_the_docstring() -> None:
    doc = " ".join((classify_module.__doc__ or "").lower().split())
    for rule in classify_module._BY_POOLER_TEXT:
        assert rule.pattern in doc, rule.pattern


@pytest.mark.parametrize("sqlstate", ["58000", "XX000", "58030"])
def test_unknown_text_with_a_pooler_class_stays_permanent(sqlstate: str) -> None:
    exc = answered(sqlstate, "something nobody has seen")
    assert classify(exc, STATEMENT) is K.PERMANENT


def test_a_servers_58p01_is_not_taken_for_a_missing_socket() -> None:
    # libpq's "No such file or directory" (a Unix socket that is not there) is not a
    # pooler text: over class 58 it must not make a real server error look transient.
    exc = answered("58P01", 'could not open file "base/1/1234": No such file or directory')
    assert classify(exc, STATEMENT) is K.PERMANENT
    assert classify(exc, CONNECT) is K.PERMANENT


def test_a_pooler_text_does_not_override_a_specific_server_sqlstate() -> None:
    # A unique violation whose text quotes a pooler's words is still the server's.
    exc = answered("23505", 'duplicate key value: "(EMAXCONN) max client connections reached"')
    assert classify(exc, STATEMENT) is K.PERMANENT


def test_a_died_pgpool_backend_follows_the_phase() -> None:
    died = answered("XX000", "unable to read data from DB node 0")
    assert classify_failure(died, COMMIT) is K.LOST_COMMIT
    # Not the server's own 57P01 (which ran nothing outside a transaction block): the
    # statement may have run, so only a read is sent again.
    assert classify_failure(died, STATEMENT, in_transaction=False) is K.LOST


# --- server_refused_slots and overload_shrinks ---------------------------------------------------

SERVER_SLOTS: list[tuple[str, BaseException, bool]] = [
    (
        "53300 forwarded by PgBouncer 1.20+",
        answered("53300", "sorry, too many clients already"),
        True,
    ),
    ("server text at login", at_connect("sorry, too many clients already"), True),
    (
        "reserved slots",
        at_connect(
            "remaining connection slots are reserved for roles with the SUPERUSER attribute"
        ),
        True,
    ),
    ("role limit", at_connect('too many connections for role "app"'), True),
    (
        "PgBouncer 1.24 cached",
        at_connect(
            "server login has been failing, cached error: sorry, too many clients already "
            "(server_login_retry)"
        ),
        True,
    ),
    ("pgpool-II's own, 53300", answered("53300", "Sorry, too many clients already"), False),
    ("pgpool-II's own, at login", at_connect("Sorry, too many clients already"), False),
    (
        "PgBouncer max_client_conn",
        at_connect("no more connections allowed (max_client_conn)"),
        False,
    ),
    (
        "Supavisor EMAXCONN",
        at_connect("(EMAXCONN) max client connections reached, limit: 0"),
        False,
    ),
    (
        "RDS Proxy clients",
        at_connect("The maximum number of client connections to the proxy exceeded 100."),
        False,
    ),
    ("out of memory", answered("53200", "out of memory"), False),
    ("not an overload", at_connect("the database system is starting up"), False),
    ("a cancellation", KeyboardInterrupt(), False),
]


@pytest.mark.parametrize(
    ("exc", "expected"), [r[1:] for r in SERVER_SLOTS], ids=[r[0] for r in SERVER_SLOTS]
)
def test_server_refused_slots(exc: BaseException, expected: bool) -> None:
    assert server_refused_slots(exc) is expected


def test_overload_shrinks_unless_the_server_refused_behind_a_pooler() -> None:
    assert overload_shrinks(server_refused=True, behind_pooler=False)
    assert overload_shrinks(server_refused=False, behind_pooler=False)
    assert overload_shrinks(server_refused=False, behind_pooler=True)
    assert not overload_shrinks(server_refused=True, behind_pooler=True)


def test_server_refused_slots_survives_a_broken_str() -> None:
    class Weird(Exception):
        sqlstate = "53300"

        def __str__(self) -> str:
            raise RuntimeError("no text")

    assert server_refused_slots(Weird()) is True


# --- HandleState acts on them --------------------------------------------------------------------

URL = "postgresql://app:pw@db.internal:6432/orders"


def handle_state(**overrides: Any) -> HandleState:
    now = [100.0]
    state = HandleState(Settings(url=URL, **overrides), clock=lambda: now[0], rng=random.Random(7))
    assert state.start_warmup()
    state.warmup_finished(0.01, 1, None)
    return state


FORWARDED_53300 = answered("53300", "sorry, too many clients already")


def test_direct_53300_lowers_the_limit() -> None:
    state = handle_state(max_size=8, pgbouncer="off")
    assert state.connect_failed(at_connect("sorry, too many clients already")) is K.OVERLOAD
    assert state.wanted_limit() == 4


@pytest.mark.parametrize("mode", ["pgbouncer", "pgpool"])
def test_forwarded_53300_behind_a_pooler_backs_off_without_shrinking(mode: str) -> None:
    state = handle_state(max_size=8, pgbouncer="on" if mode == "pgbouncer" else "auto")
    if mode == "pgpool":
        state.set_pgpool(True)
    assert state.pooler == mode
    kind, decision = state.failed(
        FORWARDED_53300,
        STATEMENT,
        RetryContext(is_write=False),
        attempt=1,
        deadline=None,
        policy=state.statement_policy,
        operation="query",
    )
    assert kind is K.OVERLOAD
    assert isinstance(decision, Sleep)  # backed off, and retried
    assert state.connect_failed(at_connect("sorry, too many clients already")) is K.OVERLOAD
    assert state.wanted_limit() is None  # not shrunk
    assert state.stats(None)["counters"]["overload_events"] == 2


def test_a_poolers_own_client_limit_still_shrinks_behind_it() -> None:
    state = handle_state(max_size=8, pgbouncer="on")
    assert (
        state.connect_failed(at_connect("no more connections allowed (max_client_conn)"))
        is K.OVERLOAD
    )
    assert state.wanted_limit() == 4


def test_pgpools_own_refusal_shrinks_behind_pgpool() -> None:
    state = handle_state(max_size=8)
    state.set_pgpool(True)
    assert state.connect_failed(at_connect("Sorry, too many clients already")) is K.OVERLOAD
    assert state.wanted_limit() == 4


# --- prepared statements behind a pooler ---------------------------------------------------------


def test_connection_prepare_threshold() -> None:
    assert connection_prepare_threshold(5, pgbouncer=False, opted_in=False) == 5
    assert connection_prepare_threshold(5, pgbouncer=True, opted_in=False) is None
    assert connection_prepare_threshold(5, pgbouncer=True, opted_in=True) == 5
    assert connection_prepare_threshold(5, pgbouncer=True, opted_in=True, fell_back=True) is None
    assert connection_prepare_threshold(None, pgbouncer=True, opted_in=True) is None
    assert connection_prepare_threshold(0, pgbouncer=False, opted_in=False, fell_back=True) == 0


def test_connect_kwargs_keep_prepares_only_when_opted_in() -> None:
    assert connect_kwargs(Settings(url=URL), pgbouncer=True)["prepare_threshold"] is None
    opted = Settings(url=URL, pooler_prepared_statements=True, prepare_threshold=2)
    assert connect_kwargs(opted, pgbouncer=True)["prepare_threshold"] == 2
    assert prepare_threshold_for(opted, pgbouncer=False) == 2


@pytest.mark.parametrize(
    ("sqlstate", "configured", "pgbouncer", "opted_in", "lost"),
    [
        ("26000", 5, True, True, True),
        ("42P05", 0, True, True, True),
        ("26000", 5, True, False, False),  # prepares were off: the application's own error
        ("26000", 5, False, True, False),  # no pooler: the application's own error
        ("26000", None, True, True, False),  # no prepares at all
        ("42P01", 5, True, True, False),
        (None, 5, True, True, False),
    ],
)
def test_lost_prepared_statement(
    sqlstate: str | None, configured: int | None, pgbouncer: bool, opted_in: bool, lost: bool
) -> None:
    assert (
        lost_prepared_statement(
            sqlstate, configured=configured, pgbouncer=pgbouncer, opted_in=opted_in
        )
        is lost
    )


def test_state_falls_back_once_and_retries_the_statement(caplog: pytest.LogCaptureFixture) -> None:
    state = handle_state(pgbouncer="on", pooler_prepared_statements=True)
    assert not state.prepares_off
    lost = answered("26000", 'prepared statement "_pg3_0" does not exist')
    write = RetryContext(is_write=True)
    with caplog.at_level("WARNING", logger="pgwarden"):
        for _ in range(2):
            kind, decision = state.failed(
                lost,
                STATEMENT,
                write,
                attempt=1,
                deadline=None,
                policy=state.statement_policy,
                operation="query",
            )
            assert kind is K.NOTHING_RAN  # even a write: its Bind was refused, it never ran
            assert isinstance(decision, Sleep)
    assert state.prepares_off
    events = [r for r in caplog.records if getattr(r, "event", None) == "prepared_statements_off"]
    assert len(events) == 1


def test_without_the_opt_in_26000_stays_the_applications_error() -> None:
    state = handle_state(pgbouncer="on")
    lost = answered("26000", 'prepared statement "mine" does not exist')
    kind, _ = state.failed(
        lost,
        STATEMENT,
        RetryContext(is_write=False),
        attempt=1,
        deadline=None,
        policy=state.statement_policy,
        operation="query",
    )
    assert kind is K.PERMANENT
    assert not state.prepares_off


# --- pgpool-II detection -------------------------------------------------------------------------


def test_looks_relayed() -> None:
    assert looks_relayed(40000, 40001)  # pgpool-II's own connection to the server
    assert looks_relayed(None, 40001)  # pgpool-II reaches the server over a Unix socket
    assert not looks_relayed(40001, 40001)  # direct TCP
    assert not looks_relayed(None, None)  # direct Unix socket
