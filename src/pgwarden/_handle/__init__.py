"""What the async and sync shells share, with no awaits and no threads of its own.

``state.py`` is the one owner of a handle's mutable state (behind one lock);
``config.py`` turns settings into psycopg and psycopg_pool arguments;
``events.py`` writes the handle's log events; ``net.py`` holds the two socket
helpers (sever a blackholed connection, see whether an idle one has input).
`deferred` (here) lets the shells import what a first query does not call on first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["deferred"]


def deferred(module: str, name: str, into: MutableMapping[str, Any]) -> Callable[..., Any]:
    """A stand-in for the callable *module*.*name* in the namespace *into* (a module's
    ``globals()``): its first call imports *module*, puts the real callable in its
    place under *name*, and calls it. Later calls reach the real callable directly,
    with no import lookup: what a first query does not call, it does not import.

    For functions and classes that are only called; bind the type under
    ``if TYPE_CHECKING:`` so mypy sees the real signature.
    """

    def first_call(*args: Any, **kwargs: Any) -> Any:
        real = getattr(importlib.import_module(module), name)
        into[name] = real
        return real(*args, **kwargs)

    first_call.__name__ = first_call.__qualname__ = name
    return first_call
