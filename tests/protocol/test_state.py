"""Connection state rules: handshake first, nothing after bye, ERROR refuses further use."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import (
    CLOSED,
    NEED_DATA,
    Bye,
    Connection,
    Deliver,
    Error,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Page,
    Ping,
    PreparedDeliver,
    RemoteProtocolError,
    Role,
    Send,
    State,
    Welcome,
    closes_connection,
    encode_frame,
    error_frame,
)
from protocol.frames import to_wire

from .helpers import (
    HELLO,
    WELCOME,
    ConnectionPair,
    client_open_frames,
    drain,
    server_open_frames,
)

SEND = Send(id=7, cid="c1", body="hi", conv="grp:0011223344556677")


def test_nothing_but_hello_before_the_handshake():
    """A client frame other than hello before the handshake is a fatal BAD_FRAME."""
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame({"t": "send", "id": 3, "cid": "x", "body": "b", "to": "u"}))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_FRAME and info.value.fatal
    assert info.value.request_id == 3
    assert server.state is State.ERROR


def test_client_cannot_send_before_hello_or_before_welcome():
    """send() refuses a request before hello and while the hello is unanswered."""
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(SEND)
    pair.send(pair.client, HELLO)
    with pytest.raises(LocalProtocolError):
        pair.client.send(SEND)
    with pytest.raises(LocalProtocolError):
        pair.client.send(HELLO)
    assert pair.client.state is State.AWAIT_WELCOME


def test_error_in_place_of_welcome_closes_both_sides():
    """An error answering hello moves both sides to CLOSED, whatever its close flag."""
    pair = ConnectionPair()
    pair.send(pair.client, HELLO)
    frame = error_frame(ErrorCode.LIMIT_EXCEEDED, "too many sessions", 1, close=False)
    assert pair.send(pair.server, frame) == [frame]
    assert pair.client.state is State.CLOSED and pair.server.state is State.CLOSED
    assert closes_connection(ErrorCode.LIMIT_EXCEEDED, in_place_of_welcome=True)
    assert not closes_connection(ErrorCode.LIMIT_EXCEEDED)


@pytest.mark.parametrize("sender", ["client", "server"])
def test_nothing_after_bye(sender):
    """After bye from either side nothing more may be sent or received."""
    pair = ConnectionPair().open()
    a = getattr(pair, sender)
    b = pair.peer(a)
    assert pair.send(a, Bye("done")) == [Bye("done")]
    for conn in (a, b):
        assert conn.state is State.CLOSED
        with pytest.raises(LocalProtocolError):
            conn.send(Ping(1))
    b.receive_data(encode_frame({"t": "ping"}))
    with pytest.raises(RemoteProtocolError) as info:
        b.next_event()
    assert info.value.fatal and b.state is State.ERROR


@pytest.mark.parametrize("reason", ["x" * 257, 5, b"bytes", ["a"]])
def test_a_bye_with_an_ill_typed_reason_is_still_a_bye(reason):
    """A bye ends the connection whatever its optional reason holds: the peer has stopped
    sending, and answering `invalid` would leave the connection half open (it used to)."""
    pair = ConnectionPair().open()
    pair.server.receive_data(encode_frame({"t": "bye", "reason": reason}))
    assert pair.server.next_event() == Bye()
    assert pair.server.state is State.CLOSED


def test_eof_after_bye_is_closed():
    """EOF with nothing pending gives CLOSED, repeatedly."""
    pair = ConnectionPair().open()
    pair.send(pair.client, Bye())
    pair.server.receive_data(b"")
    assert pair.server.next_event() is CLOSED
    assert pair.server.next_event() is CLOSED


def test_error_state_refuses_further_use_but_lets_the_server_explain():
    """After a fatal error next_event and receive_data raise; only error frames can be sent."""
    server = Connection(Role.SERVER)
    server.receive_data(b"\x00\x00\x00\x01\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.BAD_FRAME and info.value.fatal
    for call in (server.next_event, lambda: server.receive_data(b"x")):
        with pytest.raises(LocalProtocolError):
            call()
    with pytest.raises(LocalProtocolError):
        server.send(Ping())
    assert server.send(error_frame(ErrorCode.BAD_FRAME, "bad frame"))
    assert server.state is State.ERROR


def test_unknown_type_is_not_fatal_and_carries_the_request_id():
    """An unknown "t" once OPEN raises UNKNOWN_TYPE with the id, and the connection goes on."""
    pair = ConnectionPair().open()
    pair.server.receive_data(encode_frame({"t": "teleport", "id": 42, "to": "mars"}))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.next_event()
    exc = info.value
    assert (exc.code, exc.request_id, exc.fatal) == (ErrorCode.UNKNOWN_TYPE, 42, False)
    assert pair.server.state is State.OPEN
    assert pair.send(pair.client, SEND) == [SEND]


def test_invalid_field_is_not_fatal_once_open():
    """A known type with a bad field once OPEN is INVALID, non-fatal, with its request id."""
    pair = ConnectionPair().open()
    pair.server.receive_data(encode_frame({"t": "send", "id": 9, "cid": "", "body": "b",
                                           "to": "bob"}))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.next_event()
    assert (info.value.code, info.value.request_id, info.value.fatal) == (
        ErrorCode.INVALID, 9, False)
    assert pair.server.next_event() is NEED_DATA


def test_body_over_the_limit_is_invalid():
    """A body one byte over max_body_bytes is INVALID (non-fatal); at the limit it passes."""
    pair = ConnectionPair(max_body_bytes=2048).open()
    ok = SEND._replace(body="é" * 1024)
    assert pair.send(pair.client, ok) == [ok]
    with pytest.raises(LocalProtocolError):
        pair.client.send(SEND._replace(body=b"x" * 2049))
    pair.server.receive_data(encode_frame({"t": "send", "id": 1, "cid": "c", "body": "x" * 2049,
                                           "to": "bob"}))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.next_event()
    assert info.value.code is ErrorCode.INVALID and not info.value.fatal


def test_the_body_limit_is_for_sends_not_for_stored_messages():
    """A server's limit may have been lowered since a message was accepted: its `deliver` and a
    `page` holding it go out, and a client takes them, though the body is over max_body_bytes
    on both ends (the server refused to encode them, and the session ended). Only `send` is
    held to it, whichever end checks."""
    pair = ConnectionPair(max_body_bytes=1000).open()
    big = "x" * 5000
    deliver = Deliver(inbox_seq=1, kind="msg", conv="dm:alice:bob", seq=1, sender="bob",
                      body=big, cid="c", ts=1)
    assert pair.send(pair.server, deliver) == [deliver]
    page = Page(id=3, conv="dm:alice:bob", messages=(
        {"seq": 1, "from": "bob", "body": big, "cid": "c", "ts": 1, "lsn": 4},), more=False)
    (got,) = pair.send(pair.server, page)
    assert got.messages[0].body == big
    prepared = PreparedDeliver("msg", "dm:alice:bob", 1, "bob", big, "c", 1,
                               pair.server.out_body_bytes)
    pair.client.receive_data(pair.server.send_prepared(prepared, 2, False))
    assert [f.body for f in drain(pair.client)] == [big]
    with pytest.raises(LocalProtocolError):
        pair.client.send(SEND._replace(body=big))
    assert pair.server.out_body_bytes > pair.server.max_body_bytes == 1000


def test_four_gib_length_prefix_is_too_large_at_once():
    """A 0xFFFFFFFF length prefix is TOO_LARGE as soon as the 4 bytes arrive."""
    server = Connection(Role.SERVER)
    server.receive_data(struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE and info.value.fatal
    assert server.buffered_bytes == 4


def test_empty_frame_and_non_map_and_missing_t_are_bad_frames():
    """N == 0, a non-map body and a map without a str "t" are fatal BAD_FRAME."""
    for raw in (b"\x00\x00\x00\x00", encode_frame([1, 2]), encode_frame({"id": 1}),
                encode_frame({"t": 5})):
        server = Connection(Role.SERVER)
        server.receive_data(raw)
        with pytest.raises(RemoteProtocolError) as info:
            server.next_event()
        assert info.value.code is ErrorCode.BAD_FRAME


def test_wrong_direction_is_refused_both_ways():
    """A client cannot send server frames, and receiving one is a fatal BAD_FRAME."""
    pair = ConnectionPair().open()
    with pytest.raises(LocalProtocolError):
        pair.client.send(WELCOME)
    pair.client.receive_data(encode_frame({"t": "send", "id": 1, "cid": "c", "body": "b",
                                           "to": "bob"}))
    with pytest.raises(RemoteProtocolError) as info:
        pair.client.next_event()
    assert info.value.fatal and pair.client.state is State.ERROR


def test_welcome_sets_the_agreed_max_frame():
    """Both sides apply welcome.max_frame, a body of exactly it and not one byte more, and the
    client never exceeds its own limit: a welcome offering more leaves the client's, for what
    it sends and what it takes."""
    pair = ConnectionPair()
    pair.send(pair.client, HELLO._replace(max_frame=4096))
    pair.send(pair.server, WELCOME._replace(max_frame=4096))
    assert pair.client.max_frame_bytes == pair.server.max_frame_bytes == 4096
    with pytest.raises(LocalProtocolError) as info:
        pair.client.send(SEND._replace(body=b"x" * 5000))
    assert info.value.code is ErrorCode.TOO_LARGE
    fill = 4096 - (len(pair.client.send(SEND._replace(body="x" * 1000))) - 4)
    assert len(pair.client.send(SEND._replace(body="x" * (1000 + fill)))) == 4 + 4096
    with pytest.raises(LocalProtocolError) as info:
        pair.client.send(SEND._replace(body="x" * (1001 + fill)))
    assert info.value.code is ErrorCode.TOO_LARGE
    small = ConnectionPair()
    small.client = Connection(Role.CLIENT, max_frame_bytes=2048)
    small.send(small.client, HELLO._replace(max_frame=2048))
    small.send(small.server, WELCOME._replace(max_frame=4096))  # more than the client asked
    assert small.client.max_frame_bytes == 2048
    with pytest.raises(LocalProtocolError) as info:
        small.client.send(SEND._replace(body="x" * 3000))
    assert info.value.code is ErrorCode.TOO_LARGE
    small.client.receive_data(encode_frame({"t": "pong", "id": 1, "pad": "x" * 3000}))
    with pytest.raises(RemoteProtocolError) as info:
        small.client.next_event()
    assert info.value.code is ErrorCode.TOO_LARGE


class PairMachine(RuleBasedStateMachine):
    """Drives a client/server pair with legal and illegal moves against a tiny model."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = ConnectionPair()
        self.model = State.HANDSHAKE
        self.broken = False

    def _try(self, conn: Connection, frame, legal: bool, after: State) -> None:
        before = (self.pair.client.state, self.pair.server.state)
        if not legal:
            with pytest.raises(LocalProtocolError):
                conn.send(frame)
            assert (self.pair.client.state, self.pair.server.state) == before
            return
        assert self.pair.send(conn, frame) == [frame]
        self.model = after

    @precondition(lambda self: not self.broken)
    @rule()
    def hello(self):
        self._try(self.pair.client, HELLO, self.model is State.HANDSHAKE, State.AWAIT_WELCOME)

    @precondition(lambda self: not self.broken)
    @rule()
    def welcome(self):
        self._try(self.pair.server, WELCOME, self.model is State.AWAIT_WELCOME, State.OPEN)

    @precondition(lambda self: not self.broken)
    @rule(close=st.booleans(), rid=st.none() | st.integers(0, 10))
    def error(self, close, rid):
        frame = Error(int(ErrorCode.FORBIDDEN), "forbidden", "no", rid, close)
        legal = self.model in (State.HANDSHAKE, State.AWAIT_WELCOME, State.OPEN)
        after = State.OPEN if self.model is State.OPEN and not close else State.CLOSED
        self._try(self.pair.server, frame, legal, after)

    @precondition(lambda self: not self.broken)
    @rule(frame=client_open_frames)
    def client_frame(self, frame):
        self._try(self.pair.client, frame, self.model is State.OPEN, State.OPEN)

    @precondition(lambda self: not self.broken)
    @rule(frame=server_open_frames)
    def server_frame(self, frame):
        self._try(self.pair.server, frame, self.model is State.OPEN, State.OPEN)

    @precondition(lambda self: not self.broken)
    @rule(from_client=st.booleans())
    def bye(self, from_client):
        conn = self.pair.client if from_client else self.pair.server
        self._try(conn, Bye("bye"), self.model is State.OPEN, State.CLOSED)

    @precondition(lambda self: not self.broken)
    @rule(rid=st.integers(0, 2**63 - 1))
    def unknown_type(self, rid):
        self.pair.server.receive_data(encode_frame({"t": "x-future", "id": rid}))
        with pytest.raises(RemoteProtocolError) as info:
            self.pair.server.next_event()
        if self.model is State.OPEN:
            assert info.value.code is ErrorCode.UNKNOWN_TYPE and not info.value.fatal
            assert info.value.request_id == rid
        else:
            assert info.value.fatal
            self.broken = True

    @precondition(lambda self: not self.broken)
    @rule(junk=st.binary(min_size=5, max_size=40))
    def garbage(self, junk):
        self.pair.server.receive_data(b"\x00\x00\x00\x05\xc1" + junk)
        with pytest.raises(RemoteProtocolError):
            self.pair.server.next_event()
        self.broken = True

    @precondition(lambda self: self.broken)
    @rule()
    def refuses_after_error(self):
        with pytest.raises(LocalProtocolError):
            self.pair.server.next_event()
        with pytest.raises(LocalProtocolError):
            self.pair.server.send(Ping(1))

    @invariant()
    def states_agree_with_the_model(self):
        if self.broken:
            assert self.pair.server.state is State.ERROR
        else:
            assert self.pair.client.state is self.model
            assert self.pair.server.state is self.model
            assert drain(self.pair.client) == [] and drain(self.pair.server) == []


TestPairMachine = PairMachine.TestCase
TestPairMachine.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("caps", [["x" * 65], [""], ["a", "b" * 300]])
def test_a_client_takes_any_welcome_caps_strings(caps):
    """`welcome.caps` is `[str] <= 16` (PROTOCOL.md §5.3: capabilities are free-form, for the
    versions to come); the 1-64 characters are `hello.caps`'. A client refused a welcome with
    a longer or an empty cap as `invalid`, fatal: every handshake with such a broker failed."""
    client = Connection(Role.CLIENT)
    client.send(Hello(versions=(1,), token="t", device="d"))
    frame = to_wire(Welcome(1, "s", "alice", 0, 1 << 20, 30, 0, 0, ()))
    frame["caps"] = caps
    client.receive_data(encode_frame(frame))
    assert client.next_event().caps == tuple(caps)
    assert client.state is State.OPEN
