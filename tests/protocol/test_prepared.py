"""A prepared ``deliver`` frame is byte for byte what `Connection.send` makes, checked the same."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    UINT_MAX,
    Connection,
    Deliver,
    ErrorCode,
    LocalProtocolError,
    PreparedDeliver,
    Role,
)

from .helpers import ConnectionPair, frames_of

# Each width of msgpack uint, at both of its edges.
EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, UINT_MAX]


def _prepared(frame: Deliver, max_body_bytes: int = 65536) -> PreparedDeliver:
    return PreparedDeliver(frame.kind, frame.conv, frame.seq, frame.sender, frame.body,
                           frame.cid, frame.ts, max_body_bytes)


def _open_pair() -> ConnectionPair:
    return ConnectionPair().open()


@settings(max_examples=200, deadline=None)
@given(frame=frames_of(Deliver), inbox_seq=st.sampled_from(EDGES) | st.integers(0, UINT_MAX))
def test_prepared_bytes_equal_send_and_decode_to_the_frame(frame, inbox_seq):
    """For any deliver and inbox_seq, the prepared bytes equal `send`'s and decode back to it."""
    frame = frame._replace(inbox_seq=inbox_seq)
    pair = _open_pair()
    data = pair.server.send_prepared(_prepared(frame), frame.inbox_seq, frame.muted)
    assert data == pair.server.send(frame)
    pair.client.receive_data(data)
    assert pair.client.next_event() == frame


def test_one_prepared_frame_serves_many_recipients():
    """Only inbox_seq and muted differ between recipients of one prepared frame."""
    pair = _open_pair()
    base = Deliver(inbox_seq=0, kind="msg", conv="chn:00ff", seq=7, sender="hq", body=b"\x00x",
                   cid="c1", ts=1_700_000_000_000_000)
    prepared = _prepared(base)
    for inbox_seq in EDGES:
        for muted in (False, True):
            frame = base._replace(inbox_seq=inbox_seq, muted=muted)
            assert pair.server.send_prepared(prepared, inbox_seq, muted) == pair.server.send(frame)


@pytest.mark.parametrize("field, value", [
    ("conv", "nope"), ("sender", ""), ("kind", "other"), ("seq", -1), ("cid", ""),
    ("body", 3), ("ts", True),
])
def test_an_invalid_field_is_refused_when_prepared(field, value):
    """A field `send` would refuse is refused by PreparedDeliver, as INVALID."""
    frame = Deliver(inbox_seq=1, kind="msg", conv="chn:01", seq=1, sender="hq", body="b",
                    cid="c", ts=1)._replace(**{field: value})
    with pytest.raises(LocalProtocolError) as e:
        _prepared(frame)
    assert e.value.code is ErrorCode.INVALID


def test_a_body_over_the_limit_is_refused_when_prepared():
    """The body limit is the one `send` applies."""
    frame = Deliver(1, "msg", "chn:01", 1, "hq", b"x" * 11, "c", 1)
    with pytest.raises(LocalProtocolError):
        _prepared(frame, max_body_bytes=10)


@pytest.mark.parametrize("inbox_seq", [-1, UINT_MAX + 1, True, 1.0, None])
def test_a_bad_inbox_seq_is_refused(inbox_seq):
    """inbox_seq must be a uint, as in `send`."""
    pair = _open_pair()
    prepared = _prepared(Deliver(1, "msg", "chn:01", 1, "hq", "b", "c", 1))
    with pytest.raises(LocalProtocolError) as e:
        pair.server.send_prepared(prepared, inbox_seq, False)
    assert e.value.code is ErrorCode.INVALID


def test_a_client_or_a_connection_not_open_cannot_send_a_prepared_deliver():
    """Direction and state are checked as for `send`."""
    prepared = _prepared(Deliver(1, "msg", "chn:01", 1, "hq", "b", "c", 1))
    pair = _open_pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send_prepared(prepared, 1, False)
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_prepared(prepared, 1, False)


def test_frames_over_max_frame_or_prepared_for_a_larger_body_are_refused():
    """The agreed max_frame and the connection's limit for the bodies it sends bind prepared
    frames too. A server sends stored bodies of any size (its max_body_bytes is for sends), so
    only a frame prepared against a limit beyond the frame limit is refused."""
    frame = Deliver(1, "msg", "chn:01", 1, "hq", "x" * 2000, "c", 1)
    pair = _open_pair()
    pair.server.max_frame_bytes = 1024
    with pytest.raises(LocalProtocolError) as e:
        pair.server.send_prepared(_prepared(frame), 1, False)
    assert e.value.code is ErrorCode.TOO_LARGE
    small = ConnectionPair(max_body_bytes=100).open()
    assert small.server.send_prepared(_prepared(frame._replace(body="x")), 1, False)
    with pytest.raises(LocalProtocolError) as e:
        small.server.send_prepared(_prepared(frame._replace(body="x"), (1 << 32) + 1), 1, False)
    assert e.value.code is ErrorCode.INTERNAL
