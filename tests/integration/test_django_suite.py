"""Django's own test suite with ``ENGINE: "pgwarden.django"`` against a throwaway server.

Django's tests are not in its wheel, so its source distribution (the installed version)
is fetched once with pip and its ``tests/`` kept in ``tests/django_suite/.cache``
(ignored by git). ``runtests.py`` runs the apps below in a subprocess with
``tests/django_suite/pgwarden_settings.py``, ``--parallel=1``. It must pass, run at least
as many tests as measured, and skip only what Django skips on its own PostgreSQL backend
(features of other databases, optional packages) plus the tests of what pgwarden
replaces (``pgwarden_runner.SKIPS``, each with its reason; docs/django.md lists them).
Measured on Django 5.2.19 and PostgreSQL 15: 2,253 tests, 187 skipped (8 of them
pgwarden's), 18-30 s; Django's own backend passes the same tests. Django 5.1 and 5.1.15
(by hand, in venvs of their own): 2,201 and 2,207 tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

django = pytest.importorskip("django")

SUITE_DIR = Path(__file__).resolve().parent.parent / "django_suite"
CACHE_DIR = SUITE_DIR / ".cache"

#: The apps the issue names, plus two that exercise what the backend configures on
#: each connection: time zones, and PostgreSQL's own types through Django's adapters.
APPS = (
    "backends",
    "transactions",
    "transaction_hooks",
    "basic",
    "queries",
    "select_for_update",
    "model_fields",
    "timezones",
    "postgres_tests",
)
#: Ran on Django 5.2.19: 2,253. The floor leaves room for a release that drops a few.
RAN_FLOOR = 2000
#: pgwarden_runner.SKIPS: each must match a test and be reported skipped.
PGWARDEN_SKIPS = 8

_RAN = re.compile(r"^Ran (\d+) tests? in ([\d.]+)s$", re.MULTILINE)
_SKIPPED = re.compile(r"\.\.\. skipped (['\"])(.*)\1$", re.MULTILINE)
_FAILED = re.compile(r"^(?:FAIL|ERROR): (\S+ \(\S+\))", re.MULTILINE)


def django_tests_dir() -> Path:
    """``tests/`` of Django's source distribution for the installed version, fetched
    with pip (``--no-binary :all:``: the sdist) the first time."""
    version = django.__version__
    target = CACHE_DIR / f"django-{version}"
    tests = target / "tests"
    if (tests / "runtests.py").is_file():
        return tests
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                f"django=={version}",
            ],
            check=True,
            timeout=300,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            prefix = f"{tar.getmembers()[0].name.split('/')[0]}/tests/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpacked, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(unpacked, members=members)  # noqa: S202 - PyPI's sdist
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked / prefix.rstrip("/")), str(tests))
    return tests


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_djangos_own_suite_passes_on_pgwarden(pg_server_factory: Any) -> None:
    server = pg_server_factory({"max_connections": 100})
    tests = django_tests_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "DATABASE_URL")}
    env["PGWARDEN_TEST_DJANGO_URL"] = server.url
    env["PYTHONPATH"] = os.pathsep.join([str(SUITE_DIR), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"  # Django's suite sets its own warning filters
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "runtests.py",
            "--settings=pgwarden_settings",
            "--parallel=1",
            "--noinput",
            "-v",
            "2",
            *APPS,
        ],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    ran = _RAN.findall(out)
    assert ran, out[-6000:]
    total = int(ran[-1][0])
    reasons = Counter(m[1] for m in _SKIPPED.findall(out))
    ours = sum(n for reason, n in reasons.items() if reason.startswith("pgwarden: "))
    # Shown with -s: the measured figures and Django's own skips, by reason.
    print(f"Django {django.__version__}: ran {total} in {elapsed:.1f}s; skipped {reasons}")
    assert _FAILED.findall(out) == [], out[-8000:]
    assert proc.returncode == 0, out[-8000:]
    assert total >= RAN_FLOOR
    assert "pgwarden skips that matched no test" not in out
    assert ours == PGWARDEN_SKIPS
    others = [r for r in reasons if not r.startswith("pgwarden: ")]
    # Django's own skips: other databases, optional packages, features PostgreSQL lacks.
    allowed = re.compile(
        r"SQLite|Oracle|MySQL|MariaDB|psycopg2|Pillow|Database has feature|Database doesn't "
        r"support feature|requires|Test only for|not installed|PostgreSQL specific|"
        r"PostgreSQL-specific|PostgreSQL tests",
        re.IGNORECASE,
    )
    assert [r for r in others if not allowed.search(r)] == []
