"""Token buckets for send rates (per connection and per user)."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows `rate` events per second on average, bursts of up to `burst` events."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        """Spend `n` tokens if there are enough; False (and nothing spent) otherwise."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True
