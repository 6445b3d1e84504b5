"""Implementations of the `Tables` view that projections and rules work on.

A `Tables` object has one attribute per table (`tables.conv_seq`, `tables.inbox`, ...), each a
table view: `view[key]` is the value or None when absent, `view[key] = value` (or
`view.put(key, value)`; on hot paths the subscript, which MemoryTables runs in C),
`view.delete(key)` and `view.range(prefix, start=None, reverse=False)`. `tables.get(name, key)`
and friends do the same by table name, for code off the hot path.

* `MemoryTables`: dicts, for model tests, replay, time travel and rebuild. A view IS a dict
  (`view[key]` and `put` are the dict's own C methods), so a replay costs dict operations only.
* `BufferedTables`: the store's live tables over its write transaction. Each view is a
  read-through dict of the rows read or written (absent rows as None) plus the keys changed by
  the current batch; `flush()` writes those once, sorted. The views of small hot tables
  (`PERSISTENT`) outlive the batch: after a commit they hold committed rows, so the next batch
  reads them from memory; an aborted batch (`rollback`) drops exactly the rows it changed. The
  grouped views also keep whole groups' rows and row counts, which changes update in place
  (`GroupedBufTable`); an aborted batch drops those of the groups it changed.
* `TxnTables`: straight over one LMDB transaction, for queries (`range`).
* `DigestTable`: stands in for an `APPEND_ONLY` table of `MemoryTables` when a replay only has
  to be compared (audits): it folds the rows into a count and a multiset digest as it goes.

All give the same answers for the same operations; the model tests check it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Iterable, Iterator
from operator import itemgetter
from typing import Any

import lmdb

from storage import native
from storage.rowio import Rows

TABLES = ("conv", "conv_seq", "msg", "member", "user_conv", "inbox", "inbox_head", "delivered",
          "recv", "read", "idem", "created", "mute", "revoked", "joined", "meta")
# Tables that `apply` and `decide` range over by their first key part ("head \0").
GROUPED = frozenset({"member", "user_conv"})
# Tables with a row per message or inbox entry: `apply` only adds rows to them, each key once,
# and never reads them back (bar `acked_convs` on acks logged before they carried their convs).
APPEND_ONLY = frozenset({"msg", "inbox", "idem"})
# Where a table's key names the user a row belongs to (`MemoryTables(user=...)`): its first part,
# its last part (`conv \0 user`), or the whole key. The other tables are not one user's:
# `conv`, `conv_seq`, `meta`, and `delivered`, `revoked` (per device or user, few, and read by
# the fold of every ack and revocation: kept whole, the fold takes the same turns), `msg`, `idem`.
USER_HEAD = frozenset({"user_conv", "inbox", "mute", "created"})
USER_TAIL = frozenset({"member", "recv", "read", "joined"})
USER_WHOLE = frozenset({"inbox_head"})
# Tables of BufferedTables whose rows stay cached across batches: few rows, read by every batch.
# The others are written far more than read.
PERSISTENT = frozenset(TABLES) - APPEND_ONLY
# A persistent view holding more rows than this after a commit is emptied (bounded memory); the
# rows of the groups a grouped view caches count too (`GroupedBufTable.cached_rows`).
CACHE_ROWS = 200_000
# Groups whose row count a grouped view of BufferedTables keeps, at most (emptied past it).
COUNTED_GROUPS = 100_000
# Tables whose greatest committed key per first byte BufferedTables keeps, so that a key above
# its first byte's is known to be absent without a read: the idempotency index, keyed
# `cid \0 sender`, where the SDK's cids sort by time (`BufTable.last`).
LAST_KEYS = frozenset({"idem"})
# Senders whose greatest committed key the `LAST_KEYS` views keep, at most (`BufTable.newest`).
TRACKED_SENDERS = 100_000

# What `sorted_rows` returns: a list, or a `_fold.SortedRows`; both sized and re-iterable.
RowsInOrder = Collection[tuple[bytes, bytes]]

_MISS = object()
_MOD = 1 << 64
_dict_set = dict.__setitem__
_dict_pop = dict.pop


def prefix_end(prefix: bytes) -> bytes | None:
    """Return the smallest key greater than every key with `prefix`, None if there is none."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _window(keys: list[bytes], start: bytes | None, reverse: bool) -> list[bytes]:
    keys.sort(reverse=reverse)
    if start is None:
        return keys
    return [k for k in keys if (k <= start if reverse else k >= start)]


def _head(key: bytes) -> bytes:
    """Return the group prefix `head \\0` of a two-part key."""
    return key[:key.index(b"\0") + 1]


def _is_head(prefix: bytes) -> bool:
    return prefix.find(b"\0") == len(prefix) - 1


def cursor_range(txn: lmdb.Transaction, db: Any, prefix: bytes, start: bytes | None = None,
                 reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
    """Yield `(key, value)` of `db` with `prefix` in key order from `start` (inclusive)."""
    cur = txn.cursor(db=db)
    if not reverse:
        if not cur.set_range(start if start is not None and start > prefix else prefix):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, value
        return
    upper = start if start is not None else prefix_end(prefix)
    if upper is None:
        positioned = cur.last()
    elif cur.set_range(upper):
        positioned = cur.key() == start or cur.prev()
    else:
        positioned = cur.last()
    if not positioned:
        return
    for key, value in cur.iterprev():
        if not key.startswith(prefix):
            return
        yield key, value


class _ByName:
    """`get/put/delete/range` by table name over the per-table views (off the hot path)."""

    __slots__ = ()

    def get(self, table: str, key: bytes) -> bytes | None:
        """Return the value at `key`, or None."""
        return getattr(self, table)[key]

    def put(self, table: str, key: bytes, value: bytes) -> None:
        """Store `value` at `key`."""
        getattr(self, table).put(key, value)

    def delete(self, table: str, key: bytes) -> None:
        """Remove `key` if present."""
        getattr(self, table).delete(key)

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(key, value)` with `prefix` in key order from `start` (inclusive)."""
        return iter(getattr(self, table).range(prefix, start, reverse))


# ---------------------------------------------------------------- over one transaction


class TxnTables(_ByName):
    """`get` and `range` by table name straight over one LMDB transaction (queries)."""

    __slots__ = ("dbs", "txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.dbs = dbs

    def get(self, table: str, key: bytes) -> bytes | None:
        """Return the value at `key`, or None."""
        return self.txn.get(key, db=self.dbs[table])

    def put(self, table: str, key: bytes, value: bytes) -> None:
        """Store `value` at `key`."""
        self.txn.put(key, value, db=self.dbs[table])

    def delete(self, table: str, key: bytes) -> None:
        """Remove `key` if present."""
        self.txn.delete(key, db=self.dbs[table])

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(key, value)` with `prefix` in key order from `start` (inclusive)."""
        return cursor_range(self.txn, self.dbs[table], prefix, start, reverse)


# ---------------------------------------------------------------- in memory


class MemTable(dict):
    """One table of `MemoryTables`: a dict whose missing keys read as None."""

    __slots__ = ()

    put = dict.__setitem__

    def __missing__(self, key: bytes) -> None:
        return None

    def delete(self, key: bytes) -> None:
        """Remove `key` if present."""
        self.pop(key, None)

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix`, in key order from `start` (inclusive)."""
        keys = [k for k in self if k.startswith(prefix)]
        return [(k, self[k]) for k in _window(keys, start, reverse)]

    def stored_range(self, prefix: bytes) -> list[tuple[bytes, bytes | None]]:
        """`range(prefix)`: in memory, every row is a stored one (`BufTable.stored_range`)."""
        return self.range(prefix)

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix`."""
        return len(self.range(prefix))


class Parts(dict):
    """`parts[head]`: the rows of group `head \\0` of a grouped table, split for the hot path.

    Each row is `(tail, tail \\0, tail as text)`, in key order; built on first use from the
    table's `range` and dropped by the table whenever a key of that group changes.
    """

    __slots__ = ("table",)

    def __init__(self, table: Any) -> None:
        super().__init__()
        self.table = table

    def __missing__(self, head: bytes) -> tuple[tuple[bytes, bytes, str], ...]:
        cut = len(head)
        rows = tuple((k[cut:], k[cut:] + b"\0", k[cut:].decode())
                     for k, _ in self.table.range(head))
        _dict_set(self, head, rows)
        return rows


class GroupedMemTable(MemTable):
    """A `MemTable` whose keys are also kept sorted by group (`head \\0`), for cheap ranges."""

    __slots__ = ("groups", "parts")

    def __init__(self) -> None:
        super().__init__()
        self.groups: dict[bytes, list[bytes]] = {}
        self.parts = Parts(self)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Store `value` at `key`."""
        if key not in self:
            head = _head(key)
            self.parts.pop(head, None)
            group = self.groups.get(head)
            if group is None:
                self.groups[head] = [key]
            else:
                insort(group, key)
        _dict_set(self, key, value)

    put = __setitem__

    def delete(self, key: bytes) -> None:
        """Remove `key` if present."""
        if _dict_pop(self, key, _MISS) is not _MISS:
            head = _head(key)
            self.parts.pop(head, None)
            group = self.groups[head]
            group.remove(key)
            if not group:
                del self.groups[head]

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix`, in key order from `start` (inclusive)."""
        if start is None and not reverse and _is_head(prefix):
            return [(k, self[k]) for k in self.groups.get(prefix, ())]
        return MemTable.range(self, prefix, start, reverse)

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix` (of a group: without looking at them)."""
        if _is_head(prefix):
            return len(self.groups.get(prefix, ()))
        return MemTable.count(self, prefix)


class _OneUser:
    """Of a replay for one user (`MemoryTables(user=...)`): a table that keeps only the rows
    `mine(key)` accepts; others are not written, so they read as absent."""

    __slots__ = ()
    mine: Callable[[bytes], bool]

    def __init__(self, mine: Callable[[bytes], bool]) -> None:
        super().__init__()
        self.mine = mine

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Store `value` at `key` if the row is the user's."""
        if self.mine(key):
            super().__setitem__(key, value)  # type: ignore[misc]

    put = __setitem__


class OneUserMemTable(_OneUser, MemTable):
    """A `MemTable` of one user's rows."""

    __slots__ = ("mine",)


class OneUserGroupedTable(_OneUser, GroupedMemTable):
    """A `GroupedMemTable` of one user's rows of each group (so `parts` of a conversation
    lists the user alone, or nobody)."""

    __slots__ = ("mine",)


def user_rows(name: str, user: str) -> Callable[[bytes], bool] | None:
    """The test of table `name`'s keys that are `user`'s rows (None: the table is no user's)."""
    ukey = user.encode()
    if name in USER_HEAD:
        return lambda key, head=ukey + b"\0": key.startswith(head)
    if name in USER_TAIL:
        return lambda key, tail=b"\0" + ukey: key.endswith(tail)
    if name in USER_WHOLE:
        return ukey.__eq__
    return None


class RowsDropped(LookupError):
    """A `DigestTable` was asked for rows it no longer holds: compare rows, not digests."""


def rows_digest(rows: Iterable[tuple[bytes, bytes]]) -> int:
    """The multiset digest of `(key, value)` rows: the sum of their `hash()`.

    Python keys `hash()` of bytes with a secret drawn at interpreter start (SipHash), so the
    digests of one process (and of its forks) are comparable, and nobody outside it can build two
    different sets of rows with the same digest. The sum runs in C.
    """
    return sum(map(hash, rows))


def keyed_rows_digest(rows: Iterable[tuple[bytes, bytes]], key: bytes) -> tuple[int, int]:
    """`(count, digest)` of rows with the compiled keyed digest (`storage.native`): SipHash-2-4
    keyed by `key` (16 bytes) over `len(k) || k || v`, summed modulo 2**64. Unlike
    `rows_digest` it can be computed alike by two processes that share `key`."""
    assert native.ext is not None, "the keyed digest needs storage._fold"
    return native.ext.rows_digest(rows, key)


class DigestTable(MemTable):
    """An `APPEND_ONLY` table of a replay that is only compared: rows are folded into `rows` (a
    count) and `digest` by `fold()`, so memory stays bounded by one chunk. The digest is
    `rows_digest`, or `keyed_rows_digest` under `key` when one is given.

    Reading a key that is not in the current chunk raises `RowsDropped`, as do `delete` and
    `range`: a fold that needs them must replay into plain `MemoryTables` instead. With a key,
    the compiled replay loop counts its rows straight into the digest (`absorb`), so none of
    them can be read back.
    """

    __slots__ = ("digest", "key", "rows")

    def __init__(self, key: bytes | None = None) -> None:
        super().__init__()
        self.rows = 0
        self.digest = 0
        self.key = key

    def __missing__(self, key: bytes) -> None:
        raise RowsDropped(key)

    def delete(self, key: bytes) -> None:
        """Unsupported: the rows are gone."""
        raise RowsDropped(key)

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Unsupported: the rows are gone."""
        raise RowsDropped(prefix)

    def fold(self) -> None:
        """Fold the rows held into `rows` and `digest`, and let them go."""
        if self.key is None:
            self.absorb(len(self), rows_digest(self.items()))
        else:
            self.absorb(*keyed_rows_digest(self.items(), self.key))
        self.clear()

    def absorb(self, rows: int, digest: int) -> None:
        """Count `rows` more rows whose digest is `digest`."""
        self.rows += rows
        self.digest = self.digest + digest if self.key is None else (self.digest + digest) % _MOD


class ListedTable(MemTable):
    """An `APPEND_ONLY` table of a rebuild, where `storage._fold` is built. The compiled replay
    loop copies its rows into `rows` (a `_fold.Rows`: one buffer, in write order) instead of
    inserting them into the dict: inserts into dicts of hundreds of thousands of rows were half
    of a rebuild's fold, and objects made in write order but written in key order missed the
    CPU cache at every row. The table's methods (`[]`, `put`, `delete`, `range`, `in`, `len`,
    iteration, `items`, `get`) first move the rows into the dict (`settle`), so it reads and
    writes exactly as a plain `MemTable`.
    """

    __slots__ = ("rows",)

    def __init__(self) -> None:
        super().__init__()
        assert native.ext is not None, "ListedTable needs storage._fold"
        self.rows = native.ext.Rows()

    def settle(self) -> None:
        """Move the listed rows into the dict (a later row of a key wins, as a write would)."""
        if len(self.rows):
            self.update(self.rows.items())
            self.rows.clear()

    def __getitem__(self, key: bytes) -> bytes | None:
        self.settle()
        return MemTable.__getitem__(self, key)

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Store `value` at `key`."""
        self.settle()
        _dict_set(self, key, value)

    put = __setitem__

    def __contains__(self, key: object) -> bool:
        self.settle()
        return MemTable.__contains__(self, key)

    def __len__(self) -> int:
        self.settle()
        return MemTable.__len__(self)

    def __iter__(self) -> Iterator[bytes]:
        self.settle()
        return MemTable.__iter__(self)

    def items(self):
        """dict's, once settled."""
        self.settle()
        return MemTable.items(self)

    def get(self, key: bytes, default: Any = None) -> Any:
        """dict's, once settled."""
        self.settle()
        return MemTable.get(self, key, default)

    def delete(self, key: bytes) -> None:
        """Remove `key` if present."""
        self.settle()
        MemTable.delete(self, key)

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix`, in key order from `start` (inclusive)."""
        self.settle()
        return MemTable.range(self, prefix, start, reverse)

    def sorted_rows(self) -> RowsInOrder:
        """Take every row out, as `(key, value)` in key order (LMDB's: bytes order).

        When the compiled loop wrote them all, they are sorted in C and made one at a time as
        they are iterated (`_fold.SortedRows`): a key written twice (which `apply` never does)
        then appears twice, the later one last, and an appending `putmulti` shows it by adding
        fewer rows than it was given.
        """
        if MemTable.__len__(self):
            self.settle()
            rows = sorted(MemTable.items(self), key=_first)
        else:
            rows = self.rows.take_sorted()
        self.clear()
        return rows

    def clear(self) -> None:
        """Drop every row."""
        self.rows.clear()
        MemTable.clear(self)


_first = itemgetter(0)


def sorted_rows(table: dict[bytes, bytes]) -> RowsInOrder:
    """The rows of a table as `(key, value)` in key order (taken out of a `ListedTable`): a
    list, or a `_fold.SortedRows` (sized, iterable more than once).

    By key rather than by tuple: a third faster on a rebuild's tables."""
    if isinstance(table, ListedTable):
        return table.sorted_rows()
    return sorted(table.items(), key=_first)


def for_put(rows: RowsInOrder) -> Iterable[tuple[Any, Any]]:
    """`rows` for a consumer that lets go of each row before asking for the next, as LMDB's
    `putmulti` does: a `_fold.SortedRows` then hands out one pair of read-only buffers again
    and again, pointed at each row in turn, instead of making two bytes and a tuple a row
    (`SortedRows.transient`); a list is returned as it is."""
    transient = getattr(rows, "transient", None)
    return rows if transient is None else transient()


class MemoryTables(_ByName):
    """`Tables` over dicts, for model tests, replay, time travel and rebuild.

    `data` maps each table name to its view, a dict of `{key: value}`; the tables named in
    `digested` (a subset of `APPEND_ONLY`) are `DigestTable`s (under `key`, if given) instead,
    and those in `listed` (also of `APPEND_ONLY`) `ListedTable`s. With `user`, the tables whose
    rows are users' keep only that user's rows (`user_rows`; `audit inbox`): `apply` reads
    another user's rows only to write that user's, so the user's rows are those of a whole
    replay (tests/audit/test_streaming.py checks it on random logs).
    """

    __slots__ = ("data", *TABLES)

    def __init__(self, digested: frozenset[str] = frozenset(), key: bytes | None = None,
                 listed: frozenset[str] = frozenset(), user: str | None = None) -> None:
        assert digested <= APPEND_ONLY and listed <= APPEND_ONLY, (digested, listed)
        self.data: dict[str, MemTable] = {}
        for name in TABLES:
            mine = None if user is None else user_rows(name, user)
            if name in digested:
                view = DigestTable(key)
            elif name in listed:
                view = ListedTable()
            elif mine is not None:
                view = OneUserGroupedTable(mine) if name in GROUPED else OneUserMemTable(mine)
            else:
                view = GroupedMemTable() if name in GROUPED else MemTable()
            self.data[name] = view
            setattr(self, name, view)

    def items(self) -> list[tuple[str, bytes, bytes]]:
        """Return every row as `(table, key, value)` in canonical (table, key) order."""
        return [(t, k, self.data[t][k]) for t in sorted(TABLES) for k in sorted(self.data[t])]


# ---------------------------------------------------------------- the store's live tables


class BufTable(dict):
    """One table of `BufferedTables`: rows read or written (absent as None) over the txn.

    `dirty` holds the rows the current batch changed (None: deleted) until the batch ends.
    The compiled `add_message` writes to a BufTable (this class exactly, not a subclass) as
    `__setitem__` does, without calling it (storage/_fold.c, `set_row`): change both together.

    `last`, for the tables of `LAST_KEYS` (None for the others), maps a first byte to the greatest
    key with that first byte among the committed rows (the byte alone when there is none), as
    far as this process has looked. A key not changed by this batch and greater than its first
    byte's last key is absent: it is answered without a read. Kept per first byte so that keys
    of another form (cids like `order-1234` beside the SDK's time-ordered ones, which all begin
    with the same digit for decades) do not put every other key below the greatest. Only
    commits raise these keys (`raise_last`); a batch that fails leaves them as they were, since
    they describe committed rows only.

    Keys of these tables are `cid \0 sender` (a cid holds no NUL), and several senders' rising
    cids interleave: a sender whose send waited while another's later cids committed would
    read every time. So each sender's greatest committed key is kept too (`newest`, raised by
    each commit), with `base`, each first byte's last key when it was first read (or when
    `newest` was last emptied). A key above its first byte's base and above its sender's
    newest is absent: every stored key of that first byte is at most the base or was
    committed since by this process, and then is at most its sender's newest.
    """

    __slots__ = ("base", "db", "dirty", "last", "newest", "rows", "txn")

    def __init__(self, db: Any, rows: Rows) -> None:
        super().__init__()
        self.db = db
        self.rows = rows
        self.txn: lmdb.Transaction | None = None
        self.dirty: dict[bytes, bytes | None] = {}
        self.last: dict[int, bytes] | None = None
        self.base: dict[int, bytes] = {}
        self.newest: dict[bytes, bytes] = {}

    def __missing__(self, key: bytes) -> bytes | None:
        # Not changed by this batch, so the transaction holds the committed row.
        if self.last is not None and self._absent(key):
            value = None
        else:
            value = self.rows.get(self.txn, self.db, key)
        _dict_set(self, key, value)
        return value

    def _absent(self, key: bytes) -> bool:
        """Whether `key` is known absent from the committed rows without a read (`last`)."""
        first = key[0]
        if key > self._last_key(first):
            return True
        if key <= self.base[first]:
            return False
        mine = self.newest.get(key[key.find(b"\0") + 1:])
        return mine is None or key > mine

    def _last_key(self, first: int) -> bytes:
        found = self.last.get(first)
        if found is None:
            cur = self.txn.cursor(db=self.db)
            # The row before the next byte's first key; with nothing from there on, the last.
            at = cur.prev() if first < 255 and cur.set_range(bytes([first + 1])) else cur.last()
            key = cur.key() if at else b""
            found = key if key[:1] == bytes([first]) else bytes([first])
            self.last[first] = self.base[first] = found
        return found

    def raise_last(self) -> None:
        """This batch committed: raise the last keys of the first bytes and the senders it added
        rows under."""
        last = self.last
        if last is None:
            return
        newest = self.newest
        if len(newest) > TRACKED_SENDERS:
            # Bounded memory: forget the senders, and start again from keys no lower than
            # every committed one (`last` is raised by every commit).
            newest.clear()
            self.base.update(last)
        for key in self.dirty:
            # Rows of these tables are never removed; a removal would only leave a last key
            # above the true one, which costs reads, never a wrong answer.
            found = last.get(key[0])
            if found is not None and key > found:
                last[key[0]] = key
            sender = key[key.find(b"\0") + 1:]
            mine = newest.get(sender)
            if mine is None or key > mine:
                newest[sender] = key

    def cached_rows(self) -> int:
        """The rows held (for CACHE_ROWS)."""
        return len(self)

    def forget_last(self) -> None:
        """Forget the kept keys (the stored rows were replaced)."""
        if self.last is not None:
            self.last.clear()
        self.base.clear()
        self.newest.clear()

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Buffer `value` at `key`."""
        _dict_set(self, key, value)
        self.dirty[key] = value

    put = __setitem__

    def delete(self, key: bytes) -> None:
        """Buffer the removal of `key`."""
        _dict_set(self, key, None)
        self.dirty[key] = None

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix`: this batch's changes over the stored rows."""
        merged = dict(cursor_range(self.txn, self.db, prefix))
        for k, v in self.dirty.items():
            if k.startswith(prefix):
                merged[k] = v
        keys = [k for k, v in merged.items() if v is not None]
        return [(k, merged[k]) for k in _window(keys, start, reverse)]

    def stored_range(self, prefix: bytes) -> list[tuple[bytes, bytes | None]]:
        """`(key, value)` of the committed rows with `prefix`, each with this batch's value if
        it changed it (None: deleted); rows this batch added are left out. It costs the
        committed rows only, where `range` looks at every row the batch changed in the table
        (a batch of 4,096 acks each ranging over `delivered` would be quadratic)."""
        dirty = self.dirty
        return [(k, dirty.get(k, v)) for k, v in cursor_range(self.txn, self.db, prefix)]

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix`, this batch's changes included."""
        return len(self.range(prefix))

    def flush(self) -> None:
        """Write this batch's changes into the transaction, each key once, in key order."""
        if self.dirty:
            self.rows.put_rows(self.txn, self.db, self.dirty)

    def rollback(self) -> None:
        """Forget this batch's changes (the rows read stay: they are committed rows)."""
        for key in self.dirty:
            _dict_pop(self, key, None)
        self.dirty.clear()


class GroupedBufTable(BufTable):
    """A `BufTable` that also caches the rows of each group (`head \\0`) it was asked for, and
    the number of rows of each group it counted (`count`: the `--max-members` check of every
    invite and join).

    Those rows count against CACHE_ROWS with the view's own (`cached_rows`): a post to a
    group of 1,000 members caches its 1,000 member rows here (and their split copy in
    `parts`) for one row of the view's own, so that 300 such groups held 600,600 member rows
    (153 MiB) in a view of 300. The counts are one int a group, up to COUNTED_GROUPS.

    A change to a group whose rows or count are kept updates them (the rows and split rows as
    new copies: a caller may still hold the ones it was given) instead of dropping them: each
    change dropped them, so the next invite counted and the next post read every member again,
    in the write transaction (an invite 5 ms in a group of 10,000, 100 invites in one commit
    500 ms). A batch that fails drops the groups and counts it changed (`rollback`), as it
    drops its rows: what is kept is always the committed rows with this batch's changes."""

    __slots__ = ("counts", "group_rows", "groups", "parts")

    def __init__(self, db: Any, rows: Rows) -> None:
        super().__init__(db, rows)
        self.groups: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.parts = Parts(self)
        self.group_rows = 0  # the rows in `groups`
        self.counts: dict[bytes, int] = {}  # rows of a group, for groups counted

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Buffer `value` at `key`."""
        self._keep(key, value)
        BufTable.__setitem__(self, key, value)

    put = __setitem__

    def delete(self, key: bytes) -> None:
        """Buffer the removal of `key`."""
        self._keep(key, None)
        BufTable.delete(self, key)

    def _keep(self, key: bytes, value: bytes | None) -> None:
        """Bring what is kept of `key`'s group up to `key` set to `value` (None: removed);
        called before the change is buffered."""
        head = _head(key)
        rows, count = self.groups.get(head), self.counts.get(head)
        if rows is None:
            self.parts.pop(head, None)  # (built from the rows: never there without them)
            if count is not None and (self[key] is None) != (value is None):
                self.counts[head] = count + (1 if value is not None else -1)
            return
        at = bisect_left(rows, key, key=_first)
        was = at < len(rows) and rows[at][0] == key
        if not was and value is None:
            return
        kept = rows.copy()
        if value is None:
            del kept[at]
        elif was:
            kept[at] = (key, value)
        else:
            kept.insert(at, (key, value))
        self.groups[head] = kept
        self.group_rows += len(kept) - len(rows)
        if count is not None:
            self.counts[head] = len(kept)
        parts = self.parts.get(head)
        if parts is not None and was != (value is not None):  # a row came or went
            tail = key[len(head):]
            self.parts[head] = (parts[:at] + parts[at + 1:] if value is None else
                                (*parts[:at], (tail, tail + b"\0", tail.decode()), *parts[at:]))

    def forget(self, head: bytes) -> None:
        """Drop the cached rows and count of group `head`."""
        rows = self.groups.pop(head, None)
        if rows is not None:
            self.group_rows -= len(rows)
        self.parts.pop(head, None)
        self.counts.pop(head, None)

    def forget_all(self) -> None:
        """Drop every cached group (the counts stay: they are small, and still right)."""
        self.groups.clear()
        self.parts.clear()
        self.group_rows = 0

    def forget_last(self) -> None:
        """Forget the kept keys and counts (the stored rows were replaced)."""
        BufTable.forget_last(self)
        self.counts.clear()

    def cached_rows(self) -> int:
        """The rows held: the view's own and those of its cached groups."""
        return len(self) + self.group_rows

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix` (a whole group is cached, and kept up to date
        by the changes to it)."""
        if start is not None or reverse or not _is_head(prefix):
            return BufTable.range(self, prefix, start, reverse)
        rows = self.groups.get(prefix)
        if rows is None:
            rows = self.groups[prefix] = BufTable.range(self, prefix)
            self.group_rows += len(rows)
        return rows

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix`; of a group, read once (its rows, then cached)
        and kept up to date by the changes to it."""
        if not _is_head(prefix):
            return BufTable.count(self, prefix)
        found = self.counts.get(prefix)
        if found is None:
            found = self.counts[prefix] = len(self.range(prefix))
        return found

    def rollback(self) -> None:
        """Forget this batch's changes and the groups they touched."""
        for key in self.dirty:
            self.forget(_head(key))
        BufTable.rollback(self)


class BufferedTables(_ByName):
    """The store's live tables: one view per table over the current write transaction.

    One instance lives as long as the store. Each batch calls `begin(txn)`, runs, `flush()`es,
    and after the commit returned `committed()`; a batch that failed anywhere calls
    `rollback()` (and `begin` rolls back leftovers of an attempt that never reached either).
    """

    __slots__ = ("_views", *TABLES)

    def __init__(self, dbs: dict[str, Any], rows: Rows) -> None:
        self._views: list[BufTable] = []
        for name in TABLES:
            cls = GroupedBufTable if name in GROUPED else BufTable
            view = cls(dbs[name], rows)
            if name in LAST_KEYS:
                view.last = {}
            self._views.append(view)
            setattr(self, name, view)

    def begin(self, txn: lmdb.Transaction) -> None:
        """Start a batch in the write transaction `txn`."""
        self.rollback()
        for view in self._views:
            view.txn = txn

    def flush(self) -> None:
        """Write every change of the batch into the transaction (before its commit)."""
        for view in self._views:
            view.flush()

    def committed(self) -> None:
        """The batch's transaction committed: its changes are now stored rows."""
        for name, view in zip(TABLES, self._views, strict=True):
            view.raise_last()
            view.dirty.clear()
            view.txn = None
            if name not in PERSISTENT or view.cached_rows() > CACHE_ROWS:
                view.clear()
                if isinstance(view, GroupedBufTable):
                    view.forget_all()
            if isinstance(view, GroupedBufTable) and len(view.counts) > COUNTED_GROUPS:
                view.counts.clear()

    def rollback(self) -> None:
        """The batch failed: drop every row it changed, so the views hold stored rows only."""
        for view in self._views:
            view.rollback()
            view.txn = None

    def reset(self) -> None:
        """Forget every cached row (the stored tables were replaced, e.g. by a rebuild)."""
        for view in self._views:
            view.rollback()
            view.clear()
            view.txn = None
            view.forget_last()
            if isinstance(view, GroupedBufTable):
                view.forget_all()
