"""The event log on LMDB: named database `log`, key = 8-byte big-endian LSN, value = digest||body.

`LmdbLog` implements `storage.log.EventLog`. The store appends inside its own write transaction
with `append_in` and publishes the new tail only after the commit returned, so a failed or
retried batch never leaves the in-memory tail ahead of the disk.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager

import lmdb
from msgpack import unpackb

from storage.errors import CorruptLog, StorageError
from storage.lmdb_env import LmdbEnv
from storage.log import EventInput, seal, verify_records
from storage.records import GENESIS, MESSAGE_ACCEPTED, Event, decode_body, key_lsn, lsn_key

READ_CHUNK = 1024
_BODIES = (str, bytes)
_CIDS = (str, type(None))  # a message's cid: text, or None (no cid); absent is no message

Tail = tuple[int, bytes]


class LmdbLog:
    """An `EventLog` stored in the `log` database of an `LmdbEnv`."""

    def __init__(self, env: LmdbEnv, *, owns_env: bool = False) -> None:
        self._env = env
        self._db = env.dbs["log"]
        self._owns_env = owns_env
        with env.read() as txn:
            self._tail = self._read_tail(txn)

    @classmethod
    def open(cls, path: str, *, map_size: int = 1 << 30, readonly: bool = False) -> LmdbLog:
        """Open (creating unless `readonly`) a data directory holding only a log."""
        return cls(LmdbEnv(path, ["log"], map_size=map_size, readonly=readonly), owns_env=True)

    def _read_tail(self, txn: lmdb.Transaction) -> Tail:
        cur = txn.cursor(db=self._db)
        found = cur.last()
        while found and len(cur.key()) != 8:  # not an lsn (written behind our back): `verify`
            found = cur.prev()                # reports it; the tail is the last real record
        if not found:
            return 0, GENESIS
        return key_lsn(cur.key()), cur.value()[:32]

    def tail(self) -> Tail:
        """Return `(last_lsn, last_digest)` as of the last commit of this process."""
        return self._tail

    def set_tail(self, tail: Tail) -> None:
        """Publish the tail reached by a committed `append_in`."""
        self._tail = tail

    def append_in(
        self, txn: lmdb.Transaction, events: Sequence[EventInput], tail: Tail
    ) -> tuple[list[Event], Tail]:
        """Put `events` after `tail` in the write `txn`; return them with LSNs, and the new tail."""
        sealed, digest = seal(events, tail[0] + 1, tail[1])
        if not sealed:
            return [], tail
        cur = txn.cursor(db=self._db)
        _, added = cur.putmulti([(lsn_key(lsn), value) for lsn, value, _ in sealed], append=True)
        if added != len(sealed):
            # py-lmdb skips, without a word, a record whose key is not above the last one: the
            # log was appended to behind this object's back. Its LSNs are not ours to return.
            raise StorageError(f"the log already holds lsn {sealed[0][0]}: it was appended to "
                               "by someone else; nothing was written")
        return [ev for _, _, ev in sealed], (sealed[-1][0], digest)

    def append(self, events: Sequence[EventInput]) -> int:
        """Durably append `events` in one transaction; return the last LSN."""
        def work(txn: lmdb.Transaction) -> int:
            _, tail = self.append_in(txn, events, self._tail)
            self._env.after_commit(lambda: self.set_tail(tail))
            return tail[0]

        return self._env.write(work)

    def read(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[Event]:
        """Yield events from `from_lsn` to `to_lsn`, reading chunks in short transactions;
        CorruptLog at a record whose body does not decode."""
        for lsn, value in self.read_raw(from_lsn, to_lsn):
            try:
                ev = decode_body(value[32:])
            except Exception as exc:
                raise CorruptLog(lsn, f"undecodable body: {exc}") from None
            yield ev

    def read_raw(self, from_lsn: int = 1, to_lsn: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield `(lsn, digest || body)` records, chunk by chunk; CorruptLog at a record
        missing between `from_lsn` and the last one read (LSNs have no gap), rather than a
        silent skip: every audit and replay reads through here."""
        return self._chunks(self._env.read, from_lsn, to_lsn)

    def read_raw_in(self, txn: lmdb.Transaction, from_lsn: int,
                    to_lsn: int) -> Iterator[tuple[int, bytes]]:
        """`read_raw` within `txn` (a write transaction's own view: `Store._catch_up` folds
        the records it reads in it), a chunk of records in memory at a time."""
        return self._chunks(lambda: contextlib.nullcontext(txn), from_lsn, to_lsn)

    def _chunks(self, begin: Callable[[], ContextManager[lmdb.Transaction]], from_lsn: int,
                to_lsn: int | None) -> Iterator[tuple[int, bytes]]:
        """The records from `from_lsn` to `to_lsn` (the last, if None), each chunk read in a
        transaction `begin()` gives."""
        nxt = max(from_lsn, 1)
        while to_lsn is None or nxt <= to_lsn:
            with begin() as txn:
                chunk = self._chunk(txn, nxt, to_lsn)
            if not chunk:
                return
            yield from chunk
            nxt = chunk[-1][0] + 1

    def _chunk(
        self, txn: lmdb.Transaction, start: int, to_lsn: int | None
    ) -> list[tuple[int, bytes]]:
        cur = txn.cursor(db=self._db)
        out: list[tuple[int, bytes]] = []
        if start <= 1 and cur.first() and cur.key() < lsn_key(1):
            raise CorruptLog(1, f"a log key {cur.key().hex()} before lsn 1, not an lsn")
        if not cur.set_range(lsn_key(start)):
            return out
        expected = start
        for key, value in cur:
            try:
                lsn = key_lsn(key)
            except struct.error:  # not lsn_key's u64: the log was written behind our back
                raise CorruptLog(expected, f"a log key of {len(key)} bytes, not an lsn") from None
            if to_lsn is not None and expected > to_lsn:
                break
            if lsn != expected:  # LSNs have no gap: a replay past one would be no state
                raise CorruptLog(expected, f"record missing (the next is lsn {lsn})")
            expected += 1
            out.append((lsn, value))
            if len(out) >= READ_CHUNK:
                break
        return out

    def backup(self, dest: str, *, made: bool = False) -> Tail:
        """Copy the environment (the log, and the projections beside it), as one committed
        transaction left it, into the empty directory `dest` (synced; safe while a broker
        writes; `made`: into the empty `data.mdb` the caller made there); return the copy's
        tail, `(last_lsn, its digest)`."""
        with self._env.read() as txn:
            tail = self._read_tail(txn)
            self._env.copy_to(dest, txn, made=made)
        return tail

    def check_keys(self, txn: lmdb.Transaction) -> int:
        """The last LSN, once the log's keys look like LSNs 1 to it: the first is LSN 1 and
        there are as many as the last says (CorruptLog otherwise: a key before LSN 1, or
        records missing or added). Cheap, for `Store.rebuild`, which folds the records whatever
        their keys; `verify` checks every key and digest."""
        last = self.last_lsn_in(txn)
        cur = txn.cursor(db=self._db)
        entries = txn.stat(self._db)["entries"]
        if entries != last or (cur.first() and cur.key() != lsn_key(1)):
            raise self._first_gap(txn, entries, last)
        return last

    def _first_gap(self, txn: lmdb.Transaction, entries: int, last: int) -> CorruptLog:
        """Where the keys stop being LSNs 1, 2, 3 ..., found by walking them (values not read)
        on the cold path of `check_keys`: a hole named at lsn 1 sent the auditor looking for it
        from the start of a log of millions of records."""
        counts = f"{entries} log records for lsns 1 to {last}"
        want = 1
        for key in txn.cursor(db=self._db).iternext(keys=True, values=False):
            lsn = key_lsn(key) if len(key) == 8 else None
            if lsn == want:
                want += 1
            elif lsn is not None and lsn > want:
                return CorruptLog(want, f"record missing (the next is {lsn}); {counts}")
            else:
                return CorruptLog(want, f"a log key {key.hex()} where lsn {want} belongs; "
                                  f"{counts}")
        return CorruptLog(1, counts)  # not reached: keys 1 to `last` in a row are `last` keys

    def get(self, txn: lmdb.Transaction, lsn: int) -> Event | None:
        """Return the event at `lsn` read in `txn`, or None."""
        value = txn.get(lsn_key(lsn), db=self._db)
        return None if value is None else decode_body(value[32:])

    def event_at(self, txn: lmdb.Transaction, lsn: int, conv: str,
                 message: bool = False) -> Event:
        """The event at `lsn` of conversation `conv`, which a projection row names (an inbox
        entry; with `message`, a `msg` row or a message's entry: a `message.accepted` with a
        body), read in `txn`. `CorruptLog` at `lsn` when there is none, or its bytes are no
        such event: a record removed, cut or rewritten behind homing's back, or a row pointing
        past the log (`audit verify` names it). A read met AttributeError, msgpack's errors or
        TypeError instead, which no caller handles."""
        value = txn.get(lsn_key(lsn), db=self._db)
        if value is None:
            raise CorruptLog(lsn, "record missing (a projection row names it)")
        try:
            at, ts_us, kind, user, device, data = unpackb(value[32:], raw=False)
        except Exception as exc:  # msgpack's errors; not 6 items, or no list (ValueError)
            raise CorruptLog(lsn, f"undecodable body: {exc}") from None
        if (at != lsn or type(at) is not int or type(ts_us) is not int or type(user) is not str
                or type(device) is not str or type(data) is not dict
                or data.get("conv") != conv):
            raise CorruptLog(lsn, f"not an event of {conv} at lsn {lsn}, which a projection "
                             "row names")
        if message and (kind != MESSAGE_ACCEPTED or type(data.get("body")) not in _BODIES
                        or type(data.get("cid", 0)) not in _CIDS):
            raise CorruptLog(lsn, f"not a message of {conv}, which a projection row names")
        return Event(at, ts_us, kind, user, device, data)

    def last_lsn_in(self, txn) -> int:
        """Return the last LSN as `txn` sees it (0 for an empty log)."""
        return self._read_tail(txn)[0]

    def last_lsn(self) -> int:
        """Return the last LSN (read from disk when opened read-only, so it follows the writer)."""
        if self._env.readonly:
            with self._env.read() as txn:
                return self._read_tail(txn)[0]
        return self._tail[0]

    def verify(self, from_lsn: int = 1) -> int:
        """Walk LSN continuity and the digest chain from `from_lsn`; return the records checked.

        Raises `CorruptLog` with the first bad LSN: an altered byte, a missing or reordered record.
        """
        start = max(from_lsn, 1)
        prev = GENESIS
        if start > 1:
            with self._env.read() as txn:
                value = txn.get(lsn_key(start - 1), db=self._db)
                last = self.last_lsn_in(txn)
            if value is None:
                if start > last:
                    return 0  # nothing from there on (as read() yields nothing)
                raise CorruptLog(start - 1, "record missing")
            prev = value[:32]
        return verify_records(self.read_raw(start), start, prev)

    def close(self) -> None:
        """Close the log (and its environment when it opened it)."""
        if self._owns_env:
            self._env.close()
