"""The network between a service and the broker misbehaving (tests/netproxy.py between an SDK
client and a real broker): a path that drops everything without a FIN or RST, one that stalls
one way, a connection cut mid-frame or reset, a link that trickles. What PROTOCOL.md §8-9 and
CLIENT.md "What survives a drop" promise must hold through each: every message to every device,
in order, at least once, resumed after the last ack; a send retried with its cid appended once;
everyone else served meanwhile; nothing held for a dead peer without bound.

The broker's heartbeat is 1 s (its least) and its idle timeout 3 heartbeats (the default
ratio), so a dead link is noticed by either side within seconds."""

from __future__ import annotations

import os
import random
from contextlib import asynccontextmanager

import pytest
import trio

from broker.client import open_client
from tests.faults.conftest import scaled
from tests.harness import running_broker
from tests.netproxy import open_fault_proxy
from tests.waits import wait_until

HEARTBEAT_S = 1


@asynccontextmanager
async def alice_behind_proxy(tmp_path, **overrides):
    """A broker (heartbeat HEARTBEAT_S), a fault proxy in front of it, and alice's phone
    connected through the proxy, reconnecting for as long as it takes."""
    async with running_broker(tmp_path / "data", heartbeat_s=HEARTBEAT_S, **overrides) as h, \
            open_fault_proxy(h.server) as proxy, \
            open_client(proxy.address, h.token("alice"), "phone",
                        reconnect_timeout=None) as alice:
        yield h, proxy, alice


def _closed(h, user: str, reason: str | None) -> int:
    """Sessions of `user` the broker ended with `reason` (None: whatever the reason)."""
    return sum(1 for e in h.logs if e.get("event") == "connection_closed"
               and e.get("user") == user and reason in (None, e.get("reason")))


async def _history(client, conv: str) -> list:
    """Every message of `conv`, oldest first."""
    messages: list = []
    while True:
        after = messages[-1].seq if messages else None
        page = await client.history(conv, after=after, limit=200, order="oldest")
        messages += page.messages
        if not page.more:
            return messages


def _assert_once_each(messages, cids) -> None:
    """Each cid in the conversation exactly once (none missing, none appended twice)."""
    seen = [m.cid for m in messages if m.cid in cids]
    assert sorted(seen) == sorted(cids), (len(seen), len(cids))


async def _send_all(client, to: str, cids: list[str], results: dict) -> None:
    async def one(cid: str) -> None:
        results[cid] = await client.send(f"body {cid}", to=to, cid=cid)

    async with trio.open_nursery() as nursery:
        for cid in cids:
            nursery.start_soon(one, cid)


async def _take(client, n: int, into: list, durable: bool = False) -> None:
    """Take deliveries until `into` holds `n`, acking each."""
    async for d in client.deliveries():
        into.append(d)
        await client.ack(d, durable=durable)
        if len(into) >= n:
            return


@pytest.mark.parametrize("broker_first", [True, False],
                         ids=["broker-times-out-first", "held-bytes-reach-the-old-session"])
async def test_a_blackholed_link_is_noticed_and_the_sends_in_flight_land_once(tmp_path,
                                                                               broker_first):
    """Both directions held, nothing closed: the SDK notices by its heartbeat and tries again
    (through the proxy, held too); the broker times out the silent session and frees it; bob
    and carol go on meanwhile. Once the path forwards again the SDK reconnects and resends the
    sends in flight with their cids: each is in the conversation once. With a long idle
    timeout the held bytes (those sends) reach the old session as the new one replaces it."""
    idle = 3 * HEARTBEAT_S if broker_first else 60
    async with alice_behind_proxy(tmp_path, idle_timeout_s=idle) as (h, proxy, alice), \
            h.client("bob") as bob, h.client("carol") as carol, \
            h.client("root", "ops", role="admin", deliver=False) as admin:
        with trio.fail_after(60):
            await alice.send("before", to="bob", cid="c-000")
            proxy.stall("both")
            cids = [f"c-{i:03}" for i in range(1, 41)]
            results: dict = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_all, alice, "bob", cids, results)
                stalled_at = trio.current_time()
                await wait_until(lambda: proxy.accepted >= 2)  # the SDK gave up that link
                noticed_s = trio.current_time() - stalled_at
                if broker_first:
                    await wait_until(lambda: _closed(h, "alice", "timeout") == 1)
                    # freed: alice's held second attempt is not past its hello; bob, carol
                    # and the admin remain
                    assert (await admin.stats()).connections == 3
                # the others are served meanwhile
                await bob.send("meanwhile", to="carol")
                got: list = []
                await _take(carol, 1, got)
                assert got[0].body == "meanwhile"
                proxy.resume()
            assert len(results) == len(cids)
            assert alice.reconnects >= 1
            messages = await _history(bob, "dm:alice:bob")
            _assert_once_each(messages, ["c-000", *cids])
            assert sum(r.dup for r in results.values()) <= len(cids)
        print(f"blackhole noticed by the SDK after {noticed_s:.2f} s")


async def test_a_link_stalled_broker_to_client_is_left_and_its_session_freed(tmp_path):
    """Only the broker's bytes are held (the client's pings reach the broker, no pong comes
    back): the SDK drops the link by its heartbeat and connects again; the broker ends the old
    session (its socket full: the end of the stream reached it) while the stall lasts, and
    holds one session of alice at a time, whatever bob sends her; once it ends alice gets
    every message, in order, once."""
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob, \
            h.client("root", "ops", role="admin", deliver=False) as admin:
        with trio.fail_after(60):
            await bob.send("m0", to="alice")
            got: list = []
            await _take(alice, 1, got)
            proxy.stall("down")
            sent = 1
            while proxy.accepted < 2 or _closed(h, "alice", None) < 1:
                await bob.send(f"m{sent}" + "x" * 4000, to="alice")
                sent += 1
                assert (await admin.stats()).connections <= 3  # alice, bob, the admin
                await trio.sleep(0.02)
            proxy.resume()
            await _take(alice, sent, got)
            assert [d.inbox_seq for d in got] == list(range(1, sent + 1))
            assert [d.body.rstrip("x") for d in got] == [f"m{i}" for i in range(sent)]


async def test_a_link_stalled_client_to_broker_is_timed_out_by_the_broker(tmp_path):
    """Only the client's bytes are held while bob keeps sending to alice: her deliveries
    still arrive, so her heartbeat sees a live link; the broker, which hears nothing from her
    (no ack, no ping, her sends), ends the session after its idle timeout and tells her, and
    she connects again. Once the stall ends her sends are each in the conversation once and
    her deliveries all arrived, in order."""
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob:
        with trio.fail_after(60):
            await alice.send("hello", to="bob", cid="a-000")
            proxy.stall("up")
            cids = [f"a-{i:03}" for i in range(1, 11)]
            results: dict = {}
            got: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_all, alice, "bob", cids, results)
                nursery.start_soon(_take, alice, 1000, got)
                sent = 0
                while _closed(h, "alice", "timeout") < 1:
                    await bob.send(f"b{sent}", to="alice")
                    sent += 1
                    await trio.sleep(0.05)
                await wait_until(lambda: proxy.accepted >= 2)  # told: she connects again
                proxy.resume()
                await wait_until(lambda: len(results) == len(cids))
                await wait_until(lambda: len(got) == sent)
                nursery.cancel_scope.cancel()
            assert [d.body for d in got] == [f"b{i}" for i in range(sent)]
            _assert_once_each(await _history(bob, "dm:alice:bob"), ["a-000", *cids])


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("after", [1, 6, 57, 700])
async def test_deliveries_cut_mid_frame_come_again_in_order(tmp_path, after, reset):
    """The link is cut `after` bytes into the deliveries of 30 messages (mid-frame for most
    values): the SDK reconnects, the broker resumes after the last ack, and alice is handed
    each delivery once, in inbox order, none skipped."""
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob:
        with trio.fail_after(30):
            await alice.ping()
            proxy.cut_after(after, "down", reset=reset)
            for i in range(30):
                await bob.send(f"m{i}", to="alice")
            got: list = []
            await _take(alice, 30, got)
            assert [d.inbox_seq for d in got] == list(range(1, 31))
            assert [d.body for d in got] == [f"m{i}" for i in range(30)]
            assert alice.reconnects >= 1


@pytest.mark.parametrize("durable", [False, True], ids=["ack", "durable-ack"])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("after", [1, 9, 60, 400])
async def test_sends_and_acks_cut_mid_frame_land_once(tmp_path, after, reset, durable):
    """The link is cut `after` bytes into what alice writes (her sends with their cids and
    her acks, plain or durable, mid-frame for most values): every send returns, each once in
    the conversation; the broker's ack of her device reaches the last delivery, and nothing
    was skipped."""
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob, \
            h.client("root", "ops", role="admin", deliver=False) as admin:
        with trio.fail_after(30):
            for i in range(20):
                await bob.send(f"m{i}", to="alice")
            await alice.ping()
            proxy.cut_after(after, "up", reset=reset)
            cids = [f"c-{i:03}" for i in range(20)]
            results: dict = {}
            got: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_all, alice, "bob", cids, results)
                await _take(alice, 20, got, durable)
            assert [d.inbox_seq for d in got] == list(range(1, 21))
            _assert_once_each(await _history(bob, "dm:alice:bob"), cids)
            await wait_until_acked(admin, "alice", "phone", 20)
            assert proxy.accepted >= 2


async def wait_until_acked(admin, user: str, device: str, upto: int) -> None:
    with trio.fail_after(30):
        while (await admin.stats(user, device)).acked < upto:
            await trio.sleep(0.02)


async def test_a_trickling_link_carries_everything(tmp_path):
    """A link that forwards 50 bytes per 10 ms each way (a frame takes many reads on both
    sides): sends, deliveries and acks all go through, and nothing is timed out."""
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob:
        with trio.fail_after(30):
            await alice.ping()
            proxy.trickle(50, 0.01)
            cids = [f"t-{i:03}" for i in range(10)]
            results: dict = {}
            got: list = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_all, alice, "bob", cids, results)
                for i in range(10):
                    await bob.send(f"m{i}" + "y" * 300, to="alice")
                await _take(alice, 10, got)
            # her own sends take inbox entries too, and are not delivered to the device
            assert [d.body.rstrip("y") for d in got] == [f"m{i}" for i in range(10)]
            assert [d.inbox_seq for d in got] == sorted({d.inbox_seq for d in got})
            _assert_once_each(await _history(bob, "dm:alice:bob"), cids)
            assert alice.reconnects == 0 and proxy.accepted == 1


async def test_a_big_send_over_a_slow_live_link_goes_through(tmp_path, monkeypatch):
    """A link slower than SLOWEST_LINK_BPS that keeps taking bytes (a trickling uplink): a
    frame bigger than the socket buffers took longer than WRITE_STALL_S plus its time at
    SLOWEST_LINK_BPS, so the SDK dropped the connection mid-frame, reconnected and wrote it
    again, to be dropped again, for ever: the send never returned. A write is given up now
    only when a piece of it is not taken in time (no progress). (WRITE_STALL_S is shortened
    from 10 s here, and the link is about 200 KB/s.)"""
    from broker import client_stream

    monkeypatch.setattr(client_stream, "WRITE_STALL_S", 1.0)
    # The broker's idle timeout (the next test) kept out of it: long enough for the frame.
    async with alice_behind_proxy(tmp_path, idle_timeout_s=30,
                                  max_body_bytes=1_000_000) as (_h, proxy, alice):
        with trio.fail_after(30):
            await _send_big_over_a_trickle(alice, proxy, "big-1")


async def test_a_big_send_slower_than_the_idle_timeout_is_not_cut_by_the_broker(tmp_path):
    """The broker's side of the test above: a frame still arriving over a live link whose
    upload takes longer than the broker's idle timeout (here 2 s, the frame about 4.5 s at
    about 200 KB/s; the client's pings wait behind it). The broker counted whole frames only,
    so it timed the session out mid-frame, and the SDK reconnected and wrote it again, to be
    timed out again, for ever (6 connections in 20 s, none took it). Each 64 KiB of a frame
    arriving counts now, as the SDK counts each 64 KiB piece it writes."""
    async with alice_behind_proxy(tmp_path, idle_timeout_s=2,
                                  max_body_bytes=1_000_000) as (h, proxy, alice):
        with trio.fail_after(60):
            await _send_big_over_a_trickle(alice, proxy, "big-2")
            assert _closed(h, "alice", "timeout") == 0


async def _send_big_over_a_trickle(alice, proxy, cid: str) -> None:
    """A 900 KB send over a link of about 200 KB/s: answered, on the first connection."""
    await alice.ping()
    proxy.trickle(4096, 0.02)
    result = await alice.send("z" * 900_000, to="bob", cid=cid)
    assert not result.dup
    assert alice.reconnects == 0 and proxy.accepted == 1


FAULTS = ("cut_up", "cut_down", "reset", "blackhole", "trickle", "none")


@pytest.mark.long
async def test_random_faults_keep_every_message_once_and_in_order(tmp_path):
    """HOMING_LONG_SCALE x 40 rounds, each a random fault (a cut mid-frame either way, FIN or
    RST; a reset; a blackhole until the SDK leaves it; a trickle) while alice sends with cids
    and bob sends to her: at the end each of her sends returned and is in the conversation
    once, she was handed each of bob's messages once, in order, and her device's ack reached
    the last of them."""
    seed = int(os.environ.get("HOMING_NETFAULTS_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    print(f"HOMING_NETFAULTS_SEED={seed}")
    async with alice_behind_proxy(tmp_path) as (h, proxy, alice), \
            h.client("bob") as bob, \
            h.client("root", "ops", role="admin", deliver=False) as admin:
        cids: list[str] = []
        results: dict = {}
        got: list = []
        sent = 0

        async def one(cid: str) -> None:
            results[cid] = await alice.send(f"body {cid}", to="bob", cid=cid)

        with trio.fail_after(scaled(40) * 10 + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_take, alice, 1 << 30, got)
                for round_ in range(scaled(40)):
                    fault = rng.choice(FAULTS)
                    accepted = proxy.accepted
                    if fault in ("cut_up", "cut_down"):
                        proxy.cut_after(rng.randint(1, 3000), fault[4:],
                                        reset=rng.random() < 0.5)
                    elif fault == "blackhole":
                        proxy.stall("both")
                    elif fault == "trickle":
                        proxy.trickle(rng.choice((7, 50, 400)), 0.005)
                    for i in range(5):
                        cid = f"r{round_:03}-{i}"
                        cids.append(cid)
                        nursery.start_soon(one, cid)
                        await bob.send(f"b{sent}", to="alice")
                        sent += 1
                    if fault == "reset":
                        proxy.reset()
                    elif fault == "blackhole":
                        await wait_until(lambda a=accepted: proxy.accepted > a)  # noticed
                        proxy.resume()
                    await wait_until(lambda: len(results) == len(cids))
                    proxy.trickle(None)
                await wait_until(lambda: len(got) == sent)
                nursery.cancel_scope.cancel()
            assert [d.body for d in got] == [f"b{i}" for i in range(sent)]
            assert [d.inbox_seq for d in got] == sorted({d.inbox_seq for d in got})
            _assert_once_each(await _history(bob, "dm:alice:bob"), cids)
            await wait_until_acked(admin, "alice", "phone", got[-1].inbox_seq)


async def test_a_big_delivery_over_a_slow_live_link_is_taken(tmp_path):
    """A delivery that takes longer than three heartbeats to arrive over a live link (bytes
    keep coming): the SDK took the link for dead, as it counted only whole frames as a sign of
    life, dropped it mid-frame and was sent the same delivery again, to drop it again, for
    ever. Any bytes from the broker count now. (About 200 KB/s here and a heartbeat of 1 s: a
    900 KB delivery takes some 4 s.)"""
    async with alice_behind_proxy(tmp_path, idle_timeout_s=30,
                                  max_body_bytes=1_000_000) as (h, proxy, alice), \
            h.client("bob") as bob:
        with trio.fail_after(30):
            await alice.ping()
            proxy.trickle(4096, 0.02)
            await bob.send("z" * 900_000, to="alice")
            got: list = []
            await _take(alice, 1, got)
            assert len(got[0].body) == 900_000
            assert alice.reconnects == 0 and proxy.accepted == 1


async def test_a_connection_a_nat_box_forgot_is_replaced_at_once_and_freed(tmp_path):
    """The path forgets alice's connection (its bytes held both ways for good, no FIN, no
    RST) but new connections go through, and the broker's idle timeout is long: the SDK
    leaves the dead link by its heartbeat and its new session replaces the old one at once
    (its bye written to a socket that takes nothing); the sends in flight are resent and
    answered on the new one, each once; the broker frees the old session (`replaced`) while
    its link is still dead, and holds one session of alice."""
    async with alice_behind_proxy(tmp_path, idle_timeout_s=600) as (h, proxy, alice), \
            h.client("bob") as bob, \
            h.client("root", "ops", role="admin", deliver=False) as admin:
        with trio.fail_after(30):
            await alice.send("before", to="bob", cid="n-000")
            for i in range(200):  # her deliveries fill the dead link's buffers meanwhile
                await bob.send(f"b{i}" + "q" * 2000, to="alice")
            proxy.stall("both", new=False)
            cids = [f"n-{i:03}" for i in range(1, 21)]
            results: dict = {}
            await _send_all(alice, "bob", cids, results)
            assert alice.reconnects == 1
            _assert_once_each(await _history(bob, "dm:alice:bob"), ["n-000", *cids])
            await wait_until(lambda: _closed(h, "alice", "replaced") == 1)
            assert (await admin.stats()).connections == 3  # alice's new one, bob, the admin
            assert len(proxy.open) == 2  # alice's new one, and the dead one the path holds
            got: list = []
            await _take(alice, 200, got)
            assert [d.body.rstrip("q") for d in got] == [f"b{i}" for i in range(200)]
