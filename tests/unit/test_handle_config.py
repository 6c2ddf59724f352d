"""Settings turned into psycopg arguments, and the statements pgwarden sends (no database)."""

from __future__ import annotations

import inspect
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import psycopg_pool
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.sql import SQL, Composed, Identifier, Literal

from pgwarden import Settings
from pgwarden._handle.config import (
    LIBPQ_MIN_CONNECT_TIMEOUT,
    POOL_RECONNECT_TIMEOUT,
    CallSite,
    call_site_ref,
    connect_kwargs,
    libpq_connect_timeout,
    looks_like_pgbouncer,
    password_of,
    pool_kwargs,
)
from pgwarden._handle.sql import (
    ISOLATION_CLAUSES,
    SET_STATEMENT_TIMEOUT,
    begin_statement,
    query_is_write,
    statement_timeout_args,
)

URL = "postgresql://app:s3cr3t@db.internal:5432/orders"
# psycopg's own connection options; everything else connect_kwargs returns is a libpq one.
PSYCOPG_OPTIONS = {"autocommit", "row_factory", "prepare_threshold"}


# --- libpq_connect_timeout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, 2),
        (0.001, 2),
        (1.0, 2),
        (1.999, 2),
        (2.0, 2),
        (2.0001, 3),
        (2.5, 3),
        (5.0, 5),
        (5.5, 6),
        (30.0, 30),
        (-1.0, 2),
    ],
)
def test_libpq_connect_timeout_rounds_up_to_whole_seconds_and_at_least_two(
    seconds: float, expected: int
) -> None:
    result = libpq_connect_timeout(seconds)
    assert result == expected
    assert isinstance(result, int)


def test_libpq_minimum_is_two_seconds() -> None:
    assert LIBPQ_MIN_CONNECT_TIMEOUT == 2


@given(st.floats(min_value=0.0, max_value=1e6))
def test_libpq_connect_timeout_never_shortens_the_bound(seconds: float) -> None:
    result = libpq_connect_timeout(seconds)
    assert result >= LIBPQ_MIN_CONNECT_TIMEOUT
    assert result >= seconds
    assert result == LIBPQ_MIN_CONNECT_TIMEOUT or result - 1 < seconds
    assert result == max(2, math.ceil(seconds))


# --- connect_kwargs -------------------------------------------------------------------------------


def test_connect_kwargs_direct_to_postgres() -> None:
    settings = Settings(
        url=URL,
        connect_timeout=7.2,
        prepare_threshold=3,
        application_name="orders-api",
        keepalives_idle=11,
        keepalives_interval=4,
        keepalives_count=6,
        tcp_user_timeout=9_000,
    )
    kwargs = connect_kwargs(settings, pgbouncer=False)
    assert kwargs == {
        "autocommit": True,
        "row_factory": dict_row,
        "prepare_threshold": 3,
        "connect_timeout": 8,
        "keepalives": 1,
        "keepalives_idle": 11,
        "keepalives_interval": 4,
        "keepalives_count": 6,
        "tcp_user_timeout": 9_000,
        "application_name": "orders-api",
    }


@pytest.mark.parametrize("threshold", [0, 5, None])
def test_connect_kwargs_behind_pgbouncer_never_prepares(threshold: int | None) -> None:
    settings = Settings(url=URL, prepare_threshold=threshold)
    assert connect_kwargs(settings, pgbouncer=True)["prepare_threshold"] is None
    assert connect_kwargs(settings, pgbouncer=False)["prepare_threshold"] == threshold


def test_connect_kwargs_flag_wins_over_the_setting() -> None:
    # The caller passes what it knows now ('auto' detected, or 'on'); the setting alone
    # does not decide.
    on = Settings(url=URL, pgbouncer="on")
    assert connect_kwargs(on, pgbouncer=False)["prepare_threshold"] == 5


def test_connect_kwargs_carry_no_secret_and_no_conninfo() -> None:
    kwargs = connect_kwargs(Settings(url=URL), pgbouncer=False)
    assert "s3cr3t" not in repr(kwargs)
    assert not {"conninfo", "password", "host", "dbname"} & set(kwargs)


@pytest.mark.parametrize("connect_timeout", [0.1, 1.5, 2.0, 4.01])
def test_connect_kwargs_round_the_connect_timeout_once(connect_timeout: float) -> None:
    kwargs = connect_kwargs(Settings(url=URL, connect_timeout=connect_timeout), pgbouncer=False)
    assert kwargs["connect_timeout"] == libpq_connect_timeout(connect_timeout)


def test_connect_kwargs_libpq_options_are_real_libpq_options() -> None:
    libpq = {
        k: v
        for k, v in connect_kwargs(Settings(url=URL), pgbouncer=False).items()
        if k not in PSYCOPG_OPTIONS
    }
    # make_conninfo validates every keyword against libpq's own list of options.
    parsed = conninfo_to_dict(make_conninfo(URL, **libpq))
    for key, value in libpq.items():
        assert str(parsed[key]) == str(value), key


# --- pool_kwargs ----------------------------------------------------------------------------------


def test_pool_kwargs() -> None:
    settings = Settings(url=URL, min_size=2, max_size=10, acquire_timeout=3.0, max_idle=120.0)
    kwargs = pool_kwargs(settings, max_size=10, max_lifetime=1500.0)
    assert kwargs == {
        "min_size": 2,
        "max_size": 10,
        "timeout": 3.0,
        "max_lifetime": 1500.0,
        "max_idle": 120.0,
        "reconnect_timeout": POOL_RECONNECT_TIMEOUT,
        "name": f"pgwarden-{os.getpid()}",
    }


def test_pool_kwargs_min_size_never_exceeds_a_lowered_limit() -> None:
    settings = Settings(url=URL, min_size=6, max_size=10)
    kwargs = pool_kwargs(settings, max_size=3, max_lifetime=60.0)
    assert (kwargs["min_size"], kwargs["max_size"]) == (3, 3)


def test_pool_keeps_reconnecting_through_any_outage() -> None:
    assert POOL_RECONNECT_TIMEOUT >= 3600.0


@pytest.mark.parametrize(
    "pool_class", [psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool]
)
def test_pool_kwargs_are_accepted_by_psycopg_pool(pool_class: type) -> None:
    kwargs = pool_kwargs(Settings(url=URL), max_size=4, max_lifetime=60.0)
    inspect.signature(pool_class).bind(URL, kwargs={}, open=False, **kwargs)


# --- password_of, looks_like_pgbouncer, call_site_ref ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (URL, "s3cr3t"),
        ("host=h user=u password='a b' dbname=d", "a b"),
        ("postgresql://h/db?password=qp", "qp"),
        ("postgresql://u@h/db", None),
        ("postgresql://u:@h/db", None),
        ("", None),
        (None, None),
        ("host='unterminated", None),
    ],
)
def test_password_of(url: str | None, expected: str | None) -> None:
    assert password_of(url) == expected


@pytest.mark.parametrize(
    ("server_pid", "key_pid", "expected"),
    [
        (4242, 4242, False),  # PostgreSQL itself sent its pid
        (4242, 17, True),  # PgBouncer sent a key of its own
        (None, 17, False),  # pg_backend_pid() gave nothing to compare
        ("4242", 4242, True),  # a different type is a different value
    ],
)
def test_looks_like_pgbouncer(server_pid: object, key_pid: int, expected: bool) -> None:
    assert looks_like_pgbouncer(server_pid, key_pid) is expected


def test_call_site_names_the_first_frame_outside_pgwarden() -> None:
    site = str(call_site_ref())
    assert site.startswith(__file__ + ":")
    assert site.endswith(" in test_call_site_names_the_first_frame_outside_pgwarden")


def test_a_call_site_reference_formats_the_line_it_was_taken_on() -> None:
    expected_line = sys._getframe().f_lineno + 1
    site = call_site_ref()
    assert str(site) == (
        f"{__file__}:{expected_line} in test_a_call_site_reference_formats_the_line_it_was_taken_on"
    )
    assert str(CallSite(None, 0)) == "<unknown>"


# A stand-in library: `descend(n, fn)` recurses n levels inside its own file, then calls fn.
_LIBRARY = """
def descend(levels, fn):
    if levels == 0:
        return fn()
    return descend(levels - 1, fn)


def ask(fn):
    return str(fn())


def descend_and_ask(levels, fn):
    return descend(levels, lambda: ask(fn))
"""


def _library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A module file under *tmp_path* whose frames call sites skip (the registration is
    undone after the test: the skipped set is process-wide)."""
    import importlib.util

    from pgwarden._handle import config

    path = tmp_path / "fakelib" / "__init__.py"
    path.parent.mkdir()
    path.write_text(_LIBRARY)
    spec = importlib.util.spec_from_file_location("fakelib", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(config, "_SKIPPED_DIRS", config._SKIPPED_DIRS)
    config.skip_call_sites_under(str(path))
    return module


@pytest.mark.parametrize("levels", [0, 1, 2, 3, 7, 8, 9, 30, 100])
def test_call_site_skips_a_registered_library_at_any_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, levels: int
) -> None:
    """The site is the user's line below however many library frames (the gallop and
    the bisection land on the boundary whatever its depth)."""
    library = _library(tmp_path, monkeypatch)
    line = sys._getframe().f_lineno + 1
    site = library.descend(levels, call_site_ref)
    assert (
        str(site) == f"{__file__}:{line} in test_call_site_skips_a_registered_library_at_any_depth"
    )


def test_call_site_depth_hint_never_gives_a_stale_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depth remembered for an asker is checked before use: one asker (the
    library's ``ask``, as `Database.checkout` is for every checkout) reached through
    paths of different depths, in any order, names each path's own line."""
    library = _library(tmp_path, monkeypatch)

    def through(levels: int) -> tuple[str, int]:
        line = sys._getframe().f_lineno + 1
        return library.descend_and_ask(levels, call_site_ref), line

    for levels in (30, 2, 30, 0, 7, 7, 100, 1):
        site, line = through(levels)
        assert site == f"{__file__}:{line} in through", (levels, site)
    line = sys._getframe().f_lineno + 1
    assert library.ask(call_site_ref) == f"{__file__}:{line} in {sys._getframe().f_code.co_name}"


def test_call_site_is_unknown_when_every_frame_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgwarden._handle import config

    library = _library(tmp_path, monkeypatch)
    # Everything below the library is skipped too ("" prefixes every file name).
    monkeypatch.setattr(config, "_SKIPPED_DIRS", (*config._SKIPPED_DIRS, ""))
    assert str(library.descend(5, call_site_ref)) == "<unknown>"


def test_skipping_a_library_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgwarden._handle import config

    _library(tmp_path, monkeypatch)
    before = config._SKIPPED_DIRS
    config.skip_call_sites_under(str(tmp_path / "fakelib" / "__init__.py"), generated="<fake ")
    config.skip_call_sites_under(str(tmp_path / "fakelib" / "__init__.py"), generated="<fake ")
    after = config._SKIPPED_DIRS
    assert after == (*before, "<fake ")


# --- begin_statement ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("isolation", "readonly", "expected"),
    [
        (None, False, b"BEGIN"),
        (None, True, b"BEGIN READ ONLY"),
        ("read committed", False, b"BEGIN ISOLATION LEVEL READ COMMITTED"),
        ("repeatable read", True, b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        ("serializable", False, b"BEGIN ISOLATION LEVEL SERIALIZABLE"),
        ("serializable", True, b"BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"),
    ],
)
def test_begin_statement(isolation: str | None, readonly: bool, expected: bytes) -> None:
    assert begin_statement(isolation, readonly) == expected


@pytest.mark.parametrize(
    "bad",
    ["SERIALIZABLE", "read uncommitted", "", "serializable; DROP TABLE t", "snapshot"],
)
def test_begin_statement_rejects_a_bad_isolation_naming_the_valid_ones(bad: str) -> None:
    with pytest.raises(ValueError, match="isolation must be one of") as info:
        begin_statement(bad, False)
    message = str(info.value)
    for level in ("read committed", "repeatable read", "serializable"):
        assert repr(level) in message
    assert repr(bad) in message


def test_every_isolation_clause_is_a_valid_level() -> None:
    for isolation in ISOLATION_CLAUSES:
        begin = begin_statement(isolation, False).decode()
        assert begin.startswith("BEGIN")
        if isolation is not None:
            assert begin.endswith(isolation.upper())


# --- query_is_write -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 1", False),
        ("  -- comment\n  select * from t", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("INSERT INTO t VALUES (1)", True),
        ("UPDATE t SET a = 1", True),
        ("SELECT 1; DELETE FROM t", True),
        (b"SELECT 1", False),
        (b"select now()", False),
        (b"DELETE FROM t", True),
        (b"SELECT '\xff\xfe'", False),  # not UTF-8: decoded with replacement, never raises
        (b"\xff\xfe INSERT INTO t VALUES (1)", True),
    ],
)
def test_query_is_write_str_and_bytes(query: str | bytes, expected: bool) -> None:
    assert query_is_write(query) is expected


@pytest.mark.parametrize(
    "query",
    [
        SQL("SELECT 1"),
        SQL("SELECT * FROM {}").format(Identifier("t")),
        SQL("SELECT {}").format(Literal(1)),
        Composed([SQL("SELECT "), Literal(1)]),
    ],
    ids=["SQL", "formatted-identifier", "formatted-literal", "Composed"],
)
def test_composed_queries_are_assumed_to_write(query: SQL | Composed) -> None:
    # Rendering needs a connection, so a composed query is not inspected: assume a write.
    assert query_is_write(query) is True


# --- statement_timeout_args -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [(1.5, "1500"), (2.3, "2300"), (0.0001, "1"), (0.0, "1"), (-3.0, "1")],
)
def test_statement_timeout_args(remaining: float, expected: str) -> None:
    assert statement_timeout_args(remaining) == (expected,)


def test_statement_timeout_is_transaction_local() -> None:
    assert b"set_config('statement_timeout', %s, true)" in SET_STATEMENT_TIMEOUT
