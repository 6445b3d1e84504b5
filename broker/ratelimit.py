"""Token buckets for the send, typing, membership-change and read rates (per connection and per
user)."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows `rate` events per second on average, bursts of up to `burst` events.

    The burst defaults to one second's worth, but never less than one event: a bucket holding
    less than one token would never allow anything (a rate below one per second, such as
    `--typing-rate 0.5`, would refuse every event for ever)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0) if burst is None else burst
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        """Spend `n` tokens if there are enough; False (and nothing spent) otherwise. `now` is
        time.monotonic(), read here if not given (a send reads it once for its two buckets)."""
        if now is None:
            now = time.monotonic()
        tokens = self.tokens + (now - self.stamp) * self.rate
        if not tokens < self.burst:  # min(burst, tokens) without the call: a send takes two
            tokens = self.burst
        self.stamp = now
        if tokens < n:
            self.tokens = tokens
            return False
        self.tokens = tokens - n
        return True

    def refund(self, n: float = 1.0) -> None:
        """Give back `n` tokens taken for an event that did not happen after all (up to the
        burst)."""
        self.tokens = min(self.burst, self.tokens + n)

    def wait(self, n: float = 1.0, now: float | None = None) -> float:
        """Seconds from `now` until `n` tokens are there, if nothing else takes any (0 if they
        are there now; infinite for a rate of 0, where nothing refills)."""
        if now is None:
            now = time.monotonic()
        short = n - min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        if short <= 0:
            return 0.0
        return short / self.rate if self.rate > 0 else float("inf")

    def full(self, now: float) -> bool:
        """Whether the bucket will have refilled to its burst by `now` (time.monotonic)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class UserBuckets:
    """One TokenBucket per user, shared by all the user's connections.

    A user's bucket outlives their last session until it has refilled (`gone`, then `prune`),
    so disconnecting and connecting again does not buy a fresh burst.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}
        self._gone: dict[str, None] = {}  # users with no session whose bucket is still refilling

    def of(self, user: str) -> TokenBucket:
        """The user's bucket (a new, full one if they had none)."""
        self._gone.pop(user, None)
        bucket = self._buckets.get(user)
        if bucket is None:
            bucket = self._buckets[user] = TokenBucket(self.rate)
        return bucket

    def gone(self, user: str) -> None:
        """The user's last session ended: forget their bucket once it has refilled."""
        if user in self._buckets:
            self._gone[user] = None

    def prune(self, now: float) -> None:
        """Forget the buckets of users who are gone and whose buckets are full again."""
        for user in [u for u in self._gone if self._buckets[u].full(now)]:
            del self._buckets[user], self._gone[user]

    def __len__(self) -> int:
        return len(self._buckets)
