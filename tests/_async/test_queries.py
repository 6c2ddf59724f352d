"""Row shapes, streaming and COPY on the handle and in transactions, against a real server."""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from typing_extensions import assert_type

from pgwarden import AsyncDatabase, DeadlineExceeded, Settings
from pgwarden.core.rows import RowShapeError

from ._compat import run, sleep

PAIRS = "SELECT g AS id, 'n' || g AS name FROM generate_series(1, 3) g ORDER BY g"


def make(url: str, **overrides: Any) -> AsyncDatabase:
    return AsyncDatabase(Settings(url=url, **overrides))


def fresh_table(server: Any, name: str, columns: str) -> None:
    server.execute(f"DROP TABLE IF EXISTS {name}")
    server.execute(f"CREATE TABLE {name} ({columns})")


@dataclasses.dataclass(frozen=True)
class User:
    id: int
    name: str


@dataclasses.dataclass(frozen=True)
class UserWithDefault:
    id: int
    name: str
    email: str = "none"


class UserTuple(NamedTuple):
    id: int
    name: str


class Plain:
    def __init__(self, *, id: int, name: str) -> None:
        self.pair = (id, name)


def test_each_row_shape_from_real_queries(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            assert await db.fetch(PAIRS) == [
                {"id": 1, "name": "n1"},
                {"id": 2, "name": "n2"},
                {"id": 3, "name": "n3"},
            ]
            assert await db.fetch(PAIRS, row=dict) == await db.fetch(PAIRS)
            assert await db.fetch(PAIRS, row=tuple) == [(1, "n1"), (2, "n2"), (3, "n3")]
            assert await db.fetch(PAIRS, row=User) == [User(1, "n1"), User(2, "n2"), User(3, "n3")]
            assert await db.fetch(PAIRS, row=UserWithDefault) == [
                UserWithDefault(i, f"n{i}") for i in (1, 2, 3)
            ]
            assert await db.fetch(PAIRS, row=UserTuple) == [
                UserTuple(1, "n1"),
                UserTuple(2, "n2"),
                UserTuple(3, "n3"),
            ]
            assert [p.pair for p in await db.fetch(PAIRS, row=Plain)] == [
                (1, "n1"),
                (2, "n2"),
                (3, "n3"),
            ]
            assert await db.fetchrow(PAIRS, row=User) == User(1, "n1")
            # the overloads give mypy the shape (checked by `mypy`, a no-op at run time)
            assert_type(await db.fetch(PAIRS), list[dict[str, Any]])
            assert_type(await db.fetch(PAIRS, row=dict), list[dict[str, Any]])
            assert_type(await db.fetch(PAIRS, row=tuple), list[tuple[Any, ...]])
            assert_type(await db.fetch(PAIRS, row=User), list[User])
            assert_type(await db.fetchrow(PAIRS, row=UserTuple), UserTuple | None)
            assert_type(await db.with_rows(User).fetch(PAIRS), list[User])
            assert await db.fetchrow("SELECT 1 AS id, 'x' AS name WHERE false", row=User) is None
            assert await db.fetchval(PAIRS) == 1  # fetchval is unaffected by shapes
            # a write under an explicit deadline (BEGIN, the marker, the statement, COMMIT)
            await db.execute("CREATE TEMP TABLE IF NOT EXISTS shapes_w (id int, name text)")
            users = db.with_rows(User)
            assert await users.fetch(PAIRS) == [User(1, "n1"), User(2, "n2"), User(3, "n3")]
            assert await users.fetchrow(PAIRS, timeout=5) == User(1, "n1")
            async with db.transaction() as tx:
                assert await tx.fetch(PAIRS, row=tuple) == [(1, "n1"), (2, "n2"), (3, "n3")]
                assert await tx.fetchrow(PAIRS, row=User) == User(1, "n1")
            # a write returning rows under an explicit deadline, shaped
            fresh = "INSERT INTO shaped_ins VALUES (7, 'seven') RETURNING id, name"
            await db.execute("DROP TABLE IF EXISTS shaped_ins")
            await db.execute("CREATE TABLE shaped_ins (id int, name text)")
            assert await db.fetch(fresh, row=User, timeout=5) == [User(7, "seven")]
            assert await db.fetch(fresh, row=User, timeout=5, write=True) == [User(7, "seven")]

    run(main)


def test_pydantic_models_are_built_from_columns(pg_server: Any) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        id: int
        name: str

    async def main() -> None:
        async with make(pg_server.url) as db:
            rows: list[Any] = await db.fetch(PAIRS, row=Model)
            assert [(r.id, r.name) for r in rows] == [(1, "n1"), (2, "n2"), (3, "n3")]
            with pytest.raises(RowShapeError, match="'extra'"):
                await db.fetch("SELECT 1 AS id, 'x' AS name, 2 AS extra", row=Model)

    run(main)


def test_a_wrong_class_fails_with_an_error_naming_the_column(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            with pytest.raises(RowShapeError, match="User has no field for column 'email'"):
                await db.fetch("SELECT 1 AS id, 'a' AS name, 'e' AS email", row=User)
            with pytest.raises(RowShapeError, match="required field 'name'"):
                await db.fetchrow("SELECT 1 AS id", row=User)
            with pytest.raises(RowShapeError, match="two columns named 'id'"):
                await db.fetch("SELECT 1 AS id, 2 AS id", row=User)
            async with db.transaction() as tx:
                tx_error = None
                try:
                    await tx.fetch("SELECT 1 AS nope", row=User)
                except RowShapeError as exc:
                    tx_error = exc
            assert "column 'nope'" in str(tx_error)
            # the handle is fine afterwards
            assert await db.fetchval("SELECT 1") == 1
            assert db.stats()["in_flight"] == 0

    run(main)


def test_stream_yields_every_row_in_bounded_batches(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            seen = []
            async for row in db.stream(
                "SELECT g AS id, 'n' || g AS name FROM generate_series(1, %s) g ORDER BY g",
                (5003,),
                fetch_size=100,
            ):
                seen.append(row)
            assert [r["id"] for r in seen] == list(range(1, 5004))
            assert seen[10] == {"id": 11, "name": "n11"}
            shaped = [u async for u in db.stream(PAIRS, row=User)]
            assert_type(shaped, list[User])
            assert shaped == [User(1, "n1"), User(2, "n2"), User(3, "n3")]
            as_tuples = [t async for t in db.with_rows(tuple).stream(PAIRS, fetch_size=1)]
            assert as_tuples == [(1, "n1"), (2, "n2"), (3, "n3")]
            assert [r async for r in db.stream("SELECT 1 WHERE false")] == []
            stats = db.stats()
            assert stats["in_flight"] == 0

    run(main)


def test_stopping_a_stream_early_returns_its_connection(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url, max_size=1) as db:
            async with db.stream(
                "SELECT g FROM generate_series(1, 100000) g", fetch_size=50
            ) as rows:
                async for row in rows:
                    if row["g"] == 10:
                        break
                assert rows.rows_delivered == 10
            # the one connection is back: this would wait for it otherwise
            assert await db.fetchval("SELECT 2", timeout=2) == 2
            stream = db.stream("SELECT g FROM generate_series(1, 100000) g", fetch_size=50)
            async for _ in stream:
                break
            await stream.aclose()
            assert await db.fetchval("SELECT 3", timeout=2) == 3
            # nothing of the stream's transaction was left open
            assert (
                await db.fetchval("SELECT count(*) FROM pg_cursors WHERE name LIKE 'pgw_stream_%%'")
                == 0
            )

    run(main)


def test_a_deadline_stops_a_stream(pg_server: Any) -> None:
    async def main() -> None:
        async with make(pg_server.url) as db:
            started = time.monotonic()
            got = 0

            async def slow_consumer() -> None:
                nonlocal got
                query = "SELECT g FROM generate_series(1, 1000000) g"
                async for _ in db.stream(query, timeout=0.5, fetch_size=10):
                    got += 1
                    await sleep(0.001)  # a slow consumer: the deadline bounds the whole

            with pytest.raises(DeadlineExceeded):
                await slow_consumer()
            elapsed = time.monotonic() - started
            assert 0 < got < 1000000
            assert elapsed < 3.0, elapsed
            # a server that is slow to produce the first batch is stopped too
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                async for _ in db.stream("SELECT pg_sleep(5)", timeout=0.5):
                    pass
            assert time.monotonic() - started < 3.0
            assert await db.fetchval("SELECT 1") == 1
            assert db.stats()["in_flight"] == 0

    run(main)


ROWS = [
    (1, "plain", None),
    (2, "tab\tand\nnewline \\ backslash", 2.5),
    (3, "unicodé ✓", -1.0),
]


def test_copy_round_trips_rows_files_and_formats(pg_server: Any) -> None:
    fresh_table(pg_server, "copy_rt", "id int, note text, x float8")
    fresh_table(pg_server, "copy_rt2", "id int, note text, x float8")

    async def main() -> None:
        async with make(pg_server.url) as db:
            assert await db.copy_in("copy_rt", ROWS, columns=["id", "note", "x"]) == 3
            assert await db.fetch("SELECT id, note, x FROM copy_rt ORDER BY id", row=tuple) == ROWS
            binary = io.BytesIO()
            assert await db.copy_out("SELECT * FROM copy_rt ORDER BY id", binary) == 3
            text = io.StringIO()
            assert await db.copy_out("SELECT * FROM copy_rt WHERE id = %s", text, (2,)) == 1
            assert text.getvalue() == "2\ttab\\tand\\nnewline \\\\ backslash\t2.5\n"
            binary.seek(0)
            assert await db.copy_in("public.copy_rt2", binary) == 3
            assert await db.fetch("SELECT * FROM copy_rt2 ORDER BY id", row=tuple) == ROWS
            csv = io.StringIO()
            await db.copy_out("TABLE copy_rt", csv, format="csv")
            await db.execute("TRUNCATE copy_rt2")
            assert (
                await db.copy_in("copy_rt2", io.BytesIO(csv.getvalue().encode()), format="csv") == 3
            )
            assert await db.fetch("SELECT * FROM copy_rt2 ORDER BY id", row=tuple) == ROWS
            with pytest.raises(ValueError, match="format"):
                await db.copy_in("copy_rt2", ROWS, format="xml")
            assert db.stats()["in_flight"] == 0

    run(main)


def test_a_copy_cut_mid_way_leaves_no_rows(pg_server: Any) -> None:
    fresh_table(pg_server, "copy_cut", "id int")

    def rows_then_failure() -> Iterator[tuple[int]]:
        for i in range(5000):
            yield (i,)
        raise RuntimeError("source failed")

    async def main() -> None:
        async with make(pg_server.url) as db:
            with pytest.raises(RuntimeError, match="source failed"):
                await db.copy_in("copy_cut", rows_then_failure())

            async def in_tx(tx: Any) -> None:
                await tx.execute("INSERT INTO copy_cut VALUES (-1)")
                await tx.copy_in("copy_cut", rows_then_failure())

            with pytest.raises(RuntimeError, match="source failed"):
                await db.run_transaction(in_tx)
            assert await db.fetchval("SELECT count(*) FROM copy_cut") == 0

            async def ok(tx: Any) -> int:
                await tx.execute("INSERT INTO copy_cut VALUES (-1)")
                n: int = await tx.copy_in("copy_cut", [(i,) for i in range(10)])
                return n

            assert await db.run_transaction(ok) == 10
            assert await db.fetchval("SELECT count(*) FROM copy_cut") == 11
            assert db.stats()["in_flight"] == 0

    run(main)
    assert pg_server.execute("SELECT count(*) FROM copy_cut")[0][0] == 11


def test_executemany_writes_every_row_atomically(pg_server: Any) -> None:
    fresh_table(pg_server, "many_rows", "id int primary key, v text")

    async def main() -> None:
        async with make(pg_server.url) as db:
            count = await db.executemany(
                "INSERT INTO many_rows VALUES (%s, %s)", [(i, str(i)) for i in range(1000)]
            )
            assert count == 1000
            with pytest.raises(Exception, match="duplicate key"):
                await db.executemany(
                    "INSERT INTO many_rows VALUES (%s, %s)",
                    [(i, "x") for i in range(1000, 1010)] + [(1, "dup")],
                )
            assert await db.fetchval("SELECT count(*) FROM many_rows") == 1000

    run(main)


class Recorder:
    """A statement observer that keeps what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool, int | None]] = []

    def statement_started(self, operation: str, query: object) -> object:
        return operation

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        self.seen.append((str(token), error is None, rowcount))


def test_streams_and_copies_are_observed_and_counted(pg_server: Any) -> None:
    fresh_table(pg_server, "observed_copy", "id int")

    async def main() -> None:
        async with make(pg_server.url) as db:
            recorder = Recorder()
            db.add_statement_observer(recorder)
            before = db.stats()["counters"]["queries"]
            assert len([r async for r in db.stream(PAIRS, fetch_size=2)]) == 3
            assert db.stats()["counters"]["queries"] == before + 1
            await db.copy_in("observed_copy", [(1,), (2,)])
            await db.copy_out("TABLE observed_copy", io.BytesIO())
            with pytest.raises(RowShapeError):
                await db.fetch("SELECT 1 AS x", row=User)
            assert recorder.seen == [
                ("stream", True, 3),
                ("copy_in", True, 2),
                ("copy_out", True, 2),
                ("fetch", False, None),
            ]
            assert db.stats()["in_flight"] == 0

    run(main)
