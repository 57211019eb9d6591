"""A per-migration bandwidth cap: a token bucket with an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable

from novacron.errors import InvalidRequest


class TokenBucket:
    """Holds a stream to ``rate`` bytes/s on average with bursts of at most ``burst`` bytes.

    A request larger than the balance is granted at once but leaves the bucket in debt; the
    caller waits the returned delay before sending, so over any span T at most
    ``burst + rate * T`` bytes go out, whatever the request sizes.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or (burst is not None and burst < 0):
            raise InvalidRequest(
                "bandwidth cap needs a positive rate", details={"rate": rate, "burst": burst}
            )
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else self.rate / 10
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket; returns the seconds to wait before sending them."""
        if nbytes < 0:
            raise InvalidRequest("cannot reserve a negative byte count", details={"bytes": nbytes})
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return max(0.0, -self._tokens / self.rate)

    def acquire(self, nbytes: int, sleep: Callable[[float], None] = time.sleep) -> float:
        """Reserve ``nbytes`` and wait until they may be sent; returns the time waited."""
        delay = self.reserve(nbytes)
        if delay > 0:
            sleep(delay)
        return delay
