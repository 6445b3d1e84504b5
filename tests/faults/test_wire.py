"""Network faults: frames cut in both directions, vanishing clients, a client that never reads."""

from __future__ import annotations

import socket

import trio

import protocol as wire
from tests.faults.checker import History, check
from tests.faults.conftest import RawClient, replies, rst_close


async def _wait(cond, timeout=10.0, step=0.02):
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(step)


async def test_half_a_frame_then_close_is_dropped_cleanly(harness, tally):
    """A client that writes half a frame and closes (FIN or RST) leaves nothing stored."""
    h = harness
    with trio.fail_after(30):
        for i in range(40):
            c = await RawClient.connect(h.server, h.token("mallory"), f"m{i}")
            data = c.conn.send(wire.Send(id=1, cid=f"half-{i}", body="x" * 300, to="bob"))
            await c.stream.send_all(data[: len(data) // 2 + i % 7])
            if i % 2:
                rst_close(c.stream)
            await c.aclose()
            tally.add("client writes half a frame and closes")
        for i in range(20):  # before hello too
            c = await RawClient.connect(h.server)
            data = c.conn.send(wire.Hello(versions=(1,), token=h.token("mallory"), device="x"))
            await c.stream.send_all(data[: 5 + i])
            await c.aclose()
            tally.add("client writes half a hello and closes")
        async with h.client("alice") as alice, h.client("bob") as bob:
            r = await alice.send("after the cuts", to="bob")
            d = await bob.deliveries().receive()
            assert (d.conv, d.seq, d.body) == (r.conv, r.seq, "after the cuts")
        await _wait(lambda: h.broker.hub.count == 0)
    assert h.broker.store.history(r.conv)[0][0]["body"] == "after the cuts"
    assert not any(m["from"] == "mallory" for m in h.broker.store.history(r.conv)[0])


async def test_clients_vanishing_without_bye_are_forgotten(harness, tally):
    """Clients that vanish (RST or FIN, no bye) are detached and announced offline."""
    h = harness
    with trio.fail_after(30):
        async with h.client("alice") as alice:
            await alice.send("hi", to="bob")
            clients = []
            for i in range(60):
                clients.append(await RawClient.connect(h.server, h.token(f"v{i % 6}"), f"d{i}"))
            bob = await RawClient.connect(h.server, h.token("bob"), "b1")
            await _wait(lambda: h.broker.hub.count == 62)
            for i, c in enumerate(clients):
                if i % 2:
                    rst_close(c.stream)
                await c.aclose()
                tally.add("client vanishes without bye")
            rst_close(bob.stream)
            await bob.aclose()
            await _wait(lambda: h.broker.hub.count == 1)
            assert not h.broker.hub.online("bob")
            (conv,) = h.broker.store.user_convs("alice")
            assert await alice.presence(conv) == ("alice",)


async def test_a_client_that_never_reads_does_not_slow_the_others(harness, tally):
    """A device whose socket buffer is full stalls alone; the rest go on; it is cut mid-deliver,
    and its next session gets everything again from its cursor."""
    h = harness
    n, body = 150, "y" * 30000
    history = History()
    stall = trio.socket.socket()
    stall.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await stall.connect(("127.0.0.1", h.broker.port))
    stalled = RawClient(trio.SocketStream(stall))
    await stalled.hello(h.token("bob"), "stall")
    tally.add("client never reads (socket buffer full)")
    with trio.fail_after(60):
        async with h.client("alice") as alice, h.client("bob", "fast") as fast, \
                h.client("carol") as carol, h.client("dave") as dave:
            async def sends():
                for i in range(n):
                    history.attempt("alice", f"s{i}", f"{i}{body}", ("bob",))
                    r = await alice.send(f"{i}{body}", to="bob", cid=f"s{i}")
                    history.accept("alice", f"s{i}", r.conv, r.seq)

            async def others():
                for i in range(200):
                    history.attempt("carol", f"c{i}", f"c{i}", ("dave",))
                    r = await carol.send(f"c{i}", to="dave", cid=f"c{i}")
                    history.accept("carol", f"c{i}", r.conv, r.seq)

            async def receive(client, user, device, count):
                for _ in range(count):
                    d = await client.deliveries().receive()
                    history.deliver(user, device, client, d)
                    await client.ack(d.inbox_seq)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sends)
                nursery.start_soon(others)
                nursery.start_soon(receive, fast, "bob", "fast", n)
                nursery.start_soon(receive, dave, "dave", "d1", 200)
            session = next(s for s in h.broker.hub.sessions("bob") if s.device == "stall")
            assert session.sent > session.acked  # it is stuck mid-deliver, nothing acked
        rst_close(stalled.stream)
        await stalled.aclose()
        tally.add("connection cut while the broker is mid-deliver")
        async with h.client("bob", "stall") as again:
            await receive(again, "bob", "stall", n)
    check(history, h.broker.store)


async def _small_buffer_client(h, user: str, device: str) -> RawClient:
    """A device whose socket takes 4 KiB before the broker's writes to it block."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", h.broker.port))
    c = RawClient(trio.SocketStream(sock))
    await c.hello(h.token(user), device)
    return c


async def test_pushes_to_a_client_that_never_reads_close_it_as_slow_consumer(tmp_path, tally):
    """Typing pushes piling up for a non-reading device close it as slow_consumer; the others
    and the broker carry on, and its deliveries wait on disk."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", max_pending_pushes=50,
                              typing_per_s_per_user=1e9) as h:
        with trio.fail_after(30):
            async with h.client("alice") as alice, h.client("bob", "fast") as fast:
                conv = await alice.create_group("g", ["bob"])
                stalled = await _small_buffer_client(h, "bob", "stall")
                big = "t" * 20000
                await alice.send(big, conv=conv)  # fills the stalled socket
                for _ in range(2000):
                    await alice.typing(conv)
                    if not any(s.device == "stall" for s in h.broker.hub.sessions("bob")):
                        break
                    await trio.sleep(0)
                await _wait(lambda: not any(s.device == "stall"
                                            for s in h.broker.hub.sessions("bob")))
                tally.add("pushes pile up for a non-reading client (slow consumer)")
                r = await alice.send("after", conv=conv)
                seen = []
                while not seen or seen[-1].seq != r.seq:
                    d = await fast.deliveries().receive()
                    seen.append(d)
                    await fast.ack(d.inbox_seq)
            await stalled.aclose()
            async with h.client("bob", "stall") as again:
                got = []
                while len(got) < 3:  # added, big, after
                    got.append(await again.deliveries().receive())
                assert [d.kind for d in got] == ["added", "msg", "msg"]
                assert got[-1].body == "after"


async def test_a_device_reconnecting_in_a_storm_loses_nothing(harness, tally):
    """The same device reconnecting 30 times mid-traffic (each session replacing the last)
    receives every message, in order within each session."""
    h = harness
    history = History()
    with trio.fail_after(60):
        async with h.client("alice") as alice:
            async def sends():
                for i in range(300):
                    history.attempt("alice", f"r{i}", f"r{i}", ("bob",))
                    r = await alice.send(f"r{i}", to="bob", cid=f"r{i}")
                    history.accept("alice", f"r{i}", r.conv, r.seq)
                    await trio.sleep(0.002)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sends)
                prev = None
                for k in range(30):
                    c = await RawClient.connect(h.server, h.token("bob"), "b1")
                    if prev is not None:  # replaced by c: it gets bye, then we close it
                        await prev.aclose()
                    with trio.move_on_after(0.03):
                        while True:
                            f = await c.next()
                            if f is None:
                                break
                            if isinstance(f, wire.Deliver):
                                history.deliver("bob", "b1", c, f)
                                if f.inbox_seq % 3 == 0:
                                    await c.send(wire.Ack(upto=f.inbox_seq))
                    if k % 2:
                        await c.aclose()
                        prev = None
                    else:
                        prev = c
                    tally.add("device reconnect storm (session replaced)")
                if prev is not None:
                    await prev.aclose()
            async with h.client("bob", "b1") as bob:
                while any(history.missing().values()):
                    d = await bob.deliveries().receive()
                    history.deliver("bob", "b1", bob, d)
                    await bob.ack(d.inbox_seq)
    check(history, h.broker.store)


async def test_frames_written_with_hello_are_answered_without_more_bytes(harness, tally):
    """A client that writes frames right behind its hello, in the same write, gets them
    answered at once: the broker does not wait for more bytes before reading its buffer."""
    with trio.fail_after(10):
        c = RawClient(await trio.open_tcp_stream("127.0.0.1", harness.broker.port))
        hello = wire.Hello(versions=(1,), token=harness.token("alice"), device="eager", id=0)
        data = c.conn.send(hello)
        c.conn.max_frame_bytes = wire.DEFAULT_MAX_FRAME_BYTES
        ping = wire.encode_frame(wire.to_wire(wire.Ping(id=1)))
        send = wire.encode_frame(wire.to_wire(wire.Send(id=2, cid="c1", body="hi", to="bob")))
        await c.stream.send_all(data + ping + send)
        assert isinstance(await c.next(), wire.Welcome)
        got = await replies(c, [1, 2])
        assert isinstance(got[1], wire.Pong) and isinstance(got[2], wire.Result)
        await c.aclose()
        tally.add("frames pipelined behind hello")


async def test_a_slow_consumer_is_told_why_before_it_is_closed(tmp_path, tally):
    """A device whose pushes pile up past --max-pending-pushes gets, after what was queued,
    error slow_consumer (close: true) when it reads again, and then EOF."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", max_pending_pushes=50,
                              typing_per_s_per_user=1e9) as h:
        with trio.fail_after(30):
            async with h.client("alice") as alice:
                conv = await alice.create_group("g", ["bob"])
                reader = await _small_buffer_client(h, "bob", "slow")
                session = next(s for s in h.broker.hub.sessions("bob") if s.device == "slow")
                await alice.send("t" * 20000, conv=conv)  # fills its socket
                while session.reason is None:
                    await alice.typing(conv)
                    await trio.sleep(0)
                last = None
                while (frame := await reader.next()) is not None:  # it reads again
                    last = frame
                assert isinstance(last, wire.Error) and last.name == "slow_consumer", last
                assert last.close
                tally.add("a slow consumer told why")
                await reader.aclose()


async def test_the_ok_of_an_ack_means_it_is_durable_and_seen(harness, tally):
    """An ack with an id is answered `ok` once it is durable (PROTOCOL.md §5.2), so a
    `receipts` asked right after the `ok` lists the device's user as having the message. The
    `ok` used to come before the commit: `receipts` did not list them yet."""
    with trio.fail_after(20):
        alice = await RawClient.connect(harness.server, harness.token("alice"), "a")
        bob = await RawClient.connect(harness.server, harness.token("bob"), "b")
        for round_ in range(1, 6):
            await alice.send(wire.Send(id=round_, cid=f"c{round_}", body="hi", to="bob"))
            conv = (await replies(alice, [round_]))[round_].conv
            while not isinstance(f := await bob.next(), wire.Deliver):
                pass
            await bob.send(wire.Ack(upto=f.inbox_seq, id=100 + round_))
            ok = (await replies(bob, [100 + round_]))[100 + round_]
            assert isinstance(ok, wire.Ok), ok
            await bob.send(wire.Receipts(id=200 + round_, conv=conv, seq=f.seq))
            got = (await replies(bob, [200 + round_]))[200 + round_]
            assert "bob" in got.delivered, (round_, got)
        # Acks that move nothing are answered at once, and an ack of a cursor already durable.
        await bob.send(wire.Ack(upto=1, id=300))
        assert isinstance((await replies(bob, [300]))[300], wire.Ok)
        for c in (alice, bob):
            await c.aclose()
        tally.add("ack ok after durable", 5)


async def test_a_shutdown_ends_busy_connections_without_a_reset(tmp_path, tally):
    """A client still writing when the broker stops gets the closing error `shutting_down`,
    then a clean end of stream: the broker half-closes and reads what is still coming before it
    closes. Closing with unread input used to reset the connection, and a reset may make the
    client's kernel drop the last frames (results, the error) before the client reads them."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(30):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", h.broker.port))
            c = RawClient(None)
            await sock.send(c.conn.send(wire.Hello(versions=(1,), token=h.token("alice"),
                                                   device="d", id=0)))
            c.conn.max_frame_bytes = wire.DEFAULT_MAX_FRAME_BYTES
            pings = b"".join(wire.encode_frame(wire.to_wire(wire.Ping(id=i)))
                             for i in range(1, 200))
            closing, ended = None, False

            async def keep_writing():
                while closing is None:
                    try:
                        await sock.send(pings)
                    except OSError:
                        return
                    await trio.sleep(0.001)

            async with trio.open_nursery() as n:
                n.start_soon(keep_writing)
                await trio.sleep(0.2)
                h.broker.shutdown()
                while not ended:
                    data = await sock.recv(65536)  # a reset raises ConnectionResetError here
                    ended = not data
                    c.conn.receive_data(data)
                    while (f := c.conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                        if isinstance(f, wire.Error) and f.close:
                            closing = f
            sock.close()
            assert closing is not None and closing.name == "shutting_down", closing
            tally.add("shutdown: closing error, then a clean end of stream")


async def test_an_ack_with_an_id_read_before_a_shutdown_is_answered(tmp_path, tally):
    """A shutdown answers every request it read, the acks with an id among them (their `ok`
    waits for the commit): the ok comes before `shutting_down`. It was dropped."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(20):
            alice = await RawClient.connect(h.server, h.token("alice"), "a")
            bob = await RawClient.connect(h.server, h.token("bob"), "b")
            await alice.send(wire.Send(id=1, cid="c1", body="hi", to="bob"))
            while not isinstance(f := await bob.next(), wire.Deliver):
                pass
            await bob.send(wire.Ack(upto=f.inbox_seq, id=77))
            await bob.send(wire.Ping(id=78))
            assert isinstance((await replies(bob, [78]))[78], wire.Pong)  # both were read
            h.broker.shutdown()
            got = []
            while (frame := await bob.next()) is not None:
                got.append(frame)
            oks = [x for x in got if isinstance(x, wire.Ok) and x.id == 77]
            closing = [x for x in got if isinstance(x, wire.Error)]
            assert oks and closing and got.index(oks[0]) < got.index(closing[0]), got
            for c in (alice, bob):
                await c.aclose()
            tally.add("shutdown: an ack's ok before shutting_down")
