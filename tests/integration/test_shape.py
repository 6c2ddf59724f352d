"""`autocommit_in_place`: psycopg's autocommit setter without its lock, only where the
setter would do nothing but assign. Real connections: what the server sees afterwards
is the witness (a statement after autocommit off opens a transaction; after on, not)."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg.pq import TransactionStatus

from pgwarden._handle.shape import autocommit_in_place
from pgwarden.testing import PostgresServer


def test_idle_connection_changes_like_the_public_setter(pg_server: PostgresServer) -> None:
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        assert autocommit_in_place(conn, False)
        assert conn.autocommit is False
        conn.execute("SELECT 1")  # psycopg sends BEGIN first: a transaction is open
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        conn.rollback()
        assert autocommit_in_place(conn, True)
        assert conn.autocommit is True
        conn.execute("SELECT 1")
        assert conn.info.transaction_status == TransactionStatus.IDLE


def test_not_in_a_transaction_or_a_pipeline(pg_server: PostgresServer) -> None:
    with psycopg.connect(pg_server.url) as conn:  # autocommit off
        conn.execute("SELECT 1")
        assert not autocommit_in_place(conn, True)  # in a transaction: the setter's error
        assert conn.autocommit is False
        conn.rollback()
        with conn.pipeline():
            assert not autocommit_in_place(conn, True)
        assert conn.autocommit is False


def test_async_connection(pg_server: PostgresServer) -> None:
    async def main() -> tuple[bool, TransactionStatus]:
        conn = await psycopg.AsyncConnection.connect(pg_server.url, autocommit=True)
        try:
            done = autocommit_in_place(conn, False)
            await conn.execute("SELECT 1")
            return done, TransactionStatus(conn.info.transaction_status)
        finally:
            await conn.close()

    done, status = asyncio.run(main())
    assert done
    assert status == TransactionStatus.INTRANS
