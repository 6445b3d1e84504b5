"""The compiled `deliver` and `result` encoders (protocol/_wire.c) against the Python checks.

They may decline any frame (None: the Python way decides), but what they return must be byte
for byte what `Connection.send`'s Python path makes, and they must never return bytes for a
frame the Python checks refuse. Once the Python checks have accepted a frame (and so remembered
its ids), the compiled encoder must take it: the fast path is really taken.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from protocol import Connection, Deliver, Result, Role, native
from protocol import connection as connection_module
from protocol.errors import LocalProtocolError
from protocol.frames import FieldError, spec_of
from protocol.state import State

from .helpers import frames_of
from .test_checked import MAX_BODIES, ODD

pytestmark = pytest.mark.skipif(native.wire is None, reason="protocol._wire is not built")

BIG = st.sampled_from(["x" * 300, "é" * 40_000, b"\0" * 70_000, "€" * 20, 2**32, 2**16, 2**8])


def _python(frame, mb: int) -> bytes | None:
    try:
        body = msgpack.packb(spec_of(type(frame)).checked(frame, mb), use_bin_type=True)
    except (FieldError, TypeError, ValueError, AttributeError):
        return None
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("cls", [Deliver, Result], ids=lambda c: c.__name__)
@settings(max_examples=400)
@given(data=st.data(), mb=MAX_BODIES | st.just(1 << 20))
def test_compiled_encoding_is_the_python_one(cls, data, mb):
    compiled = native.wire.deliver if cls is Deliver else native.wire.result
    frame = data.draw(frames_of(cls))
    odd = data.draw(st.lists(st.sampled_from(cls._fields), max_size=2, unique=True))
    frame = frame._replace(**{field: data.draw(ODD | BIG) for field in odd})
    before = compiled(frame, mb)  # its ids may not be known yet: it may decline
    reference = _python(frame, mb)
    after = compiled(frame, mb)
    if reference is None:
        assert before is None and after is None
    else:
        assert before in (None, reference)
        assert after == reference


def test_a_deliver_with_every_kind_of_field_encodes_alike():
    for body in (None, "", "x" * 31, "x" * 32, "é" * 200, "x" * 70_000, b"", b"\xff" * 300):
        for seq in (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1):
            for muted in (False, True):
                frame = Deliver(inbox_seq=seq, kind="msg", conv="dm:a:b", seq=seq, sender="a",
                                body=body, cid=None if seq % 2 else "c" * 128, ts=seq,
                                muted=muted)
                reference = _python(frame, 1 << 20)
                assert native.wire.deliver(frame, 1 << 20) == reference is not None


class _Str(str):
    pass


_INTS = [-1, 0, 127, 128, 2**63 - 1, 2**63, True, 1.0, None]
_EDGES = {
    "inbox_seq": _INTS, "seq": _INTS, "ts": _INTS, "id": _INTS, "lsn": _INTS,
    "kind": ["msg", "added", "removed", "x", "", "MSG", _Str("msg"), None],
    "conv": ["dm:a:b", "dm:", "grp:ok", "x", "", 5, _Str("dm:a:b"), None],
    "sender": ["a", "-a", "a" * 64, "a" * 65, "", _Str("a"), None],
    "body": [None, "", "x" * 64, "x" * 65, "é" * 32, "é" * 33, "\ud800", b"x" * 64, b"x" * 65,
             bytearray(b"x"), _Str("x")],
    "cid": [None, "", "c", "c" * 128, "c" * 129, "é" * 128, "\0", "a\0b", 5, _Str("c")],
    "muted": [True, False, None, 0, 1],
    "dup": [True, False, None, 0, 1],
}
_BASES = {
    Deliver: Deliver(inbox_seq=1, kind="msg", conv="dm:a:b", seq=2, sender="a", body="hi",
                     cid="c1", ts=3, muted=False),
    Result: Result(id=1, conv="dm:a:b", seq=2, lsn=3, cid="c1", dup=False),
}


@pytest.mark.parametrize("cls, field, value", [
    (cls, field, value) for cls in (Deliver, Result) for field in cls._fields
    for value in _EDGES[field]
], ids=repr)
def test_each_field_at_and_past_its_limits(cls, field, value):
    compiled = native.wire.deliver if cls is Deliver else native.wire.result
    assert _python(_BASES[cls], 64) is not None  # the base's ids are known from here on
    frame = _BASES[cls]._replace(**{field: value})
    reference = _python(frame, 64)
    assert compiled(frame, 64) == reference


@given(st.binary(min_size=4, max_size=4))
def test_a_length_prefix_past_max_frame_is_too_large_and_says_what_it_looks_like(prefix):
    """Any prefix past max_frame is `too_large`, named by its length; the first bytes of TLS,
    HTTP and SSH are also said as such (what a homing port meets by mistake)."""
    from protocol.codec import FrameBuffer
    from protocol.errors import ErrorCode, RemoteProtocolError

    n = struct.unpack(">I", prefix)[0]
    buf = FrameBuffer(1024, 4096)
    buf.feed(prefix)
    if n <= 1024:
        return
    with pytest.raises(RemoteProtocolError) as e:
        buf.next_map()
    assert e.value.code is ErrorCode.TOO_LARGE
    assert e.value.message.startswith(f"frame of {n} bytes exceeds max_frame 1024")
    looks = ("TLS" if prefix[0] in (0x15, 0x16) and prefix[1] == 3 else
             "HTTP" if prefix in (b"GET ", b"POST", b"HTTP") else
             "SSH" if prefix == b"SSH-" else None)
    if looks is not None:
        assert e.value.message.endswith(f"(the bytes look like {looks}, not homing's plain frames)"
                                        if looks == "TLS" else
                                        f"(the bytes look like {looks}, not a homing frame)")


@pytest.mark.parametrize("prefix, looks", [
    (bytes([0x16, 3, 1, 2]), "TLS"), (bytes([0x15, 3, 3, 0]), "TLS"), (b"GET ", "HTTP"),
    (b"POST", "HTTP"), (b"HTTP", "HTTP"), (b"SSH-", "SSH"), (b"\x7f\x00\x00\x00", None)])
def test_the_usual_strangers_are_named(prefix, looks):
    from protocol.codec import foreign_hint

    hint = foreign_hint(prefix)
    assert (f"look like {looks}" in hint) if looks else hint == ""


# -- through `Connection.send` ---------------------------------------------------------------
# Its short way (since 2026-12-06) tries the compiled encoder first for a frame legal in the
# state that leaves it as it is, before the checks of direction and state. Whatever the frame,
# the role, the state and the max_frame, it must answer as the Python way does: the same bytes,
# or the same LocalProtocolError (code and text), and the same state after.


class SubDeliver(Deliver):
    __slots__ = ()


class SubResult(Result):
    __slots__ = ()


def _python_connection(role, state, max_frame: int):
    """A Connection as it is without protocol._wire: `send` takes the Python way alone."""
    saved = connection_module._COMPILED
    connection_module._COMPILED = {}
    try:
        conn = Connection(role)
    finally:
        connection_module._COMPILED = saved
    conn._enter(state)
    conn.max_frame_bytes = max_frame
    return conn


def _answer(conn, frame) -> tuple:
    """What `send` did: its bytes or its refusal, and the state after."""
    saved = connection_module._COMPILED
    if not conn._compiled:  # the Python way: its long way must not find the encoders either
        connection_module._COMPILED = {}
    try:
        try:
            answer = conn.send(frame)
        except LocalProtocolError as exc:
            answer = (type(exc), exc.code, exc.message, exc.request_id, exc.fatal)
    finally:
        connection_module._COMPILED = saved
    return answer, conn._state


@settings(max_examples=1500, deadline=None)
@given(data=st.data(), cls=st.sampled_from([Deliver, Deliver, Result, SubDeliver, SubResult]),
       role=st.sampled_from([Role.SERVER, *Role]),
       state=st.sampled_from([State.OPEN, State.OPEN, *State]), near=st.integers(-2, 2))
def test_connection_send_answers_as_the_python_way(data, cls, role, state, near):
    base = Deliver if issubclass(cls, Deliver) else Result
    frame = data.draw(frames_of(base))
    odd = data.draw(st.lists(st.sampled_from(base._fields), max_size=1))
    frame = frame._replace(**{field: data.draw(ODD | BIG) for field in odd})
    if base is Deliver and data.draw(st.booleans()):  # a body that brings it near 1,024 bytes
        frame = frame._replace(body=data.draw(st.sampled_from(["x", b"x", "é"])) * 1000)
    # max_frame just around the frame's size where it can be (1,024 at least), else far off
    size = _python(frame, 1 << 32)
    frame = cls(*frame)
    at = (len(size) - 4 + near) if size is not None else 0
    max_frame = at if at >= 1024 else data.draw(st.sampled_from([1024, 1 << 20]))
    python = _python_connection(role, state, max_frame)
    reference = _answer(python, frame)  # first: its ids are known to the compiled way after
    compiled = Connection(role)
    compiled._enter(state)
    compiled.max_frame_bytes = max_frame
    assert _answer(compiled, frame) == reference
    event(f"{state.name} {role.name}: "
          f"{'bytes' if isinstance(reference[0], bytes) else reference[0][1].name}")
    if role is Role.SERVER and state is State.OPEN and cls is base and isinstance(
            reference[0], bytes):
        # the short way was there to take (else this compares the Python way with itself)
        assert native.wire.deliver(frame, compiled._out_body) if base is Deliver else \
            native.wire.result(frame, compiled._out_body)
