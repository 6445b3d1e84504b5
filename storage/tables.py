"""Implementations of the `Tables` key-value view that projections and rules work on.

* `TxnTables`: straight over one LMDB transaction (queries, and the base of the buffer below).
* `BufferedTables`: a write-back buffer over a `TxnTables`; the store runs a whole batch against
  it and flushes every changed key once, sorted, at the end. Reads see the buffer first, so
  later commands of a batch see earlier ones; a key written 64 times is stored once.
* `MemoryTables`: dicts, for model tests, replay, time travel and rebuild.

All three give the same answers for the same operations; the model tests check it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb

TABLES = ("conv", "conv_seq", "msg", "member", "user_conv", "inbox", "inbox_head", "delivered",
          "recv", "read", "idem", "mute", "meta")
# Tables that `apply` and `decide` range over by their first key part; MemoryTables indexes them.
GROUPED = frozenset({"member", "user_conv"})

_MISS = object()


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


class TxnTables:
    """`Tables` over one LMDB transaction (write for execute/rebuild, read for queries)."""

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
        cur = self.txn.cursor(db=self.dbs[table])
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


class BufferedTables:
    """A write-back buffer over `TxnTables`; `flush()` writes each changed key once, sorted."""

    __slots__ = ("_ranges", "base", "dirty")

    def __init__(self, base: TxnTables) -> None:
        self.base = base
        self.dirty: dict[str, dict[bytes, bytes | None]] = {t: {} for t in TABLES}
        self._ranges: dict[tuple[str, bytes], list[tuple[bytes, bytes]]] = {}

    def get(self, table: str, key: bytes) -> bytes | None:
        """Return the buffered value at `key`, else the stored one, or None."""
        value = self.dirty[table].get(key, _MISS)
        if value is _MISS:
            return self.base.get(table, key)
        return value  # type: ignore[return-value]

    def put(self, table: str, key: bytes, value: bytes) -> None:
        """Buffer `value` at `key`."""
        self.dirty[table][key] = value
        if table in GROUPED:
            self._ranges.clear()

    def delete(self, table: str, key: bytes) -> None:
        """Buffer the removal of `key`."""
        self.dirty[table][key] = None
        if table in GROUPED:
            self._ranges.clear()

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(key, value)` with `prefix`, the buffer merged over the stored rows."""
        cache_key = (table, prefix)
        rows = self._ranges.get(cache_key)
        if rows is None:
            merged = dict(self.base.range(table, prefix))
            for k, v in self.dirty[table].items():
                if k.startswith(prefix):
                    merged[k] = v
            rows = [(k, merged[k]) for k in sorted(merged) if merged[k] is not None]
            if table in GROUPED:
                self._ranges[cache_key] = rows
        if start is None and not reverse:
            return iter(rows)
        index = dict(rows)
        return ((k, index[k]) for k in _window(list(index), start, reverse))

    def flush(self) -> None:
        """Write every buffered change into the base transaction and empty the buffer."""
        txn, dbs = self.base.txn, self.base.dbs
        for table, changes in self.dirty.items():
            if not changes:
                continue
            db = dbs[table]
            puts = []
            for key in sorted(changes):
                value = changes[key]
                if value is None:
                    txn.delete(key, db=db)
                else:
                    puts.append((key, value))
            if puts:
                txn.cursor(db=db).putmulti(puts)
            changes.clear()
        self._ranges.clear()


class MemoryTables:
    """`Tables` over dicts, for model tests, replay, time travel and rebuild.

    Keys of the GROUPED tables are also indexed by their part before the first `\\0`, so
    `range("member", conv + b"\\0")` costs the size of that conversation, not of the table.
    """

    def __init__(self) -> None:
        self.data: dict[str, dict[bytes, bytes]] = {t: {} for t in TABLES}
        self._groups: dict[str, dict[bytes, set[bytes]]] = {t: {} for t in GROUPED}

    def get(self, table: str, key: bytes) -> bytes | None:
        """Return the value at `key`, or None."""
        return self.data[table].get(key)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        """Store `value` at `key`."""
        if table in GROUPED:
            self._groups[table].setdefault(key.partition(b"\0")[0], set()).add(key)
        self.data[table][key] = value

    def delete(self, table: str, key: bytes) -> None:
        """Remove `key` if present."""
        if self.data[table].pop(key, None) is not None and table in GROUPED:
            head = key.partition(b"\0")[0]
            group = self._groups[table][head]
            group.discard(key)
            if not group:
                del self._groups[table][head]

    def range(self, table: str, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """Yield `(key, value)` with `prefix`, in key order from `start` (inclusive)."""
        d = self.data[table]
        head, sep, _ = prefix.partition(b"\0")
        if sep and table in GROUPED:
            group = self._groups[table].get(head, ())
            if start is None and not reverse and len(prefix) == len(head) + 1:
                return ((k, d[k]) for k in sorted(group))
            keys = [k for k in group if k.startswith(prefix)]
        else:
            keys = [k for k in d if k.startswith(prefix)]
        return ((k, d[k]) for k in _window(keys, start, reverse))

    def items(self) -> list[tuple[str, bytes, bytes]]:
        """Return every row as `(table, key, value)` in canonical (table, key) order."""
        return [(t, k, self.data[t][k]) for t in sorted(TABLES) for k in sorted(self.data[t])]
