"""A batch that meets a damaged projection row fails only the commands that touch it.

Real LMDB with one row damaged behind homing's back (as tests/storage/test_batch_errors.py
damages them), the real committer. When `Store.execute` fails a batch with CorruptProjection,
the committer runs its commands again in halves, down to single commands: the commands whose
own work reads the damaged row fail, each with its own CorruptProjection (answered
`unavailable`); every other command is committed in its original order and told its outcome
as in any batch. Until 2026-12-05 the whole batch failed: every other user's command queued
with it was answered `unavailable` too, although nothing was wrong with it.
"""

from __future__ import annotations

from pathlib import Path

import trio
from structlog.testing import capture_logs

from broker.committer import Committer, Pending
from broker.errors import wire_error
from protocol import ErrorCode
from storage.commands import Ack, SendMessage
from storage.errors import CorruptProjection, StorageFull
from storage.store import Store
from tests.audit.test_damaged import poke

BODY = "x" * 50


class _Recording(Store):
    """A real store that records the cids (or `ack:user`) of each batch it executes, and fails
    the executes numbered in `full` (1 for the first) as a full disk fails a commit."""

    def execute(self, commands, now_us=None, max_rows=None):
        self.executes.append([_label(c) for c in commands])
        if len(self.executes) in self.full:
            raise StorageFull("disk full (test)")
        return super().execute(commands, now_us, max_rows)


def _label(command) -> str:
    return f"ack:{command.user}" if isinstance(command, Ack) else command.cid


def _damaged(path: Path, table: str, key: bytes, value: bytes) -> _Recording:
    """bob has sent alice two messages (alice's device `d` acked them); then `table`'s row
    `key` was set to `value` behind homing's back."""
    store = Store.open(str(path))
    try:
        store.execute([SendMessage("bob", "d", "user", f"b{i}", "hi", to="alice")
                       for i in range(2)])
        store.execute([Ack("alice", "d", "user", 2, None)])
    finally:
        store.close()
    poke(path, lambda txn, db: txn.put(key, value, db=db(table)))
    store = _Recording.open(str(path))
    store.executes, store.full = [], set()
    return store


def _send(user: str, cid: str, to: str) -> SendMessage:
    return SendMessage(user, "d", "user", cid, BODY, to=to)


async def _one_batch(store: Store, commands: list) -> tuple[list[Pending], list, list]:
    """Queue `commands` before the committer starts, so they share one batch; return their
    Pendings, the order they were told in, and what `on_committed` was handed."""
    told: list[Pending] = []
    fanned: list[tuple[list, list]] = []
    committer = Committer(store, on_committed=lambda cs, os: fanned.append((cs, os)))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pending = [committer.enqueue(c, told.append) for c in commands]
            await nursery.start(committer.serve)
            await committer.close()
    store.committer = committer
    return pending, told, fanned


def _logged_cids(store: Store, after: int) -> list[str]:
    return [e.data["cid"] for e in store.read_events(after + 1) if "cid" in e.data]


async def test_only_the_sends_that_read_the_damaged_row_fail_and_the_rest_commit_in_order(
        tmp_path):
    """alice's inbox head is cut short: the two sends to her fail with CorruptProjection naming
    it (`unavailable` on the wire); the four other users' sends of the same batch are durable,
    in submission order, told in that order and fanned out as one batch."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    try:
        last = store.last_lsn()
        commands = [_send("carol", "k1", "dave"), _send("bob", "bad1", "alice"),
                    _send("erin", "e1", "frank"), _send("carol", "k2", "dave"),
                    _send("bob", "bad2", "alice"), _send("dave", "v1", "carol")]
        with capture_logs() as logs:
            pending, told, fanned = await _one_batch(store, commands)
        bad = [p for p in pending if p.command.cid.startswith("bad")]
        good = [p for p in pending if p not in bad]
        for p in bad:
            assert isinstance(p.error, CorruptProjection), p.error
            assert (p.error.table, p.error.key) == ("inbox_head", b"alice")
            assert wire_error(p.error)[0] is ErrorCode.UNAVAILABLE
        assert all(p.error is None and p.outcome.error is None for p in good)
        lsns = [p.outcome.lsn for p in good]
        assert lsns == sorted(lsns) and lsns[-1] == store.last_lsn()
        assert _logged_cids(store, last) == ["k1", "e1", "k2", "v1"]
        assert [p.outcome.reply["seq"] for p in good] == [1, 1, 2, 3]  # carol and dave's DM
        assert [id(p) for p in told] == [id(p) for p in pending]  # each once, in order
        assert len(fanned) == 1 and [c.cid for c in fanned[0][0]] == ["k1", "e1", "k2", "v1"]
        assert fanned[0][1] == [p.outcome for p in good]
        committer = store.committer
        assert committer.committed_lsn == store.last_lsn()
        assert store.executes == [  # halves in order; each half that fails is split
            ["k1", "bad1", "e1", "k2", "bad2", "v1"], ["k1", "bad1", "e1"], ["k1"],
            ["bad1", "e1"], ["bad1"], ["e1"], ["k2", "bad2", "v1"], ["k2"], ["bad2", "v1"],
            ["bad2"], ["v1"]]
        assert (committer.commands, committer.batches) == (4, 4)  # 4 commits of one each
        assert committer.failed == 2  # broker_stats' failed_per_s
        split = [e for e in logs if e["event"] == "batch_split"]
        assert len(split) == 1, logs
        assert (split[0]["commands"], split[0]["failed"]) == (6, 2)
        assert split[0]["error"].startswith("projection corrupt in inbox_head at key b'alice'")
        assert split[0]["log_level"] == "error"
        assert not [e for e in logs if e["event"] in ("batch_failed", "batch_internal_error")]
        # The next batch, touching no damaged row, commits as ever.
        out = store.execute([_send("erin", "e2", "frank")])
        assert out[0].error is None and out[0].reply["seq"] == 2
        assert store.verify_log() == store.last_lsn()
    finally:
        store.close()


async def test_an_ack_that_reads_the_damaged_row_is_lost_alone(tmp_path):
    """alice's `delivered` row is cut short: her ack fails (its device marked as having lost
    an ack, its `when_acks_durable` told the error); bob's ack and the send in the same batch
    are durable, and bob's device is not marked."""
    store = _damaged(tmp_path / "d", "delivered", b"alice\0d", b"\x02")
    try:
        called: dict[str, BaseException | None] = {}
        committer = Committer(store)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                committer.ack_nowait(Ack("alice", "d", "user", 2, (("dm:alice:bob", 2),)))
                committer.ack_nowait(Ack("bob", "d", "user", 2, (("dm:alice:bob", 2),)))
                send = committer.enqueue(_send("carol", "k1", "dave"))
                for user in ("alice", "bob"):
                    committer.when_acks_durable(user, "d", lambda e, u=user: called.update(
                        {u: e}))
                await nursery.start(committer.serve)
                await committer.close()
        assert store.executes[0] == ["ack:alice", "ack:bob", "k1"]
        assert isinstance(called["alice"], CorruptProjection) and called["bob"] is None
        assert committer.ack_lost("alice", "d") and not committer.ack_lost("bob", "d")
        assert store.delivered("bob", "d") == 2
        assert send.error is None and send.outcome.reply["seq"] == 1
        assert committer.acked_mark("alice", "d") == 0  # nothing of hers on its way
    finally:
        store.close()


async def test_a_full_disk_during_the_split_fails_the_commands_not_yet_committed(tmp_path):
    """The split runs [k1, bad] and [k2, k3] after the whole batch failed; [k1, bad] splits
    again: k1 commits alone, bad fails alone; then the disk is full for [k2, k3]: they fail
    with StorageFull (`batch_failed`), k1 stays committed and told so."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    store.full = {5}
    try:
        last = store.last_lsn()
        commands = [_send("carol", "k1", "dave"), _send("bob", "bad", "alice"),
                    _send("carol", "k2", "dave"), _send("carol", "k3", "dave")]
        with capture_logs() as logs:
            pending, told, fanned = await _one_batch(store, commands)
        assert store.executes == [["k1", "bad", "k2", "k3"], ["k1", "bad"], ["k1"], ["bad"],
                                  ["k2", "k3"]]
        k1, bad, k2, k3 = pending
        assert k1.error is None and k1.outcome.reply["seq"] == 1
        assert isinstance(bad.error, CorruptProjection)
        assert isinstance(k2.error, StorageFull) and isinstance(k3.error, StorageFull)
        assert _logged_cids(store, last) == ["k1"]
        assert [[c.cid for c in cs] for cs, _ in fanned] == [["k1"]]
        assert [id(p) for p in told] == [id(p) for p in pending]
        failed = [e for e in logs if e["event"] == "batch_failed"]
        assert [(e["commands"], e["error"]) for e in failed] == [(2, "disk full (test)")]
        split = [e for e in logs if e["event"] == "batch_split"]
        assert [(e["commands"], e["failed"]) for e in split] == [(4, 3)]
    finally:
        store.close()


async def test_a_full_disk_stops_the_split_the_rest_is_not_run(tmp_path):
    """The disk is full for the split's first half: every command not yet committed fails
    with StorageFull, the second half is not run (a full disk fails any batch)."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    store.full = {2}
    try:
        commands = [_send("carol", "k1", "dave"), _send("bob", "bad", "alice"),
                    _send("carol", "k2", "dave"), _send("carol", "k3", "dave")]
        pending, told, fanned = await _one_batch(store, commands)
        assert store.executes == [["k1", "bad", "k2", "k3"], ["k1", "bad"]]
        assert all(isinstance(p.error, StorageFull) for p in pending)
        assert fanned == []  # nothing committed: on_committed has nothing to fan out
        assert [id(p) for p in told] == [id(p) for p in pending]
    finally:
        store.close()


async def test_a_batch_whose_every_command_reads_the_damaged_row_ends(tmp_path):
    """Eight sends to alice, all failing: the split runs each half once, down to single
    commands (2n - 1 executes in all, the first included), and ends; nothing is committed."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    try:
        last = store.last_lsn()
        pending, told, fanned = await _one_batch(
            store, [_send("bob", f"bad{i}", "alice") for i in range(8)])
        assert len(store.executes) == 15
        assert all(isinstance(p.error, CorruptProjection) for p in pending)
        assert [id(p) for p in told] == [id(p) for p in pending] and fanned == []
        assert store.last_lsn() == last and store.committer.committed_lsn == last
        assert (store.committer.commands, store.committer.failed) == (0, 8)
    finally:
        store.close()


class _Slow(_Recording):
    """A real store whose every execute takes at least SLOW_S (a slow disk's sync)."""

    def execute(self, commands, now_us=None, max_rows=None):
        import time
        time.sleep(SLOW_S)
        return super().execute(commands, now_us, max_rows)


SLOW_S = 0.05


async def test_a_long_split_is_not_one_stalled_commit_to_the_watchdog(tmp_path):
    """A split is many commits (2n - 2 for n commands that all read the damaged row), each of
    them progress: `commit_running_s`, which systemd's watchdog keep-alive goes by
    (broker/sdnotify.py), counts the one running now, not the whole split. It counted from the
    start of the batch that failed, so a split of a large batch on a slow disk looked like a
    disk that stopped answering, and WatchdogSec killed a broker that was committing."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    store.close()
    store = _Slow.open(str(tmp_path / "d"))
    store.executes, store.full = [], set()
    try:
        committer = Committer(store)
        seen: list[float] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    committer.enqueue(_send("bob", f"bad{i}", "alice"))
                await nursery.start(committer.serve)

                async def sample() -> None:
                    while True:
                        seen.append(committer.commit_running_s())
                        await trio.sleep(0.01)

                nursery.start_soon(sample)
                await committer.close()
                nursery.cancel_scope.cancel()
        assert len(store.executes) == 31  # the batch, then 30 halves
        assert max(seen) < 10 * SLOW_S, max(seen)
    finally:
        store.close()


async def test_a_later_batch_sets_the_command_aside_without_splitting_first(tmp_path):
    """Once a split found bob's sends to alice failing on her damaged inbox head, the store
    remembers it (`Store.set_aside`): the next batch holding one runs the commands around it
    and it apart, in order (three executes, two commits), not the whole batch and its halves
    again (five executes here, about 2 log2(n) for n commands; docs/DESIGN.md "Group commit"
    has the cost under load). After a rebuild (the row written again) a batch runs whole."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    try:
        await _one_batch(store, [_send("carol", "k1", "dave"), _send("bob", "bad1", "alice"),
                                 _send("erin", "e1", "frank"), _send("carol", "k2", "dave")])
        assert len(store.executes) == 5  # the batch, [k1 bad1], k1, bad1, [e1 k2]
        store.executes.clear()
        last = store.last_lsn()
        with capture_logs() as logs:
            pending, told, fanned = await _one_batch(store, [
                _send("carol", "k3", "dave"), _send("erin", "e2", "frank"),
                _send("bob", "bad2", "alice"), _send("erin", "e3", "frank"),
                _send("carol", "k4", "dave")])
        assert store.executes == [["k3", "e2"], ["bad2"], ["e3", "k4"]]
        bad = pending[2]
        assert isinstance(bad.error, CorruptProjection) and bad.error.key == b"alice"
        good = pending[:2] + pending[3:]
        assert all(p.error is None and p.outcome.error is None for p in good)
        assert _logged_cids(store, last) == ["k3", "e2", "e3", "k4"]
        assert [id(p) for p in told] == [id(p) for p in pending]
        assert len(fanned) == 1 and [c.cid for c in fanned[0][0]] == ["k3", "e2", "e3", "k4"]
        assert (store.committer.commands, store.committer.batches) == (4, 2)
        split = [e for e in logs if e["event"] == "batch_split"]
        assert [(e["commands"], e["failed"], e["commits"], e["set_aside"]) for e in split] == [
            (5, 1, 2, 1)], split
        assert split[0]["error"].startswith("projection corrupt in inbox_head at key b'alice'")
        store.executes.clear()
        store.rebuild()
        pending, _told, _fanned = await _one_batch(store, [
            _send("carol", "k5", "dave"), _send("bob", "ok", "alice")])
        assert store.executes == [["k5", "ok"]]
        assert all(p.error is None and p.outcome.error is None for p in pending)
    finally:
        store.close()


async def test_a_set_aside_batch_that_meets_another_damaged_row_is_split_there(tmp_path):
    """bob's sends to alice are remembered; the commands around one of them meet a damaged
    row not met before (bob's `delivered`, his ack): that run is split in halves as ever."""
    store = _damaged(tmp_path / "d", "inbox_head", b"alice", b"\x00\x02")
    store.close()
    poke(tmp_path / "d", lambda txn, db: txn.put(b"bob\0d", b"\x02", db=db("delivered")))
    store = _Recording.open(str(tmp_path / "d"))
    store.executes, store.full = [], set()
    try:
        await _one_batch(store, [_send("bob", "bad1", "alice")])  # a batch of one: learnt
        store.executes.clear()
        pending, _told, _fanned = await _one_batch(store, [
            _send("erin", "e1", "frank"), Ack("bob", "d", "user", 1, None),
            _send("erin", "e2", "frank"), _send("erin", "e3", "frank"),
            _send("bob", "bad2", "alice"), _send("erin", "e4", "frank")])
        assert store.executes == [
            ["e1", "ack:bob", "e2", "e3"], ["e1", "ack:bob"], ["e1"], ["ack:bob"],
            ["e2", "e3"], ["bad2"], ["e4"]]
        assert [type(p.error).__name__ for p in pending] == [
            "NoneType", "CorruptProjection", "NoneType", "NoneType", "CorruptProjection",
            "NoneType"]
    finally:
        store.close()
