"""`BufferedTables`: the store's live tables over its write transaction (the `Tables` view
itself: storage/tables.py).

Each view is a read-through dict of the rows read or written (absent rows as None) plus the keys
changed by the current batch; `flush()` writes those once, sorted. The views of small hot tables
(`PERSISTENT`) outlive the batch: after a commit they hold committed rows, so the next batch
reads them from memory; an aborted batch (`rollback`) drops exactly the rows it changed. The
grouped views also keep whole groups' rows, row counts and counts of owners and admins, which
changes update in place (`GroupedBufTable`); an aborted batch drops those of the groups it
changed.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import lmdb

from storage.rowio import Rows
from storage.tables import (
    APPEND_ONLY,
    GROUPED,
    MANAGER_ROLES,
    TABLES,
    ByName,
    Parts,
    count_managers,
    cursor_range,
    is_head_prefix,
    key_head,
    key_window,
    row_key,
)

# Tables of BufferedTables whose rows stay cached across batches: few rows, read by every batch.
# The others are written far more than read.
PERSISTENT = frozenset(TABLES) - APPEND_ONLY
# A persistent view holding more rows than this after a commit is emptied (bounded memory); the
# rows of the groups a grouped view caches count too (`GroupedBufTable.cached_rows`). The
# default of `homing serve --table-cache-rows` (`BufferedTables`' `cache_rows`): each of the 13
# persistent tables may hold this many, about 215 bytes a row (docs/OPERATIONS.md,
# "Limits").
CACHE_ROWS = 200_000
# Changes to a group's cached list noted beside it (`GroupedBufTable.changes`) past this plus
# half the list are applied at once, not at the next read: the old list, kept for them, is not
# held past that.
FOLD_AFTER = 32
# Groups whose row count, and groups whose count of owners and admins, a grouped view of
# BufferedTables keeps, at most (each emptied past it).
COUNTED_GROUPS = 100_000
# Tables whose greatest committed key per first byte BufferedTables keeps, so that a key above
# its first byte's is known to be absent without a read: the idempotency index, keyed
# `cid \0 sender`, where the SDK's cids sort by time (`BufTable.last`).
LAST_KEYS = frozenset({"idem"})
# Senders whose greatest committed key the `LAST_KEYS` views keep, at most (`BufTable.newest`).
TRACKED_SENDERS = 100_000

_dict_set = dict.__setitem__
_dict_pop = dict.pop


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
        return [(k, merged[k]) for k in key_window(keys, start, reverse)]

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
    """A `BufTable` that also caches the rows of each group (`head \\0`) it was asked for, the
    number of rows of each group it counted (`count`: the `--max-members` check of every
    invite and join), and the number of owners' and admins' rows of each group it counted
    (`managers`: whether someone can still invite once an owner or admin leaves, is removed or
    is made a member; the rules read every member's role for it until 2026-12-06, 4.4 to
    10.5 ms of the commit thread in a group of 20,000).

    Those rows count against CACHE_ROWS with the view's own (`cached_rows`): a post to a
    group of 1,000 members caches its 1,000 member rows here (and their split copy in
    `parts`) for one row of the view's own, so that 300 such groups held 600,600 member rows
    (153 MiB) in a view of 300. The counts are one int a group, up to COUNTED_GROUPS of each kind.

    A change to a group whose rows or count are kept updates them instead of dropping them:
    each change dropped them, so the next invite counted and the next post read every member
    again, in the write transaction (an invite 5 ms in a group of 10,000, 100 invites in one
    commit 500 ms). The lists handed out are never changed (a caller may still hold them): a
    change is noted in `changes` beside its group's list, and the next read of the whole group
    (`range`, `parts`) applies those noted, making the new lists once for them all
    (`settle`); so does a change past FOLD_AFTER plus half the list. Until 2026-12-06 each
    change made both lists anew: an invite into a group of 100,000 whose lists a post had
    cached took 4.4 to 4.9 ms of CPU, 0.27 ms since (docs/OPERATIONS.md). A batch that fails
    drops the groups and counts it changed (`rollback`), as it drops its rows: what is kept is
    always the committed rows with this batch's changes."""

    __slots__ = ("changes", "counts", "group_rows", "groups", "manager_counts", "parts",
                 "stale_parts")

    def __init__(self, db: Any, rows: Rows) -> None:
        super().__init__(db, rows)
        self.groups: dict[bytes, list[tuple[bytes, bytes]]] = {}
        # Of a group in `groups`, its changes since its list was made (key -> value, None:
        # removed), and its split rows as of that list (taken out of `parts`, whose next read
        # applies the changes to them: `_SettledParts`).
        self.changes: dict[bytes, dict[bytes, bytes | None]] = {}
        self.stale_parts: dict[bytes, tuple[tuple[bytes, bytes, str], ...]] = {}
        self.parts = _SettledParts(self)
        self.group_rows = 0  # the rows in `groups`, with their changes
        self.counts: dict[bytes, int] = {}  # rows of a group, for groups counted
        # Rows of a group whose value is in MANAGER_ROLES, for groups counted (`managers`).
        self.manager_counts: dict[bytes, int] = {}

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
        head = key_head(key)
        rows, count = self.groups.get(head), self.counts.get(head)
        managers = self.manager_counts.get(head)
        if rows is None:
            self.parts.pop(head, None)  # (built from the rows: never there without them)
            if count is not None or managers is not None:
                old = self[key]
                if count is not None and (old is None) != (value is None):
                    self.counts[head] = count + (1 if value is not None else -1)
                if managers is not None:
                    self.manager_counts[head] = managers + _managing(value) - _managing(old)
            return
        at = bisect_left(rows, key, key=row_key)
        listed = rows[at] if at < len(rows) and rows[at][0] == key else None
        changes = self.changes.get(head)
        old = ((None if listed is None else listed[1]) if changes is None or key not in changes
               else changes[key])
        was = old is not None
        if not was and value is None:
            return
        if changes is None:
            changes = self.changes[head] = {}
            parts = self.parts.pop(head, None)
            if parts is not None:
                self.stale_parts[head] = parts
        if (listed is None and value is None) or listed == (key, value):
            changes.pop(key, None)  # as the list has it
        else:
            changes[key] = value
        grown = (value is not None) - was
        self.group_rows += grown
        if count is not None:
            self.counts[head] = count + grown
        if managers is not None:
            self.manager_counts[head] = managers + _managing(value) - _managing(old)
        if len(changes) > FOLD_AFTER + len(rows) // 2:
            self.settle(head)

    def settle(self, head: bytes) -> None:
        """Apply the changes noted of group `head` to its list and split rows, as new ones."""
        changes = self.changes.get(head)
        if changes is None:
            return
        rows, parts = self.groups[head], self.stale_parts.get(head)
        if changes:  # (a failure here, an undecodable id, leaves them noted)
            rows, parts = _merged(rows, parts, changes, len(head))
        del self.changes[head]
        self.stale_parts.pop(head, None)
        self.groups[head] = rows
        if parts is not None:
            _dict_set(self.parts, head, parts)

    def forget(self, head: bytes) -> None:
        """Drop the cached rows and counts of group `head`."""
        rows = self.groups.pop(head, None)
        if rows is not None:
            self.group_rows -= len(rows)
            changes = self.changes.pop(head, None)
            if changes:
                self.group_rows -= sum((v is not None) - (_has(rows, k)) for k, v in
                                       changes.items())
        self.stale_parts.pop(head, None)
        self.parts.pop(head, None)
        self.counts.pop(head, None)
        self.manager_counts.pop(head, None)

    def forget_all(self) -> None:
        """Drop every cached group (the counts stay: they are small, and still right)."""
        self.groups.clear()
        self.changes.clear()
        self.stale_parts.clear()
        self.parts.clear()
        self.group_rows = 0

    def forget_last(self) -> None:
        """Forget the kept keys and counts (the stored rows were replaced)."""
        BufTable.forget_last(self)
        self.counts.clear()
        self.manager_counts.clear()

    def cached_rows(self) -> int:
        """The rows held: the view's own and those of its cached groups."""
        return len(self) + self.group_rows

    def range(self, prefix: bytes, start: bytes | None = None,
              reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Return `(key, value)` with `prefix` (a whole group is cached, and kept up to date
        by the changes to it)."""
        if start is not None or reverse or not is_head_prefix(prefix):
            return BufTable.range(self, prefix, start, reverse)
        rows = self.groups.get(prefix)
        if rows is None:
            rows = self.groups[prefix] = BufTable.range(self, prefix)
            self.group_rows += len(rows)
        elif prefix in self.changes:
            self.settle(prefix)
            rows = self.groups[prefix]
        return rows

    def count(self, prefix: bytes) -> int:
        """The number of rows with `prefix`; of a group, read once (its rows, then cached)
        and kept up to date by the changes to it."""
        if not is_head_prefix(prefix):
            return BufTable.count(self, prefix)
        found = self.counts.get(prefix)
        if found is None:
            found = self.counts[prefix] = len(self.range(prefix))
        return found

    def managers(self, head: bytes) -> int:
        """The rows of group `head` (`head \\0`) whose value is an owner's or admin's role
        (`MANAGER_ROLES`): counted once (with the group's rows, then cached, and its `count`),
        then kept up to date by the changes to it, as `count` is."""
        found = self.manager_counts.get(head)
        if found is None:
            rows = self.range(head)
            if not is_head_prefix(head):
                return count_managers(rows)
            found = self.manager_counts[head] = count_managers(rows)
            self.counts.setdefault(head, len(rows))
        return found

    def rollback(self) -> None:
        """Forget this batch's changes and the groups they touched."""
        for key in self.dirty:
            self.forget(key_head(key))
        BufTable.rollback(self)


def _managing(value: bytes | None) -> int:
    """1 if `value` (None: no row) is an owner's or admin's role, else 0."""
    return value in MANAGER_ROLES


def _has(rows: list[tuple[bytes, bytes]], key: bytes) -> bool:
    """Whether the sorted `rows` hold `key`."""
    at = bisect_left(rows, key, key=row_key)
    return at < len(rows) and rows[at][0] == key


def _merged(rows: list[tuple[bytes, bytes]], parts: tuple[tuple[bytes, bytes, str], ...] | None,
            changes: dict[bytes, bytes | None], cut: int,
            ) -> tuple[list[tuple[bytes, bytes]], tuple[tuple[bytes, bytes, str], ...] | None]:
    """`rows` (sorted) and their split rows `parts` (if any; keys cut at `cut`) with `changes`
    (key -> value, None: removed) applied, as new ones: the runs between changed keys copied
    whole."""
    new_rows: list[tuple[bytes, bytes]] = []
    new_parts: list[tuple[bytes, bytes, str]] | None = None if parts is None else []
    lo = 0
    for key in sorted(changes):
        at = bisect_left(rows, key, lo, key=row_key)
        new_rows += rows[lo:at]
        listed = at < len(rows) and rows[at][0] == key
        value = changes[key]
        if new_parts is not None:
            new_parts += parts[lo:at]  # type: ignore[index]
            if value is not None:
                tail = key[cut:]
                new_parts.append(parts[at] if listed else  # type: ignore[index]
                                 (tail, tail + b"\0", tail.decode()))
        if value is not None:
            new_rows.append((key, value))
        lo = at + listed
    new_rows += rows[lo:]
    if new_parts is None:
        return new_rows, None
    new_parts += parts[lo:]  # type: ignore[index]
    return new_rows, tuple(new_parts)


class _SettledParts(Parts):
    """The `parts` of a `GroupedBufTable`: a group missing here whose list has changes noted
    (its split rows set aside in `stale_parts`) has them applied first (`settle`)."""

    __slots__ = ()

    def __missing__(self, head: bytes) -> tuple[tuple[bytes, bytes, str], ...]:
        self.table.settle(head)
        found = dict.get(self, head)
        return Parts.__missing__(self, head) if found is None else found


class BufferedTables(ByName):
    """The store's live tables: one view per table over the current write transaction.

    One instance lives as long as the store. Each batch calls `begin(txn)`, runs, `flush()`es,
    and after the commit returned `committed()`; a batch that failed anywhere calls
    `rollback()` (and `begin` rolls back leftovers of an attempt that never reached either).
    """

    __slots__ = ("_views", "cache_rows", *TABLES)

    def __init__(self, dbs: dict[str, Any], rows: Rows, cache_rows: int | None = None) -> None:
        # The rows a persistent view may hold after a commit (None: CACHE_ROWS, as it is then).
        self.cache_rows = cache_rows
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
        bound = CACHE_ROWS if self.cache_rows is None else self.cache_rows
        for name, view in zip(TABLES, self._views, strict=True):
            view.raise_last()
            view.dirty.clear()
            view.txn = None
            if name not in PERSISTENT or view.cached_rows() > bound:
                view.clear()
                if isinstance(view, GroupedBufTable):
                    view.forget_all()
            if isinstance(view, GroupedBufTable):
                for counted in (view.counts, view.manager_counts):
                    if len(counted) > COUNTED_GROUPS:
                        counted.clear()

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
