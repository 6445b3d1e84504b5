"""Pure projections: `apply(tables, event) -> Effects`, used live and by replay alike.

Tables and encodings are those of docs/DESIGN.md, "Projections". Integers in values are 8-byte
big-endian; `\\0` separates key parts (user and conv ids never contain it). Rules kept:

* Marks (`delivered`, `recv`, `read`) are high-water marks: they only move up, so a late or
  duplicate receipt changes nothing.
* `apply` reads and writes only through `tables` (get / put / delete / range over one prefix)
  and never fails on an event the rules accepted, so replaying the log rebuilds the same bytes.
* A member's `read` and `recv` marks start at the conversation's `last_seq` when they are added,
  so joining a long conversation does not count its history as unread.
* `apply` does not record the applied position: whoever folds (a batch of `execute`, a replay)
  calls `mark_applied` once at the end, in the same transaction.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from storage import native
from storage import records as r
from storage.buffered_tables import BufferedTables, BufTable
from storage.errors import CorruptLog, CorruptProjection, undecodable
from storage.memory_tables import DigestTable, ListedTable, MemoryTables
from storage.records import Event, pack_u64, pack_u64x2, u64, unpack_u64x2
from storage.records import unpack_u64 as _u64
from storage.tables import TABLES, TxnTables

__all__ = ["TABLES", "BufferedTables", "Effects", "MemoryTables", "Tables", "TxnTables", "apply",
           "mark_applied"]

APPLIED_LSN = b"applied_lsn"
MUTED = b"1"

KIND_MSG = "msg"
KIND_ADDED = "added"
KIND_REMOVED = "removed"
INBOX_KINDS = frozenset({KIND_MSG, KIND_ADDED, KIND_REMOVED})

# One packer for inbox entries: `msgpack.packb` builds a Packer per call, which costs as much as
# the packing. Sharing it is safe: `pack` runs in C under the GIL and resets after each call.
_pack = msgpack.Packer(autoreset=True).pack


class Table(Protocol):
    """One table of a `Tables` view: `view[key]` is the value, None when absent."""

    def __getitem__(self, key: bytes) -> bytes | None: ...

    def __setitem__(self, key: bytes, value: bytes) -> None: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]: ...

    def count(self, prefix: bytes) -> int: ...


class GroupedTable(Table, Protocol):
    """A table keyed `head \\0 tail`: `parts[head \\0]` lists the group's rows as
    `(tail, tail \\0, tail as text)` in key order (see `tables.Parts`), and `managers(head \\0)`
    counts those whose value is an owner's or admin's role (`tables.MANAGER_ROLES`)."""

    parts: Mapping[bytes, tuple[tuple[bytes, bytes, str], ...]]

    def managers(self, head: bytes) -> int: ...


class Tables(Protocol):
    """The key-value view `apply` works on: one `Table` attribute per name in `TABLES`.

    `get/put/delete/range(table, ...)` by name do the same, for code off the hot path.
    """

    conv: Table
    conv_seq: Table
    msg: Table
    member: GroupedTable
    user_conv: GroupedTable
    inbox: Table
    inbox_head: Table
    delivered: Table
    recv: Table
    read: Table
    idem: Table
    created: Table
    mute: Table
    revoked: Table
    meta: Table

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def put(self, table: str, key: bytes, value: bytes) -> None: ...

    def delete(self, table: str, key: bytes) -> None: ...

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass(slots=True)
class Effects:
    """What an event changed that the broker must act on (wake deliveries, send receipts)."""

    inbox_heads: dict[str, int] = field(default_factory=dict)
    # (a new message's compiled send leaves both as store.NO_CHANGES, an empty tuple: an
    # Effects a batch returned is read, never added to; `merge`, which extended them and had
    # no caller since 68ddbab, went with it, 2026-12-07)
    receipts: list[tuple[str, str, str, int]] = field(default_factory=list)
    membership: list[tuple[str, str, str | None]] = field(default_factory=list)
    conv: str | None = None
    seq: int | None = None
    lsn: int = 0
    # The message.accepted event's fields in the order of broker/hub.py's `Fresh` (lsn, conv,
    # seq, sender, device, body, cid, ts_us): fan-out need not re-read it. A tuple, not the
    # Event: the commit thread makes it and the event loop frees it, one object a send.
    message: tuple[int, str, int, str, str, Any, str, int] | None = None


def key2(a: str, b: str) -> bytes:
    """Return the key `a \\0 b`."""
    return f"{a}\0{b}".encode()


def idem_key(user: str, cid: str) -> bytes:
    """Return the `idem` key of `user`'s send with `cid`: cid first (docs/DESIGN.md, "Projections";
    `add_message` and storage/_fold.c build the same bytes)."""
    return key2(cid, user)


def inbox_key(user: str, inbox_seq: int) -> bytes:
    """Return the inbox key of `user`'s entry number `inbox_seq`."""
    return user.encode() + b"\0" + pack_u64(inbox_seq)


def conv_value(kind: str, name: str | None, open_: bool, creator: str | None,
               created_lsn: int) -> bytes:
    """Encode a `conv` row; the key order is fixed so equal rows are equal bytes.

    The row never changes after `conv.created`; the moving `last_seq` lives in `conv_seq`.
    """
    return msgpack.packb({"kind": kind, "name": name, "open": open_, "creator": creator,
                          "created_lsn": created_lsn})


def idem_value(conv: bytes, seq: int, lsn: int) -> bytes:
    """Encode an `idem` row: seq and lsn (8 bytes each, big-endian), then the conv id."""
    return pack_u64x2(seq, lsn) + conv


def decode_idem(value: bytes) -> tuple[str, int, int]:
    """Return `(conv, seq, lsn)` from an `idem` row."""
    seq, lsn = unpack_u64x2(value[:16])
    return value[16:].decode(), seq, lsn


# Decoding the rows a write batch reads (rules and `apply`): a value that is no row homing
# writes raises CorruptProjection naming its table and key, where it is decoded, so that any
# other exception in a batch is a bug (`Store.execute`: InternalError). A `try` costs nothing
# until it raises (Python 3.11).


def row_u64(table: str, key: bytes, value: bytes) -> int:
    """The integer of the stored u64 row `key` of `table`."""
    try:
        return u64(value)
    except struct.error as exc:
        raise undecodable(table, key, exc) from None


def row_text(table: str, key: bytes, value: bytes) -> str:
    """The stored row `key` of `table` as text (`member`, `user_conv`, `created`)."""
    try:
        return value.decode()
    except ValueError as exc:
        raise undecodable(table, key, exc) from None


def conv_row(key: bytes, value: bytes) -> dict[str, Any]:
    """The stored `conv` row `key` decoded, with the fields the rules use."""
    try:
        info = decode(value)
        _ = info["kind"], info["open"], info["name"]
    except (ValueError, TypeError, LookupError, msgpack.UnpackException) as exc:
        raise undecodable("conv", key, exc) from None
    return info


def idem_row(key: bytes, value: bytes) -> tuple[str, int, int]:
    """`decode_idem` of the stored `idem` row `key`."""
    try:
        return decode_idem(value)
    except (struct.error, ValueError) as exc:
        raise undecodable("idem", key, exc) from None


def message_fault(tables: Tables, ckey: bytes, exc: Exception,
                  sender: bytes | None = None) -> CorruptProjection | None:
    """The damaged row that `add_message` (or the compiled send) of conversation `ckey` by
    `sender` met when it raised `exc`, or None (then `exc` is no damaged row's). The cold
    path: the rows it decodes, read again (the counters `conv_seq` and each member's
    `inbox_head`, which have a next value; the members' ids; the sender's `read` and `recv`
    marks, 8 bytes each since 2026-12-05)."""
    if not isinstance(exc, struct.error | ValueError):
        return None
    rows = [("conv_seq", ckey)]
    prefix = ckey + b"\0"
    for key, _role in tables.member.range(prefix):
        try:
            key[len(prefix):].decode()
        except ValueError as bad:
            return undecodable("member", key, bad)
        rows.append(("inbox_head", key[len(prefix):]))
    for table, key in rows:
        value = getattr(tables, table)[key]
        if value is None:
            continue
        try:
            if u64(value) == (1 << 64) - 1:
                return CorruptProjection(table, key, "a counter at its greatest value")
        except struct.error as bad:
            return undecodable(table, key, bad)
    if sender is not None:  # the sender's marks, raised last
        for table in ("read", "recv"):
            key = prefix + sender
            value = getattr(tables, table)[key]
            if value is not None and len(value) != 8:
                return undecodable(table, key, struct.error(
                    "unpack requires a buffer of 8 bytes"))
    return None


def is_direct(conv: str) -> bool:
    """Return whether `conv` is a direct conversation (the kind is fixed by the id prefix)."""
    return conv.startswith("dm:")


def decode(value: bytes):
    """Decode a msgpack projection value."""
    return msgpack.unpackb(value, raw=False)


def get_u64(tables: Tables, table: str, key: bytes) -> int:
    """Return the integer stored at `key`, 0 when absent (CorruptProjection: not 8 bytes)."""
    value = tables.get(table, key)
    return 0 if value is None else row_u64(table, key, value)


def _raise(tables: Tables, table: str, key: bytes, value: int) -> bool:
    """Raise the high-water mark at `key` to `value`; return whether it moved."""
    old = tables.get(table, key)
    if old is not None and row_u64(table, key, old) >= value:
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
               conv_value(d["kind"], d.get("name"), bool(d.get("open")), creator, ev.lsn))
    cid = d.get("cid")
    if cid is not None:  # a create with a cid (since layout 5): its repeats find it
        # No record homing writes (the replay says corrupt_log): a cid not text, or one whose
        # key LMDB cannot hold (a rebuild's write died with lmdb.BadValsizeError).
        if r.unkeyable_cid(cid):
            raise TypeError(f"conv.created with a cid of {type(cid).__name__} {cid!r:.60}")
        tables.put("created", key2(ev.user, cid), d["conv"].encode())
    fx.conv = d["conv"]


def _member_added(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user, role = d["conv"], d["user"], d["role"]
    mkey = key2(conv, user)
    last_seq = get_u64(tables, "conv_seq", conv.encode())
    if last_seq and tables.get("member", mkey) is None:
        # Joining after messages: those before are not theirs to receive or read (`receipts`
        # leaves them out of theirs), though their marks start past them (not unread).
        tables.put("joined", mkey, pack_u64(last_seq))
    tables.put("member", mkey, role.encode())
    tables.put("user_conv", key2(user, conv), role.encode())
    if last_seq:
        _raise(tables, "recv", mkey, last_seq)
        _raise(tables, "read", mkey, last_seq)
    if ev.user != user and not is_direct(conv):
        _append_inbox(tables, user, [KIND_ADDED, conv, last_seq, ev.lsn], fx)
    fx.conv = conv
    fx.membership.append((conv, user, role))


def _member_removed(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user = d["conv"], d["user"]
    tables.delete("member", key2(conv, user))
    tables.delete("joined", key2(conv, user))
    tables.delete("user_conv", key2(user, conv))
    if ev.user != user and not is_direct(conv):
        last_seq = get_u64(tables, "conv_seq", conv.encode())
        _append_inbox(tables, user, [KIND_REMOVED, conv, last_seq, ev.lsn], fx)
    fx.conv = conv
    fx.membership.append((conv, user, None))


def _member_role_set(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user, role = d["conv"], d["user"], d["role"]
    tables.put("member", key2(conv, user), role.encode())
    tables.put("user_conv", key2(user, conv), role.encode())
    fx.conv = conv
    fx.membership.append((conv, user, role))


def _message_accepted(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv = d["conv"]
    ckey = conv.encode()
    try:
        fx.seq = add_message(tables, ckey, conv, ev.user.encode(), d["cid"].encode(), ev.lsn,
                             fx.inbox_heads)
    except (struct.error, ValueError) as exc:
        raise message_fault(tables, ckey, exc, ev.user.encode()) or exc from None
    fx.conv = conv
    fx.message = (ev.lsn, conv, fx.seq, ev.user, ev.device, d["body"], d["cid"], ev.ts_us)


def add_message(tables: Tables, ckey: bytes, conv: str, sender: bytes, cid: bytes, lsn: int,
                heads: dict[str, int]) -> int:
    """Apply a `message.accepted` event given by its fields (ids as the bytes the tables are
    keyed by); record each inbox head that moved in `heads`; return the message's seq.

    The hot path of execute and of every replay (`storage.fold` calls it straight from raw
    records): calls are inlined on purpose, each table view is fetched once, and rows are
    written by subscript (with MemoryTables, plain dict operations in C). This is the reference
    version; where storage/_fold.c was built, the module name `add_message` is bound to its
    translation instead (`COMPILED`, below).
    """
    conv_seq = tables.conv_seq
    old = conv_seq[ckey]
    seq = 1 if old is None else _u64(old)[0] + 1
    seq_b = pack_u64(seq)
    conv_seq[ckey] = seq_b
    prefix = ckey + b"\0"
    tables.msg[prefix + seq_b] = pack_u64(lsn)
    entry = _pack([KIND_MSG, conv, seq, lsn])
    sender_member = False
    inbox_head = tables.inbox_head
    inbox = tables.inbox
    for ukey, ukey0, user in tables.member.parts[prefix]:
        old = inbox_head[ukey]
        head = 1 if old is None else _u64(old)[0] + 1
        inbox_head[ukey] = head_b = pack_u64(head)
        inbox[ukey0 + head_b] = entry
        heads[user] = head
        if ukey == sender:
            sender_member = True
    if sender_member:
        mark = prefix + sender
        for view in (tables.read, tables.recv):
            old = view[mark]
            if old is None:
                view[mark] = seq_b
            elif len(old) != 8:  # a damaged mark (`message_fault` names it)
                raise struct.error("unpack requires a buffer of 8 bytes")
            elif old < seq_b:  # equal-length big-endian: bytes order is int order
                view[mark] = seq_b
    tables.idem[cid + b"\0" + sender] = pack_u64x2(seq, lsn) + ckey
    return seq


py_add_message = add_message  # the reference, kept under its own name for the tests
COMPILED = native.ext is not None  # storage/_fold.c runs the hot loops (storage.native)
if native.ext is not None:
    native.ext.configure(KIND_MSG, DigestTable, ListedTable, BufTable)
    add_message = native.ext.add_message  # same rows: tests/storage/test_fold_compiled.py


def acked_convs(tables: Tables, user: str, old: int, upto: int) -> dict[str, int]:
    """The highest conv seq per conversation among `user`'s message entries in (old, upto]."""
    top: dict[str, int] = {}
    ukey = user.encode() + b"\0"
    key = ukey
    try:
        for inbox_seq in range(old + 1, upto + 1):
            key = ukey + pack_u64(inbox_seq)
            value = tables.get("inbox", key)
            if value is None:
                continue
            kind, conv, seq, _lsn = decode(value)
            if kind == KIND_MSG and seq > top.get(conv, 0):
                top[conv] = seq
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise undecodable("inbox", key, exc) from None
    return top


def user_mark_key(user: str) -> bytes:
    """The `delivered` key of `user`'s highest device mark: `user \0` and no device (a device id
    is never empty, storage/rules.py `valid_id`), so it sorts just before the user's device rows
    and an ack's two puts mostly land on one page."""
    return key2(user, "")


def acked_by_any(tables: Tables, user: str) -> int:
    """The highest inbox seq a device of `user` acked (0 when none did): one row, whatever the
    number of devices (`user_mark_key`). `recv` is per user, and every accepted ack raised it
    over the entries it covered, so the entries up to it are counted there already."""
    return get_u64(tables, "delivered", user_mark_key(user))


def _delivery_acked(tables: Tables, ev: Event, fx: Effects) -> None:
    user = ev.user
    dkey = key2(user, ev.device)
    old = get_u64(tables, "delivered", dkey)
    upto = ev.data["upto"]
    if upto <= old:
        return
    tables.put("delivered", dkey, pack_u64(upto))
    _raise(tables, "delivered", user_mark_key(user), upto)  # the highest of the user's marks
    convs = ev.data.get("convs")  # decided by the rules (storage/rules.py `_ack`)
    if convs is None:  # an event written before acks carried them: read the inbox, as then
        convs = acked_convs(tables, user, old, upto)
    for conv, seq in convs.items():
        mark = key2(conv, user)
        # An ack made while not a member (of entries delivered before leaving or a removal) is
        # no receipt, though its mark moves: the broker checks membership as of the end of the
        # batch, so one committed with the invite that takes the user back was pushed.
        if _raise(tables, "recv", mark, seq) and tables.get("member", mark) is not None:
            fx.receipts.append((conv, user, "delivered", seq))


def _read_marked(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    conv, user = d["conv"], ev.user
    ckey = conv.encode()
    if tables.get("conv", ckey) is None:
        return
    upto = min(d["upto"], get_u64(tables, "conv_seq", ckey))
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


def _tokens_revoked(tables: Tables, ev: Event, fx: Effects) -> None:
    d = ev.data
    key = d["user"].encode()
    if d["before"] > get_u64(tables, "revoked", key):  # a cut-off only moves forward
        tables.put("revoked", key, pack_u64(d["before"]))


_APPLY = {
    r.CONV_CREATED: _conv_created,
    r.MEMBER_ADDED: _member_added,
    r.MEMBER_REMOVED: _member_removed,
    r.MEMBER_ROLE_SET: _member_role_set,
    r.MESSAGE_ACCEPTED: _message_accepted,
    r.DELIVERY_ACKED: _delivery_acked,
    r.READ_MARKED: _read_marked,
    r.MUTE_SET: _mute_set,
    r.TOKENS_REVOKED: _tokens_revoked,
}


def apply(tables: Tables, event: Event, fx: Effects | None = None) -> Effects:
    """Apply one logged event to `tables` and return what changed.

    Pass `fx` to accumulate the effects of several events (one command) into one object. The
    caller records the position reached with `mark_applied` once per fold (batch, replay).
    """
    if fx is None:
        fx = Effects()
    fx.lsn = event.lsn
    try:
        fold_event = _APPLY[event.type]
    except KeyError:  # a newer homing's event, met by a replay: not a crash, a log we cannot use
        raise CorruptLog(event.lsn, f"unknown event type {event.type!r}") from None
    fold_event(tables, event, fx)
    return fx


def mark_applied(tables: Tables, lsn: int) -> None:
    """Record `lsn` as the last event applied to `tables` (`meta.applied_lsn`); 0 records none."""
    if lsn:
        tables.put("meta", APPLIED_LSN, pack_u64(lsn))
