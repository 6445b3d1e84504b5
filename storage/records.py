"""Stored events and their on-disk form (docs/DESIGN.md, "Stored events").

A record is keyed by its LSN (8-byte big-endian) and its value is `digest || body`, with
`body = msgpack([lsn, ts_us, type, user, device, data])` and
`digest = blake2b(prev_digest || body, digest_size=32)`; the first prev_digest is `GENESIS`.
Events are past-tense facts and never change once written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import msgpack

CONV_CREATED = "conv.created"
MEMBER_ADDED = "member.added"
MEMBER_REMOVED = "member.removed"
MEMBER_ROLE_SET = "member.role_set"
MESSAGE_ACCEPTED = "message.accepted"
DELIVERY_ACKED = "delivery.acked"
READ_MARKED = "read.marked"
MUTE_SET = "mute.set"
TOKENS_REVOKED = "tokens.revoked"

EVENT_TYPES = frozenset(
    {CONV_CREATED, MEMBER_ADDED, MEMBER_REMOVED, MEMBER_ROLE_SET, MESSAGE_ACCEPTED,
     DELIVERY_ACKED, READ_MARKED, MUTE_SET, TOKENS_REVOKED}
)

# The last microsecond a stored time may name (9999-12-31T23:59:59.999999Z, the last a date
# holds): a record with a time outside 0..MAX_TS_US was not written by a homing's clock, and an
# audit could not print it (`verify` fails it; the readers of storage/audit.py say corrupt_log).
MAX_TS_US = 253402300799999999

# A cid's keys (idem: cid \0 user; created: user \0 cid) must fit LMDB's keys of at most 511
# bytes: with a user id of up to 64 bytes, 446 would; 400 is the documented limit
# (docs/PROTOCOL.md). The rules accept no longer one, and the replay applies none.
MAX_CID_BYTES = 400


# LMDB's longest key (its default MDB_MAXKEYSIZE). A projection key is one id, or two joined by
# a NUL, or an id, a NUL and an 8-byte number; the ids of the events homing writes are far
# shorter (user and device ids 64 characters, conversation ids 160, cids 400 bytes).
MAX_KEY_BYTES = 511
# Ids whose lengths add up to at most this make keys that fit, whatever they are joined with:
# the replays check the exact keys only of events past it (storage/_fold.c leaves them to
# Python), which homing's own events hardly ever are.
KEYS_FIT_BYTES = 400


def _size(part: object) -> int:
    """The bytes of a key part: a str's UTF-8, a bytes' own; 0 for anything else."""
    if type(part) is bytes:
        return len(part)
    return len(part.encode()) if type(part) is str else 0


def key_fault(user: object, device: object, conv: object = None, cid: object = None,
              other: object = None, convs: object = ()) -> str | None:
    """Why the replay of an event with these ids (str, or bytes in a raw replay) cannot write
    its rows: a key longer than LMDB holds, which no event of homing's has (a record chained on
    by hand); None when every key fits. `user` and `device` are the actor's, `other` the user
    a membership event or a revocation names, `convs` the conversations an ack names. The
    keys: the actor's device (`delivered`), a user alone and with an inbox number (`revoked`,
    `inbox_head`, `inbox`), the conversation alone and with a sequence number (`conv_seq`,
    `msg`), the conversation with the actor or `other` (`member`, `user_conv`, `recv`, `read`,
    `mute`), and the cid with the actor (`idem`, `created`)."""
    actor = _size(user)
    longest = max(actor + 1 + _size(device), actor + 9, _size(other) + 9)
    if conv is not None:
        size = _size(conv)
        longest = max(longest, size + 9, size + 1 + max(actor, _size(other)))
    if cid is not None:
        longest = max(longest, _size(cid) + 1 + actor)
    if type(convs) is dict:
        longest = max(longest, *(_size(c) + 1 + actor for c in convs), 0)
    if longest <= MAX_KEY_BYTES:
        return None
    return f"a key of {longest} bytes, more than LMDB's {MAX_KEY_BYTES}"


def event_key_fault(user: object, device: object, data: dict) -> str | None:
    """`key_fault` of an event's ids, from its decoded `data`."""
    return key_fault(user, device, data.get("conv"), data.get("cid"), data.get("user"),
                     data.get("convs", ()))


def unkeyable_cid(cid: object) -> bool:
    """Whether a logged create's `cid` is one no homing writes and no key can hold: not text,
    or over MAX_CID_BYTES of UTF-8 (None is no cid). `verify` fails such a record, and the
    replay refuses it (corrupt_log), so the two agree."""
    return cid is not None and (type(cid) is not str or len(cid.encode()) > MAX_CID_BYTES)


DIGEST_BYTES = 32
GENESIS = bytes(DIGEST_BYTES)

_U64 = struct.Struct(">Q")
pack_u64 = _U64.pack
_unpack_u64 = _U64.unpack
unpack_u64 = _U64.unpack  # returns a 1-tuple; `u64` below unwraps it
_U64X2 = struct.Struct(">QQ")
pack_u64x2 = _U64X2.pack
unpack_u64x2 = _U64X2.unpack


@dataclass(slots=True)
class Event:
    """One stored fact: who (`user`, `device`) did what (`type`, `data`) at `ts_us`, at `lsn`.

    `lsn` is 0 until the log assigns it.
    """

    lsn: int
    ts_us: int
    type: str
    user: str
    device: str
    data: dict[str, Any]


def encode_body(event: Event) -> bytes:
    """Return the msgpack body `[lsn, ts_us, type, user, device, data]` of `event`."""
    return msgpack.packb(
        [event.lsn, event.ts_us, event.type, event.user, event.device, event.data],
        use_bin_type=True,
    )


def decode_body(body: bytes) -> Event:
    """Return the event encoded in `body` (the inverse of `encode_body`)."""
    return Event(*msgpack.unpackb(body, raw=False))


def chain(prev_digest: bytes, body: bytes) -> bytes:
    """Return the digest of a record whose predecessor's digest is `prev_digest`."""
    h = blake2b(prev_digest, digest_size=DIGEST_BYTES)
    h.update(body)
    return h.digest()


def lsn_key(lsn: int) -> bytes:
    """Return the log key of `lsn`: 8 bytes, big-endian, so keys sort by LSN."""
    return _U64.pack(lsn)


def key_lsn(key: bytes) -> int:
    """Return the LSN stored in a log key."""
    return _unpack_u64(key)[0]


def u64(value: bytes) -> int:
    """Decode an 8-byte big-endian integer (projection values, inbox sequence numbers)."""
    return _unpack_u64(value)[0]
