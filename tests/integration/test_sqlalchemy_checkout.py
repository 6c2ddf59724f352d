"""The dialect's checkout and return path: what the lean path must still do.

SQLAlchemy's rollback-on-return goes to the server only when something is open: what a
raw connection left in a transaction is rolled back before pgwarden lends the
connection again, and a checkout that began nothing sends nothing. Real server; the
server's statement log is the witness.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import pgwarden
from pgwarden.sqlalchemy import handle_of


def _url(url: str, scheme: str = "postgresql+pgwarden") -> str:
    query = f"pgwarden_max_size=1&pgwarden_application_name=sa-co-{uuid.uuid4().hex[:10]}"
    return f"{url.replace('postgresql://', scheme + '://', 1)}?{query}"


def _status(raw: Any) -> TransactionStatus:
    """The transaction status of the psycopg connection behind a pool proxy."""
    driver = raw.driver_connection
    assert driver is not None
    return TransactionStatus(driver.info.transaction_status)


def _logged_between(server: Any, start: str, end: str) -> list[str]:
    """The statements the server logged after the one with *start*, before *end*'s."""
    for _ in range(100):
        log = server.log_path.read_text(errors="replace")
        if end in log:
            break
        time.sleep(0.05)
    window = log.rsplit(start, 1)[1].split(end, 1)[0]
    found = []
    for line in window.splitlines()[1:-1]:
        for tag in ("statement: ", "execute <unnamed>: ", "execute "):
            if tag in line:
                found.append(line.split(tag, 1)[1].split(": ", 1)[-1].strip())
                break
    return found


def test_rollback_on_return_rolls_back_what_is_open_and_sends_nothing_else(
    pg_server_factory: Any,
) -> None:
    server = pg_server_factory({"log_statement": "all"})
    table = f"co_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (id int)")
    engine = create_engine(_url(server.url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 'mark-start'"))
        for _ in range(5):  # bare checkouts: nothing began, nothing to roll back
            engine.raw_connection().close()
        raw = engine.raw_connection()
        raw.cursor().execute(f"INSERT INTO {table} VALUES (1)")
        assert _status(raw) == TransactionStatus.INTRANS
        raw.close()  # rollback-on-return
        again = engine.raw_connection()  # max_size=1: the same pgwarden connection
        assert _status(again) == TransactionStatus.IDLE
        again.close()
        with engine.connect() as conn:
            conn.execute(text("SELECT 'mark-end'"))
        sent = _logged_between(server, "mark-start", "mark-end")
        # The mark's own ROLLBACK, the raw connection's transaction, the end mark's BEGIN.
        assert sent == ["ROLLBACK", "BEGIN", f"INSERT INTO {table} VALUES (1)", "ROLLBACK", "BEGIN"]
        with psycopg.connect(server.url) as other:
            assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    finally:
        db = handle_of(engine)
        engine.dispose()
        if db is not None:
            db.close()


def test_async_rollback_on_return_rolls_back_what_is_open(pg_server: Any) -> None:
    table = f"co_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {table} (id int)")

    async def main() -> None:
        engine = create_async_engine(_url(pg_server.url))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                await conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")
                assert _status(raw) == TransactionStatus.INTRANS
            for _ in range(3):  # bare checkouts, then one that finds it clean
                async with engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    assert _status(raw) == TransactionStatus.IDLE
            async with engine.connect() as conn:
                count = await conn.scalar(text(f"SELECT count(*) FROM {table}"))
                assert count == 0
            db = handle_of(engine)
            assert db is not None
            assert db.stats()["in_flight"] == 0
        finally:
            db = handle_of(engine)
            await engine.dispose()
            if isinstance(db, pgwarden.AsyncDatabase):
                await db.close()

    asyncio.run(main())
