"""SQLAlchemy's pytest plugin for the compliance suite, loaded with ``-p sqla_plugin``.

SQLAlchemy's README.dialects.rst does this in a ``conftest.py``. It is a plugin named
in ``setup.cfg`` here instead, and the suite's module is ``suite_sqlalchemy.py``
rather than ``test_*.py``, so that the project's own ``pytest`` run (testpaths
``tests``) neither loads SQLAlchemy's plugin nor collects the suite: it only runs
through tests/integration/test_sqlalchemy_suite.py (or by hand, from this directory):

    cd tests/sqla_suite
    python -m pytest -c setup.cfg --dburi 'postgresql+pgwarden://user:pw@host/db'
    python -m pytest -c setup.cfg --dburi 'postgresql+pgwarden_async://user:pw@host/db'

The database needs the schemas ``test_schema`` and ``test_schema_2``.
"""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import registry

# The sync dialect is registered by pgwarden's entry point; the asyncio one under the
# name SQLAlchemy's suite needs to select it from a URL (as psycopg_async does).
registry.register("postgresql.pgwarden", "pgwarden.sqlalchemy.dialect", "PGDialect_pgwarden")
registry.register(
    "postgresql.pgwarden_async", "pgwarden.sqlalchemy.dialect", "PGDialectAsync_pgwarden"
)

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403
