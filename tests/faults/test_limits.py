"""Every limit, set by its `homing serve` flag, is answered with a typed error and no crash."""

from __future__ import annotations

import time

import pytest
import trio

import protocol as wire
from broker.client import ClientError
from tests.faults.conftest import RawClient, replies


async def raw(bp, user, device="d1"):
    return await RawClient.connect(bp.server, bp.token(user), device)


async def closing_error(c):
    """Read until the server's closing error, then EOF; return the error."""
    err = None
    while True:
        f = await c.next()
        if f is None:
            return err
        if isinstance(f, wire.Error) and f.close:
            err = f


async def still_serving(bp):
    async with bp.client("probe") as p:
        await p.send("ok?", to="probe2")


async def test_largest_frame(broker_process, tally):
    """A frame over --max-frame-bytes is too_large and closes the connection."""
    bp = broker_process("--max-frame-bytes", "4096", "--max-body-bytes", "3000")
    with trio.fail_after(20):
        c = await raw(bp, "alice")
        assert c.welcome.max_frame == 4096
        c.conn.max_frame_bytes = 1 << 20  # let our side write it anyway
        await c.send(wire.Send(id=1, cid="big", body="x" * 5000, to="bob"))
        err = await closing_error(c)
        assert err.name == "too_large"
        await c.aclose()
        tally.add("limit: frame over --max-frame-bytes")
        await still_serving(bp)


@pytest.mark.parametrize(("body", "says"), [
    (b"\x82\x01\x02\xa1t\xa4ping", "a map key that is neither str nor bin"),  # {1: 2, t: ping}
    (b"\x82\xa1t\xa4ping\xa1x\x81\xc0\x01", "a map key that is neither str nor bin"),  # nested
    (b"\x82\xa1t\xa4ping\xa1x\xa2\xff\xfe", "a str that is not valid UTF-8"),
    (b"\x81\xa1t\xa4ping\x01", "more than one msgpack value"),
    (b"\x82\xa1t\xa4ping\xa1x\xa5ab", "ends inside a msgpack value"),
], ids=["int key", "nil key nested", "bad utf-8", "two values", "cut str"])
async def test_a_bad_frame_says_what_is_wrong_with_it(broker_process, body, says):
    """A body msgpack cannot decode is a closing bad_frame that says why in PROTOCOL.md
    §2.3's words: each of these was "frame body is not valid msgpack (ValueError)" (or
    UnicodeDecodeError, ExtraData) until 2026-12-07, a valid msgpack map with an int key too."""
    bp = broker_process()
    with trio.fail_after(30):
        c = await raw(bp, "mallory")
        await c.stream.send_all(len(body).to_bytes(4, "big") + body)
        err = await closing_error(c)
        assert err is not None and err.name == "bad_frame", err
        assert says in err.message and "ValueError" not in err.message, err.message
        await c.aclose()
        await still_serving(bp)


async def test_frame_values(broker_process, tally):
    """A frame of more values than --max-frame-values is bad_frame and closes the connection,
    whatever field holds them (unknown ones too); the largest frame of the protocol, a create
    of 1,000 members, passes the default; the broker goes on serving the others."""
    bp = broker_process("--max-frame-values", "3000")
    with trio.fail_after(30):
        ok = await raw(bp, "alice", "d0")
        members = tuple(f"m{i:04d}" for i in range(1000))
        await ok.send(wire.Create(id=1, kind="group", name="all", members=members))
        assert isinstance(await ok.reply(1), wire.Created)
        deep = b"".join(b"\xdc" + (1001).to_bytes(2, "big") + b"\x80" * 1000
                        for _ in range(40)) + b"\x90"  # each level's child comes last
        send = b"\x86\xa1t\xa4send\xa2id\x07\xa3cid\xa1x\xa4body\xa1b\xa2to\xa3bob\xa4junk"
        for junk in ([{}] * 3000, [[[None]] * 1000] * 2, [None] * 2998, deep):
            c = await raw(bp, "mallory")
            frame = {"t": "send", "id": 7, "cid": "x", "body": "b", "to": "bob", "junk": junk}
            body = send + junk if isinstance(junk, bytes) else wire.encode_frame(frame)[4:]
            await c.stream.send_all(len(body).to_bytes(4, "big") + body)
            err = await closing_error(c)
            assert err is not None and err.name == "bad_frame", err
            assert "more than 3000 values" in err.message, err.message
            await c.aclose()
        # 2,998 items and the frame's own 6 keys and 6 values: 3,010 values; 2,980 + 12 fit.
        c = await raw(bp, "mallory")
        frame = {"t": "send", "id": 8, "cid": "y", "body": "b", "to": "bob", "junk": [0] * 2980}
        await c.stream.send_all(wire.encode_frame(frame))
        assert isinstance(await c.reply(8), wire.Result)
        tally.add("limit: frame over --max-frame-values", 4)
        await still_serving(bp)


async def test_body_size(broker_process, tally):
    """A body over --max-body-bytes is invalid; the connection stays up."""
    bp = broker_process("--max-body-bytes", "1000")
    with trio.fail_after(20):
        c = await raw(bp, "alice")
        await c.send(wire.Send(id=1, cid="big", body="x" * 1001, to="bob"))
        await c.send(wire.Send(id=2, cid="ok", body="x" * 1000, to="bob"))
        got = await replies(c, [1, 2])
        assert isinstance(got[1], wire.Error) and got[1].name == "invalid", got[1]
        assert isinstance(got[2], wire.Result)
        tally.add("limit: body over --max-body-bytes")


async def test_a_lowered_body_limit_still_delivers_and_pages_what_was_stored(broker_process,
                                                                              tally):
    """--max-body-bytes is for new sends. Restarted with a lower one, the broker delivers and
    pages the bigger messages it had accepted: it refused to encode them, so the device was
    closed with a `too_large` it could do nothing about and never got the messages after, and
    a `history` over them ended the session with no reply (the SDK resent it for ever)."""
    bp = broker_process()
    with trio.fail_after(40):
        async with bp.client("alice") as alice:
            for body in ("before", "b" * 60_000, "after"):
                await alice.send(body, to="bob")
        await bp.aterminate()
        bp.flags = ["--max-body-bytes", "1000"]
        await bp.astart()
        async with bp.client("bob") as bob:
            got = [await bob.deliveries().receive() for _ in range(3)]
            assert [len(d.body) for d in got] == [6, 60_000, 5]
            await bob.ack(got[-1].inbox_seq)
            page = await bob.history("dm:alice:bob")
            assert [len(m.body) for m in page.messages] == [5, 60_000, 6] and not page.more
            assert bob.reconnects == 0
            with pytest.raises(ClientError) as refused:
                await bob.send("x" * 1001, to="alice")  # new sends keep to the new limit
            assert refused.value.name == "invalid"
        tally.add("limit: --max-body-bytes lowered over stored messages")


async def _commits_of(bp, sends: int) -> tuple[int, int]:
    """Write `sends` sends in one write, wait for every result, stop the broker; return the
    (batches, commands) it logged on the way out."""
    c = await raw(bp, "alice")
    await c.stream.send_all(b"".join(
        c.conn.send(wire.Send(id=i + 1, cid=f"m{i}", body="x", to="bob")) for i in range(sends)))
    got = await replies(c, range(1, sends + 1))
    assert all(isinstance(f, wire.Result) for f in got.values())
    await c.aclose()
    assert await bp.aterminate() == 0
    stopped = [e for e in bp.log_events() if e.get("event") == "broker_stopped"]
    return stopped[-1]["batches"], stopped[-1]["commands"]


async def test_max_batch(broker_process, tally):
    """--max-batch bounds the commands of one group commit; the rest wait for the next one."""
    with trio.fail_after(30):
        batches, commands = await _commits_of(broker_process("--max-batch", "1"), 40)
        assert commands >= 40 and batches == commands  # one command a commit
        batches, commands = await _commits_of(broker_process("--max-batch", "1000"), 40)
        assert commands >= 40 and batches < commands / 2  # the same sends shared commits
        tally.add("limit: commands per commit over --max-batch")


async def test_send_rate_per_connection(broker_process, tally):
    """Sends past --send-rate on one connection are rate_limited, the rest accepted."""
    bp = broker_process("--send-rate", "20")
    with trio.fail_after(20):
        c = await raw(bp, "alice")
        for i in range(60):
            await c.send(wire.Send(id=i + 1, cid=f"m{i}", body="x", to="bob"))
        got = await replies(c, range(1, 61))
        names = [f.name if isinstance(f, wire.Error) else "result" for f in got.values()]
        assert 20 <= names.count("result") < 30 and set(names) == {"result", "rate_limited"}
        # Counted for `broker_stats` (PROTOCOL.md §5.3), each refusal once: no test read the
        # count, so a broker that never counted them passed.
        monitor = await RawClient.connect(bp.server)
        await monitor.hello(bp.token("nagios", "monitor"), "check", deliver=False)
        await monitor.send(wire.Stats(id=1))
        stats = await monitor.reply(1)
        assert stats.rate_limited == names.count("rate_limited"), stats
        await monitor.aclose()
        tally.add("limit: sends per second per connection", names.count("rate_limited"))


async def test_a_resend_past_the_rate_or_the_policy_is_a_dup_not_a_refusal(broker_process,
                                                                            tally, tmp_path):
    """A resend of an accepted message (its result lost with the connection) is answered as a
    dup even past the rate, or when a content policy set since would refuse its text: it was
    refused (`rate_limited`, `rejected_content`), and an application that then sent it again
    with a new cid made a duplicate. A refused message resent stays refused."""
    bp = broker_process("--send-rate", "5")
    with trio.fail_after(30):
        c = await raw(bp, "alice")
        for i in range(20):
            await c.send(wire.Send(id=i + 1, cid=f"m{i}", body="badword", to="bob"))
        got = await replies(c, range(1, 21))
        accepted = {f.cid for f in got.values() if isinstance(f, wire.Result)}
        assert 5 <= len(accepted) < 20
        for i in range(20):  # the bucket is empty: only the accepted come back
            await c.send(wire.Send(id=100 + i, cid=f"m{i}", body="badword", to="bob"))
        again = await replies(c, range(100, 120))
        for i in range(20):
            f = again[100 + i]
            if f"m{i}" in accepted:
                assert isinstance(f, wire.Result) and f.dup, f
            else:  # refused again, or accepted now if a token came back meanwhile
                assert (isinstance(f, wire.Error) and f.name == "rate_limited") or (
                    isinstance(f, wire.Result) and not f.dup), f
        await c.aclose()
        words = tmp_path / "words.txt"
        words.write_text("badword\n")
        await bp.aterminate()
        bp.flags = ["--content-policy", str(words)]
        await bp.astart()
        c = await raw(bp, "alice")
        await c.send(wire.Send(id=1, cid=min(accepted), body="badword", to="bob"))
        await c.send(wire.Send(id=2, cid="new", body="badword", to="bob"))
        got = await replies(c, [1, 2])
        assert isinstance(got[1], wire.Result) and got[1].dup, got[1]
        assert isinstance(got[2], wire.Error) and got[2].name == "rejected_content", got[2]
        tally.add("limit: resends of accepted messages past the rate or the policy", 2)


async def test_send_rate_per_user(broker_process, tally):
    """Sends past --user-send-rate across a user's connections are rate_limited."""
    bp = broker_process("--user-send-rate", "30")
    with trio.fail_after(20):
        a, b = await raw(bp, "alice", "a"), await raw(bp, "alice", "b")
        for i in range(25):
            await a.send(wire.Send(id=i + 1, cid=f"a{i}", body="x", to="bob"))
            await b.send(wire.Send(id=i + 1, cid=f"b{i}", body="x", to="bob"))
        got = list((await replies(a, range(1, 26))).values()) + list(
            (await replies(b, range(1, 26))).values())
        ok = sum(isinstance(f, wire.Result) for f in got)
        limited = [f for f in got if isinstance(f, wire.Error)]
        assert 30 <= ok < 40 and {f.name for f in limited} == {"rate_limited"}
        tally.add("limit: sends per second per user", len(limited))


async def test_window_of_unacked_deliveries(broker_process, tally):
    """With --window 4 a device gets 4 deliveries, then more only after it acks."""
    bp = broker_process("--window", "4")
    with trio.fail_after(20):
        async with bp.client("alice") as alice:
            for i in range(10):
                await alice.send(f"m{i}", to="bob")
        bob = await raw(bp, "bob")

        async def delivery():  # pushes (alice going offline: a status) may come in between
            while not isinstance(frame := await bob.next(), wire.Deliver):
                pass
            return frame

        got = [await delivery() for _ in range(4)]
        assert [d.body for d in got] == [f"m{i}" for i in range(4)]
        with trio.move_on_after(0.5):
            extra = await delivery()
            raise AssertionError(f"a fifth delivery before any ack: {extra}")
        await bob.send(wire.Ack(upto=got[1].inbox_seq))
        more = [await delivery() for _ in range(2)]
        assert [d.body for d in more] == ["m4", "m5"]
        tally.add("limit: unacked deliveries per device (window)")


async def test_connections_per_user_and_in_total(broker_process, tally):
    """Past --max-connections-per-user or --max-connections, hello gets limit_exceeded."""
    bp = broker_process("--max-connections-per-user", "3", "--max-connections", "5")
    with trio.fail_after(20):
        held = [await raw(bp, "alice", f"a{i}") for i in range(3)]
        c = await RawClient.connect(bp.server)
        await c.send(wire.Hello(versions=(1,), token=bp.token("alice"), device="a3", id=1))
        err = await closing_error(c)
        assert err.name == "limit_exceeded"
        tally.add("limit: connections per user")
        held += [await raw(bp, "bob", f"b{i}") for i in range(2)]
        c = await RawClient.connect(bp.server)
        await c.send(wire.Hello(versions=(1,), token=bp.token("carol"), device="c", id=1))
        err = await closing_error(c)
        assert err.name == "limit_exceeded"
        tally.add("limit: connections in total")
        for h in held:
            await h.aclose()
        await trio.sleep(0.2)
        await still_serving(bp)


async def test_handshake_and_idle_timeouts(broker_process, tally):
    """No hello within --handshake-timeout, or silence past --idle-timeout: timeout, closed."""
    bp = broker_process("--handshake-timeout", "0.5", "--idle-timeout", "1", "--heartbeat", "1")
    with trio.fail_after(20):
        c = await RawClient.connect(bp.server)
        start = trio.current_time()
        err = await closing_error(c)
        assert (err.name, err.message) == ("timeout", "no hello within 0.5 s"), err
        assert trio.current_time() - start < 3
        tally.add("limit: handshake timeout")
        start = trio.current_time()  # before the hello: its idle clock starts after
        c = await raw(bp, "alice")
        err = await closing_error(c)
        # The idle timeout set (1 s), not the default (3 heartbeats): said, rather than timed.
        assert (err.name, err.message) == ("timeout", "no frame for 1 s"), err
        assert 0.9 < trio.current_time() - start < 10
        tally.add("limit: idle timeout")


async def test_frames_keep_a_session_past_the_idle_timeout(broker_process):
    """Any frame restarts the idle clock; silence after them still times out, in time."""
    bp = broker_process("--idle-timeout", "1", "--heartbeat", "1")
    with trio.fail_after(30):
        c = await raw(bp, "alice")
        for i in range(8):  # 2.8 s of pings, 0.35 s apart: almost three idle timeouts
            await trio.sleep(0.35)
            start = trio.current_time()  # before the last frame: its idle clock starts after
            await c.send(wire.Ping(id=i))
            assert await c.next() == wire.Pong(id=i)
        err = await closing_error(c)
        # The idle timeout set (1 s), not the default (3 heartbeats): said, rather than timed.
        assert (err.name, err.message) == ("timeout", "no frame for 1 s"), err
        assert 0.95 < trio.current_time() - start < 10


async def test_bytes_of_a_frame_that_never_ends_do_not_keep_a_session(broker_process, tally):
    """The idle timeout counts whole frames: a client trickling the bytes of a frame it never
    finishes is timed out like a silent one."""
    bp = broker_process("--idle-timeout", "1", "--heartbeat", "1")
    with trio.fail_after(40):
        c = await raw(bp, "alice")
        start = trio.current_time()
        await c.stream.send_all((100).to_bytes(4, "big"))
        with trio.move_on_after(20):
            for _ in range(70):  # a byte every 0.3 s, for up to twenty idle timeouts
                await trio.sleep(0.3)
                try:
                    await c.stream.send_all(b"\x80")
                except trio.BrokenResourceError:
                    break
        err = await closing_error(c)
        # Timed out after 1 s, not after the trickle (20 s): a bound far from both.
        assert err.name == "timeout" and trio.current_time() - start < 10
        tally.add("limit: idle timeout with a frame trickled byte by byte")


async def test_members_per_group(broker_process, tally):
    """A group may not grow past --max-members: create and invite get limit_exceeded."""
    bp = broker_process("--max-members", "3")
    with trio.fail_after(20):
        c = await raw(bp, "alice")
        await c.send(wire.Create(id=1, kind="group", name="big", members=("b", "c", "d")))
        await c.send(wire.Create(id=2, kind="group", name="ok", members=("b", "c")))
        got = await replies(c, [1, 2])
        assert isinstance(got[1], wire.Error) and got[1].name == "limit_exceeded"
        conv = got[2].conv
        await c.send(wire.Invite(id=3, conv=conv, user="d"))
        (err,) = (await replies(c, [3])).values()
        assert isinstance(err, wire.Error) and err.name == "limit_exceeded"
        tally.add("limit: members per group", 2)


async def tiny(bp, user: str, device: str, max_frame: int) -> RawClient:
    """A device whose hello asks for frames of at most `max_frame` bytes."""
    c = await RawClient.connect(bp.server, bp.token(user), device, max_frame=max_frame)
    assert c.welcome.max_frame == max_frame
    return c


async def test_a_delivery_above_the_devices_max_frame(broker_process, tally):
    """A device that asked for max_frame 1024 is closed with too_large when a bigger message
    reaches it, live or from its inbox; the broker keeps serving everyone, and the message
    waits on disk for a connection that can take it."""
    bp = broker_process()
    big = "y" * 2000
    with trio.fail_after(30):
        live = await tiny(bp, "bob", "watch", 1024)
        async with bp.client("alice") as alice:
            await alice.send(big, to="bob", cid="big")
            err = await closing_error(live)  # delivered live, straight after the commit
            assert err is not None and err.name == "too_large" and "max_frame" in err.message
            await live.aclose()
            await alice.send("small", to="carol", cid="small")  # still serving
        again = await tiny(bp, "bob", "watch", 1024)  # from the inbox this time
        err = await closing_error(again)
        assert err is not None and err.name == "too_large"
        await again.aclose()
        roomy = await RawClient.connect(bp.server, bp.token("bob"), "watch")
        frame = await roomy.next()
        assert isinstance(frame, wire.Deliver) and frame.body == big and frame.inbox_seq == 1
        await roomy.aclose()
        tally.add("limit: delivery above the device's max_frame")
        await still_serving(bp)


async def test_a_history_page_holds_what_fits_the_connections_max_frame(harness, tally):
    """A page of big messages is cut to what fits the agreed max_frame, with `more` set, and
    paging on from its last message reaches every one; a reply that cannot fit at all (one
    message above a device's small max_frame) is `limit_exceeded`, and the connection stays
    open."""
    big = "b" * 60_000
    with trio.fail_after(60):
        async with harness.client("alice") as alice:
            for i in range(20):
                r = await alice.send(f"{i:02d}{big}", to="bob")
            conv = r.conv
            group = await alice.create_group("empty", ["carol"])
        bob = await RawClient.connect(harness.server, harness.token("bob"), "raw")
        seen, before, pages = [], None, 0
        while True:
            await bob.send(wire.History(id=100 + pages, conv=conv, before=before, limit=50))
            page = await bob.reply(100 + pages)
            assert isinstance(page, wire.Page), page
            pages += 1
            seen += [m.body[:2] for m in page.messages]
            if not page.more:
                break
            assert page.messages and len(page.messages) < 20
            before = page.messages[-1].seq
        assert seen == [f"{i:02d}" for i in reversed(range(20))] and pages > 1
        # An admin reads any conversation and has no inbox of big deliveries of its own.
        small = await RawClient.connect(harness.server, harness.token("ops", "admin"), "small",
                                        max_frame=1024)
        await small.send(wire.History(id=1, conv=conv, limit=1))
        await small.send(wire.Ping(id=2))
        await small.send(wire.History(id=3, conv=group, limit=1))  # an empty page fits
        got = await replies(small, [1, 2, 3])
        assert got[1].name == "limit_exceeded" and "max_frame" in got[1].message, got
        assert isinstance(got[2], wire.Pong) and got[3].messages == ()
        for c in (bob, small):
            await c.aclose()
        tally.add("limit: a reply above the connection's max_frame")


async def test_a_conversation_list_holds_what_fits_the_connections_max_frame(harness, tally):
    """`conv_list` entries with the longest names (128 four-byte characters) are cut to what
    fits a max_frame of 1,024 bytes, one a frame, with `more` set; paging on from the last one
    reaches every conversation."""
    name = "\N{GRINNING FACE}" * 128
    with trio.fail_after(30):
        async with harness.client("alice") as alice:
            groups = sorted([await alice.create_group(name, ["bob"]) for _ in range(5)])
        bob = await RawClient.connect(harness.server, harness.token("bob"), "small",
                                      max_frame=1024)
        seen, after = [], None
        for rid in range(1, 10):
            await bob.send(wire.Convs(id=rid, after=after, limit=50))
            page = await bob.reply(rid)
            assert isinstance(page, wire.ConvList), page
            seen += [(c.conv, c.name) for c in page.convs]
            if not page.more:
                break
            assert len(page.convs) == 1
            after = page.convs[-1].conv
        assert seen == [(g, name) for g in groups] and rid == 5
        await bob.aclose()
        tally.add("limit: a conversation list above the connection's max_frame")


async def test_connections_before_hello_are_bounded_in_number_and_frame_size(tmp_path, tally):
    """Before hello a frame may be at most HELLO_MAX_FRAME_BYTES, whatever --max-frame-bytes
    says, and at most --max-handshakes connections wait for their hello: the next one is
    refused with limit_exceeded at once, and a slot frees when one of them goes."""
    from tests.faults.conftest import raw_bytes_exchange
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", max_frame_bytes=4 << 20,
                              max_handshakes=3) as h:
        with trio.fail_after(30):
            big = (wire.HELLO_MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"\x80"
            got = RawClient(None)
            got.conn.receive_data(await raw_bytes_exchange(h.server, big))
            err = got.conn.next_event()
            assert isinstance(err, wire.Error) and err.name == "too_large", err
            silent = [await trio.open_tcp_stream("127.0.0.1", h.broker.port) for _ in range(3)]
            while h.broker.handshaking < 3:
                await trio.sleep(0.01)
            refused = RawClient(await trio.open_tcp_stream("127.0.0.1", h.broker.port))
            err = await refused.next()
            assert isinstance(err, wire.Error) and err.name == "limit_exceeded" and err.close
            assert await refused.next() is None
            await trio.aclose_forcefully(silent.pop())
            while h.broker.handshaking > 2:
                await trio.sleep(0.01)
            async with h.client("alice") as alice:  # a real client gets the free slot
                await alice.ping()
            for s in silent:
                await trio.aclose_forcefully(s)
            tally.add("limit: frames and connections before hello", 2)


async def test_a_broker_of_small_frames_takes_any_valid_hello(tmp_path, tally):
    """A hello may be HELLO_MAX_FRAME_BYTES whatever the broker's own max_frame (§3.2): one of
    1.3 KiB (16 caps of 64 characters) is welcomed by a broker of 1,024-byte frames. It was
    refused with too_large."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", max_frame_bytes=1024, max_body_bytes=64) as h:
        with trio.fail_after(30):
            c = RawClient(await trio.open_tcp_stream("127.0.0.1", h.broker.port))
            hello = wire.Hello(versions=(1,), token=h.token("alice"), device="d" * 64, id=0,
                               caps=tuple(f"{i:02d}" + "c" * 62 for i in range(16)))
            assert len(wire.Connection(wire.Role.CLIENT).send(hello)) > 1024 + 4
            await c.send(hello)
            welcome = await c.next()
            assert isinstance(welcome, wire.Welcome) and welcome.max_frame == 1024, welcome
            await c.stream.aclose()
            tally.add("limit: a long hello to a broker of small frames")


async def test_typing_notices_past_the_users_rate_are_dropped(tmp_path, tally):
    """--typing-rate bounds the typing notices a user makes reach others (the rest are dropped,
    as typing is ephemeral), so one member cannot flood the others off as slow consumers."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", typing_per_s_per_user=5.0) as h:
        with trio.fail_after(30):
            async with h.client("alice") as alice, h.client("bob") as bob:
                conv = await alice.create_group("g", ["bob"])
                started = trio.current_time()
                for _ in range(200):
                    await alice.typing(conv)
                await alice.ping()  # the typing frames were read before the ping's answer
                took = trio.current_time() - started
                await bob.ping()
                seen = 0
                with trio.move_on_after(0.5):
                    while True:
                        push = await bob.next_push()
                        seen += isinstance(push, wire.TypingNotice)
                # The burst (5), and what the bucket got back while the 200 were read: 5 a
                # second (a fixed 7 allowed 0.4 s, which a loaded machine can take).
                assert 1 <= seen <= 5 + 5 * took + 1, (seen, took)
                tally.add("limit: typing notices per second per user", 200 - seen)


async def test_reconnecting_does_not_refill_the_users_send_rate(tmp_path, tally):
    """The user's bucket outlives their sessions until it refilled: five quick reconnects get
    about one burst of sends accepted, not five."""
    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", sends_per_s_per_user=10.0) as h:
        with trio.fail_after(30):
            accepted = 0
            for round_ in range(5):
                c = await RawClient.connect(h.server, h.token("alice"), "d")
                for i in range(10):
                    await c.send(wire.Send(id=i + 1, cid=f"r{round_}-{i}", body="x", to="bob"))
                got = await replies(c, range(1, 11))
                accepted += sum(isinstance(f, wire.Result) for f in got.values())
                await c.aclose()
            assert 10 <= accepted <= 15, accepted
            tally.add("limit: sends per user across reconnects", 50 - accepted)


async def test_a_burst_of_receipts_in_one_commit_is_no_slow_consumer(tmp_path, tally):
    """Head office reads promptly; 150 stores mark its notice read in the same commit, which
    makes 300 receipts for it (delivered and read) in one fan-out, past --max-pending-pushes
    (50). They are written at the end of the fan-out, and the socket takes them: no
    slow_consumer. It used to be closed as one, losing the receipts, while it was reading."""
    from storage.commands import MarkRead
    from tests.harness import running_broker

    stores = [f"store-{i:03d}" for i in range(150)]
    async with running_broker(tmp_path / "data", max_pending_pushes=50) as h:
        with trio.fail_after(30):
            async with h.client("hq", role="service") as hq:
                conv = await hq.create_channel("notices", stores)
                seq = (await hq.send("Inventory count on Monday", conv=conv)).seq
                for store in stores:  # queued at once: one batch, one fan-out
                    h.broker.committer.enqueue(MarkRead(store, "d1", "user", conv, seq))
                read = set()
                while len(read) < len(stores):
                    push = await hq.next_push()
                    if isinstance(push, wire.Receipt) and push.read == seq:
                        read.add(push.user)
                assert hq.reconnects == 0
                tally.add("limit: a burst of receipts to a reading client", 300)


async def test_a_prompt_reader_of_big_deliveries_is_no_slow_consumer(tmp_path, tally):
    """Deliveries the socket has not taken yet at the end of a fan-out do not count against
    --max-pending-pushes (the window bounds them): bob, reading and acking 200 messages of
    60 KB sent at once, is never closed as a slow consumer. He was, once, at the limit 50."""
    from functools import partial

    from tests.harness import running_broker

    async with running_broker(tmp_path / "data", max_pending_pushes=50) as h:
        with trio.fail_after(60):
            async with h.client("bob") as bob, h.client("alice") as alice:
                got = 0

                async def reader():
                    nonlocal got
                    async for d in bob.deliveries():
                        got += 1
                        await bob.ack(d.inbox_seq)
                        if got == 200:
                            return

                async with trio.open_nursery() as n:
                    n.start_soon(reader)
                    async with trio.open_nursery() as m:
                        for i in range(200):
                            m.start_soon(partial(alice.send, f"{i:03d}" + "y" * 60_000,
                                                 to="bob"))
                assert got == 200 and bob.reconnects == 0
                tally.add("limit: big deliveries to a prompt reader", 200)


async def test_pushes_in_a_fan_out_to_a_client_that_does_not_read_are_bounded(tmp_path, tally):
    """A device whose writer is blocked on its socket (it does not read) is checked against
    --max-pending-pushes at once, even inside a fan-out: the second device of a channel's owner
    that never reads is closed as a slow consumer by the receipts of 150 reads a commit. Its
    queue used to grow without bound (6,000 frames after 20 such commits)."""
    import socket

    from storage.commands import MarkRead
    from tests.harness import running_broker

    stores = [f"store-{i:03d}" for i in range(150)]
    async with running_broker(tmp_path / "data", max_pending_pushes=50) as h:
        with trio.fail_after(60):
            async with h.client("hq", role="service") as hq:
                conv = await hq.create_channel("notices", stores)
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect(("127.0.0.1", h.broker.port))
                stalled = RawClient(trio.SocketStream(sock))
                await stalled.hello(h.token("hq", "service"), "never-reads")
                session = next(s for s in h.broker.hub.sessions("hq") if s.device == "never-reads")
                seq, stuck = 0, 0
                while stuck < 3:  # big posts until its writer stays stuck on the socket
                    seq = (await hq.send("z" * 60_000, conv=conv)).seq
                    await trio.sleep(0.05)
                    stuck = stuck + 1 if session._writing else 0
                rounds = 0
                while rounds < 20:
                    rounds += 1
                    for store in stores:
                        h.broker.committer.enqueue(MarkRead(store, "d1", "user", conv, seq))
                    await hq.ping()
                    if session.reason is not None:
                        break
                    await trio.sleep(0.05)
                assert session.reason is not None and session.reason.value == "slow_consumer"
                assert len(session.out) <= 52, len(session.out)
                sock.close()
                tally.add("limit: fan-out pushes to a client that does not read", rounds)


async def test_a_burst_the_socket_of_an_idle_writer_does_not_take_is_bounded(tmp_path, tally):
    """A device that does not read, whose writer is idle when a fan-out's burst comes (its
    socket took all it was sent so far), is checked after the fan-out's own write
    (`flush_now`): of the 800 receipts of 400 reads in one commit, its socket takes a few
    dozen KiB, far more than --max-pending-pushes (50) are left, and it is closed as a slow
    consumer at once. No test failed without that check: the rest went to its writer, held
    until a later push found it stuck."""
    import socket

    from storage.commands import MarkRead
    from tests.harness import running_broker
    from tests.waits import wait_until

    async def notice(h, stores: list[str]) -> tuple[str, int]:
        """hq's channel of `stores`, and the seq of its notice there (hq gone again)."""
        async with h.client("hq", role="service") as hq:
            conv = await hq.create_channel("notices", stores)
            return conv, (await hq.send("Inventory count on Monday", conv=conv)).seq

    stores = [f"store-{i:03d}" for i in range(400)]
    async with running_broker(tmp_path / "data", max_pending_pushes=50) as h:
        with trio.fail_after(60):
            conv, seq = await notice(h, stores)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", h.broker.port))
            stalled = RawClient(trio.SocketStream(sock))
            await stalled.hello(h.token("hq", "service"), "never-reads")
            (session,) = h.broker.hub.sessions("hq")
            await wait_until(lambda: session.sent == session.head and not session._writing)
            assert not session.out
            pending = [h.broker.committer.enqueue(MarkRead(store, "d1", "user", conv, seq))
                       for store in stores]  # queued at once: one batch, one fan-out
            await wait_until(lambda: all(p.outcome is not None for p in pending))
            assert session.reason is not None and session.reason.value == "slow_consumer"
            sock.close()
            tally.add("limit: a burst to a client that does not read, its writer idle", 800)


async def test_membership_changes_past_the_users_rate_are_refused(broker_process, tally):
    """--change-rate bounds a user's membership changes (create, invite, set_role, join,
    subscribe, leave, remove, mute): past it each is answered rate_limited and nothing of it
    is logged, the connection stays open, other users are not held back, and reconnecting does
    not buy a fresh burst."""
    h = broker_process("--change-rate", "10")
    with trio.fail_after(30):
        start = time.monotonic()
        c = await RawClient.connect(h.server, h.token("alice"), "d")
        for i in range(40):
            await c.send(wire.Create(id=i + 1, kind="group", name=f"g{i}", members=("bob",)))
        got = await replies(c, range(1, 41))
        created = [f.conv for f in got.values() if isinstance(f, wire.Created)]
        refused = [f for f in got.values() if isinstance(f, wire.Error)]
        assert 10 <= len(created) <= 10 + 10 * (time.monotonic() - start) + 1, len(created)
        assert {(f.name, f.close) for f in refused} == {("rate_limited", False)}
        assert len(created) + len(refused) == 40
        for i in range(41, 61):  # other kinds of change share the bucket
            await c.send(wire.Invite(id=i, conv=created[0], user=f"u{i}") if i % 2 else
                         wire.Mute(id=i, conv=created[0], muted=True))
        late = await replies(c, range(41, 61))
        done = sum(isinstance(f, wire.Ok) for f in late.values())
        assert {f.name for f in late.values() if isinstance(f, wire.Error)} == {"rate_limited"}
        assert len(created) + done <= 10 + 10 * (time.monotonic() - start) + 1, done
        await c.aclose()
        again = await RawClient.connect(h.server, h.token("alice"), "d")
        for i in range(10):
            await again.send(wire.Create(id=i + 1, kind="group", name=f"h{i}"))
        got = await replies(again, range(1, 11))
        more = sum(isinstance(f, wire.Created) for f in got.values())
        await again.aclose()
        assert len(created) + done + more <= 10 + 10 * (time.monotonic() - start) + 1
        async with h.client("bob") as bob:  # his own bucket
            page = await bob.conversations()
            assert {e.conv for e in page.convs} == set(created)  # refused: nothing left
            for i in range(5):
                await bob.create_group(f"b{i}", ["alice"])
        tally.add("limit: membership changes per second per user",
                  70 - len(created) - done - more)
