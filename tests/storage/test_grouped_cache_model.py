"""The commit thread's cached group lists (`GroupedBufTable`) against a model of the rows, over a
real LMDB: random writes and removals in a few groups within one batch, reads of whole groups
(`range`, `parts`, `count`, `managers`) between them, commits, failed batches (`rollback`),
`forget` and the CACHE_ROWS emptying, at several FOLD_AFTER. After every step each read equals
the model (the committed rows with the batch's changes), every list handed out is still what it
was when it was handed out, every count kept is the model's, and `group_rows` is exactly the
rows the cached groups have.
"""

from __future__ import annotations

import tempfile

import hypothesis.strategies as st
import lmdb
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from storage import buffered_tables
from storage.buffered_tables import GroupedBufTable
from storage.rowio import Rows

GROUPS = [b"g1\0", b"g2\0", b"big\0"]
USERS = [f"u{i}".encode() for i in range(8)]
# A damaged role too (no UTF-8, a role's bytes in it): counted by `managers` as no manager.
VALUES = [b"member", b"admin", b"owner", b"\xffadmin"]
# Keys of the big group too: one of its listed members, one past them (up to 70 of them).
KEYS = [*USERS, b"m001", b"m040"]


def _split(head: bytes, rows) -> tuple:
    cut = len(head)
    return tuple((k[cut:], k[cut:] + b"\0", k[cut:].decode()) for k, _ in rows)


class GroupedCacheMachine(RuleBasedStateMachine):
    """One `GroupedBufTable` over a real LMDB database, batch after batch."""

    def __init__(self) -> None:
        super().__init__()
        self.committed: dict[bytes, bytes] = {}
        self.batch: dict[bytes, bytes | None] = {}
        self.held: list[tuple[object, object]] = []  # (list handed out, its copy then)
        self.env = self.view = self.txn = None
        self.saved = (buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER)

    @initialize(fold_after=st.sampled_from([0, 1, 2, 32]), big=st.integers(0, 70))
    def open(self, fold_after, big) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.env = lmdb.open(self.dir.name, max_dbs=2, map_size=16 << 20)
        db = self.env.open_db(b"member")
        buffered_tables.FOLD_AFTER = fold_after
        # A group big enough for changes below the early settle (FOLD_AFTER + half the list).
        with self.env.begin(write=True, db=db) as txn:
            for i in range(big):
                key = b"big\0" + f"m{i:03d}".encode()
                txn.put(key, b"member")
                self.committed[key] = b"member"
        self.view = GroupedBufTable(db, Rows(self.env))
        self._begin()

    def teardown(self) -> None:
        buffered_tables.CACHE_ROWS, buffered_tables.FOLD_AFTER = self.saved
        if self.txn is not None:
            self.txn.abort()
        if self.env is not None:
            self.env.close()
            self.dir.cleanup()

    def _begin(self) -> None:
        self.txn = self.env.begin(write=True, db=self.view.db)
        self.view.txn = self.txn

    def _model(self, head: bytes) -> list[tuple[bytes, bytes]]:
        rows = {k: v for k, v in self.committed.items() if k.startswith(head)}
        for k, v in self.batch.items():
            if k.startswith(head):
                if v is None:
                    rows.pop(k, None)
                else:
                    rows[k] = v
        return sorted(rows.items())

    @rule(head=st.sampled_from(GROUPS), user=st.sampled_from(KEYS),
          value=st.sampled_from(VALUES))
    def put(self, head, user, value) -> None:
        self.view[head + user] = value
        self.batch[head + user] = value

    @rule(head=st.sampled_from(GROUPS), user=st.sampled_from(KEYS))
    def delete(self, head, user) -> None:
        self.view.delete(head + user)
        self.batch[head + user] = None

    @rule(head=st.sampled_from(GROUPS))
    def read_range(self, head) -> None:
        rows = self.view.range(head)
        assert rows == self._model(head), head
        self.held.append((rows, list(rows)))

    @rule(head=st.sampled_from(GROUPS))
    def read_parts(self, head) -> None:
        parts = self.view.parts[head]
        assert parts == _split(head, self._model(head)), head
        self.held.append((parts, tuple(parts)))

    @rule(head=st.sampled_from(GROUPS))
    def read_count(self, head) -> None:
        assert self.view.count(head) == len(self._model(head)), head

    @rule(head=st.sampled_from(GROUPS))
    def read_managers(self, head) -> None:
        assert self.view.managers(head) == sum(
            v in (b"owner", b"admin") for _, v in self._model(head)), head

    @rule(head=st.sampled_from(GROUPS), user=st.sampled_from(USERS))
    def read_row(self, head, user) -> None:
        assert self.view[head + user] == dict(self._model(head)).get(head + user)

    @rule(empty=st.booleans())
    def commit(self, empty) -> None:
        """A commit; past CACHE_ROWS (0 here when `empty`) the view is emptied, as
        `BufferedTables.committed` does."""
        self.view.flush()
        self.txn.commit()
        self.view.raise_last()
        self.view.dirty.clear()
        if empty or self.view.cached_rows() > buffered_tables.CACHE_ROWS:
            self.view.clear()
            self.view.forget_all()
        for k, v in self.batch.items():
            if v is None:
                self.committed.pop(k, None)
            else:
                self.committed[k] = v
        self.batch = {}
        self._begin()

    @rule()
    def fail(self) -> None:
        """A batch that failed: its transaction aborted, the view rolled back."""
        self.txn.abort()
        self.view.rollback()
        self.batch = {}
        self._begin()

    @rule(head=st.sampled_from(GROUPS))
    def forget(self, head) -> None:
        self.view.forget(head)

    @invariant()
    def caches_are_the_rows(self) -> None:
        view = self.view
        if view is None:
            return
        assert set(view.changes) <= set(view.groups)
        assert not set(view.stale_parts) & set(dict(view.parts))
        assert set(view.stale_parts) <= set(view.changes)
        held = 0
        for head, rows in view.groups.items():
            kept = dict(rows)
            kept.update(view.changes.get(head, {}))
            now = sorted((k, v) for k, v in kept.items() if v is not None)
            assert now == self._model(head), head
            held += len(now)
            if head in view.stale_parts:
                assert view.stale_parts[head] == _split(head, rows)
        for head, parts in dict(view.parts).items():
            assert head in view.groups and head not in view.changes
            assert parts == _split(head, self._model(head))
        for head, count in view.counts.items():
            assert count == len(self._model(head)), head
        for head, managers in view.manager_counts.items():
            assert managers == sum(v in (b"owner", b"admin") for _, v in self._model(head)), head
        assert view.group_rows == held
        for given, then in self.held:  # never changed once handed out
            assert given == then


GroupedCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_grouped_cache_equals_the_rows = GroupedCacheMachine.TestCase
