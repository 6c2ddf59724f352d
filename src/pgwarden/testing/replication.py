"""A primary with a synchronous streaming standby, promotion, and a demoted primary that
comes back as a standby of the new one: real failover for tests.

Theory of operation: :class:`StandbyPair` starts node ``a`` as a :class:`PostgresServer`
with ``wal_level=replica`` (and ``wal_log_hints``, ``full_page_writes``, which
``pg_rewind`` needs), then builds node ``b`` with ``pg_basebackup`` from it and starts it
as a hot standby (``standby.signal``, ``primary_conninfo`` over the primary's private
Unix socket, where replication connections are trusted). Once ``b`` streams, the primary
names it in ``synchronous_standby_names``: from then on a COMMIT returns only after the
standby has flushed it, so a write the client saw succeed is on both nodes.

:meth:`StandbyPair.failover` demotes the primary and promotes the standby:

* ``"fence"`` (the default): the primary turns read-only in place
  (``default_transaction_read_only=on`` and a reload): its sessions stay open, reads
  work, writes fail with 25006, as on a managed service whose old primary is still
  reachable. Transactions that began before the fence are given ``grace`` seconds to end
  and are then terminated, and the promotion waits until the standby has received
  everything the primary flushed, so nothing the primary committed is missing from the
  new one;
* ``"stop"``: a fast shutdown (the standby receives the shutdown checkpoint);
* ``"crash"``: an immediate shutdown (SIGQUIT), like a dead host.

Then ``pg_promote()``; :attr:`Failover.promoted_at` is the moment (polled every 2 ms) the
new primary was first seen out of recovery, which is the moment it accepts writes.

:meth:`StandbyPair.rejoin` brings the demoted primary back read-only: it is stopped,
rewound with ``pg_rewind`` against the new primary (its WAL went past the fork: at least
its shutdown checkpoint; with ``"crash"`` maybe commits nobody acknowledged), restarted as
a standby of the new primary and made synchronous again. ``pg_rewind`` copies only the
changed blocks; ``method="basebackup"`` rebuilds the data directory from scratch
instead. Both are timed in :attr:`StandbyPair.timings`.

The client URL lists both nodes in a fixed order with ``target_session_attrs=read-write``,
so libpq tries them in turn and keeps the one that accepts writes, wherever the primary
is at the moment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import psycopg
from psycopg.conninfo import make_conninfo

from ._binaries import user_kwargs
from ._errors import ServerStartError
from .postgres import PostgresServer, _quote_conf

__all__ = [
    "REPLICATION_SETTINGS",
    "DemoteMode",
    "Failover",
    "RejoinMethod",
    "StandbyPair",
]

DemoteMode = Literal["fence", "stop", "crash"]
RejoinMethod = Literal["rewind", "basebackup"]

#: Settings both nodes start with (over :data:`~pgwarden.testing.DEFAULT_SETTINGS`); each
#: can be overridden by the pair's ``settings``, except ``synchronous_standby_names``,
#: which the pair manages.
REPLICATION_SETTINGS: Mapping[str, object] = {
    "wal_level": "replica",
    "max_wal_senders": 10,
    "wal_keep_size": "64MB",
    "hot_standby": True,
    # pg_rewind needs both (or data checksums, which the template does not have).
    "full_page_writes": True,
    "wal_log_hints": True,
    # A standby whose primary went away tries again after 0.1 s, not 5 s.
    "wal_retrieve_retry_interval": "100ms",
    "synchronous_standby_names": "",
}

#: Appended to each node's pg_hba.conf: pg_basebackup, pg_rewind and the standby's WAL
#: receiver connect over the private Unix socket (mode 0700), like the admin helpers.
_REPLICATION_HBA = "local   replication   all                  trust\n"

_FENCE_SETTING = "default_transaction_read_only"
_POLL = 0.002


@dataclass(frozen=True)
class Failover:
    """What :meth:`StandbyPair.failover` did; times are ``time.monotonic()`` seconds."""

    old_primary: PostgresServer
    new_primary: PostgresServer
    demote: DemoteMode
    #: When the demotion began.
    started_at: float
    #: When ``pg_promote()`` was sent.
    promote_requested_at: float
    #: When the new primary was first seen out of recovery (accepting writes).
    promoted_at: float
    #: Sessions of the old primary terminated because their transaction outlived the
    #: fence's grace ("fence" only).
    terminated: int = 0

    @property
    def promotion_seconds(self) -> float:
        """From ``pg_promote()`` to the new primary accepting writes."""
        return self.promoted_at - self.promote_requested_at


class _Node(PostgresServer):
    """One server of a pair: replication over its socket is trusted, and when it starts
    as a standby its data directory is a ``pg_basebackup`` of its primary's."""

    def __init__(
        self, name: str, settings: Mapping[str, object], bindir: str | os.PathLike[str] | None
    ) -> None:
        super().__init__(settings, bindir=bindir)
        self.name = name
        self.clone_from: _Node | None = None
        self.fenced = False

    # -- building the data directory ---------------------------------------------------

    def _prepare(self) -> None:
        source = self.clone_from
        if source is None:
            super()._prepare()
            with open(self.data_dir / "pg_hba.conf", "a", encoding="utf-8") as hba:
                hba.write(_REPLICATION_HBA)
            return
        root = self._make_root("pgwarden-pg-")
        (root / "sock").mkdir(mode=0o700)
        if self._run_as is not None:
            self._run_as.chown(root / "sock")
        started = time.perf_counter()
        self.base_backup(source)
        self.timings = {"initdb": 0.0, "copy": time.perf_counter() - started}
        # The same cluster: the same role and password (set on the primary).
        self._password = source.password
        self._password_set = True
        self.configure(upstream=source)

    def base_backup(self, source: _Node) -> None:
        """Replace the data directory with a ``pg_basebackup`` of ``source``."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        argv = [
            str(self.bindir / "pg_basebackup"),
            *("-D", str(self.data_dir)),
            *("-h", str(source.socket_dir), "-p", str(source.port), "-U", source.user),
            *("-X", "stream", "-c", "fast", "--no-sync", "-w"),
        ]
        if self.major >= 13:
            argv.append("--no-manifest")
        self._run_tool(argv, "pg_basebackup")

    def rewind(self, source: _Node) -> None:
        """``pg_rewind`` the (stopped) data directory onto ``source``'s timeline.

        A directory that was not shut down cleanly is crash-recovered by pg_rewind itself
        first (PostgreSQL 13 and later)."""
        conninfo = make_conninfo(
            "", host=str(source.socket_dir), port=source.port, user=source.user, dbname="postgres"
        )
        argv = [
            str(self.bindir / "pg_rewind"),
            *("-D", str(self.data_dir)),
            f"--source-server={conninfo}",
            "--no-sync",
        ]
        self._run_tool(argv, "pg_rewind")

    def configure(self, *, upstream: _Node | None) -> None:
        """Rewrite ``postgresql.auto.conf`` from the settings, as a standby of ``upstream``
        (with ``standby.signal``) or, for None, as a primary. The fence is lifted."""
        if self.fenced:
            self._settings.pop(_FENCE_SETTING, None)
            self.fenced = False
        self._settings["synchronous_standby_names"] = ""  # set once a standby streams
        lines = [
            "# Do not edit this file manually!",
            "# It will be overwritten by the ALTER SYSTEM command.",
            *(f"{name} = {_quote_conf(value)}" for name, value in self._settings.items()),
        ]
        signal_file = self.data_dir / "standby.signal"
        if upstream is not None:
            conninfo = make_conninfo(
                "",
                host=str(upstream.socket_dir),
                port=upstream.port,
                user=upstream.user,
                application_name=self.name,
            )
            lines.append(f"primary_conninfo = {_quote_conf(conninfo)}")
            signal_file.write_text("")
            self._own(signal_file)
        else:
            signal_file.unlink(missing_ok=True)
        auto = self.data_dir / "postgresql.auto.conf"
        auto.write_text("\n".join(lines) + "\n")
        self._own(auto)
        auto.chmod(0o600)

    # -- helpers -----------------------------------------------------------------------

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection over the private socket (autocommit)."""
        return self._admin_connect()

    def _own(self, path: Path) -> None:
        if self._run_as is not None:
            self._run_as.chown(path)

    def _run_tool(self, argv: list[str], what: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            cwd=self.base_dir,
            env=env,
            timeout=120,
            **user_kwargs(self._run_as),
        )
        if proc.returncode != 0:
            raise ServerStartError(
                f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                f"{proc.stderr[-2000:]}"
            )


class StandbyPair:
    """Two throwaway PostgreSQL servers, a primary and a synchronous hot standby.

    Nothing runs until :meth:`start` (or ``with``); :meth:`close` stops both and removes
    their files. ``settings`` go to both nodes over :data:`REPLICATION_SETTINGS`.
    ``synchronous=False`` leaves replication asynchronous (a COMMIT does not wait for the
    standby, so a crash of the primary may lose acknowledged writes). While the pair is
    synchronous, a primary whose standby is stopped blocks every COMMIT: stop the standby
    only through :meth:`failover`.
    """

    host = "127.0.0.1"
    user = "postgres"
    dbname = "postgres"

    def __init__(
        self,
        settings: Mapping[str, object] | None = None,
        *,
        synchronous: bool = True,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        merged = {**REPLICATION_SETTINGS, **(settings or {})}
        merged["synchronous_standby_names"] = ""
        self.synchronous = synchronous
        self._nodes = (_Node("node_a", merged, bindir), _Node("node_b", merged, bindir))
        self._primary: _Node = self._nodes[0]
        self._standby: _Node | None = None
        self._demoted: _Node | None = None
        self._lock = threading.RLock()
        self._closed = False
        #: Every failover so far, oldest first.
        self.failovers: list[Failover] = []
        #: Seconds spent in the last of each step: ``primary`` (start), ``base_backup``,
        #: ``standby`` (start until streaming), ``synchronous``, ``demote``, ``promote``,
        #: ``rewind`` or ``basebackup`` (of a rejoin), ``rejoin`` (all of it).
        self.timings: dict[str, float] = {}

    # -- properties --------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[PostgresServer, PostgresServer]:
        """Both servers, in the order the URL lists them (fixed for the pair's life)."""
        return self._nodes

    @property
    def primary(self) -> PostgresServer:
        """The server that accepts writes now."""
        return self._primary

    @property
    def standby(self) -> PostgresServer | None:
        """The server streaming from the primary, or None (after a failover, until
        :meth:`rejoin`)."""
        return self._standby

    @property
    def demoted(self) -> PostgresServer | None:
        """The old primary after a failover, until :meth:`rejoin`; else None."""
        return self._demoted

    @property
    def password(self) -> str:
        """The ``postgres`` superuser's password, the same on both nodes."""
        return self._nodes[0].password

    @property
    def url(self) -> str:
        """Both nodes, ``target_session_attrs=read-write``: wherever the primary is."""
        return self.url_for()

    def url_for(
        self,
        dbname: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        target_session_attrs: str | None = "read-write",
    ) -> str:
        """A multi-host URL: ``postgresql://user:pw@127.0.0.1:PA,127.0.0.1:PB/db?...``.

        The password defaults to the superuser's for ``postgres``, as
        :meth:`PostgresServer.url_for`; ``target_session_attrs=None`` leaves it out.
        """
        user = user or self.user
        if password is None and user == self.user:
            password = self.password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        hosts = ",".join(f"{n.host}:{n.port}" for n in self._nodes)
        url = f"postgresql://{auth}@{hosts}/{quote(dbname or self.dbname, safe='')}"
        if target_session_attrs is not None:
            url += f"?target_session_attrs={quote(target_session_attrs, safe='')}"
        return url

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60) -> StandbyPair:
        """Start the primary, build and start the standby, wait until it streams (and, if
        synchronous, until the primary waits for it). No-op if started. Returns ``self``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise RuntimeError("this StandbyPair is closed")
            if self._standby is not None or self._demoted is not None:
                return self
            primary, standby = self._nodes
            t0 = time.perf_counter()
            primary.start(_left(deadline))
            t1 = time.perf_counter()
            standby.clone_from = primary
            standby.start(_left(deadline))
            self.timings["primary"] = t1 - t0
            self.timings["base_backup"] = standby.timings.get("copy", 0.0)
            self._wait_replication(primary, standby, deadline, synchronous=False)
            self.timings["standby"] = time.perf_counter() - t1
            self._standby = standby
            if self.synchronous:
                self._make_synchronous(primary, standby, deadline)
            return self

    def close(self) -> None:
        """Stop both servers and remove their files. Idempotent."""
        with self._lock:
            self._closed = True
            for node in reversed(self._nodes):
                node.close()

    def __enter__(self) -> StandbyPair:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        standby = self._standby.port if self._standby is not None else None
        return f"<StandbyPair primary={self._primary.port} standby={standby}>"

    # -- failover ----------------------------------------------------------------------

    def failover(
        self, demote: DemoteMode = "fence", *, grace: float = 1.0, timeout: float = 30
    ) -> Failover:
        """Demote the primary (``"fence"``, ``"stop"`` or ``"crash"``, see the module) and
        promote the standby. Returns once the new primary accepts writes.

        ``grace``: with ``"fence"``, how long transactions that began before the fence may
        run on before they are terminated. Raises ``RuntimeError`` when there is no
        standby (after a failover, :meth:`rejoin` first).
        """
        if demote not in ("fence", "stop", "crash"):
            raise ValueError(f"demote must be 'fence', 'stop' or 'crash', not {demote!r}")
        deadline = time.monotonic() + timeout
        with self._lock:
            old, new = self._primary, self._standby
            if new is None:
                raise RuntimeError("no standby to promote: rejoin() the demoted primary first")
            started = time.monotonic()
            terminated = 0
            if demote == "fence":
                terminated = self._fence(old, new, grace, deadline)
            else:
                old.stop("fast" if demote == "stop" else "immediate", timeout=_left(deadline))
            self.timings["demote"] = time.monotonic() - started
            requested, promoted = self._promote(new, deadline)
            self.timings["promote"] = promoted - requested
            self._primary, self._standby, self._demoted = new, None, old
            record = Failover(
                old_primary=old,
                new_primary=new,
                demote=demote,
                started_at=started,
                promote_requested_at=requested,
                promoted_at=promoted,
                terminated=terminated,
            )
            self.failovers.append(record)
            return record

    def rejoin(self, method: RejoinMethod = "rewind", *, timeout: float = 60) -> float:
        """Bring the demoted primary back as a (synchronous) standby of the new primary.

        ``"rewind"``: ``pg_rewind`` onto the new primary's timeline; ``"basebackup"``: a
        fresh ``pg_basebackup``. Returns the seconds it took (also in ``timings``).
        """
        if method not in ("rewind", "basebackup"):
            raise ValueError(f"method must be 'rewind' or 'basebackup', not {method!r}")
        deadline = time.monotonic() + timeout
        with self._lock:
            old, new = self._demoted, self._primary
            if old is None:
                raise RuntimeError("nothing to rejoin: no failover since the last rejoin")
            started = time.perf_counter()
            old.stop("fast", timeout=_left(deadline))
            t_copy = time.perf_counter()
            if method == "rewind":
                # pg_rewind reads the source's timeline from its control file, which a
                # promoted server updates only at its next checkpoint (see pg_rewind's
                # documentation): without this it may find "no rewind required".
                new.execute("CHECKPOINT")
                old.rewind(new)
            else:
                old.base_backup(new)
            self.timings[method] = time.perf_counter() - t_copy
            old.configure(upstream=new)
            old.start(_left(deadline))
            self._wait_replication(new, old, deadline, synchronous=False)
            self._standby, self._demoted = old, None
            if self.synchronous:
                self._make_synchronous(new, old, deadline)
            self.timings["rejoin"] = elapsed = time.perf_counter() - started
            return elapsed

    def wait_replayed(self, timeout: float = 30) -> None:
        """Wait until the standby has replayed everything the primary has written, so a
        query on the standby sees every committed row."""
        deadline = time.monotonic() + timeout
        with self._lock:
            standby = self._standby
            if standby is None:
                raise RuntimeError("there is no standby (rejoin() after a failover)")
            row = self._primary.execute("SELECT pg_current_wal_lsn()::text")
            target = str(row[0][0])

            def replayed() -> bool | None:
                rows = standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target])
                return True if rows and rows[0][0] else None

            if _poll(deadline, replayed) is None:
                raise ServerStartError(f"the standby did not replay up to {target} in time")

    # -- internals ---------------------------------------------------------------------

    def _fence(self, old: _Node, new: _Node, grace: float, deadline: float) -> int:
        """Make ``old`` read-only in place; end what could still commit on it; wait until
        ``new`` has received all it flushed. Returns how many sessions were terminated."""
        old.set_config(**{_FENCE_SETTING: True})
        old.fenced = True
        # set_config returned once a new session saw the reload, so the postmaster has
        # signalled every backend: each handles the reload before its next command, and
        # any transaction that starts from now on is read-only. Transactions already open
        # may still write: they get `grace` seconds, then are terminated.
        with old.admin() as conn:
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            fenced_at = row[0] if row else None
            open_before = (
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL AND xact_start <= %s"
            )
            end = min(deadline, time.monotonic() + grace)
            pids: list[int] = []
            while True:
                pids = [int(r[0]) for r in conn.execute(open_before, [fenced_at]).fetchall()]
                if not pids or time.monotonic() >= end:
                    break
                time.sleep(0.01)
            terminated = 0
            if pids:
                conn.add_notice_handler(lambda diag: None)
                wait = ", 5000" if old.major >= 14 else ""  # until they have exited
                rows = conn.execute(
                    f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid{wait})) "  # noqa: S608
                    "FROM unnest(%s::int[]) AS pid",
                    [pids],
                ).fetchall()
                terminated = int(rows[0][0]) if rows else 0
            row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
            flushed = str(row[0]) if row else "0/0"

        # Received, or replayed: a WAL receiver that restarted at a segment's start reports
        # that start as received until more WAL arrives (up to 15 s on an idle primary).
        reached = (
            "SELECT GREATEST(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) >= %s::pg_lsn"
        )

        def received() -> bool | None:
            rows = new.execute(reached, [flushed])
            return True if rows and rows[0][0] else None

        if _poll(deadline, received) is None:
            raise ServerStartError(f"the standby did not receive up to {flushed} in time")
        return terminated

    def _promote(self, new: _Node, deadline: float) -> tuple[float, float]:
        with new.admin() as conn:
            requested = time.monotonic()
            conn.execute("SELECT pg_promote(false)")
            while True:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return requested, time.monotonic()
                if time.monotonic() >= deadline:
                    raise ServerStartError(
                        f"the standby on port {new.port} was not promoted in time; "
                        f"last log lines:\n{new.log_tail(20)}"
                    )
                time.sleep(_POLL)

    def _wait_replication(
        self, primary: _Node, standby: _Node, deadline: float, *, synchronous: bool
    ) -> None:
        """Wait until ``standby`` streams ``primary``'s current timeline (a standby that
        forked off an older one streams it for a moment, then stops: not enough)."""
        rows = primary.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")
        timeline = int(str(rows[0][0])[:8], 16)
        query = "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s"

        def streaming() -> bool | None:
            received = standby.execute(
                "SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'"
            )
            if not received or received[0][0] != timeline:
                return None
            rows = primary.execute(query, [standby.name])
            ok = any(r[0] == "streaming" and (not synchronous or r[1] == "sync") for r in rows)
            return True if ok else None

        if _poll(deadline, streaming) is None:
            want = "synchronous " if synchronous else ""
            raise ServerStartError(
                f"{standby.name} (port {standby.port}) did not start {want}streaming from "
                f"port {primary.port} in time; last log lines:\n{standby.log_tail(20)}"
            )

    def _make_synchronous(self, primary: _Node, standby: _Node, deadline: float) -> None:
        started = time.perf_counter()
        primary.set_config(synchronous_standby_names=standby.name)
        self._wait_replication(primary, standby, deadline, synchronous=True)
        self.timings["synchronous"] = time.perf_counter() - started


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _poll(deadline: float, attempt: Any) -> Any:
    """``attempt()`` every few milliseconds until it returns non-None or time runs out;
    connection errors (a server that is restarting) count as not yet."""
    while True:
        with contextlib.suppress(psycopg.OperationalError):
            result = attempt()
            if result is not None:
                return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
