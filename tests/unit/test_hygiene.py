"""Connection hygiene decisions (pure)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgwarden.core.hygiene import GapDetector, jittered_lifetime, needs_validation


@pytest.mark.parametrize(
    ("idle_for", "window", "expected"),
    [
        (0.5, 1.0, False),
        (1.0, 1.0, False),
        (1.01, 1.0, True),
        (0.001, 0.0, True),
        (1e9, math.inf, False),
    ],
)
def test_needs_validation(idle_for: float, window: float, expected: bool) -> None:
    assert needs_validation(idle_for, window) is expected


def test_gap_detector_first_call_is_false() -> None:
    assert GapDetector(threshold=5.0).observe(1000.0, 1.7e9) is False


def test_gap_detector_steady_ticks() -> None:
    gaps = GapDetector(threshold=5.0)
    mono, wall = 0.0, 1.7e9
    for _ in range(100):
        assert gaps.observe(mono, wall) is False
        mono += 1.0
        wall += 1.0


def test_gap_detector_monotonic_gap() -> None:
    gaps = GapDetector(threshold=5.0)
    gaps.observe(0.0, 1.7e9)
    assert gaps.observe(6.0, 1.7e9 + 6.0) is True
    assert gaps.observe(7.0, 1.7e9 + 7.0) is False  # only the gap itself counts


def test_gap_detector_suspended_vm_only_the_wall_clock_moves() -> None:
    # CLOCK_MONOTONIC stops during suspend; the wall clock does not.
    gaps = GapDetector(threshold=5.0)
    gaps.observe(100.0, 1.7e9)
    assert gaps.observe(100.5, 1.7e9 + 3600.0) is True


def test_gap_detector_wall_clock_stepped_back() -> None:
    gaps = GapDetector(threshold=5.0)
    gaps.observe(100.0, 1.7e9)
    assert gaps.observe(101.0, 1.7e9 - 60.0) is True


def test_gap_detector_threshold_is_exclusive() -> None:
    gaps = GapDetector(threshold=5.0)
    gaps.observe(0.0, 0.0)
    assert gaps.observe(5.0, 5.0) is False


def test_gap_detector_repr_hides_internals() -> None:
    assert repr(GapDetector(threshold=2.0)) == "GapDetector(threshold=2.0)"


@given(
    threshold=st.floats(min_value=0.0, max_value=100.0),
    steps=st.lists(
        st.tuples(st.floats(0.0, 200.0), st.floats(-200.0, 200.0)), min_size=1, max_size=50
    ),
)
def test_gap_detector_matches_its_definition(
    threshold: float, steps: list[tuple[float, float]]
) -> None:
    gaps = GapDetector(threshold=threshold)
    mono, wall = 0.0, 0.0
    assert gaps.observe(mono, wall) is False
    for d_mono, d_wall in steps:
        last_mono, last_wall = mono, wall
        mono += d_mono
        wall += d_wall
        expected = mono - last_mono > threshold or abs(wall - last_wall) > threshold
        assert gaps.observe(mono, wall) is expected


def test_jittered_lifetime_examples() -> None:
    assert jittered_lifetime(300.0, 0.2, 0.0) == 300.0
    assert jittered_lifetime(300.0, 0.2, 0.5) == pytest.approx(270.0)
    assert jittered_lifetime(300.0, 0.0, 0.9) == 300.0
    assert jittered_lifetime(math.inf, 0.2, 0.5) == math.inf


@pytest.mark.parametrize(("jitter", "rand"), [(-0.1, 0.5), (1.1, 0.5), (0.1, -0.1), (0.1, 1.5)])
def test_jittered_lifetime_rejects_bad_values(jitter: float, rand: float) -> None:
    with pytest.raises(ValueError, match="must be in"):
        jittered_lifetime(300.0, jitter, rand)


@given(
    max_lifetime=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_jittered_lifetime_bounds(max_lifetime: float, jitter: float, rand: float) -> None:
    lifetime = jittered_lifetime(max_lifetime, jitter, rand)
    assert max_lifetime * (1 - jitter) - 1e-9 <= lifetime <= max_lifetime
