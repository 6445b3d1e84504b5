"""Review of the live side: presence, typing, receipts, queries, the hub and the stats line."""

from __future__ import annotations

import socket

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from broker.committer import Committer
from broker.session import FLUSH_ON_CLOSE_S
from storage.commands import Ack, SendMessage
from storage.store import Store
from tests.faults.conftest import RawClient
from tests.harness import running_broker


async def test_a_channel_subscriber_is_not_told_who_else_is_online(harness):
    """`presence` of a channel lists its online subscribers, which a subscriber may not learn
    (`members` and `receipts` refuse it for that reason, PROTOCOL.md §5.2): only its owners,
    admins, services and admin tokens may ask. In a group any member may."""
    async with harness.client("hq", role="service") as hq, \
            harness.client("store-1") as s1, harness.client("store-2") as s2, \
            harness.client("ops", role="admin") as ops:
        chn = await hq.create_channel("notices", ["store-1", "store-2"])
        everyone = {"hq", "store-1", "store-2"}
        assert set(await hq.presence(chn)) == everyone
        assert set(await ops.presence(chn)) == everyone
        for subscriber in (s1, s2):
            with pytest.raises(ClientError) as refused:
                await subscriber.presence(chn)
            assert refused.value.name == "forbidden" and "channel" in refused.value.message
        grp = await hq.create_group("team", ["store-1", "store-2"])
        assert set(await s1.presence(grp)) == everyone


async def test_the_stats_queued_count_counts_a_waiting_ack_once(tmp_path):
    """`broker_stats.queued` is "commands waiting for a commit": a device's queued ack is one
    of them, however many acks merged into it. It was counted twice (it is in the queue, and
    in the index of acks open to merging)."""
    store = Store.open(str(tmp_path / "data"))
    try:
        committer = Committer(store)
        assert committer.queued == 0
        committer.ack_nowait(Ack("bob", "phone", "user", 1, ()))
        assert committer.queued == 1
        committer.ack_nowait(Ack("bob", "phone", "user", 2, ()))  # merges into the first
        assert committer.queued == 1
        committer.enqueue(SendMessage("alice", "d1", "user", "c1", "hi", to="bob"))
        committer.ack_nowait(Ack("bob", "tablet", "user", 1, ()))
        assert committer.queued == 3
    finally:
        store.close()


async def test_a_replaced_session_that_does_not_read_is_ended_all_the_same(tmp_path):
    """A device that reconnects replaces its old session, which is told `bye` and closed. The
    old connection is often a dead one whose socket takes nothing more (a phone that changed
    networks): its writer then waits on the socket for ever, its reader for bytes that never
    come, and, out of the hub, the idle watch no longer looks at it. It must end as every
    other session told to (`Session._end`): stop reading, FLUSH_ON_CLOSE_S for the bye, done.
    It stayed with its queues and socket until the peer read or TCP gave up."""
    async with running_broker(tmp_path / "data", heartbeat_s=1, idle_timeout_s=3.0) as h:
        async with h.client("alice") as alice:
            stuck = await RawClient.connect(h.server, h.token("bob"), "phone")
            stuck.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            (old,) = h.broker.hub.sessions("bob")
            body = "x" * 60_000
            for _ in range(100):  # 6 MB: more than the socket buffers take
                await alice.send(body, to="bob")
                await stuck.send(wire.Ping())  # alive until replaced, whatever the time
            with trio.fail_after(20):
                blocked_since = None
                while blocked_since is None or trio.current_time() - blocked_since < 0.5:
                    await trio.sleep(0.05)  # its writer waits on the full socket for 0.5 s
                    await stuck.send(wire.Ping())
                    if not old._writing:
                        blocked_since = None
                    elif blocked_since is None:
                        blocked_since = trio.current_time()
            new = await RawClient.connect(h.server, h.token("bob"), "phone")
            assert old not in h.broker.hub.sessions("bob")
            try:
                with trio.fail_after(3.0 + FLUSH_ON_CLOSE_S + 1):  # idle timeout, flush
                    while old._fd is not None:  # set to None as its connection is closed
                        await trio.sleep(0.05)
            finally:
                await stuck.aclose()
                await new.aclose()
