"""A ``deliver`` frame encoded once for all of its recipients (PROTOCOL.md §2, §5.3, §9).

A message posted to a conversation of N members becomes N ``deliver`` frames that differ only in
``inbox_seq`` (each member's own inbox position) and ``muted``. Checking and packing the same map
N times was about a quarter of the broker's CPU in a channel fan-out, so `PreparedDeliver` checks
the shared fields once and keeps their msgpack bytes; `bytes_for` joins the per-recipient parts.

Rules kept here:

* The output is byte for byte what `Connection.send` produces for the same `Deliver` (keys in
  the same order, ints in their smallest msgpack form, ``muted`` left out when false), so a
  client cannot tell the two apart; the tests compare them.
* Every field is checked once, with the same checks as `Connection.send`; ``inbox_seq`` is
  checked on each use. Direction, state and the agreed max_frame belong to the connection:
  send through `Connection.send_prepared`, which checks them.
"""

from __future__ import annotations

import struct

import msgpack

from .errors import ErrorCode, LocalProtocolError
from .fields import MAX_BODY_BYTES, UINT_MAX
from .frames import Deliver, FieldError, spec_of

_pack_prefix = struct.Struct(">I").pack
_u8, _u16, _u32, _u64 = (struct.Struct(f">B{c}").pack for c in "BHIQ")
_FIXINT = [bytes((i,)) for i in range(0x80)]


def _packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _pack_uint(n: int) -> bytes:
    """`n` (0 <= n < 2**64) as msgpack packs it: the smallest of fixint, uint 8/16/32/64."""
    if n < 0x80:
        return _FIXINT[n]
    if n <= 0xFF:
        return _u8(0xCC, n)
    if n <= 0xFFFF:
        return _u16(0xCD, n)
    if n <= 0xFFFFFFFF:
        return _u32(0xCE, n)
    return _u64(0xCF, n)


_MUTED = _packb("muted") + _packb(True)
_T_AND_SEQ_KEY = _packb("t") + _packb(Deliver.TYPE) + _packb("inbox_seq")
_DELIVER = spec_of(Deliver)


class PreparedDeliver:
    """The shared part of one message's ``deliver`` frames; `bytes_for` makes each recipient's.

    Raises `LocalProtocolError` (INVALID) if a field is invalid, as `Connection.send` would.
    """

    __slots__ = ("_head", "_head_muted", "_size", "_tail", "max_body_bytes")

    def __init__(self, kind: str, conv: str, seq: int, sender: str, body: str | bytes | None,
                 cid: str | None, ts: int, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        frame = Deliver(inbox_seq=0, kind=kind, conv=conv, seq=seq, sender=sender, body=body,
                        cid=cid, ts=ts, muted=False)
        try:
            wire = _DELIVER.checked(frame, max_body_bytes)
            # Encoded as Connection.send would: "t", "inbox_seq", then the rest in table order.
            del wire["t"], wire["inbox_seq"]
            rest = _packb(wire)  # at most 8 pairs: a fixmap, whose header is its first byte
        except FieldError as exc:
            raise LocalProtocolError(ErrorCode.INVALID, f"deliver: {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise LocalProtocolError(ErrorCode.INVALID, f"deliver: cannot encode: {exc}") from None
        pairs = len(wire) + 2
        self._head = bytes((0x80 | pairs,)) + _T_AND_SEQ_KEY
        self._head_muted = bytes((0x80 | (pairs + 1),)) + _T_AND_SEQ_KEY
        self._tail = rest[1:]
        self._size = len(self._head) + len(self._tail)
        self.max_body_bytes = max_body_bytes  # the body limit the fields were checked against

    def bytes_for(self, inbox_seq: int, muted: bool) -> bytes:
        """The whole frame (length prefix and body) for one recipient.

        Raises `LocalProtocolError` (INVALID) if `inbox_seq` is not a uint.
        """
        if type(inbox_seq) is not int or not 0 <= inbox_seq <= UINT_MAX:
            raise LocalProtocolError(ErrorCode.INVALID, "deliver: bad value for field 'inbox_seq'")
        n = _pack_uint(inbox_seq)
        if muted:
            return (_pack_prefix(self._size + len(n) + len(_MUTED)) + self._head_muted + n
                    + self._tail + _MUTED)
        return _pack_prefix(self._size + len(n)) + self._head + n + self._tail
