# WARNING: generated from tests/_async/test_fleet_shell.py by scripts/async_to_sync.py.
# Edit the async file and run `python scripts/async_to_sync.py`.
"""The fleet sampler shell against a real PostgreSQL: two handles of one process are two
instances of one fleet (each handle has its own instance id)."""

from __future__ import annotations

import time
from typing import Any

from pgwarden import Database, Settings
from pgwarden.core.fleet import member_of

from ._compat import gather, run, sleep, spawn

INTERVAL = 0.3


def make(url: str, tag: str, **overrides: Any) -> Database:
    return Database(
        Settings(url=url, fleet_tag=tag, fleet_interval=INTERVAL, max_size=8, **overrides)
    )


def fleet_names(server: Any, tag: str) -> list[str]:
    rows = server.execute(
        "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"%pgwarden:{tag}:%",),
    )
    return [str(r[0]) for r in rows]


def wait_for(predicate: Any, within: float) -> bool:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        if predicate():
            return True
        sleep(0.05)
    return bool(predicate())


def test_connections_carry_the_fleet_mark_and_stats_explain_the_budget(pg_server: Any) -> None:
    def main() -> None:
        with make(pg_server.url, "mark", fleet_budget=6, application_name="api") as db:
            assert db.fetchval("SELECT 1") == 1
            instance = db.stats()["fleet"]["instance"]
            names = fleet_names(pg_server, "mark")
            assert names
            assert all(n.startswith("api ") for n in names)
            assert {member_of(n, "mark") for n in names} == {instance}
            assert wait_for(lambda: db.stats()["fleet"]["samples"] >= 1, 5)
            fleet = db.stats()["fleet"]
            assert fleet["enabled"]
            assert fleet["budget"] == 6
            assert fleet["why"] == "fleet_budget=6"
            assert fleet["instances"] == 1
            assert fleet["cap"] == 5  # one of six left free for a newcomer

    run(main)


def test_a_newcomer_gets_its_share_by_the_other_closing_idle_connections(pg_server: Any) -> None:
    def hold(db: Database) -> None:
        db.fetchval("SELECT 1 FROM pg_sleep(0.3)")

    def main() -> None:
        # Budget 6: five shared. Alone, the first instance may hold five.
        first = make(pg_server.url, "share", fleet_budget=6)
        second = make(pg_server.url, "share", fleet_budget=6)
        try:
            first.fetchval("SELECT 1")
            assert wait_for(lambda: first.stats()["fleet"]["cap"] == 5, 5)
            gather(*[spawn(hold, (first,)) for _ in range(5)])
            assert first.stats()["pool"]["size"] == 5  # all five idle now
            second.fetchval("SELECT 1")
            # The first sees the newcomer at its next sample and closes idle connections
            # down to its share (two or three of five); the newcomer's cap rises to match.
            assert wait_for(lambda: first.stats()["pool"]["size"] <= 3, 5 * INTERVAL)
            assert wait_for(
                lambda: first.stats()["fleet"]["cap"] + second.stats()["fleet"]["cap"] == 5,
                5 * INTERVAL,
            )
            assert len(fleet_names(pg_server, "share")) <= 6
            assert second.stats()["fleet"]["instances"] == 2
        finally:
            first.close()
            second.close()

    run(main)
