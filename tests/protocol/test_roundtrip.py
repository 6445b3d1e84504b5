"""Every frame type survives encode -> bytes -> decode through a client/server pair."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    ALL_FRAMES,
    CLIENT_FRAMES,
    SERVER_FRAMES,
    Hello,
    Welcome,
    from_wire,
    to_wire,
)

from .helpers import ConnectionPair, frames_of

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("cls", ALL_FRAMES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_frame_round_trips_over_a_connection_pair(cls, data):
    """A valid frame sent by its side arrives equal on the other side."""
    frame = data.draw(frames_of(cls))
    pair = ConnectionPair()
    if cls is Hello:
        assert pair.send(pair.client, frame) == [frame]
        return
    if cls is Welcome:
        pair.send(pair.client, Hello(versions=(1,), token="t", device="d"))
        assert pair.send(pair.server, frame) == [frame]
        return
    pair.open()
    sender = pair.client if CLIENT_FRAMES.get(cls.TYPE) is cls else pair.server
    assert SERVER_FRAMES.get(cls.TYPE) is cls or sender is pair.client
    assert pair.send(sender, frame) == [frame]


@pytest.mark.parametrize("cls", ALL_FRAMES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_wire_map_round_trips(cls, data):
    """from_wire(to_wire(frame)) gives back the frame, and unknown keys are ignored."""
    frame = data.draw(frames_of(cls))
    wire = to_wire(frame)
    assert wire["t"] == cls.TYPE
    wire["x-future-field"] = {"anything": [1, 2]}
    assert from_wire(cls, wire) == frame


def test_frames_of_different_types_never_compare_equal():
    """Frames with equal fields but different types are different (Ping(1) != Pong(1))."""
    from protocol import Ping, Pong

    assert Ping(1) != Pong(1)
    assert Ping(1) == Ping(1)
    assert hash(Ping(1)) == hash(Ping(1))
    assert Ping(1) != (1,)


def test_page_accepts_wire_form_message_dicts():
    """A Page built with wire-form message dicts arrives as PageMessage tuples."""
    from protocol import Page, PageMessage

    from .helpers import ConnectionPair

    pair = ConnectionPair().open()
    raw = {"seq": 1, "from": "bob", "body": b"x", "cid": "c", "ts": 2, "lsn": 3}
    got = pair.send(pair.server, Page(5, "grp:ab", (raw,), False))
    assert got == [Page(5, "grp:ab", (PageMessage(1, "bob", b"x", "c", 2, 3),), False)]


def test_welcome_names_the_receipt_audience_bound_and_older_welcomes_lack_it():
    """`welcome.receipt_audience` (since 2026-12-05): the group size past which receipts are
    pushed only to owners and admins (§9). Optional: a welcome without it (an older server)
    decodes with None, and a client that does not know the key ignores it (§3.3)."""
    pair = ConnectionPair()
    pair.send(pair.client, Hello(versions=(1,), token="t", device="d"))
    told = Welcome(1, "s-1", "alice", 1, 1 << 20, 30, 0, 0, (), id=1, receipt_audience=256)
    assert pair.send(pair.server, told) == [told]
    assert to_wire(told)["receipt_audience"] == 256
    older = to_wire(told._replace(receipt_audience=None))
    assert "receipt_audience" not in older
    assert from_wire(Welcome, older).receipt_audience is None


def test_hello_deliver_is_on_the_wire_only_when_false():
    """`hello.deliver` (§5.2): true, the default, is left out of the wire map, so a hello
    reads as before to a server without the field; false is sent as `deliver: false`; a map
    without it, or with nil, decodes as true; a value that is not a bool is refused."""
    from protocol import FieldError

    plain = Hello(versions=(1,), token="t", device="d")
    assert "deliver" not in to_wire(plain) and plain.deliver is True
    requests_only = plain._replace(deliver=False)
    assert to_wire(requests_only)["deliver"] is False
    assert from_wire(Hello, to_wire(requests_only)) == requests_only
    assert from_wire(Hello, {**to_wire(plain), "deliver": None}).deliver is True
    with pytest.raises(FieldError, match="deliver"):
        from_wire(Hello, {**to_wire(plain), "deliver": 0})
    pair = ConnectionPair()
    assert pair.send(pair.client, requests_only) == [requests_only]
