"""Several steps in one write (`pgwarden._async.pipelined`), on a real server.

The steps run in the order given, commands and cursor statements mixed; each statement's
rows are on its cursor afterwards; the first error is raised once every answer is read;
a parameter psycopg cannot adapt stops the queuing but what came before still runs; the
connection is usable after each. Through the fault proxy with a latency, the steps take
one round trip, and `begin_with` takes one where psycopg takes two (it syncs after BEGIN).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from pgwarden._async.pipelined import begin_with, send_together

from ._compat import run

LATENCY = 0.1  # each way: a round trip costs at least 0.2 s


async def _connect(url: str, *, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=autocommit)


def test_steps_run_in_order_and_each_statement_keeps_its_rows(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url)
        try:
            first = conn.cursor(row_factory=tuple_row)
            second = conn.cursor(row_factory=tuple_row)
            await send_together(
                conn,
                b"BEGIN",
                (first, "SELECT %s::int + 1", (41,), None, None),
                b"SET LOCAL application_name = 'pgw-pipelined'",
                (second, "SELECT current_setting('application_name'), %s", ("x",), None, None),
            )
            assert await first.fetchall() == [(42,)]
            # The SET ran after the first statement and before the second.
            assert await second.fetchall() == [("pgw-pipelined", "x")]
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            await conn.execute("ROLLBACK")
            assert conn._pipeline is None
            cur = await conn.cursor(row_factory=tuple_row).execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        finally:
            await conn.close()

    run(body)


def test_the_first_error_is_raised_after_every_answer_is_read(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url)
        try:
            after = conn.cursor(row_factory=tuple_row)
            with pytest.raises(psycopg.errors.DivisionByZero):
                await send_together(
                    conn,
                    b"BEGIN",
                    (conn.cursor(), "SELECT 1 / %s", (0,), None, None),
                    (after, "SELECT 2", None, None, None),
                )
            # The pipeline is left, nothing is pending, the aborted transaction is there.
            assert conn._pipeline is None
            assert conn.info.transaction_status == TransactionStatus.INERROR
            await conn.execute("ROLLBACK")
            cur = await conn.cursor(row_factory=tuple_row).execute("SELECT 3")
            assert await cur.fetchone() == (3,)
        finally:
            await conn.close()

    run(body)


def test_a_parameter_that_cannot_be_adapted_stops_the_queuing(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url)
        try:
            with pytest.raises(psycopg.ProgrammingError):
                await send_together(
                    conn,
                    b"BEGIN",
                    (conn.cursor(), "SELECT %s", (object(),), None, None),
                    b"COMMIT",
                )
            # As psycopg's conn.pipeline(): what was queued before it (BEGIN) went.
            assert conn._pipeline is None
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            await conn.execute("ROLLBACK")
            cur = await conn.cursor(row_factory=tuple_row).execute("SELECT 4")
            assert await cur.fetchone() == (4,)
        finally:
            await conn.close()

    run(body)


def test_inside_a_pipeline_of_the_callers_the_steps_join_it(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url)
        try:
            cur = conn.cursor(row_factory=tuple_row)
            async with conn.pipeline():
                await send_together(conn, b"BEGIN", (cur, "SELECT %s", (5,), None, None))
                assert await cur.fetchone() == (5,)
                await conn.execute("ROLLBACK")
            assert conn.info.transaction_status == TransactionStatus.IDLE
        finally:
            await conn.close()

    run(body)


def test_begin_with_keeps_the_connections_transaction_modes(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url, autocommit=False)
        try:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            await begin_with(conn, b"SET LOCAL statement_timeout = '1234ms'")
            # The transaction is psycopg's own: not in autocommit, its modes applied.
            assert conn.autocommit is False
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            cur = await conn.cursor(row_factory=tuple_row).execute(
                "SELECT current_setting('transaction_isolation'),"
                " current_setting('transaction_read_only'),"
                " current_setting('statement_timeout')"
            )
            assert await cur.fetchone() == ("repeatable read", "on", "1234ms")
            await conn.rollback()
            cur = await conn.cursor(row_factory=tuple_row).execute(
                "SELECT current_setting('statement_timeout')"
            )
            assert await cur.fetchone() == ("0",)  # transaction-local: gone with it
        finally:
            await conn.close()

    run(body)


def test_begin_with_on_a_transaction_already_begun_sends_the_steps_in_it(pg_server: Any) -> None:
    async def body() -> None:
        conn = await _connect(pg_server.url, autocommit=False)
        try:
            await conn.execute("SELECT 1")  # psycopg began the transaction
            await begin_with(conn, b"SET LOCAL application_name = 'pgw-in-tx'")
            cur = await conn.cursor(row_factory=tuple_row).execute(
                "SELECT current_setting('application_name')"
            )
            assert await cur.fetchone() == ("pgw-in-tx",)
            assert conn.autocommit is False
            await conn.rollback()
        finally:
            await conn.close()

    run(body)


def test_round_trips_through_a_slow_link(fault_proxy: Any, pg_server: Any) -> None:
    async def body() -> None:
        url = fault_proxy.url_for(pg_server.url)
        conn = await _connect(url)
        tx = await _connect(url, autocommit=False)
        try:
            fault_proxy.set_latency(LATENCY)
            cur = conn.cursor(row_factory=tuple_row)
            started = time.monotonic()
            await send_together(
                conn, b"BEGIN", (cur, "SELECT %s", (6,), None, None), b"SET LOCAL work_mem = '8MB'"
            )
            one = time.monotonic() - started
            assert await cur.fetchone() == (6,)
            assert 2 * LATENCY <= one < 4 * LATENCY, one  # one round trip, not two

            started = time.monotonic()
            await begin_with(tx, b"SET LOCAL work_mem = '8MB'")
            ours = time.monotonic() - started
            assert 2 * LATENCY <= ours < 4 * LATENCY, ours
            await tx.rollback()

            started = time.monotonic()
            async with tx.pipeline():  # psycopg's own: BEGIN, its sync, then the SET
                await tx.execute(b"SET LOCAL work_mem = '8MB'")
            theirs = time.monotonic() - started
            assert theirs >= 4 * LATENCY, theirs  # what begin_with saves: a round trip
        finally:
            fault_proxy.set_latency(0)
            await conn.close()
            await tx.close()

    run(body)
