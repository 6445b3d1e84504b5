"""Receipts count a message's audience: the members who were members when it was posted.

Head office sends a notice to its stores' channel and asks who has read it. A store added to
the channel afterwards starts with its marks at the channel's last seq (the old notices are not
unread for it), and `receipts` used to read those marks as "delivered and read": the new store
showed as having read a notice it was never sent. It is now not counted at all, and the answer
names who of its audience has not read it (`unread`)."""

from __future__ import annotations

import json

import trio

import protocol as wire
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
        assert (info.delivered, info.read, info.unread) == (("store-1",), ("store-1",), ())
        # Their next notice is theirs: counted, unread until they read it.
        second = await hq.send("new opening hours", conv=conv)
        info = await hq.receipts(conv, second.seq)
        assert (info.read, info.unread) == ((), ("store-1", "store-2"))
        (d,) = await recv(s2)
        await s2.ack(d.inbox_seq)
        await s2.read(conv, second.seq)
        info = await hq.receipts(conv, second.seq)
        assert (info.read, info.unread) == (("store-2",), ("store-1",))
        # The new store is still not counted for the notice before it joined.
        assert _audience(await hq.receipts(conv, first.seq)) == ["store-1"]


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
        audiences = {seq: _audience(await shop.receipts(conv, seq))
                     for seq in (before.seq, during.seq, after.seq)}
        assert audiences == {before.seq: ["customer"], during.seq: ["customer"],
                             after.seq: ["courier", "customer"]}


async def test_the_audience_survives_a_rebuild_and_the_command_prints_it(tmp_path):
    """`joined` is a projection like the others: a rebuild from the log makes the same rows
    (the replay model tests hold every table to that), and `homing receipts` prints the
    audience's unread part as `unread`."""
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
                                              "read": [], "unread": audience}
    store = Store.open(str(data))
    try:
        kept = store.receipts(conv, first.seq)
        store.rebuild()
        assert store.receipts(conv, first.seq) == kept == (["store-1"], [], [])
        assert store.receipts(conv, second.seq)[0] == ["store-1", "store-2"]
    finally:
        store.close()


async def test_a_late_joiners_receipt_pushes_agree_with_the_listing(harness):
    """PROTOCOL.md §9: the pushes and `receipts` tell the same. A late joiner's read of a
    message from before their joining moves no mark (theirs start at their joining): no push,
    and `receipts` leaves them out of it; their ack of one posted after is pushed to the owner
    and listed."""
    async with harness.client("shop") as shop, harness.client("s1") as s1, \
            harness.client("s2") as s2:
        conv = await shop.create_group("orders", ["s1"])
        await acked_one_each(s1)  # "added"
        first = await shop.send("before", conv=conv)
        await shop.invite(conv, "s2")
        await acked_one_each(s1, s2)  # s1: "before"; s2: "added"
        await s2.read(conv, first.seq)  # nothing to move: no push
        await s1.read(conv, first.seq)  # pushed after s2's read, were it pushed
        second = await shop.send("after", conv=conv)
        await acked_one_each(s2)  # "after": pushed as delivered
        pushed = []
        with trio.fail_after(10):
            while ("s2", second.seq, None) not in pushed:
                p = await shop.next_push()
                if isinstance(p, wire.Receipt):
                    pushed.append((p.user, p.delivered, p.read))
        assert [p for p in pushed if p[0] == "s2"] == [("s2", second.seq, None)], pushed
        assert ("s1", None, first.seq) in pushed
        early = await shop.receipts(conv, first.seq)
        late = await shop.receipts(conv, second.seq)
        assert (early.delivered, early.read, early.unread) == (("s1",), ("s1",), ())
        assert (late.delivered, late.read, late.unread) == (("s2",), (), ("s1", "s2"))


def _audience(info) -> list[str]:
    """A `receipt_list`'s audience: who read it and who has not."""
    return sorted({*info.read, *info.unread})


async def test_a_member_asking_is_listed_in_the_audience_like_any_other(harness):
    """`receipts` answers the same whoever of the conversation asks: a member who has not read
    the message is in its `unread` when they ask themselves, and in `read` once they read it.
    Every other test asked as the sender, who is not in the audience, so a listing that left
    the asker out passed them all."""
    async with harness.client("shop") as shop, harness.client("s1") as s1, \
            harness.client("s2") as s2:
        conv = await shop.create_group("orders", ["s1", "s2"])
        await acked_one_each(s1, s2)  # "added"
        sent = await shop.send("ready", conv=conv)
        await acked_one_each(s1, s2)
        mine = await s1.receipts(conv, sent.seq)
        assert (mine.read, mine.unread) == ((), ("s1", "s2")), mine
        await s1.read(conv, sent.seq)
        mine = await s1.receipts(conv, sent.seq)
        assert (mine.read, mine.unread) == (("s1",), ("s2",)), mine
        theirs = await s2.receipts(conv, sent.seq)
        assert (theirs.read, theirs.unread) == (("s1",), ("s2",)), theirs
