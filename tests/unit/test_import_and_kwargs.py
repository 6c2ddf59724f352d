"""Import cost guards and the connection options a handle asks psycopg for."""

from __future__ import annotations

import subprocess
import sys

from pgwarden import Settings
from pgwarden._handle.config import connect_kwargs
from pgwarden._handle.state import HandleState


def test_import_pgwarden_loads_no_driver_and_no_optional_dependency() -> None:
    code = (
        "import sys, pgwarden\n"
        "heavy = ['psycopg', 'psycopg_pool', 'asyncio', 'prometheus_client', 'opentelemetry',"
        " 'sqlalchemy', 'pgwarden._async.database', 'pgwarden._sync.database',"
        " 'pgwarden._handle.state']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_handle_state_imports_no_driver() -> None:
    # The shells' shared state is pure: psycopg is imported only by the functions that build
    # psycopg arguments, when they are called.
    code = (
        "import sys, pgwarden._handle.state, pgwarden._handle.config\n"
        "print([m for m in ('psycopg', 'psycopg_pool', 'asyncio') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pgbouncer_on_turns_off_prepared_statements() -> None:
    on = Settings(url="postgresql://u@h/db", pgbouncer="on")
    assert HandleState(on).pgbouncer is True
    kwargs = connect_kwargs(on, pgbouncer=HandleState(on).pgbouncer)
    assert kwargs["prepare_threshold"] is None
    auto = Settings(url="postgresql://u@h/db")
    assert HandleState(auto).pgbouncer is False  # "auto" starts off until detected
    plain = connect_kwargs(auto, pgbouncer=HandleState(auto).pgbouncer)
    assert plain["prepare_threshold"] == 5
    assert plain["autocommit"] is True
    assert plain["keepalives"] == 1
    assert plain["tcp_user_timeout"] == 30_000
    assert plain["application_name"] == "pgwarden"
