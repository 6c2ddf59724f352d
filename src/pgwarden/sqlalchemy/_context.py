"""Which run_transaction() is running here (no SQLAlchemy import).

A context variable holds the task (asyncio) or thread that opened the
run_transaction() in progress. A task created inside it inherits the variable
(asyncio copies the context) but is not its owner, so it is not "inside" it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["in_run_transaction", "running_transaction"]

_owner: ContextVar[object | None] = ContextVar("pgwarden_sqlalchemy_run", default=None)


def _current_owner() -> object:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running event loop: a thread
        task = None
    return task if task is not None else threading.current_thread()


def in_run_transaction() -> bool:
    """Is a run_transaction() of this task (thread) in progress?"""
    owner = _owner.get()
    return owner is not None and owner is _current_owner()


@contextmanager
def running_transaction() -> Iterator[None]:
    """Mark this task (thread) as inside run_transaction(); RuntimeError if it already is."""
    if in_run_transaction():
        raise RuntimeError(
            "run_transaction() inside run_transaction(): the inner unit of work would "
            "commit on its own connection and run again with the outer one; use "
            "session.begin_nested() (a SAVEPOINT) inside the outer function instead"
        )
    token = _owner.set(_current_owner())
    try:
        yield
    finally:
        _owner.reset(token)
