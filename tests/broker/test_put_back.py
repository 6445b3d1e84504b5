"""What the row bound's put-back (`Committer._put_back`) leaves for the batches after it.

A batch the store stops at `--max-batch-rows` commits the commands it ran, and those it did
not run go back to the head of the queue. The tests step a real store batch by batch (each
execute waits for the test), so that what is queued while a batch commits is exact.
"""

from __future__ import annotations

import threading

import trio

from broker.committer import Committer
from storage.commands import Ack, SendMessage
from storage.errors import StorageFull
from storage.store import Store

BODY = "x" * 100


class _Stepped(Store):
    """A real store whose every execute waits for the test (`step`); the executes numbered in
    `fail` fail as a full disk fails a commit."""

    fail: frozenset[int] = frozenset()

    def execute(self, commands, now_us=None, max_rows=None):
        self.entered.append(list(commands))
        self.go.acquire()
        if len(self.entered) in self.fail:
            raise StorageFull("disk full (test)")
        return super().execute(commands, now_us, max_rows)


async def _in_execute(store: _Stepped, n: int) -> list[object]:
    """Wait until the committer's worker thread is in the store's `n`th execute; its commands."""
    while len(store.entered) < n:
        await trio.sleep(0.001)
    return store.entered[n - 1]


def _dm(user: str, cid: str, to: str) -> SendMessage:
    return SendMessage(user, "d", "user", cid, BODY, to=to)


async def test_an_ack_lost_behind_a_put_back_one_of_its_device_leaves_no_receipt_out(tmp_path):
    """bob's device acks alice's message (ack 1), then carol's (ack 2), then erin's (ack 3),
    each ack naming the conversations it covers, as a session's do; the store stops the
    batches holding them at the row bound, so acks 1 and 2 are put back together, ack 3
    queued behind them, and a full disk fails the batch that takes the first; the session
    acks again (its cursor at 3, the rules to read the conversations). Once that is durable,
    bob has received all three messages: `receipts` lists him for each. Until 2026-12-06 ack
    2 stayed queued apart with the conversations it named (carol's only) though ack 1 was
    lost: it made the device's mark whole again, and alice's message was never marked
    received. A wait for the device's acks durable, asked while ack 1 was its last, is told
    once, the full disk's error."""
    store = _Stepped.open(str(tmp_path / "d"))
    store.entered, store.go = [], threading.Semaphore(0)
    try:
        Store.execute(store, [_dm("alice", "m1", "bob"), _dm("carol", "m1", "bob"),
                              _dm("erin", "m1", "bob")])
        assert store.inbox_head("bob") == 3
        store.fail = frozenset({3})
        # Every command weighs nothing (a wrong estimate: batches are cut by count alone); a
        # direct send writes 2 rows, the bound: each batch commits its first command only.
        committer = Committer(store, max_batch=3, max_batch_rows=2, weigh=lambda c: 0,
                              ack_linger_s=0.001)
        ack = [Ack("bob", "phone", "user", 1, (("dm:alice:bob", 1),)),
               Ack("bob", "phone", "user", 2, (("dm:bob:carol", 1),)),
               Ack("bob", "phone", "user", 3, (("dm:bob:erin", 1),))]
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                first = [committer.enqueue(_dm("dave", f"p{i}", "frank")) for i in range(2)]
                committer.ack_nowait(ack[0])
                await nursery.start(committer.serve)
                try:
                    assert await _in_execute(store, 1) == [p.command for p in first] + [ack[0]]
                    told: list[type] = []  # an `ack` request's `ok` waits so (on_ack)
                    committer.when_acks_durable("bob", "phone",
                                                lambda error: told.append(type(error)))
                    committer.ack_nowait(ack[1])  # ack 1 is committing: one queued apart
                    store.go.release()  # commits p0; p1 and ack 1 go back, before ack 2
                    assert (await _in_execute(store, 2))[0] == first[1].command
                    committer.ack_nowait(ack[2])
                    others = [committer.enqueue(_dm(u, f"{u}{i}", "frank"))
                              for u in ("quinn", "rae") for i in range(2)]
                    store.go.release()  # commits p1: acks 1 and 2 go back together
                    await _in_execute(store, 3)
                    store.go.release()  # the full disk fails it: bob's ack in it is lost
                    while not committer.ack_lost("bob", "phone"):
                        await trio.sleep(0.001)
                    committer.ack_nowait(Ack("bob", "phone", "user", 3, None))  # the session's
                finally:
                    store.go.release(100)
                await committer.close()
        assert all(p.error is None for p in first)
        assert [type(p.error) for p in others] == [StorageFull, type(None)] * 2
        assert told == [StorageFull]  # once: the ack it waited for merged, then was lost
        assert store.delivered("bob", "phone") == 3
        for conv in ("dm:alice:bob", "dm:bob:carol", "dm:bob:erin"):
            assert store.receipts(conv, 1) == (["bob"], ["bob"], []), conv
        assert (committer.queued, committer._acks, committer._last_acks,
                committer._unsynced_acks, committer._acks_lost) == (0, {}, {}, {}, {})
    finally:
        store.close()
