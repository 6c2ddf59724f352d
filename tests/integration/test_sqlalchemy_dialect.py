"""``postgresql+pgwarden://`` against a real server: connections, settings, deadlines, events.

Each test names its engines' handle (``pgwarden_application_name``), so its counters
start from zero: handles are shared per process and per settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.dialects.postgresql import HSTORE, JSONB
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import pgwarden
import pgwarden.sqlalchemy as pgsa
from pgwarden._sync._compat import COARSE_TICK
from pgwarden.sqlalchemy import handle_of, run_transaction, run_transaction_async


def sa_url(url: str, *, scheme: str = "postgresql+pgwarden", **settings: object) -> str:
    settings.setdefault("application_name", f"sa-{uuid.uuid4().hex[:10]}")
    query = "&".join(f"pgwarden_{k}={v}" for k, v in settings.items())
    return f"{url.replace('postgresql://', scheme + '://', 1)}?{query}"


def sync_handle(engine: Engine) -> pgwarden.Database:
    db = handle_of(engine)
    assert isinstance(db, pgwarden.Database)
    return db


def async_handle(engine: AsyncEngine) -> pgwarden.AsyncDatabase:
    db = handle_of(engine)
    assert isinstance(db, pgwarden.AsyncDatabase)
    return db


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Sync engines to dispose, and whose handles to close, when the test ends."""
    made: list[Engine] = []
    yield made
    for engine in made:
        db = handle_of(engine)
        engine.dispose()
        if db is not None:
            db.close()


def backend_gone(server: Any, pid: int, within: float = 5.0) -> bool:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if not server.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]):
            return True
        time.sleep(0.02)
    return False


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "sa_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    attrs: Mapped[dict[str, str]] = mapped_column(HSTORE)
    body: Mapped[dict[str, Any]] = mapped_column(JSONB)


class Account(Base):
    __tablename__ = "sa_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


DOCS = Base.metadata.tables["sa_docs"]
ACCOUNTS = Base.metadata.tables["sa_accounts"]


# --- importing and configuring -----------------------------------------------------------------


def test_import_pgwarden_does_not_import_sqlalchemy() -> None:
    code = (
        "import sys, pgwarden; assert 'sqlalchemy' not in sys.modules; "
        "import pgwarden.sqlalchemy; assert 'sqlalchemy' in sys.modules; "
        "from sqlalchemy.engine import make_url; "
        "print(make_url('postgresql+pgwarden://').get_dialect().__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PGDialect_pgwarden"


def test_importing_the_dialect_defers_what_only_a_connection_needs() -> None:
    """Like SQLAlchemy's own psycopg dialect, importing ours loads no driver; nor the
    ORM, the asyncio extension or pgwarden's shells: a cold start pays for those when
    an engine connects (``create_async_engine`` imports the asyncio extension itself)."""
    deferred = [
        "psycopg",
        "psycopg_pool",
        "sqlalchemy.orm",
        "sqlalchemy.ext.asyncio",
        "pgwarden._handle.state",
        "pgwarden._async.database",
        "pgwarden._sync.database",
    ]
    code = (
        "import sys, json; import pgwarden.sqlalchemy, pgwarden.sqlalchemy.dialect; "
        f"print(json.dumps([m for m in {deferred!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_transaction_status_values_are_libpqs() -> None:
    from psycopg.pq import TransactionStatus

    from pgwarden.sqlalchemy import dialect

    assert (dialect._IDLE, dialect._INTRANS) == (TransactionStatus.IDLE, TransactionStatus.INTRANS)


def test_the_dialect_classes_for_sync_async_and_the_explicit_async_name() -> None:
    from sqlalchemy.dialects import registry

    registry.register(
        "postgresql.pgwarden_async", "pgwarden.sqlalchemy.dialect", "PGDialectAsync_pgwarden"
    )
    url = "postgresql+pgwarden://u:p@127.0.0.1:1/db"
    for engine, expected in (
        (create_engine(url), pgsa.PGDialect_pgwarden),
        (create_async_engine(url).sync_engine, pgsa.PGDialectAsync_pgwarden),
        (
            create_async_engine(url.replace("pgwarden", "pgwarden_async")).sync_engine,
            pgsa.PGDialectAsync_pgwarden,
        ),
    ):
        assert type(engine.dialect) is expected
        assert isinstance(engine.pool, pgsa.PgwardenPool)
    # QueuePool's sizing arguments, left over from before the switch, are accepted.
    engine = create_engine(url, pool_size=20, max_overflow=5, pool_timeout=3, pool_use_lifo=True)
    assert isinstance(engine.pool, pgsa.PgwardenPool)


def test_connect_parameters_split_into_settings_libpq_and_psycopg() -> None:
    from pgwarden.sqlalchemy._params import split_connect_params

    split = split_connect_params(
        {
            "host": "db",
            "port": 5432,
            "password": "s3cret",
            "pgwarden_max_size": "4",
            "pgwarden_resolve_commits": "off",
            "pgwarden_leak_threshold": 2.5,  # connect_args may give the value itself
            "tcp_user_timeout": "1000",
            "context": None,
            "sslmode": "require",
        }
    )
    assert split.settings == {
        "max_size": 4,
        "resolve_commits": False,
        "leak_threshold": 2.5,
        "tcp_user_timeout": 1000,
    }
    assert split.libpq == {"host": "db", "port": 5432, "password": "s3cret", "sslmode": "require"}
    with pytest.raises(pgwarden.SettingsError, match="given twice"):
        split_connect_params({"application_name": "a", "pgwarden_application_name": "b"})
    with pytest.raises(pgwarden.SettingsError, match="keepalives"):
        split_connect_params({"keepalives": "0"})
    with pytest.raises(pgwarden.SettingsError) as info:
        split_connect_params({"password": "s3cret", "pgwarden_nope": "s3cret"})
    assert "s3cret" not in str(info.value)


def test_url_parameters_are_pgwardens_settings_and_never_reach_libpq(
    pg_server: Any, engines: list[Engine]
) -> None:
    url = sa_url(pg_server.url, max_size=3, default_timeout="none", application_name="sa-params")
    engine = create_engine(url + "&connect_timeout=3&sslmode=disable")
    engines.append(engine)
    with engine.connect() as conn:
        name = conn.execute(text("SHOW application_name")).scalar_one()
    db = sync_handle(engine)
    assert name == "sa-params"
    assert (db.settings.max_size, db.settings.default_timeout) == (3, None)
    assert db.settings.connect_timeout == 3.0  # a libpq parameter pgwarden sets itself
    assert "pgwarden_" not in (db.settings.url or "")
    assert "sslmode=disable" in (db.settings.url or "")


def test_bad_pgwarden_parameters_fail_at_create_engine_without_the_password(
    pg_server: Any,
) -> None:
    base = pg_server.url.replace("postgresql://", "postgresql+pgwarden://", 1)
    with pytest.raises(
        pgwarden.SettingsError, match="unknown pgwarden setting pgwarden_max_sise"
    ) as e:
        create_engine(base + "?pgwarden_max_sise=3")
    assert pg_server.password not in str(e.value)
    assert "pgwarden_max_size" in str(e.value)  # the known names are listed
    with pytest.raises(pgwarden.SettingsError, match="pgwarden_max_size='lots'"):
        create_engine(base + "?pgwarden_max_size=lots")
    with pytest.raises(pgwarden.SettingsError, match="pgwarden_url"):
        create_engine(base + "?pgwarden_url=x")
    engine = create_engine(base, connect_args={"autocommit": True})
    with pytest.raises(pgwarden.SettingsError, match="autocommit"):
        engine.connect()


def test_the_factory_takes_any_postgres_url_and_settings_as_a_mapping(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = pgsa.create_engine(
        pg_server.url.replace("postgresql://", "postgres://", 1),
        pgwarden={"max_size": 2, "application_name": "sa-factory"},
    )
    engines.append(engine)
    assert engine.dialect.driver == "pgwarden"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert sync_handle(engine).settings.max_size == 2
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        pgsa.create_engine("sqlite://")


def test_engines_with_equal_settings_share_one_handle(
    pg_server: Any, engines: list[Engine]
) -> None:
    url = sa_url(pg_server.url)
    first, second = create_engine(url), create_engine(url)
    other_json = create_engine(url, json_serializer=json.dumps)
    engines.extend([first, second, other_json])
    for engine in engines:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert handle_of(first) is handle_of(second)
    assert first.dialect._psycopg_adapters_map is second.dialect._psycopg_adapters_map  # type: ignore[attr-defined]
    # Another JSON serializer is another AdaptersMap, so another handle (and pool).
    assert handle_of(other_json) is not handle_of(first)


# --- the connections SQLAlchemy gets ----------------------------------------------------------


def test_connections_are_in_sqlalchemys_shape_and_go_back_in_pgwardens(
    pg_server: Any, engines: list[Engine]
) -> None:
    pg_server.execute("DROP TABLE IF EXISTS sa_shape")
    pg_server.execute("CREATE TABLE sa_shape (id int)")
    engine = create_engine(sa_url(pg_server.url, max_size=1))
    engines.append(engine)
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        assert driver.autocommit is False
        assert driver.execute("SELECT 1, 'a'").fetchone() == (1, "a")  # tuple rows
        conn.rollback()
        conn.execute(text("INSERT INTO sa_shape VALUES (1)"))  # do_begin is a no-op...
        assert driver.info.transaction_status == TransactionStatus.INTRANS  # ...BEGIN is real
        conn.rollback()
        serializable = conn.execution_options(isolation_level="SERIALIZABLE")
        assert serializable.execute(text("SHOW transaction_isolation")).scalar_one() == (
            "serializable"
        )
    assert pg_server.execute("SELECT count(*) FROM sa_shape")[0][0] == 0
    db = sync_handle(engine)
    assert db.stats()["in_flight"] == 0
    with db.connection() as same:  # max_size=1: the very same connection
        assert same is driver
        assert same.autocommit
        assert same.isolation_level is None
        assert same.execute("SELECT 1 AS one").fetchone() == {"one": 1}


def test_json_serializers_and_hstore_reach_every_connection(
    pg_server: Any, engines: list[Engine]
) -> None:
    pg_server.execute("CREATE EXTENSION IF NOT EXISTS hstore")
    loads: list[str] = []

    def deserialize(raw: str) -> Any:
        loads.append(raw)
        return json.loads(raw)

    # min_size=3: the pool opens connections before SQLAlchemy has found HSTORE.
    engine = create_engine(
        sa_url(pg_server.url, min_size=3, max_size=3), json_deserializer=deserialize
    )
    engines.append(engine)
    Base.metadata.drop_all(engine, tables=[DOCS])
    Base.metadata.create_all(engine, tables=[DOCS])
    with Session(engine) as session, session.begin():
        session.add(Doc(id=1, attrs={"k": "v"}, body={"a": [1, 2]}))
    barrier = threading.Barrier(3)
    seen: list[tuple[Any, Any]] = []

    def read() -> None:
        with Session(engine) as session:
            doc = session.get(Doc, 1)
            assert doc is not None
            seen.append((doc.attrs, doc.body))
            barrier.wait(30)  # three sessions at once: three connections (a loaded CI machine)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert seen == [({"k": "v"}, {"a": [1, 2]})] * 3
    assert len(loads) >= 3  # our deserializer, on every connection


def test_the_pool_is_pgwardens_with_no_round_trip_per_checkout(
    pg_server_factory: Any,
) -> None:
    """Twenty checkouts send what the work needs (BEGIN, the query, ROLLBACK) and
    nothing else; SQLAlchemy's pool with pool_pre_ping adds a ping to each."""
    server = pg_server_factory({"log_statement": "all"})

    def statements(engine: Engine) -> list[str]:
        with engine.connect() as conn:
            conn.execute(text("SELECT 'mark-start'"))
        for _ in range(20):
            with engine.connect() as conn:
                conn.execute(text("SELECT 42"))
        with engine.connect() as conn:
            conn.execute(text("SELECT 'mark-end'"))
        for _ in range(100):
            log = server.log_path.read_text(errors="replace")
            if "mark-end" in log:
                break
            time.sleep(0.05)
        window = log.rsplit("mark-start", 1)[1].split("mark-end", 1)[0]
        found = []
        for line in window.splitlines()[1:-1]:
            for tag in ("statement: ", "execute <unnamed>: ", "execute "):
                if tag in line:
                    found.append(line.split(tag, 1)[1].split(": ", 1)[-1].strip())
                    break
        return found

    ours = create_engine(sa_url(server.url))
    sent = statements(ours)
    assert sent.count("SELECT 42") == 20
    assert sent.count("BEGIN") == 21  # 20 and the one of the end mark
    assert sorted(set(sent)) == ["BEGIN", "ROLLBACK", "SELECT 42"]
    db = sync_handle(ours)
    assert isinstance(ours.pool, pgsa.PgwardenPool)
    assert db.stats()["counters"]["connections_opened"] == 1
    db.close()

    theirs = create_engine(
        server.url.replace("postgresql://", "postgresql+psycopg://", 1), pool_pre_ping=True
    )
    pinged = statements(theirs)
    assert len(pinged) >= len(sent) + 20  # a ping per checkout
    theirs.dispose()


def test_an_invalidated_connection_is_closed_not_returned(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url, max_size=2))
    engines.append(engine)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.invalidate()
    assert backend_gone(pg_server, pid)
    db = sync_handle(engine)
    assert db.stats()["counters"]["connections_closed"].get("broken") == 1
    assert db.stats()["in_flight"] == 0
    # Soft invalidation: the connection finishes its work, then is closed on return.
    with engine.connect() as conn:
        soft_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert soft_pid != pid
        conn.connection.invalidate(soft=True)
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert backend_gone(pg_server, soft_pid)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() not in (pid, soft_pid)


def test_async_engine_is_real_asyncio_and_invalidation_closes(pg_server: Any) -> None:
    url = sa_url(pg_server.url, max_size=2)

    async def main() -> None:
        engine = create_async_engine(url)
        assert type(engine.sync_engine.dialect).__name__ == "PGDialectAsync_pgwarden"
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert isinstance(driver, psycopg.AsyncConnection)
            assert driver.autocommit is False
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await conn.invalidate()
        assert await asyncio.to_thread(backend_gone, pg_server, pid)
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            assert (await session.execute(select(1))).scalar_one() == 1
        db = async_handle(engine)
        stats = db.stats()
        assert stats["counters"]["connections_closed"].get("broken") == 1
        assert stats["in_flight"] == 0
        await engine.dispose()
        await db.close()

    asyncio.run(main())


def test_an_engine_with_its_own_connect_listener_gets_its_own_connections(
    pg_server: Any, engines: list[Engine]
) -> None:
    pg_server.execute("CREATE SCHEMA IF NOT EXISTS sa_listener")
    url = sa_url(pg_server.url)
    plain, custom = create_engine(url), create_engine(url)
    engines.append(plain)

    @event.listens_for(custom, "connect")
    def search_path(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute("SET search_path TO sa_listener")
        dbapi_connection.commit()

    with custom.connect() as conn:
        assert conn.execute(text("SHOW search_path")).scalar_one() == "sa_listener"
    with plain.connect() as conn:  # the session SET did not reach this engine
        assert conn.execute(text("SHOW search_path")).scalar_one() != "sa_listener"
    own = handle_of(custom)
    assert own is not None
    assert own is not handle_of(plain)
    custom.dispose()  # the engine's own handle closes with it
    assert own.state.value == "closed"


def test_connect_events_run_once_per_pgwarden_connection_as_with_queuepool(
    pg_server: Any,
) -> None:
    """The pool keeps SQLAlchemy's record of each pgwarden connection: five checkouts of
    the one connection, one connect event (and its session SET lasts)."""
    engine = create_engine(sa_url(pg_server.url, max_size=1))
    connects: list[int] = []

    @event.listens_for(engine, "connect")
    def count(dbapi_connection: Any, record: Any) -> None:
        connects.append(dbapi_connection.info.backend_pid)
        dbapi_connection.execute("SET application_name = 'sa-connect-once'")
        dbapi_connection.commit()

    pids = set()
    for _ in range(5):
        with engine.connect() as conn:
            pids.add(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            assert conn.execute(text("SHOW application_name")).scalar_one() == "sa-connect-once"
    assert len(pids) == 1
    assert connects == list(pids)
    db = sync_handle(engine)
    assert db.stats()["in_flight"] == 0
    engine.dispose()  # the engine's own handle (it has a connect listener) closes with it
    assert db.state.value == "closed"


def test_an_engine_isolation_level_holds_at_every_checkout_and_goes_back(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url, max_size=1), isolation_level="SERIALIZABLE")
    engines.append(engine)
    for _ in range(3):
        with engine.connect() as conn:
            level = conn.execute(text("SHOW transaction_isolation")).scalar_one()
            assert level == "serializable"
    with sync_handle(engine).connection() as same:  # pgwarden's own shape on return
        assert same.isolation_level is None
        row = same.execute("SHOW transaction_isolation").fetchone()
        assert row == {"transaction_isolation": "read committed"}


def test_do_connect_listeners_are_handed_every_checkout_and_its_record(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url, max_size=1))
    engines.append(engine)
    records: list[Any] = []

    @event.listens_for(engine, "do_connect")
    def seen(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        records.append(record)

    for _ in range(3):
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert len(records) == 3
    assert all(record is not None for record in records)
    stats = sync_handle(engine).stats()
    assert stats["in_flight"] == 0
    assert stats["counters"]["connections_opened"] == 1  # given back each time, not closed


# --- deadlines ---------------------------------------------------------------------------------


def test_a_deadline_ends_a_statement_on_the_server_and_bounds_acquire(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url, max_size=1))
    engines.append(engine)
    sessions = sessionmaker(engine)
    started = time.monotonic()
    with (
        pytest.raises(pgwarden.DeadlineExceeded) as info,
        pgwarden.deadline(0.5),
        sessions() as session,
    ):
        session.execute(text("SELECT pg_sleep(5)"))
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5
    # The server's statement_timeout fired (not only the client's sever at +50 ms).
    assert isinstance(info.value.last_error, psycopg.errors.QueryCanceled)
    db = sync_handle(engine)
    assert "broken" not in db.stats()["counters"]["connections_closed"]
    assert db.stats()["counters"]["errors"] == {"timeout": 1}
    with engine.connect() as conn:  # transaction-local: nothing left in the session
        assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "0"

    # Each transaction of a connection gets the time left.
    with pgwarden.deadline(1.0), engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(0.4)"))
        conn.commit()
        started = time.monotonic()
        with pytest.raises(pgwarden.DeadlineExceeded):
            conn.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 0.9

    # run_transaction: the deadline is not re-run past.
    calls = 0

    def slow(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.execute(text("SELECT pg_sleep(5)"))

    with pytest.raises(pgwarden.DeadlineExceeded):
        run_transaction(sessions, slow, timeout=0.5)
    assert calls == 1

    # Acquire: the one connection is taken.
    with engine.connect() as held:
        held.execute(text("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(pgwarden.AcquireTimeout), pgwarden.deadline(0.3):
            engine.connect()
        assert time.monotonic() - started < 1.0


def test_async_deadline_ends_a_statement_on_the_server(pg_server: Any) -> None:
    url = sa_url(pg_server.url)

    async def main() -> None:
        engine = create_async_engine(url)
        sessions = async_sessionmaker(engine)
        started = time.monotonic()
        async with sessions() as session:
            with pytest.raises(pgwarden.DeadlineExceeded) as info, pgwarden.deadline(0.5):
                await session.execute(text("SELECT pg_sleep(5)"))
        assert 0.45 <= time.monotonic() - started < 1.5
        assert isinstance(info.value.last_error, psycopg.errors.QueryCanceled)

        async def slow(session: Any) -> None:
            await session.execute(text("SELECT pg_sleep(5)"))

        with pytest.raises(pgwarden.DeadlineExceeded):
            await run_transaction_async(sessions, slow, timeout=0.3)
        db = async_handle(engine)
        await engine.dispose()
        await db.close()

    asyncio.run(main())


# --- what pgwarden sees of the ORM's traffic ---------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    def statement_started(self, operation: str, query: object) -> object:
        return (operation, str(query))

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        assert isinstance(token, tuple)
        operation, query = token
        self.seen.append((operation, query, None if error is None else type(error).__name__))


def test_metrics_observers_and_the_leak_watch_see_orm_traffic(
    pg_server: Any, engines: list[Engine], caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(sa_url(pg_server.url, leak_threshold=0.2, slow_query_threshold=0.15))
    engines.append(engine)
    Base.metadata.drop_all(engine, tables=[ACCOUNTS])
    Base.metadata.create_all(engine, tables=[ACCOUNTS])
    db = sync_handle(engine)
    before = db.stats()
    recorder = Recorder()
    remove = db.add_statement_observer(recorder)
    sessions = sessionmaker(engine)
    with sessions.begin() as session:
        session.add(Account(id=1, balance=10))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Account(id=1, balance=20))
    with sessions() as session:
        account = session.get(Account, 1)  # the session takes its connection here
        taken_at = sys._getframe().f_lineno - 1
        assert account is not None
        assert account.balance == 10
        session.execute(text("SELECT pg_sleep(0.2)"))  # past slow_query_threshold
        assert db.stats()["in_flight"] == 1
        time.sleep(0.2 + COARSE_TICK + 0.3)  # held past leak_threshold (a coarse watch)
    remove()
    # The leak report names the line that took the connection, not SQLAlchemy's pool.
    sites = [r.site for r in caplog.records if getattr(r, "event", None) == "leak"]  # type: ignore[attr-defined]
    assert sites == [f"{__file__}:{taken_at} in {sys._getframe().f_code.co_name}"]
    stats = db.stats()
    assert stats["in_flight"] == 0
    # The ORM's statements are the handle's queries: each success counted and timed
    # (the INSERT, the get, the sleep), each failure counted by kind, not as a query.
    counters = stats["counters"]
    assert counters["queries"] - before["counters"]["queries"] == 3
    histogram = stats["histograms"]["query_duration_seconds"]
    assert histogram["count"] - before["histograms"]["query_duration_seconds"]["count"] == 3
    assert histogram["max"] >= 0.2
    assert counters["slow_queries"] - before["counters"]["slow_queries"] == 1
    slow = [r for r in caplog.records if getattr(r, "event", None) == "slow_query"]
    assert [r.statement for r in slow] == ["SELECT pg_sleep(?)"]  # type: ignore[attr-defined]
    assert counters["errors"] == {"permanent": 1}
    assert counters["leaked_connections"] == 1
    inserts = [s for s in recorder.seen if s[1].startswith("INSERT INTO sa_accounts")]
    assert [(op, err) for op, _, err in inserts] == [
        ("sqlalchemy", None),
        ("sqlalchemy", "UniqueViolation"),
    ]


def test_async_leak_report_names_the_users_line(
    pg_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The asyncio dialect checks out inside SQLAlchemy's greenlet; the report still
    names the coroutine's line that took the connection."""
    url = sa_url(pg_server.url, leak_threshold=0.2)
    caplog.set_level(logging.WARNING, logger="pgwarden")
    lines: list[int] = []

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                lines.append(sys._getframe().f_lineno - 1)
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
                await asyncio.sleep(0.2 + COARSE_TICK + 0.3)  # past leak_threshold
        finally:
            await engine.dispose()

    asyncio.run(main())
    sites = [r.site for r in caplog.records if getattr(r, "event", None) == "leak"]  # type: ignore[attr-defined]
    assert sites == [f"{__file__}:{lines[0]} in main"]


def test_async_orm_statements_are_the_handles_queries(pg_server: Any) -> None:
    url = sa_url(pg_server.url, slow_query_threshold=0.15)

    async def main() -> None:
        engine = create_async_engine(url)
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            assert (await session.execute(select(1))).scalar_one() == 1
        db = async_handle(engine)
        before = db.stats()["counters"]
        recorder = Recorder()
        remove = db.add_statement_observer(recorder)
        async with sessions() as session:
            await session.execute(text("SELECT pg_sleep(0.2)"))
            with pytest.raises(DBAPIError):
                await session.execute(text("SELECT 1/0"))
        remove()
        after = db.stats()["counters"]
        assert after["queries"] - before["queries"] == 1
        assert after["slow_queries"] - before["slow_queries"] == 1
        assert after["errors"] == {"permanent": 1}
        assert [(op, query, err) for op, query, err in recorder.seen] == [
            ("sqlalchemy", "SELECT pg_sleep(0.2)", None),
            ("sqlalchemy", "SELECT 1/0", "DivisionByZero"),
        ]
        await engine.dispose()
        await db.close()

    asyncio.run(main())


# --- run_transaction ---------------------------------------------------------------------------


def test_run_transaction_reruns_serialization_failures(
    pg_server: Any, engines: list[Engine]
) -> None:
    # Four clients racing on one row: conflicts are the point, so the retry budget
    # (which caps retries at ~10% of traffic in an outage) is given room here.
    engine = create_engine(sa_url(pg_server.url, max_size=4, retry_budget_floor=100))
    engines.append(engine)
    Base.metadata.drop_all(engine, tables=[ACCOUNTS])
    Base.metadata.create_all(engine, tables=[ACCOUNTS])
    with sessionmaker(engine).begin() as session:
        session.add(Account(id=1, balance=0))
    serializable = sessionmaker(engine.execution_options(isolation_level="SERIALIZABLE"))
    errors: list[BaseException] = []

    def deposit(session: Session) -> int:
        account = session.get(Account, 1)
        assert account is not None
        time.sleep(0.02)  # the others read the same balance meanwhile: 40001
        account.balance += 1
        session.flush()
        return account.balance

    def client() -> None:
        try:
            for _ in range(5):
                run_transaction(serializable, deposit, timeout=20, attempts=50)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert pg_server.execute("SELECT balance FROM sa_accounts WHERE id = 1")[0][0] == 20
    stats = sync_handle(engine).stats()
    assert stats["counters"]["retries"]["by_reason"].get("conflict", 0) >= 1
    assert stats["counters"]["errors"].get("conflict", 0) >= 1


def test_run_transaction_runs_once_what_it_must_not_rerun(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url))
    engines.append(engine)
    Base.metadata.drop_all(engine, tables=[ACCOUNTS])
    Base.metadata.create_all(engine, tables=[ACCOUNTS])
    sessions = sessionmaker(engine)
    calls = 0

    def duplicate(session: Session) -> None:
        nonlocal calls
        calls += 1
        session.add_all([Account(id=7, balance=1), Account(id=7, balance=2)])

    with pytest.raises(IntegrityError):
        run_transaction(sessions, duplicate)
    assert calls == 1

    def refuse(connection: Any) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("insufficient funds")

    with pytest.raises(ValueError, match="insufficient funds"):
        run_transaction(engine, refuse)
    assert calls == 2

    def nested(session: Session) -> None:
        run_transaction(sessions, lambda inner: None)

    with pytest.raises(RuntimeError, match="begin_nested"):
        run_transaction(sessions, nested)
    with Session(engine) as session, pytest.raises(TypeError, match="session factory"):
        run_transaction(session, lambda s: None)  # type: ignore[call-overload]
    # A write a read-only transaction refuses (25006) is the caller's, not a failover.
    read_only = sessionmaker(engine.execution_options(postgresql_readonly=True))
    with pytest.raises(DBAPIError) as info:
        run_transaction(read_only, lambda s: s.add(Account(id=8, balance=1)))
    assert getattr(info.value.orig, "sqlstate", None) == "25006"
    stats = sync_handle(engine).stats()
    assert stats["counters"]["retries"]["total"] == 0
    assert "failover" not in stats["counters"]["errors"]
    assert stats["counters"]["connections_closed"].get("failover") is None


def test_run_transaction_with_an_engine_gives_a_connection(
    pg_server: Any, engines: list[Engine]
) -> None:
    engine = create_engine(sa_url(pg_server.url))
    engines.append(engine)
    assert run_transaction(engine, lambda c: c.execute(text("SELECT 41 + 1")).scalar_one()) == 42
