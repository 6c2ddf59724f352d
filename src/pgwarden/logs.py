"""Structured events on the ``pgwarden`` logger: a JSON formatter and event helpers.

pgwarden logs through the standard library logger ``"pgwarden"`` and tags every event with
``extra={"event": NAME, ...}``: ``warmup``, ``warmup_retry``, ``retry``,
``retry_budget_exhausted``, ``breaker``, ``overload``, ``reconnect``, ``ambiguous_commit``,
``slow_query``, ``leak``, ``closed``, and ``pool_*`` for psycopg_pool's own log lines about
pgwarden's pools (see :data:`EVENTS` and :data:`POOL_MESSAGES`).  Nothing is logged on the
steady-state hot path.  This module makes those events easy to ship and to look at:

* :class:`JsonFormatter`: one JSON object per line with ``ts``, ``level``, ``logger``,
  ``message``, ``event`` and the event's extra fields;
* :func:`configure_json_logging`: attach a JSON handler to the ``pgwarden`` logger (or any);
* :class:`EventBuffer`: a ring buffer of the last N events, as dicts (what the dashboard
  shows);
* :func:`record_to_dict`: the dict behind both;
* :func:`route_pool_logs` / :class:`PoolLogBridge`: psycopg_pool's records about a pgwarden
  pool become ``pool_*`` events on the ``pgwarden`` logger (once each; the original is
  dropped), while records of anyone else's psycopg_pool pools pass through untouched.

Secrets
    Every string that leaves here (message, field values, keys, exception text) goes through
    :func:`pgwarden._redact.redact`, which masks URL passwords, ``password=`` pairs and any
    extra secret values given.  Fields named like parameters (``params``, ``parameters``,
    ``args``) are dropped, and fields named like secrets (``password``, ``secret``, ``token``)
    are masked, whatever logged them: statement parameters are never written.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import itertools
import json
import logging
import re
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import FrameType
from typing import IO, Any

from pgwarden._redact import MASK, redact

__all__ = [
    "EVENTS",
    "LOGGER_NAME",
    "POOL_GENERIC_EVENT",
    "POOL_LOGGERS",
    "POOL_MESSAGES",
    "EventBuffer",
    "JsonFormatter",
    "PoolLogBridge",
    "configure_json_logging",
    "record_to_dict",
    "route_pool_logs",
]

#: The logger pgwarden writes to.
LOGGER_NAME = "pgwarden"

#: Event names pgwarden emits (the ``event`` field), with what each one means.
EVENTS: dict[str, str] = {
    "warmup": "readiness warmup finished (ok=True/False, seconds, attempts)",
    "warmup_retry": "a warmup attempt failed and will be retried (attempt)",
    "retry": "an operation is retried (reason = failure kind, attempt)",
    "retry_budget_exhausted": "a retry was refused by the retry budget (reason)",
    "breaker": "the circuit breaker changed state (from, to)",
    "overload": "the server reported overload; the pool limit was lowered (pool_limit)",
    "reconnect": "connections are being replaced (reason, e.g. failover or restart)",
    "ambiguous_commit": "a COMMIT lost its connection and was resolved (outcome)",
    "slow_query": "a statement exceeded slow_query_threshold (seconds, statement sanitised)",
    "leak": "a connection was held past leak_threshold (held_seconds, site)",
    "closed": "the handle closed (cut_off = operations still in flight)",
    "hidden_write": "a statement that reads as a read was refused read-only: sent as a write "
    "from now on (statement sanitised)",
    "startup_not_ready": "pgwarden.asgi: the app started before the database was ready",
    "draining": "pgwarden.asgi: SIGTERM received; /readyz fails while requests drain",
    "drain_delay_ignored": "pgwarden.asgi: the server handles SIGTERM itself; no drain delay",
    "http_error": "pgwarden.asgi: a database error became an HTTP error response (status)",
}


@functools.cache
def _standard() -> frozenset[str]:
    """Attributes every LogRecord has; anything else on a record came from ``extra=``.

    Found on first use, not at import: it takes building a LogRecord (~0.1 ms)."""
    record = logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)
    return frozenset(vars(record)) | {"message", "asctime", "taskName"}


_DROPPED = frozenset({"params", "parameters", "args", "vars", "bind_params"})
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential")


def _clean(value: Any, secrets: tuple[str, ...], depth: int = 0) -> Any:
    """A JSON-ready, redacted copy of an extra field's value."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, str):
        return redact(value, *secrets)
    if depth < 4 and isinstance(value, Mapping):
        return {
            redact(str(k), *secrets): _field(str(k), v, secrets, depth + 1)
            for k, v in value.items()
            if str(k).lower() not in _DROPPED
        }
    if depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v, secrets, depth + 1) for v in value]
    return redact(str(getattr(value, "value", value)), *secrets)


def _field(key: str, value: Any, secrets: tuple[str, ...], depth: int = 0) -> Any:
    lowered = key.lower()
    if any(word in lowered for word in _SECRET_WORDS) and value not in (None, ""):
        return MASK
    return _clean(value, secrets, depth)


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_to_dict(
    record: logging.LogRecord, *, secrets: Iterable[str] = (), exc_text: bool = True
) -> dict[str, Any]:
    """The structured form of a log record: ``ts``, ``level``, ``logger``, ``message``,
    ``event`` (None for plain log lines), the extra fields, and ``exception`` when there is
    one.  Every string is redacted; parameter-like fields are dropped."""
    known = tuple(s for s in secrets if s)
    out: dict[str, Any] = {
        "ts": _timestamp(record.created),
        "level": record.levelname,
        "logger": record.name,
        "message": redact(record.getMessage(), *known),
        "event": None,
    }
    standard = _standard()
    for key, value in vars(record).items():
        if key in standard or key.startswith("_") or key.lower() in _DROPPED:
            continue
        if key in ("ts", "level", "logger", "message"):
            key = f"extra_{key}"  # never let an extra field overwrite the envelope
        out[redact(key, *known)] = _field(key, value, known)
    if exc_text and record.exc_info and record.exc_info[0] is not None:
        exc_type, exc, _ = record.exc_info
        out["exception"] = {
            "type": exc_type.__name__,
            "message": redact(str(exc), *known),
            "traceback": redact(logging.Formatter().formatException(record.exc_info), *known),
        }
    return out


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line (see :func:`record_to_dict`).

    *secrets* are extra values to mask anywhere (a password that is not inside a URL, an API
    key).  Keys are written in a stable order: the envelope first, then the event fields.
    """

    def __init__(self, *, secrets: Iterable[str] = (), ensure_ascii: bool = False) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)
        self.ensure_ascii = ensure_ascii

    def format(self, record: logging.LogRecord) -> str:
        data = record_to_dict(record, secrets=self.secrets)
        if record.stack_info:
            data["stack"] = redact(self.formatStack(record.stack_info), *self.secrets)
        return json.dumps(data, ensure_ascii=self.ensure_ascii, default=str)


_INSTALLED_ATTR = "_pgwarden_json_handler"


def configure_json_logging(
    level: int | str = logging.INFO,
    *,
    stream: IO[str] | None = None,
    logger: str = LOGGER_NAME,
    secrets: Iterable[str] = (),
    propagate: bool | None = False,
) -> logging.Handler:
    """Send the ``pgwarden`` logger's records (or *logger*'s) to *stream* as JSON lines.

    Sets the logger's level to *level*.  Calling it again replaces the handler it installed
    before instead of adding a second one.  By default the logger stops propagating to the
    root logger so each event is written once; pass ``propagate=None`` to leave that alone.
    Returns the handler (remove it with ``logging.getLogger(logger).removeHandler(h)``).
    """
    target = logging.getLogger(logger)
    for existing in list(target.handlers):
        if getattr(existing, _INSTALLED_ATTR, False):
            target.removeHandler(existing)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(secrets=secrets))
    setattr(handler, _INSTALLED_ATTR, True)
    target.addHandler(handler)
    target.setLevel(level)
    if propagate is not None:
        target.propagate = propagate
    return handler


class EventBuffer(logging.Handler):
    """Keeps the last *capacity* records as redacted dicts, each with a rising ``seq``.

    ``buffer.install()`` attaches it to the ``pgwarden`` logger; ``buffer.events(since=n)``
    returns what arrived after sequence number *n*.  With ``events_only=True`` (the default)
    plain log lines without an ``event`` field are skipped.  Thread-safe.
    """

    def __init__(
        self,
        capacity: int = 200,
        *,
        level: int = logging.INFO,
        secrets: Iterable[str] = (),
        events_only: bool = True,
    ) -> None:
        super().__init__(level)
        self.secrets = tuple(s for s in secrets if s)
        self.events_only = events_only
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._mutex = threading.Lock()
        self._installed: list[tuple[logging.Logger, int | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.events_only and not getattr(record, "event", None):
                return
            item = record_to_dict(record, secrets=self.secrets, exc_text=False)
            with self._mutex:
                item["seq"] = next(self._seq)
                self._items.append(item)
        except Exception:
            self.handleError(record)

    def events(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Buffered events with ``seq > since``, oldest first (at most the last *limit*)."""
        with self._mutex:
            items = [dict(e) for e in self._items if e["seq"] > since]
        return items[-limit:] if limit is not None and limit >= 0 else items

    def clear(self) -> None:
        with self._mutex:
            self._items.clear()

    def install(self, logger: str = LOGGER_NAME, *, lower_level: bool = True) -> EventBuffer:
        """Attach to *logger*.  With *lower_level* and a logger that has no level of its own
        (``NOTSET``, so INFO events would be filtered out by the root's WARNING), set the
        logger's level to this handler's level; :meth:`uninstall` restores it."""
        target = logging.getLogger(logger)
        previous: int | None = None
        if lower_level and target.level == logging.NOTSET:
            previous = target.level
            target.setLevel(self.level)
        target.addHandler(self)
        self._installed.append((target, previous))
        return self

    def uninstall(self) -> None:
        """Detach from every logger :meth:`install` attached to (restoring their levels)."""
        while self._installed:
            target, previous = self._installed.pop()
            target.removeHandler(self)
            if previous is not None:
                target.setLevel(previous)


# --- psycopg_pool's own records, as pgwarden events --------------------------------------------
#
# psycopg_pool logs plain text on "psycopg.pool" (and "psycopg_pool.sched"). A filter on those
# loggers turns each record emitted on behalf of a pgwarden pool into one event on the
# "pgwarden" logger and drops the original; records of any other psycopg_pool pool pass
# through untouched. See :func:`route_pool_logs`.

#: The loggers psycopg_pool writes to (its schedulers use their module names).
POOL_LOGGERS = ("psycopg.pool", "psycopg_pool.sched", "psycopg_pool.sched_async")

#: Class attribute marking pgwarden's pool and connection classes (``PgwAsyncPool``,
#: ``PgwPool`` and their connections): records about them are pgwarden's.
OWNED_MARK = "_pgwarden_owned"
#: Class attribute marking exceptions whose psycopg_pool records are dropped without an
#: event (``CircuitOpen``: the breaker already logged the outage once).
QUIET_MARK = "_pgwarden_quiet"

_DEBUG, _INFO, _WARNING = logging.DEBUG, logging.INFO, logging.WARNING

#: Every message psycopg_pool 3.3 logs (its format string, as psycopg-pool 3.3.0 to 3.3.3
#: write it) -> (event, level pgwarden logs it at, what each ``%`` argument is).  The level is
#: psycopg_pool's own except for the three messages logged on every ``getconn``/``putconn``,
#: which pgwarden logs at DEBUG: nothing is logged on the steady-state hot path at INFO.
#: A message not listed here (a newer psycopg_pool) becomes a ``pool_log`` event at its level.
POOL_MESSAGES: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "waiting for pool %r initialization": ("pool_opening", _INFO, ("pool",)),
    "pool %r is ready to use": ("pool_ready", _INFO, ("pool",)),
    "connection requested from %r": ("pool_connection_requested", _DEBUG, ("pool",)),
    "connection given by %r": ("pool_connection_given", _DEBUG, ("pool",)),
    "returning connection to %r": ("pool_connection_returning", _DEBUG, ("pool",)),
    "connection failed check: %s": ("pool_check_failed", _INFO, ("error",)),
    "growing pool %r to %s": ("pool_growing", _INFO, ("pool", "size")),
    "adding new connection to the pool": ("pool_connection_added", _INFO, ()),
    "resizing %r to min_size=%s max_size=%s": (
        "pool_resizing",
        _INFO,
        ("pool", "min_size", "max_size"),
    ),
    "shrinking pool %r to %s because %s unused connections in the last %s sec": (
        "pool_shrinking",
        _INFO,
        ("pool", "size", "unused", "seconds"),
    ),
    "discarding expired connection %s": ("pool_connection_expired", _INFO, ("connection",)),
    "discarding expired connection": ("pool_connection_expired", _INFO, ()),
    "discarding broken connection: %s": ("pool_connection_broken", _WARNING, ("connection",)),
    "not serving connection found broken": ("pool_broken_not_served", _INFO, ()),
    "discarding closed connection: %s": ("pool_returned_broken", _WARNING, ("connection",)),
    "rolling back returned connection: %s": (
        "pool_returned_in_transaction",
        _WARNING,
        ("connection",),
    ),
    "rollback failed: %s: %s. Discarding connection %s": (
        "pool_rollback_failed",
        _WARNING,
        ("error_type", "error", "connection"),
    ),
    "closing returned connection: %s": ("pool_returned_active", _WARNING, ("connection",)),
    "error resetting connection: %s": ("pool_reset_failed", _WARNING, ("error",)),
    "error connecting in %r: %s": ("pool_connect_failed", _WARNING, ("pool", "error")),
    "reconnection attempt in pool %r failed after %s sec": (
        "pool_reconnect_gave_up",
        _WARNING,
        ("pool", "seconds"),
    ),
    "task run %s failed: %s: %s": ("pool_task_failed", _WARNING, ("task", "error_type", "error")),
    "scheduled task run %s failed: %s: %s": (
        "pool_scheduled_task_failed",
        _WARNING,
        ("task", "error_type", "error"),
    ),
    "pool %r closed": ("pool_closed", _DEBUG, ("pool",)),
    "terminating working task %s": ("pool_worker_stopped", _DEBUG, ("worker",)),
    "task run discarded: %s": ("pool_task_discarded", _DEBUG, ("task",)),
    "task tick discarded: %s": ("pool_task_discarded", _DEBUG, ("task",)),
    "task running in %s: %s": ("pool_task_running", _DEBUG, ("worker", "task")),
    "couldn't stop task %r within %s seconds": (
        "pool_worker_stuck",
        _WARNING,
        ("worker", "seconds"),
    ),
    "couldn't stop thread %r within %s seconds": (
        "pool_worker_stuck",
        _WARNING,
        ("worker", "seconds"),
    ),
    "hint: %s": ("pool_worker_stuck_hint", _WARNING, ("hint",)),
}
#: The event of a psycopg_pool message not in :data:`POOL_MESSAGES`.
POOL_GENERIC_EVENT = "pool_log"

for _template, (_event, *_rest) in POOL_MESSAGES.items():
    EVENTS.setdefault(_event, f"psycopg_pool logged {_template!r} about a pgwarden pool")
EVENTS[POOL_GENERIC_EVENT] = "psycopg_pool logged a message not in POOL_MESSAGES (pool, origin)"
del _template, _event, _rest

_NUMBERS = frozenset({"size", "min_size", "max_size", "unused", "seconds"})
_STATUS = r"\[([^\]]*)\]"  # compiled on first use (re caches it), not at import
_FRAME_DEPTH = 40  # how far up the emitting stack to look for the pool


def _type_marked(obj: object, mark: str) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    return bool(getattr(cls, mark, False))


class PoolLogBridge(logging.Filter):
    """The filter on psycopg_pool's loggers that turns a pgwarden pool's records into events.

    Installed once per process by :func:`route_pool_logs`; thread-safe; costs nothing unless
    psycopg_pool emits a record (a logger's filters run only then).  Whose record is it, in
    this order (the first answer wins):

    1. an argument of the record: a connection (pgwarden's pools use their own connection
       class), a pool task (it holds a reference to its pool), or the name of a pgwarden pool
       or of one of its workers (``<name>-worker-N``);
    2. the emitting call stack: the nearest frame whose ``self`` (or ``cls``) is a
       psycopg_pool pool (or pool class) -- every psycopg_pool message is logged from inside
       a pool method, except the two below;
    3. the emitting thread's or asyncio task's name: psycopg_pool names its workers
       ``<name>-worker-N`` and its scheduler ``<name>-scheduler`` (the scheduler's messages).

    A record that none of these attributes to a pgwarden pool passes through untouched.
    """

    _pgwarden_pool_bridge = True  # recognised by route_pool_logs across module reloads

    def __init__(self) -> None:
        super().__init__()
        self._mutex = threading.Lock()
        self._names: frozenset[str] = frozenset()
        self._secrets: tuple[str, ...] = ()
        self._target = logging.getLogger(LOGGER_NAME)

    # -- registry ---------------------------------------------------------------------------
    def register(self, pool_name: str, secrets: Iterable[str | None] = ()) -> None:
        """Remember *pool_name* as a pgwarden pool's and *secrets* as values to mask."""
        with self._mutex:
            self._names = self._names | {pool_name}
            known = set(self._secrets)
            self._secrets = self._secrets + tuple(
                s for s in dict.fromkeys(secrets) if s and len(s) >= 3 and s not in known
            )

    @property
    def pool_names(self) -> frozenset[str]:
        return self._names

    # -- the filter ---------------------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            owner = self.owner(record)
        except Exception:  # never break psycopg_pool; a record we cannot place passes
            return True
        if owner is None:
            return True
        try:
            self._emit(record, owner)
        except Exception:  # one that cannot be rendered still becomes one (plainer) event
            with contextlib.suppress(Exception):
                self._emit_fallback(record, owner)
        return False

    def owner(self, record: logging.LogRecord) -> str | None:
        """The pgwarden pool *record* is about: its name ("" when not known), or None when
        the record is not about a pgwarden pool."""
        for verdict in self._verdicts(record):
            if verdict is not None:
                return verdict if isinstance(verdict, str) else None
        return None

    # A verdict: a str (a pgwarden pool's; its name or ""), False (another pool's) or None
    # (this clue says nothing). The clues are tried in order, the cheap ones first.
    def _verdicts(self, record: logging.LogRecord) -> Iterator[str | bool | None]:
        for arg in record.args if isinstance(record.args, tuple) else ():
            yield self._about(arg)
        yield self._from_stack()
        yield self._context_name(record)

    def _about(self, obj: object) -> str | bool | None:
        """The verdict of one argument of the record."""
        if isinstance(obj, str):
            return self._matching_name(obj)
        if isinstance(obj, (int, float, BaseException)) or obj is None:
            return None
        psycopg = sys.modules.get("psycopg")
        if psycopg is not None and isinstance(obj, psycopg.BaseConnection):
            if not _type_marked(obj, OWNED_MARK):
                return False
            pool = getattr(obj, "_pool", None)
            return str(getattr(pool, "name", "") or "")
        owner = getattr(obj, "__self__", obj)  # a bound method: the scheduler's task.tick
        ref = getattr(owner, "pool", None)
        if isinstance(ref, weakref.ref):
            return self._pool_verdict(ref())
        return self._pool_verdict(obj)

    @staticmethod
    def _pool_verdict(obj: object) -> str | bool | None:
        base = sys.modules.get("psycopg_pool.base")
        if base is None or obj is None:
            return None
        pool_class = base.BasePool
        if isinstance(obj, pool_class):
            return str(getattr(obj, "name", "") or "") if _type_marked(obj, OWNED_MARK) else False
        if isinstance(obj, type) and issubclass(obj, pool_class):
            return "" if _type_marked(obj, OWNED_MARK) else False
        return None

    def _from_stack(self) -> str | bool | None:
        frame: FrameType | None = sys._getframe(1)
        for _ in range(_FRAME_DEPTH):
            if frame is None:
                return None
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] in ("self", "cls"):
                verdict = self._pool_verdict(frame.f_locals.get(code.co_varnames[0]))
                if verdict is not None:
                    return verdict
            frame = frame.f_back
        return None

    def _matching_name(self, text: str) -> str | None:
        for name in self._names:
            if text == name or text.startswith(name + "-"):
                return name
        return None

    def _context_name(self, record: logging.LogRecord) -> str | None:
        name = self._matching_name(record.threadName or threading.current_thread().name)
        if name is not None:
            return name
        aio = sys.modules.get("asyncio")
        if aio is None:
            return None
        try:
            task = aio.current_task()
        except RuntimeError:  # no running loop in this thread
            return None
        return None if task is None else self._matching_name(task.get_name())

    # -- the event ----------------------------------------------------------------------------
    def _emit(self, record: logging.LogRecord, owner: str) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(_type_marked(arg, QUIET_MARK) for arg in args if isinstance(arg, BaseException)):
            return
        template = record.msg if isinstance(record.msg, str) else str(record.msg)
        event, level, names = POOL_MESSAGES.get(template, (POOL_GENERIC_EVENT, record.levelno, ()))
        target = self._target
        if not target.isEnabledFor(level):
            return
        secrets = self._secrets
        fields: dict[str, Any] = {}
        rendered: list[Any] = []
        for index, arg in enumerate(args):
            role = names[index] if index < len(names) else ""
            rendered.append(self._render(arg, role, fields, secrets))
        if isinstance(record.args, tuple):
            text = template % tuple(rendered) if rendered else template
        else:
            text = record.getMessage()
        pool = fields.get("pool") or owner or self._context_name(record)
        if not pool and len(self._names) == 1:
            pool = next(iter(self._names))
        extra: dict[str, Any] = {"event": event, **fields}
        extra["pool"] = redact(str(pool), *secrets) if pool else None
        extra["origin"] = record.name
        standard = _standard()
        for key, value in vars(record).items():  # extra= given to psycopg_pool's record
            if key not in standard and not key.startswith("_") and key not in extra:
                extra[key] = value
        self._handle(record, level, redact(text, *secrets), extra)

    @staticmethod
    def _render(arg: Any, role: str, fields: dict[str, Any], secrets: tuple[str, ...]) -> Any:
        """*arg* as it goes into the message, recording its structured form in *fields*."""
        psycopg = sys.modules.get("psycopg")
        if psycopg is not None and isinstance(arg, psycopg.BaseConnection):
            # Not the connection's repr: it names host, port, user and database.
            match = re.search(_STATUS, repr(arg))
            status = match.group(1) if match else "?"
            fields["connection_status"] = status
            try:
                pid = int(arg.pgconn.backend_pid)
            except Exception:
                pid = 0
            if pid:
                fields["backend_pid"] = pid
            return f"<connection [{status}]" + (f" pid={pid}>" if pid else ">")
        if isinstance(arg, BaseException):
            fields.setdefault("error_type", type(arg).__name__)
            sqlstate = getattr(arg, "sqlstate", None)
            if isinstance(sqlstate, str) and sqlstate:
                fields["sqlstate"] = sqlstate
            return redact(str(arg), *secrets)
        if role in ("pool", "worker", "error_type") and isinstance(arg, str):
            fields[role] = redact(arg, *secrets)
        elif role == "task":
            fields["task"] = type(arg).__name__
        elif role in _NUMBERS and isinstance(arg, (int, float)) and not isinstance(arg, bool):
            fields[role] = arg
        return arg

    def _handle(
        self, record: logging.LogRecord, level: int, text: str, extra: dict[str, Any]
    ) -> None:
        target = self._target
        event = target.makeRecord(
            target.name,
            level,
            record.pathname,
            record.lineno,
            text,
            (),
            record.exc_info,
            record.funcName,
            extra,
            record.stack_info,
        )
        event.created, event.msecs = record.created, record.msecs
        event.relativeCreated = record.relativeCreated
        target.handle(event)

    def _emit_fallback(self, record: logging.LogRecord, owner: str) -> None:
        """The event when the record could not be rendered: its template, redacted."""
        level = record.levelno
        if self._target.isEnabledFor(level):
            text = redact(str(record.msg), *self._secrets)
            extra = {"event": POOL_GENERIC_EVENT, "pool": owner or None, "origin": record.name}
            self._handle(record, level, text, extra)


_BRIDGE_LOCK = threading.Lock()
_BRIDGE: PoolLogBridge | None = None


def route_pool_logs(pool_name: str, *, secrets: Iterable[str | None] = ()) -> PoolLogBridge:
    """Make psycopg_pool's records about the pool named *pool_name* pgwarden events.

    Called by every pgwarden pool's constructor. The first call installs the
    :class:`PoolLogBridge` filter on :data:`POOL_LOGGERS` (later calls, and a reloaded
    module, find it there and reuse it: each record is turned into one event, however often
    this runs). *secrets* (the pool's password) are masked in every event's text and fields.
    Returns the bridge.
    """
    global _BRIDGE
    with _BRIDGE_LOCK:
        bridge: PoolLogBridge | None = None
        for logger_name in POOL_LOGGERS:
            for existing in logging.getLogger(logger_name).filters:
                if getattr(existing, "_pgwarden_pool_bridge", False):
                    bridge = existing  # type: ignore[assignment]
                    break
            if bridge is not None:
                break
        if bridge is None:
            bridge = _BRIDGE or PoolLogBridge()
        for logger_name in POOL_LOGGERS:
            target = logging.getLogger(logger_name)
            if not any(getattr(f, "_pgwarden_pool_bridge", False) for f in target.filters):
                target.addFilter(bridge)
        _BRIDGE = bridge
    bridge.register(pool_name, secrets)
    return bridge
