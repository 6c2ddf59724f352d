"""The fleet budget's pure policy (pgwarden.core.fleet) and its settings."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pgwarden.core.fleet import (
    APPLICATION_NAME_MAX,
    FleetPolicy,
    FleetSample,
    fair_shares,
    member_name,
    member_of,
    member_pattern,
    newcomer_headroom,
    plan_fleet,
    resolve_budget,
    rotation_step,
)
from pgwarden.errors import SettingsError
from pgwarden.settings import Settings


# --- identity ---------------------------------------------------------------------------------
def test_member_name_round_trips_and_keeps_the_users_name_as_prefix() -> None:
    assert member_name("pgwarden", "default", "0a1b2c3d") == "pgwarden:default:0a1b2c3d"
    name = member_name("billing-api", "web", "0a1b2c3d")
    assert name == "billing-api pgwarden:web:0a1b2c3d"
    assert member_of(name, "web") == "0a1b2c3d"
    assert member_of(name, "default") is None
    assert member_of("psql", "web") is None
    assert member_of(None, "web") is None
    assert member_of("xpgwarden:web:0a1b2c3d", "web") is None  # not at a word boundary


def test_member_name_fits_postgres_63_bytes_and_keeps_the_mark() -> None:
    long_prefix = "é" * 60  # two bytes each: cutting must not split one
    name = member_name(long_prefix, "a" * 20, "0a1b2c3d")
    assert len(name.encode()) <= APPLICATION_NAME_MAX
    assert member_of(name, "a" * 20) == "0a1b2c3d"
    name.encode().decode()  # valid UTF-8


def test_member_pattern_escapes_like_wildcards() -> None:
    assert member_pattern("my_app") == "%pgwarden:my\\_app:%"


# --- budget -----------------------------------------------------------------------------------
def test_resolve_budget_server_role_and_integer() -> None:
    assert resolve_budget(12, role_limit=None, max_connections=100, reserved=3) == (
        12,
        "fleet_budget=12",
    )
    budget, why = resolve_budget("server", role_limit=None, max_connections=20, reserved=3)
    assert (budget, why) == (17, "max_connections=20 less 3 reserved")
    budget, why = resolve_budget(
        "server", role_limit=None, max_connections=20, reserved=3, others_server=2
    )
    assert budget == 15
    assert "2 connection(s) outside the fleet" in why
    budget, why = resolve_budget("role", role_limit=8, max_connections=100, reserved=3)
    assert budget == 8
    assert "CONNECTION LIMIT 8" in why
    budget, why = resolve_budget("role", role_limit=-1, max_connections=20, reserved=3)
    assert budget == 17
    assert why.startswith("the role has no CONNECTION LIMIT")
    budget, why = resolve_budget("role", role_limit=50, max_connections=20, reserved=3)
    assert budget == 17
    assert "capped by the server" in why


def test_headroom_is_a_tenth_at_least_one_never_all() -> None:
    assert [newcomer_headroom(b) for b in (1, 2, 8, 17, 100)] == [0, 1, 1, 2, 10]


# --- shares -----------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2, 8, 17, 100])
@pytest.mark.parametrize("n", [1, 3, 7, 15, 30, 250])
def test_shares_never_exceed_capacity_and_everyone_has_one_when_it_fits(
    budget: int, n: int
) -> None:
    capacity = budget - newcomer_headroom(budget)
    members = [f"{i:08x}" for i in range(n)]
    for turn in range(5):
        shares = fair_shares(budget, members, max_size=1000, turn=turn)
        assert sum(shares.values()) <= capacity
        if n <= capacity:
            assert sum(shares.values()) == capacity
            assert max(shares.values()) - min(shares.values()) <= 1
        else:
            assert sorted(set(shares.values())) == [0, 1]


def test_shares_rotate_so_everyone_gets_equal_turns_over_a_cycle() -> None:
    members = [f"{i:08x}" for i in range(30)]
    held: Counter[str] = Counter()
    capacity = 17 - newcomer_headroom(17)
    cycle = 30 // math.gcd(30, rotation_step(30, capacity))
    for turn in range(cycle):
        for member, share in fair_shares(17, members, max_size=4, turn=turn).items():
            held[member] += share
    assert max(held.values()) - min(held.values()) <= 1


@pytest.mark.parametrize("n", [16, 22, 30, 38, 45])
def test_nobody_is_off_three_turns_running_while_at_most_three_times_capacity(n: int) -> None:
    members = [f"{i:08x}" for i in range(n)]  # capacity 15
    for turn in range(40):
        runs = [fair_shares(17, members, max_size=4, turn=turn + k) for k in range(3)]
        assert all(any(r[m] for r in runs) for m in members)


def test_who_is_on_together_changes_from_turn_to_turn() -> None:
    # Exactly twice the capacity: a window moving by the whole capacity would split the
    # fleet into two halves that never hold connections at once (and never see each other).
    members = [f"{i:08x}" for i in range(30)]
    met: set[frozenset[str]] = set()
    for turn in range(30):
        on = [m for m, share in fair_shares(17, members, max_size=4, turn=turn).items() if share]
        met |= {frozenset((a, b)) for a in on for b in on if a < b}
    # Not all: no window of 15 holds two ranks 15 apart. A window moving by 15 would
    # give each member the same 14 companions for ever.
    for member in members:
        assert sum(1 for pair in met if member in pair) >= 25


def test_shares_respect_max_size_and_ignore_input_order() -> None:
    assert fair_shares(100, ["b" * 8, "a" * 8], max_size=4) == {"a" * 8: 4, "b" * 8: 4}
    one = fair_shares(17, ["c", "a", "b"], max_size=10, turn=3)
    two = fair_shares(17, ["a", "b", "c"], max_size=10, turn=3)
    assert one == two


# --- the stateful policy ----------------------------------------------------------------------
def _sample(members: dict[str, int], max_connections: int = 20) -> FleetSample:
    return FleetSample(
        members=members,
        others_server=0,
        others_role=0,
        role_limit=-1,
        max_connections=max_connections,
        reserved=3,
    )


def test_policy_caps_a_newcomer_at_one_until_its_first_sample() -> None:
    policy = FleetPolicy(instance_id="0000000a", source="server", max_size=10, interval=1.0)
    assert policy.cap(0.0) == 1
    policy.observe(0.0, _sample({"0000000a": 1, "0000000b": 5}))
    assert policy.budget == 17
    assert policy.cap(0.0) in (7, 8)  # capacity 15 over two


def test_policy_forgets_a_vanished_peer_after_its_ttl() -> None:
    policy = FleetPolicy(instance_id="0000000a", source="server", max_size=10, interval=1.0)
    policy.observe(0.0, _sample({"0000000a": 1, "0000000b": 1, "0000000c": 1}))
    policy.observe(1.0, _sample({"0000000a": 1, "0000000b": 1}))
    assert policy.snapshot(1.0)["instances"] == 3  # it may be between two turns
    ttl = policy.away_ttl(17, 3)
    assert ttl <= 1.5  # the fleet fits: one turn and one sample interval
    policy.observe(1.0 + ttl + 0.01, _sample({"0000000a": 1, "0000000b": 1}))
    assert policy.snapshot(1.0 + ttl + 0.01)["instances"] == 2


def test_policy_remembers_rotated_out_peers_for_their_wait_then_forgets() -> None:
    policy = FleetPolicy(instance_id="00000000", source="server", max_size=10, interval=1.0)
    everyone = {f"{i:08x}": 1 for i in range(30)}
    policy.observe(0.0, _sample(everyone))
    present = {m: 1 for m, s in policy.shares(1.0).items() if s}
    present["00000000"] = 1
    policy.observe(1.0, _sample(present))
    assert policy.snapshot(1.0)["instances"] == 30  # the absent are waiting for their turn
    ttl = policy.away_ttl(17, 30)
    later = 1.0 + ttl + 0.1
    policy.observe(later, _sample({"00000000": 1}))
    # The first absent are forgotten; those that vanished now wait out their own ttl.
    assert policy.snapshot(later)["instances"] == len(present)
    last = later + policy.away_ttl(17, 30) + 0.1
    policy.observe(last, _sample({"00000000": 1}))
    assert policy.snapshot(last)["instances"] == 1


def test_policy_next_on_finds_the_next_turn_from_the_last_view() -> None:
    policy = FleetPolicy(instance_id="00000000", source="server", max_size=10, interval=1.0)
    policy.observe(0.0, _sample({f"{i:08x}": 1 for i in range(30)}))
    for wall in (0.5, 1.5, 2.5):
        on = policy.next_on(wall)
        assert on is not None
        assert on - wall <= 2 * policy.turn_length + 0.1
        assert policy.cap(on) == 1


def test_sample_from_row_parses_members_of_this_fleet_only() -> None:
    row = {
        "members": {"api pgwarden:web:0a1b2c3d": 3, "pgwarden:other:0a1b2c3e": 2},
        "others_server": 4,
        "others_role": 1,
        "role_limit": -1,
        "max_connections": 100,
        "reserved": 3,
    }
    sample = FleetSample.from_row(row, "web")
    assert sample.members == {"0a1b2c3d": 3}
    assert (sample.others_server, sample.max_connections, sample.reserved) == (4, 100, 3)


# --- the plan (pgwarden check --instances) ----------------------------------------------------
def test_plan_fleet_explains_budget_and_shares() -> None:
    plan = plan_fleet("server", None, 100, 3, 10, 10)
    assert plan.budget == 97
    assert plan.headroom == 10
    assert plan.per_instance == (8, 9)
    assert sum(plan.shares) == 87
    assert "max_connections=100 less 3 reserved" in plan.why
    assert "max_size 8 or 9 each" in plan.why
    role = plan_fleet("role", 8, 100, 3, 30, 10)
    assert role.budget == 8
    assert role.per_instance == (0, 1)
    assert "in turn" in role.why
    capped = plan_fleet(500, None, 1000, 3, 2, 10)
    assert capped.per_instance == (10, 10)
    assert "caps the share" in capped.why
    with pytest.raises(ValueError):
        plan_fleet("server", None, 100, 3, 0, 10)


# --- settings ---------------------------------------------------------------------------------
def test_fleet_settings_validate_and_parse_from_env() -> None:
    assert Settings.from_env({"PGWARDEN_FLEET_BUDGET": "role"}).fleet_budget == "role"
    assert Settings.from_env({"PGWARDEN_FLEET_BUDGET": "12"}).fleet_budget == 12
    assert Settings.from_env({"PGWARDEN_FLEET_BUDGET": "none"}).fleet_budget is None
    for bad in (
        {"fleet_budget": 0},
        {"fleet_budget": "all"},
        {"fleet_tag": "a:b"},
        {"fleet_tag": ""},
        {"fleet_interval": 0},
    ):
        with pytest.raises(SettingsError):
            Settings(**bad)
