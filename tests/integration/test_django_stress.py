"""``pgwarden stress`` with the two Django clients (tiny size): the same ORM code on Django's
own pool (``django``) and on ``pgwarden.django`` (``django-pgwarden``), in the restart,
kills, idle, storm and PgBouncer scenarios, real worker processes and real faults.

``django-pgwarden``'s invariants are pgwarden's: no duplicate, no lost acknowledged write,
no torn unit of work; its ORM units of work (``atomic_retry``) never fail with deadline
left. Both clients must serve every scenario.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from pgwarden.cli.main import main
from pgwarden.stress import clients
from pgwarden.testing import ServerUnavailable, find_pgbouncer
from pgwarden.testing.plugin import unavailable

SCENARIOS = "restart,kills,idle,storm,pgbouncer"


@pytest.fixture
def binaries() -> None:
    try:
        find_pgbouncer()
    except ServerUnavailable as exc:
        unavailable(str(exc))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_django_clients_in_the_fault_scenarios(
    binaries: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = list(clients.DJANGO_CLIENTS)
    argv = ["stress", "--size", "tiny", "--out", str(tmp_path), "-q"]
    code = main([*argv, "--scenario", SCENARIOS, "--clients", ",".join(names)])
    out = capsys.readouterr().out
    data: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    assert code == 0, out
    ran = [e for e in data["scenarios"] if not e["skipped"]]
    assert {e["name"] for e in ran} >= {"restart", "kills", "idle", "storm"}
    assert any(e["name"].startswith("pgbouncer") for e in ran)
    for entry in ran:
        where = entry["name"]
        assert list(entry["results"]) == names
        for name, r in entry["results"].items():
            assert r["requests"] > 0, f"{where}/{name}: no requests ran"
            assert r["workers"]["reported"] == entry["params"]["processes"], r["worker_errors"]
        ours = entry["results"]["django-pgwarden"]
        assert ours["duplicates"] == 0, where
        assert ours["lost_writes"] == 0, where
        orm = ours["orm"] or {}
        assert not orm.get("torn"), where
        assert orm.get("failed", 0) == 0, f"{where}: a unit of work failed"
        if entry["name"] in ("restart", "kills"):
            assert orm.get("units", 0) > 0, f"{where}: no ORM units of work ran"
    assert "django-pgwarden" in clients.PGWARDEN_CLIENTS
