"""The token-bucket bandwidth cap."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest
from novacron.migration.throttle import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_burst_goes_at_once_then_the_rate_holds() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=500, clock=clock)
    assert bucket.reserve(500) == 0
    assert bucket.reserve(250) == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.reserve(1000) == pytest.approx(1.0)


def test_sustained_stream_averages_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10_000_000, clock=clock)
    start, sent = clock.now, 0
    for _ in range(100):
        bucket.acquire(3_000_000, sleep=clock.sleep)
        sent += 3_000_000
    elapsed = clock.now - start
    assert sent <= bucket.burst + bucket.rate * elapsed + 1
    assert sent / elapsed == pytest.approx(10_000_000, rel=0.01)


def test_idle_time_refills_only_up_to_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=50, clock=clock)
    clock.now += 3600
    assert bucket.reserve(50) == 0
    assert bucket.reserve(100) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-5, None), (10, -1)])
def test_invalid_caps_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(InvalidRequest):
        TokenBucket(rate, burst)


def test_negative_reservation_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        TokenBucket(10).reserve(-1)
