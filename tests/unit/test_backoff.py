"""Backoff.delay, the retry and restart delays: exponential, capped, jittered within bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra import Backoff

POSITIVE = st.floats(min_value=1e-6, max_value=1e308, allow_nan=False, allow_infinity=False)
BACKOFFS = st.builds(
    Backoff,
    initial=POSITIVE,
    max=POSITIVE,
    factor=st.floats(min_value=1.0, max_value=1e300, allow_nan=False, allow_infinity=False),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)


@settings(max_examples=300, deadline=None)
@given(backoff=BACKOFFS, attempt=st.integers(min_value=0, max_value=10_000))
def test_a_delay_is_the_capped_exponential_within_its_jitter(
    backoff: Backoff, attempt: int
) -> None:
    # Large factors included: a float power past 1e308 raised OverflowError
    # out of a retry or a restart.
    delay = backoff.delay(attempt)
    try:
        grown = backoff.initial * backoff.factor ** min(attempt, 64)
    except OverflowError:
        grown = backoff.max
    base = min(backoff.max, grown)
    spread = base * backoff.jitter
    assert max(0.0, base - spread) * (1 - 1e-12) <= delay <= (base + spread) * (1 + 1e-12)


def test_delays_double_up_to_the_cap_and_spread_with_jitter() -> None:
    exact = Backoff(initial=0.1, max=1.0, factor=2.0, jitter=0.0)
    assert [exact.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = Backoff(initial=1.0, max=10.0, factor=2.0, jitter=0.5)
    delays = [jittered.delay(1) for _ in range(200)]
    assert all(1.0 <= d <= 3.0 for d in delays)
    assert len(set(delays)) > 150  # drawn, not fixed
    assert min(delays) < 1.5
    assert max(delays) > 2.5
