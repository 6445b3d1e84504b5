"""Arbitrary input yields only frames, NEED_DATA/CLOSED or a ProtocolError, in bounded memory."""

from __future__ import annotations

import itertools
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CLOSED,
    KNOWN_TYPES,
    NEED_DATA,
    Connection,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    Role,
    State,
    native,
)
from protocol.codec import count_values, decode_body

from .helpers import HELLO, WELCOME, ConnectionPair

MAX_FRAME = 1024
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The reference counter, and the compiled one where it was built.
COUNTERS = [count_values] + ([native.wire.count_values] if native.wire is not None else [])

_FIELD_NAMES = ["id", "conv", "cid", "body", "to", "upto", "versions", "token", "device",
                "messages", "kind", "code", "close", "max_frame", "members", "user", "from"]
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(_FIELD_NAMES), kids, max_size=4),
    max_leaves=12,
)
frame_maps = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted(KNOWN_TYPES)) | st.text(max_size=8)},
    optional={name: msgpack_values for name in _FIELD_NAMES},
)
bodies = (frame_maps | msgpack_values).map(lambda v: msgpack.packb(v, use_bin_type=True))
# Bodies that are not msgpack, behind a valid length prefix: random bytes (a random 4-byte
# prefix is almost never a length up to MAX_FRAME, so `st.binary()` alone is refused at the
# prefix) and valid bodies cut short or with bytes after them.
not_msgpack = st.binary(min_size=1, max_size=64) | st.builds(
    lambda body, cut, extra: body[: cut % (len(body) + 1)] + extra,
    bodies, st.integers(0, 200), st.binary(max_size=3))


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _feed_in_chunks(conn: Connection, data: bytes, cuts: list[int]) -> None:
    """Feed `data` split at `cuts`, draining after each chunk, checking the buffer bound."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        chunk = data[a:b]
        try:
            conn.receive_data(chunk)
        except ProtocolError:
            assert conn.state is State.ERROR
            return
        assert conn.buffered_bytes <= 4 + MAX_FRAME + len(chunk)
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as exc:
                assert isinstance(exc.code, int)
                if exc.fatal:
                    assert conn.state is State.ERROR
                    return
                continue
            if ev is NEED_DATA or ev is CLOSED:
                break
            assert type(ev).TYPE is not None


def _open_server(role: Role) -> Connection:
    pair = ConnectionPair(max_frame_bytes=MAX_FRAME)
    pair.send(pair.client, HELLO)
    pair.send(pair.server, WELCOME._replace(max_frame=MAX_FRAME))
    return pair.server if role is Role.SERVER else pair.client


roles = st.sampled_from([Role.SERVER, Role.CLIENT])


@SETTINGS
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8),
       role=roles, opened=st.booleans())
def test_arbitrary_bytes_never_raise_anything_but_protocol_errors(data, cuts, role, opened):
    """Random bytes in random chunks give frames, NEED_DATA/CLOSED or a ProtocolError only."""
    conn = _open_server(role) if opened else Connection(role, max_frame_bytes=MAX_FRAME)
    _feed_in_chunks(conn, data + b"", cuts)


@SETTINGS
@given(frames=st.lists(bodies | not_msgpack, max_size=6),
       cuts=st.lists(st.integers(0, 4000), max_size=8), role=roles, opened=st.booleans(),
       eof=st.booleans())
def test_arbitrary_msgpack_frames_never_raise_anything_but_protocol_errors(
    frames, cuts, role, opened, eof
):
    """Well-framed arbitrary msgpack values, and bodies that are no msgpack at all, give frames
    or ProtocolErrors, never crashes."""
    conn = _open_server(role) if opened else Connection(role, max_frame_bytes=MAX_FRAME)
    _feed_in_chunks(conn, b"".join(_frame(b) for b in frames), cuts)
    if eof and conn.state is not State.ERROR:
        _feed_in_chunks(conn, b"", [])


def test_a_caller_that_does_not_drain_is_refused():
    """Feeding past 4 + max_frame_bytes unconsumed bytes raises instead of growing forever:
    holding exactly that many, a feed is still taken; holding one more, it is refused."""
    conn = Connection(Role.SERVER, max_frame_bytes=MAX_FRAME)
    chunk = b"\x00" * 700
    conn.receive_data(chunk)
    conn.receive_data(chunk)
    with pytest.raises(LocalProtocolError):  # the caller's fault, not the peer's
        conn.receive_data(chunk)
    assert conn.buffered_bytes <= 4 + MAX_FRAME + len(chunk)
    # At the bound itself (700 above left 1,400 held: far past it, whatever the bound was).
    conn = Connection(Role.SERVER, max_frame_bytes=MAX_FRAME)
    conn.receive_data(b"\x00" * (4 + MAX_FRAME))
    conn.receive_data(b"\x00")  # 4 + MAX_FRAME held: not past the bound
    assert conn.buffered_bytes == 4 + MAX_FRAME + 1
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x00")
    assert conn.buffered_bytes == 4 + MAX_FRAME + 1


def _values(obj) -> int:
    """The values `obj` holds (map keys and values, array items, nested ones included)."""
    if isinstance(obj, dict):
        return sum(1 + _values(k) + 1 + _values(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(1 + _values(v) for v in obj)
    return 0


@SETTINGS
@given(frame=frame_maps, limit=st.integers(0, 40))
def test_a_value_limit_takes_exactly_the_frames_within_it(frame, limit):
    """With max_values, a body decodes to the same map iff it holds at most `limit` values;
    otherwise it is BAD_FRAME naming the limit. Both counters agree with the decoded map."""
    body = msgpack.packb(frame, use_bin_type=True)
    try:
        plain = decode_body(body, MAX_FRAME)
    except ProtocolError:
        return  # not a frame at all (a float key, say): the limit changes nothing there
    for count in COUNTERS:
        assert count(body, 1 << 20) == _values(plain)
    try:
        got = decode_body(body, MAX_FRAME, limit)
    except ProtocolError as exc:
        assert _values(plain) > limit
        assert exc.code is ErrorCode.BAD_FRAME and f"more than {limit} values" in str(exc)
    else:
        assert _values(plain) <= limit
        assert msgpack.packb(got) == msgpack.packb(plain)  # bytes: a float may be NaN


@SETTINGS
@given(data=st.binary(max_size=64) | bodies, cut=st.integers(0, 80), limit=st.integers(0, 20))
def test_the_compiled_count_is_the_python_one_on_any_bytes(data, cut, limit):
    """Garbage, truncated bodies and nested ones: the two counters agree, and never read past
    the end."""
    for body in (data, data[:cut]):
        assert len({count(body, limit) for count in COUNTERS}) == 1, body


def _leaves(obj) -> int:
    """`_values` of `obj`, an ExtType counting as one value (it is no container)."""
    if isinstance(obj, dict):
        return sum(2 + _leaves(k) + _leaves(v) for k, v in obj.items())
    if isinstance(obj, list):
        return sum(1 + _leaves(v) for v in obj)
    return 0


# Every msgpack header with a length or count of its own, at the width that selects it: the
# strategies above make lists and maps of at most 4 items and strings and bins of at most 20
# bytes (fix-sized and 8-bit headers only), so a 16- or 32-bit width wrong passed them.
WIDE = {
    "array16 (0xdc)": [None] * 16, "array32 (0xdd)": [None] * 65_536,
    "map16 (0xde)": {i: None for i in range(16)}, "map32 (0xdf)": {i: 1 for i in range(65_536)},
    "str8 (0xd9)": "s" * 40, "str16 (0xda)": "s" * 300, "str32 (0xdb)": "s" * 70_000,
    "bin8 (0xc4)": b"b" * 10, "bin16 (0xc5)": b"b" * 300, "bin32 (0xc6)": b"b" * 70_000,
    "fixext (0xd4-0xd8)": [msgpack.ExtType(1, b"e" * n) for n in (1, 2, 4, 8, 16)],
    "ext8 (0xc7)": msgpack.ExtType(1, b"e" * 3), "ext16 (0xc8)": msgpack.ExtType(1, b"e" * 300),
    "ext32 (0xc9)": msgpack.ExtType(1, b"e" * 70_000),
    "numbers (0xca-0xd3)": [1.5, 200, 60_000, 1 << 20, 1 << 40, -100, -30_000, -(1 << 20),
                            -(1 << 40)],
}


@pytest.mark.parametrize("name", sorted(WIDE))
def test_every_header_width_is_counted_as_decoded(name):
    """Each counter counts a value behind a 16- or 32-bit length or count header as what it
    holds, and goes on past it to the values after it; cut short anywhere, both agree."""
    value = WIDE[name]
    frame = {"t": "send", "before": [1, {"k": 2}], "x": value, "after": [3, [4, 5], {"k": 6}]}
    body = msgpack.packb(frame, use_bin_type=True, use_single_float=name.startswith("num"))
    expected = _leaves(frame)
    for count in COUNTERS:
        assert count(body, 1 << 20) == expected, count
    for cut in (1, 3, 6, len(body) // 2, len(body) - 20, len(body) - 1):
        assert len({count(body[:cut], 1 << 20) for count in COUNTERS}) == 1, cut


def _nested(levels: int, per: int) -> bytes:
    """`levels` arrays, each of `per` empty maps and then the next array: every level is still
    open while its maps are read."""
    head = b"\xdc" + (per + 1).to_bytes(2, "big")
    return b"".join(head + b"\x80" * per for _ in range(levels)) + b"\x90"


def test_values_are_counted_at_each_header_however_the_frame_nests():
    """The shapes the limit is for, flat or nested with the children last (counting as each
    container closed, a review found, let 1 MiB of nested levels be decoded before the limit
    was seen: 160 ms, more than with no limit): each is refused after at most the limit and
    one container, before anything is decoded."""
    frames = [{"t": "send", "junk": [{}] * 1_000_000}, {"t": "send", "junk": [[{}] * 1000] * 1000}]
    bodies = [msgpack.packb(f, use_bin_type=True) for f in frames]
    bodies.append(b"\x82\xa1t\xa4send\xa4junk" + _nested(254, 4091))
    for body in bodies:
        for count in COUNTERS:
            assert count(body, 4096) > 4096
        try:
            decode_body(body, len(body), 4096)
        except ProtocolError as exc:
            assert "more than 4096 values" in str(exc)
        else:
            raise AssertionError("decoded")
    # The nested one fits up to its first level's 4,091 maps, and stops at the second level's
    # header: 4 + 4,092 + 4,092 values counted, 4,094 objects read.
    for count in COUNTERS:
        assert count(bodies[-1], 4096) == 4 + 4092 + 4092
