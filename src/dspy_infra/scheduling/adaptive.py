"""Per-class concurrency limit, optionally adaptive.

Adaptive limits are AIMD (as in Netflix concurrency-limits' ``AIMDLimit``) with a latency
gradient (as in its ``Gradient2Limit``). A task class has no RPC deadline to miss, so drops
(failures, timeouts) alone react late; a latency rise against the no-load estimate is the
earlier sign that running more tasks at once only makes each slower. AIMD rather than a
computed gradient limit: it needs no sampling window or clock, stays O(1) per sample, and
converges by the same rule TCP relies on. The limit grows only while the class uses at
least half of it (the app-limited check): an idle class says nothing about capacity, and
growing there would hand a later burst a limit that nothing ever tested.
"""

from __future__ import annotations

import math

__all__ = ["ConcurrencyLimit"]

# Start small but not at one: growth is +1 per finished task while the class is busy,
# which doubles the limit every round, so a training loop submitting thousands of short
# tasks reaches 64 within ~60 completions, while a class of minute-long GPU jobs is not
# stuck at one job for its first minutes, nor handed its full maximum untested.
_INITIAL = 4
_BACKOFF = 0.9  # multiplicative decrease, AIMDLimit's default
_TOLERANCE = 2.0  # short-term latency may reach this multiple of no-load before it counts
# Latency moves below a millisecond are event-loop and clock noise, not contention; without
# this slack, microsecond tasks would shed their limit on jitter.
_SLACK = 1e-3
_SHORT_GAIN = 1.0 / 8  # short-term EWMA weight, as TCP's smoothed RTT
_BASE_SAMPLES = 1024  # the no-load estimate averages over about this many samples


class ConcurrencyLimit:
    """How many tasks of one class may run at once; constant unless ``adaptive``."""

    __slots__ = (
        "_adaptive",
        "_base",
        "_cooldown",
        "_limit",
        "_maximum",
        "_minimum",
        "_n",
        "_short",
    )

    def __init__(self, *, minimum: int, maximum: int, adaptive: bool) -> None:
        if minimum < 1:
            raise ValueError(f"concurrency minimum must be at least 1, got {minimum}")
        if maximum < minimum:
            raise ValueError(
                f"concurrency maximum ({maximum}) must not be below the minimum ({minimum})"
            )
        self._minimum = minimum
        self._maximum = maximum
        self._adaptive = adaptive
        self._limit = max(minimum, min(maximum, _INITIAL)) if adaptive else maximum
        self._n = 0  # latency samples seen, capped at _BASE_SAMPLES
        self._short = 0.0
        self._base = 0.0
        self._cooldown = 0

    @property
    def limit(self) -> int:
        return self._limit

    def on_sample(self, *, latency: float, inflight: int, dropped: bool) -> None:
        """Feed one finished attempt; only arithmetic, since it runs once per task."""
        if not self._adaptive:
            return
        limit = self._limit
        overloaded = dropped
        # A failure's run time says nothing about service time (a fast failure would drag
        # the no-load estimate down, a timeout is censored), and a clock glitch (negative,
        # inf, nan) must not poison the estimates for good.
        if not dropped and 0.0 <= latency < math.inf:
            n = self._n + 1 if self._n < _BASE_SAMPLES else _BASE_SAMPLES
            self._n = n
            if n == 1:
                self._short = self._base = latency
            else:
                # 1/n while young: both estimates start as the plain mean, so the first
                # few samples of a varied class are not mistaken for a latency rise.
                gain = 1.0 / n
                short = self._short + (latency - self._short) * max(gain, _SHORT_GAIN)
                base = self._base
                overloaded = short > _TOLERANCE * base + _SLACK
                # While overloaded above the minimum the no-load estimate holds still, or
                # it would learn the overload as normal and stop the decrease. At the
                # minimum, latency is as unloaded as this class gets: learn it, so that a
                # class whose tasks became slower for good recovers its limit.
                if not overloaded or limit == self._minimum:
                    base += (latency - base) * gain
                # Never above the short-term mean: when load eases, no-load follows at once.
                self._base = base if base < short else short
                self._short = short
        if self._cooldown:
            # Tasks admitted under the old limit are still finishing; their samples describe
            # the old load, so one burst of failures costs one decrease, not a collapse.
            self._cooldown -= 1
        elif overloaded:
            if limit > self._minimum:
                self._limit = max(self._minimum, int(limit * _BACKOFF))
                self._cooldown = limit
        elif inflight * 2 >= limit and limit < self._maximum:
            self._limit = limit + 1
