"""Membership and receipts under a review's attacks (2026-12-05): the cases a paged engineer
meets ("a store that left still got the notice", "the read count is wrong", "the courier still
sees the group's messages after being removed"), with real brokers, sockets and LMDB.

They pin what docs/PROTOCOL.md §9 and §10 say. Two failed before their fix (the removed
courier's, and the ack in the batch of the invite): an ack a removed member made, committed
in the batch that invited it back, was pushed to the others as a receipt (the broker looked at
the roster as of the end of the batch, not as of the ack).
"""

from __future__ import annotations

import trio

import protocol
from storage.commands import (
    Ack,
    CreateConv,
    Invite,
    Join,
    Leave,
    MarkRead,
    Remove,
    SendMessage,
)
from storage.rules import Limits
from storage.store import Store
from tests.harness import running_broker
from tests.waits import wait_until

STORES = tuple(f"store-{i:03d}" for i in range(300))


async def test_a_notice_read_by_120_of_300_stores_is_counted_exactly(tmp_path):
    """Head office posts to 300 stores; 120 read it, each from a one-shot session. Head office
    is pushed exactly one delivered and one read receipt of each (no duplicate, none of
    another store); a store that read and left and one that read and was removed drop out of
    `receipts` (its current members), and a broker restart keeps the count."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("hq") as hq:
            conv = await hq.create_channel("notices", STORES)
            notice = await hq.send("closing at 6 on Friday", conv=conv)
            pushes: list = []

            async def collect() -> None:
                while True:
                    pushes.append(await hq.next_push())

            def receipts() -> list[tuple[str, int | None, int | None]]:
                return [(p.user, p.delivered, p.read) for p in pushes
                        if isinstance(p, protocol.Receipt)]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect)
                for store in STORES[:120]:
                    async with h.client(store, deliver=False) as c:
                        await c.read(conv, notice.seq)
                async with h.client(STORES[0], deliver=False) as c:
                    await c.leave(conv)
                await hq.remove(conv, STORES[1])
                await wait_until(lambda: len(receipts()) >= 240)
                await hq.ping()  # anything pushed after the 240th came before this reply
                nursery.cancel_scope.cancel()
            expected = {(s, notice.seq, None) for s in STORES[:120]} | {
                (s, None, notice.seq) for s in STORES[:120]}
            assert len(receipts()) == 240 and set(receipts()) == expected
            got = await hq.receipts(conv, notice.seq)
            assert got.delivered == got.read == STORES[2:120]
    async with running_broker(tmp_path / "data") as h:
        async with h.client("hq") as hq:
            got = await hq.receipts(conv, notice.seq)
            assert got.delivered == got.read == STORES[2:120]


async def test_a_removed_courier_gets_what_was_on_its_way_and_nothing_after(tmp_path):
    """A courier that does not keep up (window 2) is removed with five messages on their way:
    it still gets those five and then `removed` (posted while it was a member), none of the
    three posted after, and its late acks push no receipt to the shop, even the one committed
    with the invite that takes it back (before the fix, in 20 of 20 runs, the shop was pushed
    "courier delivered 5" first). Invited again, it gets `added` and what is posted from then
    on."""
    async with running_broker(tmp_path / "data", window=2) as h:
        async with h.client("shop") as shop, h.client("courier") as courier:
            conv = await shop.create_group("order-2201", ["courier"])
            for i in range(5):
                await shop.send(f"before {i}", conv=conv)
            await shop.remove(conv, "courier")
            for i in range(3):
                await shop.send(f"after {i}", conv=conv)
            got = []
            while not got or got[-1][0] != "removed":
                with trio.fail_after(10):
                    d = await courier.deliveries().receive()
                got.append((d.kind, d.body))
                await courier.ack(d.inbox_seq)  # the last shares the invite's commit, often
            assert got == [("added", None), *(("msg", f"before {i}") for i in range(5)),
                           ("removed", None)]
            await shop.invite(conv, "courier")
            again = await shop.send("one more stop", conv=conv)
            later = []
            for _ in range(2):
                with trio.fail_after(10):
                    d = await courier.deliveries().receive()
                later.append((d.kind, d.body))
                await courier.ack(d.inbox_seq)
            assert later == [("added", None), ("msg", "one more stop")]
            with trio.fail_after(10):  # the first receipt the shop is pushed: after the invite
                while not isinstance(p := await shop.next_push(), protocol.Receipt):
                    pass
            assert (p.user, p.delivered, p.read) == ("courier", again.seq, None)


def test_membership_changes_in_the_batch_of_a_post_apply_in_order(tmp_path):
    """Within one batch (one commit), a post reaches the members as of its place in the batch:
    not a member removed or gone before it, a member invited or joined before it; `receipts`
    lists the current members whose marks reach the message, of those who were members when it
    was posted (not one who joined after it, nor one who left and came back after it)."""
    store = Store.open(str(tmp_path / "data"), limits=Limits(max_members=50))
    try:
        (out,) = store.execute([CreateConv("own", "d1", "user", "group", "g", True, ("a", "b"))])
        conv = out.reply["conv"]

        def post(cid: str) -> SendMessage:
            return SendMessage("own", "d1", "user", cid, cid, conv, None)

        outs = store.execute([
            post("m1"), Remove("own", "d1", "user", conv, "a"), post("m2"),
            Invite("own", "d1", "user", conv, "a", "member"), post("m3"),
            Leave("b", "d1", "user", conv), post("m4"), Join("b", "d1", "user", conv),
            Join("c", "d1", "user", conv), MarkRead("c", "d1", "user", conv, 4),
            Remove("own", "d1", "user", conv, "c"), post("m5")])
        assert all(o.error is None for o in outs)

        def inbox(user: str) -> list[tuple[str, int]]:
            return [(i.kind, i.seq if i.kind == "msg" else 0)
                    for i in store.inbox_after(user, 0, 100)]

        assert inbox("a") == [("added", 0), ("msg", 1), ("removed", 0), ("added", 0),
                              ("msg", 3), ("msg", 4), ("msg", 5)]
        assert inbox("b") == [("added", 0), ("msg", 1), ("msg", 2), ("msg", 3), ("msg", 5)]
        assert inbox("c") == [("removed", 0)]
        # a: back before it, has not acked; b: left before it, back after it (not counted).
        assert store.receipts(conv, 4) == (["a"], [], [])
        assert store.check_projections() is None  # replay == incremental
    finally:
        store.close()


def test_an_ack_made_while_removed_is_no_receipt_in_the_batch_that_invites_back(tmp_path):
    """A removed courier's ack of what it was delivered before (its inbox entries) and the
    invite that takes it back, committed in one batch (acks share commits with everything
    else): the ack was made while it was no member, so it is no receipt (PROTOCOL.md §9: their
    later acks push nothing). Before, the projection gave it as one and the broker, which
    checks membership as of the end of the batch, pushed "courier delivered 2" to the shop.
    An ack made as a member, in the batch of an invite of someone else, still is one."""
    store = Store.open(str(tmp_path / "data"), limits=Limits(max_members=50))
    try:
        (out,) = store.execute([CreateConv("shop", "d1", "user", "group", "g", False,
                                           ("courier", "customer"))])
        conv = out.reply["conv"]
        store.execute([SendMessage("shop", "d1", "user", f"m{i}", "on its way", conv, None)
                       for i in range(2)])
        store.execute([Remove("shop", "d1", "user", conv, "courier")])
        courier_head, customer_head = store.inbox_head("courier"), store.inbox_head("customer")
        outs = store.execute([
            Ack("courier", "d1", "user", courier_head),  # added, m0, m1, removed
            Ack("customer", "d1", "user", customer_head),
            Invite("shop", "d1", "user", conv, "courier", "member"),
            Invite("shop", "d1", "user", conv, "someone", "member")])
        assert [o.error for o in outs] == [None] * 4
        assert outs[0].effects.receipts == []
        assert outs[1].effects.receipts == [(conv, "customer", "delivered", 2)]
        # The two invited after it are not its audience (before 2026-12-06 both were listed
        # as having received it, their marks starting at their joining).
        assert store.receipts(conv, 2) == (["customer"], ["customer"], [])
        assert store.check_projections() is None  # replay == incremental
    finally:
        store.close()
