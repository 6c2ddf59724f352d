"""The dashboard in headless Chromium (Debian ``chromium``) against a real server under load.

The page must load, poll ``stats.json``, and draw every chart from real data; the DOM that
Chromium dumps after running the page's scripts is checked for that, and a screenshot is
saved in the test's tmp dir and copied to ``docs/dashboard.png``.  Skipped when Chromium is
not installed, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pgwarden.testing.plugin import unavailable

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
    "--window-size=1280,900",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
WARM_UP = 8.0  # seconds of load before the page opens: history, and the first pool burst


def chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("chromium is not installed (Debian: apt-get install chromium)")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def attr(dom: str, element_id: str, name: str) -> str:
    match = re.search(rf'<[^>]*\bid="{element_id}"[^>]*>', dom)
    assert match, f"no element #{element_id}"
    value = re.search(rf'\b{name}="([^"]*)"', match.group(0))
    assert value, f"#{element_id} has no {name}"
    return value.group(1)


def body_attr(dom: str, name: str) -> str:
    body = re.search(r"<body[^>]*>", dom)
    assert body, "no <body>"
    value = re.search(rf'\b{name}="([^"]*)"', body.group(0))
    assert value, f"<body> has no {name}"
    return value.group(1)


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id}"
    return match.group(1)


@pytest.mark.slow
def test_dashboard_renders_live_charts_in_chromium(pg_server: Any, tmp_path: Path) -> None:
    binary = chromium()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGWARDEN_URL")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgwarden.cli.main",
            "dashboard",
            pg_server.url,
            "--port",
            "0",
            "--load",
            "--duration",
            "90",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()))
        reader.start()
        reader.join(30)
        match = re.search(r"http://127\.0\.0\.1:\d+/", lines[0] if lines else "")
        assert match, f"no address printed: {lines}"
        url = match.group(0)
        time.sleep(WARM_UP)

        shot = tmp_path / "dashboard.png"
        result = run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}", url)
        assert shot.exists(), result.stderr[-2000:]
        png = shot.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 30_000  # a blank page compresses to a few kilobytes
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)

        result = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
        dom = result.stdout
        (tmp_path / "dom.html").write_text(dom)
        assert "<svg" in dom, result.stderr[-2000:]
        assert body_attr(dom, "data-status") == "live"
        refreshes = int(body_attr(dom, "data-refreshes"))
        points = int(body_attr(dom, "data-points"))
        assert refreshes >= 2
        assert points >= WARM_UP - 2  # the server-side history came with the first poll
        for chart in ("chart-pool", "chart-latency", "chart-throughput", "chart-errors"):
            assert int(attr(dom, chart, "data-points")) == points
        series = dict(re.findall(r'data-series="([a-z0-9_]+)" data-n="(\d+)"', dom))
        for key in ("in_use", "idle", "max", "q50", "q99", "a99", "qps", "eps", "rps"):
            assert int(series[key]) >= points - 2, (key, series)
        in_use_path = re.search(
            r'data-series="in_use" data-n="\d+" stroke="[^"]+" d="([^"]+)"', dom
        )
        assert in_use_path
        assert in_use_path.group(1).count("L") >= points - 2
        assert float(text_of(dom, "v-qps")) > 5  # --load runs ~40 statements per second
        assert text_of(dom, "v-p99").endswith(("ms", "s"))
        assert re.fullmatch(r"\d+ / \d+", text_of(dom, "v-in-use"))
        assert text_of(dom, "v-state") == "ready"
        assert text_of(dom, "v-breaker") == "breaker closed"
        assert dom.count('class="ev"') >= 1  # the warmup event, at least
        # the counter table's rows come from the metric catalog (COUNTER_ROWS)
        assert "<td>queries</td>" in dom
        assert "<td>warmups: ok</td>" in dom
        assert "<td>connections opened</td>" in dom
        assert pg_server.password not in dom

        stats = json.loads(urllib.request.urlopen(url + "stats.json", timeout=5).read())  # noqa: S310
        assert stats["stats"]["counters"]["queries"] > 100
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]
    assert pg_server.password not in out + err
