"""One user, several devices (review): each device gets every inbox entry, in order, from where
it left off; acks are per device; the same device connecting twice; own sends; the per-user
connection limit; device ids. Real brokers on loopback, real LMDB, raw protocol sessions."""

from __future__ import annotations

import random
import socket

import trio

import protocol as wire
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess
from tests.waits import wait_until

N_MESSAGES = 200


async def _send_all(c: RawClient, n: int, to: str) -> None:
    """Send `n` messages to `to`, one at a time, each answered."""
    for i in range(n):
        await c.send(wire.Send(id=i + 1, cid=f"m{i}", body=f"msg {i}", to=to))
        assert isinstance(await c.reply(i + 1), wire.Result)


async def _drain(c: RawClient, head: int, ack_each: bool = True) -> list[wire.Deliver]:
    """Read deliveries until the one at `head`, acking each (after the session's `acked`)."""
    out: list[wire.Deliver] = []
    if c.welcome.acked >= head:
        return out
    while True:
        f = await c.next()
        assert f is not None, "connection closed before the inbox head"
        if isinstance(f, wire.Deliver):
            out.append(f)
            if ack_each:
                await c.send(wire.Ack(upto=f.inbox_seq))
            if f.inbox_seq >= head:
                return out
        elif isinstance(f, wire.Error | wire.Bye):
            raise AssertionError(f"unexpected {f!r}")


async def test_three_devices_coming_and_going_each_get_every_entry_in_order(tmp_path):
    """Three devices of bob connect and disconnect at random while alice sends 200 messages;
    each session's deliveries start right after its welcome's `acked` and are gapless and in
    order; at the end each device has every entry, its cursor at the head, and a device that
    never connected gets all 200 on its first connect."""
    rng = random.Random(7)
    async with running_broker(tmp_path / "data", window=16) as h:
        seen: dict[str, list[int]] = {d: [] for d in ("phone", "laptop", "tablet")}
        done = trio.Event()

        async def device(name: str) -> None:
            while not done.is_set():
                c = await RawClient.connect(h.server, h.token("bob"), name)
                expect = c.welcome.acked + 1
                with trio.move_on_after(rng.uniform(0.01, 0.15)):
                    while True:
                        f = await c.next()
                        assert f is not None
                        if isinstance(f, wire.Deliver):
                            assert f.inbox_seq == expect, (name, f.inbox_seq, expect)
                            expect += 1
                            seen[name].append(f.inbox_seq)
                            if rng.random() < 0.8:
                                await c.send(wire.Ack(upto=f.inbox_seq))
                await c.aclose()
                await trio.sleep(rng.uniform(0, 0.05))

        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        async with trio.open_nursery() as n:
            for name in seen:
                n.start_soon(device, name)
            await _send_all(alice, N_MESSAGES, "bob")
            done.set()
        await alice.aclose()
        assert h.broker.store.inbox_head("bob") == N_MESSAGES
        for name in [*seen, "watch"]:
            c = await RawClient.connect(h.server, h.token("bob"), name)
            got = await _drain(c, N_MESSAGES)
            assert [d.inbox_seq for d in got] == list(range(c.welcome.acked + 1, N_MESSAGES + 1))
            if name == "watch":
                assert c.welcome.acked == 0 and len(got) == N_MESSAGES
                assert [d.body for d in got] == [f"msg {i}" for i in range(N_MESSAGES)]
            # every entry reached the device at least once, over its sessions
            assert set(seen.get(name, [])) | {d.inbox_seq for d in got} == set(
                range(1, N_MESSAGES + 1))
            await c.send(wire.Ack(upto=N_MESSAGES, id=99))
            assert isinstance(await c.reply(99), wire.Ok)
            await c.aclose()
        for name in [*seen, "watch"]:
            assert h.broker.store.delivered("bob", name) == N_MESSAGES


async def test_same_device_twice_newer_wins_and_nothing_acked_is_delivered_again(harness):
    """A phone reconnects before its old TCP connection died: the old session gets `bye`, the
    new one starts after the old one's durable ack and is delivered what the old one had not
    acked, in order."""
    h = harness
    alice = await RawClient.connect(h.server, h.token("alice"), "a1")
    old = await RawClient.connect(h.server, h.token("bob"), "phone")
    await _send_all(alice, 10, "bob")
    got = await _drain(old, 10, ack_each=False)
    assert [d.inbox_seq for d in got] == list(range(1, 11))
    await old.send(wire.Ack(upto=4, id=50))  # durable before the new session comes
    assert isinstance(await old.reply(50), wire.Ok)
    await old.send(wire.Ack(upto=6))  # in flight as the new session comes: may or may not count
    new = await RawClient.connect(h.server, h.token("bob"), "phone")
    assert new.welcome.acked in (4, 6)
    while True:
        f = await old.next()
        if f is None or isinstance(f, wire.Bye):
            break
    assert isinstance(f, wire.Bye)
    got = await _drain(new, 10)
    assert [d.inbox_seq for d in got] == list(range(new.welcome.acked + 1, 11))
    await new.send(wire.Ack(upto=10, id=51))
    assert isinstance(await new.reply(51), wire.Ok)
    assert h.broker.store.delivered("bob", "phone") == 10
    for c in (alice, old, new):
        await c.aclose()


async def test_acks_past_backwards_and_from_two_devices_keep_marks_monotonic(harness):
    """An ack past the inbox head is `invalid` and moves nothing; one backwards changes
    nothing; two devices acking at once: each device's mark is its own highest ack, and
    `receipts` lists bob as delivered once either device acked the message."""
    h = harness
    alice, phone, laptop = await _to_two_devices(h, 6)
    await phone.send(wire.Ack(upto=7, id=1))
    err = await phone.reply(1)
    assert isinstance(err, wire.Error) and err.name == "invalid" and not err.close
    await phone.send(wire.Ack(upto=5, id=2))
    assert isinstance(await phone.reply(2), wire.Ok)
    await phone.send(wire.Ack(upto=2, id=3))
    assert isinstance(await phone.reply(3), wire.Ok)
    await laptop.send(wire.Ack(upto=3, id=4))
    assert isinstance(await laptop.reply(4), wire.Ok)
    store = h.broker.store
    assert store.delivered("bob", "phone") == 5
    assert store.delivered("bob", "laptop") == 3
    conv = "dm:alice:bob"
    await alice.send(wire.Receipts(id=90, conv=conv, seq=5))
    r = await alice.reply(90)
    assert "bob" in r.delivered
    await alice.send(wire.Receipts(id=91, conv=conv, seq=6))
    r = await alice.reply(91)
    assert "bob" not in r.delivered
    for c in (alice, phone, laptop):
        await c.aclose()


async def test_a_device_that_skipped_ahead_is_then_delivered_what_follows(tmp_path):
    """A device acking beyond what this session delivered (what it had from an earlier
    session) skips ahead; what follows comes in order, none twice."""
    async with running_broker(tmp_path / "data", window=1) as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send_all(alice, 8, "bob")
        phone = await RawClient.connect(h.server, h.token("bob"), "phone")
        first = await phone.next()
        assert isinstance(first, wire.Deliver) and first.inbox_seq == 1
        await phone.send(wire.Ack(upto=5, id=1))
        frames = []
        while not isinstance(f := await phone.next(), wire.Ok):
            frames.append(f)
        assert [d.inbox_seq for d in frames] in ([], [6])
        if frames:
            await phone.send(wire.Ack(upto=6))
        got = frames + await _drain(phone, 8)
        assert [d.inbox_seq for d in got] == [6, 7, 8]
        await alice.send(wire.Send(id=50, cid="after", body="after", to="bob"))
        await alice.reply(50)
        got = await _drain(phone, 9)
        assert [d.inbox_seq for d in got] == [9]
        for c in (alice, phone):
            await c.aclose()


async def test_own_send_reaches_the_other_device_and_moves_the_senders_cursor(harness):
    """bob sends from phone: laptop is delivered it, phone is not, and phone's cursor moves
    past it (its next session's welcome says so)."""
    h = harness
    phone = await RawClient.connect(h.server, h.token("bob"), "phone")
    laptop = await RawClient.connect(h.server, h.token("bob"), "laptop")
    await phone.send(wire.Send(id=1, cid="own-1", body="from phone", to="alice"))
    assert isinstance(await phone.reply(1), wire.Result)
    got = await _drain(laptop, 1)
    assert [(d.inbox_seq, d.body, d.sender) for d in got] == [(1, "from phone", "bob")]
    with trio.move_on_after(0.5):
        f = await phone.next()
        raise AssertionError(f"phone got {f!r}")
    await phone.aclose()
    again = await RawClient.connect(h.server, h.token("bob"), "phone")
    assert again.welcome.acked == 1 and again.welcome.head == 1
    for c in (laptop, again):
        await c.aclose()


async def test_max_connections_per_user_refuses_a_new_device_but_takes_a_replacement(tmp_path):
    async with running_broker(tmp_path / "data", max_connections_per_user=2) as h:
        a = await RawClient.connect(h.server, h.token("bob"), "phone")
        b = await RawClient.connect(h.server, h.token("bob"), "laptop")
        c = await RawClient.connect(h.server)
        await c.send(wire.Hello(versions=(1,), token=h.token("bob"), device="tablet", id=7))
        err = await c.next()
        assert isinstance(err, wire.Error) and err.name == "limit_exceeded" and err.close
        assert err.id == 7
        assert await c.next() is None
        # the same device at the limit replaces its session
        a2 = await RawClient.connect(h.server, h.token("bob"), "phone")
        assert a2.welcome is not None
        while (f := await a.next()) is not None and not isinstance(f, wire.Bye):
            pass
        assert isinstance(f, wire.Bye)
        # another user is not counted against bob
        z = await RawClient.connect(h.server, h.token("carol"), "tablet")
        for x in (a, b, c, a2, z):
            await x.aclose()


async def test_device_ids_longest_unicode_and_case(harness):
    """64 characters is the longest device id, 65 is refused, a non-ASCII letter is refused, and
    `Phone` and `phone` are two devices with cursors of their own."""
    h = harness
    longest = "p" * 64
    ok = await RawClient.connect(h.server, h.token("bob"), longest)
    assert ok.welcome.user == "bob"
    for bad in ("p" * 65, "phoné", "ph one", "phone\n", "-phone", ""):
        c = await RawClient.connect(h.server)
        await c.stream.send_all(wire.encode_frame(
            {"t": "hello", "versions": [1], "token": h.token("bob"), "device": bad, "id": 3}))
        err = await c.next()
        assert isinstance(err, wire.Error) and err.name == "invalid" and err.close, (bad, err)
        await c.aclose()
    alice = await RawClient.connect(h.server, h.token("alice"), "a1")
    await _send_all(alice, 3, "bob")
    upper = await RawClient.connect(h.server, h.token("bob"), "Phone")
    await _drain(upper, 3)
    await upper.send(wire.Ack(upto=3, id=9))
    assert isinstance(await upper.reply(9), wire.Ok)
    lower = await RawClient.connect(h.server, h.token("bob"), "phone")
    assert lower.welcome.acked == 0
    got = await _drain(lower, 3)
    assert [d.inbox_seq for d in got] == [1, 2, 3]
    # neither replaced the other
    with trio.move_on_after(0.3):
        f = await upper.next()
        raise AssertionError(f"Phone got {f!r}")
    for c in (ok, alice, upper, lower):
        await c.aclose()


async def test_own_send_killed_before_its_own_ack_is_not_delivered_back(tmp_path):
    """SIGKILL of the broker between the commit of bob's send from phone and the commit of
    phone's cursor past it (the own-ack round, OWN_ACK_DELAY_S): after the restart phone is not
    delivered its own message, its cursor moves past it, and laptop is delivered it."""
    bp = BrokerProcess(tmp_path / "data")
    try:
        await bp.astart()
        phone = await RawClient.connect(bp.server, bp.token("bob"), "phone")
        await phone.send(wire.Send(id=1, cid="own-1", body="before the crash", to="alice"))
        assert isinstance(await phone.reply(1), wire.Result)
        bp.kill()  # at once: the own ack waits up to OWN_ACK_DELAY_S for its round
        await phone.aclose()
        store = bp.open_store(readonly=True)
        try:
            assert store.inbox_head("bob") == 1
            assert store.delivered("bob", "phone") == 0  # the crash came before the own ack
        finally:
            store.close()
        await bp.astart()
        phone = await RawClient.connect(bp.server, bp.token("bob"), "phone")
        assert phone.welcome.acked == 0 and phone.welcome.head == 1
        with trio.move_on_after(0.5):
            f = await phone.next()
            raise AssertionError(f"phone got {f!r}")
        await phone.send(wire.Ping(id=5))
        await phone.reply(5)
        await phone.aclose()
        again = await RawClient.connect(bp.server, bp.token("bob"), "phone")
        assert again.welcome.acked == 1  # passed over, and acked on its behalf at the end
        laptop = await RawClient.connect(bp.server, bp.token("bob"), "laptop")
        got = await _drain(laptop, 1)
        assert [(d.inbox_seq, d.body) for d in got] == [(1, "before the crash")]
        for c in (again, laptop):
            await c.aclose()
    finally:
        bp.kill()


async def test_one_device_connecting_ten_times_at_once_leaves_one_session_counted_once(tmp_path):
    """Ten hellos of bob's phone at once (a reconnect storm): each is welcomed, all but the last
    attached get `bye`, and the survivor counts once against --max-connections-per-user.

    The survivor is the one not told `bye`: since 2026-12-07 the broker takes the ten off its
    listen backlog in one turn and writes each welcome as it attaches, so the welcomes may
    reach their clients in any order (the last one read is not the last attached)."""
    async with running_broker(tmp_path / "data", max_connections_per_user=2) as h:
        clients: list[RawClient] = []

        async def connect() -> None:
            clients.append(await RawClient.connect(h.server, h.token("bob"), "phone"))

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(connect)
        told: list[RawClient] = []

        async def bye(c: RawClient) -> None:
            with trio.move_on_after(3):
                while (f := await c.next()) is not None and not isinstance(f, wire.Bye):
                    pass
                if isinstance(f, wire.Bye):
                    told.append(c)

        async with trio.open_nursery() as n:
            for c in clients:
                n.start_soon(bye, c)
        assert len(told) == 9
        assert h.broker.hub.user_count("bob") == 1 and h.broker.hub.count == 1
        [last] = [c for c in clients if c not in told]
        await last.send(wire.Ping(id=1))
        assert isinstance(await last.reply(1), wire.Pong)
        laptop = await RawClient.connect(h.server, h.token("bob"), "laptop")
        tablet = await RawClient.connect(h.server)
        await tablet.send(wire.Hello(versions=(1,), token=h.token("bob"), device="tablet", id=1))
        err = await tablet.next()
        assert isinstance(err, wire.Error) and err.name == "limit_exceeded"
        for c in (*clients, laptop, tablet):
            await c.aclose()


async def test_two_devices_acking_one_message_push_one_delivered_receipt(harness):
    """bob's phone and laptop both ack alice's message: alice hears `delivered` once, from
    the first ack; the second moves no mark."""
    h = harness
    alice, phone, laptop = await _to_two_devices(h, 1)
    async with trio.open_nursery() as n:
        n.start_soon(phone.send, wire.Ack(upto=1, id=1))
        n.start_soon(laptop.send, wire.Ack(upto=1, id=1))
    assert isinstance(await phone.reply(1), wire.Ok)
    assert isinstance(await laptop.reply(1), wire.Ok)
    receipts = []
    with trio.move_on_after(0.5):
        while True:
            f = await alice.next()
            if isinstance(f, wire.Receipt):
                receipts.append(f)
    assert receipts == [wire.Receipt(conv="dm:alice:bob", user="bob", delivered=1, read=None)]
    for c in (alice, phone, laptop):
        await c.aclose()


async def test_a_refusal_at_a_connection_limit_says_which_limit_and_logs_the_user(tmp_path):
    """A device refused for the user's --max-connections-per-user is told that limit (not the
    broker-wide one: "too many connections" said nothing of which) and how to get in (another
    device of the user's closing, or replacing one); the broker logs which user and limit, so an
    operator can tell a user at their limit from a full broker (`connection_closed` alone had
    user and device null, reason `limit`, for both)."""
    async with running_broker(tmp_path / "data", max_connections_per_user=1,
                              max_connections=2) as h:
        phone = await RawClient.connect(h.server, h.token("bob"), "phone")

        async def refused(user: str, device: str) -> wire.Error:
            c = await RawClient.connect(h.server)
            await c.send(wire.Hello(versions=(1,), token=h.token(user), device=device, id=3))
            err = await c.next()
            await c.aclose()
            assert isinstance(err, wire.Error) and err.name == "limit_exceeded" and err.close
            return err

        err = await refused("bob", "laptop")
        assert "this user" in err.message and "1 connection" in err.message, err.message
        carol = await RawClient.connect(h.server, h.token("carol"), "c1")
        err = await refused("dave", "d1")
        assert "this user" not in err.message and "2 connections" in err.message, err.message
        full = [e for e in h.logs if e["event"] == "connections_full"]
        assert [(e["user"], e["device"], e["limit"], e["connections"], e["log_level"])
                for e in full] == [("bob", "laptop", "per_user", 1, "warning"),
                                   ("dave", "d1", "total", 2, "warning")]
        # Their connection_closed lines say whose they were too (they said null until
        # 2026-12-06): an operator grepping for the user finds the whole story.
        await wait_until(lambda: sum(e["event"] == "connection_closed" for e in h.logs) >= 2)
        closed = [(e["user"], e["device"], e["reason"]) for e in h.logs
                  if e["event"] == "connection_closed"]
        assert closed == [("bob", "laptop", "limit"), ("dave", "d1", "limit")], closed
        for c in (phone, carol):
            await c.aclose()


async def test_an_ack_on_the_replaced_session_is_not_taken_and_its_entries_come_again(harness):
    """PROTOCOL.md §9: frames the replaced session sends after the new hello are not read; an
    ack among them moves no cursor, and the new session is delivered those entries."""
    h = harness
    alice = await RawClient.connect(h.server, h.token("alice"), "a1")
    await _send_all(alice, 5, "bob")
    old = await RawClient.connect(h.server, h.token("bob"), "phone")
    await _drain(old, 5, ack_each=False)
    new = await RawClient.connect(h.server, h.token("bob"), "phone")
    assert new.welcome.acked == 0
    await old.send(wire.Ack(upto=5, id=7))  # after the new session's welcome
    after_bye = []
    while (f := await old.next()) is not None and not isinstance(f, wire.Bye):
        pass
    assert isinstance(f, wire.Bye)
    while (f := await old.next()) is not None:
        after_bye.append(f)
    assert after_bye == []
    got = await _drain(new, 5, ack_each=False)
    assert [d.inbox_seq for d in got] == [1, 2, 3, 4, 5]
    assert h.broker.store.delivered("bob", "phone") == 0
    for c in (alice, old, new):
        await c.aclose()


async def test_devices_sending_and_replacing_themselves_get_every_other_entry_in_order(tmp_path):
    """Three devices of bob, each sometimes sending to alice, sometimes opening a new session
    while its old one is still up (replacing it), while alice sends: every session's deliveries
    are the inbox entries after its welcome's `acked`, in order, without the device's own sends;
    at the end each device's cursor is at the head, and none was delivered its own send."""
    rng = random.Random(11)
    async with running_broker(tmp_path / "data", window=8) as h:
        sessions: list[tuple[str, int, list[int]]] = []  # device, welcome.acked, inbox_seqs
        done = trio.Event()

        async def device(name: str) -> None:
            ids = iter(range(1, 10**9))
            old: RawClient | None = None
            while not done.is_set():
                c = await RawClient.connect(h.server, h.token("bob"), name)
                if old is not None:
                    await old.aclose()  # replaced already: its bye may or may not be read
                got: list[int] = []
                sessions.append((name, c.welcome.acked, got))
                with trio.move_on_after(rng.uniform(0.02, 0.12)):
                    while True:
                        if rng.random() < 0.2:
                            await c.send(wire.Send(id=next(ids), cid=f"{name}-{rng.random()}",
                                                   body=f"own {name}", to="alice"))
                        f = await c.next()
                        if f is None or isinstance(f, wire.Bye):
                            break
                        if isinstance(f, wire.Deliver):
                            got.append(f.inbox_seq)
                            if rng.random() < 0.7:
                                await c.send(wire.Ack(upto=f.inbox_seq))
                if rng.random() < 0.5:
                    old = c  # left open: the next session replaces it
                else:
                    await c.aclose()
                    old = None
            if old is not None:
                await old.aclose()

        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        async with trio.open_nursery() as n:
            for name in ("phone", "laptop", "tablet"):
                n.start_soon(device, name)
            await _send_all(alice, N_MESSAGES, "bob")
            done.set()
        await alice.aclose()
        # A send a device wrote before it closed is carried out all the same (PROTOCOL.md §6):
        # the head is read once every session of bob's ended and every commit is done.
        broker = h.broker
        await wait_until(lambda: not broker.hub.every_session("bob")
                         and broker.committer.queued == 0 and broker.committer.committing == 0)
        store = broker.store
        head = store.inbox_head("bob")
        items, _ = store.deliverable("bob", 0, head)
        assert [it.inbox_seq for it in items] == list(range(1, head + 1))
        own = {name: {it.inbox_seq for it in items if it.sender == "bob" and it.device == name}
               for name in ("phone", "laptop", "tablet")}
        assert all(own.values()), "every device sent something"
        for name, acked, got in sessions:
            want = [s for s in range(acked + 1, head + 1) if s not in own[name]]
            assert got == want[:len(got)], (name, acked, got[:20], want[:20])
        for name in own:
            c = await RawClient.connect(h.server, h.token("bob"), name)
            got = [d.inbox_seq for d in await _drain(c, max(set(range(1, head + 1)) - own[name]))]
            assert got == [s for s in range(c.welcome.acked + 1, head + 1)
                           if s not in own[name]][:len(got)]
            await c.send(wire.Ack(upto=head, id=99))
            assert isinstance(await c.reply(99), wire.Ok)
            await c.aclose()
            assert store.delivered("bob", name) == head


async def _to_two_devices(h, n: int) -> tuple[RawClient, RawClient, RawClient]:
    """alice sends bob `n` messages; bob's phone and laptop connect and each take them all,
    acking none."""
    alice = await RawClient.connect(h.server, h.token("alice"), "a1")
    await _send_all(alice, n, "bob")
    phone = await RawClient.connect(h.server, h.token("bob"), "phone")
    laptop = await RawClient.connect(h.server, h.token("bob"), "laptop")
    await _drain(phone, n, ack_each=False)
    await _drain(laptop, n, ack_each=False)
    return alice, phone, laptop


async def test_a_hello_whose_client_already_hung_up_replaces_no_session(tmp_path):
    """A connect the client gave up on (cancelled, timed out) and closed, its hello still in
    the socket when the broker reads it, is not welcomed: it would end the device's session
    opened since with `bye` "replaced", which the SDK takes for a second process of the device
    and stops for good. Until 2026-12-07 it replaced it (seen once the broker took the
    connections waiting on its port a turn, their hellos then read in any order)."""
    async with running_broker(tmp_path / "data") as h:
        live = await RawClient.connect(h.server, h.token("bob"), "phone")
        host, port = h.server.rsplit(":", 1)
        for _ in range(5):  # blocking calls: the broker (this event loop) reads none before
            hello = wire.Connection(wire.Role.CLIENT).send(wire.Hello(
                versions=(1,), token=h.token("bob"), device="phone", id=0))
            with socket.create_connection((host, int(port))) as stale:
                stale.sendall(hello)
        await wait_until(lambda: h.broker.handshaking == 0)
        await trio.sleep(0.2)
        await live.send(wire.Ping(id=1))
        with trio.fail_after(5):
            reply = await live.next()
        assert isinstance(reply, wire.Pong), reply
        assert h.broker.hub.user_count("bob") == 1
        await live.aclose()
