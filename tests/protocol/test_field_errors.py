"""A refused field says what was wrong and what is allowed (PROTOCOL.md §6), and never echoes a
large value back.

Through the real `Connection`s: a client-side check (`Connection.send`) and a server decoding
what a peer sent, which becomes the `invalid` error the peer gets.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import ALL_FRAMES, Create, LocalProtocolError, RemoteProtocolError, Send
from protocol import fields as f
from protocol.codec import encode_frame
from protocol.frames import FieldError, spec_of

from .helpers import ConnectionPair, frames_of

SEND = Send(id=1, cid="c-1", body="hi", to="bob", conv=None)


def _refusal(frame) -> str:
    with pytest.raises(LocalProtocolError) as caught:
        ConnectionPair().open().client.send(frame)
    return caught.value.message


@pytest.mark.parametrize(("frame", "message"), [
    (SEND._replace(body="x" * 65_537),
     "send: bad value for field 'body': a body of 65,537 bytes, over the limit of 65,536"),
    (SEND._replace(body="é" * 32_769),  # 2 UTF-8 bytes each
     "send: bad value for field 'body': a body of 65,538 bytes, over the limit of 65,536"),
    (SEND._replace(to="Bad User"),
     "send: bad value for field 'to': 'Bad User' is not an id of 1 to 64 characters of "
     "A-Z a-z 0-9 _ . @ + -, the first a letter or digit"),
    (SEND._replace(cid="c" * 129),
     "send: bad value for field 'cid': a string of 129 characters is not a client message id "
     "of 1 to 128 characters, without NUL"),
    (Create(id=1, kind="group", name="g", members=("ann", "b b"), open=False),
     "create: bad value for field 'members': item 1: 'b b' is not an id of 1 to 64 characters "
     "of A-Z a-z 0-9 _ . @ + -, the first a letter or digit"),
    (Create(id=1, kind="grp", name="g", members=(), open=False),
     "create: bad value for field 'kind': 'grp' is not one of 'group', 'channel'"),
    (Create(id=1, kind="group", name="", members=(), open=False),
     "create: bad value for field 'name': '' is not a string of 1 to 128 characters"),
])
def test_a_refused_field_says_why(frame, message):
    assert _refusal(frame) == message


def test_a_peer_is_told_why_its_field_was_refused():
    server = ConnectionPair().open().server
    server.receive_data(encode_frame(
        {"t": "send", "id": 7, "cid": "c", "body": b"\0" * 70_000, "to": "bob"}))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert caught.value.message == ("send: bad value for field 'body': a body of 70,000 bytes, "
                                    "over the limit of 65,536")
    assert caught.value.request_id == 7


ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
)


@pytest.mark.parametrize("cls", ALL_FRAMES, ids=lambda c: c.__name__)
@given(data=st.data(), mb=st.sampled_from([0, 3, 65_536]))
def test_every_refusal_is_short_and_names_its_field(cls, data, mb):
    """Whatever a peer puts in a field, the refusal is a short text naming that field."""
    spec = spec_of(cls)
    wire = spec.encode(data.draw(frames_of(cls)))
    try:
        spec.decode(dict(wire), mb)
    except FieldError:  # its own body is over the drawn limit: then the default limit
        mb = f.MAX_BODY_BYTES
    keys = {"from" if name == "sender" else name for name in cls._fields}
    key = data.draw(st.sampled_from(sorted(keys)))
    value = data.draw(ANY | st.text(min_size=41) | st.binary(min_size=41, max_size=100))
    wire[key] = value
    try:
        spec.decode(wire, mb)
    except FieldError as exc:
        text = str(exc)
        if text.startswith("bad value for field"):  # else a rule across fields said why
            assert text.startswith(f"bad value for field {key!r}: ")
        assert len(text) <= f.MAX_MESSAGE_CHARS
        if isinstance(value, (str, bytes)) and len(value) > 40:
            assert repr(value) not in text and (not isinstance(value, str) or value not in text)
