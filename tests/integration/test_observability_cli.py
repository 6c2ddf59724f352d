"""``pgwarden dashboard`` as a subprocess against a real server, and chained to another
dashboard's stats endpoint (``--stats-url``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pgwarden.cli.main import main

CLI = [sys.executable, "-m", "pgwarden.cli.main", "dashboard"]


def child_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "PGWARDEN_URL", "PGPASSWORD")
    }


class Dashboard:
    def __init__(self, proc: subprocess.Popen[str], url: str, banner: str) -> None:
        self.proc = proc
        self.url = url
        self.banner = banner
        self.output: tuple[str, str] | None = None

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        """Send *sig* (Ctrl-C by default), wait, and return (exit code, stdout, stderr)."""
        if self.output is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.output = self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output = self.proc.communicate()
        return self.proc.returncode, *self.output

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:  # noqa: S310
            body: bytes = response.read()
        return body.decode()

    def stats(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.get("stats.json"))
        return payload


@contextmanager
def dashboard(*args: str) -> Iterator[Dashboard]:
    """Start ``pgwarden dashboard ARGS --port 0`` and wait for its banner line."""
    proc = subprocess.Popen(
        [*CLI, *args, "--port", "0", "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()))
    reader.start()
    reader.join(30)
    match = re.search(r"http://127\.0\.0\.1:\d+/", lines[0]) if lines else None
    board = Dashboard(proc, match.group(0) if match else "", lines[0] if lines else "")
    try:
        assert match, f"the dashboard printed no address: {lines}"
        yield board
    finally:
        board.stop()


def test_dashboard_cli_serves_a_database_and_chains_to_its_stats(pg_server: Any) -> None:
    with dashboard(pg_server.url, "--load", "--load-rate", "100") as first:
        assert "postgresql://postgres:***@" in first.banner
        assert pg_server.password not in first.banner
        time.sleep(2.5)
        stats = first.stats()
        assert stats["source"] == "handle"
        assert stats["name"] == "pgwarden-dashboard"
        assert stats["stats"]["counters"]["queries"] >= 50
        assert stats["stats"]["state"] == "ready"
        with dashboard("--stats-url", first.url + "stats.json") as second:
            chained = second.stats()
            assert chained["source"] == "url"
            assert chained["error"] is None
            assert chained["stats"]["counters"]["queries"] >= 50
            assert [e["event"] for e in chained["events"]][:1] == ["warmup"]
            assert "<svg" in second.get("")
            assert pg_server.password not in json.dumps(chained)
            code, _, err = second.stop()  # Ctrl-C
            assert code == 0
            assert "Traceback" not in err
        history = json.loads(first.get("stats.json?history=1"))["history"]
        assert len(history) >= 2  # sampled in the background, once a second
        code, out, err = first.stop(signal.SIGTERM)
        assert code == 0
        assert "Traceback" not in err
        assert pg_server.password not in out + err


def test_dashboard_cli_usage_errors(capsys: Any) -> None:
    assert main(["dashboard", "--port", "70000"]) == 2
    assert main(["dashboard", "http://x/stats.json", "--stats-url", "http://y/"]) == 2
    assert main(["dashboard", "--stats-url", "ftp://x/"]) == 2
    assert main(["dashboard", "--load-rate", "99999"]) == 2
    err = capsys.readouterr().err
    assert "must be between 0 and 65535" in err
    assert "not both" in err
