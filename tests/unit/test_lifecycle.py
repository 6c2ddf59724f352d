"""The lifecycle state machine: transitions are data, illegal ones raise."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core import lifecycle as lifecycle_module
from pgwarden.core.lifecycle import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    Lifecycle,
    State,
    accepts_work,
    is_serving,
)

S = State
E = Event


def walk(*events: Event) -> Lifecycle:
    machine = Lifecycle()
    for event in events:
        machine.fire(event)
    return machine


def state_of(machine: Lifecycle) -> State:
    # A function call, so that mypy does not narrow the property across calls.
    return machine.state


def test_starts_new() -> None:
    assert Lifecycle().state is S.NEW
    assert repr(Lifecycle()) == "Lifecycle(state=NEW)"


def test_happy_path() -> None:
    machine = Lifecycle()
    assert machine.fire(E.WARMUP_STARTED) is S.WARMING
    assert machine.fire(E.WARMUP_SUCCEEDED) is S.READY
    assert machine.fire(E.FAULT_OBSERVED) is S.DEGRADED
    assert machine.fire(E.RECOVERED) is S.READY
    assert machine.fire(E.CLOSE_REQUESTED) is S.CLOSING
    assert machine.fire(E.CLOSED) is S.CLOSED


def test_failed_warmup_goes_back_to_new_so_the_next_call_warms_again() -> None:
    machine = walk(E.WARMUP_STARTED, E.WARMUP_FAILED)
    assert machine.state is S.NEW
    assert machine.fire(E.WARMUP_STARTED) is S.WARMING


@pytest.mark.parametrize("state", [S.NEW, S.WARMING, S.READY, S.DEGRADED])
def test_open_is_reachable(state: State) -> None:
    machine = Lifecycle(state)
    assert machine.fire(E.BREAKER_OPENED) is S.OPEN
    assert machine.fire(E.BREAKER_OPENED) is S.OPEN  # a failed probe re-opens: no-op


def test_probe_success_goes_to_degraded_then_recovers() -> None:
    machine = Lifecycle(S.OPEN)
    assert machine.fire(E.BREAKER_CLOSED) is S.DEGRADED
    assert accepts_work(machine.state)
    assert is_serving(machine.state)
    assert machine.fire(E.RECOVERED) is S.READY


def test_observations_are_idempotent() -> None:
    machine = Lifecycle(S.READY)
    assert machine.fire(E.RECOVERED) is S.READY
    machine.fire(E.FAULT_OBSERVED)
    assert machine.fire(E.FAULT_OBSERVED) is S.DEGRADED


@pytest.mark.parametrize("state", [s for s in State if s is not S.CLOSED])
def test_every_non_closed_state_can_close(state: State) -> None:
    machine = Lifecycle(state)
    assert machine.fire(E.CLOSE_REQUESTED) is S.CLOSING
    assert machine.fire(E.CLOSE_REQUESTED) is S.CLOSING  # close() twice
    assert machine.fire(E.CLOSED) is S.CLOSED
    assert machine.fire(E.CLOSE_REQUESTED) is S.CLOSED  # and again after it finished


def test_closed_is_terminal() -> None:
    leaving = [new for (old, _), new in TRANSITIONS.items() if old is S.CLOSED]
    assert leaving == [S.CLOSED]


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_pair_is_either_in_the_table_or_illegal(state: State, event: Event) -> None:
    machine = Lifecycle(state)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition) as info:
            machine.fire(event)
        assert machine.state is state
        assert info.value.state is state
        assert info.value.event is event
        assert event.name in str(info.value)
        assert machine.try_fire(event) is None
        assert state_of(machine) is state
    else:
        assert machine.fire(event) is expected
        assert machine.state is expected
        assert Lifecycle(state).try_fire(event) is expected


def test_illegal_transition_is_a_runtime_error() -> None:
    assert issubclass(IllegalTransition, RuntimeError)
    with pytest.raises(RuntimeError, match="illegal transition: CLOSED in state READY"):
        Lifecycle(S.READY).fire(E.CLOSED)


def test_some_illegal_transitions() -> None:
    with pytest.raises(IllegalTransition):
        Lifecycle(S.WARMING).fire(E.WARMUP_STARTED)  # a second warmup must not start
    with pytest.raises(IllegalTransition):
        Lifecycle(S.NEW).fire(E.WARMUP_SUCCEEDED)
    with pytest.raises(IllegalTransition):
        Lifecycle(S.CLOSED).fire(E.WARMUP_STARTED)
    with pytest.raises(IllegalTransition):
        Lifecycle(S.CLOSING).fire(E.WARMUP_SUCCEEDED)
    with pytest.raises(IllegalTransition):
        Lifecycle(S.READY).fire(E.BREAKER_CLOSED)


def test_the_docstring_table_is_the_transition_table() -> None:
    doc = lifecycle_module.__doc__
    assert doc is not None
    table = doc.split("Transitions\n-----------\n", 1)[1]
    rows: dict[tuple[State, Event], State] = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in State.__members__:
            rows[(State[parts[0]], Event[parts[1]])] = State[parts[2]]
    assert rows == dict(TRANSITIONS)


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.CLOSED, E.WARMUP_STARTED)] = S.READY  # type: ignore[index]


def test_every_state_is_reachable_and_every_state_can_reach_closed() -> None:
    def reachable(start: State) -> set[State]:
        seen = {start}
        frontier = [start]
        while frontier:
            state = frontier.pop()
            for (old, _), new in TRANSITIONS.items():
                if old is state and new not in seen:
                    seen.add(new)
                    frontier.append(new)
        return seen

    assert reachable(S.NEW) == set(State)
    for state in State:
        assert S.CLOSED in reachable(state)


def test_every_event_is_used() -> None:
    assert {event for (_, event) in TRANSITIONS} == set(Event)


@pytest.mark.parametrize(
    ("state", "accepts", "serving"),
    [
        (S.NEW, True, False),
        (S.WARMING, True, False),
        (S.READY, True, True),
        (S.DEGRADED, True, True),
        (S.OPEN, True, False),
        (S.CLOSING, False, False),
        (S.CLOSED, False, False),
    ],
)
def test_accepts_work_and_is_serving(state: State, accepts: bool, serving: bool) -> None:
    assert accepts_work(state) is accepts
    assert is_serving(state) is serving


@given(st.lists(st.sampled_from(Event), max_size=60))
def test_random_event_sequences_follow_the_table(events: list[Event]) -> None:
    machine = Lifecycle()
    closing_seen = False
    for event in events:
        before = machine.state
        try:
            after = machine.fire(event)
        except IllegalTransition:
            assert machine.state is before
            assert (before, event) not in TRANSITIONS
        else:
            assert after is TRANSITIONS[(before, event)]
        closing_seen = closing_seen or machine.state in (S.CLOSING, S.CLOSED)
        if closing_seen:
            # Once closing began, the handle never accepts work again.
            assert not accepts_work(machine.state)
