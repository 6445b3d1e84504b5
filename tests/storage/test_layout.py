"""The projection layout: a directory written with another layout is rebuilt on a writable open."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from storage.commands import Ack, MarkRead, SendMessage
from storage.store import LAYOUT, LAYOUT_KEY, Store


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


def _reopened(store: Store, path, older) -> Store:
    """Make `store`'s directory one an older homing left (`older(txn, dbs)`), then open it
    again: its projections are rebuilt in this layout, row for row the same."""
    before = store.dump_projections()
    store._env.write(lambda txn: older(txn, store._dbs))
    store.close()
    store = Store.open(path)
    try:
        assert store.stored_layout() == LAYOUT
        assert store.dump_projections() == before
    except BaseException:
        store.close()
        raise
    return store


def test_idempotency_rows_of_layout_2_are_rekeyed_and_still_catch_retries(tmp_path):
    """Layout 2 keyed `idem` by sender then cid; layout 3 by cid then sender. A directory of
    layout 2 is rebuilt on open, and a send retried across the upgrade is still a dup."""
    path = tmp_path / "data"
    store = Store.open(path)
    store.execute([SendMessage("bob", "d", "user", f"c{i}", "hi", to="alice") for i in range(3)])

    def downgrade(txn, dbs):  # the rows as layout 2 wrote them
        rows = list(txn.cursor(db=dbs["idem"]))
        txn.drop(dbs["idem"], delete=False)
        for key, value in rows:
            cid, sender = key.split(b"\0")
            txn.put(sender + b"\0" + cid, value, db=dbs["idem"])
        txn.put(LAYOUT_KEY, b"2", db=dbs["layout"])

    store = _reopened(store, path, downgrade)
    try:
        (out,) = store.execute([SendMessage("bob", "d", "user", "c1", "hi", to="alice")])
        assert out.reply["dup"] and out.reply["seq"] == 2
        assert store.last_lsn() == 6  # the conversation's creation (3) and three sends: no more
    finally:
        store.close()


def test_a_directory_of_layout_6_gets_its_users_highest_device_marks_on_open(tmp_path):
    """Layout 7 adds each user's highest device mark (`delivered`, key `user \0`), which an
    ack past what its session was sent reads instead of every device row of the user. A
    directory written by layout 6 (no such rows) is rebuilt on its first writable open: the
    rows the log makes, and the acks after it read the inbox beyond the highest mark only."""
    path = tmp_path / "data"
    store = Store.open(path)
    store.execute([SendMessage("bob", "d", "user", f"c{i}", "hi", to="alice") for i in range(6)])
    store.execute([Ack("alice", "phone", "user", 4, None), Ack("alice", "tablet", "user", 2)])
    assert store._u64("delivered", b"alice\0") == 4

    def as_layout_6(txn, dbs):
        assert txn.delete(b"alice\0", db=dbs["delivered"])
        txn.put(LAYOUT_KEY, b"6", db=dbs["layout"])

    store = _reopened(store, path, as_layout_6)
    try:
        assert store._u64("delivered", b"alice\0") == 4
        assert store.ack_convs("alice", 6) == (("dm:alice:bob", 6),)
        (out,) = store.execute([Ack("alice", "laptop", "user", 6, None)])
        assert out.error is None
        (event,) = store.log.read(store.last_lsn())
        assert event.data["convs"] == {"dm:alice:bob": 6}
        assert store.check_projections() is None
    finally:
        store.close()


def older_layout(path, events: int) -> int:
    """A data directory at `path` holding `events` or more events, marked as written by
    layout 3 (before `revoked`): the next writable open rebuilds it. Returns its last LSN."""
    store = Store.open(path)
    try:
        for base in range(0, events, 5000):
            store.execute([SendMessage("bob", "d", "user", f"c{i}", "hi", to="alice")
                           for i in range(base, min(events, base + 5000))])
        store._env.write(lambda txn: txn.put(LAYOUT_KEY, b"3", db=store._dbs["layout"]))
        return store.last_lsn()
    finally:
        store.close()


def test_a_rebuild_on_open_reports_its_progress(tmp_path):
    """`on_rebuild(replayed, total)` every chunk of the replay, up to the log's last LSN; an
    open that needs no rebuild calls it never."""
    last = older_layout(tmp_path / "data", 20_000)
    calls: list[tuple[int, ...]] = []
    store = Store.open(tmp_path / "data", on_rebuild=lambda *call: calls.append(call))
    try:
        assert store.stored_layout() == LAYOUT
    finally:
        store.close()
    assert calls and all(total == last for _, total in calls)
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})
    assert 0 < calls[0][0] < last and calls[-1][0] <= last
    again: list[tuple[int, int]] = []
    Store.open(tmp_path / "data", on_rebuild=lambda *a: again.append(a)).close()
    assert again == []


def test_the_layout_change_is_logged_as_the_layout_numbers(tmp_path):
    """docs/OPERATIONS.md, "Logs": `projections_layout_changed` says the directory's layout and
    this homing's. They were logged as bytes, which the broker's JSON log wrote as Python's
    repr, `"stored": "b'5'", "layout": "b'6'"` (found running an upgrade from layout 5, as the
    guide's "Upgrading" says); now `"5"` and `"6"`, and null for a directory from before
    layouts were recorded."""
    older_layout(tmp_path / "data", 10)
    with capture_logs() as logs:
        Store.open(tmp_path / "data").close()
    (changed,) = [e for e in logs if e["event"] == "projections_layout_changed"]
    assert (changed["stored"], changed["layout"]) == ("3", LAYOUT.decode())
    store = Store.open(tmp_path / "data")
    store._env.write(lambda txn: txn.delete(LAYOUT_KEY, db=store._dbs["layout"]))
    store.close()
    with capture_logs() as logs:
        Store.open(tmp_path / "data").close()
    (changed,) = [e for e in logs if e["event"] == "projections_layout_changed"]
    assert changed["stored"] is None
    assert json.loads(json.dumps(changed, default=repr))["layout"] == LAYOUT.decode()
