"""The projection layout: a directory written with another layout is rebuilt on a writable open."""

from __future__ import annotations

from storage.commands import MarkRead, SendMessage
from storage.store import LAYOUT_KEY, Store


def test_stale_layout_is_rebuilt_from_the_log(tmp_path):
    """Projections of an older layout (no layout mark, a table missing) are rebuilt on open."""
    path = tmp_path / "data"
    store = Store.open(path)
    store.execute([SendMessage("bob", "d", "user", f"c{i}", "hi", to="alice") for i in range(5)]
                  + [MarkRead("alice", "d", "user", "dm:alice:bob", 3)])
    before = store.dump_projections()
    env, dbs = store._env, store._dbs

    def age(txn):
        txn.delete(LAYOUT_KEY, db=dbs["layout"])
        txn.drop(dbs["conv_seq"], delete=False)

    env.write(age)
    store.close()
    store = Store.open(path)
    try:
        assert store.dump_projections() == before
        assert store.conv_info("dm:alice:bob")["last_seq"] == 5
        assert store.unread("alice") == {"dm:alice:bob": 2}
    finally:
        store.close()
