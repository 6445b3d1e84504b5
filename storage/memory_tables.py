"""The in-memory `Tables`: `MemoryTables` and its views, for model tests, replay, time travel,
rebuild and the audits (the `Tables` view itself: storage/tables.py).

* `MemoryTables`: dicts. A view IS a dict (`view[key]` and `put` are the dict's own C methods),
  so a replay costs dict operations only. With `user`, a replay of one user's rows.
* `DigestTable`: stands in for an `APPEND_ONLY` table of `MemoryTables` when a replay only has
  to be compared (audits): it folds the rows into a count and a multiset digest as it goes.
* `ListedTable`: stands in for an `APPEND_ONLY` table of a rebuild, where the compiled replay
  loop lists its rows in one buffer, sorted just before the write (`sorted_rows`, `for_put`).
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from storage import native
from storage.tables import (
    APPEND_ONLY,
    GROUPED,
    TABLES,
    ByName,
    Parts,
    count_managers,
    is_head_prefix,
    key_head,
    key_window,
    row_key,
)

# Where a table's key names the user a row belongs to (`MemoryTables(user=...)`): its first part,
# its last part (`conv \0 user`), or the whole key. The other tables are not one user's:
# `conv`, `conv_seq`, `meta`, and `delivered`, `revoked` (per device or user, few, and read by
# the fold of every ack and revocation: kept whole, the fold takes the same turns), `msg`, `idem`.
USER_HEAD = frozenset({"user_conv", "inbox", "mute", "created"})
USER_TAIL = frozenset({"member", "recv", "read", "joined"})
USER_WHOLE = frozenset({"inbox_head"})

# What `sorted_rows` returns: a list, or a `_fold.SortedRows`; both sized and re-iterable.
RowsInOrder = Collection[tuple[bytes, bytes]]

_MISS = object()
_MOD = 1 << 64
_dict_set = dict.__setitem__
_dict_pop = dict.pop


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
        return [(k, self[k]) for k in key_window(keys, start, reverse)]

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix`."""
        return len(self.range(prefix))


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
            head = key_head(key)
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
            head = key_head(key)
            self.parts.pop(head, None)
            group = self.groups[head]
            group.remove(key)
            if not group:
                del self.groups[head]

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix`, in key order from `start` (inclusive)."""
        if start is None and not reverse and is_head_prefix(prefix):
            return [(k, self[k]) for k in self.groups.get(prefix, ())]
        return MemTable.range(self, prefix, start, reverse)

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix` (of a group: without looking at them)."""
        if is_head_prefix(prefix):
            return len(self.groups.get(prefix, ()))
        return MemTable.count(self, prefix)

    def managers(self, head: bytes) -> int:
        """The rows of group `head` (`head \\0`) whose value is an owner's or admin's role
        (`MANAGER_ROLES`), looked at one by one (the model's; the store keeps them counted)."""
        return count_managers(self.range(head))


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

        When the compiled loop wrote them all, they are sorted in C (`_fold.SortedRows`: made
        one at a time as they are iterated, or written from its buffers by `storage.rowio`): a
        key written twice (which `apply` never does) then appears twice, the later one last,
        and appending them raises KeyExistsError (`Rows.append_rows`).
        """
        if MemTable.__len__(self):
            self.settle()
            rows = sorted(MemTable.items(self), key=row_key)
        else:
            rows = self.rows.take_sorted()
        self.clear()
        return rows

    def clear(self) -> None:
        """Drop every row."""
        self.rows.clear()
        MemTable.clear(self)




def sorted_rows(table: dict[bytes, bytes]) -> RowsInOrder:
    """The rows of a table as `(key, value)` in key order (taken out of a `ListedTable`): a
    list, or a `_fold.SortedRows` (sized, iterable more than once).

    By key rather than by tuple: a third faster on a rebuild's tables."""
    if isinstance(table, ListedTable):
        return table.sorted_rows()
    return sorted(table.items(), key=row_key)


def for_put(rows: RowsInOrder) -> Iterable[tuple[Any, Any]]:
    """`rows` for a consumer that lets go of each row before asking for the next, as LMDB's
    `putmulti` does: a `_fold.SortedRows` then hands out one pair of read-only buffers again
    and again, pointed at each row in turn, instead of making two bytes and a tuple a row
    (`SortedRows.transient`); a list is returned as it is."""
    transient = getattr(rows, "transient", None)
    return rows if transient is None else transient()


class MemoryTables(ByName):
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
