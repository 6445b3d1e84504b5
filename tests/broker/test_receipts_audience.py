"""Receipts count a message's audience: the members who were members when it was posted.

Head office sends a notice to its stores' channel and asks who has read it. A store added to
the channel afterwards starts with its marks at the channel's last seq (the old notices are not
unread for it), and `receipts` used to read those marks as "delivered and read": the new store
showed as having read a notice it was never sent. It is now not counted at all, and the answer
names the audience (`members`), so "who has not read it" is `members` less `read`."""

from __future__ import annotations

import json

import trio

from storage.store import Store
from tests.broker.test_messaging import acked_one_each, recv
from tests.harness import running_broker
from tests.procs import homing


async def test_a_store_added_after_a_notice_is_not_counted_as_having_read_it(harness):
    async with harness.client("hq", role="service") as hq, \
            harness.client("store-1") as s1, harness.client("store-2") as s2:
        conv = await hq.create_channel("notices", ["store-1"])
        await acked_one_each(s1)  # "added"
        first = await hq.send("inventory on friday", conv=conv)
        (d,) = await recv(s1)
        await s1.ack(d.inbox_seq)
        await s1.read(conv, first.seq)
        await hq.invite(conv, "store-2")
        await acked_one_each(s2)  # "added"
        info = await hq.receipts(conv, first.seq)
        assert (info.members, info.delivered, info.read) == (
            ("store-1",), ("store-1",), ("store-1",))
        # Their next notice is theirs: counted, unread until they read it.
        second = await hq.send("new opening hours", conv=conv)
        info = await hq.receipts(conv, second.seq)
        assert (info.members, info.read) == (("store-1", "store-2"), ())
        (d,) = await recv(s2)
        await s2.ack(d.inbox_seq)
        await s2.read(conv, second.seq)
        info = await hq.receipts(conv, second.seq)
        assert (info.members, info.read) == (("store-1", "store-2"), ("store-2",))
        # The new store is still not counted for the notice before it joined.
        assert (await hq.receipts(conv, first.seq)).members == ("store-1",)


async def test_a_member_who_leaves_and_comes_back_counts_from_their_return(harness):
    """Out and in again is a new joining: the messages posted before the return are not
    counted for them (they may have had some, but the conversation is not theirs for the
    time they were out, and a removed member is no longer heard of, PROTOCOL.md §9)."""
    async with harness.client("shop") as shop, harness.client("courier") as courier, \
            harness.client("customer") as customer:
        conv = await shop.create_group("order 1234", ["courier", "customer"])
        await acked_one_each(courier, customer)
        before = await shop.send("picked up", conv=conv)
        await shop.remove(conv, "courier")
        during = await shop.send("delayed", conv=conv)
        await shop.invite(conv, "courier")
        after = await shop.send("out for delivery", conv=conv)
        members = {seq: (await shop.receipts(conv, seq)).members
                   for seq in (before.seq, during.seq, after.seq)}
        assert members == {before.seq: ("customer",), during.seq: ("customer",),
                           after.seq: ("courier", "customer")}


async def test_the_audience_survives_a_rebuild_and_the_command_prints_it(tmp_path):
    """`joined` is a projection like the others: a rebuild from the log makes the same rows
    (the replay model tests hold every table to that), and `homing receipts` prints the
    audience as `members`."""
    data = tmp_path / "data"
    async with running_broker(data) as harness, \
            harness.client("hq", role="service") as hq, harness.client("store-1") as s1:
        conv = await hq.create_channel("notices", ["store-1"])
        await acked_one_each(s1)
        first = await hq.send("one", conv=conv)
        await hq.invite(conv, "store-2")
        second = await hq.send("two", conv=conv)
        token = harness.token("hq", role="service")
        for seq, audience in ((first.seq, ["store-1"]), (second.seq, ["store-1", "store-2"])):
            out = await trio.to_thread.run_sync(
                homing, "receipts", "--conv", conv, "--seq", str(seq), "--token", token,
                "--server", harness.server)
            assert json.loads(out.stdout) == {"conv": conv, "seq": seq, "delivered": [],
                                              "read": [], "members": audience}
    store = Store.open(str(data))
    try:
        kept = store.receipts(conv, first.seq)
        store.rebuild()
        assert store.receipts(conv, first.seq) == kept == (["store-1"], [], [])
        assert store.receipts(conv, second.seq)[0] == ["store-1", "store-2"]
    finally:
        store.close()
