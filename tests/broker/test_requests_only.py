"""Requests-only sessions (`hello.deliver: false`, PROTOCOL.md §5.2, §9): a session of a device
that is sent no deliveries and no pushes, replaces no session of its device and is replaced by
none, and does not count for presence; its sends are still its device's own. The one-shot
`homing` commands open one, so a `homing send` no longer ends the `homing listen` of its user
and device. Real brokers on loopback (in this process and as child processes), real LMDB, raw
protocol sessions, the SDK and the CLI."""

from __future__ import annotations

import functools
import json
import os
import select
import struct
import subprocess

import msgpack
import pytest
import trio

import protocol as wire
from broker import tokens
from broker.client import ClientError, open_client
from tests.faults.conftest import PlayedBroker, RawClient
from tests.harness import running_broker
from tests.procs import BrokerProcess, as_user, homing, homing_cmd, lines

QUIET_S = 0.3  # how long a session is watched for frames it must not get


async def _hello(server: str, token: str, device: str, deliver: bool = True) -> RawClient:
    c = await RawClient.connect(server)
    await c.hello(token, device, deliver=deliver)
    return c


async def _nothing_more(c: RawClient) -> list:
    """What `c` is sent within QUIET_S (after a ping it asked, so the broker is past whatever
    came before): the frames other than that ping's pong."""
    await c.send(wire.Ping(id=777))
    got = []
    with trio.fail_after(10):
        while not isinstance(f := await c.next(), wire.Pong):
            assert f is not None, got
            got.append(f)
    with trio.move_on_after(QUIET_S):
        while (f := await c.next()) is not None:
            got.append(f)
    return got


async def _next_of(c: RawClient, kind: type):
    with trio.fail_after(10):
        while not isinstance(f := await c.next(), kind):
            assert f is not None and not isinstance(f, wire.Bye | wire.Error), f
    return f


async def test_requests_only_sessions_beside_the_delivering_one(tmp_path):
    """bob's device "d" has a delivering session and two requests-only ones: none replaces
    another; the requests-only ones are sent no deliveries and no pushes (receipt, typing,
    status), their sends are the device's own (its delivering session is not sent them; bob's
    other device is), and an ack on them is refused `invalid`, the session open still."""
    async with running_broker(tmp_path / "data") as h:
        alice = await _hello(h.server, h.token("alice"), "a1")
        await alice.send(wire.Send(id=1, cid="a-1", body="one", to="bob"))
        assert isinstance(await alice.reply(1), wire.Result)
        listener = await _hello(h.server, h.token("bob"), "d")
        assert wire.CAP_REQUESTS_ONLY in listener.welcome.caps
        assert (await _next_of(listener, wire.Deliver)).inbox_seq == 1
        await listener.send(wire.Ack(upto=1, id=2))
        assert isinstance(await listener.reply(2), wire.Ok)
        other = await _hello(h.server, h.token("bob"), "other")
        assert (await _next_of(other, wire.Deliver)).inbox_seq == 1
        one = await _hello(h.server, h.token("bob"), "d", deliver=False)
        two = await _hello(h.server, h.token("bob"), "d", deliver=False)
        # welcome: the device's cursor and the inbox head, as the broker holds them
        assert (one.welcome.acked, one.welcome.head) == (1, 1)
        assert wire.CAP_REQUESTS_ONLY in one.welcome.caps

        await one.send(wire.Send(id=3, cid="b-1", body="from d", to="alice"))
        sent = await one.reply(3)
        assert isinstance(sent, wire.Result)
        assert (await _next_of(alice, wire.Deliver)).body == "from d"
        assert (await _next_of(other, wire.Deliver)).body == "from d"  # bob's other device
        await alice.send(wire.Typing(conv=sent.conv))
        await alice.send(wire.Read(id=5, conv=sent.conv, upto=sent.seq))
        assert isinstance(await alice.reply(5), wire.Ok)
        await alice.send(wire.Send(id=4, cid="a-2", body="two", to="bob"))
        # The delivering session: alice's next (not bob's own send of "d"), and the pushes.
        got: dict[type, object] = {}
        with trio.fail_after(10):
            while len(got) < 3:
                f = await listener.next()
                assert f is not None and not isinstance(f, wire.Bye | wire.Error), f
                got.setdefault(type(f), f)
        assert (got[wire.Deliver].inbox_seq, got[wire.Deliver].body) == (3, "two")
        assert got[wire.Receipt].user == "alice" and got[wire.TypingNotice].user == "alice"
        await two.send(wire.Ack(upto=3, id=6))
        refused = await two.reply(6)
        assert isinstance(refused, wire.Error) and refused.name == "invalid" and not refused.close
        assert "no deliveries" in refused.message
        for c in (one, two):
            assert await _nothing_more(c) == []
        await two.send(wire.History(id=7, conv=sent.conv, limit=10))  # served, newest first
        assert [m.body for m in (await two.reply(7)).messages] == ["two", "from d", "one"]
        await listener.send(wire.Ack(upto=3, id=8))
        assert isinstance(await listener.reply(8), wire.Ok)
        assert h.broker.store.delivered("bob", "d") == 3
        assert not [f for f in await _nothing_more(listener) if isinstance(f, wire.Bye)]
        for c in (alice, listener, other, one, two):
            await c.aclose()


async def test_a_requests_only_session_is_not_presence(tmp_path):
    """A user whose only session is requests-only is not online: no `status` to a peer when
    it opens or closes, and a `presence` query leaves them out; their delivering session is
    announced as before."""
    async with running_broker(tmp_path / "data") as h:
        alice = await _hello(h.server, h.token("alice"), "a1")
        await alice.send(wire.Send(id=1, cid="a-1", body="hi", to="bob"))
        conv = (await alice.reply(1)).conv
        sender = await _hello(h.server, h.token("bob"), "cli", deliver=False)
        await alice.send(wire.Presence(id=2, conv=conv))
        # Every frame up to the reply: `reply` skipped pushes, so a `status` sent as the
        # requests-only session opened went unseen.
        before = []
        while not isinstance(f := await alice.next(), wire.PresenceList):
            assert f is not None, before
            before.append(f)
        assert f.online == ("alice",)
        assert not [f for f in before if isinstance(f, wire.Status)], before
        await sender.aclose()
        assert not [f for f in await _nothing_more(alice) if isinstance(f, wire.Status)]
        listener = await _hello(h.server, h.token("bob"), "cli")
        status = await _next_of(alice, wire.Status)
        assert (status.user, status.online) == ("bob", True)
        await listener.aclose()
        status = await _next_of(alice, wire.Status)
        assert (status.user, status.online) == ("bob", False)
        await alice.aclose()


async def test_requests_only_sessions_count_for_the_connection_limits(tmp_path):
    """--max-connections-per-user counts requests-only sessions: the user's delivering
    session and one requests-only session reach 2, and a third session, requests-only or a
    new device, is refused `limit_exceeded`; the device's delivering session may still
    reconnect (it replaces its own)."""
    async with running_broker(tmp_path / "data", max_connections_per_user=2) as h:
        listener = await _hello(h.server, h.token("bob"), "d")
        sender = await _hello(h.server, h.token("bob"), "d", deliver=False)
        # ("d", False): a requests-only session of the connected device "d" replaces none,
        # so it is refused as a new device's is (every refused hello here was of device "x").
        for device, deliver in (("x", False), ("x", True), ("d", False)):
            c = await RawClient.connect(h.server)
            await c.send(wire.Hello(versions=(1,), token=h.token("bob"), device=device, id=0,
                                    deliver=deliver))
            refused = await c.next()
            assert isinstance(refused, wire.Error) and refused.name == "limit_exceeded", refused
            # What the refused one may do: a device may reconnect over its own session; a
            # requests-only session replaces none, so it is told what frees a connection (it
            # was told "a device already connected may reconnect", which it cannot).
            assert refused.message.startswith("this user has 2 connections, the most the "
                                              "broker allows per user; "), refused
            assert ("a device already connected may reconnect" in refused.message) == deliver
            if not deliver:
                assert refused.message.endswith(
                    "a requests-only session waits for one to close (one whose connection "
                    "dropped unseen closes after 45 s without a frame, the idle timeout)"), \
                    refused
            await c.aclose()
        again = await _hello(h.server, h.token("bob"), "d")
        assert isinstance(await _next_of(listener, wire.Bye), wire.Bye)
        for c in (again, sender, listener):
            await c.aclose()


async def test_a_revocation_ends_the_requests_only_sessions_too(tmp_path):
    """An admin's revocation of bob's tokens ends his requests-only session as his others."""
    async with running_broker(tmp_path / "data") as h:
        sender = await _hello(h.server, h.token("bob"), "cli", deliver=False)
        admin = await _hello(h.server, h.token("root", "admin"), "ops")
        await admin.send(wire.Revoke(id=1, user="bob"))
        end = await _next_of(sender, wire.Error)
        assert end.name == "unauthorized" and end.close
        await admin.aclose()
        await sender.aclose()


async def test_a_stop_says_shutting_down_to_the_requests_only_sessions_too(tmp_path):
    """A broker that stops tells its requests-only sessions `shutting_down` as it tells the
    others (it told the delivering sessions alone, and cut the others off at the grace's end
    with nothing said), and logs their end with the close reason `shutdown`."""
    async with running_broker(tmp_path / "data") as h:
        sender = await _hello(h.server, h.token("bob"), "cli", deliver=False)
        listener = await _hello(h.server, h.token("bob"), "cli")
        h.broker.shutdown()
        for c in (sender, listener):
            end = await _next_of(c, wire.Error)
            assert end.name == "shutting_down" and end.close, end
            await c.aclose()
        await h.broker.wait_stopped()
        closed = [e for e in h.logs if e["event"] == "connection_closed"]
        assert sorted(e["reason"] for e in closed) == ["shutdown", "shutdown"]


async def test_a_plain_hello_replaces_as_before(tmp_path):
    """Without the field, a second session of the device replaces the first (`bye`), as §9
    says: a guard that the default is unchanged."""
    async with running_broker(tmp_path / "data") as h:
        first = await _hello(h.server, h.token("bob"), "d")
        c = await RawClient.connect(h.server, h.token("bob"), "d")
        bye = await _next_of(first, wire.Bye)
        assert bye.reason == wire.BYE_REPLACED
        await c.aclose()
        await first.aclose()


async def test_the_sdk_keeps_the_mode_and_refuses_deliveries_and_acks(tmp_path):
    """`open_client(deliver=False)`: `deliveries()`, `ack` and `done` raise ClientError
    `invalid` at once; it sends and queries beside the device's delivering client, which is
    not replaced, nor sent its sends."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("bob", "cli") as listener, \
                h.client("bob", "cli", deliver=False) as sender, h.client("alice") as alice:
            assert wire.CAP_REQUESTS_ONLY in sender.welcome.caps
            for call in (sender.deliveries, lambda: sender.ack(0), lambda: sender.done(1)):
                with pytest.raises(ClientError) as refused:
                    result = call()
                    if hasattr(result, "__await__"):
                        await result
                assert refused.value.name == "invalid"
                assert "deliver=False" in refused.value.message
            await sender.send("from bob", to="alice")
            assert (await alice.deliveries().receive()).body == "from bob"
            await alice.send("back", to="bob")
            d = await listener.deliveries().receive()
            assert (d.inbox_seq, d.body) == (2, "back")
            await listener.ack(d, durable=True)
            await sender.ping()
            assert listener.reconnects == 0 and sender.reconnects == 0


def test_the_sdk_reconnects_requests_only(tmp_path):
    """After the broker is killed and restarted, a requests-only client's reconnect is
    requests-only still: it and the delivering client of its device both come back, and
    neither ends the other."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()

    async def run() -> None:
        async with bp.client("bob", "cli", reconnect_timeout=20) as listener, \
                bp.client("bob", "cli", deliver=False, reconnect_timeout=20) as sender:
            bp.kill()
            await bp.astart()
            with trio.fail_after(20):
                while listener.reconnects == 0 or sender.reconnects == 0:
                    await trio.sleep(0.05)
            await sender.send("after", to="alice")
            async with bp.client("alice", "a1") as alice:
                await alice.send("to bob", to="bob")
            d = await listener.deliveries().receive()
            assert d.body == "to bob"
            await listener.ack(d, durable=True)
            await sender.ping()
            assert (listener.reconnects, sender.reconnects) == (1, 1)

    try:
        trio.run(run)
    finally:
        bp.kill()


def test_homing_send_leaves_the_listener_of_its_device_running(tmp_path):
    """`homing listen` (device "cli") runs while the same user runs `homing send` and
    `homing convs` (device "cli" too): the listener is not replaced (it was, at once: exit 1
    `replaced`), it is not sent the message `homing send` sent (the device's own), and it
    prints what bob sends next."""
    with BrokerProcess(tmp_path / "data") as bp:
        shop, bob = as_user(bp, "shop"), as_user(bp, "bob")
        homing("send", "--to", "shop", "first", env=bob)
        listen = subprocess.Popen([*homing_cmd(), "listen", "--count", "2"],
                                  env={**os.environ, **shop}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([listen.stdout], [], [], 20)
            assert ready and json.loads(listen.stdout.readline())["body"] == "first"
            sent = lines(homing("send", "--to", "bob", "hello", env=shop))
            assert [(r["seq"], r["dup"]) for r in sent] == [(2, False)]
            assert len(lines(homing("convs", env=shop))) == 1
            homing("send", "--to", "shop", "second", env=bob)
            ready, _, _ = select.select([listen.stdout], [], [], 20)
            assert ready
            line = listen.stdout.readline()
            assert line, listen.stderr.read()
            got = json.loads(line)
            assert (got["inbox_seq"], got["body"]) == (3, "second")
            assert listen.wait(timeout=20) == 0
        finally:
            listen.kill()
            listen.wait()
        # Every entry, the shop's own send too, is behind the device's cursor now.
        assert lines(homing("listen", "--timeout", "0.5", env=shop)) == []


async def test_a_deliver_that_is_not_a_bool_is_refused_invalid(tmp_path):
    """`deliver: "no"` is refused `invalid` (closing) in place of `welcome`, naming the field;
    an unknown hello field is still ignored (§3.3), as a server without the cap ignores this
    one; the broker serves on."""
    async with running_broker(tmp_path / "data") as h:
        for extra, welcomed in (({"deliver": "no"}, False), ({"deliver_later": 1}, True)):
            stream = await trio.open_tcp_stream("127.0.0.1", h.broker.port)
            body = msgpack.packb({"t": "hello", "versions": [1], "token": h.token("bob"),
                                  "device": "x", **extra}, use_bin_type=True)
            await stream.send_all(struct.pack(">I", len(body)) + body)
            data = b""
            with trio.fail_after(10):
                while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                    chunk = await stream.receive_some(65536)
                    assert chunk, data
                    data += chunk
            got = msgpack.unpackb(data[4:4 + struct.unpack(">I", data[:4])[0]], raw=False)
            if welcomed:
                assert got["t"] == "welcome" and "requests_only" in got["caps"], got
            else:
                assert (got["t"], got["name"], got["close"]) == ("error", "invalid", True), got
                assert "deliver" in got["message"]
            await stream.aclose()


async def test_the_sdk_with_a_broker_without_the_cap_proceeds(tmp_path):
    """Against a broker from before the cap (played here by a server on the real protocol
    connection: its welcome lists `create_cid` and `start_head` only, and it delivers, as
    such a broker would to a session it takes for the device's), a requests-only client
    connects, its hello asked `deliver: false`, it drops the delivery and the push it is
    sent (nothing queued, nothing acked), and its requests are answered."""
    hellos: list[wire.Hello] = []
    frames_in: list[object] = []

    async def old_broker(stream: trio.SocketStream) -> None:
        played = PlayedBroker(stream)
        hellos.append(await played.next_frame())
        await played.send(wire.Welcome(
            1, "s-old", "bob", 0, 1 << 20, 15, 0, 1, ("create_cid", "start_head"), id=None))
        await played.send(wire.Deliver(
            inbox_seq=1, kind="msg", conv="dm:alice:bob", seq=1, sender="alice", body="hi",
            cid="c1", ts=1), wire.Status(user="alice", online=True))
        while (frame := await played.next_frame()) is not wire.CLOSED:
            frames_in.append(frame)
            if isinstance(frame, wire.Ping):
                await played.send(wire.Pong(id=frame.id))

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, old_broker, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with open_client(f"127.0.0.1:{port}", "v1.any.token", "cli",
                               deliver=False, reconnect=False) as client:
            assert wire.CAP_REQUESTS_ONLY not in client.welcome.caps
            await client.ping()
            with pytest.raises(ClientError):
                client.deliveries()
            assert client._deliveries._channel.statistics().current_buffer_used == 0
            assert not client._inbox.pushes
        nursery.cancel_scope.cancel()
    assert [h.deliver for h in hellos] == [False]
    assert not [f for f in frames_in if isinstance(f, wire.Ack)]


async def test_the_sdk_refuses_a_deliver_that_is_not_a_bool_before_connecting(tmp_path):
    """`open_client(deliver=None)` raises ClientError `invalid` at once, as 0 or "no" do: None
    was left off the wire, so the broker opened the device's delivering session, which
    replaced the device's running client, while the new one dropped what it was sent."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("bob", "cli") as listener:
            for value in (None, 0, "no"):
                with pytest.raises(ClientError) as refused:
                    async with h.client("bob", "cli", deliver=value, reconnect=False):
                        pass
                assert refused.value.name == "invalid" and "deliver" in refused.value.message
            await listener.ping()  # not replaced
            assert listener.reconnects == 0
        assert [e.get("deliver") for e in h.logs if e["event"] == "connection_opened"] == [True]


async def test_receipts_pushed_is_false_on_a_requests_only_client(tmp_path):
    """`receipts_pushed` says no on a requests-only client, which is pushed nothing, even in a
    direct conversation (it said yes, and `next_push` then raised `invalid`); the device's
    delivering client is told yes, as before."""
    async with running_broker(tmp_path / "data") as h:
        async with h.client("bob", "cli") as listener, \
                h.client("bob", "cli", deliver=False) as sender:
            conv = (await sender.send("hi", to="alice")).conv
            members = await sender.members(conv)
            assert members.kind == "direct"
            assert sender.receipts_pushed(members) is False
            assert listener.receipts_pushed(members) is True


def test_homing_presence_lists_its_user_only_while_a_listen_of_theirs_runs(tmp_path):
    """`homing presence` (a requests-only session) does not list the user running it, whose
    own session made them online until 2026-12-05 (docs/CLI.md); a `homing listen` of theirs
    does."""
    with BrokerProcess(tmp_path / "data") as bp:
        alice, bob = as_user(bp, "alice"), as_user(bp, "bob")
        conv = lines(homing("send", "--to", "bob", "hi", env=alice))[0]["conv"]
        assert lines(homing("presence", conv, env=bob)) == [{"conv": conv, "online": []}]
        listen = subprocess.Popen([*homing_cmd(), "listen", "--count", "2"],
                                  env={**os.environ, **bob}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([listen.stdout], [], [], 20)
            assert ready and json.loads(listen.stdout.readline())["body"] == "hi"
            assert lines(homing("presence", conv, env=bob)) == [{"conv": conv, "online": ["bob"]}]
        finally:
            listen.kill()
            listen.wait()


async def test_the_idle_watch_ends_requests_only_sessions_and_the_hub_forgets_them(tmp_path):
    """The idle timeout and an expired token end a requests-only session as any other
    (closing `timeout`, `unauthorized`), and the hub keeps nothing of it after: no connection
    counted, no entry for its user among the requests-only sessions."""
    async with running_broker(tmp_path / "data", idle_timeout_s=1.0, heartbeat_s=1) as h:
        hub = h.broker.hub
        for ttl, name in ((3600, "timeout"), (2, "unauthorized")):  # 2: 1 s at least
            c = await _hello(h.server, tokens.issue(h.broker.secret, "bob", "user", ttl), "cli",
                             deliver=False)
            with trio.fail_after(10):
                while True:
                    if ttl == 2:  # kept from idling: the token's expiry is what ends it
                        await c.send(wire.Ping(id=1))
                    if isinstance(end := await c.next(), wire.Error):
                        break
                    assert isinstance(end, wire.Pong), end
                    await trio.sleep(0.1)  # the pace of its pings
            assert (end.name, end.close) == (name, True), end
            await c.aclose()
            with trio.fail_after(10):
                while hub.count:
                    await trio.sleep(0.01)
            assert hub._requesting == {} and hub.user_count("bob") == 0


async def test_an_ack_passes_the_requests_only_sends_made_while_it_was_due(tmp_path):
    """A bot's turn: its listener holds a delivery, its requests-only session of the same
    device answers it, then the listener acks the delivery: the ack takes the device's cursor
    past the answer too (the device's own), durably once its `ok` comes, so the next session
    of the device resumes at the head. It stopped at the delivery acked: the answer lay past
    the cursor, read again and passed over by the next session, `welcome.acked` behind."""
    async with running_broker(tmp_path / "data") as h:
        alice = await _hello(h.server, h.token("alice"), "a1")
        listener = await _hello(h.server, h.token("bob"), "bot")
        answers = await _hello(h.server, h.token("bob"), "bot", deliver=False)
        await alice.send(wire.Send(id=1, cid="q-1", body="question", to="bob"))
        assert isinstance(await alice.reply(1), wire.Result)
        asked = await _next_of(listener, wire.Deliver)
        await answers.send(wire.Send(id=2, cid="r-1", body="answer", to="alice"))
        assert isinstance(await answers.reply(2), wire.Result)
        await listener.send(wire.Ack(upto=asked.inbox_seq, id=3))
        assert isinstance(await listener.reply(3), wire.Ok)
        store = h.broker.store
        assert store.inbox_head("bob") == 2
        assert store.delivered("bob", "bot") == 2
        await listener.aclose()
        again = await _hello(h.server, h.token("bob"), "bot")
        assert (again.welcome.acked, again.welcome.head) == (2, 2)
        assert await _nothing_more(again) == []
        for c in (alice, answers, again):
            await c.aclose()


async def test_a_requests_only_hello_asking_start_head_moves_no_cursor(tmp_path):
    """`start: "head"` starts a new device's cursor at the inbox head, but a requests-only
    session never moves its device's cursor (PROTOCOL.md §9): its welcome names the cursor as
    held (none), nothing is acked for it, and the device's delivering session that comes later
    is sent the whole inbox. No test asked both at once, so a start made for it passed."""
    async with running_broker(tmp_path / "data") as h:
        alice = await _hello(h.server, h.token("alice"), "a1")
        for i in range(2):
            await alice.send(wire.Send(id=i, cid=f"a-{i}", body=f"m{i}", to="bob"))
            assert isinstance(await alice.reply(i), wire.Result)
        one = await RawClient.connect(h.server)
        welcome = await one.hello(h.token("bob"), "cli", deliver=False, start="head")
        assert (welcome.acked, welcome.head) == (0, 2), welcome
        await one.send(wire.Ping(id=1))
        assert isinstance(await one.reply(1), wire.Pong)
        assert h.broker.store.delivered("bob", "cli") == 0
        assert h.broker.committer.acked_mark("bob", "cli") == 0
        listener = await _hello(h.server, h.token("bob"), "cli")
        assert listener.welcome.acked == 0
        assert (await _next_of(listener, wire.Deliver)).inbox_seq == 1
        for c in (alice, one, listener):
            await c.aclose()
