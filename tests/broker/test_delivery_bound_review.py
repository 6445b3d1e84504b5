"""Review of the byte-bounded delivery path (2026-12-06): a device gets every inbox entry of its
user, in inbox order, gapless, none twice, its own sends passed over, whatever mix of bodies
(0 bytes, 1, multi-byte text, bin, 256 KiB + 1, the broker's largest) and membership entries
cuts its writes, for windows of 1, 256 and 100,000.

Each case runs a real broker in this process on a loopback port over real LMDB in a temporary
directory; the device is a raw wire client on a small receive buffer that reads in bursts, so
the broker's writes are partial and its fresh queue and store reads take turns. Every delivery
sequence is checked against the user's inbox as the store holds it."""

from __future__ import annotations

import random
import socket

import pytest
import trio

import protocol as wire
from broker.session import DELIVER_BYTES
from storage.commands import CreateConv, Remove, SendMessage, SetMute
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until

MAX_BODY = 300 << 10
BODIES = ["", "a", "b" * 300, "é" * 30_000, "\U0001f600" * 20_000, b"\x00" * 70_000,
          "c" * (DELIVER_BYTES + 1), "d" * MAX_BODY]


def _wire_bytes(body: str | bytes) -> int:
    return len(body.encode() if isinstance(body, str) else body)


def _check_fresh(session) -> None:
    """The fresh queue's byte count is its bodies' bytes on the wire, and bounded."""
    fresh = session._fresh
    assert session._fresh_bytes == sum(_wire_bytes(f.body) for f in fresh)
    assert session._fresh_bytes < DELIVER_BYTES + MAX_BODY
    assert session.out_bytes >= 0


@pytest.mark.parametrize("window", [1, 256, 100_000])
async def test_every_entry_once_in_order_through_byte_cut_writes(tmp_path, window):
    """Bob posts a random mix of bodies to alice directly and in groups (some muted), adds and
    removes her, while her phone sends its own and reads in bursts, acking as its window
    fills: the phone's deliveries are exactly her inbox minus its own sends, in order, each
    once, with their bodies."""
    rng = random.Random(window)
    async with running_broker(tmp_path / "data", window=window, max_body_bytes=MAX_BODY,
                              max_frame_bytes=1 << 20) as h:
        with trio.fail_after(90):
            groups = []
            for g in range(3):
                made = await h.broker.committer.submit(CreateConv(
                    "bob", "d", "user", "group", name=f"g{g}", members=("alice",)))
                groups.append(made.effects.conv)
            await h.broker.committer.submit(SetMute("alice", "d", "user", groups[1], True))
            phone, session = await _small_buffered(h, "alice", "phone")
            n_commands, own_ids = 160, []
            sending = trio.Lock()

            async def say(frame) -> None:  # two tasks write to the phone's socket
                async with sending:
                    await phone.send(frame)
            got: list[wire.Deliver] = []

            async def bob() -> None:
                for i in range(n_commands):
                    roll = rng.random()
                    if roll < 0.05:
                        h.broker.committer.enqueue(Remove("bob", "d", "user", groups[2], "alice"))
                        h.broker.committer.enqueue(SendMessage(
                            "bob", "d", "user", f"r{i}", "after removal", conv=groups[2]))
                        groups[2] = (await h.broker.committer.submit(CreateConv(
                            "bob", "d", "user", "group", name=f"g2.{i}",
                            members=("alice",)))).effects.conv
                    else:
                        conv = rng.choice([None, *groups])
                        body = rng.choice(BODIES)
                        send = SendMessage("bob", "d", "user", f"b{i}", body, conv=conv,
                                           to="alice" if conv is None else None)
                        if rng.random() < 0.5:  # a commit of its own: the fresh path's
                            await h.broker.committer.submit(send)
                        else:  # joins the next batch: the store's
                            h.broker.committer.enqueue(send)
                    _check_fresh(session)
                    if rng.random() < 0.3:
                        await trio.sleep(0)

            async def own_sends() -> None:
                for i in range(40):
                    own_ids.append(1000 + i)
                    await say(wire.Send(id=1000 + i, cid=f"own{i}",
                                        body=rng.choice(BODIES[:4]), to="bob"))
                    await trio.sleep(0)

            replies: set[int] = set()

            async def read() -> None:
                unacked = 0
                while not (got and got[-1].cid == "end" and len(replies) == 40):
                    f = await phone.next()
                    assert f is not None and not isinstance(f, wire.Error), (
                        f"closed as {session.reason}: {f}")
                    _check_fresh(session)
                    if isinstance(f, wire.Deliver):
                        got.append(f)
                        unacked += 1
                        if unacked >= window or rng.random() < 0.2:
                            await say(wire.Ack(upto=f.inbox_seq))
                            unacked = 0
                    elif getattr(f, "id", None) in own_ids:
                        replies.add(f.id)
                    if rng.random() < 0.05:
                        await trio.sleep(0.001)  # a reader that pauses: its socket fills

            def want() -> list:
                inbox = h.broker.store.inbox_after("alice", 0, 100_000)
                return [it for it in inbox if not (it.sender == "alice" and it.device == "phone")]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                async with trio.open_nursery() as producers:
                    producers.start_soon(bob)
                    producers.start_soon(own_sends)
                # The last entry, after everything queued before it (submission order).
                await h.broker.committer.submit(SendMessage("bob", "d", "user", "end", "end",
                                                            to="alice"))
            await phone.send(wire.Ack(upto=got[-1].inbox_seq))
            expected = want()
            assert [f.inbox_seq for f in got] == [it.inbox_seq for it in expected]
            assert [(f.kind, f.conv, f.seq, f.body, f.muted) for f in got] == [
                (it.kind, it.conv, it.seq if it.kind == "msg" else 0, it.body, it.muted)
                for it in expected]
            await wait_until(lambda: session.acked == h.broker.store.inbox_head("alice"))
            await phone.aclose()


async def test_fresh_messages_of_multibyte_text_queue_at_most_the_bound(tmp_path):
    """A device that stopped reading is sent messages of 120 KB of two-byte letters, one commit
    each: the fresh ones queued for it while its writer is blocked hold 256 KiB plus at most one
    message of them. Counted in characters (60,000 a message), five were queued, 600 KB
    (until 2026-12-06). Once it reads again, it gets them all, in order."""
    body, n = "é" * 60_000, 8
    async with running_broker(tmp_path / "data", max_body_bytes=128 << 10,
                              max_frame_bytes=1 << 20) as h:
        with trio.fail_after(60):
            till, session = await _small_buffered(h, "bob", "till")
            held = []
            for i in range(n):
                await h.broker.committer.submit(SendMessage("alice", "a", "user", f"c{i}", body,
                                                            to="bob"))
                await wait_until(lambda i=i: session.head == i + 1)
                held.append(sum(_wire_bytes(f.body) for f in session._fresh))
            assert max(held) < DELIVER_BYTES + len(body.encode()), held
            got = []
            while len(got) < n:
                f = await till.next()
                assert isinstance(f, wire.Deliver), f
                assert f.body == body
                got.append(f.inbox_seq)
            assert got == list(range(1, n + 1))
            await till.aclose()


async def _small_buffered(h, user: str, device: str):
    """A raw client of `user`'s `device` whose socket takes little at a time (4 KiB of receive
    buffer, 64 KiB of the broker's send buffer), so that the broker's writes to it stop short;
    and its session in the broker."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = h.server.rsplit(":", 1)
    await sock.connect((host, int(port)))
    client = RawClient(trio.SocketStream(sock))
    await client.hello(h.token(user), device, 1 << 20)
    session = next(iter(h.broker.hub.sessions(user)))
    session.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    return client, session
