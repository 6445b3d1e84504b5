"""The delivery path against a real broker: a commit's fan-out bigger than one inbox read, a
device whose window stays full while it sends, and a long run of its own sends to pass over.
Each test is a defect a review found (2026-12-04, night): deliveries stalled with room in the
window, memory grown per send, the event loop blocked."""

from __future__ import annotations

import trio

import protocol as wire
from storage.commands import CreateConv, SendMessage
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until


async def _deliveries(c: RawClient, n: int, timeout: float) -> list[wire.Deliver]:
    """Up to `n` deliveries of raw client `c`, whatever came within `timeout` seconds."""
    got: list[wire.Deliver] = []
    with trio.move_on_after(timeout):
        while len(got) < n:
            f = await c.next()
            assert f is not None, "connection closed"
            if isinstance(f, wire.Deliver):
                got.append(f)
    return got


async def test_a_fanout_that_reads_more_than_one_inbox_batch_delivers_it_all(tmp_path):
    """A caught-up device whose window has room for a whole commit gets the whole commit.

    The commit starts with a membership entry (not a message), so the device's fan-out reads
    the store, which gives at most INBOX_READ_BATCH (256) entries a read. `flush_now` writes
    them and, the socket having taken it all, does not wake the writer: the other 44 entries
    wait, though the window has room, until something else wakes the writer (an ack, a ping,
    another message)."""
    async with running_broker(tmp_path / "data", window=1000) as h:
        bob = await RawClient.connect(h.server, h.token("bob"), "b1")
        await bob.send(wire.Ping(id=1))
        assert isinstance(await bob.reply(1), wire.Pong)  # bob is open and caught up
        committer = h.broker.committer
        committer.enqueue(CreateConv("alice", "d1", "user", "group", "g", False, ("bob",)))
        for i in range(300):
            committer.enqueue(SendMessage("alice", "d1", "user", f"c{i}", f"m{i}", to="bob"))
        got = await _deliveries(bob, 301, timeout=3.0)
        await bob.aclose()
        assert [d.inbox_seq for d in got] == list(range(1, 302)), (
            f"got {len(got)} of 301 deliveries, the last {got[-1].inbox_seq if got else None}")


async def test_default_window_own_sends_in_the_read_do_not_stall_the_rest(tmp_path):
    """The same with the default window (256): the device's own sends in the commit are passed
    over without taking window room, so after one read of 256 entries the window still has
    room, yet the rest waits."""
    async with running_broker(tmp_path / "data") as h:
        bob = await RawClient.connect(h.server, h.token("bob"), "b1")
        await bob.send(wire.Ping(id=1))
        assert isinstance(await bob.reply(1), wire.Pong)
        committer = h.broker.committer
        committer.enqueue(CreateConv("alice", "d1", "user", "group", "g", False, ("bob",)))
        for i in range(100):  # bob's own sends from this device: passed over
            committer.enqueue(SendMessage("bob", "b1", "user", f"b{i}", f"own{i}", to="alice"))
        for i in range(200):
            committer.enqueue(SendMessage("alice", "d1", "user", f"c{i}", f"m{i}", to="bob"))
        got = await _deliveries(bob, 201, timeout=3.0)  # the added entry and alice's 200
        await bob.aclose()
        assert len(got) == 201, (
            f"got {len(got)} of 201 deliveries (window 256, none acked), "
            f"the last {got[-1].inbox_seq if got else None} of head 301")


async def test_a_device_that_sends_while_its_window_is_full_holds_no_growing_memory(tmp_path):
    """DESIGN.md "Delivery": nothing is queued per device in memory beyond its window, so a
    stalled device costs nothing but its window. A device whose window is full of others'
    messages (it does not ack: a backend that only sends, say) but that keeps sending adds
    each of its sends' lsn to `Session.own_lsns`, which only its writer's passing over those
    entries empties, and the writer never gets there while the window is full: one set entry
    per message sent, for as long as the session lives."""
    import sys

    async with running_broker(tmp_path / "data", window=4) as h:
        async with h.client("alice") as alice:
            for i in range(4):
                await alice.send(f"hi{i}", to="bob")
        bob = await RawClient.connect(h.server, h.token("bob"), "b1")
        assert len(await _deliveries(bob, 4, timeout=5.0)) == 4  # window full, never acked
        sends = 3000
        for start in range(0, sends, 500):
            for i in range(start, start + 500):
                await bob.send(wire.Send(id=10 + i, cid=f"b{i}", body="order update", to="alice"))
            results = 0
            with trio.fail_after(20):
                while results < 500:
                    f = await bob.next()
                    if isinstance(f, wire.Result):
                        results += 1
        (session,) = h.broker.hub.sessions("bob")
        held = len(session.own_lsns)
        size = sys.getsizeof(session.own_lsns)
        await bob.aclose()
        assert held <= h.config.window, (
            f"after {sends} sends the stalled session holds {held} lsns ({size} bytes of set "
            f"alone), growing with every send")


async def test_passing_over_many_own_sends_does_not_block_the_event_loop(tmp_path):
    """The writer `continue`s without a checkpoint while a read found only the device's own
    sends (nothing to write), so passing over a long run of them holds trio's one thread: every
    other connection, the committer's fan-out and the idle watch wait meanwhile. Here a device
    whose window was full sent 40,000 messages, then acked: one ack blocked the whole broker
    (456 ms here). Told by what another task sees, not by the clock: a task that runs at each
    turn of the event loop sees the writer part of the way through (it used to see it only
    before and after)."""
    async with running_broker(tmp_path / "data", window=4) as h:
        async with h.client("alice") as alice:
            for i in range(4):
                await alice.send(f"hi{i}", to="bob")
        bob = await RawClient.connect(h.server, h.token("bob"), "b1")
        assert len(await _deliveries(bob, 4, timeout=5.0)) == 4
        committer = h.broker.committer
        for k in range(0, 40_000, 4000):  # bob's own sends (as if sent on this connection)
            last = [committer.enqueue(SendMessage("bob", "b1", "user", f"b{i}", "x", to="alice"))
                    for i in range(k, k + 4000)][-1]
            while last.outcome is None:
                await trio.sleep(0.01)
        [session] = h.broker.hub.sessions("bob")
        await wait_until(lambda: session.head == 40_004)
        assert session.sent == 4
        seen: set[int] = set()

        async def watch():  # runnable at every turn: it runs whenever anything else yields
            while True:
                seen.add(session.sent)
                await trio.lowlevel.checkpoint()

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(watch)
                await bob.send(wire.Ack(upto=4))
                while session.sent != 40_004:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
        await bob.aclose()
        partway = sorted(v for v in seen if 4 < v < 40_004)
        assert len(partway) >= 2, f"the event loop ran only before and after: {sorted(seen)}"


async def test_fresh_messages_of_one_commit_fill_the_window_and_no_more(tmp_path):
    """A caught-up device with a window of 4, and commits of 5, 3, 4, 6 and 20 messages for
    it: each commit's fan-out queues them straight from the commit (the fresh path) while they
    fit the window, and the device is sent 4 (or all, if fewer), then as many more as it acks,
    never more than 4 unacked. The queue's bound and the delivery's bound each hold the window
    alone; no test failed with both off by one, when a commit of 5 sent the device 5."""
    async with running_broker(tmp_path / "data", window=4) as h:
        bob = await RawClient.connect(h.server, h.token("bob"), "b1")
        try:
            (session,) = h.broker.hub.sessions("bob")
            committer, sent = h.broker.committer, 0
            for n in (5, 3, 4, 6, 20):
                pending = [committer.enqueue(SendMessage("alice", "a1", "user", f"c{i}",
                                                         f"hi{i}", to="bob"))
                           for i in range(sent, sent + n)]  # queued at once: one commit
                await wait_until(lambda pending=pending: all(p.outcome is not None
                                                             for p in pending))
                bodies: list[str] = []
                while len(bodies) < n:
                    got = await _deliveries(bob, n, timeout=0.3)
                    assert len(got) == min(4, n - len(bodies)), (n, [d.body for d in got])
                    bodies += [d.body for d in got]
                    await bob.send(wire.Ack(upto=got[-1].inbox_seq))
                assert bodies == [f"hi{i}" for i in range(sent, sent + n)]
                sent += n
                await wait_until(lambda: not session.unacked)  # caught up again
        finally:
            await bob.aclose()
