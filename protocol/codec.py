"""Framing: bytes to msgpack maps and back (PROTOCOL.md §2).

A frame is a 4-byte big-endian unsigned length N followed by exactly N bytes holding one msgpack
map whose ``"t"`` is a str. Rules kept here:

* N > max_frame_bytes is TOO_LARGE as soon as the 4 prefix bytes are seen, before any of the
  body is waited for, so a 4 GiB prefix never makes us buffer or allocate anything (§2.2).
* N == 0, a body that is not exactly one msgpack map, a map with a key neither str nor bin, or a
  map without a str ``"t"`` is BAD_FRAME (§2.3). EOF in the middle of a frame is BAD_FRAME too.
  A bin key is left in the map: it can never name a field, so it is ignored like any unknown
  key (§3.3), and the hot path pays nothing for looking at every key's type.
* A frame from a client holds at most `max_values` msgpack values (every map key, map value and
  array item, nested ones included; DEFAULT_MAX_FRAME_VALUES), else BAD_FRAME: decoding costs
  per value, and a 1 MiB frame of empty maps took 141 ms of the broker's one thread where a
  200-byte send takes 1 us. The values are counted from the containers' headers before
  anything is decoded (`count_values`, compiled in protocol/_wire.c), stopping past the limit,
  so a frame over it costs at most `max_values` steps, however it nests. A body of no more
  bytes than the limit cannot hold more values, and is not counted.
* The body is decoded with `msgpack.unpackb` and explicit limits, never with a streaming
  `Unpacker` and its defaults (msgpack/msgpack-python issue #503): each frame is cut out by its
  length first, so one frame can never make the decoder hold more than max_frame_bytes.
* `FrameBuffer` holds at most ``4 + max_frame_bytes`` bytes of unconsumed input plus the one chunk
  being fed: the caller must drain it with `next_map` (until it returns None) before feeding
  again. Feeding while more than ``4 + max_frame_bytes`` unconsumed bytes are held raises
  `LocalProtocolError`; a caller that drains never sees it.

Everything a peer can send ends here in a map, None (need more bytes) or a fatal
`RemoteProtocolError`; no other exception escapes.
"""

from __future__ import annotations

import struct

import msgpack

from . import native
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_FRAME_BYTES = 1 << 20
"""Default largest frame body, 1 MiB (§2.2).

A message body is at most 64 KiB (MAX_BODY_BYTES) and the largest routine frames, a ``page`` of
200 such messages or a ``receipt_list`` of a big group, rarely pass a few hundred KiB. For
comparison: NATS defaults max_payload to 1 MiB, MQTT brokers commonly cap packets at 256 KiB to
1 MiB (mosquitto's message_size_limit is unset but its clients default small), Redis caps a bulk
string at 512 MiB and a client query buffer at 1 GiB, and h11 refuses 16 KiB of incomplete
headers. 1 MiB leaves room for every frame the protocol defines while keeping a connection's
worst-case buffer (two frames' worth) at a few MiB; the two sides agree on a smaller or larger
value in the handshake. Before that, HELLO_MAX_FRAME_BYTES applies, so connections that never
authenticate hold little: a broker's worst case for half-frames is its --max-handshakes times
that, plus its --max-connections times two of its --max-frame-bytes.
"""

DEFAULT_MAX_FRAME_VALUES = 4096
"""Default largest number of msgpack values in a frame a server takes from a client (§2.2).

The largest frame of the protocol a client sends, a ``create`` naming 1,000 members with a
``cid``, holds 1,014; every other one, a few dozen. Servers' frames are not counted (a
``receipt_list`` of a big group holds far more), so a client passes None."""

MIN_FRAME_VALUES = 2048
"""Smallest limit a server may set: room for a ``create`` of 1,000 members and new fields."""

HELLO_MAX_FRAME_BYTES = 64 * 1024
"""Largest frame body before ``welcome`` (§3.2): a ``hello`` needs under 21 KiB (a token of up to
4,096 characters, 16 caps of 64, of up to four UTF-8 bytes each; under 6 KiB in ASCII), so an
unauthenticated peer gets no more than this to fill."""

MIN_FRAME_LIMIT = 1024
"""Smallest agreed max_frame (§3.2): below this even ``welcome`` or an ``error`` might not fit."""

MAX_FRAME_LIMIT = (1 << 32) - 1
"""Largest value the 4-byte length prefix can carry."""

_PREFIX = struct.Struct(">I")
_unpack_prefix = _PREFIX.unpack_from
_pack_prefix = _PREFIX.pack
_unpackb = msgpack.unpackb


def encode_frame(wire: dict) -> bytes:
    """One frame's bytes (length prefix and msgpack body) for the map `wire`.

    No checks on the map's content; `Connection.send` is the checked way. Raises TypeError or
    ValueError if the map holds something msgpack cannot encode.
    """
    body = msgpack.packb(wire, use_bin_type=True)
    return _pack_prefix(len(body)) + body


# The bytes after the type byte of each fixed-size msgpack scalar, by type byte.
_FIXED = {0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4,
          0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
# (width of the length, bytes after it besides the payload) of str, bin and ext by type byte.
_SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0),
          0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1)}
# (width of the count, values per item) of array16/32 and map16/32.
_COUNTED = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}


def count_values(body: bytes | bytearray, limit: int) -> int:
    """The values a decode of `body` reads: every map key, map value and array item, nested
    ones included (the first object itself is not counted). Each container counts at its header,
    before its items are read, and counting stops as soon as it passes `limit`: the cost is at
    most `limit` steps whatever the nesting. A body that ends early or holds a byte no object
    starts with is counted up to there; its decode then fails on its own.

    The reference of `protocol._wire.count_values`, which the server uses where it was built.
    """
    n, p, remaining, counted = len(body), 0, 1, 0
    while remaining and p < n:
        b = body[p]
        remaining -= 1
        items = skip = 0
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            p += 1
            continue
        if b <= 0x8F:
            items = 2 * (b & 0x0F)
        elif b <= 0x9F:
            items = b & 0x0F
        elif b <= 0xBF:
            skip = b & 0x1F
        elif b in _FIXED:
            skip = _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            if n - p - 1 < width:
                return counted
            skip = int.from_bytes(body[p + 1 : p + 1 + width], "big") + extra
            p += width
        elif b in _COUNTED:
            width, per = _COUNTED[b]
            if n - p - 1 < width:
                return counted
            items = int.from_bytes(body[p + 1 : p + 1 + width], "big") * per
            p += width
        else:  # 0xc1, never used
            return counted
        if items:
            counted += items
            if counted > limit:
                return counted
            remaining += items
        if skip > n - p - 1:
            return counted
        p += 1 + skip
    return counted


_count_values = count_values if native.wire is None else native.wire.count_values


def _undecodable(exc: Exception) -> str:
    """What was wrong with a frame body msgpack could not decode, in the words of PROTOCOL.md
    §2.3: until 2026-12-07 every such frame was "not valid msgpack (ValueError)", a valid
    msgpack map with an int key or a str of bad UTF-8 too."""
    if isinstance(exc, UnicodeDecodeError):
        return "frame body holds a str that is not valid UTF-8"
    if isinstance(exc, msgpack.ExtraData):
        return "frame body holds more than one msgpack value"
    text = str(exc)
    if "map key" in text:  # msgpack's strict_map_key: "int is not allowed for map key ..."
        return "frame body holds a map key that is neither str nor bin"
    if "incomplete input" in text:
        return "frame body ends inside a msgpack value"
    detail = f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__
    return f"frame body is not valid msgpack ({detail})"


def decode_body(body: bytes | bytearray, max_frame_bytes: int,
                max_values: int | None = None) -> dict:
    """Decode one frame body into its map, or raise a fatal BAD_FRAME `RemoteProtocolError`.

    With `max_values`, a body of more values than that (`count_values`) is BAD_FRAME too; it is
    counted before anything is built. Every value takes at least a byte, so a body of at most
    `max_values` bytes is not counted.
    """
    if (max_values is not None and len(body) > max_values
            and _count_values(body, max_values) > max_values):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"frame holds more than {max_values} values")
    try:
        obj = _unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_str_len=max_frame_bytes,
            max_bin_len=max_frame_bytes,
            max_array_len=max_frame_bytes,
            max_map_len=max_frame_bytes,
            max_ext_len=max_frame_bytes,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, TypeError, ...)
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, _undecodable(exc)) from None
    if type(obj) is not dict:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "frame body is not a msgpack map")
    if type(obj.get("t")) is not str:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, 'frame has no str "t"')
    return obj


# The first bytes of the protocols a homing port meets by mistake (a TLS client on a plain port,
# an HTTP health check, an SSH client): read as a length prefix, each is a frame of hundreds of
# megabytes. Said as what they look like, for whoever reads the error (the log's
# `frame_rejected`, a client's `cannot reach`).
_HTTP_STARTS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
                b"PRI ", b"HTTP")


def foreign_hint(prefix: bytes) -> str:
    """What a length `prefix` too large for a frame looks like, as ` (the bytes look like
    ...)`, where it begins another protocol's messages (TLS, HTTP, SSH); "" otherwise."""
    if prefix[:1] in (b"\x15", b"\x16") and prefix[1:2] == b"\x03":  # a TLS record, v3.x
        return " (the bytes look like TLS, not homing's plain frames)"
    if prefix in _HTTP_STARTS:
        return " (the bytes look like HTTP, not a homing frame)"
    if prefix == b"SSH-":
        return " (the bytes look like SSH, not a homing frame)"
    return ""


class FrameBuffer:
    """An incremental frame splitter: feed it bytes, take out decoded maps.

    Input is kept in one bytearray with a read position; consumed bytes are dropped at the
    next `feed` (deleting from the front of a bytearray is cheap in CPython).
    """

    __slots__ = ("_buf", "_pos", "eof", "max_frame_bytes", "max_values")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_values: int | None = None) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_frame_bytes = max_frame_bytes
        self.max_values = max_values
        self.eof = False

    @property
    def pending(self) -> int:
        """Unconsumed bytes held."""
        return len(self._buf) - self._pos

    @property
    def held(self) -> int:
        """Bytes of memory the buffer's content occupies, consumed or not."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data`; empty `data` marks EOF.

        Raises `LocalProtocolError` after EOF, or if the caller did not drain: more than
        ``4 + max_frame_bytes`` unconsumed bytes are already held.
        """
        if self.eof:
            raise LocalProtocolError(ErrorCode.INTERNAL, "data received after EOF")
        if not data:
            self.eof = True
            return
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        if len(buf) > 4 + self.max_frame_bytes:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "drain the connection with next_event before feeding more"
            )
        buf += data

    def next_map(self) -> dict | None:
        """The next frame's map, or None if more bytes are needed.

        Raises a fatal `RemoteProtocolError` (TOO_LARGE, BAD_FRAME) when the input is not a
        frame, including EOF in the middle of one. At EOF with nothing pending returns None;
        the caller tells "closed" from "need data" with `eof`.
        """
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if size - pos < 4:
            if self.eof and size > pos:
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, "EOF inside a length prefix")
            return None
        n = _unpack_prefix(buf, pos)[0]
        if n > self.max_frame_bytes:
            raise RemoteProtocolError(
                ErrorCode.TOO_LARGE, f"frame of {n} bytes exceeds max_frame {self.max_frame_bytes}"
                f"{foreign_hint(bytes(buf[pos:pos + 4]))}"
            )
        if n == 0:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, "empty frame")
        end = pos + 4 + n
        if size < end:
            if self.eof:
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, "EOF inside a frame")
            return None
        self._pos = end
        return decode_body(buf[pos + 4 : end], self.max_frame_bytes, self.max_values)
