"""Group commit on a truly full disk: what a failed batch leaves behind for the next ones.

Real LMDB on a small tmpfs (skipped where mounting is not permitted), the real committer.
"""

from __future__ import annotations

import pytest
import trio

from broker.committer import Committer
from storage.commands import Ack, SendMessage
from storage.errors import StorageFull
from storage.store import Store
from tests.disks import fill, tmpfs
from tests.harness import running_broker


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (skipped where mounting is not permitted)."""
    with tmpfs(tmp_path, "2m") as mnt:
        yield mnt


async def test_an_ack_lost_with_a_failed_batch_does_not_cost_the_next_ack_its_receipts(
        small_disk):
    """bob's device acks alice's message (the ack names its conversation, as a session's does)
    in a batch that the full disk fails. The device's cursor has moved on in memory, so its next
    ack only names the conversations of the entries delivered since; once that one is durable,
    bob's delivered mark covers alice's message, and `receipts` must list him for it."""
    store = Store.open(str(small_disk / "data"), map_size=64 << 20)
    try:
        store.execute([SendMessage("alice", "a1", "user", "m1", "hello", to="bob"),
                       SendMessage("carol", "c1", "user", "m1", "hi", to="bob")])
        assert store.inbox_head("bob") == 2
        filler = small_disk / "filler"
        fill(filler)
        committer = Committer(store)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                # One batch: the ack of entry 1 and sends too big for the full disk.
                committer.ack_nowait(Ack("bob", "phone", "user", 1, (("dm:alice:bob", 1),)))
                big = [committer.enqueue(SendMessage("dave", "d1", "user", f"big{i}",
                                                     "x" * 60_000, to="erin"))
                       for i in range(8)]
                await nursery.start(committer.serve)
                while big[-1].outcome is None and big[-1].error is None:
                    await trio.sleep(0.01)
                assert isinstance(big[-1].error, StorageFull)
                assert store.delivered("bob", "phone") == 0
                filler.unlink()
                # The session acked 1 already: its next ack covers entry 2 alone.
                acked = trio.Event()
                committer.ack_nowait(Ack("bob", "phone", "user", 2, (("dm:bob:carol", 1),)))
                committer.when_acks_durable("bob", "phone", lambda error: acked.set())
                await acked.wait()
                await committer.close()
        assert store.delivered("bob", "phone") == 2
        assert store.receipts("dm:bob:carol", 1) == (["bob"], ["bob"], [])
        assert store.receipts("dm:alice:bob", 1) == (["bob"], ["bob"], [])
        assert store.check_projections() is None
    finally:
        store.close()


async def test_a_device_gone_after_its_ack_was_lost_is_not_remembered_for_good(small_disk):
    """An ack lost with a failed batch marks its device (`Committer.ack_lost`) until one of its
    acks is durable: a device that never came back stayed marked for the broker's life, one
    entry per (user, device) that acked during a failure. The mark only matters to the
    device's live session (its cursor ahead of its durable mark): a next session starts from
    the durable mark. So it goes when the session ends: at once (phone), or, with an ack of
    the device still queued (tablet), once that ack's batch is done, failed or not."""
    async with running_broker(small_disk / "data", expected_errors=("batch_failed",)) as h:
        committer, hub = h.broker.committer, h.broker.hub
        committer.ack_linger_s = 5.0  # a batch of acks waits for the sends below

        async def ack_first(bob, device: str) -> None:  # bob's first delivery, ack queued
            async for d in bob.deliveries():
                await bob.ack(d.inbox_seq)
                break
            while ("bob", device) not in committer._acks:  # queued, lingering
                await trio.sleep(0.01)

        async def failing_batch() -> None:  # joins the queued acks: one batch, disk full
            big = [committer.enqueue(SendMessage("dave", "d1", "user", f"big{i}",
                                                 "x" * 60_000, to="erin")) for i in range(8)]
            while big[-1].outcome is None and big[-1].error is None:
                await trio.sleep(0.01)
            assert isinstance(big[-1].error, StorageFull)

        async def offline() -> None:
            while hub.online("bob"):
                await trio.sleep(0.01)

        with trio.fail_after(30):
            async with h.client("alice") as alice:
                await alice.send("one", to="bob")
            fill(small_disk / "filler")

            async with h.client("bob", "phone") as bob:
                await ack_first(bob, "phone")
                await failing_batch()
                assert committer.ack_lost("bob", "phone")
            await offline()
            assert not committer.ack_lost("bob", "phone")

            async with h.client("bob", "tablet") as bob:
                await ack_first(bob, "tablet")
            await offline()
            await failing_batch()
            assert not committer.ack_lost("bob", "tablet")
            (small_disk / "filler").unlink()
        assert not committer._acks_lost


async def test_a_lower_ack_durable_after_a_loss_does_not_end_it(small_disk):
    """bob's phone acks entries 2 and 3 (alice's and carol's messages, named by the ack) in a
    batch the full disk fails: its session's cursor is at 3, its durable mark at 0. Then an
    ack of the same device below the lost one is durable: the own-sends ack (entry 1, bob's
    own message) that a session replaced meanwhile submits as it ends. That ack ended the
    loss as if the device's marks were whole again, so the session's next ack named only the
    conversation of entry 4, and bob's delivered mark passed alice's and carol's messages
    without counting them: `receipts` never listed him. A loss ends only with a durable ack
    at least as far as the one lost."""
    store = Store.open(str(small_disk / "data"), map_size=64 << 20)
    try:
        store.execute([SendMessage("bob", "phone", "user", "o1", "mine", to="erin"),
                       SendMessage("alice", "a1", "user", "m1", "hello", to="bob"),
                       SendMessage("carol", "c1", "user", "m1", "hi", to="bob"),
                       SendMessage("dave", "d1", "user", "m1", "hey", to="bob")])
        assert store.inbox_head("bob") == 4
        filler = small_disk / "filler"
        fill(filler)
        committer = Committer(store)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                committer.ack_nowait(Ack("bob", "phone", "user", 3, (("dm:alice:bob", 1),
                                                                     ("dm:bob:carol", 1))))
                big = [committer.enqueue(SendMessage("dave", "d1", "user", f"big{i}",
                                                     "x" * 60_000, to="erin"))
                       for i in range(8)]
                await nursery.start(committer.serve)
                while big[-1].outcome is None and big[-1].error is None:
                    await trio.sleep(0.01)
                assert isinstance(big[-1].error, StorageFull)
                filler.unlink()
                # The replaced session's own-sends ack, as it ends: below the lost one.
                low = trio.Event()
                committer.ack_nowait(Ack("bob", "phone", "user", 1, ()))
                committer.when_acks_durable("bob", "phone", lambda error: low.set())
                await low.wait()
                assert store.delivered("bob", "phone") == 1
                assert committer.ack_lost("bob", "phone")  # the cursor at 3 is not durable
                # The live session's next ack: entry 4 is all it delivered since.
                acked = trio.Event()
                committer.ack_nowait(Ack("bob", "phone", "user", 4, (("dm:bob:dave", 1),)))
                committer.when_acks_durable("bob", "phone", lambda error: acked.set())
                await acked.wait()
                assert not committer.ack_lost("bob", "phone")
                await committer.close()
        assert store.delivered("bob", "phone") == 4
        assert store.receipts("dm:alice:bob", 1) == (["bob"], ["bob"], [])
        assert store.receipts("dm:bob:carol", 1) == (["bob"], ["bob"], [])
        assert store.receipts("dm:bob:dave", 1) == (["bob"], ["bob"], [])
        assert store.check_projections() is None
    finally:
        store.close()
