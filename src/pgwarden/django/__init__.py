"""Django on pgwarden: ``ENGINE: "pgwarden.django"``, `atomic_retry` and health views.

    DATABASES = {
        "default": {
            "ENGINE": "pgwarden.django",          # the one-line switch
            "NAME": "app", "USER": "app", "PASSWORD": "...", "HOST": "db",
            "OPTIONS": {"pgwarden": {"max_size": 10}},
        }
    }

    from pgwarden.django import atomic_retry

    @atomic_retry
    def place_order(cart): ...                    # re-run whole when it certainly did not commit

    for attempt in atomic_retry():                # the same, inline
        with attempt:
            Order.objects.create(...)

Importing ``pgwarden`` does not import Django; importing this package does not either
until one of the names below is used (Django imports ``pgwarden.django.base`` itself).
See docs/django.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgwarden.django.retry import AtomicRetry, Attempt, atomic_retry, handle_of

__all__ = ["AtomicRetry", "Attempt", "atomic_retry", "handle_of"]

_LAZY = {
    "AtomicRetry": "pgwarden.django.retry",
    "Attempt": "pgwarden.django.retry",
    "atomic_retry": "pgwarden.django.retry",
    "handle_of": "pgwarden.django.retry",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pgwarden.django' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
