"""The pytest plugin: fixtures, markers, and the CI=true fail-instead-of-skip rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgwarden.testing import FaultProxy
from pgwarden.testing.plugin import unavailable

_INNER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    def test_factory(pg_server_factory, pg_url):
        server = pg_server_factory({"max_connections": 15})
        assert pg_url.startswith("postgresql://postgres:")
        record = Path(os.environ["RECORD"])
        record.write_text(f"{server.pid} {server.base_dir}")
    """
)


def run_inner(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(_INNER)
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    environ.update(env, RECORD=str(tmp_path / "record"))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_markers_are_registered(pytestconfig: pytest.Config) -> None:
    names = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert {"pgbouncer", "proxy", "slow"} <= names


def test_proxy_fixture_marks_the_test(
    request: pytest.FixtureRequest, fault_proxy: FaultProxy
) -> None:
    assert request.node.get_closest_marker("proxy") is not None
    assert fault_proxy.connections == 0


def test_unavailable_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no server"):
        unavailable("no server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no server"):
        unavailable("no server")


def test_factory_servers_are_gone_after_the_test(tmp_path: Path) -> None:
    result = run_inner(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    pid_text, base_text = (tmp_path / "record").read_text().split()
    assert not Path(base_text).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_text), 0)


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_missing_server_skips_or_fails_under_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    result = run_inner(tmp_path, CI=ci, PGWARDEN_TEST_PG_BINDIR=str(tmp_path / "nowhere"))
    assert outcome in result.stdout, result.stdout + result.stderr
    assert (result.returncode == 0) == (ci == "")
