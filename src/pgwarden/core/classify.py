"""Failure classification: what an exception means, and whether re-running is safe.

:func:`classify` maps an exception plus the :class:`Phase` it was raised in to a
:class:`FailureKind`; :func:`is_retryable` decides, from the kind and a
:class:`RetryContext`, whether a single statement may be re-run. Those names and the
retry table are defined in `pgwarden.core.failures` (and the SQL-text guess in
`pgwarden.core.sqltext`), which every call loads; this module, the rules, is
imported on the first failure. Nothing here
imports psycopg: the SQLSTATE is read with ``getattr`` and classes are matched
by the names in ``type(exc).__mro__``, so fakes and real psycopg exceptions are
classified the same way.

Rules are applied in this order; the first that matches wins.

1. ``BaseException`` that is not an ``Exception`` (cancellation,
   ``KeyboardInterrupt``) and pgwarden's own errors (``PgwardenError``, which
   includes ``DeadlineExceeded``): PERMANENT, never retried.
2. psycopg and psycopg_pool class names (``PoolTimeout``, ``ConnectionTimeout``,
   ...; table below).
3. SQLSTATE, when it is not of a class that poolers use for every error they
   raise themselves: 08 (PgBouncer, pgpool-II), 58 (PgCat: 58000) and XX
   (Supavisor, pgpool-II: XX000). Exact code first, then the two-character class.
4. Message text. With no SQLSTATE or a class 08 one, every text rule (PgBouncer's
   texts, the server's ``FATAL:`` texts that libpq reports without a SQLSTATE
   when a connection attempt fails, libpq's and psycopg's own texts, and the
   poolers' texts); with a class 58 or XX one, only the poolers' own texts (the
   "pooler text rules" table), so that a real server's 58P01 "could not open
   file ...: No such file or directory" is not taken for libpq's missing socket.
   Patterns are tried in table order, so when psycopg joins the errors of
   several hosts, "permanent" beats "overload", which beats "nothing ran",
   which beats "connection broken". Last, with no SQLSTATE: libpq's connection
   failure that gives no reason at all (see the end of the pooler list).
5. SQLSTATE of class 08, 58 or XX that no text refined (class 08: broken;
   58 and XX: PERMANENT).
6. Python's own exceptions by class name (``ConnectionRefusedError``,
   ``ConnectionError``, ``TimeoutError``, ``gaierror``), for code paths that do
   not go through psycopg.
7. Anything else: PERMANENT. We never retry what we do not understand.

"broken" in the tables means the connection died under us; what that implies
depends on the phase:

=========== =========== ============================================================
phase       "broken" is why
=========== =========== ============================================================
CONNECT     NOTHING_RAN no session existed, so no statement could have run
FIRST_USE   STALE       a pooled connection died while idle; the statement never
                        reached a live backend (caveat: a backend killed *while*
                        running that first statement looks the same)
STATEMENT   LOST        the statement may or may not have run
COMMIT      LOST_COMMIT COMMIT may or may not have been applied; resolve by txid
=========== =========== ============================================================

"timed out" (PgBouncer's ``query timeout``, Python's ``TimeoutError``) is
NOTHING_RAN in CONNECT, LOST_COMMIT in COMMIT and TIMEOUT otherwise.

SQLSTATE rules:

============================== =========== =========================================
SQLSTATE                       kind        note
============================== =========== =========================================
57P03 cannot_connect_now       NOTHING_RAN starting up, shutting down, recovery
08001, 08004                   NOTHING_RAN could not establish / rejected (*)
53300 too_many_connections     OVERLOAD    also per-role and per-database limits
53200 out_of_memory            OVERLOAD    transient pressure; back off, shrink
53xxx (other)                  OVERLOAD    insufficient resources
53100 disk_full                PERMANENT   backing off for seconds will not help
53400 configuration_limit      PERMANENT   a query exceeds a static limit
57P01 admin_shutdown           broken      pg_terminate_backend, fast shutdown
57P02 crash_shutdown           broken      another backend crashed
57P05 idle_session_timeout     broken
25P03 idle_in_transaction...   broken
40003 stmt_completion_unknown  broken      outcome unknown, like a dropped link
08xxx (other)                  broken      (*) PgBouncer uses 08P01 for everything
40001, 40P01                   CONFLICT    serialization failure, deadlock
25006 read_only_sql_trans.     FAILOVER    we are talking to a standby
57014 query_canceled           TIMEOUT     statement_timeout or cancel
55P03 lock_not_available       TIMEOUT     lock_timeout or NOWAIT
25P04 transaction_timeout      TIMEOUT
57P04 database_dropped         PERMANENT
28xxx 3D000 42xxx 23xxx 22xxx  PERMANENT   auth, missing database, SQL, data
any other SQLSTATE             PERMANENT
============================== =========== =========================================

(*) Class 08 is applied only after the text rules, which can refine it.

Text rules (case-insensitive substrings; reached when there is no SQLSTATE
or a class 08 one; the poolers' own rows, in the next table, are part of this
list at the place their kind gives them):

================================================== ============ =======================
text                                               kind         source
================================================== ============ =======================
password authentication failed                     PERMANENT    server / PgBouncer
authentication failed (ident, peer, SASL, cert)    PERMANENT    server / PgBouncer
no pg_hba.conf entry                               PERMANENT    server
does not exist (role, database)                    PERMANENT    server
not currently accepting connections                PERMANENT    server (datallowconn)
no such database / no such user                    PERMANENT    PgBouncer
unsupported startup parameter                      PERMANENT    PgBouncer
no password supplied                               PERMANENT    libpq
server does not support SSL / SSL is not enabled   PERMANENT    libpq / server
certificate verify failed                          PERMANENT    libpq (OpenSSL)
too many clients already                           OVERLOAD     server, 53300
remaining connection slots are reserved            OVERLOAD     server, 53300
too many connections for                           OVERLOAD     server, 53300
no more connections allowed                        OVERLOAD     PgBouncer max_client_conn
query_wait_timeout                                 OVERLOAD     PgBouncer: waited for a
                                                                server, never sent
query_timeout (with the underscore)                OVERLOAD     PgBouncer: still queued
                                                                at query_timeout, never
                                                                sent (also at login)
the database system is starting up / shutting      NOTHING_RAN  server, 57P03
down / in recovery mode / not yet accepting
connections / not accepting connections
session is read-only / session is not read-only    NOTHING_RAN  libpq: no host fits
/ server is in hot standby mode / server is not                 target_session_attrs
in hot standby mode / could not make a writable                 (the last: libpq < 14)
connection
server login has been failing                      NOTHING_RAN  PgBouncer
pgbouncer cannot connect to server                 NOTHING_RAN  PgBouncer
client_login_timeout                               NOTHING_RAN  PgBouncer
timeout expired                                    NOTHING_RAN  libpq connect_timeout,
                                                                psycopg ConnectionTimeout
Connection refused                                 NOTHING_RAN  libpq
No such file or directory                          NOTHING_RAN  libpq, Unix socket
could not translate host name / Name or service    NOTHING_RAN  libpq, DNS
not known / Temporary failure in name resolution
Network is unreachable / No route to host          NOTHING_RAN  libpq
could not connect to server                        NOTHING_RAN  old libpq
query timeout                                      timed out    PgBouncer query_timeout,
                                                                query was running
server closed the connection unexpectedly          broken       libpq
SSL connection has been closed unexpectedly        broken       libpq
SSL SYSCALL error / SSL error                      broken       libpq
consuming input failed                             broken       psycopg
connection is closed / connection is lost          broken       psycopg
connection is bad                                  broken       psycopg
could not receive / send data (to/from) server     broken       libpq
no connection to the server                        broken       libpq
lost synchronization with server                   broken       libpq
cannot exit pipeline mode while busy               broken       psycopg (dead pipeline)
Connection reset by peer / Broken pipe /           broken       kernel, via libpq
Connection timed out
terminating connection                             broken       server FATAL texts
server conn crashed?                               broken       PgBouncer
client_idle_timeout / idle transaction timeout     broken       PgBouncer
database removed / database configuration changed  broken       PgBouncer
================================================== ============ =======================

Pooler text rules: the poolers' own texts, also applied over a SQLSTATE of
class 58 or XX (rule 4), in this order among the rules above (by kind). Each
was copied from the pooler's source or documentation: PgCat at commit 5b038813
(every error 58000, src/messages.rs:351), Supavisor at 03e5cc56 (v2.9+: "(CODE)
text", XX000 unless the error module says otherwise, lib/supavisor/error.ex:84;
"legacy" texts are those before v2.9, at 85acdde2, in lib/supavisor/
client_handler/error.ex, also XX000), pgpool-II 4.3.5 (tag V4_3_5), PgBouncer at
13a344f2, and RDS Proxy's troubleshooting page (https://docs.aws.amazon.com/
AmazonRDS/latest/UserGuide/rds-proxy.troubleshooting.html), which documents no
SQLSTATE for them. Supavisor's files are under lib/supavisor/errors/.

* ``the iam authentication failed because of too many competing requests``:
  OVERLOAD. RDS Proxy, its rate limit on IAM logins (before "authentication
  failed", which would make it PERMANENT).
* ``(enotfound)``, ``tenant or user not found``: PERMANENT. Supavisor
  tenant_or_user_not_found_error.ex:17; legacy error.ex:105.
* ``too many authentication failures``, ``too many authentication errors``:
  PERMANENT. Supavisor's ECIRCUITBREAKER after failed logins, which blocks for
  120 s (circuit_breaker.ex:40; legacy :38).
* ``no pool configured for database``: PERMANENT. PgCat src/client.rs:566, 1634.
* ``has no credentials for the role``,
  ``the password that was provided for the role``: PERMANENT. RDS Proxy.
* ``(emaxconn)``, ``max client connections reached``: OVERLOAD. Supavisor
  max_connections_error.ex:27; legacy error.ex:191.
* ``(emaxconnsession)``, ``max clients reached``: OVERLOAD. Supavisor
  max_connections_error.ex:23; legacy error.ex:223.
* ``(echeckouttimeout)``, ``unable to check out connection from the pool``:
  OVERLOAD. Supavisor checkout_timeout_error.ex:19 (its pool busy); legacy
  error.ex:262.
* ``could not get connection from the pool``: OVERLOAD. PgCat src/client.rs:1094
  (a checkout failed: its pool busy, or its servers banned after failures).
* ``checkout failure limit reached``: OVERLOAD. PgCat src/client.rs:1123.
* ``client connections exceeded``: OVERLOAD. PgBouncer 1.24+
  max_db_client_connections and max_user_client_connections, src/client.c:481,
  517.
* ``the maximum number of client connections to the proxy exceeded``,
  ``rate of connection to proxy exceeded``,
  ``timed-out waiting to acquire database connection``: OVERLOAD. RDS Proxy (the
  last: its pool of database connections is busy).
* ``server sent an error response during ssl exchange``: OVERLOAD. libpq
  fe-connect.c, which does not read an error sent in answer to SSLRequest:
  "server failure of some sort, such as failure to fork a backend process"; and
  pgpool-II refusing a client beyond num_init_children - reserved_connections
  (src/protocol/child.c:363) before it reads the startup packet.
* ``pool down for database``: NOTHING_RAN. PgCat src/client.rs:732 (at login, its
  servers unreachable).
* ``(echeckoutretries)``: NOTHING_RAN. Supavisor checkout_retries_exhausted_
  error.ex:14.
* ``(ecircuitbreaker)``, ``circuit breaker open``: NOTHING_RAN. Supavisor
  circuit_breaker.ex:25, 33 (credentials or the database unreachable; blocked
  30 s); legacy error.ex:284.
* ``(esubscriberetries)``, ``failed to subscribe to tenant after multiple
  retries``: NOTHING_RAN. Supavisor subscribe_retries_exhausted_error.ex:14;
  legacy error.ex:271.
* ``failed to create a backend``: NOTHING_RAN. pgpool-II src/protocol/
  pool_connection_pool.c:922, 934 (FATAL: the backend is down).
* ``all backend nodes are down``: NOTHING_RAN. pgpool-II src/protocol/child.c:1007
  (XX000), and the detail of 1749 "pgpool is not accepting any new connections"
  (08S01).
* ``pooler is shutting down``, ``server shutting down``: NOTHING_RAN. PgBouncer
  1.23+ SHUTDOWN WAIT_FOR_SERVERS, src/objects.c:2051, src/janitor.c:460.
* ``pool statement timeout``: timed out. PgCat src/client.rs:2082.
* ``terminating connection``: broken. Also PgCat's own at shutdown,
  src/client.rs:476, 908.
* ``idle transaction timeout``: broken. Also PgCat's, src/client.rs:1197.
* ``unable to read data from db node``: broken. pgpool-II src/utils/
  pool_stream.c:275 (XX000, "EOF encountered with backend": the backend died).
* ``error receiving data from server``: broken. PgCat src/client.rs:2067.
* ``(edbhandlerexited)``, ``dbhandler exited``, ``connection to database
  closed``: broken. Supavisor db_handler_exited_error.ex:16, 20; legacy
  error.ex:241, 242.
* ``transaction timeout``: timed out, after "idle transaction timeout" (which
  contains it). PgBouncer 1.25+ transaction_timeout, src/janitor.c:674.
* no reason at all (libpq's "connection to server at ... failed:" and nothing
  after it, without a SQLSTATE; checked after every text rule): NOTHING_RAN.
  pgpool-II, when the server refuses pgpool-II's own login before authentication
  (53300 "too many clients already", 57P03 "the database system is starting up"),
  forwards that error in the old protocol's format (src/auth/pool_auth.c:366,
  src/protocol/pool_proto2.c:409), which libpq reads as an empty message.

Not rules, because they need none: PgBouncer 1.20+ forwards the server's own
SQLSTATE when a login fails (src/server.c:100, "Provide SQLSTATE", #814), so a
client waiting for a server gets 53300, 28P01 or 3D000 and the SQLSTATE table
applies; PgBouncer 1.24+ says "server login has been failing, cached error:
<the server's text> (server_login_retry)" (src/objects.c:881), whose cached
text is matched first by the rows above it (a cached "too many clients already"
is OVERLOAD, a cached "password authentication failed" PERMANENT, the rest
"server login has been failing"). Supavisor's EPOOLTERMINATING never reaches
the wire as such: the client gets the error that terminated the pool
(pool_terminating_error.ex:22), usually 57P01 "terminating connection due to
administrator command" (lib/supavisor/protocol/server.ex:183).

Class-name rules (rules 2 and 6):

====================== ============ ===============================================
class                  kind         why
====================== ============ ===============================================
NotCommitted           NOTHING_RAN  certainly not committed: safe to re-run
PgwardenError          PERMANENT    our own verdicts (deadline, closed, breaker)
PoolTimeout            NOTHING_RAN  no connection was handed out, nothing was sent
TooManyRequests        NOTHING_RAN  the local queue is full; shrinking the pool
                                    (OVERLOAD) would make it worse
ConnectionTimeout      NOTHING_RAN  psycopg's connect_timeout
PoolClosed             PERMANENT    the pool is shutting down
CancellationTimeout    timed out    a cancel request itself timed out
_WaitTimeout           timed out    psycopg-internal wait timeout
WaitTimeout            timed out    pgwarden's bound on a connect made for a call
ConnectionRefusedError NOTHING_RAN
gaierror               NOTHING_RAN  DNS
ConnectionError        broken       reset, aborted, broken pipe
TimeoutError           timed out
====================== ============ ===============================================
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Final, TypeAlias

# The vocabulary and the retry table live apart, so that a call that does not fail
# never loads the rules below; they are re-exported here, where they were first.
from pgwarden.core.failures import (
    FailureKind,
    Phase,
    RetryContext,
    is_retryable,
    is_transaction_retryable,
    sqlstate_of,
)
from pgwarden.core.sqltext import is_write_sql, query_is_write

__all__ = [
    "FailureKind",
    "Phase",
    "RetryContext",
    "classify",
    "classify_failure",
    "classify_with_reason",
    "is_retryable",
    "is_transaction_retryable",
    "is_write_sql",
    "query_is_write",
    "server_refused_slots",
    "sqlstate_of",
]


class _Depends:
    """A verdict whose kind depends on the phase (the "broken" rows).

    A plain class with two instances, compared by identity: private, so it need not be
    an ``Enum``, which costs several times more to define at import.
    """

    __slots__ = ("name", "value")
    name: Final[str]
    value: Final[str]

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"<_Depends.{self.name}: {self.value!r}>"


_Verdict: TypeAlias = FailureKind | _Depends

_BROKEN: Final = _Depends("BROKEN", "connection broken")
_TIMED_OUT: Final = _Depends("TIMED_OUT", "timed out")
_NOTHING_RAN: Final = FailureKind.NOTHING_RAN
_OVERLOAD: Final = FailureKind.OVERLOAD
_PERMANENT: Final = FailureKind.PERMANENT

_BY_PHASE: Final[Mapping[_Depends, Mapping[Phase, FailureKind]]] = {
    _BROKEN: {
        Phase.CONNECT: FailureKind.NOTHING_RAN,
        Phase.FIRST_USE: FailureKind.STALE,
        Phase.STATEMENT: FailureKind.LOST,
        Phase.COMMIT: FailureKind.LOST_COMMIT,
    },
    _TIMED_OUT: {
        Phase.CONNECT: FailureKind.NOTHING_RAN,
        Phase.FIRST_USE: FailureKind.TIMEOUT,
        Phase.STATEMENT: FailureKind.TIMEOUT,
        Phase.COMMIT: FailureKind.LOST_COMMIT,
    },
}

_BY_SQLSTATE: Final[Mapping[str, _Verdict]] = {
    "57P03": _NOTHING_RAN,
    "08001": _NOTHING_RAN,
    "08004": _NOTHING_RAN,
    "53300": _OVERLOAD,
    "53200": _OVERLOAD,
    "53100": _PERMANENT,
    "53400": _PERMANENT,
    "57P01": _BROKEN,
    "57P02": _BROKEN,
    "57P05": _BROKEN,
    "25P03": _BROKEN,
    "40003": _BROKEN,
    "40001": FailureKind.CONFLICT,
    "40P01": FailureKind.CONFLICT,
    "25006": FailureKind.FAILOVER,
    "57014": FailureKind.TIMEOUT,
    "55P03": FailureKind.TIMEOUT,
    "25P04": FailureKind.TIMEOUT,
    "57P04": _PERMANENT,
}

# Class 08 is resolved after the text rules, so it is not listed here.
_BY_SQLSTATE_CLASS: Final[Mapping[str, _Verdict]] = {
    "53": _OVERLOAD,
}


class _TextRule(tuple[str, _Verdict]):
    """A lower-case substring of the message, and what it means: a ``(pattern, verdict)``
    pair. A tuple subclass rather than a ``NamedTuple``, whose class costs ~0.3 ms to
    build at import; only the two fields are used."""

    __slots__ = ()

    def __new__(cls, pattern: str, verdict: _Verdict) -> _TextRule:
        return tuple.__new__(cls, (pattern, verdict))

    @property
    def pattern(self) -> str:
        return self[0]

    @property
    def verdict(self) -> _Verdict:
        return self[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pattern={self[0]!r}, verdict={self[1]!r})"


class _PoolerText(_TextRule):
    """A pooler's own text: also trusted over a SQLSTATE of class 58 or XX (rule 4)."""

    __slots__ = ()


_pooler = _PoolerText


# Order matters: see rule 4 in the module docstring. Lower-case substrings. The
# poolers' rows are cited in the docstring's "pooler text rules" table.
_BY_TEXT: Final[tuple[_TextRule, ...]] = (
    # RDS Proxy's rate limit on IAM logins, before "authentication failed" below.
    _pooler("the iam authentication failed because of too many competing requests", _OVERLOAD),
    _TextRule("password authentication failed", _PERMANENT),
    _TextRule("authentication failed", _PERMANENT),
    _TextRule("no pg_hba.conf entry", _PERMANENT),
    _TextRule("does not exist", _PERMANENT),
    _TextRule("not currently accepting connections", _PERMANENT),
    _TextRule("no such database", _PERMANENT),
    _TextRule("no such user", _PERMANENT),
    _TextRule("unsupported startup parameter", _PERMANENT),
    _TextRule("no password supplied", _PERMANENT),
    _TextRule("server does not support ssl", _PERMANENT),
    _TextRule("certificate verify failed", _PERMANENT),
    _TextRule("ssl is not enabled on the server", _PERMANENT),
    _pooler("(enotfound)", _PERMANENT),
    _pooler("tenant or user not found", _PERMANENT),
    # Supavisor's breaker after failed logins blocks for 120 s: not worth waiting for.
    _pooler("too many authentication failures", _PERMANENT),
    _pooler("too many authentication errors", _PERMANENT),
    _pooler("no pool configured for database", _PERMANENT),
    _pooler("has no credentials for the role", _PERMANENT),
    _pooler("the password that was provided for the role", _PERMANENT),
    _TextRule("too many clients already", _OVERLOAD),
    _TextRule("remaining connection slots are reserved", _OVERLOAD),
    _TextRule("too many connections for", _OVERLOAD),
    _TextRule("no more connections allowed", _OVERLOAD),
    _TextRule("query_wait_timeout", _OVERLOAD),
    # PgBouncer's janitor says "query_timeout" (underscore) only to clients still in
    # the wait queue; one that is running gets "query timeout" (space, below).
    _TextRule("query_timeout", _OVERLOAD),
    _pooler("(emaxconn)", _OVERLOAD),
    _pooler("(emaxconnsession)", _OVERLOAD),
    _pooler("(echeckouttimeout)", _OVERLOAD),
    _pooler("max client connections reached", _OVERLOAD),
    _pooler("max clients reached", _OVERLOAD),
    _pooler("unable to check out connection from the pool", _OVERLOAD),
    _pooler("could not get connection from the pool", _OVERLOAD),
    _pooler("checkout failure limit reached", _OVERLOAD),
    _pooler("client connections exceeded", _OVERLOAD),
    _pooler("the maximum number of client connections to the proxy exceeded", _OVERLOAD),
    _pooler("rate of connection to proxy exceeded", _OVERLOAD),
    _pooler("timed-out waiting to acquire database connection", _OVERLOAD),
    # libpq does not read an error sent in answer to SSLRequest; known senders are
    # a server out of processes and pgpool-II out of client slots.
    _pooler("server sent an error response during ssl exchange", _OVERLOAD),
    _TextRule("the database system is starting up", _NOTHING_RAN),
    _TextRule("the database system is shutting down", _NOTHING_RAN),
    _TextRule("the database system is in recovery mode", _NOTHING_RAN),
    _TextRule("the database system is not yet accepting connections", _NOTHING_RAN),
    _TextRule("the database system is not accepting connections", _NOTHING_RAN),
    # libpq rejected every host for target_session_attrs (e.g. read-write during a
    # failover, before a standby is promoted): retry, as for a host that is down.
    _TextRule("session is read-only", _NOTHING_RAN),
    _TextRule("session is not read-only", _NOTHING_RAN),
    _TextRule("server is in hot standby mode", _NOTHING_RAN),
    _TextRule("server is not in hot standby mode", _NOTHING_RAN),
    _TextRule("could not make a writable connection", _NOTHING_RAN),
    _TextRule("server login has been failing", _NOTHING_RAN),
    _TextRule("pgbouncer cannot connect to server", _NOTHING_RAN),
    _TextRule("client_login_timeout", _NOTHING_RAN),
    _pooler("pool down for database", _NOTHING_RAN),
    _pooler("(echeckoutretries)", _NOTHING_RAN),
    _pooler("(ecircuitbreaker)", _NOTHING_RAN),
    _pooler("circuit breaker open", _NOTHING_RAN),
    _pooler("(esubscriberetries)", _NOTHING_RAN),
    _pooler("failed to subscribe to tenant after multiple retries", _NOTHING_RAN),
    _pooler("failed to create a backend", _NOTHING_RAN),
    # Also the detail of pgpool-II's "pgpool is not accepting any new connections".
    _pooler("all backend nodes are down", _NOTHING_RAN),
    _pooler("pooler is shutting down", _NOTHING_RAN),
    _pooler("server shutting down", _NOTHING_RAN),
    _TextRule("timeout expired", _NOTHING_RAN),
    _TextRule("connection refused", _NOTHING_RAN),
    _TextRule("no such file or directory", _NOTHING_RAN),
    _TextRule("could not translate host name", _NOTHING_RAN),
    _TextRule("name or service not known", _NOTHING_RAN),
    _TextRule("temporary failure in name resolution", _NOTHING_RAN),
    _TextRule("network is unreachable", _NOTHING_RAN),
    _TextRule("no route to host", _NOTHING_RAN),
    _TextRule("could not connect to server", _NOTHING_RAN),
    _TextRule("query timeout", _TIMED_OUT),
    _pooler("pool statement timeout", _TIMED_OUT),
    _TextRule("server closed the connection unexpectedly", _BROKEN),
    _TextRule("ssl connection has been closed unexpectedly", _BROKEN),
    _TextRule("ssl syscall error", _BROKEN),
    _TextRule("ssl error", _BROKEN),
    _TextRule("consuming input failed", _BROKEN),
    _TextRule("connection is closed", _BROKEN),
    _TextRule("connection is lost", _BROKEN),
    _TextRule("connection is bad", _BROKEN),
    _TextRule("could not receive data from server", _BROKEN),
    _TextRule("could not send data to server", _BROKEN),
    _TextRule("no connection to the server", _BROKEN),
    _TextRule("lost synchronization with server", _BROKEN),
    # psycopg, leaving pipeline mode on a connection that died mid-pipeline.
    _TextRule("cannot exit pipeline mode while busy", _BROKEN),
    _TextRule("connection reset by peer", _BROKEN),
    _TextRule("broken pipe", _BROKEN),
    _TextRule("connection timed out", _BROKEN),
    # The server's FATAL texts, and PgCat's own (with 58000) when it shuts down.
    _pooler("terminating connection", _BROKEN),
    _TextRule("server conn crashed?", _BROKEN),
    _TextRule("client_idle_timeout", _BROKEN),
    _pooler("idle transaction timeout", _BROKEN),
    _TextRule("database removed", _BROKEN),
    _TextRule("database configuration changed", _BROKEN),
    _pooler("unable to read data from db node", _BROKEN),
    _pooler("error receiving data from server", _BROKEN),
    _pooler("(edbhandlerexited)", _BROKEN),
    _pooler("dbhandler exited", _BROKEN),
    _pooler("connection to database closed", _BROKEN),
    # After "idle transaction timeout", which contains it.
    _pooler("transaction timeout", _TIMED_OUT),
)

# Rule 4 over a SQLSTATE of class 58 or XX: only the poolers' own texts.
_BY_POOLER_TEXT: Final = tuple(rule for rule in _BY_TEXT if isinstance(rule, _PoolerText))


# libpq's "connection to server at ... failed:" with nothing after it: the other end
# answered the login with an error libpq could not read. pgpool-II does that with a
# server's refusal of its own login (see the docstring).
# Compiled on first use: only a failure without a SQLSTATE that no text rule matched needs it.
@functools.cache
def _empty_reason_re() -> re.Pattern[str]:
    return re.compile(r"\bfailed:\s*\Z")


# The classes that poolers send for errors of their own (rule 3).
_POOLER_CLASSES: Final = frozenset({"08", "58", "XX"})

# Rule 2: names of psycopg / psycopg_pool / pgwarden classes, checked first.
_BY_CLASS_NAME: Final[Mapping[str, _Verdict]] = {
    # Checked before its base PgwardenError: the work certainly did not commit
    # (COMMIT never sent, or txid_status() said aborted), so re-running is safe.
    "NotCommitted": _NOTHING_RAN,
    "PgwardenError": _PERMANENT,
    "PoolTimeout": _NOTHING_RAN,
    "TooManyRequests": _NOTHING_RAN,
    "ConnectionTimeout": _NOTHING_RAN,
    "PoolClosed": _PERMANENT,
    "CancellationTimeout": _TIMED_OUT,
    # psycopg-internal; checked by class so its text ("wait timeout expired")
    # cannot pass for libpq's connect "timeout expired".
    "_WaitTimeout": _TIMED_OUT,
    # pgwarden's own bound on a connect or a wait made on behalf of a call.
    "WaitTimeout": _TIMED_OUT,
}

# Rule 6: Python's own exceptions, checked after SQLSTATE and text. Checked in
# MRO order, so ConnectionRefusedError wins over its base ConnectionError.
_BY_BUILTIN_NAME: Final[Mapping[str, _Verdict]] = {
    "ConnectionRefusedError": _NOTHING_RAN,
    "gaierror": _NOTHING_RAN,
    "ConnectionError": _BROKEN,
    "TimeoutError": _TIMED_OUT,
}


def classify(exc: BaseException, phase: Phase) -> FailureKind:
    """Return the :class:`FailureKind` of *exc*, raised in *phase*. Never raises."""
    return classify_with_reason(exc, phase)[0]


def classify_with_reason(exc: BaseException, phase: Phase) -> tuple[FailureKind, str]:
    """Like :func:`classify`, plus a short reason naming the rule that matched
    (``"sqlstate 53300"``, ``"text 'too many clients already'"``, ...), for logs.
    The reason never contains the exception's message, so it carries no secrets."""
    verdict, reason = _verdict(exc)
    if isinstance(verdict, _Depends):
        return _BY_PHASE[verdict][phase], f"{reason} ({verdict.value} in {phase.value})"
    return verdict, reason


# A backend the server itself terminated (admin or crash shutdown) ran nothing
# that committed outside a transaction block: PostgreSQL commits an implicit
# transaction only at Sync, after which ReadyForQuery would have reached us.
_SERVER_ABORTED: Final = frozenset({"57P01", "57P02"})


def classify_failure(
    exc: BaseException,
    phase: Phase,
    *,
    connection_lost: bool = False,
    in_transaction: bool = False,
) -> FailureKind:
    """:func:`classify`, refined by what the shell saw besides the exception.

    * *connection_lost*: the connection was broken or closed after the error.
      An error without a SQLSTATE that no rule recognised, or that was only a
      timeout, is then "broken" for *phase* (psycopg's texts on a dead
      connection vary with the code path). Cancellation and exits are not.
    * Outside a transaction block, a LOST statement whose backend the server
      terminated (57P01, 57P02) did not commit: STALE, safe to re-run.

    This is the only classification the shells use.
    """
    kind = classify(exc, phase)
    if (
        connection_lost
        and isinstance(exc, Exception)  # cancellation and exits stay PERMANENT
        and kind in (FailureKind.PERMANENT, FailureKind.TIMEOUT)
        and sqlstate_of(exc) is None
        and not _is_own_error(exc)
    ):
        kind = _BY_PHASE[_BROKEN][phase]
    if kind is FailureKind.LOST and not in_transaction and sqlstate_of(exc) in _SERVER_ABORTED:
        kind = FailureKind.STALE
    return kind


def _by_sqlstate(sqlstate: str) -> _Verdict:
    by_code = _BY_SQLSTATE.get(sqlstate)
    if by_code is None:
        by_code = _BY_SQLSTATE_CLASS.get(sqlstate[:2], _PERMANENT)
    return by_code


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a foreign __str__ that fails: classify without text
        return ""


# PostgreSQL's own refusals for lack of connection slots (53300), as libpq reports
# them at connect time without a SQLSTATE. Lower-case.
_SERVER_SLOT_TEXTS: Final = (
    "too many clients already",
    "remaining connection slots are reserved",
    "too many connections for",
)
# pgpool-II's refusal of a client beyond num_init_children - reserved_connections
# (src/protocol/child.c:363, 53300 too): its own slots, not the server's. It
# differs from PostgreSQL's "sorry, too many clients already" only in case.
_PGPOOL_SLOT_TEXT: Final = "Sorry, too many clients already"


def server_refused_slots(exc: BaseException) -> bool:
    """Is *exc* PostgreSQL itself refusing a connection for lack of slots (53300:
    ``max_connections``, reserved slots, a role's or database's connection limit),
    as opposed to a pooler's limit on its own clients (PgBouncer's
    ``max_client_conn``, Supavisor's EMAXCONN, pgpool-II's ``num_init_children``)?

    Behind a pooler such a refusal was forwarded: the pooler's connections to the
    server are what ran out, not this process's (see
    :func:`pgwarden.core.sizing.overload_shrinks`). Never raises.
    """
    if not isinstance(exc, Exception):
        return False
    text = _text_of(exc)
    if _PGPOOL_SLOT_TEXT in text:
        return False
    sqlstate = sqlstate_of(exc)
    if sqlstate == "53300":
        return True
    if sqlstate is not None and sqlstate[:2] not in _POOLER_CLASSES:
        return False
    lowered = text.lower()
    return any(pattern in lowered for pattern in _SERVER_SLOT_TEXTS)


def _is_own_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "PgwardenError" for cls in type(exc).__mro__)


def _verdict(exc: BaseException) -> tuple[_Verdict, str]:
    if not isinstance(exc, Exception):
        return _PERMANENT, f"class {type(exc).__name__} (not an Exception)"
    names = [cls.__name__ for cls in type(exc).__mro__]
    for name in names:
        by_class = _BY_CLASS_NAME.get(name)
        if by_class is not None:
            return by_class, f"class {name}"

    sqlstate = sqlstate_of(exc)
    sqlstate_class = None if sqlstate is None else sqlstate[:2]
    if sqlstate is not None and sqlstate_class not in _POOLER_CLASSES:
        return _by_sqlstate(sqlstate), f"sqlstate {sqlstate}"

    text = _text_of(exc).lower()
    rules = _BY_TEXT if sqlstate_class in (None, "08") else _BY_POOLER_TEXT
    for pattern, verdict in rules:
        if pattern in text:
            return verdict, f"text {pattern!r}"
    if sqlstate is None and _empty_reason_re().search(text):
        return _NOTHING_RAN, "text <no reason>"

    if sqlstate is not None:
        if sqlstate_class == "08":
            return _BY_SQLSTATE.get(sqlstate, _BROKEN), f"sqlstate {sqlstate}"
        return _by_sqlstate(sqlstate), f"sqlstate {sqlstate}"

    for name in names:
        by_builtin = _BY_BUILTIN_NAME.get(name)
        if by_builtin is not None:
            return by_builtin, f"class {name}"

    return _PERMANENT, f"unrecognised {type(exc).__name__}"
