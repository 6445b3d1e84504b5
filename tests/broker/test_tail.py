"""Tailing the log through the committer."""

import trio

from broker.tail import tail


async def test_tail_yields_history_then_waits_for_new_events(harness):
    """A tail replays what is durable, then yields each new event once it is committed."""
    async with harness.client("alice") as alice:
        await alice.send("one", to="bob")
        broker = harness.broker
        seen = []

        async def follow():
            async for event in tail(broker.store, broker.committer, 1):
                seen.append(event)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                while not seen or seen[-1].lsn < broker.store.last_lsn():
                    await trio.sleep(0.01)
                before = len(seen)
                await alice.send("two", to="bob")
                while len(seen) == before:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert [e.lsn for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].type == "message.accepted" and seen[-1].data["body"] == "two"
