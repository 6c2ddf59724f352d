"""Structured events on the ``pgwarden`` logger: a JSON formatter and event helpers.

pgwarden logs through the standard library logger ``"pgwarden"`` and tags every event with
``extra={"event": NAME, ...}``: ``warmup``, ``warmup_retry``, ``retry``,
``retry_budget_exhausted``, ``breaker``, ``overload``, ``reconnect``, ``ambiguous_commit``,
``slow_query``, ``leak``, ``closed`` (see :data:`EVENTS`).  Nothing is logged on the
steady-state hot path.  This module makes those events easy to ship and to look at:

* :class:`JsonFormatter`: one JSON object per line with ``ts``, ``level``, ``logger``,
  ``message``, ``event`` and the event's extra fields;
* :func:`configure_json_logging`: attach a JSON handler to the ``pgwarden`` logger (or any);
* :class:`EventBuffer`: a ring buffer of the last N events, as dicts (what the dashboard
  shows);
* :func:`record_to_dict`: the dict behind both.

Secrets
    Every string that leaves here (message, field values, keys, exception text) goes through
    :func:`pgwarden._redact.redact`, which masks URL passwords, ``password=`` pairs and any
    extra secret values given.  Fields named like parameters (``params``, ``parameters``,
    ``args``) are dropped, and fields named like secrets (``password``, ``secret``, ``token``)
    are masked, whatever logged them: statement parameters are never written.
"""

from __future__ import annotations

import collections
import datetime
import itertools
import json
import logging
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import IO, Any

from pgwarden._redact import MASK, redact

__all__ = [
    "EVENTS",
    "LOGGER_NAME",
    "EventBuffer",
    "JsonFormatter",
    "configure_json_logging",
    "record_to_dict",
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
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
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
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_") or key.lower() in _DROPPED:
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
