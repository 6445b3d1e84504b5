"""The store remembers the commands that met a damaged projection row (`Store.set_aside`), so
that the committer runs them apart from the start instead of splitting every later batch that
holds one (tests/broker/test_batch_split.py). Bounded; forgotten by a rebuild, a reopen, or a
command of the same kind that commits alone. Real LMDB, one row damaged behind homing's back
(tests/audit/test_damaged.py `poke`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import store as store_module
from storage.commands import Ack, CreateConv, Leave, SendMessage
from storage.errors import CorruptProjection
from storage.store import Store
from tests.audit.test_damaged import poke


def _send(user: str, cid: str, *, to: str | None = None, conv: str | None = None):
    return SendMessage(user, "d", "user", cid, "hi", conv=conv, to=to)


def _damaged_alice(path: Path) -> tuple[Store, str]:
    """bob sent alice a message; alice is in a group of carol's; then alice's inbox head was
    cut short. Returns the store and the group."""
    store = Store.open(str(path))
    try:
        store.execute([_send("bob", "b0", to="alice")])
        (made,) = store.execute([CreateConv("carol", "d", "user", "group", "g", False,
                                            ("alice",))])
    finally:
        store.close()
    poke(path, lambda txn, db: txn.put(b"alice", b"\x00\x02", db=db("inbox_head")))
    return Store.open(str(path)), made.reply["conv"]


def _fails(store: Store, command) -> CorruptProjection:
    with pytest.raises(CorruptProjection) as failed:
        store.execute([command])
    return failed.value


def test_a_command_that_met_a_damaged_row_alone_is_set_aside_until_rebuilt(tmp_path):
    store, group = _damaged_alice(tmp_path / "data")
    try:
        later = [_send("erin", "e1", to="frank"), _send("bob", "b2", to="alice"),
                 _send("carol", "c1", conv=group), Ack("alice", "d", "user", 1, None),
                 _send("bob", "b3", to="carol")]
        assert store.set_aside(later) == []  # nothing met yet
        store.execute([_send("erin", "e0", to="frank")])  # a batch of several: not learnt
        with pytest.raises(CorruptProjection):
            store.execute([_send("erin", "e2", to="frank"), _send("bob", "b1", to="alice")])
        assert store.set_aside(later) == []
        # Alone, each names the row; then its kind is remembered: the same conversation (any
        # sender, any cid), or the same user's acks.
        for command in (_send("bob", "b1", to="alice"), _send("carol", "c0", conv=group),
                        Ack("alice", "d", "user", 1, None)):
            assert (_fails(store, command).table, _fails(store, command).key) == (
                "inbox_head", b"alice")
        assert store.set_aside(later) == [1, 2, 3]
        assert store.set_aside([_send("alice", "a1", conv=group)]) == [0]
        # A rebuild writes the row again: nothing is set aside, the commands commit.
        store.rebuild()
        assert store.set_aside(later) == []
        assert all(o.error is None for o in store.execute(later))
    finally:
        store.close()


def test_forgotten_when_reopened_or_once_one_commits_alone(tmp_path):
    store, group = _damaged_alice(tmp_path / "data")
    try:
        _fails(store, _send("carol", "c0", conv=group))
        _fails(store, _send("bob", "b1", to="alice"))
        assert store.set_aside([_send("carol", "c1", conv=group)]) == [0]
        # alice leaves the group: a send into it no longer reads her inbox head, commits
        # alone, and the group is forgotten; the DM is still remembered.
        assert store.execute([Leave("alice", "d", "user", group)])[0].error is None
        assert store.execute([_send("carol", "c1", conv=group)])[0].error is None
        assert store.set_aside([_send("carol", "c2", conv=group),
                                _send("bob", "b2", to="alice")]) == [1]
    finally:
        store.close()
    store = Store.open(str(tmp_path / "data"))  # reopened: nothing remembered
    try:
        assert store.set_aside([_send("bob", "b2", to="alice")]) == []
        _fails(store, _send("bob", "b2", to="alice"))
    finally:
        store.close()


def test_bounded_the_oldest_forgotten_first(tmp_path):
    """Each sender's DM with alice is a conversation of its own: one more than the store keeps
    drops the first one met."""
    limit = store_module.DAMAGED_KEPT
    store, _group = _damaged_alice(tmp_path / "data")
    try:
        for i in range(limit + 1):
            _fails(store, _send(f"u{i}", "m0", to="alice"))
        assert store.set_aside([_send(f"u{i}", "m1", to="alice")
                                for i in (0, 1, limit)]) == [1, 2]
        assert len(store._damaged) == limit
    finally:
        store.close()
