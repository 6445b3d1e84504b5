"""The store's reads: the queries the broker makes of the projections and the log, and the
snapshots the audits compare.

`Queries` is the read side of `storage.store.Store`, which inherits it, so that every read is
`store.X(...)`. Its constructor takes what the reads use (the environment, its named databases,
the log) and sets up the cache of decoded log records that `deliverable` joins inbox entries
with, which the Store's commits fill too (`_remember`). Rules kept (docs/DESIGN.md, "The store"):

* Each read opens its own short read transaction and may be called from any thread.
* A projection row whose bytes do not decode raises CorruptProjection naming its table and key:
  the reads catch decoding errors around the whole read, and name the row on that cold path only
  (`_first_bad`). A log record a row names that is missing or damaged raises CorruptLog at its
  LSN (`LmdbLog.event_at`).
* Nothing here writes to the environment: the reads are safe next to a running broker, and on a
  read-only open.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from storage.errors import CorruptLog, CorruptProjection, undecodable
from storage.fold import fold
from storage.lmdb_env import LmdbEnv
from storage.lmdb_log import LmdbLog
from storage.memory_tables import MemoryTables, keyed_rows_digest, rows_digest
from storage.projections import (
    APPLIED_LSN,
    INBOX_KINDS,
    KIND_MSG,
    acked_by_any,
    acked_convs,
    conv_row,
    idem_key,
    idem_row,
    inbox_key,
    key2,
)
from storage.records import Event, pack_u64, u64
from storage.rules import MAX_CID_BYTES
from storage.tables import TABLES, TxnTables

RECORD_CACHE = 4096  # records kept for deliverable by default (emptied when full)
# What `deliverable` takes from a log record: (user, device, body, cid, ts_us). A tuple of
# plain values, which the cyclic GC stops tracking: thousands of cached Events (and their data
# dicts) kept alive across batches set off full collections of about 10 ms.
Record = tuple[str, str, Any, Any, int]


def _record(ev: Event) -> Record:
    """The part of `ev` that `deliverable` delivers."""
    data = ev.data
    return (ev.user, ev.device, data.get("body"), data.get("cid"), ev.ts_us)


def body_bytes(body: object) -> int:
    """The bytes of a message body on the wire: a text's UTF-8 length (PROTOCOL.md §4.1), a
    bin's own; 0 for none (a membership entry). An ASCII text's is its length, known at no cost
    (`str.isascii` reads a flag), so only other text pays an encode."""
    if type(body) is str:
        return len(body) if body.isascii() else len(body.encode())
    return len(body) if type(body) is bytes else 0


_MSG_SEQ = slice(-8, None)

# What decoding a projection row's bytes raises when they are no row homing writes (a u64 cut
# short: struct.error; msgpack's errors, ValueError and UnpackException; text that is no UTF-8;
# a value of the wrong kind: TypeError, KeyError, ...). The reads catch them around the whole
# read, not field by field (free until raised), and raise CorruptProjection naming the row.
_UNDECODABLE = (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError,
                msgpack.UnpackException)


def _first_bad(txn: lmdb.Transaction, dbs: dict[str, Any],
               rows: Sequence[tuple[str, bytes, Callable[[bytes], Any]]],
               exc: BaseException) -> CorruptProjection:
    """The error of a read that met `exc` decoding one of `rows` (`(table, key, decode)`): the
    first whose stored value `decode` fails on, named (the first of them if none fails again).
    The cold path: the reads themselves decode without checking."""
    for table, key, decoder in rows:
        value = txn.get(key, db=dbs[table])
        if value is not None:
            try:
                decoder(value)
            except _UNDECODABLE as again:
                return undecodable(table, key, again)
    return undecodable(rows[0][0], rows[0][1], exc)


def _start_after(prefix: bytes, after: str | None) -> bytes | None:
    """Where the rows under `prefix` whose rest sorts after `after` start (None, and "" too:
    at the first). Ids hold no NUL, so `after \0` sorts right after `after` and before the ids
    it is a prefix of."""
    return prefix + after.encode() + b"\0" if after else None


def _page_rows(rows: Iterable[tuple[bytes, bytes]], cut: int, limit: int | None,
               chars: int | None) -> Iterator[tuple[bytes, bytes]]:
    """The first of `rows`, keys of a `cut`-byte prefix: at most `limit` (None: no bound), and
    none after the one whose key's rest takes the rests' bytes past `chars` (None: no bound),
    so that a page whose frame holds at most `chars` bytes of ids reads one row past it."""
    used = 0
    for taken, row in enumerate(rows):
        if (limit is not None and taken >= limit) or (chars is not None and used > chars):
            return
        yield row
        used += len(row[0]) - cut


@dataclass(slots=True)
class InboxItem:
    """One inbox entry joined with its log record and the user's mute state, ready to deliver."""

    inbox_seq: int
    kind: str
    conv: str
    seq: int
    lsn: int
    sender: str
    device: str
    body: str | bytes | None
    cid: str | None
    ts_us: int
    muted: bool


class Queries:
    """The reads of one LMDB environment's event log and projections: the read side of `Store`."""

    def __init__(self, env: LmdbEnv, log: LmdbLog, record_cache: int = RECORD_CACHE) -> None:
        self._env = env
        self._dbs = env.dbs
        self._log = log
        # Decoded log records by LSN for `deliverable`: each batch's events as it commits (its
        # recipients are sent them next), and records read back, so a message delivered to many
        # inboxes is decoded at most once. Committed records never change: never stale. At
        # most `record_cache` of them (`homing serve --record-cache`), but a whole batch's.
        self._records: dict[int, Record] = {}
        self._record_cache = record_cache

    def _remember(self, events: dict[int, Record]) -> None:
        """Keep a committed batch's records for `deliverable`: its recipients are sent them
        next, and they are what the log records decode to (same fields, same types)."""
        records = self._records
        if len(records) + len(events) > self._record_cache:
            records.clear()
        records.update(events)

    # ---------------------------------------------------------------- reads

    def last_lsn(self) -> int:
        """Return the last committed LSN."""
        return self._log.last_lsn()

    def read_events(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[Event]:
        """Yield logged events from `from_lsn` to `to_lsn` (read in chunks, short txns)."""
        return self._log.read(from_lsn, to_lsn)

    def _get(self, table: str, key: bytes) -> bytes | None:
        with self._env.read() as txn:
            return txn.get(key, db=self._dbs[table])

    def _u64(self, table: str, key: bytes) -> int:
        value = self._get(table, key)
        if value is None:
            return 0
        try:
            return u64(value)
        except struct.error as exc:  # cut short: CorruptProjection, which the broker answers
            raise undecodable(table, key, exc) from None

    def inbox_head(self, user: str) -> int:
        """Return the last inbox seq of `user`, 0 when empty."""
        return self._u64("inbox_head", user.encode())

    def ack_convs(self, user: str, upto: int) -> tuple[tuple[str, int], ...]:
        """The conversation marks an ack of `user`'s inbox up to `upto` raises, as the rules
        read them for an ack without them (`Ack.convs` None): the highest conv seq per
        conversation among the message entries above the highest mark of the user's devices.
        One read transaction, in any thread: the broker reads a long inbox here, off the
        commit (a new device's start at the head, docs/PROTOCOL.md §9). Marks only go up, so
        an ack committed later with these is what it would be without them."""
        with self._env.read() as txn:
            tables = TxnTables(txn, self._dbs)
            return tuple(acked_convs(tables, user, acked_by_any(tables, user), upto).items())

    def revoked_before(self, user: str) -> int:
        """The issue time (Unix seconds) before which `user`'s tokens are revoked, 0 if none."""
        return self._u64("revoked", user.encode())

    def delivered(self, user: str, device: str) -> int:
        """Return the inbox seq `device` of `user` acknowledged, 0 when none."""
        return self._u64("delivered", key2(user, device))

    def sent(self, user: str, cid: str) -> bool:
        """Whether `user` has a message accepted with `cid` (a send of it again is a dup)."""
        if len(cid.encode()) > MAX_CID_BYTES:  # never accepted: its key would not fit LMDB's
            return False
        return self._get("idem", idem_key(user, cid)) is not None

    def sent_as(self, user: str, cid: str) -> tuple[str, int, int] | None:
        """The message `user` has accepted with `cid`: (conv, seq, lsn); None if none."""
        if len(cid.encode()) > MAX_CID_BYTES:  # never accepted, as for `sent`
            return None
        key = idem_key(user, cid)
        value = self._get("idem", key)
        return None if value is None else idem_row(key, value)

    def created(self, user: str, cid: str) -> str | None:
        """The conversation `user` created with `cid` (a create of it again is a dup), or None."""
        if len(cid.encode()) > MAX_CID_BYTES:  # never accepted: its key would not fit LMDB's
            return None
        return self._text("created", key2(user, cid))

    def muted(self, user: str, conv: str) -> bool:
        """Whether `user` muted `conv`."""
        return self._get("mute", key2(user, conv)) is not None

    def muted_among(self, conv: str, users: Iterable[str]) -> set[str]:
        """Those of `users` who muted `conv`, in one read transaction."""
        db = self._dbs["mute"]
        with self._env.read() as txn:
            return {user for user in users if txn.get(key2(user, conv), db=db) is not None}

    def read_mark(self, conv: str, user: str) -> int:
        """Return the conv seq `user` has read up to in `conv`."""
        return self._u64("read", key2(conv, user))

    def inbox_after(self, user: str, after_seq: int, limit: int) -> list[InboxItem]:
        """Return up to `limit` inbox entries of `user` after `after_seq`, joined for delivery."""
        return self.deliverable(user, after_seq, limit)[0]

    def deliverable(self, user: str, after_seq: int, limit: int,
                    skip_lsns: set[int] | None = None,
                    max_bytes: int | None = None) -> tuple[list[InboxItem], int]:
        """Up to `limit` inbox entries of `user` after `after_seq`, joined for delivery, and the
        last inbox seq looked at; with `max_bytes`, only until their bodies reach it in all (the
        entry that reaches it is the last one; always at least one).

        Entries whose log record is in `skip_lsns` (a device's own sends: it has them already)
        are passed over without reading the log, and removed from the set. An entry whose log
        record is damaged (`LmdbLog.event_at`) ends the list before it, or raises CorruptLog
        when it is the first; so does an entry that does not decode, with CorruptProjection
        (caught around the whole walk: no check per entry).
        """
        out: list[InboxItem] = []
        last = after_seq
        if limit <= 0:
            return out, last
        prefix = user.encode() + b"\0"
        event_at, mutedb = self._log.event_at, self._dbs["mute"]
        records = self._records
        mutes: dict[str, bool] = {}
        room = math.inf if max_bytes is None else max_bytes
        with self._env.read() as txn:
            cur = txn.cursor(db=self._dbs["inbox"])
            if not cur.set_range(inbox_key(user, after_seq + 1)):
                return out, last
            seen = 0
            key = b""
            try:
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    seen += 1
                    kind, conv, seq, lsn = msgpack.unpackb(value, raw=False)
                    if (kind not in INBOX_KINDS or type(conv) is not str or type(seq) is not int
                            or type(lsn) is not int):
                        raise ValueError(f"not an inbox entry: {[kind, conv, seq, lsn]!r}")
                    if skip_lsns and lsn in skip_lsns:
                        skip_lsns.discard(lsn)
                        last = u64(key[-8:])
                        if seen >= limit:
                            break
                        continue
                    rec = records.get(lsn)
                    if rec is None:
                        rec = _record(event_at(txn, lsn, conv, kind == KIND_MSG))
                        if len(records) >= self._record_cache:
                            records.clear()
                        records[lsn] = rec
                    muted = mutes.get(conv)
                    if muted is None:
                        muted = mutes[conv] = txn.get(key2(user, conv), db=mutedb) is not None
                    last = u64(key[-8:])
                    out.append(InboxItem(last, kind, conv, seq, lsn, *rec, muted))
                    room -= body_bytes(rec[2])
                    if seen >= limit or room <= 0:
                        break
            except (CorruptLog, *_UNDECODABLE) as exc:
                if out:  # those before the damaged entry or record go out; the next read fails
                    return out, last
                if isinstance(exc, CorruptLog):
                    raise
                raise undecodable("inbox", key, exc) from None
        return out, last

    def conv_info(self, conv: str) -> dict[str, Any] | None:
        """Return the conv row (`kind, name, open, creator, last_seq, created_lsn`) or None."""
        with self._env.read() as txn:
            ckey = conv.encode()
            raw = txn.get(ckey, db=self._dbs["conv"])
            if raw is None:
                return None
            info = conv_row(ckey, raw)
            try:
                info["last_seq"] = u64(txn.get(ckey, db=self._dbs["conv_seq"]) or bytes(8))
            except struct.error as exc:
                raise undecodable("conv_seq", ckey, exc) from None
        return info

    def role(self, conv: str, user: str) -> str | None:
        """Return `user`'s role in `conv`, None when not a member."""
        return self._text("member", key2(conv, user))

    def _text(self, table: str, key: bytes) -> str | None:
        """The value of `table`'s row `key` as text, None if there is none (CorruptProjection
        when it is no UTF-8)."""
        raw = self._get(table, key)
        try:
            return None if raw is None else raw.decode()
        except ValueError as exc:
            raise undecodable(table, key, exc) from None

    def _split_range(self, table: str, head: str, values: bool = False,
                     after: str | None = None, limit: int | None = None,
                     chars: int | None = None) -> list[tuple[str, Any]]:
        """The rows of `table` under `head`: (the rest of the key, the value) as text, the
        value as text only with `values` (CorruptProjection at a row that is no UTF-8). With
        `after`, only those whose rest sorts after it, by byte; at most `limit` rows (None:
        all), and none after the row that takes their rests past `chars` bytes in all (None:
        no bound): a page, read in one transaction, in proportion to what it returns."""
        prefix = head.encode() + b"\0"
        cut = len(prefix)
        with self._env.read() as txn:
            rows = TxnTables(txn, self._dbs).range(table, prefix, _start_after(prefix, after))
            # islice where only `limit` bounds the read: a generator's step a row cost the
            # presence walk's pages of `user_convs` a third more (1.2 ms a walk of 10,000).
            rows = list(itertools.islice(rows, limit) if chars is None
                        else _page_rows(rows, cut, limit, chars))
        try:
            if values:
                return [(k[cut:].decode(), v.decode()) for k, v in rows]
            return [(k[cut:].decode(), v) for k, v in rows]
        except ValueError as exc:  # the cold path names the row
            for k, v in rows:
                try:
                    k.decode(), v.decode() if values else None
                except ValueError:
                    raise undecodable(table, k, exc) from None
            raise

    def members(self, conv: str, after: str | None = None, limit: int | None = None,
                chars: int | None = None) -> list[tuple[str, str]]:
        """Return `(user, role)` for every member of `conv`, sorted by user (by byte, which for
        ids is str order too). With `after` ("" or None: from the first), `limit` or `chars`,
        a page (`members` with `after`): those whose ids sort after `after`, at most `limit`
        of them, and none past the one that takes their ids past `chars` characters in all,
        read in one transaction that reads no other member."""
        return self._split_range("member", conv, values=True, after=after, limit=limit,
                                 chars=chars)

    def user_convs(self, user: str, after: str | None = None,
                   limit: int | None = None) -> list[str]:
        """Return the conversations `user` is a member of, sorted: those with ids after `after`,
        at most `limit` (None: all). Pages keep each read short for a user in very many
        (the presence walk, `Hub.peers`: 12 ms for 20,000 in one read)."""
        return [conv for conv, _ in self._split_range("user_conv", user, after=after,
                                                      limit=limit)]

    def history(self, conv: str, *, before: int | None = None, after: int | None = None,
                limit: int = 50, newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        """Return messages of `conv` with `after < seq < before`, and whether more remain.

        Dicts are `{seq, from, body, cid, ts, lsn}`; `newest_first` pages backwards from
        `before`, otherwise forwards from `after`. Access checks are the caller's.
        """
        prefix = conv.encode() + b"\0"
        lo = (after or 0) + 1
        hi = (before - 1) if before is not None else (1 << 63)
        out: list[dict[str, Any]] = []
        more = False
        if limit <= 0 or hi < lo:
            return out, False
        with self._env.read() as txn:
            tables = TxnTables(txn, self._dbs)
            if newest_first:
                rows = tables.range("msg", prefix, start=prefix + pack_u64(hi), reverse=True)
            else:
                rows = tables.range("msg", prefix, start=prefix + pack_u64(lo))
            key = prefix
            try:
                for key, value in rows:
                    seq = u64(key[_MSG_SEQ])
                    if not lo <= seq <= hi:
                        break
                    if len(out) >= limit:
                        more = True
                        break
                    ev = self._log.event_at(txn, u64(value), conv, True)
                    out.append({"seq": seq, "from": ev.user, "body": ev.data["body"],
                                "cid": ev.data["cid"], "ts": ev.ts_us, "lsn": ev.lsn})
            except struct.error as exc:  # a row cut short (event_at checks the record)
                raise undecodable("msg", key, exc) from None
        return out, more

    def receipts(self, conv: str, seq: int, after: str | None = None, limit: int | None = None,
                 chars: int | None = None) -> tuple[list[str], list[str], list[str]] | None:
        """Return (members, received, read) of message `seq` of `conv`: `members` are its
        audience, the current members other than its sender who have been members since
        before it was posted (one who joined later never had it: not counted, where their marks,
        which start at their joining, would reach it), in id order (by byte, which for ids is
        str order too); `received` and `read` are those of them whose marks reach it. With
        `after`, only the members whose ids sort after it ("" or None: from the first), at most
        `limit` of them (None: all), and none past the one that takes their ids past `chars`
        characters in all, a received one's counted twice, as a page lists it in `delivered`
        too (None: no bound): a page (`receipts` with `after`), read in one transaction. None
        when `conv` has no message `seq`."""
        prefix = conv.encode() + b"\0"
        start = _start_after(prefix, after)
        dbs = self._dbs
        with self._env.read() as txn:
            mkey = prefix + pack_u64(seq)
            lsn = txn.get(mkey, db=dbs["msg"])
            if lsn is None:
                return None
            tables = TxnTables(txn, dbs)
            names: list[str] = []
            try:
                sender = self._log.event_at(txn, u64(lsn), conv, True).user
                # Only members who joined after the first message have a row: the whole
                # answer reads them in one range; a page looks up its own members' rows, so
                # that it costs its members (and those it passes over), not the table.
                if limit is None:
                    joined = {k[len(prefix):].decode(): u64(v)
                              for k, v in tables.range("joined", prefix)}
                members: list[str] = []
                got: list[str] = []
                used = 0  # the characters of the ids a page lists, `got`'s twice
                for k, _ in tables.range("member", prefix, start):
                    if ((limit is not None and len(members) >= limit)
                            or (chars is not None and used > chars)):
                        break
                    names.append(m := k[len(prefix):].decode())
                    if m == sender:
                        continue
                    if limit is None:
                        since = joined.get(m, 0)
                    else:
                        since = u64(tables.get("joined", key2(conv, m)) or bytes(8))
                    if since < seq:
                        members.append(m)
                        used += len(m)
                        if u64(txn.get(key2(conv, m), db=dbs["recv"]) or bytes(8)) >= seq:
                            got.append(m)
                            used += len(m)
                read = [m for m in got
                        if u64(txn.get(key2(conv, m), db=dbs["read"]) or bytes(8)) >= seq]
            except _UNDECODABLE as exc:  # the cold path names the row
                marks = [(t, key2(conv, m), u64) for m in names
                         for t in ("joined", "recv", "read")]
                raise _first_bad(txn, dbs, [("msg", mkey, u64), *marks], exc) from None
        return members, got, read

    def conversations(self, user: str, after: str | None = None,
                      limit: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Return `user`'s conversations with ids after `after`, in id order, at most `limit`
        (None: all), and whether more follow.

        Each is a `conv_list` entry of PROTOCOL.md §5.3 in wire form: `{conv, kind, role,
        last_seq, read, muted}`, and `name` for groups and channels; unread is last_seq - read.
        """
        prefix = user.encode() + b"\0"
        dbs = self._dbs
        out: list[dict[str, Any]] = []
        with self._env.read() as txn:
            cur = txn.cursor(db=dbs["user_conv"])
            # Conv ids hold no NUL, so `after \0` sorts right after `after` and before the
            # ids it is a prefix of.
            if not cur.set_range(prefix if after is None else prefix + after.encode() + b"\0"):
                return out, False
            for key, role in cur:
                if not key.startswith(prefix):
                    break
                if limit is not None and len(out) >= limit:
                    return out, True
                ckey = key[len(prefix):]
                try:
                    conv = ckey.decode()
                    info = conv_row(ckey, txn.get(ckey, db=dbs["conv"]))
                    mark = txn.get(key2(conv, user), db=dbs["read"])
                    entry = {"conv": conv, "kind": info["kind"], "role": role.decode(),
                             "last_seq": u64(txn.get(ckey, db=dbs["conv_seq"]) or bytes(8)),
                             "read": 0 if mark is None else u64(mark),
                             "muted": txn.get(key2(user, conv), db=dbs["mute"]) is not None}
                    if info["name"] is not None:
                        entry["name"] = info["name"]
                except _UNDECODABLE as exc:  # the cold path names the row
                    raise _first_bad(txn, dbs, [
                        ("user_conv", key, lambda v, c=ckey: (c.decode(), v.decode())),
                        ("conv_seq", ckey, u64),
                        ("read", ckey + b"\0" + user.encode(), u64)], exc) from None
                out.append(entry)
        return out, False

    def unread(self, user: str) -> dict[str, int]:
        """Return `{conv: last_seq - read}` for each conversation of `user` (muted ones too)."""
        return {c["conv"]: max(0, c["last_seq"] - c["read"]) for c in self.conversations(user)[0]}

    # ---------------------------------------------------------------- audit

    def verify_log(self, from_lsn: int = 1) -> int:
        """Verify LSN continuity and the digest chain; return the records checked (CorruptLog)."""
        return self._log.verify(from_lsn)

    def dump_projections(self) -> list[tuple[str, bytes, bytes]]:
        """Return every projection row as `(table, key, value)` in (table, key) order."""
        out = []
        with self._env.read() as txn:
            for table in sorted(TABLES):
                out.extend((table, k, v) for k, v in txn.cursor(db=self._dbs[table]))
        return out

    def projection_snapshot(self) -> tuple[dict[str, dict[bytes, bytes]], int]:
        """Return every projection table as a dict `{key: value}`, and the log's last LSN, read
        in one transaction.

        One consistent snapshot, built by the C cursor iterator: the fast input of audits.
        """
        with self._env.read() as txn:
            return ({table: dict(txn.cursor(db=self._dbs[table]).iternext()) for table in TABLES},
                    self._log.last_lsn_in(txn))

    def projection_digests(self, digested: frozenset[str], key: bytes | None = None) -> tuple[
            dict[str, dict[bytes, bytes]], dict[str, tuple[int, int]], int]:
        """Return one consistent snapshot: the tables not in `digested` as dicts `{key: value}`,
        those in it as `(rows, digest)` (the input of fast audits):
        `memory_tables.rows_digest`, or `memory_tables.keyed_rows_digest` under `key` when one
        is given; and the log's last LSN."""
        with self._env.read() as txn:
            log_lsn = self._log.last_lsn_in(txn)
            rows = {table: dict(txn.cursor(db=self._dbs[table]).iternext())
                    for table in TABLES if table not in digested}
            digests = {}
            for table in digested:
                it = txn.cursor(db=self._dbs[table]).iternext()
                digests[table] = (keyed_rows_digest(it, key) if key is not None else
                                  (txn.stat(self._dbs[table])["entries"], rows_digest(it)))
        return rows, digests, log_lsn

    def replay(self, to_lsn: int | None = None, tables: MemoryTables | None = None) -> MemoryTables:
        """Fold the log (up to `to_lsn`) into `tables` (fresh MemoryTables by default)."""
        tables = MemoryTables() if tables is None else tables
        fold(tables, self._log.read_raw(1, to_lsn), to_lsn=to_lsn)
        return tables

    def check_projections(self) -> tuple[str, bytes, bytes | None, bytes | None] | None:
        """Compare stored projections with a fresh replay; return the first difference or None.

        A difference is `(table, key, stored_value, replayed_value)`, None for a missing row.
        The stored rows are one snapshot and the replay stops at its `applied_lsn`, so commits
        made meanwhile (a running broker) cause no false difference.
        """
        stored = self.dump_projections()
        applied = next((u64(v) for t, k, v in stored if t == "meta" and k == APPLIED_LSN), 0)
        replayed = self.replay(applied).items()
        for (st, sk, sv), (rt, rk, rv) in zip(stored, replayed, strict=False):
            if (st, sk) != (rt, rk):
                if (st, sk) < (rt, rk):
                    return st, sk, sv, None
                return rt, rk, None, rv
            if sv != rv:
                return st, sk, sv, rv
        if len(stored) > len(replayed):
            t, k, v = stored[len(replayed)]
            return t, k, v, None
        if len(replayed) > len(stored):
            t, k, v = replayed[len(stored)]
            return t, k, None, v
        return None
