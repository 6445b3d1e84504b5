"""Review findings on costs that grew with the data: each test failed before its fix.

Costs are counted (rows read through a real Store), never timed.
"""

from __future__ import annotations

from collections import Counter

from storage.commands import Ack, CreateConv, SendMessage
from storage.records import pack_u64


class _CountingRows:
    """Stands in for a `BufTable`'s `Rows`: counts the rows it reads, does the rest as ever."""

    def __init__(self, rows) -> None:
        self._rows = rows
        self.gets = 0

    def get(self, txn, db, key):
        self.gets += 1
        return self._rows.get(txn, db, key)

    def __getattr__(self, name):
        return getattr(self._rows, name)


class _CountingCursor:
    """Stands in for an LMDB cursor: counts the rows its iterations read into `reads`."""

    def __init__(self, cursor, name, reads) -> None:
        self._cursor, self._name, self._reads = cursor, name, reads

    def _counted(self, rows):
        for row in rows:
            self._reads[self._name] += 1
            yield row

    def __iter__(self):
        return self._counted(self._cursor.iternext())

    def iternext(self, *args, **kwargs):
        return self._counted(self._cursor.iternext(*args, **kwargs))

    def iterprev(self, *args, **kwargs):
        return self._counted(self._cursor.iterprev(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class _CountingTxn:
    """Stands in for an LMDB transaction: counts the rows read, by table, into `reads` (each
    `get`, each row a cursor's iteration yields); does the rest as ever."""

    def __init__(self, txn, names, reads) -> None:
        self._txn, self._names, self._reads = txn, names, reads

    def get(self, key, default=None, db=None):
        self._reads[self._names.get(id(db))] += 1
        return self._txn.get(key, default, db=db)

    def cursor(self, db=None):
        return _CountingCursor(self._txn.cursor(db=db), self._names.get(id(db)), self._reads)

    def __getattr__(self, name):
        return getattr(self._txn, name)


def _table_reads(store) -> Counter:
    """Count the rows of each table the store reads from LMDB from now on, in its batches and
    in its read transactions (through py-lmdb's own calls, which the compiled row functions
    would bypass: `storage/rowio.py` takes them where it is not compiled)."""
    reads: Counter = Counter()
    names = {id(db): name for name, db in store._dbs.items()}
    store._rows.compiled = False
    write, begin_read = store._env.write, store._env._begin_read
    store._env.write = lambda work: write(lambda txn: work(_CountingTxn(txn, names, reads)))
    store._env._begin_read = lambda: _CountingTxn(begin_read(), names, reads)
    return reads


def _inbox_reads(store):
    """Count the inbox rows the store's batches read from now on."""
    view = store._tables.inbox
    counting = view.rows = _CountingRows(view.rows)
    return counting


def _dm_and_group(store, n: int) -> str:
    """Fill bob's inbox: `n` messages of alice's in their dm, then carol's group `g` (bob
    added) with `n` messages of hers; return the group's id."""
    store.execute([SendMessage("alice", "d", "user", f"a{i:04d}", "hi", to="bob")
                   for i in range(n)])
    (created,) = store.execute([CreateConv("carol", "d", "user", "group", "g", False, ("bob",))])
    group = created.reply["conv"]
    store.execute([SendMessage("carol", "d", "user", f"c{i:04d}", "hi", conv=group)
                   for i in range(n)])
    return group


def test_an_ack_without_its_convs_reads_only_entries_no_device_acked(store):
    """An ack whose conversations the broker does not know (a device acking past what its
    session delivered: a new device acking its user's head) made the rules read every inbox
    entry it covers, in the write transaction, for every device alike: each new device of a
    user with 1,000,000 entries cost 1.4 to 1.7 s of the committer. `recv` is per user, so
    only the entries beyond the user's highest device mark are read now."""
    n = 300
    group = _dm_and_group(store, n)
    head = store.inbox_head("bob")
    assert head == 2 * n + 1  # the dm's messages, the group's added entry, its messages
    half = n + 1

    reads = _inbox_reads(store)
    (first,) = store.execute([Ack("bob", "phone", "user", half, None)])
    assert first.error is None
    assert reads.gets == half  # the entries nobody had acked: read, as before
    dm = "dm:alice:bob"
    assert "bob" in store.receipts(dm, n)[1]
    assert "bob" not in store.receipts(group, 1)[1]

    reads.gets = 0
    (again,) = store.execute([Ack("bob", "laptop", "user", half, None)])
    assert again.error is None
    assert reads.gets == 0  # all acked by the phone already: nothing to read

    reads.gets = 0
    (rest,) = store.execute([Ack("bob", "tablet", "user", head, None)])
    assert rest.error is None
    assert reads.gets == head - half  # only the entries beyond the phone's mark
    assert "bob" in store.receipts(group, n)[1]

    reads.gets = 0
    store.execute([Ack("bob", "phone", "user", head, None), Ack("bob", "watch", "user", head)])
    assert reads.gets == 0
    assert store.delivered("bob", "watch") == head
    assert store.check_projections() is None


def test_an_ack_reads_past_the_marks_of_its_batchs_earlier_acks(store):
    """An ack without its convs read the inbox past the committed marks of its user's devices
    only: after the first ack of another of their devices in the same batch, it read again
    the entries that ack covered and logged their conversations, which the same acks one at a
    time do not. It reads past the batch's marks now, and logs what it would alone."""
    n = 50
    group = _dm_and_group(store, n)
    head, half = store.inbox_head("bob"), n + 1
    reads = _inbox_reads(store)
    outs = store.execute([Ack("bob", "phone", "user", half, None),
                          Ack("bob", "tablet", "user", head, None)])
    assert [o.error for o in outs] == [None, None]
    assert reads.gets == head  # each entry once
    phone, tablet = store.log.read(store.last_lsn() - 1)
    assert phone.data["convs"] == {"dm:alice:bob": n}
    assert tablet.data["convs"] == {group: n}  # the entries past the phone's mark alone
    assert store.check_projections() is None


def test_an_ack_past_what_was_sent_reads_the_same_rows_whatever_the_devices(store):
    """docs/OPERATIONS.md, "What grows with the data": an ack past what its session was sent
    (no convs) read every `delivered` row of its user in the write transaction, to find the
    highest device mark (110 to 180 ms at 100,000 devices, every other commit waiting), and so
    did a new device's start at the head (`Store.ack_convs`). The highest mark is now one row
    (`delivered`, key `user \0`): a user of 300 devices costs an ack and a start the rows one
    of 3 costs."""
    for user, devices in (("bob", 3), ("carol", 300)):
        store.execute([SendMessage("alice", "d", "user", f"{user}{i}", "hi", to=user)
                       for i in range(10)])
        store.execute([Ack(user, f"dev{i}", "user", 5 - i % 5, ()) for i in range(devices)])
        store.execute([SendMessage("alice", "d", "user", f"{user}-{i}", "hi", to=user)
                       for i in range(10)])
    head = store.inbox_head("bob")
    assert head == store.inbox_head("carol") == 20
    reads = _table_reads(store)
    per_user = {}
    for user in ("bob", "carol"):
        reads.clear()
        assert store.ack_convs(user, head) == ((f"dm:alice:{user}", 20),)
        started = dict(reads)
        reads.clear()
        (out,) = store.execute([Ack(user, "new", "user", head, None)])
        assert out.error is None
        per_user[user] = (started, dict(reads))
    assert per_user["carol"] == per_user["bob"]
    started, acked = per_user["carol"]
    # One row each, 300 devices or 3: the start reads the highest mark; the ack its new device's
    # row (the highest mark it reads too is in the live view's cache since the commit wrote it).
    assert started["delivered"] == acked["delivered"] == 1
    assert started["inbox"] == acked["inbox"] == head - 5  # the entries beyond the marks alone
    assert store._get("delivered", b"carol\0") == pack_u64(head)
    assert store.check_projections() is None
