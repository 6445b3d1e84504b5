"""Pure projections: `apply(tables, event) -> Effects`, used live and by replay alike.

Tables and encodings are those of docs/DESIGN.md, "Projections". Integers in values are 8-byte
big-endian; `\\0` separates key parts (user and conv ids never contain it). Rules kept:

* Marks (`delivered`, `recv`, `read`) are high-water marks: they only move up, so a late or
  duplicate receipt changes nothing.
* `apply` reads and writes only through `tables` (get / put / delete / range over one prefix)
  and never fails on an event the rules accepted, so replaying the log rebuilds the same bytes.
* A member's `read` and `recv` marks start at the conversation's `last_seq` when they are added,
  so joining a long conversation does not count its history as unread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import msgpack

from storage import records as r
from storage.records import Event, pack_u64, u64
from storage.tables import TABLES, BufferedTables, MemoryTables, TxnTables

__all__ = ["TABLES", "BufferedTables", "Effects", "MemoryTables", "Tables", "TxnTables", "apply"]

APPLIED_LSN = b"applied_lsn"
MUTED = b"1"

KIND_MSG = "msg"
KIND_ADDED = "added"
KIND_REMOVED = "removed"


class Tables(Protocol):
    """The key-value view `apply` works on: named tables of bytes keys and bytes values."""

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def put(self, table: str, key: bytes, value: bytes) -> None: ...

    def delete(self, table: str, key: bytes) -> None: ...

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass(slots=True)
class Effects:
    """What an event changed that the broker must act on (wake deliveries, send receipts)."""

    inbox_heads: dict[str, int] = field(default_factory=dict)
    receipts: list[tuple[str, str, str, int]] = field(default_factory=list)
    membership: list[tuple[str, str, str | None]] = field(default_factory=list)
    conv: str | None = None
    seq: int | None = None
    lsn: int = 0

    def merge(self, other: Effects) -> None:
        """Fold a later event's effects into these."""
        self.inbox_heads.update(other.inbox_heads)
        self.receipts.extend(other.receipts)
        self.membership.extend(other.membership)
        if other.conv is not None:
            self.conv = other.conv
        if other.seq is not None:
            self.seq = other.seq
        self.lsn = max(self.lsn, other.lsn)


def key2(a: str, b: str) -> bytes:
    """Return the key `a \\0 b`."""
    return f"{a}\0{b}".encode()


def inbox_key(user: str, inbox_seq: int) -> bytes:
    """Return the inbox key of `user`'s entry number `inbox_seq`."""
    return user.encode() + b"\0" + pack_u64(inbox_seq)


def conv_value(kind: str, name: str | None, open_: bool, creator: str | None, last_seq: int,
               created_lsn: int) -> bytes:
    """Encode a `conv` row; the key order is fixed so equal rows are equal bytes."""
    return msgpack.packb({"kind": kind, "name": name, "open": open_, "creator": creator,
                          "last_seq": last_seq, "created_lsn": created_lsn})


def decode(value: bytes):
    """Decode a msgpack projection value."""
    return msgpack.unpackb(value, raw=False)


def get_u64(tables: Tables, table: str, key: bytes) -> int:
    """Return the integer stored at `key`, 0 when absent."""
    value = tables.get(table, key)
    return 0 if value is None else u64(value)


def _raise(tables: Tables, table: str, key: bytes, value: int) -> bool:
    """Raise the high-water mark at `key` to `value`; return whether it moved."""
    old = tables.get(table, key)
    if old is not None and u64(old) >= value:
        return False
    tables.put(table, key, pack_u64(value))
    return True


def _append_inbox(tables: Tables, user: str, entry: list, fx: Effects) -> None:
    ukey = user.encode()
    head = get_u64(tables, "inbox_head", ukey) + 1
    tables.put("inbox", ukey + b"\0" + pack_u64(head), msgpack.packb(entry))
    tables.put("inbox_head", ukey, pack_u64(head))
    fx.inbox_heads[user] = head


def _conv_created(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    creator = None if d["kind"] == "direct" else ev.user
    tables.put("conv", d["conv"].encode(),
               conv_value(d["kind"], d.get("name"), bool(d.get("open")), creator, 0, ev.lsn))
    fx.conv = d["conv"]


def _member_added(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user, role = d["conv"], d["user"], d["role"]
    info = decode(tables.get("conv", conv.encode()))
    tables.put("member", key2(conv, user), role.encode())
    tables.put("user_conv", key2(user, conv), role.encode())
    last_seq = info["last_seq"]
    if last_seq:
        _raise(tables, "recv", key2(conv, user), last_seq)
        _raise(tables, "read", key2(conv, user), last_seq)
    if ev.user != user and info["kind"] != "direct":
        _append_inbox(tables, user, [KIND_ADDED, conv, last_seq, ev.lsn], fx)
    fx.conv = conv
    fx.membership.append((conv, user, role))


def _member_removed(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user = d["conv"], d["user"]
    tables.delete("member", key2(conv, user))
    tables.delete("user_conv", key2(user, conv))
    if ev.user != user:
        info = decode(tables.get("conv", conv.encode()))
        if info["kind"] != "direct":
            _append_inbox(tables, user, [KIND_REMOVED, conv, info["last_seq"], ev.lsn], fx)
    fx.conv = conv
    fx.membership.append((conv, user, None))


def _message_accepted(tables: Tables, ev: Event, fx: Effects) -> None:
    # The hot path of both execute and replay: calls are inlined on purpose.
    d = ev.data
    conv = d["conv"]
    ckey = conv.encode()
    get, put = tables.get, tables.put
    info = msgpack.unpackb(get("conv", ckey))
    seq = info["last_seq"] + 1
    info["last_seq"] = seq
    put("conv", ckey, msgpack.packb(info))
    lsn = ev.lsn
    seq_b = pack_u64(seq)
    put("msg", ckey + b"\0" + seq_b, pack_u64(lsn))
    entry = msgpack.packb([KIND_MSG, conv, seq, lsn])
    prefix = ckey + b"\0"
    cut = len(prefix)
    sender = ev.user.encode()
    sender_member = False
    heads = fx.inbox_heads
    for key, _role in list(tables.range("member", prefix)):
        ukey = key[cut:]
        old = get("inbox_head", ukey)
        head = 1 if old is None else u64(old) + 1
        head_b = pack_u64(head)
        put("inbox", ukey + b"\0" + head_b, entry)
        put("inbox_head", ukey, head_b)
        heads[ukey.decode()] = head
        if ukey == sender:
            sender_member = True
    if sender_member:
        mark = prefix + sender
        for table in ("read", "recv"):
            old = get(table, mark)
            if old is None or u64(old) < seq:
                put(table, mark, seq_b)
    put("idem", sender + b"\0" + d["cid"].encode(), msgpack.packb([conv, seq, lsn]))
    fx.conv = conv
    fx.seq = seq


def _delivery_acked(tables: Tables, ev: Event, fx: Effects) -> None:
    user = ev.user
    dkey = key2(user, ev.device)
    old = get_u64(tables, "delivered", dkey)
    upto = ev.data["upto"]
    if upto <= old:
        return
    tables.put("delivered", dkey, pack_u64(upto))
    top: dict[str, int] = {}
    ukey = user.encode() + b"\0"
    for inbox_seq in range(old + 1, upto + 1):
        value = tables.get("inbox", ukey + pack_u64(inbox_seq))
        if value is None:
            continue
        kind, conv, seq, _lsn = decode(value)
        if kind == KIND_MSG and seq > top.get(conv, 0):
            top[conv] = seq
    for conv, seq in top.items():
        if _raise(tables, "recv", key2(conv, user), seq):
            fx.receipts.append((conv, user, "delivered", seq))


def _read_marked(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user = d["conv"], ev.user
    raw = tables.get("conv", conv.encode())
    if raw is None:
        return
    upto = min(d["upto"], decode(raw)["last_seq"])
    mark = key2(conv, user)
    if _raise(tables, "recv", mark, upto):
        fx.receipts.append((conv, user, "delivered", upto))
    if _raise(tables, "read", mark, upto):
        fx.receipts.append((conv, user, "read", upto))
    fx.conv = conv


def _mute_set(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    key = key2(ev.user, d["conv"])
    if d["muted"]:
        tables.put("mute", key, MUTED)
    else:
        tables.delete("mute", key)
    fx.conv = d["conv"]


_APPLY = {
    r.CONV_CREATED: _conv_created,
    r.MEMBER_ADDED: _member_added,
    r.MEMBER_REMOVED: _member_removed,
    r.MESSAGE_ACCEPTED: _message_accepted,
    r.DELIVERY_ACKED: _delivery_acked,
    r.READ_MARKED: _read_marked,
    r.MUTE_SET: _mute_set,
}


def apply(tables: Tables, event: Event, fx: Effects | None = None) -> Effects:
    """Apply one logged event to `tables` and return what changed; also records `applied_lsn`.

    Pass `fx` to accumulate the effects of several events (one command) into one object.
    """
    if fx is None:
        fx = Effects()
    fx.lsn = event.lsn
    _APPLY[event.type](tables, event, fx)
    tables.put("meta", APPLIED_LSN, pack_u64(event.lsn))
    return fx
