"""The frames decoded from a byte stream do not depend on how the stream is split."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import ErrorCode, RemoteProtocolError, State

from .helpers import ConnectionPair, client_open_frames, drain

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _stream(frames) -> tuple[ConnectionPair, bytes]:
    pair = ConnectionPair().open()
    return pair, b"".join(pair.client.send(f) for f in frames)


def _decode_split(data: bytes, points: list[int]) -> list:
    pair = ConnectionPair().open()
    got = []
    bounds = [0, *sorted(points), len(data)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            pair.server.receive_data(data[a:b])
            got.extend(drain(pair.server))
    return got


@SETTINGS
@given(frames=st.lists(client_open_frames, min_size=1, max_size=8), data=st.data())
def test_random_splits_give_the_same_frames(frames, data):
    """Whole, one byte at a time and at random split points, the same frames come out."""
    _, stream = _stream(frames)
    assert _decode_split(stream, []) == frames
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _decode_split(stream, cuts) == frames


@SETTINGS
@given(frames=st.lists(client_open_frames, min_size=1, max_size=3))
def test_one_byte_at_a_time_gives_the_same_frames(frames):
    """Feeding one byte per call yields exactly the frames sent."""
    _, stream = _stream(frames)
    assert _decode_split(stream, list(range(1, len(stream)))) == frames


@SETTINGS
@given(frames=st.lists(client_open_frames, min_size=1, max_size=3), data=st.data())
def test_trailing_partial_frame_waits_then_eof_is_bad_frame(frames, data):
    """Bytes of an incomplete frame after whole ones give NEED_DATA, then BAD_FRAME at EOF."""
    _, stream = _stream(frames)
    extra = _stream(frames[:1])[1]
    tail = extra[: data.draw(st.integers(1, len(extra) - 1))]
    pair = ConnectionPair().open()
    pair.server.receive_data(stream + tail)
    assert drain(pair.server) == frames
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.next_event()
    assert info.value.code is ErrorCode.BAD_FRAME and info.value.fatal
    assert pair.server.state is State.ERROR
