"""``ENGINE: "pgwarden.django"`` against a real server: where connections come from and go,
what Django's traffic shows in pgwarden's metrics, settings validation, deadlines."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest

pytest.importorskip("django")

from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError, connections, transaction

import pgwarden
from django_suite.inprocess import use_database
from pgwarden.django import handle_of


def query(alias: str, sql: str, params: Any = None) -> Any:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def sleep_in_a_transaction(alias: str) -> None:
    with transaction.atomic(using=alias):
        query(alias, "SELECT pg_sleep(3)")


def test_import_pgwarden_does_not_import_django() -> None:
    code = (
        "import sys, pgwarden, pgwarden.django; "
        "assert not [m for m in sys.modules if m == 'django' or m.startswith('django.')], "
        "sorted(m for m in sys.modules if m.startswith('django'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_settings_fail_clearly_without_the_password(pg_server: Any) -> None:
    alias = use_database(pg_server.url, max_sise=3)
    with pytest.raises(ImproperlyConfigured) as info:
        query(alias, "SELECT 1")
    text = str(info.value)
    assert "max_sise" in text
    assert "max_size" in text  # the known names are listed
    assert pg_server.password not in text
    bad = use_database(pg_server.url, max_size=-1)
    with pytest.raises(ImproperlyConfigured) as info:
        query(bad, "SELECT 1")
    assert "max_size" in str(info.value)
    assert pg_server.password not in str(info.value)
    # Django's native pool options: sizing is read, what pgwarden cannot do is refused.
    sized = use_database(pg_server.url, options={"pool": {"max_size": 3, "timeout": 2}})
    assert handle_of(sized).settings.max_size == 3
    assert handle_of(sized).settings.acquire_timeout == 2
    checked = use_database(pg_server.url, options={"pool": {"check": print}})
    with pytest.raises(ImproperlyConfigured, match="check"):
        query(checked, "SELECT 1")


def test_connections_come_from_one_shared_handle_and_go_back_at_request_end(
    pg_server: Any,
) -> None:
    alias = use_database(pg_server.url, max_size=3, application_name="pgw-django")
    other = use_database(pg_server.url, max_size=3, application_name="pgw-django")
    db = handle_of(alias)
    assert handle_of(other) is db  # the same parameters: one handle, one pool
    seen: list[str] = []

    class Observer:
        def statement_started(self, operation: str, query: object) -> object:
            seen.append(operation)
            return None

        def statement_finished(
            self, token: object, error: BaseException | None, rowcount: int | None
        ) -> None:
            pass

    remove = db.add_statement_observer(Observer())
    before = db.stats()["counters"]["queries"]
    assert query(alias, "SELECT current_setting('application_name')") == "pgw-django"
    assert db.stats()["in_flight"] == 1  # held by the request until it ends
    query(alias, "SELECT 1")
    connections[alias].close_if_unusable_or_obsolete()  # request_finished
    assert db.stats()["in_flight"] == 0
    assert connections[alias].connection is None
    assert db.stats()["counters"]["queries"] == before + 2
    assert seen == ["django", "django"]
    remove()
    db.close()


def test_release_between_queries_returns_the_connection_outside_atomic(
    pg_server: Any,
) -> None:
    alias = use_database(pg_server.url, max_size=2, release_between_queries=True)
    db = handle_of(alias)
    assert query(alias, "SELECT 1") == 1
    assert db.stats()["in_flight"] == 0  # back as soon as its cursor closed
    with transaction.atomic(using=alias):
        query(alias, "SELECT 1")
        assert db.stats()["in_flight"] == 1  # a transaction keeps its connection
        query(alias, "SELECT 2")
    assert db.stats()["in_flight"] == 0  # and returns it when it ends
    cursor = connections[alias].cursor()  # an open cursor keeps it too
    cursor.execute("SELECT 3")
    assert db.stats()["in_flight"] == 1
    cursor.close()
    assert db.stats()["in_flight"] == 0
    db.close()


def test_a_deadline_bounds_django_statements_and_returns_their_connection(
    pg_server: Any,
) -> None:
    alias = use_database(pg_server.url, max_size=2)
    db = handle_of(alias)
    query(alias, "SELECT 1")  # a connection checked out without a deadline
    started = time.monotonic()
    with pytest.raises(pgwarden.DeadlineExceeded) as info, pgwarden.deadline(0.5):
        query(alias, "SELECT pg_sleep(3)")
    assert time.monotonic() - started < 2.0
    assert isinstance(info.value, OperationalError)  # Django code that catches it sees it
    with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
        sleep_in_a_transaction(alias)  # the server-side timeout of the time left
    assert time.monotonic() - started < 3.5
    with pgwarden.deadline(2):
        assert query(alias, "SELECT 4") == 4
    assert db.stats()["in_flight"] == 0  # no connection outlives its deadline
    assert query(alias, "SELECT 5") == 5  # and the database is usable after
    connections[alias].close()
    db.close()


def _timeout_inside_atomic(alias: str) -> str:
    with pgwarden.deadline(5), transaction.atomic(using=alias):
        return str(query(alias, "SHOW statement_timeout"))


def test_server_deadlines_off_sends_no_statement_timeout_and_still_bounds(
    pg_server: Any,
) -> None:
    on = use_database(pg_server.url, max_size=2)
    assert _timeout_inside_atomic(on) != "0"  # the control: set_config of the time left
    off = use_database(pg_server.url, max_size=2, server_deadlines=False)
    assert _timeout_inside_atomic(off) == "0"
    started = time.monotonic()
    with pytest.raises(pgwarden.DeadlineExceeded), pgwarden.deadline(0.5):
        sleep_in_a_transaction(off)  # the checkout's sever bounds it instead
    assert time.monotonic() - started < 3.0
    assert query(off, "SELECT 6") == 6
    for alias in (on, off):
        connections[alias].close()
        handle_of(alias).close()


def test_begin_and_its_timeout_take_the_round_trip_begin_takes_anyway(
    pg_server: Any, fault_proxy: Any
) -> None:
    # Each way 0.1 s: a round trip costs at least 0.2 s. Inside atomic() under a deadline,
    # the first statement costs BEGIN with the timeout (one round trip) and itself (one);
    # psycopg's own pipeline took two for BEGIN and the timeout (it syncs after BEGIN).
    latency = 0.1
    alias = use_database(fault_proxy.url_for(pg_server.url), max_size=1)
    assert query(alias, "SELECT 1") == 1  # connected, and checked out at once below
    try:
        fault_proxy.set_latency(latency)
        with pgwarden.deadline(30), transaction.atomic(using=alias):
            connections[alias].ensure_connection()
            started = time.monotonic()
            assert query(alias, "SELECT 2") == 2
            took = time.monotonic() - started
            timeout = query(alias, "SHOW statement_timeout")
    finally:
        fault_proxy.set_latency(0)
    assert timeout != "0"  # the deadline's timeout was set with BEGIN
    assert 4 * latency <= took < 6 * latency, took
    connections[alias].close()
    handle_of(alias).close()


def test_a_connection_held_too_long_is_reported_as_a_leak(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    alias = use_database(pg_server.url, leak_threshold=0.2)
    db = handle_of(alias)
    query(alias, "SELECT 1")
    until = time.monotonic() + 5
    while db.stats()["counters"]["leaked_connections"] == 0 and time.monotonic() < until:
        time.sleep(0.1)
    assert db.stats()["counters"]["leaked_connections"] == 1
    # The report names the code that took the connection (this file's `query`), not
    # Django's ORM nor pgwarden's backend.
    sites = [r.site for r in caplog.records if getattr(r, "event", None) == "leak"]  # type: ignore[attr-defined]
    assert len(sites) == 1, sites
    assert sites[0].startswith(__file__ + ":"), sites
    assert sites[0].endswith(" in query"), sites
    connections[alias].close()
    db.close()


def test_a_server_that_is_down_fails_fast_with_a_verdict_django_code_can_catch(
    pg_server_factory: Any,
) -> None:
    server = pg_server_factory()
    alias = use_database(server.url, ready_timeout=1.0, breaker_min_outage=0.2)
    db = handle_of(alias)
    assert query(alias, "SELECT 1") == 1
    connections[alias].close()
    server.stop("immediate")
    errors: list[BaseException] = []
    started = time.monotonic()
    for _ in range(5):
        try:
            query(alias, "SELECT 1")
        except Exception as exc:
            errors.append(exc)
        connections[alias].close()
    assert time.monotonic() - started < 10
    assert len(errors) == 5
    # pgwarden's verdicts, and Django's OperationalError as well (or psycopg's, wrapped).
    assert all(isinstance(e, OperationalError) for e in errors)
    assert any(isinstance(e, pgwarden.DatabaseUnusable) for e in errors)
    db.close()


def test_assume_role_and_time_zone_are_each_connections_own(pg_server: Any) -> None:
    """Two databases on one handle (one pooled connection): one assumes a role, the
    other must not inherit it; the time zone is Django's for each checkout."""
    pg_server.execute("DROP ROLE IF EXISTS pgw_django_role")
    pg_server.execute("CREATE ROLE pgw_django_role")
    role = use_database(pg_server.url, max_size=1, options={"assume_role": "pgw_django_role"})
    plain = use_database(pg_server.url, max_size=1)
    assert handle_of(role) is handle_of(plain)
    for _ in range(2):
        assert query(role, "SELECT current_user") == "pgw_django_role"
        connections[role].close()
        assert query(plain, "SELECT current_user") == "postgres"
        assert query(plain, "SHOW TimeZone") == "UTC"
        connections[plain].close()
    handle_of(role).close()


def test_threads_share_the_pool(pg_server: Any) -> None:
    alias = use_database(pg_server.url, max_size=2)
    db = handle_of(alias)
    pids: set[int] = set()
    lock = threading.Lock()

    def request() -> None:
        for _ in range(20):
            pid = query(alias, "SELECT pg_backend_pid()")
            with lock:
                pids.add(pid)
            connections[alias].close_if_unusable_or_obsolete()
        connections[alias].close()

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert 1 <= len(pids) <= 2  # six threads, at most max_size server sessions
    assert db.stats()["in_flight"] == 0
    db.close()


def test_a_statement_that_cannot_have_run_is_sent_again(pg_server: Any) -> None:
    """The server ends the session of a held connection (57P01, as in a restart or a
    kill): the next single statement outside atomic() never ran, so it goes to a new
    connection, read and write alike, once; inside atomic() it is the block's to redo."""
    pg_server.execute("DROP TABLE IF EXISTS dj_resend")
    pg_server.execute("CREATE TABLE dj_resend (n int)")
    alias = use_database(pg_server.url, max_size=2)
    db = handle_of(alias)
    for sql in ("SELECT count(*) FROM dj_resend", "INSERT INTO dj_resend VALUES (1)"):
        pid = query(alias, "SELECT pg_backend_pid()")
        pg_server.execute("SELECT pg_terminate_backend(%s)", [pid])
        with connections[alias].cursor() as cursor:
            cursor.execute(sql)
        assert query(alias, "SELECT pg_backend_pid()") != pid
    assert pg_server.execute("SELECT count(*) FROM dj_resend")[0][0] == 1
    assert db.stats()["counters"]["retries"]["total"] == 2
    pid = query(alias, "SELECT pg_backend_pid()")
    pg_server.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(OperationalError), transaction.atomic(using=alias):
        query(alias, "SELECT 1")
    connections[alias].close()
    db.close()


def test_a_callable_password_is_asked_for_every_new_connection(pg_server: Any) -> None:
    role = f"dj_rot_{int(time.monotonic() * 1000) % 10**8}"
    first, second = "first-secret-1a2b", "second-secret-3c4d"
    pg_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{first}'")
    current = [first]
    asked: list[str] = []

    def password() -> str:
        asked.append(current[0])
        return current[0]

    alias = use_database(pg_server.url_for(user=role), max_size=2)
    connections.settings[alias]["PASSWORD"] = password
    try:
        assert query(alias, "SELECT current_user") == role
        assert asked, "the callable was not asked"
        pg_server.execute(f"ALTER ROLE {role} PASSWORD '{second}'")
        current[0] = second
        db = handle_of(alias)
        # End the pooled session: the next checkout must log in again, with the new one.
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        connections[alias].close()
        assert query(alias, "SELECT 7") == 7
        assert asked[-1] == second
        for text in (repr(db), repr(db.settings), str(db.stats())):
            assert first not in text
            assert second not in text
    finally:
        connections[alias].close()
        handle_of(alias).close()
        pg_server.execute(f"DROP ROLE IF EXISTS {role}")


def test_every_checkout_is_configured_though_connect_skips_what_it_can(
    pg_server: Any,
) -> None:
    """What the cheaper connect() (parameters computed once, AUTOCOMMIT not set again on
    a connection lent in autocommit, the time zone compared undecoded) must still do on
    every checkout: Django's time zone back on a pooled connection a request changed,
    connection_created sent, an in-place edit of the settings entry seen."""
    from django.db.backends.signals import connection_created

    alias = use_database(pg_server.url, options={"application_name": "pgw-first"}, max_size=1)
    created: list[str] = []

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        created.append(connection.alias)

    connection_created.connect(on_created)
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SET TIME ZONE 'Asia/Tokyo'")  # left on the pooled connection
        first_pid = query(alias, "SELECT pg_backend_pid()")
        connections[alias].close_if_unusable_or_obsolete()  # request_finished
        assert query(alias, "SELECT pg_backend_pid()") == first_pid  # the same connection
        assert query(alias, "SHOW TimeZone") == "UTC"  # and Django's time zone again
        assert connections[alias].get_autocommit() is True
        with transaction.atomic(using=alias):
            assert connections[alias].connection.autocommit is False
        connections[alias].close_if_unusable_or_obsolete()
        assert created.count(alias) == 2  # one per checkout

        first = handle_of(alias)
        connections[alias].settings_dict["OPTIONS"]["application_name"] = "pgw-second"
        assert query(alias, "SELECT current_setting('application_name')") == "pgw-second"
        assert handle_of(alias) is not first
        connections[alias].close()
    finally:
        connection_created.disconnect(on_created)
    first.close()
    handle_of(alias).close()
