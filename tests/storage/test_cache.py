"""The store's cached hot rows: a batch that fails anywhere leaves none of its rows cached."""

from __future__ import annotations

import sys

import lmdb
import pytest

from broker.client import new_cid
from storage import rowio
from storage.buffered_tables import CACHE_ROWS
from storage.commands import Ack, CreateConv, Leave, MarkRead, SendMessage
from storage.errors import StorageError
from storage.rules import Limits
from storage.store import Store, _InjectedAbort
from tests.disks import fill, tmpfs


def _send(user, cid, to="alice"):
    return SendMessage(user, "d", "user", cid, "hi", to=to)


def _check(store: Store) -> None:
    assert store.check_projections() is None
    assert store.verify_log() == store.last_lsn()


def test_injected_abort_forgets_cached_rows(store):
    """Seqs, inbox heads, marks and acks continue from the committed state after an abort."""
    store.execute([_send("bob", "c1"), _send("bob", "c2")])
    store._abort_after = 3
    with pytest.raises(_InjectedAbort):
        store.execute([_send("bob", "c3"), MarkRead("alice", "d", "user", "dm:alice:bob", 3),
                       Ack("alice", "d", "user", 3), _send("bob", "c4")])
    store._abort_after = None
    assert store.inbox_head("alice") == 2
    (out,) = store.execute([_send("bob", "c3")])
    assert (out.reply["seq"], out.reply["dup"]) == (3, False)
    assert out.effects.inbox_heads == {"alice": 3, "bob": 3}
    assert store.read_mark("dm:alice:bob", "alice") == 0
    _check(store)


def test_failed_commit_forgets_cached_rows(tmp_path):
    """A batch whose write fails after its changes were flushed (its commit finds the disk
    full: a real tmpfs, filled) leaves the cache clean."""
    with tmpfs(tmp_path, "2m") as disk:
        store = Store.open(disk / "data", map_size=64 << 20)
        try:
            store.execute([_send("bob", "c1")])
            fill(disk / "filler")
            big = [SendMessage("dave", "d", "user", f"big{i}", "x" * 60_000, to="erin")
                   for i in range(8)]  # more pages than the file has free
            with pytest.raises(StorageError):
                store.execute([_send("bob", "c2"), _send("carol", "c1"),
                               MarkRead("alice", "d", "user", "dm:alice:bob", 2), *big])
            (disk / "filler").unlink()
            assert store.members("dm:alice:carol") == []
            outs = store.execute([_send("bob", "c2"), _send("carol", "c1")])
            assert [o.reply["seq"] for o in outs] == [2, 1]
            assert store.inbox_head("alice") == 3
            assert store.read_mark("dm:alice:bob", "alice") == 0
            _check(store)
        finally:
            store.close()


def test_cids_above_the_last_committed_are_new_and_the_others_still_looked_up(tmp_path):
    """A cid above the greatest committed one with its first byte (of any sender) is new without
    a read; any other cid is read, so duplicates are found across batches and senders, after an
    aborted batch, and after a reopen."""
    store = Store.open(tmp_path / "data")
    try:
        store.execute([_send("bob", "c5")])
        outs = store.execute([_send("bob", "c7"), _send("bob", "c5"), _send("bob", "c7")])
        assert [o.reply["dup"] for o in outs] == [False, True, True]
        store._abort_after = 1
        with pytest.raises(_InjectedAbort):
            store.execute([_send("bob", "c9"), _send("bob", "c8")])
        store._abort_after = None
        outs = store.execute([_send("bob", "c9"), _send("bob", "c7"), _send("bob", "c6")])
        assert [o.reply["dup"] for o in outs] == [False, True, False]
        assert store._tables.idem.last == {ord("c"): b"c9\0bob"}  # raised by each commit
        # carol's c8 is below the last key: it is read (and new); bob's c8 was never committed
        outs = store.execute([_send("carol", "c8"), _send("bob", "c8"), _send("carol", "c8")])
        assert [o.reply["dup"] for o in outs] == [False, False, True]
        assert store._tables.idem.last == {ord("c"): b"c9\0bob"}
    finally:
        store.close()
    store = Store.open(tmp_path / "data")
    try:
        outs = store.execute([_send("bob", "c9"), _send("bob", "c4"), _send("bob", "c6"),
                              _send("carol", "c9")])
        assert [o.reply["dup"] for o in outs] == [True, False, True, False]
        _check(store)
    finally:
        store.close()


def _execute_counting_reads(store: Store, commands: list) -> tuple[list, int]:
    """Run `commands` as one batch; return the outcomes and the LMDB gets the batch made
    (through py-lmdb or storage/_rowio.c)."""
    gets = 0

    def count(frame, event, arg):
        nonlocal gets
        owner = getattr(arg, "__self__", None)
        if event == "c_call" and arg.__name__ == "get" and (
                isinstance(owner, lmdb.Transaction) or owner is rowio.ext):
            gets += 1

    sys.setprofile(count)
    try:
        outs = store.execute(commands)
    finally:
        sys.setprofile(None)
    return outs, gets


def test_cids_of_another_form_leave_the_sdks_cids_unread(store):
    """A sender whose cids sort above the SDK's (`order-1` begins with a letter) does not make
    the SDK's time-ordered cids of everyone else pay the read: the last keys are kept per first
    byte. Their own rising cids are not read either, and a retry of any is still a dup."""
    store.execute([_send("bob", new_cid()), _send("carol", "order-1"), _send("dave", new_cid())])
    outs, gets = _execute_counting_reads(store, [_send("bob", new_cid()) for _ in range(8)])
    assert gets == 0 and not any(o.reply["dup"] for o in outs)
    outs, gets = _execute_counting_reads(store, [_send("carol", "order-2"),
                                                 _send("dave", new_cid())])
    assert gets == 0 and not any(o.reply["dup"] for o in outs)
    outs, gets = _execute_counting_reads(store, [_send("carol", "order-1"),
                                                 _send("bob", outs[1].reply["cid"])])
    # carol's retry is read; dave's cid is above bob's newest, so bob's is new without a read
    assert gets == 1 and [o.reply["dup"] for o in outs] == [True, False]
    assert sorted(store._tables.idem.last) == [ord("1"), ord("o")]


def test_senders_whose_cids_interleave_are_not_read(tmp_path, monkeypatch):
    """Each sender's rising cids are new without a read even below another sender's greater
    ones (several services sending at once), and a retry below a sender's newest is read and
    found, as is a cid below the keys stored before the process first looked, also once the
    kept senders were forgotten (the bound) and after a rebuild."""
    store = Store.open(tmp_path / "data")
    try:
        store.execute([_send("bob", "t-03"), _send("carol", "t-04"), _send("dave", "t-02")])
    finally:
        store.close()
    store = Store.open(tmp_path / "data")
    try:
        # The first look; the conversations' rows are cached from here on. dave's retry of a
        # send stored before it is at most the base, and he has no newest yet: read, a dup.
        outs = store.execute([_send("dave", "t-02"), _send("bob", "t-05"), _send("carol", "t-09"),
                              _send("dave", "t-06")])
        assert [o.reply["dup"] for o in outs] == [True, False, False, False]
        outs, gets = _execute_counting_reads(store, [_send("bob", "t-06"), _send("dave", "t-07")])
        assert gets == 0 and not any(o.reply["dup"] for o in outs)
        outs, gets = _execute_counting_reads(store, [_send("bob", "t-07"), _send("carol", "t-10")])
        assert gets == 0 and not any(o.reply["dup"] for o in outs)
        # Below the sender's newest: read, whether a retry or not.
        outs, gets = _execute_counting_reads(store, [_send("bob", "t-06"), _send("bob", "t-01"),
                                                     _send("dave", "t-07")])
        assert gets == 3 and [o.reply["dup"] for o in outs] == [True, False, True]
        assert store._tables.idem.newest[b"bob"] == b"t-07\0bob"
        monkeypatch.setattr("storage.buffered_tables.TRACKED_SENDERS", 1)
        store.execute([_send("bob", "t-11")])  # over the bound: the senders are forgotten
        assert store._tables.idem.newest == {b"bob": b"t-11\0bob"}
        # dave's newest is forgotten: his keys up to the base (t-11 now) are read.
        outs, gets = _execute_counting_reads(store, [_send("dave", "t-07"), _send("dave", "t-08"),
                                                     _send("dave", "t-12"), _send("bob", "t-12")])
        assert gets == 2 and [o.reply["dup"] for o in outs] == [True, False, False, False]
        store.rebuild()
        assert store._tables.idem.newest == {} and store._tables.idem.base == {}
        outs = store.execute([_send("carol", "t-10"), _send("carol", "t-13")])
        assert [o.reply["dup"] for o in outs] == [True, False]
        _check(store)
    finally:
        store.close()


def test_membership_change_refreshes_cached_members(store):
    """A member who left gets no inbox entries though the group's members were cached."""
    (out,) = store.execute([CreateConv("alice", "d", "user", "group", "g", False, ("bob",))])
    conv = out.reply["conv"]
    store.execute([SendMessage("alice", "d", "user", "m1", "x", conv=conv)])
    store.execute([Leave("bob", "d", "user", conv),
                   SendMessage("alice", "d", "user", "m2", "x", conv=conv)])
    assert store.inbox_head("bob") == 2  # added, m1
    _check(store)


def test_rebuild_resets_the_cache(store):
    """After a rebuild the next batch still continues the conversation correctly."""
    store.execute([_send("bob", "c1"), _send("bob", "c2")])
    store.rebuild()
    (out,) = store.execute([_send("bob", "c3")])
    assert out.reply["seq"] == 3
    _check(store)


def test_deliveries_from_the_commit_equal_deliveries_read_from_the_log(store):
    """The events a commit leaves for `deliverable` give the very items a read of the log gives,
    also after an aborted batch whose LSNs the next batch takes."""
    store.execute([_send("bob", "c1"),
                   SendMessage("bob", "d", "user", "c2", b"\x00\xff", to="alice"),
                   CreateConv("carol", "d", "user", "group", "g", members=("alice",)),
                   SendMessage("carol", "d2", "user", "c3", "hello", to="alice")])
    store._abort_after = 1
    with pytest.raises(_InjectedAbort):
        store.execute([_send("bob", "c4"), _send("erin", "c5")])
    store._abort_after = None
    store.execute([_send("dave", "c1")])
    assert store._records  # the commits left their events
    warm, _ = store.deliverable("alice", 0, 100)
    store._records.clear()
    assert store.deliverable("alice", 0, 100)[0] == warm
    assert [(i.sender, i.body) for i in warm if i.kind == "msg"] == [
        ("bob", "hi"), ("bob", b"\x00\xff"), ("carol", "hello"), ("dave", "hi")]


def test_the_cached_member_lists_of_groups_count_against_the_row_bound(tmp_path):
    """A post to a group caches its member list (`GroupedBufTable.groups`, and `parts`) for one
    row of the member view's own: those rows did not count against CACHE_ROWS, so posts to
    groups whose members were written by another process (before a restart) cached every
    member row of every group posted to, without bound (300 groups of 1,000 members: 600,600
    rows, 153 MiB, in a view of 300). They count now: past the bound the view is emptied."""
    members = tuple(f"m{i:04}" for i in range(1000))
    groups = CACHE_ROWS // len(members) + 20
    store = Store.open(tmp_path / "data", limits=Limits(max_members=len(members) + 1))
    try:
        convs = []
        for first in range(0, groups, 20):
            outs = store.execute([CreateConv("own", "d", "user", "group", f"g{i}", False, members)
                                  for i in range(first, min(groups, first + 20))])
            convs += [o.reply["conv"] for o in outs]
    finally:
        store.close()
    store = Store.open(tmp_path / "data", limits=Limits(max_members=len(members) + 1))
    try:
        view = store._tables.member
        for i, conv in enumerate(convs):
            (out,) = store.execute([SendMessage("own", "d", "user", f"c{i}", "hi", conv=conv)])
            assert out.reply["seq"] == 1
            assert out.effects.inbox_heads["m0999"] == groups + i + 1  # the adds, then these
            held = len(view) + sum(map(len, view.groups.values()))
            assert held <= CACHE_ROWS, (i, held)
            assert sum(map(len, view.parts.values())) <= CACHE_ROWS
        (out,) = store.execute([SendMessage("own", "d", "user", "again", "hi", conv=convs[0])])
        assert out.reply["seq"] == 2 and len(out.effects.inbox_heads) == len(members) + 1
    finally:
        store.close()


def test_deliverable_stops_once_the_bodies_reach_max_bytes(store):
    """With `max_bytes`, `deliverable` gives entries until their bodies reach it (the one that
    does included, and always one), and the last inbox seq it gave: a device's read holds a
    bounded part of its window, the rest read next time (2026-12-06). A membership entry has
    no body and counts nothing."""
    store.execute([CreateConv("carol", "d", "user", "group", "g", members=("alice",))])
    store.execute([SendMessage("bob", "d", "user", f"c{i}", "x" * 1000, to="alice")
                   for i in range(10)])
    items, last = store.deliverable("alice", 0, 100, None, 2500)
    assert [it.inbox_seq for it in items] == [1, 2, 3, 4] and last == 4
    items, last = store.deliverable("alice", 4, 100, None, 1)
    assert [it.inbox_seq for it in items] == [5] and last == 5
    items, last = store.deliverable("alice", 5, 100)
    assert [it.inbox_seq for it in items] == list(range(6, 12)) and last == 11


def test_deliverable_counts_text_bodies_in_utf8_bytes(store):
    """`max_bytes` is bytes: a text body counts its UTF-8 length, not its characters. Counted
    in characters, bodies of two-byte letters went twice past DELIVER_BYTES, four-byte ones
    (emoji) four times (until 2026-12-06)."""
    store.execute([SendMessage("bob", "d", "user", f"c{i}", "é" * 1000, to="alice")
                   for i in range(10)])
    items, last = store.deliverable("alice", 0, 100, None, 4500)
    assert [it.inbox_seq for it in items] == [1, 2, 3] and last == 3
    store.execute([SendMessage("bob", "d", "user", "emoji", "\U0001f600" * 1000, to="alice")])
    items, last = store.deliverable("alice", 10, 100, None, 3999)
    assert [it.inbox_seq for it in items] == [11] and last == 11


def test_deliverable_cut_by_bytes_with_own_sends_around_it(store):
    """Own sends passed over before the byte cut move `last` on; those after it stay in
    `skip_lsns` for the next read, which starts right after the cut and passes them then."""
    cmds = []
    for i in range(6):
        cmds.append(SendMessage("alice", "phone", "user", f"own{i}", "o" * 10, to="bob"))
        cmds.append(SendMessage("bob", "d", "user", f"c{i}", "x" * 1000, to="alice"))
    store.execute(cmds)
    skip = {it.lsn for it in store.inbox_after("alice", 0, 100) if it.device == "phone"}
    items, last = store.deliverable("alice", 0, 100, skip, 1500)
    assert [it.inbox_seq for it in items] == [2, 4] and last == 4
    assert len(skip) == 4  # own sends 1 and 3 passed over
    items, last = store.deliverable("alice", last, 100, skip, 1)
    assert [it.inbox_seq for it in items] == [6] and last == 6 and len(skip) == 3
    items, last = store.deliverable("alice", last, 1, skip, 1)  # limit 1: an own send alone
    assert items == [] and last == 7 and len(skip) == 2


def test_the_rows_each_table_keeps_between_commits_are_the_stores_table_cache_rows(tmp_path):
    """`Store.open(table_cache_rows=N)` (`homing serve --table-cache-rows`) bounds the rows each
    table's view keeps between commits: past N after a commit it is emptied, and what is read
    again is right. It was fixed at CACHE_ROWS (200,000 a table, 13 tables: up to about 530 MiB
    of the broker's memory at about 215 bytes a row, which a small machine could not lower).
    The default keeps them all, as before."""
    users = 300
    commands = [SendMessage(f"u{i:03}", "d", "user", f"c{i}", "hi", to=f"u{i + 1:03}")
                for i in range(users)]
    reads = [MarkRead(f"u{i + 1:03}", "d", "user", f"dm:u{i:03}:u{i + 1:03}", 1)
             for i in range(users)]
    for bound, kept in ((50, False), (None, True)):
        store = Store.open(tmp_path / f"data{bound}", table_cache_rows=bound)
        try:
            views = store._tables._views
            for first in range(0, users, 30):
                store.execute(commands[first:first + 30])
                store.execute(reads[first:first + 30])
                if bound is not None:
                    assert max(v.cached_rows() for v in views) <= bound, first
            assert (max(v.cached_rows() for v in views) > 50) == kept
            assert store.inbox_head("u150") == 2  # its send, and u149's
            (out,) = store.execute([_send("u150", "again", to="u151")])
            assert out.reply["seq"] == 2 and out.effects.inbox_heads == {"u150": 3, "u151": 3}
            _check(store)
        finally:
            store.close()
