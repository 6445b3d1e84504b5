"""The per-message shortcuts of the broker give what the plain code they replace gives."""

from __future__ import annotations

import math

import pytest

from broker.hub import Fresh
from broker.ratelimit import TokenBucket
from protocol import Deliver, LocalProtocolError
from tests.protocol.helpers import ConnectionPair


def _fresh(body: object = "hello") -> Fresh:
    return Fresh(41, "dm:alice:bob", 7, "alice", "phone", body, "c-1", 1_700_000_000_000_000)


@pytest.mark.parametrize("muted", [False, True])
def test_a_fresh_delivery_is_the_frame_send_makes_for_its_first_and_later_recipients(muted):
    """`Fresh.deliver_bytes` (the first recipient's frame built field by field in order, the
    later ones prepared) gives the bytes `Connection.send` gives for the same `Deliver`."""
    fresh = _fresh()
    for inbox_seq in (1, 200, 70_000):
        server = ConnectionPair().open().server
        expected = server.send(Deliver(
            inbox_seq=inbox_seq, kind="msg", conv=fresh.conv, seq=fresh.seq,
            sender=fresh.sender, body=fresh.body, cid=fresh.cid, ts=fresh.ts_us, muted=muted))
        assert fresh.deliver_bytes(server, inbox_seq, muted) == expected


def test_a_fresh_delivery_is_checked_as_send_checks_it():
    """A body the connection cannot send is refused by the first recipient's encode too."""
    with pytest.raises(LocalProtocolError):
        _fresh(body=3.5).deliver_bytes(ConnectionPair().open().server, 1, False)


def test_a_bucket_never_holds_more_than_its_burst():
    """However long it was idle, a bucket allows at most `burst` events at once, and a refused
    take spends nothing."""
    bucket = TokenBucket(8.0, burst=3.0)
    now = bucket.stamp + 3600.0
    assert [bucket.take(1.0, now) for _ in range(4)] == [True, True, True, False]
    # One token back after 0.125 s at 8/s. The times are binary fractions, so the refill is
    # exactly one token whatever the clock read: with 0.1 s at 10/s, (now + 0.1) - now came
    # to 0.0999999999985 at some clock values, and the take was refused.
    assert bucket.take(1.0, now + 0.125)
    assert not bucket.take(1.0, now + 0.125)


def test_a_bucket_refills_to_its_burst_exactly():
    """A take after the bucket refilled past its burst starts from the burst itself."""
    bucket = TokenBucket(2.0, burst=5.0)
    assert bucket.take(5.0, bucket.stamp)
    assert bucket.take(1.0, bucket.stamp + 100.0)
    assert bucket.tokens == 4.0


def test_a_bucket_reads_the_clock_when_not_given_it():
    """Without `now`, take reads time.monotonic itself: a fresh bucket allows its burst."""
    bucket = TokenBucket(1.0)
    assert bucket.take()
    assert not bucket.take()
    assert math.isclose(bucket.tokens, 0.0, abs_tol=0.01)
