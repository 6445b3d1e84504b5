"""A small log-bucketed latency histogram in the HDR style, mergeable across processes.

Values are non-negative integers (the benchmarks record microseconds). Every power-of-two range
[2^k, 2^(k+1)) is cut into `SUB_BUCKETS` equal sub-buckets, so a recorded value is known to
within 1/SUB_BUCKETS of itself (0.8 % with 128) whatever its size; values below SUB_BUCKETS are
exact. Percentiles report the highest value of their bucket, HdrHistogram's convention, so they
never understate. The exact minimum and maximum are kept beside the buckets.

Why not the `hdrhistogram` package: all we need is record, merge and percentile over a few
million values; a dict of counts does that in 40 lines, pickles across `multiprocessing` pipes
as it is, and adds no compiled dependency to the `bench` extra.
"""

from __future__ import annotations

import math
from fractions import Fraction

SUB_BITS = 7
SUB_BUCKETS = 1 << SUB_BITS


def bucket_of(value: int) -> int:
    """The bucket index of `value` (monotonic in value)."""
    if value < SUB_BUCKETS:
        return max(value, 0)
    shift = value.bit_length() - SUB_BITS - 1
    return ((shift + 1) << SUB_BITS) + ((value >> shift) - SUB_BUCKETS)


def bucket_high(index: int) -> int:
    """The highest value that falls into bucket `index`."""
    if index < SUB_BUCKETS:
        return index
    shift = (index >> SUB_BITS) - 1
    sub = (index & (SUB_BUCKETS - 1)) + SUB_BUCKETS
    return ((sub + 1) << shift) - 1


class Histogram:
    """Counts of values by log bucket, with exact count, min and max."""

    __slots__ = ("buckets", "count", "max", "min")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.min: int | None = None
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value (negative values count as 0)."""
        value = max(int(value), 0)
        index = bucket_of(value)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        if value > self.max:
            self.max = value
        if self.min is None or value < self.min:
            self.min = value

    def merge(self, other: Histogram) -> None:
        """Add every value of `other`."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.max = max(self.max, other.max)
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min

    def percentile(self, p: float) -> int:
        """The value at or below which `p` percent of the values lie (0 if empty)."""
        if not self.count:
            return 0
        # ceil(count * p / 100), at least the first value; in exact decimals, as p is written
        # (41,000 * 99.9 is 4,095,900.0000000005 in floating point: a rank too high)
        rank = max(1, math.ceil(self.count * Fraction(str(p)) / 100))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(bucket_high(index), self.max)
        return self.max

    def to_dict(self) -> dict:
        """A picklable, JSON-able form (`from_dict` reads it back)."""
        return {"buckets": dict(self.buckets), "count": self.count, "min": self.min,
                "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> Histogram:
        h = cls()
        h.buckets = {int(k): v for k, v in data["buckets"].items()}
        h.count, h.min, h.max = data["count"], data["min"], data["max"]
        return h
