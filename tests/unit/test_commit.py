"""commit_outcome: what txid_status() says about a COMMIT whose connection was lost (pure)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from pgwarden.core import commit as commit_module
from pgwarden.core.commit import RESOLVE_POLL_SECONDS, CommitOutcome, commit_outcome

C = CommitOutcome
BOOT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
REBOOT = BOOT + timedelta(minutes=3)  # a crash restart in between

TABLE: list[tuple[object, object, object, CommitOutcome]] = [
    # status          started_then  started_now  outcome
    ("committed", BOOT, BOOT, C.COMMITTED),
    ("committed", BOOT, REBOOT, C.UNKNOWN),  # the id may have been handed out again
    ("committed", None, BOOT, C.UNKNOWN),
    ("committed", BOOT, None, C.UNKNOWN),
    ("aborted", BOOT, BOOT, C.ABORTED),
    ("aborted", BOOT, REBOOT, C.ABORTED),  # a durable commit keeps its id: aborted is final
    ("aborted", None, None, C.ABORTED),
    ("in progress", BOOT, BOOT, C.IN_PROGRESS),
    ("in progress", BOOT, REBOOT, C.IN_PROGRESS),
    (None, BOOT, BOOT, C.UNKNOWN),  # too old to tell (wrapped around or truncated)
    (None, BOOT, REBOOT, C.UNKNOWN),
    ("", BOOT, BOOT, C.UNKNOWN),
    ("COMMITTED", BOOT, BOOT, C.UNKNOWN),  # the server answers in lower case only
    ("committed ", BOOT, BOOT, C.UNKNOWN),
    ("in_progress", BOOT, BOOT, C.UNKNOWN),
    (b"committed", BOOT, BOOT, C.UNKNOWN),
    (1, BOOT, BOOT, C.UNKNOWN),
]


@pytest.mark.parametrize(("status", "then", "now", "expected"), TABLE)
def test_commit_outcome_table(
    status: object, then: object, now: object, expected: CommitOutcome
) -> None:
    assert commit_outcome(status, then, now) is expected


def test_start_times_compare_by_value_not_identity() -> None:
    same_instant = BOOT.astimezone(timezone(timedelta(hours=2)))
    assert same_instant is not BOOT
    assert commit_outcome("committed", BOOT, same_instant) is C.COMMITTED
    assert commit_outcome("committed", "2024-05-01", "2024-05-01") is C.COMMITTED


def test_every_outcome_is_reachable_and_documented() -> None:
    reached = {expected for *_, expected in TABLE}
    assert reached == set(CommitOutcome)
    doc = commit_module.__doc__ or ""
    for outcome in CommitOutcome:
        assert outcome.name in doc, outcome


def test_outcome_values_are_the_metric_labels() -> None:
    assert {o.value for o in CommitOutcome} == {"committed", "aborted", "in progress", "unknown"}


def test_poll_interval_is_short_and_positive() -> None:
    assert 0 < RESOLVE_POLL_SECONDS <= 1.0


def test_commit_module_imports_only_light_stdlib() -> None:
    code = (
        "import sys; import pgwarden.core; before = set(sys.modules); "
        "import pgwarden.core.commit; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name in out.stdout.split():
        top = name.partition(".")[0]
        assert name.startswith("pgwarden.core.") or top in sys.stdlib_module_names, name
        assert top not in {"asyncio", "threading", "psycopg", "psycopg_pool"}, name
