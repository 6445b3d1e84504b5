"""A first end-to-end exchange over loopback."""

import trio


async def test_direct_message_is_delivered_and_acked(harness):
    """A message sent to an offline user is delivered when they connect, with its fields."""
    with trio.fail_after(10):
        async with harness.client("alice") as alice:
            r = await alice.send("hello bob", to="bob", cid="c1")
            assert (r.conv, r.seq, r.cid, r.dup) == ("dm:alice:bob", 1, "c1", False)
        async with harness.client("bob") as bob:
            d = await bob.deliveries().receive()
            assert (d.conv, d.seq, d.sender, d.body, d.cid) == ("dm:alice:bob", 1, "alice",
                                                                 "hello bob", "c1")
            await bob.ack(d.inbox_seq)
