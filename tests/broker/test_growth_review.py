"""Review of resource growth over a long life: what the broker keeps per user, device or
conversation must stay bounded, or be let go when they leave."""

from __future__ import annotations

from functools import partial

import trio

from broker.session import MUTED_CACHE_MAX
from tests.harness import running_broker


async def test_a_long_session_keeps_the_mute_state_of_a_bounded_number_of_conversations(
        tmp_path):
    """A service's session, open for weeks, is delivered the messages of every conversation it
    is in: it kept one mute state per conversation it was ever delivered to, for good (20,000
    after 20,000 users each sent it a message). At most MUTED_CACHE_MAX now, and a mute still
    shows on the next delivery after the cache was emptied."""
    groups = MUTED_CACHE_MAX + 300
    async with running_broker(tmp_path / "data", changes_per_s_per_user=1e9,
                              max_inflight_requests=1 << 16) as h, \
            h.client("shop", "s") as shop, h.client("svc", "bot", role="service") as svc:
        (session,) = h.broker.hub.sessions("svc")
        convs: list[str] = []

        async def create(i: int) -> None:
            convs.append(await shop.create_group(f"g{i}", ["svc", "third"]))

        async with trio.open_nursery() as nursery:
            for i in range(groups):
                nursery.start_soon(create, i)
        await svc.mute(convs[0])
        async with trio.open_nursery() as nursery:
            for conv in convs:  # each post is learned by the sessions of its 3 members
                nursery.start_soon(partial(shop.send, "hello", conv=conv))
        await shop.send("once more", conv=convs[0])
        assert len(session._muted) <= MUTED_CACHE_MAX
        seen = 0
        with trio.fail_after(30):
            async for d in svc.deliveries():
                await svc.ack(d.inbox_seq)
                if d.kind == "msg":
                    seen += 1
                    assert d.muted == (d.conv == convs[0]), d
                    if seen == groups + 1:
                        break
        assert len(session._muted) <= MUTED_CACHE_MAX


async def test_what_the_broker_keeps_per_user_and_device_goes_when_they_leave(tmp_path):
    """Users who connect once, send, and leave leave nothing behind once their rate buckets
    have refilled: no hub entry, no bucket, no ack bookkeeping, no connection task or socket
    (measured: 20,000 such users left the broker's maps at the size they began with)."""
    users = 300
    async with running_broker(tmp_path / "data") as h, \
            h.client("svc", "bot", role="service") as svc:
        broker, committer = h.broker, h.broker.committer

        async def one(i: int) -> None:
            async with h.client(f"u{i}", "phone") as c:
                await c.send("hi", to="svc")
                await c.send("and bye", to="svc")

        async with trio.open_nursery() as nursery:
            for i in range(users):
                nursery.start_soon(one, i)
        seen = 0
        with trio.fail_after(30):
            async for d in svc.deliveries():
                seen += 1
                if seen == 2 * users:
                    # Durable: its bookkeeping is gone once it is (`svc.ping()` here raced it:
                    # the buckets below may be pruned before that commit, under load).
                    await svc.ack(d.inbox_seq, durable=True)
                    break
                await svc.ack(d.inbox_seq)
        with trio.fail_after(10):  # a bucket refills in a second; the idle watch prunes
            while any(len(b) > 1 for b in broker._user_buckets):
                await trio.sleep(0.1)
        assert [len(b) for b in broker._user_buckets] == [1, 1, 1]  # svc's
        assert list(broker.hub._by_user) == ["svc"] and broker.hub.count == 1
        assert broker.handshaking == 0 and not broker._awaiting_hello and not broker.own_acks
        assert not committer._acks and not committer._acks_lost
        assert set(committer._unsynced_acks) <= {("svc", "bot")}
        assert set(committer._last_acks) <= {("svc", "bot")}
