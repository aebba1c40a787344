"""The per-class concurrency limit: bounded always, grows only when used, backs off on overload."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.scheduling.adaptive import ConcurrencyLimit

samples = st.lists(
    st.tuples(st.floats(), st.integers(min_value=-5, max_value=500), st.booleans()),
    max_size=300,
)


@st.composite
def bounds(draw: st.DrawFn, max_maximum: int = 200) -> tuple[int, int]:
    minimum = draw(st.integers(min_value=1, max_value=20))
    return minimum, draw(st.integers(min_value=minimum, max_value=max(minimum, max_maximum)))


def full_use(c: ConcurrencyLimit, latency: float, count: int) -> None:
    for _ in range(count):
        c.on_sample(latency=latency, inflight=c.limit, dropped=False)


@given(bounds(), st.booleans(), samples)
def test_limit_stays_within_bounds_for_any_samples(
    b: tuple[int, int], adaptive: bool, seq: list[tuple[float, int, bool]]
) -> None:
    minimum, maximum = b
    c = ConcurrencyLimit(minimum=minimum, maximum=maximum, adaptive=adaptive)
    for latency, inflight, dropped in seq:
        c.on_sample(latency=latency, inflight=inflight, dropped=dropped)
        assert type(c.limit) is int
        assert minimum <= c.limit <= maximum


@given(bounds(), samples)
def test_non_adaptive_limit_is_the_maximum(
    b: tuple[int, int], seq: list[tuple[float, int, bool]]
) -> None:
    c = ConcurrencyLimit(minimum=b[0], maximum=b[1], adaptive=False)
    assert c.limit == b[1]
    for latency, inflight, dropped in seq:
        c.on_sample(latency=latency, inflight=inflight, dropped=dropped)
        assert c.limit == b[1]


def test_starts_small_so_a_busy_class_ramps_up_and_an_idle_one_is_not_overcommitted() -> None:
    assert ConcurrencyLimit(minimum=1, maximum=64, adaptive=True).limit == 4
    assert ConcurrencyLimit(minimum=1, maximum=2, adaptive=True).limit == 2
    assert ConcurrencyLimit(minimum=8, maximum=64, adaptive=True).limit == 8


@given(bounds(), st.floats(min_value=1e-6, max_value=100.0))
def test_steady_latency_at_full_use_grows_to_maximum(b: tuple[int, int], latency: float) -> None:
    c = ConcurrencyLimit(minimum=b[0], maximum=b[1], adaptive=True)
    previous = c.limit
    for _ in range(b[1]):
        c.on_sample(latency=latency, inflight=c.limit, dropped=False)
        assert c.limit >= previous
        previous = c.limit
    assert c.limit == b[1]


@given(
    bounds(),
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=10.0),
            st.floats(min_value=0.0, max_value=0.49),
            st.booleans(),
        ),
        max_size=300,
    ),
)
def test_never_grows_while_the_class_uses_less_than_half(
    b: tuple[int, int], seq: list[tuple[float, float, bool]]
) -> None:
    c = ConcurrencyLimit(minimum=b[0], maximum=b[1], adaptive=True)
    for latency, share, dropped in seq:
        previous = c.limit
        c.on_sample(latency=latency, inflight=int(share * previous), dropped=dropped)
        assert c.limit <= previous


@given(bounds(), st.integers(min_value=0, max_value=300))
def test_a_drop_decreases_the_limit_unless_at_minimum(b: tuple[int, int], warm: int) -> None:
    c = ConcurrencyLimit(minimum=b[0], maximum=b[1], adaptive=True)
    full_use(c, 0.05, warm)
    before = c.limit
    c.on_sample(latency=0.05, inflight=before, dropped=True)
    assert c.limit == max(b[0], int(before * 0.9))
    assert c.limit < before or before == b[0]


@given(bounds(max_maximum=256), st.floats(min_value=1e-3, max_value=100.0))
def test_sustained_latency_at_five_times_baseline_drives_it_to_minimum(
    b: tuple[int, int], baseline: float
) -> None:
    minimum, maximum = b
    c = ConcurrencyLimit(minimum=minimum, maximum=maximum, adaptive=True)
    full_use(c, baseline, maximum + 100)
    assert c.limit == maximum
    previous = c.limit
    for _ in range(20 * maximum + 100):
        c.on_sample(latency=5 * baseline, inflight=c.limit, dropped=False)
        assert c.limit <= previous
        previous = c.limit
        if c.limit == minimum:
            break
    assert c.limit == minimum
    # Back to normal: the no-load estimate follows latency down at once, and it grows again.
    full_use(c, baseline, 20 * maximum)
    assert c.limit == maximum


def test_latency_below_tolerance_is_not_overload() -> None:
    c = ConcurrencyLimit(minimum=1, maximum=32, adaptive=True)
    full_use(c, 0.1, 200)
    full_use(c, 0.19, 1000)
    assert c.limit == 32


def test_submillisecond_jitter_is_not_overload() -> None:
    c = ConcurrencyLimit(minimum=1, maximum=32, adaptive=True)
    for i in range(2000):
        c.on_sample(latency=2e-5 if i % 2 else 4e-4, inflight=c.limit, dropped=False)
    assert c.limit == 32


@given(bounds(), st.data())
def test_a_burst_of_drops_within_one_round_decreases_once(
    b: tuple[int, int], data: st.DataObject
) -> None:
    minimum, maximum = b
    c = ConcurrencyLimit(minimum=minimum, maximum=maximum, adaptive=True)
    full_use(c, 0.05, maximum)
    before = c.limit
    burst = data.draw(st.integers(min_value=1, max_value=before), label="burst")
    for _ in range(burst):
        c.on_sample(latency=0.05, inflight=before, dropped=True)
    after = max(minimum, int(before * 0.9))
    assert c.limit == after
    # Once the round has passed, the next drop counts again.
    for _ in range(before - burst + 1):
        c.on_sample(latency=0.05, inflight=1, dropped=False)
    assert c.limit == after
    c.on_sample(latency=0.05, inflight=after, dropped=True)
    assert c.limit == max(minimum, int(after * 0.9))


@pytest.mark.parametrize(
    ("minimum", "maximum", "message"),
    [
        (0, 4, "minimum must be at least 1, got 0"),
        (-3, 4, "minimum must be at least 1, got -3"),
        (5, 4, r"maximum \(4\) must not be below the minimum \(5\)"),
    ],
)
@pytest.mark.parametrize("adaptive", [True, False])
def test_bad_bounds_are_rejected(minimum: int, maximum: int, message: str, adaptive: bool) -> None:
    with pytest.raises(ValueError, match=message):
        ConcurrencyLimit(minimum=minimum, maximum=maximum, adaptive=adaptive)
