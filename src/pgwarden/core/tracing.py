"""The statement-observer seam: what a tracer sees of the statements a handle runs (pure).

Theory of operation
    The handle calls :meth:`StatementObserver.statement_started` right before it sends one of
    the caller's statements and :meth:`StatementObserver.statement_finished` right after, once
    per attempt (a retried ``fetch`` is two statements), with the token ``started`` returned.
    Internal probes (readiness and health checks, commit resolution, validation) are not
    reported.  ``db.add_statement_observer(observer)`` attaches one and returns ``remove()``.

    The handle holds exactly one observer and calls it unconditionally: a
    :class:`NoopStatementObserver` when nothing is attached, the attached observer wrapped in a
    :class:`TeeStatementObserver` otherwise.  :func:`with_observer` and :func:`without_observer`
    build the next one to hold, so adding and removing observers is a swap of one reference.

Contracts for observers
    * ``operation`` is a short name of what the caller asked for: ``fetch``, ``fetchrow``,
      ``fetchval``, ``execute``, ``executemany`` or ``transaction`` (:data:`OPERATIONS`), or
      another short name a later version adds.  ``query`` is the statement as the caller
      passed it (``str``, ``bytes`` or a ``psycopg.sql`` object), never the parameters.
    * ``rowcount`` is what the driver reported for the statement (rows returned by a fetch,
      rows affected by an ``execute``) or ``None`` when unknown; ``error`` is the exception
      the attempt raised, ``None`` on success.
    * Cheap, and no blocking I/O: an observer runs on the statement's path.  An observer that
      raises never fails the statement when it is behind a :class:`TeeStatementObserver`
      (which the handle always uses for attached observers).

This module imports only the standard library (``logging`` on the first failure only).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "NOOP_STATEMENT_OBSERVER",
    "OPERATIONS",
    "NoopStatementObserver",
    "StatementObserver",
    "TeeStatementObserver",
    "with_observer",
    "without_observer",
]

#: The operation names the handle reports today.
OPERATIONS: tuple[str, ...] = (
    "fetch",
    "fetchrow",
    "fetchval",
    "execute",
    "executemany",
    "transaction",
)


@runtime_checkable
class StatementObserver(Protocol):
    """Sees every statement the caller's code sends, once per attempt."""

    def statement_started(self, operation: str, query: object) -> object:
        """The handle is about to send *query* for *operation*; return a token (any object)
        that is handed back to :meth:`statement_finished`."""
        ...

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        """The statement whose :meth:`statement_started` returned *token* ended, with *error*
        (``None`` on success) and *rowcount* (``None`` when unknown)."""
        ...


class NoopStatementObserver:
    """What the handle holds when nothing observes statements: both methods do nothing."""

    __slots__ = ()

    def statement_started(self, operation: str, query: object) -> object:
        return None

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        pass

    def __repr__(self) -> str:
        return "<NoopStatementObserver>"


#: The shared no-op observer (what :func:`without_observer` returns when none is left).
NOOP_STATEMENT_OBSERVER = NoopStatementObserver()


class TeeStatementObserver:
    """Fans each statement out to several observers, in order, and isolates their failures.

    * ``statement_started`` calls every observer and returns one token holding each
      observer's own token; ``statement_finished`` hands each observer its token back.  The
      token carries the observers, so a statement that started before an observer was added
      or removed still finishes with exactly the observers that saw it start.
    * An exception from an observer is swallowed, so it never fails the statement, and the
      other observers are still called.  The first failure of each observer is logged as a
      warning with its traceback on the ``pgwarden`` logger (event
      ``statement_observer_error``); later ones are not logged.  An observer whose
      ``statement_started`` raised is not called for that statement's end.  Only
      ``Exception`` is swallowed (``KeyboardInterrupt`` and the like propagate).
    * Nested tees are flattened and :class:`NoopStatementObserver` s are dropped, so
      ``TeeStatementObserver(tee, extra)`` is a flat tee of ``(*tee.observers, extra)``.

    Construction checks that each argument implements :class:`StatementObserver`.
    """

    __slots__ = ("_logged", "_observers")

    def __init__(self, *observers: StatementObserver) -> None:
        flat: list[StatementObserver] = []
        logged: set[int] = set()
        for observer in observers:
            if isinstance(observer, TeeStatementObserver):
                flat.extend(observer._observers)
                logged |= observer._logged
            elif isinstance(observer, NoopStatementObserver):
                continue
            elif isinstance(observer, StatementObserver):
                flat.append(observer)
            else:
                raise TypeError(
                    f"{type(observer).__name__} does not implement StatementObserver "
                    "(statement_started and statement_finished)"
                )
        self._observers: tuple[StatementObserver, ...] = tuple(flat)
        self._logged: set[int] = {i for i in logged if any(id(o) == i for o in flat)}

    @property
    def observers(self) -> tuple[StatementObserver, ...]:
        """The observers, in call order."""
        return self._observers

    def statement_started(self, operation: str, query: object) -> object:
        started: list[tuple[StatementObserver, object]] = []
        for observer in self._observers:
            try:
                token = observer.statement_started(operation, query)
            except Exception as exc:
                self._failed(observer, "statement_started", exc)
                continue
            started.append((observer, token))
        return _Token(started)

    def statement_finished(
        self, token: object, error: BaseException | None, rowcount: int | None
    ) -> None:
        if not isinstance(token, _Token):
            return  # not one of ours (or started on another observer): nothing to finish
        for observer, inner in token:
            try:
                observer.statement_finished(inner, error, rowcount)
            except Exception as exc:
                self._failed(observer, "statement_finished", exc)

    def _failed(self, observer: StatementObserver, phase: str, exc: Exception) -> None:
        key = id(observer)
        if key in self._logged:
            return
        self._logged.add(key)
        import logging  # only now: importing this module stays free of logging/threading

        name = type(observer).__qualname__
        logging.getLogger("pgwarden").warning(
            "statement observer %s raised %s in %s; the statement is unaffected and further "
            "failures of this observer are not logged",
            name,
            type(exc).__name__,
            phase,
            exc_info=exc,
            extra={"event": "statement_observer_error", "observer": name, "phase": phase},
        )

    def __repr__(self) -> str:
        names = ", ".join(type(o).__name__ for o in self._observers)
        return f"<TeeStatementObserver {names}>"


class _Token(list[tuple[StatementObserver, object]]):
    """What :meth:`TeeStatementObserver.statement_started` returns: (observer, token) pairs."""

    __slots__ = ()


def with_observer(current: StatementObserver, extra: StatementObserver) -> TeeStatementObserver:
    """The observer to hold once *extra* is attached beside *current*: a flat
    :class:`TeeStatementObserver` (so *extra* is isolated even when it is the only one)."""
    return TeeStatementObserver(current, extra)


def without_observer(current: StatementObserver, extra: StatementObserver) -> StatementObserver:
    """The observer to hold once *extra* is detached from *current*: one occurrence of it
    (the last) is removed, the exact inverse of one :func:`with_observer`, so call it once per
    attachment (the handle's ``remove()`` should be idempotent).  Returns the shared
    :data:`NOOP_STATEMENT_OBSERVER` when no observer is left, and *current* itself when
    *extra* is not in it."""
    if current is extra:
        return NOOP_STATEMENT_OBSERVER
    if not isinstance(current, TeeStatementObserver):
        return current
    observers = list(current.observers)
    for i in range(len(observers) - 1, -1, -1):
        if observers[i] is extra:
            del observers[i]
            break
    else:
        return current
    if not observers:
        return NOOP_STATEMENT_OBSERVER
    tee = TeeStatementObserver(*observers)
    tee._logged = {i for i in current._logged if any(id(o) == i for o in observers)}
    return tee
