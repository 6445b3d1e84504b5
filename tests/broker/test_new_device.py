"""A new device that starts at the inbox head, by choice (`hello.start: "head"`, PROTOCOL.md
§5.2, §9): it is sent only what arrives after its start, which is a durable ack of the head
committed before `welcome` names it; a device the broker knows resumes after its last ack, as
ever; the default is still the whole inbox. Real brokers on loopback (in this process and as
child processes killed with SIGKILL), real LMDB, raw protocol sessions, the SDK and the CLI."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing, lines


async def _hello(server: str, token: str, device: str, start: str | None) -> RawClient:
    c = await RawClient.connect(server)
    await c.hello(token, device, start=start)
    return c


async def _send(c: RawClient, n: int, to: str, tag: str) -> None:
    for i in range(n):
        await c.send(wire.Send(id=i + 1, cid=f"{tag}{i}", body=f"{tag} {i}", to=to))
        assert isinstance(await c.reply(i + 1), wire.Result)


async def _deliveries(c: RawClient, upto: int) -> list[int]:
    """The inbox_seqs delivered up to `upto` (acking each), and that nothing follows."""
    seen: list[int] = []
    with trio.fail_after(10):
        while (seen[-1] if seen else c.welcome.acked) < upto:
            f = await c.next()
            assert f is not None and not isinstance(f, wire.Error | wire.Bye), (f, seen)
            if isinstance(f, wire.Deliver):
                seen.append(f.inbox_seq)
                await c.send(wire.Ack(upto=f.inbox_seq))
    with trio.move_on_after(0.2):
        while (f := await c.next()) is not None:
            assert not isinstance(f, wire.Deliver), (f, seen)
    return seen


async def test_a_new_device_starting_at_the_head_gets_only_what_arrives_after(tmp_path):
    """bob has 5 entries; his new device asks to start at the head: its welcome says acked 5
    (durable before the welcome: the store holds the mark), and it is sent 6 and 7 alone."""
    async with running_broker(tmp_path / "data") as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 5, "bob", "old")
        phone = await _hello(h.server, h.token("bob"), "new-phone", "head")
        assert wire.CAP_START_HEAD in phone.welcome.caps
        assert (phone.welcome.acked, phone.welcome.head) == (5, 5)
        assert h.broker.store.delivered("bob", "new-phone") == 5  # durable already
        await _send(alice, 2, "bob", "new")
        assert await _deliveries(phone, 7) == [6, 7]
        # The default, and "first", are the whole inbox, as before.
        for device, start in (("d-default", None), ("d-first", "first")):
            c = await _hello(h.server, h.token("bob"), device, start)
            assert c.welcome.acked == 0
            assert await _deliveries(c, 7) == [1, 2, 3, 4, 5, 6, 7]
            await c.aclose()
        await phone.aclose()
        await alice.aclose()


async def test_a_device_the_broker_knows_ignores_start(tmp_path):
    """A device with a mark resumes after its last ack whatever its hello's start says."""
    async with running_broker(tmp_path / "data") as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 3, "bob", "m")
        laptop = await _hello(h.server, h.token("bob"), "laptop", None)
        for _ in range(3):
            assert isinstance(await laptop.next(), wire.Deliver)
        await laptop.send(wire.Ack(upto=2, id=9))
        assert isinstance(await laptop.reply(9), wire.Ok)
        await laptop.aclose()
        await _send(alice, 2, "bob", "n")
        laptop = await _hello(h.server, h.token("bob"), "laptop", "head")
        assert (laptop.welcome.acked, laptop.welcome.head) == (2, 5)
        assert await _deliveries(laptop, 5) == [3, 4, 5]
        await laptop.aclose()
        await alice.aclose()


async def test_the_entries_passed_over_count_as_delivered_as_an_ack_makes_them(tmp_path):
    """The start is the device's ack of the head: where no device of bob had acked, his
    delivered mark moves, and alice is pushed the receipt, as for any ack."""
    async with running_broker(tmp_path / "data") as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 2, "bob", "m")
        phone = await _hello(h.server, h.token("bob"), "phone", "head")
        with trio.fail_after(5):
            while not isinstance(f := await alice.next(), wire.Receipt):
                pass
        assert (f.conv, f.user, f.delivered, f.read) == ("dm:alice:bob", "bob", 2, None)
        await alice.send(wire.Receipts(id=50, conv="dm:alice:bob", seq=2))
        listed = await alice.reply(50)
        assert listed.delivered == ("bob",) and listed.read == ()
        await phone.aclose()
        await alice.aclose()


async def test_an_empty_inbox_makes_no_start_and_new_entries_come_from_one(tmp_path):
    """On an empty inbox the head is 0: nothing to skip, no event; the device gets entry 1."""
    async with running_broker(tmp_path / "data") as h:
        c = await _hello(h.server, h.token("bob"), "tab", "head")
        assert (c.welcome.acked, c.welcome.head) == (0, 0)
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 1, "bob", "m")
        assert await _deliveries(c, 1) == [1]
        await c.aclose()
        await alice.aclose()


async def test_entries_arriving_during_the_start_are_not_lost(tmp_path):
    """alice sends without pause while 12 new devices of bob start at the head: each device
    is sent every entry after its welcome's `acked`, gapless, up to the last; its durable mark
    is at least that `acked`."""
    async with running_broker(tmp_path / "data") as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 20, "bob", "pre")
        devices: list[tuple[str, RawClient]] = []
        async with trio.open_nursery() as n:
            n.start_soon(_send, alice, 150, "bob", "during")

            async def join(i: int) -> None:
                await trio.sleep(i * 0.01)
                devices.append((f"n{i}", await _hello(h.server, h.token("bob"), f"n{i}", "head")))
            for i in range(12):
                n.start_soon(join, i)
        starts = sorted(d.welcome.acked for _, d in devices)
        assert starts[0] >= 20 and starts[-1] <= 170
        for name, d in devices:
            assert h.broker.store.delivered("bob", name) >= d.welcome.acked
            got = await _deliveries(d, 170)
            assert got == list(range(d.welcome.acked + 1, 171)), (d.welcome, got[:5])
            await d.aclose()
        await alice.aclose()


async def test_a_bad_start_is_refused_invalid_and_the_broker_serves_on(tmp_path):
    async with running_broker(tmp_path / "data") as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
        body = msgpack.packb({"t": "hello", "versions": [1], "token": h.token("bob"),
                              "device": "x", "start": "middle"}, use_bin_type=True)
        await stream.send_all(struct.pack(">I", len(body)) + body)
        c = RawClient(stream)
        err = await c.next()
        assert isinstance(err, wire.Error) and err.name == "invalid" and err.close, err
        assert "start" in err.message
        await c.aclose()
        ok = await _hello(h.server, h.token("bob"), "x", "head")
        assert ok.welcome.acked == 0
        await ok.aclose()


async def test_the_sdk_and_a_reconnect(tmp_path):
    """`open_client(start="head")`: only what arrives after; after the broker restarts, the
    client resumes from its cursor (nothing skipped, nothing again)."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("alice", "a1") as alice:
            for i in range(4):
                await alice.send(f"old {i}", to="bob")
            async with h.client("bob", "fresh", start="head") as bob:
                assert (bob.welcome.acked, bob.welcome.head) == (4, 4)
                await alice.send("new", to="bob")
                d = await bob.deliveries().receive()
                assert (d.inbox_seq, d.body) == (5, "new")
                await bob.ack(d, durable=True)
            async with h.client("bob", "other", start="first") as other:
                assert (await other.deliveries().receive()).inbox_seq == 1
            with pytest.raises(ClientError) as refused:
                async with h.client("bob", "typo", start="last"):
                    pass
            assert refused.value.name == "invalid" and "start" in refused.value.message


def test_the_sdk_asks_for_its_start_in_its_first_hello_only(tmp_path):
    """A new device at the head of an empty inbox has no mark; two entries come, not acked,
    and the broker is killed and restarted: the client's reconnect resumes from its cursor
    (welcome.acked 0, both entries its own to ack), it does not start the device again at the
    head, which would ack them on its behalf unseen by the caller."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()

    async def run() -> None:
        async with bp.client("bob", "fresh", start="head", reconnect_timeout=20) as bob:
            assert (bob.welcome.acked, bob.welcome.head) == (0, 0)
            async with bp.client("alice", "a1") as alice:
                await alice.send("one", to="bob")
                await alice.send("two", to="bob")
            bp.kill()
            await bp.astart()
            with trio.fail_after(20):
                while bob.reconnects == 0:
                    await trio.sleep(0.05)
            assert (bob.welcome.acked, bob.welcome.head) == (0, 2)
            got = [await bob.deliveries().receive() for _ in range(2)]
            assert [d.body for d in got] == ["one", "two"]
            await bob.ack(got[-1], durable=True)

    try:
        trio.run(run)
    finally:
        bp.kill()
    store = bp.open_store(readonly=True)
    try:
        assert store.delivered("bob", "fresh") == 2
    finally:
        store.close()


def test_a_sigkill_right_after_the_welcome_keeps_the_start(tmp_path):
    """The start is durable before the welcome names it: a SIGKILL of the broker right after
    it leaves the device's cursor there, the restarted broker resumes it after its start
    (its hello's start no longer matters), and `audit rebuild --check` finds the projections
    equal to a replay of the log."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        alice = as_user(bp, "alice")
        for i in range(6):
            homing("send", "--to", "bob", "--cid", f"c{i}", f"old {i}", env=alice)

        async def hello_then_kill() -> int:
            c = await _hello(bp.server, bp.token("bob"), "tv", "head")
            bp.kill()
            await c.aclose()
            return c.welcome.acked

        assert trio.run(hello_then_kill) == 6
        bp.start()
        homing("send", "--to", "bob", "--cid", "c-new", "new", env=alice)
        for start in ("first", "head"):
            got = lines(homing("listen", "--device", "tv", "--start", start, "--no-ack",
                               "--count", "1", "--timeout", "5", env=as_user(bp, "bob")))
            assert [(d["inbox_seq"], d["body"]) for d in got] == [(7, "new")]
        # The CLI's own new device, at the head: nothing until something new comes.
        assert lines(homing("listen", "--device", "debug-2", "--start", "head", "--timeout",
                            "0.5", env=as_user(bp, "bob"))) == []
        assert bp.terminate() == 0
        check = homing("audit", "rebuild", "--check", "--data", str(bp.data), check=False)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        if bp.alive():
            bp.kill()
