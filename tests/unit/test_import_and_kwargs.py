"""Import cost guards and the connection options a handle asks psycopg for."""

from __future__ import annotations

import subprocess
import sys

from pgwarden import Settings
from pgwarden._base import HandleCore


def test_import_pgwarden_loads_no_driver_and_no_optional_dependency() -> None:
    code = (
        "import sys, pgwarden\n"
        "heavy = ['psycopg', 'psycopg_pool', 'asyncio', 'prometheus_client', 'opentelemetry',"
        " 'sqlalchemy', 'pgwarden._async.database', 'pgwarden._sync.database']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pgbouncer_on_turns_off_prepared_statements() -> None:
    kwargs = HandleCore(Settings(url="postgresql://u@h/db", pgbouncer="on")).connect_kwargs()
    assert kwargs["prepare_threshold"] is None
    auto = HandleCore(Settings(url="postgresql://u@h/db")).connect_kwargs()
    assert auto["prepare_threshold"] == 5
    assert auto["autocommit"] is True
    assert auto["keepalives"] == 1
    assert auto["tcp_user_timeout"] == 30_000
    assert auto["application_name"] == "pgwarden"
