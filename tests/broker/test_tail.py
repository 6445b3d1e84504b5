"""Tailing the log through the committer."""

import trio
from structlog.testing import capture_logs

from broker.committer import Committer
from broker.tail import tail
from storage.commands import SendMessage
from storage.store import Store
from tests.faults.test_read_failures import ReadersHeld


async def test_tail_yields_history_then_waits_for_new_events(harness):
    """A tail replays what is durable, then yields each new event once it is committed."""
    async with harness.client("alice") as alice:
        await alice.send("one", to="bob")
        broker = harness.broker
        seen = []

        async def follow():
            async for event in tail(broker.store, broker.committer, 1):
                seen.append(event)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                while not seen or seen[-1].lsn < broker.store.last_lsn():
                    await trio.sleep(0.01)
                before = len(seen)
                await alice.send("two", to="bob")
                # Not the first event after `before`: alice's own ack of "one" (the broker's
                # next round of own acks) may be committed first, on a loaded machine.
                while not [e for e in seen[before:] if e.type == "message.accepted"]:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert [e.lsn for e in seen] == list(range(1, len(seen) + 1))
    [new] = [e for e in seen[before:] if e.type == "message.accepted"]
    assert new.data["body"] == "two"


async def test_a_read_that_fails_is_logged_and_retried_and_nothing_is_missed(tmp_path):
    """Another process holding every slot of LMDB's reader table fails the tail's reads (a
    StorageError, as for any read of the broker), while commits go on. The tail used to end
    with that error, its consumer left to find where to resume; it logs `tail_read_failed`,
    tries again, and once the slots are free yields every event once, in order."""
    store = Store.open(tmp_path / "data")
    committer = Committer(store)
    seen = []

    async def follow():
        async for event in tail(store, committer, 1):
            seen.append(event)

    try:
        with capture_logs() as logs, trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                await committer.submit(SendMessage("alice", "d", "user", "c1", "before", to="bob"))
                holder = ReadersHeld(tmp_path / "data")
                try:
                    assert await holder.held() > 1000
                    nursery.start_soon(follow)
                    await committer.submit(
                        SendMessage("alice", "d", "user", "c2", "during", to="bob"))
                    while sum(e["event"] == "tail_read_failed" for e in logs) < 2:
                        await trio.sleep(0.01)
                    assert seen == []
                finally:
                    holder.release()
                while not seen or seen[-1].lsn < store.last_lsn():
                    await trio.sleep(0.01)
                await committer.submit(SendMessage("alice", "d", "user", "c3", "after", to="bob"))
                while seen[-1].lsn < store.last_lsn():
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert [e.lsn for e in seen] == list(range(1, store_last(tmp_path) + 1))
    assert [e.data["body"] for e in seen if e.type == "message.accepted"] == [
        "before", "during", "after"]
    failed = [e for e in logs if e["event"] == "tail_read_failed"]
    assert failed[0]["log_level"] == "error" and failed[0]["from_lsn"] == 1
    assert "MDB_READERS_FULL" in failed[0]["reason"]
    assert [e["retry_in"] for e in failed[:2]] == [0.05, 0.1]  # doubling


def store_last(tmp_path) -> int:
    reader = Store.open(tmp_path / "data", readonly=True)
    try:
        return reader.last_lsn()
    finally:
        reader.close()
