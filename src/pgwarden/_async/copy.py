"""COPY on one connection: ``copy_in`` (rows or a file into a table) and ``copy_out``.

These run on a connection already in a transaction (`AsyncTransaction.copy_in`,
`AsyncTransaction.copy_out`); the handle's own ``copy_in``/``copy_out`` open
that transaction (readiness, the lease under the deadline, commit resolution)
and never re-run a COPY once it reached the server (docs/queries.md). A source
that raises mid-way aborts the COPY with CopyFail, so the server keeps none of
its rows.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from psycopg import sql

from pgwarden._async.connection import PgwAsyncConnection
from pgwarden._handle.sql import Params, Query
from pgwarden.core.tracing import StatementObserver

__all__ = ["COPY_CHUNK", "CopySink", "CopySource", "copy_in_on", "copy_in_sql", "copy_out_on"]

#: How much of a file source is read (and sent) at a time.
COPY_CHUNK = 128 * 1024

_FORMATS = ("text", "csv", "binary")


class CopySink(Protocol):
    """Where ``copy_out`` writes: a binary or text file (anything with ``write``)."""

    def write(self, data: Any, /) -> Any: ...


#: What ``copy_in`` reads: rows (sequences of values, in *columns* order) or a
#: file (anything with ``read``) holding data in the COPY *format*, or bytes.
CopySource = Iterable[Sequence[Any]] | bytes | Any


def copy_in_sql(
    table: str | sql.Composable, columns: Sequence[str] | None, fmt: str
) -> sql.Composed:
    """``COPY table (columns) FROM STDIN``; a str *table* may be ``schema.table``."""
    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {list(_FORMATS)}, not {fmt!r}")
    target = sql.Identifier(*table.split(".")) if isinstance(table, str) else table
    parts: list[sql.Composable] = [sql.SQL("COPY "), target]
    if columns:
        parts += [sql.SQL(" ("), sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(")")]
    parts.append(sql.SQL(" FROM STDIN"))
    if fmt != "text":
        parts.append(sql.SQL(" (FORMAT {})").format(sql.SQL(fmt)))
    return sql.Composed(parts)


def _copy_out_sql(query: Query, fmt: str) -> sql.Composed:
    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {list(_FORMATS)}, not {fmt!r}")
    if isinstance(query, bytes):
        inner: sql.Composable = sql.SQL(query.decode())
    elif isinstance(query, str):
        inner = sql.SQL(query)
    else:
        inner = query
    tail = " TO STDOUT" if fmt == "text" else f" TO STDOUT (FORMAT {fmt})"
    return sql.Composed([sql.SQL("COPY ("), inner, sql.SQL(")" + tail)])


async def copy_in_on(
    conn: PgwAsyncConnection,
    observer: StatementObserver,
    table: str | sql.Composable,
    source: CopySource,
    columns: Sequence[str] | None,
    fmt: str,
) -> int:
    """COPY *source* into *table* on *conn*; the number of rows the server took."""
    statement = copy_in_sql(table, columns, fmt)
    token = observer.statement_started("copy_in", statement)
    cur = conn.cursor()
    try:
        async with cur.copy(statement) as copy:
            if isinstance(source, bytes | bytearray | memoryview):
                await copy.write(source)
            elif hasattr(source, "read"):
                while chunk := source.read(COPY_CHUNK):
                    await copy.write(chunk)
            else:
                if fmt != "text":
                    raise ValueError("rows are sent in the text format; format= is for files")
                for row in source:
                    await copy.write_row(row)
    except BaseException as exc:
        observer.statement_finished(token, exc, None)
        raise
    observer.statement_finished(token, None, cur.rowcount)
    return cur.rowcount


async def copy_out_on(
    conn: PgwAsyncConnection,
    observer: StatementObserver,
    query: Query,
    sink: CopySink,
    params: Params,
    fmt: str,
) -> int:
    """COPY the rows of *query* to *sink* on *conn*; the number of rows copied."""
    statement = _copy_out_sql(query, fmt)
    token = observer.statement_started("copy_out", query)
    cur = conn.cursor()
    text = isinstance(sink, io.TextIOBase)
    encoding = conn.info.encoding
    try:
        async with cur.copy(statement, params) as copy:
            async for data in copy:
                sink.write(bytes(data).decode(encoding) if text else data)
    except BaseException as exc:
        observer.statement_finished(token, exc, None)
        raise
    observer.statement_finished(token, None, cur.rowcount)
    return cur.rowcount
