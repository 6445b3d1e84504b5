"""Group commit through the broker's committer, on a real LMDB store."""

from __future__ import annotations

import trio

from broker.committer import Committer
from storage.commands import Ack, SendMessage
from storage.store import Store

BODY = "x" * 200


async def test_concurrent_appenders_share_batches_and_resume_only_when_durable(tmp_path):
    """64 appenders get batched commits; each sees its own event committed when it resumes."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    seen_unreadable = []

    async def appender(ix: int) -> None:
        for n in range(20):
            out = await committer.submit(
                SendMessage(f"u{ix}", "d", "user", f"{ix}-{n}", BODY, to=f"v{ix}"))
            assert out.error is None
            # Resumed: the event must already be committed (visible to a fresh read txn).
            events = list(store.read_events(out.lsn, out.lsn))
            if not events or events[0].data["cid"] != f"{ix}-{n}":
                seen_unreadable.append(out.lsn)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                async with trio.open_nursery() as appenders:
                    for i in range(64):
                        appenders.start_soon(appender, i)
                await committer.close()
        assert seen_unreadable == []
        assert committer.commands == 64 * 20
        assert committer.batches < committer.commands / 4  # batching really happened
        assert store.verify_log() == store.last_lsn()
    finally:
        store.close()


async def test_the_event_loop_keeps_running_during_a_commit(tmp_path):
    """While a large batch commits in the worker thread, other trio tasks keep running."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store, max_batch=10_000)
    ticks_during = 0
    committing = False

    async def ticker() -> None:
        nonlocal ticks_during
        while True:
            await trio.sleep(0)
            if committing:
                ticks_during += 1

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                nursery.start_soon(ticker)
                pendings = [committer.enqueue(SendMessage("a", "d", "user", f"c{n}", BODY,
                                                          to="b")) for n in range(5000)]
                committing = True
                last = pendings[-1]
                last.event = trio.Event()
                await last.event.wait()
                committing = False
                assert all(p.outcome is not None and p.outcome.error is None for p in pendings)
                nursery.cancel_scope.cancel()
        assert ticks_during > 10
    finally:
        store.close()


async def test_acks_of_one_device_are_coalesced(tmp_path):
    """Queued acks of one device merge into one command carrying the highest mark."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                for n in range(3):
                    await committer.submit(SendMessage("a", "d", "user", f"c{n}", BODY, to="b"))
                for upto in (1, 3, 2):
                    committer.ack_nowait(Ack("b", "phone", "user", upto))
                assert committer.acked_mark("b", "phone") == 3
                await committer.close()
        assert store.delivered("b", "phone") == 3
        acks = [e for e in store.read_events(1) if e.type == "delivery.acked"]
        assert [e.data["upto"] for e in acks] == [3]
        assert committer.acked_mark("b", "phone") == 0
    finally:
        store.close()


async def test_a_commit_of_only_acks_waits_for_other_work_but_not_longer(tmp_path):
    """Queued acks alone linger up to ACK_LINGER_S; a send arriving meanwhile shares their
    commit at once."""
    store = Store.open(str(tmp_path / "d"))
    committer = Committer(store, ack_linger_s=0.2)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                await committer.submit(SendMessage("a", "d", "user", "c0", BODY, to="b"))
                batches = committer.batches
                committer.ack_nowait(Ack("b", "phone", "user", 1, ()))
                await trio.sleep(0.05)
                assert committer.batches == batches  # still lingering
                start = trio.current_time()
                await committer.submit(SendMessage("a", "d", "user", "c1", BODY, to="b"))
                assert trio.current_time() - start < 0.15  # the send did not wait the linger out
                assert committer.batches == batches + 1  # one commit for the ack and the send
                assert store.delivered("b", "phone") == 1
                committer.ack_nowait(Ack("b", "phone", "user", 2, ()))
                await trio.sleep(0.35)
                assert store.delivered("b", "phone") == 2  # committed alone after the linger
                await committer.close()
    finally:
        store.close()
