"""Server-side prepared statements behind a pooler: when to keep them, when to give up.

psycopg prepares a statement on the server once it has run ``prepare_threshold``
times, under a name of its own (``_pg3_0``, ``_pg3_1``, ... on every connection).
Behind PgBouncer in transaction mode each transaction may run on another server
connection, so a Bind lands where that name was never prepared (26000,
"prepared statement ... does not exist") or a Parse where another client already
used it (42P05, "... already exists"). pgwarden therefore turns prepares off
behind PgBouncer (``prepare_threshold=None``).

PgBouncer 1.21 and later can track protocol-level prepared statements itself
(``max_prepared_statements`` > 0: 0 by default in 1.21 to 1.23, 200 since 1.24;
its src/prepare.c): it renames them and prepares them again on whichever server
connection runs the statement. The
setting ``pooler_prepared_statements=True`` keeps psycopg's prepares on behind
such a PgBouncer. If the pooler does not do it after all (an older PgBouncer,
``max_prepared_statements = 0``), the first 26000 or 42P05 says so: that
statement never ran (the server refused its Parse or Bind), so it is retried
like any failure that ran nothing, and the handle falls back to unprepared
statements on all its connections, for good.

What no fallback can catch: a Bind that lands on a server connection holding
another client's ``_pg3_0`` with a parameter list that fits runs that other
statement. Opt in only behind a pooler that tracks prepared statements.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LOST_PREPARED_SQLSTATES", "connection_prepare_threshold", "lost_prepared_statement"]

#: invalid_sql_statement_name ("does not exist") and duplicate_prepared_statement.
LOST_PREPARED_SQLSTATES: Final = frozenset({"26000", "42P05"})


def connection_prepare_threshold(
    configured: int | None, *, pgbouncer: bool, opted_in: bool, fell_back: bool = False
) -> int | None:
    """The ``prepare_threshold`` a connection of the handle gets.

    *configured*: the setting; *pgbouncer*: a transaction pooler was detected or
    declared; *opted_in*: ``pooler_prepared_statements``; *fell_back*: a 26000 or
    42P05 behind the pooler already showed that it does not track prepares.
    Without a pooler the setting applies as is.
    """
    if not pgbouncer:
        return configured
    if opted_in and not fell_back:
        return configured
    return None


def lost_prepared_statement(
    sqlstate: str | None, *, configured: int | None, pgbouncer: bool, opted_in: bool
) -> bool:
    """Is a failure with *sqlstate* psycopg's prepared statement lost by the pooler?

    Only when prepares were kept on behind it (opted in, a threshold set): then
    26000 and 42P05 mean the statement never ran, and the handle must fall back.
    Still True after the fallback, for connections that were checked out with
    prepares on when it happened. Otherwise they are the application's own errors.
    """
    return sqlstate in LOST_PREPARED_SQLSTATES and pgbouncer and opted_in and configured is not None
