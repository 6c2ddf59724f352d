"""pgwarden.core.commit: what the server says about a COMMIT whose connection was lost (pure).

Two kinds of test: a table of hand-picked answers, and a model of what can happen between
the marker (read before COMMIT) and the answer (no restart, a clean restart, a crash
restart, a postmaster's own crash-restart that keeps its start time, statistics reset by
hand, an id handed out again, later checkpoints, commit timestamps), from which
hypothesis draws histories and the server's answers they imply: no verdict may be wrong,
and where the module says a proof exists, it must decide.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.core import commit as commit_module
from pgwarden.core.commit import (
    RESOLVE_POLL_SECONDS,
    Checkpoint,
    CommitOutcome,
    Marker,
    ServerView,
    Verdict,
    commit_outcome,
    full_xid,
    lost_commit_verdict,
    next_xid_bound,
    recovery_next_xid,
    restarted_since,
    timeline_of_wal_file,
)

C = CommitOutcome
BASE = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


# The marker's run: postmaster started at 0, statistics reset at 1 (its crash recovery),
# WAL writer at 2; the marker itself is read at 100. A restart happens at 300.
X = 1000  # our transaction's id
MARKER = Marker(X, at(0), at(1))
START = Checkpoint(next_xid=X + 5, oldest_active_xid=0, timeline=1)  # a run's first
ONLINE = Checkpoint(next_xid=X + 9, oldest_active_xid=X + 2, timeline=1)  # a later one


def same_run(status: str | None, xmax: int = X + 10, **kw: object) -> ServerView:
    fields: dict[str, object] = {
        "in_recovery": False,
        "started": at(0),
        "stats_reset": at(1),
        "xmax": xmax,
        "status": status,
        "walwriter_started": at(2),
        "wal_level": "replica",
        "timeline": 1,
        "checkpoint": ONLINE,
    }
    fields.update(kw)
    return ServerView(**fields)  # type: ignore[arg-type]


def crash_restart(status: str | None, xmax: int = X + 10, **kw: object) -> ServerView:
    """A new postmaster that recovered from a crash (statistics reset at 301)."""
    fields: dict[str, object] = {
        "started": at(300),
        "stats_reset": at(301),
        "walwriter_started": at(302),
        "checkpoint": START,
    }
    fields.update(kw)
    return same_run(status, xmax, **fields)


def reinit(status: str | None, xmax: int = X + 10, **kw: object) -> ServerView:
    """The postmaster's own crash-restart: same start time, statistics reset at 301."""
    return crash_restart(status, xmax, started=at(0), **kw)


TABLE: list[tuple[str, ServerView, CommitOutcome]] = [
    # --- the same run: the status is the truth
    ("same run, committed", same_run("committed"), C.COMMITTED),
    ("same run, aborted", same_run("aborted"), C.ABORTED),
    ("same run, in progress", same_run("in progress"), C.IN_PROGRESS),
    ("same run, not finished yet (above xmax)", same_run(None, xmax=X), C.IN_PROGRESS),
    ("same run, too old to tell", same_run(None), C.UNKNOWN),
    ("same run, an answer in another case", same_run("COMMITTED"), C.UNKNOWN),
    ("same run, a status above xmax is ignored", same_run("committed", xmax=X), C.IN_PROGRESS),
    (
        "same run, a later start checkpoint is no reason to doubt",
        same_run("committed", checkpoint=START),
        C.COMMITTED,
    ),
    # --- a standby says nothing about the primary
    ("standby", same_run("committed", in_recovery=True), C.IN_PROGRESS),
    ("standby after a restart", crash_restart("aborted", in_recovery=True), C.IN_PROGRESS),
    # --- a crash restart (new postmaster), the latest checkpoint the run's first
    ("below N, committed: ours", crash_restart("committed"), C.COMMITTED),
    ("below N, aborted", crash_restart("aborted"), C.ABORTED),
    (
        "at N, committed: someone else's",
        crash_restart("committed", checkpoint=replace(START, next_xid=X)),
        C.ABORTED,
    ),
    (
        "above N, not handed out again yet",
        crash_restart(None, xmax=X - 3, checkpoint=replace(START, next_xid=X - 3)),
        C.ABORTED,
    ),
    (
        "above N, handed out again, in progress",
        crash_restart("in progress", checkpoint=replace(START, next_xid=X - 3)),
        C.ABORTED,
    ),
    ("below N, too old", crash_restart(None), C.UNKNOWN),
    # --- a crash restart, proof weaker
    (
        "minimal: N not provable, committed",
        crash_restart("committed", wal_level="minimal"),
        C.UNKNOWN,
    ),
    (
        "minimal: at or above the bound",
        crash_restart("committed", wal_level="minimal", checkpoint=replace(START, next_xid=X)),
        C.ABORTED,
    ),
    (
        "a later online checkpoint: only a bound",
        crash_restart("committed", checkpoint=ONLINE),
        C.UNKNOWN,
    ),
    (
        "at or above an online checkpoint's next id",
        crash_restart("committed", checkpoint=replace(ONLINE, next_xid=X)),
        C.ABORTED,
    ),
    ("checkpoint unreadable", crash_restart("committed", checkpoint=None), C.UNKNOWN),
    (
        "checkpoint unreadable, not finished",
        crash_restart(None, xmax=X, checkpoint=None),
        C.ABORTED,
    ),
    ("checkpoint unreadable, aborted", crash_restart("aborted", checkpoint=None), C.ABORTED),
    (
        "another timeline's checkpoint proves nothing",
        crash_restart("committed", timeline=2),
        C.UNKNOWN,
    ),
    (
        "another timeline's low next id proves nothing",
        crash_restart("committed", timeline=2, checkpoint=replace(START, next_xid=X - 50)),
        C.UNKNOWN,
    ),
    ("timeline unknown", crash_restart("committed", timeline=None), C.UNKNOWN),
    (
        "commit timestamp before the run began",
        crash_restart("committed", checkpoint=None, committed_at=at(150)),
        C.COMMITTED,
    ),
    (
        "commit timestamp after the run began",
        crash_restart("committed", checkpoint=None, committed_at=at(310)),
        C.UNKNOWN,
    ),
    (
        "commit timestamp at the very start",
        crash_restart("committed", checkpoint=None, committed_at=at(300)),
        C.UNKNOWN,
    ),
    # --- the postmaster's own crash-restart (start time unchanged)
    ("reinit, below N: ours", reinit("committed"), C.COMMITTED),
    (
        "reinit, at N: someone else's",
        reinit("committed", checkpoint=replace(START, next_xid=X)),
        C.ABORTED,
    ),
    (
        "reinit, WAL writer hidden, below N: still ours",
        reinit("committed", walwriter_started=None),
        C.COMMITTED,
    ),
    (
        "reinit, WAL writer hidden, at N: restart unproven",
        reinit("committed", walwriter_started=None, checkpoint=replace(START, next_xid=X)),
        C.UNKNOWN,
    ),
    (
        "reinit, WAL writer hidden, not finished: wait",
        reinit(None, xmax=X, walwriter_started=None, checkpoint=None),
        C.IN_PROGRESS,
    ),
    (
        "reinit, commit timestamp before the recovery",
        reinit("committed", checkpoint=None, committed_at=at(150)),
        C.COMMITTED,
    ),
    (
        "reinit, commit timestamp after it",
        reinit("committed", checkpoint=None, committed_at=at(305)),
        C.UNKNOWN,
    ),
    # --- statistics reset by hand (after normal running began): no restart proven
    ("reset by hand, committed", same_run("committed", stats_reset=at(200)), C.UNKNOWN),
    ("reset by hand, aborted", same_run("aborted", stats_reset=at(200)), C.ABORTED),
    ("reset by hand, in progress", same_run("in progress", stats_reset=at(200)), C.IN_PROGRESS),
    (
        "reset by hand, commit timestamp proves nothing",
        same_run("committed", stats_reset=at(200), committed_at=at(101)),
        C.UNKNOWN,
    ),
    ("no reset time now", same_run("committed", stats_reset=None), C.UNKNOWN),
]


@pytest.mark.parametrize(("view", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_commit_outcome_table(view: ServerView, expected: CommitOutcome) -> None:
    assert commit_outcome(MARKER, view) is expected


def test_no_reset_time_in_the_marker_proves_no_run() -> None:
    marker = MARKER._replace(stats_reset=None)
    assert commit_outcome(marker, same_run("committed")) is C.UNKNOWN
    assert commit_outcome(marker, same_run("aborted")) is C.ABORTED
    assert commit_outcome(marker, crash_restart("committed")) is C.COMMITTED


def test_times_compare_by_value_not_identity() -> None:
    elsewhere = timezone(timedelta(hours=2))
    view = same_run("committed", started=at(0).astimezone(elsewhere))
    assert view.started is not MARKER.started
    assert commit_outcome(MARKER, view) is C.COMMITTED


def test_a_transaction_without_an_id_is_not_asked_about() -> None:
    with pytest.raises(ValueError, match="nothing to resolve"):
        commit_outcome(MARKER._replace(txid=None), same_run("committed"))


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (same_run(None), False),
        (crash_restart(None), True),
        (reinit(None), True),
        (reinit(None, walwriter_started=None), None),
        (same_run(None, stats_reset=at(200)), None),  # after the WAL writer: by hand
        (same_run(None, stats_reset=None), None),
        (crash_restart(None, stats_reset=at(1)), True),  # a clean restart keeps the statistics
    ],
)
def test_restarted_since(view: ServerView, expected: bool | None) -> None:
    assert restarted_since(MARKER, view) is expected


@pytest.mark.parametrize(
    ("view", "bound", "recovered"),
    [
        (crash_restart(None), START.next_xid, START.next_xid),
        (crash_restart(None, wal_level="logical"), START.next_xid, START.next_xid),
        (crash_restart(None, wal_level="minimal"), START.next_xid, None),
        (crash_restart(None, wal_level=None), START.next_xid, None),
        (crash_restart(None, checkpoint=ONLINE), ONLINE.next_xid, None),
        (crash_restart(None, timeline=2), None, None),
        (crash_restart(None, timeline=None), None, None),
        (crash_restart(None, checkpoint=None), None, None),
        (crash_restart(None, in_recovery=True), None, None),
    ],
)
def test_checkpoint_bounds(view: ServerView, bound: int | None, recovered: int | None) -> None:
    assert next_xid_bound(view) == bound
    assert recovery_next_xid(view) == recovered


@pytest.mark.parametrize(
    ("text", "value"),
    [("0:727", 727), ("1:5", (1 << 32) + 5), ("3:4294967295", (4 << 32) - 1), ("727", 727)],
)
def test_full_xid(text: str, value: int) -> None:
    assert full_xid(text) == value


def test_timeline_of_wal_file() -> None:
    assert timeline_of_wal_file("000000010000000000000006") == 1
    assert timeline_of_wal_file("0000001A000000020000003F") == 26


# --- the model: histories and the answers they imply --------------------------------------


@dataclass(frozen=True)
class History:
    """What really happened, and what the server answers after it."""

    kind: str
    ours_committed: bool
    view: ServerView
    restart_proven: bool  # what the module claims it can prove from this view
    start_checkpoint: bool  # the latest checkpoint is the run's first (next id N)
    below_n: bool  # our id is below N


KINDS = ["none", "clean", "crash", "reinit"]


@st.composite
def histories(draw: st.DrawFn) -> History:
    kind = draw(st.sampled_from(KINDS))
    wal_level = draw(st.sampled_from(["replica", "logical", "minimal", None]))
    walwriter_visible = draw(st.booleans())
    reset_by_hand = draw(st.booleans())
    track_commit_timestamp = draw(st.booleans())
    readable = draw(st.integers(0, 9)) > 0  # pg_control_checkpoint() granted
    timeline_moved = draw(st.integers(0, 9)) == 0  # the checkpoint of another timeline
    standby = draw(st.integers(0, 19)) == 0

    reused_state = None  # what a new transaction given our id is doing
    if kind == "none":
        ours = draw(st.sampled_from(["committed", "aborted", "in progress"]))
        n = draw(st.integers(X - 500, X))  # the run began before our id was assigned
        started, reset, walwriter = at(0), at(1), at(2)
        if ours == "in progress":
            xmax = draw(st.integers(n, X + 30))
        else:
            xmax = draw(st.integers(X + 1, X + 30))
        status = ours if xmax > X else None
        committed_at = at(101) if ours == "committed" else None
        ours_committed = ours == "committed"
        assigned_top = xmax + 30
    else:
        if kind == "clean":
            # A clean shutdown loses nothing: the next id is past ours.
            ours_committed = draw(st.booleans())
            n = draw(st.integers(X + 1, X + 50))
            started, reset, walwriter = at(300), at(1), at(302)  # statistics kept
        else:
            # Committed (so durable), some record durable but no commit, or nothing durable.
            fate = draw(st.sampled_from(["committed", "records only", "lost"]))
            ours_committed = fate == "committed"
            n = draw(st.integers(X - 50, X) if fate == "lost" else st.integers(X + 1, X + 50))
            started = at(300) if kind == "crash" else at(0)
            reset, walwriter = at(301), at(302)
        if n > X:
            xmax = draw(st.integers(n, n + 50))
            status = "committed" if ours_committed else "aborted"
            committed_at = at(150) if ours_committed else None
            assigned_top = xmax + 30
        else:
            reused_state = draw(
                st.sampled_from(["unassigned", "in progress", "committed", "aborted"])
            )
            if reused_state == "unassigned":
                xmax = draw(st.integers(n, X))
                assigned_top = X  # no id at or above ours has been handed out
            elif reused_state == "in progress":
                xmax = draw(st.integers(n, X + 30))
                assigned_top = max(xmax, X + 1) + 30
            else:
                xmax = draw(st.integers(X + 1, X + 50))
                assigned_top = xmax + 30
            status = reused_state if xmax > X and reused_state != "unassigned" else None
            committed_at = at(310) if reused_state == "committed" else None
    if reset_by_hand:
        reset = at(400)  # after normal running began
    if not track_commit_timestamp or status != "committed":
        committed_at = None

    start_checkpoint = draw(st.booleans())
    if start_checkpoint:
        checkpoint = Checkpoint(next_xid=n, oldest_active_xid=0, timeline=1)
    else:
        next_xid = draw(st.integers(n, assigned_top))
        oldest = 0 if wal_level in ("minimal", None) else draw(st.integers(3, next_xid))
        checkpoint = Checkpoint(next_xid=next_xid, oldest_active_xid=oldest, timeline=1)
    if timeline_moved:  # a restartpoint from before a promotion: anything goes
        checkpoint = Checkpoint(
            next_xid=draw(st.integers(X - 100, X + 100)),
            oldest_active_xid=draw(st.sampled_from([0, 5])),
            timeline=1,
        )
    view = ServerView(
        in_recovery=standby,
        started=started,
        stats_reset=reset,
        xmax=xmax,
        status=status,
        committed_at=committed_at,
        walwriter_started=walwriter if walwriter_visible else None,
        wal_level=wal_level,
        timeline=2 if timeline_moved else 1,
        checkpoint=checkpoint if readable else None,
    )
    proven = kind in ("clean", "crash") or (
        kind == "reinit" and walwriter_visible and not reset_by_hand
    )
    exact = (
        start_checkpoint
        and readable
        and not timeline_moved
        and not standby
        and wal_level in ("replica", "logical")
    )
    return History(kind, ours_committed, view, proven, exact, n > X)


# Each example costs well under a millisecond; many make the rare paths (an id handed out
# again after a crash-restart that kept its start time) come up in every run.
MANY = settings(max_examples=2000)


@MANY
@given(histories())
def test_no_verdict_is_ever_wrong(history: History) -> None:
    """COMMITTED only if ours committed; ABORTED only if it did not (a wrong ABORTED
    re-runs a committed unit of work, a wrong COMMITTED loses an acknowledged one)."""
    outcome = commit_outcome(MARKER, history.view)
    if outcome is C.COMMITTED:
        assert history.ours_committed
    if outcome is C.ABORTED:
        assert not history.ours_committed


@MANY
@given(histories())
def test_the_proofs_decide(history: History) -> None:
    """Where the module claims a proof, the answer is final."""
    view = history.view
    outcome = commit_outcome(MARKER, view)
    if view.in_recovery:
        assert outcome is C.IN_PROGRESS
        return
    truth = C.COMMITTED if history.ours_committed else C.ABORTED
    if history.kind == "none" and view.stats_reset == MARKER.stats_reset and view.status:
        assert outcome is C.IN_PROGRESS if view.status == "in progress" else truth
    if (
        history.kind != "none"
        and history.start_checkpoint
        and (history.below_n or history.restart_proven)
    ):
        assert outcome is truth
    if history.kind != "none" and view.status == "aborted":
        assert outcome is C.ABORTED
    if history.restart_proven and not history.below_n and history.kind != "none":
        bound = next_xid_bound(view)
        if view.xmax <= X or (bound is not None and bound <= X):
            assert outcome is C.ABORTED
    if history.restart_proven and history.ours_committed and view.committed_at is not None:
        assert outcome is C.COMMITTED


def test_the_model_covers_every_outcome() -> None:
    """The drawn histories reach every outcome (else the properties above prove little)."""
    seen: set[CommitOutcome] = set()

    @given(histories())
    def collect(history: History) -> None:
        seen.add(commit_outcome(MARKER, history.view))

    collect()
    assert seen == set(CommitOutcome)


# --- the verdict ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolve", "marker", "outcome", "expected"),
    [
        (
            resolve,
            marker,
            outcome,
            Verdict.UNKNOWN
            if not resolve
            else Verdict.COMMITTED
            if marker is None or marker.txid is None
            else Verdict.ASK
            if outcome is None
            else {C.COMMITTED: Verdict.COMMITTED, C.ABORTED: Verdict.ABORTED}.get(
                outcome, Verdict.UNKNOWN
            ),
        )
        for resolve, marker, outcome in itertools.product(
            [True, False], [None, MARKER._replace(txid=None), MARKER], [None, *CommitOutcome]
        )
    ],
)
def test_lost_commit_verdict(
    resolve: bool, marker: Marker | None, outcome: CommitOutcome | None, expected: Verdict
) -> None:
    assert lost_commit_verdict(resolve=resolve, marker=marker, outcome=outcome) is expected


def test_verdict_values_are_the_metric_labels() -> None:
    labels = {v.value for v in Verdict if v is not Verdict.ASK}
    assert labels == {"committed", "aborted", "unknown"}
    assert labels <= {o.value for o in CommitOutcome}


def test_every_outcome_is_documented() -> None:
    doc = commit_module.__doc__ or ""
    for outcome in (C.COMMITTED, C.ABORTED, C.UNKNOWN):
        assert outcome.name in doc, outcome


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
