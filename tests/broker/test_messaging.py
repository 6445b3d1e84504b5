"""Messaging end to end over real loopback sockets and a real LMDB store."""

from __future__ import annotations

import msgpack
import pytest
import trio

import protocol
from broker.client import ClientError, Replaced
from broker.session import MAX_QUEUED_BYTES, MAX_QUEUED_FRAMES
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until


async def recv(client, n=1, timeout=5.0):
    """The next `n` deliveries of `client` (fails after `timeout`)."""
    out = []
    with trio.fail_after(timeout):
        for _ in range(n):
            out.append(await client.deliveries().receive())
    return out


async def acked_one_each(*clients):
    """Take and ack the next delivery of each client."""
    for c in clients:
        (d,) = await recv(c)
        await c.ack(d.inbox_seq)


async def nothing_more(client, wait=0.2):
    """Assert no delivery arrives within `wait` seconds."""
    with trio.move_on_after(wait):
        d = await client.deliveries().receive()
        raise AssertionError(f"unexpected delivery {d}")


async def push_of(client, kind, timeout=5.0, **match):
    """The next push of class `kind` whose fields match."""
    with trio.fail_after(timeout):
        while True:
            p = await client.next_push()
            if isinstance(p, kind) and all(getattr(p, k) == v for k, v in match.items()):
                return p


async def test_unacked_deliveries_come_again_with_the_same_inbox_seq(harness):
    """Deliveries not acked before a disconnect are delivered again on the next session."""
    async with harness.client("alice") as alice:
        for i in range(3):
            await alice.send(f"m{i}", to="bob")
    async with harness.client("bob") as bob:
        first = await recv(bob, 3)
        await bob.ack(first[0].inbox_seq)
        await bob.ping()
    async with harness.client("bob") as bob:
        again = await recv(bob, 2)
        assert [d.inbox_seq for d in again] == [d.inbox_seq for d in first[1:]]
        assert [d.body for d in again] == ["m1", "m2"]
        await bob.ack(again[-1].inbox_seq)
        await bob.ping()
    async with harness.client("bob") as bob:
        assert bob.welcome.acked == again[-1].inbox_seq
        await nothing_more(bob)


async def test_offline_backlog_then_live_traffic_has_no_gap_or_reordering(harness):
    """A device connecting to a backlog gets it all, then live messages, in conv seq order."""
    async with harness.client("alice") as alice:
        for i in range(50):
            await alice.send(f"old{i}", to="bob")
        async with harness.client("bob") as bob, trio.open_nursery() as n:
            async def more():
                for i in range(50):
                    await alice.send(f"new{i}", to="bob")
            n.start_soon(more)
            got = await recv(bob, 100)
            for d in got:
                await bob.ack(d.inbox_seq)
    assert [d.seq for d in got] == list(range(1, 101))
    assert [d.inbox_seq for d in got] == list(range(got[0].inbox_seq, got[0].inbox_seq + 100))


async def test_every_device_gets_it_except_the_sending_one(harness):
    """The sender's other devices and every recipient device receive the message."""
    async with harness.client("alice", "phone") as phone, \
            harness.client("alice", "laptop") as laptop, \
            harness.client("bob", "b1") as b1, harness.client("bob", "b2") as b2:
        r = await phone.send("hi", to="bob")
        for c in (laptop, b1, b2):
            (d,) = await recv(c)
            assert (d.conv, d.seq, d.sender, d.body) == (r.conv, r.seq, "alice", "hi")
        await nothing_more(phone)


async def test_retried_send_with_the_same_cid_appends_nothing(harness):
    """A resend with the same cid returns the first result, dup=True, and delivers once."""
    async with harness.client("alice") as alice, harness.client("bob") as bob:
        first = await alice.send("once", to="bob", cid="order-7")
        again = await alice.send("once", to="bob", cid="order-7")
        assert (again.conv, again.seq, again.lsn, again.dup) == (first.conv, first.seq,
                                                                  first.lsn, True)
        await recv(bob)
        await nothing_more(bob)
        page = await alice.history(first.conv)
        assert [m.body for m in page.messages] == ["once"]


async def test_group_members_post_and_outsiders_are_forbidden(harness):
    """Any group member posts and every member receives; a non-member is forbidden."""
    async with harness.client("shop", role="service") as shop, \
            harness.client("courier") as courier, harness.client("carol") as carol, \
            harness.client("mallory") as mallory:
        conv = await shop.create_group("order-1138", ["courier"])
        (added,) = await recv(courier)
        assert (added.kind, added.conv, added.sender) == ("added", conv, "shop")
        await shop.invite(conv, "carol")
        (added,) = await recv(carol)
        assert added.kind == "added"
        r = await courier.send("picked up", conv=conv)
        for c in (shop, carol):
            (d,) = await recv(c)
            assert (d.seq, d.body, d.sender) == (r.seq, "picked up", "courier")
        await shop.invite(conv, "dave")  # added once the group has messages: seq is still 0
        async with harness.client("dave") as dave:
            (added,) = await recv(dave)
            assert (added.kind, added.seq, added.body, added.cid) == ("added", 0, None, None)
        with pytest.raises(ClientError) as e:
            await mallory.send("let me in", conv=conv)
        assert e.value.name == "forbidden"
        with pytest.raises(ClientError) as e:
            await mallory.invite(conv, "mallory")
        assert e.value.name == "forbidden"
        with pytest.raises(ClientError) as e:
            await mallory.history(conv)
        assert e.value.name == "forbidden"
        with pytest.raises(ClientError) as missing:
            await mallory.history("grp:0000000000000000")
        assert missing.value.name == "forbidden"  # nothing leaks whether it exists
        assert missing.value.message == e.value.message


async def test_no_such_conversation_and_not_a_member_get_one_answer(harness):
    """Commands (carried out by the rules) and queries (answered by the handlers) refuse a
    conversation that does not exist and one the user is not in with one and the same
    `forbidden` message, which says it is one or the other (they used to word it three ways)."""
    async with harness.client("shop", role="service") as shop, \
            harness.client("mallory") as mallory:
        conv = await shop.create_group("order-1139", [])
        await shop.send("for members", conv=conv)
        calls = {
            "send": lambda c: mallory.send("let me in", conv=c),
            "read": lambda c: mallory.read(c, 1),
            "history": lambda c: mallory.history(c),
            "receipts": lambda c: mallory.receipts(c, 1),
            "members": lambda c: mallory.members(c),
        }
        answers = {}
        for name, call in calls.items():
            for target in (conv, "grp:0000000000000000"):
                with pytest.raises(ClientError) as e:
                    await call(target)
                answers[name, target] = (e.value.name, e.value.message)
        assert set(answers.values()) == {
            ("forbidden", "no such conversation, or you are not a member")}, answers


async def test_every_command_refuses_a_non_member_with_the_one_answer(harness):
    """PROTOCOL.md §10: commands and queries alike refuse a conversation that does not exist
    and one the user is not in with one `forbidden` message. `invite`, `set_role` and `remove`
    said "only owners and admins invite" (and so on) instead, and `join` and `subscribe` "no
    such open conversation": alike for both cases, so nothing leaked, but not the one answer
    the protocol names. A plain member, who knows the conversation is there, is told why."""
    async with harness.client("shop", role="service") as shop, \
            harness.client("mallory") as mallory, harness.client("bob") as bob:
        group = await shop.create_group("order-1139", ["bob"])  # closed
        direct = (await shop.send("hi", to="bob")).conv
        calls = {
            "invite": lambda c: mallory.invite(c, "eve"),
            "set_role": lambda c: mallory.set_role(c, "bob", "admin"),
            "remove": lambda c: mallory.remove(c, "bob"),
            "join": lambda c: mallory.join(c),
            "subscribe": lambda c: mallory.subscribe(c),
            "leave": lambda c: mallory.leave(c),
            "mute": lambda c: mallory.mute(c),
            "presence": lambda c: mallory.presence(c),
        }
        answers = {}
        for name, call in calls.items():
            for target in (group, direct, "grp:0000000000000000", "dm:bob:zed"):
                with pytest.raises(ClientError) as e:
                    await call(target)
                answers[name, target] = (e.value.name, e.value.message)
        assert set(answers.values()) == {
            ("forbidden", "no such conversation, or you are not a member")}, answers
        with pytest.raises(ClientError) as e:
            await bob.invite(group, "eve")
        assert (e.value.name, e.value.message) == ("forbidden", "only owners and admins invite")
        with pytest.raises(ClientError) as e:
            await bob.join(direct)
        assert e.value.name == "forbidden" and "direct" in e.value.message


async def test_channel_members_read_but_cannot_post(harness):
    """Owners post to a channel, subscribers receive, members posting get forbidden."""
    async with harness.client("hq", role="service") as hq, \
            harness.client("store-1") as s1, harness.client("store-2") as s2:
        conv = await hq.create_channel("notices", ["store-1"], open=True)
        await recv(s1)
        await s2.subscribe(conv)
        r = await hq.send("inventory monday", conv=conv)
        for c in (s1, s2):
            (d,) = await recv(c)
            assert (d.seq, d.body) == (r.seq, "inventory monday")
        with pytest.raises(ClientError) as e:
            await s1.send("ok boss", conv=conv)
        assert e.value.name == "forbidden"
        closed = await hq.create_channel("board", [])
        with pytest.raises(ClientError) as e:
            await s2.subscribe(closed)
        assert e.value.name == "forbidden"


async def test_an_owner_makes_a_member_an_admin_and_back(harness):
    """set_role over the wire: a store made admin of head office's channel posts, sees the
    receipts (queried and pushed: the broker's roster of who posts follows the role), invites;
    made a member again, it may not post. Only an owner changes roles."""
    async with harness.client("hq") as hq, harness.client("store-1") as s1, \
            harness.client("store-2") as s2:
        conv = await hq.create_channel("notices", ["store-1", "store-2"])
        await acked_one_each(s1, s2)  # "added"
        first = await hq.send("opening hours", conv=conv)  # receipts: the roster is cached
        await acked_one_each(s1, s2)
        await push_of(hq, type(_receipt()), user="store-2", delivered=first.seq)
        with pytest.raises(ClientError) as e:
            await s1.set_role(conv, "store-2", "admin")
        assert e.value.name == "forbidden"
        await hq.set_role(conv, "store-1", "admin")
        await hq.set_role(conv, "store-1", "admin")  # a retry: nothing changes
        roles = await s1.members(conv)
        assert (roles.owners, roles.admins, roles.members) == (("hq",), ("store-1",),
                                                                ("store-2",))
        r = await s1.send("stock count at 9", conv=conv)
        for c in (hq, s2):
            (d,) = await recv(c)
            assert (d.seq, d.body, d.sender) == (r.seq, "stock count at 9", "store-1")
            await c.ack(d.inbox_seq)
        await push_of(s1, type(_receipt()), user="store-2", delivered=r.seq)
        assert "store-2" in (await s1.receipts(conv, r.seq)).delivered
        await s1.invite(conv, "store-3")
        await hq.set_role(conv, "store-1", "member")
        with pytest.raises(ClientError) as e:
            await s1.send("again", conv=conv)
        assert e.value.name == "forbidden"
        with pytest.raises(ClientError) as e:
            await hq.set_role(conv, "store-9", "admin")
        assert e.value.name == "conflict"


async def test_an_owner_removes_the_courier_once_the_order_is_delivered(harness):
    """remove over the wire: the courier, online, is told at once (a `removed` delivery from the
    shop), gets nothing posted after it, may not post, and is gone from the members, presence
    and receipts of the group (the broker's roster follows); the customer stays. A plain member
    may not remove; removing someone who is no longer a member is `ok` (a resent remove)."""
    async with harness.client("shop") as shop, harness.client("courier") as courier, \
            harness.client("customer") as customer:
        conv = await shop.create_group("order-1187", ["courier", "customer"])
        await acked_one_each(courier, customer)  # "added"
        await courier.send("at the door", conv=conv)
        await acked_one_each(shop, customer)
        with pytest.raises(ClientError) as e:
            await customer.remove(conv, "courier")
        assert e.value.name == "forbidden"
        assert "courier" in await shop.presence(conv)
        await shop.remove(conv, "courier")
        (d,) = await recv(courier)
        assert (d.kind, d.conv, d.sender, d.body) == ("removed", conv, "shop", None)
        await courier.ack(d.inbox_seq)
        await shop.remove(conv, "courier")  # resent: nothing changes
        r = await shop.send("thanks, enjoy", conv=conv)
        (d,) = await recv(customer)
        assert d.seq == r.seq
        await customer.ack(d.inbox_seq)
        await nothing_more(courier)
        with pytest.raises(ClientError) as e:
            await courier.send("one more thing", conv=conv)
        assert e.value.name == "forbidden"
        roles = await shop.members(conv)
        assert (roles.owners, roles.admins, roles.members) == (("shop",), (), ("customer",))
        assert "courier" not in await shop.presence(conv)
        await push_of(shop, type(_receipt()), user="customer", delivered=r.seq)
        assert (await shop.receipts(conv, r.seq)).delivered == ("customer",)


async def test_receipts_are_pushed_live_and_queryable(harness):
    """Acks and reads push receipts to members and show up in a receipts query."""
    async with harness.client("hq", role="service") as hq, \
            harness.client("store-1") as s1, harness.client("store-2") as s2:
        conv = await hq.create_channel("notices", ["store-1", "store-2"])
        await acked_one_each(s1, s2)  # "added"
        r = await hq.send("read me", conv=conv)
        (d1,) = await recv(s1)
        await s1.ack(d1.inbox_seq)
        await push_of(hq, type(_receipt()), user="store-1", delivered=r.seq)
        await s1.read(conv, r.seq)
        await push_of(hq, type(_receipt()), user="store-1", read=r.seq)
        info = await hq.receipts(conv, r.seq)
        assert (info.delivered, info.read) == (("store-1",), ("store-1",))
        (d2,) = await recv(s2)
        await s2.ack(d2.inbox_seq)
        await push_of(hq, type(_receipt()), user="store-2", delivered=r.seq)
        info = await hq.receipts(conv, r.seq)
        assert (set(info.delivered), info.read) == ({"store-1", "store-2"}, ("store-1",))
        # A subscriber is not told which other stores have it, by push or by asking.
        with pytest.raises(ClientError) as refused:
            await s2.receipts(conv, r.seq)
        assert refused.value.name == "forbidden" and "channel" in refused.value.message
        # Who has not received it yet: the members less the receipts.
        everyone = await hq.members(conv)
        assert (everyone.kind, everyone.name, everyone.owners, everyone.admins) == (
            "channel", "notices", ("hq",), ())
        assert set(everyone.members) - set(info.delivered) == set()
        with pytest.raises(ClientError) as refused:
            await s1.members(conv)
        assert refused.value.name == "forbidden"
        # A seq the channel has no message of is not_found (it used to be two empty lists,
        # as if nobody had it yet).
        for seq in (0, r.seq + 1):
            with pytest.raises(ClientError) as info:
                await hq.receipts(conv, seq)
            assert info.value.name == "not_found" and f"no message {seq}" in str(info.value)


def _receipt():


    return protocol.Receipt(conv="dm:a:b", user="a")


async def test_reading_on_one_device_is_pushed_to_the_others(harness):
    """A read mark made on one device reaches the user's other devices."""
    async with harness.client("alice") as alice, harness.client("bob", "b1") as b1, \
            harness.client("bob", "b2") as b2:
        r = await alice.send("x", to="bob")
        await recv(b1)
        await b1.read(r.conv, r.seq)
        await push_of(b2, type(_receipt()), user="bob", read=r.seq)
        await push_of(alice, type(_receipt()), user="bob", read=r.seq)


async def test_presence_and_typing_reach_those_who_share_a_conversation(harness):
    """Online/offline and typing are pushed to conversation partners, not logged."""


    async with harness.client("alice") as alice:
        r = await alice.send("hi", to="bob")
        async with harness.client("bob") as bob:
            await push_of(alice, protocol.Status, user="bob", online=True)
            assert await alice.presence(r.conv) == ("alice", "bob") or set(
                await alice.presence(r.conv)) == {"alice", "bob"}
            await bob.typing(r.conv)
            await push_of(alice, protocol.TypingNotice, user="bob", conv=r.conv)
            store = harness.broker.store
            types = {e.type for e in store.read_events(1, store.last_lsn())}
            assert types <= {"conv.created", "member.added", "message.accepted",
                             "delivery.acked"}
        await push_of(alice, protocol.Status, user="bob", online=False)


async def test_typing_is_not_pushed_to_the_typists_own_devices(harness):
    """A typing notice reaches the conversation's other members, not the typist's other
    devices (a notice about yourself is noise there; they got it until 2026-12-05)."""
    async with harness.client("alice", "a1") as a1, harness.client("alice", "a2") as a2, \
            harness.client("bob") as bob:
        conv = (await a1.send("hi", to="bob")).conv
        await a1.typing(conv)
        await push_of(bob, protocol.TypingNotice, user="alice", conv=conv)
        await bob.typing(conv)  # pushed to a2 after alice's notice would have been
        await push_of(a1, protocol.TypingNotice, user="bob", conv=conv)
        with trio.fail_after(5):
            while not isinstance(p := await a2.next_push(), protocol.TypingNotice):
                pass
        assert p.user == "bob", p


async def test_history_pages_by_seq_both_ways(harness):
    """History pages newest first with `before`, or oldest first with `after`."""
    async with harness.client("alice") as alice:
        for i in range(1, 8):
            r = await alice.send(f"m{i}", to="bob")
        page = await alice.history(r.conv, limit=3)
        assert [m.seq for m in page.messages] == [7, 6, 5] and page.more
        page = await alice.history(r.conv, before=5, limit=3)
        assert [m.seq for m in page.messages] == [4, 3, 2] and page.more
        page = await alice.history(r.conv, after=5, limit=10, order="oldest")
        assert [m.seq for m in page.messages] == [6, 7] and not page.more


async def test_a_user_lists_their_conversations_with_unread_counts(harness):
    """`convs` lists the user's own conversations in id order, each with its kind, role, name,
    last seq, read mark and mute; posting counts as reading, a read moves the mark, a left
    conversation is gone, and pages follow `after` (also past an id that is a prefix of the
    next: dm:bob:shop, then dm:bob:shop2)."""
    from protocol import ConvEntry

    async with harness.client("shop", role="service") as shop, \
            harness.client("shop2") as shop2, harness.client("bob") as bob:
        group = await shop.create_group("order-1", ["bob"])
        chan = await shop.create_channel("notices", ["bob"])
        for text in ("packed", "sent", "out for delivery"):
            await shop.send(text, conv=group)
        await shop.send("sale", conv=chan)
        direct = (await bob.send("thanks", to="shop")).conv
        await shop.send("you're welcome", to="bob")
        other = (await shop2.send("hello", to="bob")).conv
        assert (direct, other) == ("dm:bob:shop", "dm:bob:shop2")
        await bob.read(group, 2)
        await bob.mute(chan)
        everything = await bob.conversations()
        assert not everything.more
        assert everything.convs == (
            ConvEntry(chan, "channel", "member", 1, 0, True, "notices"),
            ConvEntry(direct, "direct", "member", 2, 1),
            ConvEntry(other, "direct", "member", 1, 0),
            ConvEntry(group, "group", "member", 3, 2, False, "order-1"),
        )
        paged, after = [], None
        while True:
            page = await bob.conversations(after=after, limit=1)
            paged += page.convs
            if not page.more:
                break
            after = page.convs[-1].conv
        assert tuple(paged) == everything.convs
        assert (await bob.conversations(after=direct, limit=1)).convs[0].conv == other
        assert (await shop.conversations()).convs[0] == ConvEntry(
            chan, "channel", "owner", 1, 1, False, "notices")
        await bob.leave(group)
        assert [c.conv for c in (await bob.conversations()).convs] == [chan, direct, other]
    async with harness.client("nobody") as nobody:
        page = await nobody.conversations()
        assert (page.convs, page.more) == ((), False)


async def test_a_channel_post_reaches_each_subscriber_at_its_own_inbox_seq(harness):
    """One post's deliveries (encoded once) carry each subscriber's own inbox_seq and muted."""
    async with harness.client("hq", role="service") as hq, harness.client("s1") as s1, \
            harness.client("s2") as s2, harness.client("s3") as s3, \
            harness.client("bob") as bob:
        conv = await hq.create_channel("notices", [], open=True)
        for c in (s1, s2, s3):
            await c.subscribe(conv)
        await bob.send("hi", to="s2")  # s2's inbox is one entry ahead of the others'
        assert [d.inbox_seq for d in await recv(s2)] == [1]
        await s3.mute(conv)
        posts = [await hq.send(text, conv=conv) for text in ("one", "two")]
        for client, first, muted in ((s1, 1, False), (s2, 2, False), (s3, 1, True)):
            got = await recv(client, 2)
            assert [(d.inbox_seq, d.seq, d.body, d.muted, d.sender) for d in got] == [
                (first + i, r.seq, text, muted, "hq")
                for i, (r, text) in enumerate(zip(posts, ("one", "two"), strict=True))]
            await nothing_more(client, 0.05)


async def test_muted_conversations_deliver_flagged(harness):
    """Deliveries of a muted conversation carry muted=true, from the next one on, to every
    connected device of the user; unmuted, false again. Another conversation is not muted."""
    async with harness.client("alice") as alice, harness.client("bob") as bob, \
            harness.client("bob", "phone") as phone, harness.client("carol") as carol:
        r = await alice.send("one", to="bob")
        for device in (bob, phone):
            (d,) = await recv(device)
            assert not d.muted
        await bob.mute(r.conv)
        await alice.send("two", to="bob")
        await carol.send("from carol", to="bob")
        for device in (bob, phone):
            got = await recv(device, 2)
            assert [(d.body, d.muted) for d in got] == [("two", True), ("from carol", False)]
        await phone.mute(r.conv, muted=False)
        await alice.send("three", to="bob")
        for device in (bob, phone):
            (d,) = await recv(device)
            assert (d.body, d.muted) == ("three", False)


async def test_a_stalled_device_does_not_slow_a_fast_one(tmp_path):
    """With window 4, a device that never acks holds 4 in flight; another gets everything."""
    async with running_broker(tmp_path / "data", window=4) as h:
        async with h.client("alice") as alice, h.client("bob", "slow") as slow, \
                h.client("bob", "fast") as fast:
            with trio.fail_after(20):
                for i in range(40):
                    await alice.send(f"m{i}", to="bob")
                got = []
                while len(got) < 40:
                    (d,) = await recv(fast)
                    got.append(d.body)
                    await fast.ack(d.inbox_seq)
            assert got == [f"m{i}" for i in range(40)]
            stalled = await recv(slow, 4)
            await nothing_more(slow)
            session = next(s for s in h.broker.hub.sessions("bob") if s.device == "slow")
            assert len(session.unacked) == 4
            await slow.ack(stalled[-1].inbox_seq)
            more = await recv(slow, 4)
            assert [d.body for d in stalled + more] == [f"m{i}" for i in range(8)]


async def test_bad_tokens_are_unauthorized(harness):
    """Forged, expired and malformed tokens are refused with unauthorized."""
    from broker import tokens
    from broker.client import open_client

    good = harness.token("alice")
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    expired = tokens.issue(harness.broker.secret, "alice", "user", -10)
    other = tokens.issue(b"another-secret" * 3, "alice", "user", 3600)
    for bad in (forged, expired, other, "not-a-token", ""):
        with pytest.raises(ClientError) as e:
            async with open_client(harness.server, bad, "d1", reconnect=False):
                pass
        assert e.value.name == "unauthorized", bad


async def test_a_client_that_sends_but_never_reads_is_held_back(harness):
    """Pipelined requests from a client that never reads stop being read; memory stays bounded."""
    raw = await RawClient.connect(harness.server, harness.token("mallory"))
    session = next(iter(harness.broker.hub.sessions("mallory")))
    frame = raw.conn.send(protocol.Ping(id=1))
    with trio.move_on_after(3):
        for _ in range(200_000):  # ~2 MB of pings; the socket buffers fill, then we block
            await raw.stream.send_all(frame * 100)
    assert len(session.out) <= MAX_QUEUED_FRAMES + 1
    async with harness.client("alice") as alice:  # everyone else is served
        await alice.send("still here", to="bob")
    await raw.stream.aclose()


async def test_error_replies_to_a_client_that_never_reads_are_held_back_too(harness):
    """Frames answered with an error (an unknown type, a bad field) fill the reply queue like
    any other: the broker stops reading at its bound instead of queueing an error per frame."""
    raw = await RawClient.connect(harness.server, harness.token("mallory"))
    session = next(iter(harness.broker.hub.sessions("mallory")))
    unknown = protocol.encode_frame({"t": "nosuch", "id": 1})
    with trio.move_on_after(3):
        for _ in range(100_000):  # ~1.5 MB of frames; the socket buffers fill, then we block
            await raw.stream.send_all(unknown * 100)
    assert len(session.out) <= MAX_QUEUED_FRAMES and session.frames_in == 0
    async with harness.client("alice") as alice:  # everyone else is served
        await alice.send("still here", to="bob")
    await raw.stream.aclose()


async def test_big_replies_to_a_client_that_never_reads_are_bounded_in_bytes(tmp_path):
    """History pages of about 1 MB each, asked for again and again by a client that never
    reads: the broker stops reading it at MAX_QUEUED_BYTES (not 1,024 pages, a gigabyte), and
    once it has stopped reading it for --idle-timeout, it ends the session as a slow consumer."""
    async with running_broker(tmp_path / "data", idle_timeout_s=2.0, heartbeat_s=1) as h:
        async with h.client("alice") as alice:
            for i in range(16):
                r = await alice.send(f"{i}" + "x" * 60_000, to="mallory")
        raw = await RawClient.connect(h.server, h.token("mallory"), "hoarder")
        session = next(iter(h.broker.hub.sessions("mallory")))
        ask = b"".join(raw.conn.send(protocol.History(id=i, conv=r.conv, limit=50))
                       for i in range(1, 201))
        with trio.move_on_after(1.5):
            await raw.stream.send_all(ask)
        assert session.out_bytes <= MAX_QUEUED_BYTES + h.config.max_frame_bytes <= 8 << 20
        with trio.fail_after(10):
            while session.reason is None:
                await trio.sleep(0.05)
        assert session.reason.value == "slow_consumer"
        async with h.client("alice") as alice:  # everyone else is served
            await alice.send("still here", to="bob")
        await raw.aclose()


async def test_a_device_is_never_sent_past_the_announced_inbox_head(harness):
    """Entries committed but not yet announced are not delivered, so every ack is accepted."""
    from storage.commands import SendMessage

    async with harness.client("alice") as alice:
        await alice.send("m1", to="bob")
        bob = await RawClient.connect(harness.server, harness.token("bob"))
        first = await bob.next()
        assert isinstance(first, protocol.Deliver) and first.inbox_seq == 1
        # Two more commits the hub has not announced yet, then an announcement of the first.
        store = harness.broker.store
        store.execute([SendMessage("alice", "d1", "user", f"x{n}", "later", to="bob")
                       for n in range(2)])
        harness.broker.hub.inbox_advanced({"bob": 2})
        second = await bob.next()
        assert second.inbox_seq == 2
        await bob.send(protocol.Ack(upto=2, id=7))
        reply = await bob.next()
        assert isinstance(reply, protocol.Ok) and reply.id == 7, reply
        with trio.move_on_after(0.3):
            while True:
                extra = await bob.next()
                if isinstance(extra, protocol.Deliver):
                    raise AssertionError(f"delivered past the announced head: {extra}")
        harness.broker.hub.inbox_advanced({"bob": 3})
        third = await bob.next()
        while not isinstance(third, protocol.Deliver):
            third = await bob.next()
        assert third.inbox_seq == 3
        await bob.stream.aclose()


async def test_acks_record_exactly_the_conversations_they_cover(harness):
    """Each logged ack names, per conversation, the highest seq it covers, as the inbox says."""
    async with harness.client("alice") as alice, harness.client("carol") as carol, \
            harness.client("bob", "b1") as b1, harness.client("bob", "b2") as b2:
        group = await alice.create_group("g", ["bob", "carol"])
        for i in range(30):
            sender = (alice, carol)[i % 2]
            await sender.send(f"m{i}", conv=group if i % 3 else None,
                              to=None if i % 3 else "bob")
        for device, n in ((b1, 31), (b2, 31)):
            got = await recv(device, n)
            for d in [*got[::4], got[-1]]:  # ack in strides, as a real client might
                await device.ack(d.inbox_seq)
            await device.ping()
        await b1.ack(5)  # an ack below the mark changes nothing
        await b1.ping()
    store = harness.broker.store
    with trio.fail_after(5):  # acks are committed in the background
        while min(store.delivered("bob", "b1"), store.delivered("bob", "b2")) < 31:
            await trio.sleep(0.01)
    inbox = store.projection_snapshot()[0]["inbox"]
    senders = {e.lsn: e.user for e in store.read_events(1) if e.type == "message.accepted"}

    def covered(user: str, old: int, upto: int, others_only: bool) -> dict[str, int]:
        """The highest seq per conv of the messages in (old, upto] of `user`'s inbox."""
        top: dict[str, int] = {}
        for n in range(old + 1, upto + 1):
            kind, conv, seq, lsn = msgpack.unpackb(inbox[user.encode() + b"\0"
                                                         + n.to_bytes(8, "big")])
            if kind == "msg" and not (others_only and senders[lsn] == user):
                top[conv] = max(seq, top.get(conv, 0))
        return top

    marks: dict[tuple[str, str], int] = {}
    for event in (e for e in store.read_events(1) if e.type == "delivery.acked"):
        old = marks.get((event.user, event.device), 0)
        upto, convs = event.data["upto"], event.data["convs"]
        # Nothing missed: every conversation with others' messages covered is raised to them.
        for conv, seq in covered(event.user, old, upto, others_only=True).items():
            assert convs.get(conv, 0) >= seq, (event, conv, seq)
        # Nothing invented: no mark beyond a message the ack covers.
        everything = covered(event.user, old, upto, others_only=False)
        assert all(seq <= everything.get(conv, 0) for conv, seq in convs.items()), event
        marks[(event.user, event.device)] = upto
    assert {("bob", "b1"), ("bob", "b2")} <= marks.keys()


def _commit_at_once(harness, user, device, to, bodies):
    """Queue sends so that they share one commit (nothing yields between the enqueues)."""
    from storage.commands import SendMessage

    return [harness.broker.committer.enqueue(
        SendMessage(user, device, "user", f"{device}-{body}", body, to=to)) for body in bodies]


async def test_a_caught_up_device_gets_a_whole_commit_from_memory(harness, monkeypatch):
    """Many messages of one commit reach a caught-up device in order, once each, with no store
    read; a device that is behind reads the store, and both end the same."""
    store = harness.broker.store
    reads = []
    real = store.deliverable
    monkeypatch.setattr(store, "deliverable", lambda *a, **k: reads.append(a) or real(*a, **k))
    bodies = [f"m{i}" for i in range(30)]
    async with harness.client("bob", "b1") as b1, harness.client("alice") as alice:
        first = await alice.send("hello", to="bob")
        (d,) = await recv(b1)
        await b1.ack(d.inbox_seq)
        await b1.ping()
        reads.clear()
        _commit_at_once(harness, "alice", "d2", "bob", bodies)
        got = await recv(b1, 30)
        assert reads == []
        assert [d.body for d in got] == bodies
        assert [d.seq for d in got] == list(range(first.seq + 1, first.seq + 31))
        assert [d.inbox_seq for d in got] == list(range(2, 32))
        await nothing_more(b1)
        async with harness.client("bob", "b2") as b2:  # behind by 31: from the store
            late = await recv(b2, 31)
            assert reads
            assert [(d.inbox_seq, d.body) for d in late[1:]] == [
                (d.inbox_seq, d.body) for d in got]


async def test_memory_delivery_stops_at_the_window_and_the_store_gives_the_rest(tmp_path):
    """With window 4, a commit of 10 gives 4 from memory; the rest come from the store as
    acks open the window, in order, once each."""
    async with running_broker(tmp_path / "data", window=4) as h:
        async with h.client("bob") as bob:
            await bob.ping()
            _commit_at_once(h, "alice", "d1", "bob", [f"m{i}" for i in range(10)])
            got = []
            while len(got) < 10:
                batch = await recv(bob, min(4, 10 - len(got)))
                got.extend(batch)
                await bob.ack(batch[-1].inbox_seq)
            await nothing_more(bob)
        assert [d.body for d in got] == [f"m{i}" for i in range(10)]
        assert [d.inbox_seq for d in got] == list(range(1, 11))


async def test_own_sends_in_a_commit_are_passed_over_and_acked(harness):
    """A device's own sends, committed together, are not delivered back to it, its other
    device gets them all, and its cursor moves past them."""
    async with harness.client("alice", "phone") as phone, \
            harness.client("alice", "laptop") as laptop:
        await phone.ping()
        await laptop.ping()
        _commit_at_once(harness, "alice", "phone", "bob", [f"m{i}" for i in range(12)])
        got = await recv(laptop, 12)
        assert [d.body for d in got] == [f"m{i}" for i in range(12)]
        await nothing_more(phone)
    async with harness.client("alice", "phone") as phone:
        assert phone.welcome.acked == 12


async def test_a_device_sending_in_many_commits_acks_its_own_sends_once_a_round(harness):
    """Each awaited send is its own commit; the device's cursor passes each of them at once,
    but their durable ack comes once per OWN_ACK_DELAY_S, not once per commit."""
    from broker.server import OWN_ACK_DELAY_S
    from storage.records import DELIVERY_ACKED

    store = harness.broker.store
    with trio.fail_after(30):
        async with harness.client("alice", "phone") as phone:
            start = trio.current_time()
            for i in range(20):
                await phone.send(f"m{i}", to="bob", cid=f"c{i}")
            sending = trio.current_time() - start
            # Durable with the next round of own acks (OWN_ACK_DELAY_S), and its commit: on a
            # loaded machine, later than two rounds.
            await wait_until(lambda: store.delivered("alice", "phone") == 20)
    acks = [ev for ev in store.read_events()
            if ev.type == DELIVERY_ACKED and (ev.user, ev.device) == ("alice", "phone")]
    assert len(acks) <= 2 + int(sending / OWN_ACK_DELAY_S), (len(acks), sending)


async def test_a_client_replaced_by_the_same_device_stops_instead_of_taking_it_back(harness):
    """Two processes with one device name: the broker closes the older session with bye
    "replaced"; its SDK stops (Replaced) instead of reconnecting, which would replace the newer
    one in turn, for ever. The newer one carries on."""
    async with harness.client("bob", "phone") as first:
        async with harness.client("bob", "phone") as second:
            with trio.fail_after(10):
                with pytest.raises(Replaced):
                    async for _ in first.deliveries():
                        pass  # the deliveries raise the client's error when it stops
                with pytest.raises(Replaced):
                    await first.ping()
                await trio.sleep(0.3)
                assert first.reconnects == 0
                async with harness.client("alice") as alice:
                    await alice.send("still here?", to="bob")
                d = await second.deliveries().receive()
                assert d.body == "still here?" and second.reconnects == 0


async def test_the_member_list_cache_stays_bounded(harness):
    """The broker keeps the member lists of the conversations it pushes to in memory, at most
    `roster_cache_max` of them (the oldest go first), and answers right past that."""
    harness.broker.rosters.max_convs = 3
    async with harness.client("alice") as alice:
        convs = [await alice.create_group(f"g{i}", ["bob"]) for i in range(6)]
        for conv in convs + convs[:2]:
            assert await alice.presence(conv) == ("alice",)
        assert len(harness.broker.rosters.cached) <= 3


async def test_a_replaced_session_is_no_new_presence_and_a_leaver_no_new_receipts(harness):
    """A device reconnecting in place of its user's only session is not announced online
    again; a member's acks after leaving a group are not pushed to the members."""

    async def pushes(client, kind):
        await client.ping()  # whatever the broker pushed before this answer is queued
        got = []
        with trio.move_on_after(0.3):
            while True:
                got.append(await client.next_push())
        return [p for p in got if isinstance(p, kind)]

    async with harness.client("alice") as alice:
        conv = await alice.create_group("g", ["bob"])
        await alice.send("before bob leaves", conv=conv)
        first = await RawClient.connect(harness.server, harness.token("bob"), "phone")
        await push_of(alice, protocol.Status, user="bob", online=True)
        again = await RawClient.connect(harness.server, harness.token("bob"), "phone")
        assert await pushes(alice, protocol.Status) == []
        added, message = await again.next(), await again.next()
        assert (added.kind, message.kind) == ("added", "msg")
        await again.send(protocol.Leave(id=1, conv=conv))
        assert isinstance(await again.reply(1), protocol.Ok)
        await again.send(protocol.Ack(upto=message.inbox_seq))
        await again.send(protocol.Ping(id=2))
        await again.reply(2)
        assert await pushes(alice, protocol.Receipt) == []
        for c in (first, again):
            await c.aclose()


async def test_an_admin_posting_where_it_is_no_member_keeps_no_own_lsns(harness):
    """An admin token may post in conversations it is not in; those posts make no entry in its
    inbox, so its session does not remember them to pass over (that set would only grow)."""
    async with harness.client("shop") as shop, harness.client("ops", role="admin") as ops:
        conv = await shop.create_group("g", ["bob"])
        for i in range(20):
            await ops.send(f"notice {i}", conv=conv)
        (session,) = harness.broker.hub.sessions("ops")
        assert session.own_lsns == set()
        own = await ops.create_group("mine", ["bob"])
        await ops.send("in my own group", conv=own)  # a member: its inbox gets it
        page = await shop.history(conv)
        assert len(page.messages) == 20


async def test_an_admin_token_sees_a_channels_receipts_member_or_not(harness):
    """An admin token asks receipts and members of any conversation (PROTOCOL.md §10), also of
    a channel it is a plain member of; it was refused there (and only there)."""
    async with harness.client("hq", role="service") as hq, \
            harness.client("ops", role="admin") as ops, \
            harness.client("ops2", role="admin") as ops2:
        conv = await hq.create_channel("notices", ["ops", "store-1"])
        seq = (await hq.send("hello stores", conv=conv)).seq
        for admin in (ops, ops2):
            assert (await admin.receipts(conv, seq)).conv == conv
            assert set((await admin.members(conv)).members) == {"ops", "store-1"}


async def test_presence_follows_membership_changes_of_a_cached_roster(harness):
    """Presence is announced to the online members of the user's direct conversations and
    groups as they are now: a member removed no longer hears of the others, a member invited
    does, though the group's member list was cached for pushes before either change."""

    async def statuses(client):
        await client.ping()  # whatever the broker pushed before this answer is queued
        got = []
        with trio.move_on_after(0.3):
            while True:
                got.append(await client.next_push())
        return [(p.user, p.online) for p in got if isinstance(p, protocol.Status)]

    async with harness.client("alice") as alice, harness.client("carol") as carol:
        conv = await alice.create_group("g", ["bob", "carol"])
        await alice.typing(conv)  # the group's roster is cached now
        await push_of(carol, protocol.TypingNotice, user="alice", conv=conv)
        await alice.remove(conv, "carol")
        await alice.invite(conv, "dave")
        async with harness.client("dave") as dave:
            await push_of(alice, protocol.Status, user="dave", online=True)
            await statuses(carol)
            async with harness.client("bob"):
                await push_of(dave, protocol.Status, user="bob", online=True)
            assert await statuses(carol) == []  # removed before bob came: not told


@pytest.mark.parametrize("bound", [3, 4])
async def test_welcome_tells_clients_the_receipt_audience_bound(tmp_path, bound):
    """A plain member of a group bigger than --receipt-audience-max gets no receipt pushes and
    must ask `receipts`: the welcome says the bound (`receipt_audience`, since 2026-12-05), and
    the SDK's `receipts_pushed(members)` says whether this client hears of others' marks."""
    async with running_broker(tmp_path / "data", receipt_audience_max=bound) as h, \
            h.client("alice") as alice, h.client("bob") as bob:
        assert alice.welcome.receipt_audience == bob.welcome.receipt_audience == bound
        group = await alice.members(await alice.create_group("g", ["bob", "carol", "dave"]))
        assert alice.receipts_pushed(group)  # the owner, whatever its size
        assert bob.receipts_pushed(await bob.members(group.conv)) == (bound >= 4)
        channel = await alice.members(await alice.create_channel("c", ["bob"]))
        assert alice.receipts_pushed(channel) and not bob.receipts_pushed(channel)
        dm = (await alice.send("hi", to="bob")).conv
        assert bob.receipts_pushed(await bob.members(dm))
    async with running_broker(tmp_path / "data2") as h, h.client("alice") as alice:
        assert alice.welcome.receipt_audience == 256  # the default


@pytest.mark.parametrize("bound", [3, 4])
async def test_a_big_groups_marks_are_pushed_only_to_its_owners_and_admins(tmp_path, bound):
    """In a group of more than --receipt-audience-max members a member's marks are pushed as in
    a channel: to its owners and admins, and a read to the member's own devices (a post read by
    all n members online was n x n pushes, 100,000,000 in a group of 10,000). The others still
    ask `receipts`. At the bound every other online member hears of them, as before."""
    async with running_broker(tmp_path / "data", receipt_audience_max=bound) as h, \
            h.client("alice") as alice, h.client("dave") as dave, h.client("carol") as carol, \
            h.client("bob") as bob, h.client("bob", "tablet") as tablet:
        conv = await alice.create_group("g", ["bob", "carol", "dave"])  # four members
        await alice.set_role(conv, "dave", "admin")
        seq = (await alice.send("notice", conv=conv)).seq
        await bob.read(conv, seq)
        for c in (alice, dave, tablet):
            await push_of(c, protocol.Receipt, user="bob", read=seq)
        # Bob's read was pushed to all its audience at once, before alice's typing notice: what
        # carol is told of it comes before that notice.
        await alice.typing(conv)
        heard = []
        with trio.fail_after(5):
            while not isinstance(p := await carol.next_push(), protocol.TypingNotice):
                if isinstance(p, protocol.Receipt) and p.user == "bob" and p.read == seq:
                    heard.append(p)
        assert len(heard) == (1 if bound >= 4 else 0)
        assert "bob" in (await carol.receipts(conv, seq)).read
        # An admin's delivered mark goes to the others who hear of marks, never back to the
        # admin's own devices (as above: what dave is told of it comes before carol's notice).
        got = await recv(dave, 2)  # "added", then the notice
        await dave.ack(got[-1].inbox_seq)
        await push_of(alice, protocol.Receipt, user="dave", delivered=seq)
        await carol.typing(conv)
        own = []
        with trio.fail_after(5):
            while not (isinstance(p := await dave.next_push(), protocol.TypingNotice)
                       and p.user == "carol"):
                if isinstance(p, protocol.Receipt) and p.user == "dave":
                    own.append(p)
        assert own == []
