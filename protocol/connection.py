"""The sans-IO connection: bytes in, frames out, frames in, bytes out (h11 style).

`Connection` joins the codec (`protocol.codec`), the field checks (`protocol.frames`) and the
state table (`protocol.state`). It does no I/O: the caller feeds received bytes with
`receive_data`, takes frames with `next_event` until it returns `NEED_DATA`, and writes whatever
`send` returns.

Error policy (PROTOCOL.md §6, §7): framing errors, frames illegal in the current state and any
error before the handshake completes are fatal (state ERROR). Once OPEN, an unknown ``"t"``
(UNKNOWN_TYPE) or a known type with a bad field (INVALID) is not: the frame is consumed, the
`RemoteProtocolError` carries the frame's ``id`` if it had a valid one, and the caller replies
with an ``error`` frame and goes on. A ``bye`` with an ill-typed ``reason`` is still a bye
(without reason): the peer has stopped.
"""

from __future__ import annotations

import struct
import threading

import msgpack

from . import native
from .codec import DEFAULT_MAX_FRAME_BYTES, MAX_FRAME_LIMIT, MIN_FRAME_LIMIT, FrameBuffer
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .fields import MAX_BODY_BYTES, uint
from .frames import (
    CLIENT_FRAMES,
    KNOWN_TYPES,
    SERVER_FRAMES,
    Bye,
    Deliver,
    FieldError,
    Result,
    Welcome,
    spec_of,
    wire_key,
)
from .prepared import PreparedDeliver
from .state import ERROR_CLOSE, Role, State, legal_moves

_pack_prefix = struct.Struct(">I").pack


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
"""Returned by `Connection.next_event` when no complete frame is buffered."""
CLOSED = _Sentinel("CLOSED")
"""Returned by `Connection.next_event` once EOF was received and every frame was taken."""

_ERROR, _OPEN = State.ERROR, State.OPEN


_packers = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's msgpack Packer, for the frames the compiled encoder does not make.

    One per thread, not per connection: a Packer holds a buffer of 256 KiB, and with one
    each a broker's sessions held 256 KiB apiece (until 2026-12-06), which stayed in the heap
    after a crowd of them was gone (3,000 devices reconnecting three times: 35 to 190 MiB of
    RSS). Per thread, since a client of the SDK may run in any thread; a pack calls no code
    of ours, so a connection never needs it twice at once."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


class Connection:
    """One end of a homing connection: the protocol state machine and its buffers.

    `max_frame_bytes` bounds incoming and outgoing frame bodies; it becomes the agreed limit when
    ``welcome`` passes (the server sends the agreed value; a client takes the smaller of it and
    its own) and may be set later. `max_body_bytes` bounds the bodies of ``send`` frames
    (§4.1): those a server receives, those a client sends. The messages a server delivers or
    pages were stored under whatever limit held when they were accepted, so their bodies are
    bounded by the frame size only, on both ends.
    `max_frame_values` bounds the msgpack values of each frame received (§2.2; None: no bound):
    a server passes one, a client trusts its server.
    """

    __slots__ = (
        "_buffer",
        "_compiled",
        "_decoders",
        "_in_body",
        "_max_body",
        "_next_map",
        "_our_moves",
        "_out_body",
        "_outgoing",
        "_state",
        "_their_moves",
        "our_role",
        "their_role",
    )

    def __init__(
        self,
        role: Role,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_frame_values: int | None = None,
    ) -> None:
        _check_limit(max_frame_bytes)
        self.our_role = role
        self.their_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._buffer = FrameBuffer(max_frame_bytes, max_frame_values)
        self._next_map = self._buffer.next_map
        incoming = CLIENT_FRAMES if role is Role.SERVER else SERVER_FRAMES
        self._decoders = {t: spec_of(cls).decode for t, cls in incoming.items()}
        self._outgoing = SERVER_FRAMES if role is Role.SERVER else CLIENT_FRAMES
        # The compiled encoders of the frames this role sends (`send`'s short way).
        self._compiled = {cls: encode for cls, encode in _COMPILED.items()
                          if self._outgoing.get(cls.TYPE) is cls}
        self.max_body_bytes = max_body_bytes
        self._enter(State.HANDSHAKE)

    def __repr__(self) -> str:
        return f"<Connection {self.our_role.name} {self._state.name}>"

    def _enter(self, state: State) -> None:
        self._state = state
        self._our_moves = legal_moves(state, self.our_role)
        self._their_moves = legal_moves(state, self.their_role)

    @property
    def state(self) -> State:
        """The connection's current `State`."""
        return self._state

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame body accepted or sent, in bytes."""
        return self._buffer.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        _check_limit(value)
        self._buffer.max_frame_bytes = value

    @property
    def max_body_bytes(self) -> int:
        """Largest body of a ``send`` frame, in bytes (received by a server, sent by a client)."""
        return self._max_body

    @max_body_bytes.setter
    def max_body_bytes(self, value: int) -> None:
        self._max_body = value
        # Only `send` (client to server) is held to it; `deliver` and `page` only to max_frame.
        if self.our_role is Role.SERVER:
            self._in_body, self._out_body = value, MAX_FRAME_LIMIT
        else:
            self._in_body, self._out_body = MAX_FRAME_LIMIT, value

    @property
    def out_body_bytes(self) -> int:
        """Largest body of a frame this end sends: max_body_bytes for a client, none beyond the
        frame limit for a server (its deliveries and pages carry stored messages)."""
        return self._out_body

    @property
    def buffered_bytes(self) -> int:
        """Bytes the receive buffer holds (at most 4 + max_frame_bytes + one fed chunk)."""
        return self._buffer.held

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed its side (EOF).

        Drain with `next_event` until `NEED_DATA` before feeding again: the buffer refuses
        (`LocalProtocolError`) to grow past ``4 + max_frame_bytes`` unconsumed bytes plus one
        chunk. Also raises `LocalProtocolError` after EOF or in state ERROR.
        """
        if self._state is _ERROR:
            raise LocalProtocolError(ErrorCode.INTERNAL, "connection is in ERROR state")
        self._buffer.feed(data)

    def next_event(self):  # -> frame | NEED_DATA | CLOSED
        """The next frame from the peer, `NEED_DATA`, or `CLOSED` (EOF and nothing pending).

        Raises `RemoteProtocolError` if the peer broke the protocol (see the module docstring
        for which errors are fatal), and `LocalProtocolError` if called in state ERROR.
        """
        state = self._state
        if state is _ERROR:
            raise LocalProtocolError(ErrorCode.INTERNAL, "connection is in ERROR state")
        try:
            d = self._next_map()
        except RemoteProtocolError:
            self._enter(_ERROR)
            raise
        if d is None:
            return CLOSED if self._buffer.eof else NEED_DATA
        t = d["t"]
        new = self._their_moves.get(t)
        if new is None:
            raise self._illegal(d, t)
        try:
            frame = self._decoders[t](d, self._in_body)
        except FieldError as exc:
            if t != "bye":
                raise self._invalid(d, t, str(exc)) from None
            frame = Bye()  # a bye ends the connection whatever its optional reason holds
        if t == "error" and frame.close:
            new = self._their_moves[ERROR_CLOSE]
        if new is not state:
            self._enter(new)
            if type(frame) is Welcome:
                self._buffer.max_frame_bytes = min(frame.max_frame, self._buffer.max_frame_bytes)
        return frame

    def _illegal(self, d: dict, t: str) -> RemoteProtocolError:
        rid = _request_id(d)
        if t not in KNOWN_TYPES and self._state is _OPEN:
            return RemoteProtocolError(
                ErrorCode.UNKNOWN_TYPE, f"unknown frame type {t[:64]!r}", rid, fatal=False
            )
        was = self._state.name
        self._enter(_ERROR)
        return RemoteProtocolError(
            ErrorCode.BAD_FRAME, f"frame {t[:64]!r} not allowed in state {was}", rid
        )

    def _invalid(self, d: dict, t: str, why: str) -> RemoteProtocolError:
        rid = _request_id(d)
        if self._state is _OPEN:
            return RemoteProtocolError(ErrorCode.INVALID, f"{t}: {why}", rid, fatal=False)
        self._enter(_ERROR)
        return RemoteProtocolError(ErrorCode.INVALID, f"{t}: {why}", rid)

    # -- sending --------------------------------------------------------------------------

    def send(self, frame) -> bytes:
        """The bytes to write for `frame`, after checking direction, state and every field.

        Raises `LocalProtocolError` (and changes nothing) if this role may not send the frame,
        the state forbids it, a field is invalid, or the encoded frame exceeds
        max_frame_bytes. After ``welcome`` (server) the agreed max_frame applies.
        """
        cls = type(frame)
        compiled = self._compiled.get(cls)
        if compiled is not None and self._our_moves.get(cls.TYPE) is self._state:
            # The short way of the two frames every message costs (`deliver`, `result`): legal
            # now and leaving the state as it is, compiled (every field plain), within
            # max_frame. Anything else takes the long way below, which decides, without
            # calling the compiled encoder again.
            data = compiled(frame, self._out_body)
            if data is not None and len(data) - 4 <= self._buffer.max_frame_bytes:
                return data
            compiled = None  # tried: None (not plain) or too large, which the checks say
        else:
            compiled, data = _COMPILED.get(cls), None
        t = getattr(cls, "TYPE", None)
        if t is None or self._outgoing.get(t) is not cls:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, f"a {self.our_role.name} cannot send {cls.__name__}"
            )
        new = self._our_moves.get(ERROR_CLOSE if t == "error" and frame.close else t)
        if new is None:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, f"cannot send {t!r} in state {self._state.name}"
            )
        if data is None and compiled is not None:
            data = compiled(frame, self._out_body)
        if data is None:  # not compiled, or not a plain frame: the Python checks decide
            try:
                body = _packer().pack(spec_of(cls).checked(frame, self._out_body))
            except FieldError as exc:
                raise LocalProtocolError(ErrorCode.INVALID, f"{t}: {exc}") from None
            except (TypeError, ValueError, AttributeError) as exc:
                field = _not_utf8(frame) if isinstance(exc, UnicodeEncodeError) else None
                if field is not None:  # text made from bytes that were not UTF-8 (argv, a file)
                    name, where = field
                    raise LocalProtocolError(ErrorCode.INVALID, (
                        f"{t}: bad value for field {name!r}: not UTF-8 text (a lone surrogate "
                        f"at character {where}: bytes that were not UTF-8 where it came "
                        "from)")) from None
                raise LocalProtocolError(ErrorCode.INVALID, f"{t}: cannot encode: {exc}") from None
            data = _pack_prefix(len(body)) + body
        if len(data) - 4 > self._buffer.max_frame_bytes:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE, f"{t} frame of {len(data) - 4} bytes exceeds max_frame"
            )
        if new is not self._state:
            self._enter(new)
            if cls is Welcome:
                self._buffer.max_frame_bytes = frame.max_frame
        return data

    def send_prepared(self, prepared: PreparedDeliver, inbox_seq: int, muted: bool) -> bytes:
        """The bytes `send` would return for `prepared`'s ``deliver`` with this `inbox_seq`
        and `muted`, without checking and packing the shared fields again (protocol.prepared).

        Raises `LocalProtocolError` as `send` does: this role or state may not send ``deliver``,
        `inbox_seq` is not a uint, `prepared` was checked against a larger body limit than this
        connection's, or the frame exceeds max_frame_bytes.
        """
        if "deliver" not in self._our_moves:
            raise LocalProtocolError(
                ErrorCode.INTERNAL,
                f"a {self.our_role.name} cannot send 'deliver' in state {self._state.name}",
            )
        if prepared.max_body_bytes > self._out_body:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, "deliver: prepared for a larger body limit than ours"
            )
        data = prepared.bytes_for(inbox_seq, muted)
        if len(data) - 4 > self._buffer.max_frame_bytes:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE, f"deliver frame of {len(data) - 4} bytes exceeds max_frame"
            )
        return data


# Frames checked and encoded in C when every field is plain (protocol/native.py).
_COMPILED = {} if native.wire is None else {Deliver: native.wire.deliver,
                                            Result: native.wire.result}


def _not_utf8(frame: tuple) -> tuple[str, int] | None:
    """The wire name of the first field of `frame` holding text UTF-8 cannot encode (lone
    surrogates), with the character where it fails; None if there is none."""
    for attr, value in zip(type(frame)._fields, frame, strict=True):
        for text in value if isinstance(value, list | tuple) else (value,):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return wire_key(attr), exc.start
    return None


def _request_id(d: dict) -> int | None:
    rid = d.get("id")
    return rid if uint(rid) else None


def _check_limit(value: int) -> None:
    if type(value) is not int or not MIN_FRAME_LIMIT <= value <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame_bytes must be an int in {MIN_FRAME_LIMIT}..{MAX_FRAME_LIMIT}")
