"""The `Tables` view that projections and rules work on: the table names, the key helpers and
the by-name methods every implementation shares, and `TxnTables`.

A `Tables` object has one attribute per table (`tables.conv_seq`, `tables.inbox`, ...), each a
table view: `view[key]` is the value or None when absent, `view[key] = value` (or
`view.put(key, value)`; on hot paths the subscript, which MemoryTables runs in C),
`view.delete(key)`, `view.range(prefix, start=None, reverse=False)` and `view.count(prefix)`;
a grouped view (`GROUPED`) also has `managers(head)`, the rows of group `head \0` whose value
is an owner's or admin's role. `tables.get(name, key)` and friends do the same by table name,
for code off the hot path.

* `MemoryTables` (storage/memory_tables.py): dicts, for model tests, replay, time travel and
  rebuild; with `DigestTable` and `ListedTable`, the append-only tables of audits and rebuilds.
* `BufferedTables` (storage/buffered_tables.py): the store's live tables over its write
  transaction, cached across batches.
* `TxnTables` (here): straight over one LMDB transaction, for queries (`range`).

All give the same answers for the same operations; the model tests check it.
"""

from __future__ import annotations

from collections.abc import Iterator
from operator import itemgetter
from typing import Any

import lmdb

TABLES = ("conv", "conv_seq", "msg", "member", "user_conv", "inbox", "inbox_head", "delivered",
          "recv", "read", "idem", "created", "mute", "revoked", "joined", "meta")
# Tables that `apply` and `decide` range over by their first key part ("head \0").
GROUPED = frozenset({"member", "user_conv"})
# Tables with a row per message or inbox entry: `apply` only adds rows to them, each key once,
# and never reads them back (bar `acked_convs` on acks logged before they carried their convs).
APPEND_ONLY = frozenset({"msg", "inbox", "idem"})
# The roles that invite (the rules' `MANAGERS`), and their stored values in `member` and
# `user_conv` rows: what a grouped view's `managers(head)` counts of a group.
MANAGERS = ("owner", "admin")
MANAGER_ROLES = frozenset(role.encode() for role in MANAGERS)

_dict_set = dict.__setitem__
row_key = itemgetter(0)  # a (key, value) row's key, to sort or bisect rows by
row_value = itemgetter(1)


def count_managers(rows: list[tuple[bytes, bytes]]) -> int:
    """The rows of `rows` whose value is a manager's role (`MANAGER_ROLES`), counted in C."""
    return sum(map(MANAGER_ROLES.__contains__, map(row_value, rows)))


def prefix_end(prefix: bytes) -> bytes | None:
    """Return the smallest key greater than every key with `prefix`, None if there is none."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def key_window(keys: list[bytes], start: bytes | None, reverse: bool) -> list[bytes]:
    """Sort `keys` (in place) in the order of a `range` and return those from `start` on."""
    keys.sort(reverse=reverse)
    if start is None:
        return keys
    return [k for k in keys if (k <= start if reverse else k >= start)]


def key_head(key: bytes) -> bytes:
    """Return the group prefix `head \\0` of a two-part key."""
    return key[:key.index(b"\0") + 1]


def is_head_prefix(prefix: bytes) -> bool:
    """Whether `prefix` is a whole group prefix `head \\0` (what grouped views keep)."""
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


class ByName:
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


# ---------------------------------------------------------------- over one transaction


class TxnTables(ByName):
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
