"""The test runner of Django's suite under ``pgwarden.django``: Django's own, with the
tests that check what pgwarden replaces marked skipped, each with its reason.

Every entry names one test (``module.Class.method``) of the apps the integration test
runs; a renamed or removed test is reported (`unused_skips`) so the list cannot rot.
"""

from __future__ import annotations

import unittest
from collections.abc import Iterator
from typing import Any

from django.test.runner import DiscoverRunner

_POOL = (
    "Django's own psycopg_pool integration (OPTIONS['pool'] builds a psycopg_pool pool); "
    "with pgwarden.django, pgwarden's pool is the pool and `pool` is None"
)
_PERSISTENT = (
    "Django's persistent-connection health checks (CONN_MAX_AGE, CONN_HEALTH_CHECKS): "
    "pgwarden.django returns connections to its pool at each request boundary and "
    "validates them at checkout without a round trip, so they are ignored"
)

#: Test id -> why it does not apply to pgwarden.django.
SKIPS: dict[str, str] = {
    "backends.postgresql.tests.Tests.test_connect_pool": _POOL,
    "backends.postgresql.tests.Tests.test_connect_pool_set_to_true": _POOL,
    "backends.postgresql.tests.Tests.test_pooling_health_checks": _POOL,
    "backends.postgresql.tests.Tests.test_pooling_not_support_persistent_connections": _POOL,
    "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_disabled": (
        _PERSISTENT
    ),
    "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_enabled": (_PERSISTENT),
    "backends.base.test_base.ConnectionHealthChecksTests"
    ".test_health_checks_enabled_errors_occurred": _PERSISTENT,
    "backends.base.test_base.ConnectionHealthChecksTests"
    ".test_set_autocommit_health_checks_enabled": _PERSISTENT,
}

#: Skips that matched no test in the last suite built (printed by the runner).
unused_skips: list[str] = []


def _tests(suite: Any) -> Iterator[unittest.TestCase]:
    for test in suite:
        if isinstance(test, unittest.TestCase):
            yield test
        else:
            yield from _tests(test)


class PgwardenRunner(DiscoverRunner):  # type: ignore[misc]
    """Django's DiscoverRunner; the tests in `SKIPS` are skipped with their reason."""

    def build_suite(self, *args: Any, **kwargs: Any) -> Any:
        suite = super().build_suite(*args, **kwargs)
        found: set[str] = set()
        for test in _tests(suite):
            reason = SKIPS.get(test.id())
            if reason is None:
                continue
            found.add(test.id())
            name = test._testMethodName
            setattr(test, name, unittest.skip(f"pgwarden: {reason}")(getattr(test, name)))
        unused_skips[:] = sorted(set(SKIPS) - found)
        if unused_skips:
            print("pgwarden skips that matched no test:", ", ".join(unused_skips))
        return suite
