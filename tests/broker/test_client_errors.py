"""SDK failures reach the caller: requests our own checks refuse, and a client that gave up."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import protocol as wire
from broker.client import ClientError, ConnectionLost
from tests.harness import running_broker
from tests.procs import BrokerProcess

DOCS = Path(__file__).parents[2] / "docs"


def _invalid_calls(conv: str):
    """Requests whose fields the protocol refuses (docs/PROTOCOL.md), one per field rule."""
    return {
        "to and conv": lambda c: c.send("x", to="bob", conv=conv),
        "bad order": lambda c: c.history(conv, order="bogus"),
        "limit 0": lambda c: c.history(conv, limit=0),
        "limit 201": lambda c: c.history(conv, limit=201),
        "read -1": lambda c: c.read(conv, -1),
        "receipts -1": lambda c: c.receipts(conv, -1),
        "long cid": lambda c: c.send("x", conv=conv, cid="c" * 200),
        "bad user": lambda c: c.send("x", to="bad user!"),
        "body over the broker's 64 KiB": lambda c: c.send("x" * 65_537, conv=conv),
        "body over max_frame": lambda c: c.send("x" * 2_000_000, conv=conv),
        "bad conv": lambda c: c.join("notaconv"),
        "long name": lambda c: c.create_group("n" * 300),
    }


async def test_a_request_our_checks_refuse_raises_invalid_at_once(tmp_path):
    """A frame the protocol's field checks refuse is never sent: the call raises ClientError
    "invalid" (code 7) with the check's message, and the connection carries on. (A body over
    the broker's --max-body-bytes is the broker's to refuse, with the same error.)"""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, h.client("shop") as shop:
            conv = await shop.create_group("g", ["bob"])
            for what, call in _invalid_calls(conv).items():
                with pytest.raises(ClientError) as refused:
                    with trio.fail_after(2):
                        await call(shop)
                assert (refused.value.name, refused.value.code) == ("invalid", 7), what
                assert refused.value.message.split(":")[0].split()[0] in {
                    "send", "history", "read", "receipts", "join", "create"}, what
            assert (await shop.send("still fine", conv=conv)).seq == 1
            assert shop.reconnects == 0


async def test_welcome_names_the_role_and_the_body_limit_and_the_sdk_checks_it(tmp_path):
    """welcome carries the token's role and the broker's body limit; the SDK refuses a body
    past that limit itself (`invalid`, nothing sent) and takes one up to it."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", max_body_bytes=100) as h, \
                h.client("shop", role="service") as shop:
            assert (shop.welcome.role, shop.welcome.max_body) == ("service", 100)
            sent = h.broker.hub.sessions("shop")[0].frames_in
            with pytest.raises(ClientError) as refused:
                await shop.send("x" * 101, to="bob")
            assert refused.value.name == "invalid" and "'body'" in refused.value.message
            assert h.broker.hub.sessions("shop")[0].frames_in == sent  # never sent
            assert (await shop.send("x" * 100, to="bob")).seq == 1


async def test_a_bad_request_made_while_disconnected_fails_after_the_reconnect(tmp_path):
    """A request queued while the broker was down is checked when it is sent on the next
    connection: it raises "invalid", and the client does not reconnect over and over."""
    bp = BrokerProcess(tmp_path / "data")
    try:
        await bp.astart()
        with trio.fail_after(30):
            async with bp.client("shop", reconnect_timeout=20) as shop:
                bp.kill()
                with trio.fail_after(5):
                    while shop.connected.is_set():
                        await trio.sleep(0.02)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bp.astart)
                    with pytest.raises(ClientError) as refused:
                        await shop.read("dm:bob:shop", -1)
                assert refused.value.name == "invalid"
                assert (await shop.send("after", to="bob")).seq == 1
                assert shop.reconnects == 1
    finally:
        bp.kill()


async def test_deliveries_raise_connection_lost_when_the_broker_is_gone_for_good(tmp_path):
    """When the client gives up reconnecting, a loop over deliveries (and receive) raises
    ConnectionLost after the deliveries that had arrived, and so does open_client."""
    bp = BrokerProcess(tmp_path / "data")
    got = []
    try:
        await bp.astart()
        with trio.fail_after(30):
            async with bp.client("shop") as shop:
                await shop.send("before", to="bob")
            with pytest.raises(ConnectionLost):
                async with bp.client("bob", reconnect_timeout=1) as bob:
                    with trio.fail_after(5):
                        while bob._inbox.yielded < 1:  # the delivery is in, not yet taken
                            await trio.sleep(0.02)
                    bp.kill()
                    async for d in bob.deliveries():
                        got.append(d.body)
            with pytest.raises(ConnectionLost):
                await bob.deliveries().receive()
            with pytest.raises(ConnectionLost):
                bob.deliveries().receive_nowait()
    finally:
        bp.kill()
    assert got == ["before"]


async def test_deliveries_end_quietly_when_the_client_is_closed(tmp_path):
    """Leaving `open_client` is no failure: a loop over its deliveries just ends."""
    ended = trio.Event()
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            async with h.client("bob") as bob:
                async def listen() -> None:
                    async for _ in bob.deliveries():
                        pass
                    ended.set()

                nursery.start_soon(listen)
                await bob.ping()
            await ended.wait()
            with pytest.raises(trio.EndOfChannel):
                await bob.deliveries().receive()
            with pytest.raises(trio.EndOfChannel):
                bob.deliveries().receive_nowait()


def test_the_first_example_of_client_md_runs_as_written(tmp_path):
    """The opening example of docs/CLIENT.md, run verbatim with HOMING_SERVER and HOMING_TOKEN
    set, sends its message and prints a delivery."""
    text = (DOCS / "CLIENT.md").read_text(encoding="utf-8")
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    with BrokerProcess(tmp_path / "data") as bp:
        env = {**os.environ, "HOMING_SERVER": bp.server,
               "HOMING_TOKEN": bp.token("returns-desk", "service")}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            first = proc.stdout.readline()
            if first:
                trio.run(_send_to, bp, "returns-desk")
                second = proc.stdout.readline()
        finally:
            proc.kill()
            err = proc.communicate(timeout=10)[1]
    assert first.split() == ["dm:member-42:returns-desk", "1", "4", "False"], err
    assert second.split()[1:] == ["dm:member-42:returns-desk", "2", "member-42", "hello"], err


async def _send_to(bp: BrokerProcess, user: str) -> None:
    with trio.fail_after(10):
        async with bp.client("member-42") as member:
            await member.send("hello", to=user)



async def test_bodies_up_to_the_brokers_limit_go_both_ways(tmp_path):
    """The SDK takes the broker's limits, not the protocol's defaults: with --max-body-bytes
    300,000 a 250,000-byte message is sent and delivered (it used to be refused as invalid on
    the way out, and on the way in to drop the connection again and again)."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", max_body_bytes=300_000,
                                  max_frame_bytes=1 << 20) as h:
            async with h.client("alice") as alice, h.client("bob") as bob:
                r = await alice.send("b" * 250_000, to="bob")
                d = await bob.deliveries().receive()
                assert (d.seq, len(d.body)) == (r.seq, 250_000) and bob.reconnects == 0


def _answer_losing_proxy(cut: trio.Event, back: trio.Event | None = None):
    """A `trio.serve_tcp` handler (with `port=` the broker's) in front of the broker. On the
    first connection, once `cut` is set, what the client sends still goes through but the
    broker's answers do not, and 0.3 s later the line drops; later connections pass all (with
    `back`, only once it is set: until then each is closed at once, the broker out of reach)."""
    seen = 0

    async def proxy(client_stream, port):
        nonlocal seen
        seen += 1
        first = seen == 1
        if not first and back is not None and not back.is_set():
            await trio.aclose_forcefully(client_stream)
            return
        broker = await trio.open_tcp_stream("127.0.0.1", port)

        async def pipe(src, dst, swallow):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await src.receive_some(65536):
                    if not (swallow and cut.is_set()):
                        await dst.send_all(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client_stream, broker, False)
            nursery.start_soon(pipe, broker, client_stream, first)
            if first:  # the request goes through, its answer does not; then the line drops
                await cut.wait()
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(client_stream)
        await trio.aclose_forcefully(broker)

    return proxy


async def _serve_proxy(nursery, h, cut: trio.Event, back: trio.Event | None = None) -> str:
    """Start `_answer_losing_proxy` in front of `h`'s broker; return its address."""
    listeners = await nursery.start(functools.partial(
        trio.serve_tcp, functools.partial(_answer_losing_proxy(cut, back), port=h.broker.port),
        0, host="127.0.0.1"))
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_request_not_to_be_repeated_fails_as_the_line_drops(tmp_path):
    """A revoke (never repeated) whose answer is lost with the connection fails with
    ConnectionLost as soon as the drop is seen, while the broker is still out of reach; the
    client then reconnects and goes on. No test told this from failing it only on the
    reconnect's resend (or when the client gives up), which kept the caller waiting for the
    broker to come back to learn that its revoke may not have been carried out."""
    from broker.client import open_client
    from broker.client_inflight import DROPPED

    cut, back = trio.Event(), trio.Event()
    with trio.fail_after(30):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            server = await _serve_proxy(nursery, h, cut, back)
            async with open_client(server, h.token("ops", "admin"), "d1",
                                   reconnect_timeout=None) as ops:
                await ops.ping()
                cut.set()
                with trio.fail_after(5), pytest.raises(ConnectionLost) as lost:
                    await ops.revoke_tokens("bob")
                assert str(lost.value) == DROPPED and ops.reconnects == 0
                back.set()
                await ops.ping()
                assert ops.reconnects == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("step", ["leave", "step_down"])
async def test_a_leave_whose_answer_was_lost_returns_after_the_reconnect(tmp_path, step):
    """The broker carries out a leave, and its answer is lost with the connection: the SDK
    resends it on the next connection, where `forbidden` (not a member any more) means the
    first try took effect, so leave returns instead of raising. So does an admin's set_role
    of themselves to a plain member (no admin any more), which raised `forbidden`."""
    from broker.client import open_client

    cut = trio.Event()
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            server = await _serve_proxy(nursery, h, cut)
            async with h.client("alice") as alice:
                conv = await alice.create_group("g", ["bob"])
                await alice.set_role(conv, "bob", "admin")
            async with open_client(server, h.token("bob"), "d1") as bob:
                cut.set()
                if step == "leave":
                    await bob.leave(conv)
                else:
                    await bob.set_role(conv, "bob", "member")
                assert bob.reconnects == 1
            assert h.broker.store.role(conv, "bob") == (None if step == "leave" else "member")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["group", "channel"])
async def test_a_create_whose_answer_was_lost_makes_one_conversation(tmp_path, kind):
    """The broker makes the group of an order, and its answer is lost with the connection:
    the SDK sends the create again, with the cid it gave it, on the next connection, and gets
    the same conversation. It used to raise ConnectionLost, and asking again made a second
    group with the same courier and customer in it. A later run that asks with a cid of its
    own (the order number) gets the conversation made the first time with it, and nothing is
    logged."""
    from broker.client import open_client

    cut = trio.Event()
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            server = await _serve_proxy(nursery, h, cut)
            store = h.broker.store
            async with open_client(server, h.token("shop"), "d1") as shop:
                cut.set()
                create = shop.create_group if kind == "group" else shop.create_channel
                conv = await create("order 7", ["courier", "customer"])
                assert shop.reconnects == 1
            assert store.user_convs("customer") == [conv]
            async with h.client("shop") as shop:
                create = shop.create_group if kind == "group" else shop.create_channel
                first = await create("order 8", ["courier"], cid="order-8")
                events = store.last_lsn()
                assert await create("order 8 (run 2)", ["customer"], cid="order-8") == first
                assert store.last_lsn() == events  # nothing logged
            assert sorted(store.user_convs("shop")) == sorted([conv, first])
            assert store.user_convs("customer") == [conv]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("when", ["from the start", "after the first welcome"])
async def test_a_create_is_not_repeated_to_a_broker_that_ignores_its_cid(tmp_path, monkeypatch,
                                                                          when):
    """A broker from before 2026-12-05 takes no cid in a create (an unknown key, ignored) and
    says so by the lack of the `create_cid` cap in its welcome: the SDK does not repeat there a
    create cut off by a drop, which would make a second group silently, and raises
    ConnectionLost as it did; nor after a drop from a broker with the cap to one without (a
    downgrade while it reconnected). It repeated it whatever the broker, and the customer was
    put in two groups of the same order."""
    import broker.handshake
    from broker.client import open_client

    cut = trio.Event()
    if when == "from the start":
        monkeypatch.setattr(broker.handshake, "CAPS", ())  # the welcome of a broker from before
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h, trio.open_nursery() as nursery:
            server = await _serve_proxy(nursery, h, cut)
            async with open_client(server, h.token("shop"), "d1") as shop:
                assert (wire.CAP_CREATE_CID in shop.welcome.caps) == (when != "from the start")
                monkeypatch.setattr(broker.handshake, "CAPS", ())  # the broker it reconnects to
                commands = h.broker.committer.commands
                cut.set()
                with pytest.raises(ConnectionLost):
                    await shop.create_group("order 7", ["courier", "customer"])
                await shop.ping()  # and the client goes on
                assert shop.reconnects == 1
            # The create reached the broker once: not sent again (this broker, whatever its
            # caps say, would answer a repeat as a dup; one from before would not).
            assert h.broker.committer.commands - commands == 1
            nursery.cancel_scope.cancel()


async def test_a_create_repeated_past_the_change_rate_is_answered(tmp_path):
    """A create repeated with its cid past --change-rate (a burst of resends after a reconnect,
    a script run again at once) is answered with the conversation made first, as a send's
    repeat is past the send rates: it was refused rate_limited, though the broker knew the
    answer. A create with a new cid is still held to the rate; the same cid for the other kind
    is told its conflict."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", changes_per_s_per_user=0.01) as h:
            async with h.client("shop") as shop:
                conv = await shop.create_group("order 7", ["courier"], cid="order-7")
                lsn = h.broker.store.last_lsn()
                assert await shop.create_group("order 7", ["courier"], cid="order-7") == conv
                assert h.broker.store.last_lsn() == lsn
                with pytest.raises(ClientError) as refused:
                    await shop.create_group("order 8", ["courier"], cid="order-8")
                assert refused.value.name == "rate_limited"
                with pytest.raises(ClientError) as refused:  # the other kind: a conflict
                    await shop.create_channel("order 7", ["courier"], cid="order-7")
                assert refused.value.name == "conflict"


async def test_a_client_whose_token_expires_stops_with_unauthorized(tmp_path):
    """The broker ends a session whose token expired; the SDK does not reconnect with it (it
    would be refused), and its deliveries raise the broker's `unauthorized`."""
    from broker import tokens
    from broker.client import open_client

    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h:
            token = tokens.issue(h.broker.secret, "bob", "user", 2)
            with pytest.raises(ClientError) as stopped:
                async with open_client(h.server, token, "d1") as bob:
                    async for _ in bob.deliveries():
                        pass
            assert stopped.value.name == "unauthorized" and bob.reconnects == 0


async def test_a_leave_made_while_disconnected_still_reports_forbidden(tmp_path):
    """Only a leave that had reached a connection can have been carried out: one made while the
    broker was away is sent first after the reconnect, and its `forbidden` is the answer."""
    with BrokerProcess(tmp_path / "data") as bp, trio.fail_after(40):
        async with bp.client("alice") as alice:
            with pytest.raises(ClientError):
                await alice.leave("grp:00000000000000aa")  # connected: forbidden
            bp.kill()
            while alice.connected.is_set():  # until the client has seen the drop
                await trio.sleep(0.01)
            got = {}

            async def leave() -> None:
                try:
                    got["r"] = await alice.leave("grp:00000000000000aa")
                except ClientError as exc:
                    got["r"] = exc.name

            async with trio.open_nursery() as nursery:
                nursery.start_soon(leave)
                await trio.sleep(0.3)  # made while nobody listens
                await bp.astart()
            assert got["r"] == "forbidden" and alice.reconnects >= 1


async def test_a_create_repeated_while_its_first_commits_is_answered_past_the_change_rate(
        tmp_path):
    """A burst of the same create, pipelined past --change-rate (an SDK resending on a new
    connection before the first one's answer came back): the repeats that arrive while the
    first is still being committed are answered with its conversation (`dup`), as the repeats
    that arrive after it are; they were refused rate_limited. One conversation is made. A
    repeat of a first create that failed stays refused rate_limited (nothing was done)."""
    from tests.faults.conftest import RawClient, replies

    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", changes_per_s_per_user=0.01,
                                  max_members=3) as h:
            c = await RawClient.connect(h.server, h.token("shop"), "d1")
            c2 = await RawClient.connect(h.server, h.token("shop"), "d2")
            burst = [wire.Create(id=i, kind="group", name="order 9", members=("courier",),
                                 cid="order-9") for i in range(1, 21)]
            await c.stream.send_all(b"".join(c.conn.send(f) for f in burst))
            await c2.send(wire.Create(id=1, kind="group", name="order 9", cid="order-9"))
            got = await replies(c, range(1, 21))
            other = await c2.reply(1)
            assert {type(f).__name__ for f in got.values()} == {"Created"}, got
            assert len({f.conv for f in got.values()} | {other.conv}) == 1
            assert [f.dup for f in got.values()] == [False] + [True] * 19
            assert other.dup
            # The first on its way is refused (the other kind: conflict), but the cid did make
            # a conversation: a repeat waiting for it is still a repeat of that one.
            conv = other.conv
            await c.stream.send_all(c.conn.send(wire.Create(id=30, kind="channel", name="x",
                                                            cid="order-9"))
                                    + c.conn.send(wire.Create(id=31, kind="group", name="x",
                                                              cid="order-9")))
            got = await replies(c, (30, 31))
            assert got[30].name == "conflict" and (got[31].conv, got[31].dup) == (conv, True)
            # A first create the rules refuse (past --max-members): its repeats past the rate
            # are not repeats of anything done.
            ops = await RawClient.connect(h.server, h.token("ops"), "d1")
            many = tuple(f"u{i}" for i in range(h.broker.config.max_members + 1))
            await ops.stream.send_all(ops.conn.send(wire.Create(
                id=1, kind="group", name="big", members=many, cid="big"))
                + ops.conn.send(wire.Create(id=2, kind="group", name="big", cid="big")))
            got = await replies(ops, (1, 2))
            assert (got[1].name, got[2].name) == ("limit_exceeded", "rate_limited"), got
            for client in (c, c2, ops):
                await client.aclose()


async def test_a_send_repeated_while_its_first_commits_is_a_dup_past_the_rate_and_policy(
        tmp_path):
    """A burst of the same send, pipelined past --send-rate (an SDK resending on a new
    connection before the first one's result came back): the repeats that arrive while the
    first is still being committed are answered with its result (`dup`), as the repeats that
    arrive after it are; they were refused rate_limited. One message is appended. The same
    holds past a content policy that would refuse the text. A repeat of a first send that
    failed stays refused (nothing was done that it repeats)."""
    from tests.faults.conftest import RawClient, replies

    words = tmp_path / "words.txt"
    words.write_text("badword\n")
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", sends_per_s_per_connection=1.0,
                                  content_policy=words) as h:
            c = await RawClient.connect(h.server, h.token("shop"), "d1")
            c2 = await RawClient.connect(h.server, h.token("shop"), "d2")
            burst = [wire.Send(id=i, cid="order-9 ready", body="ready", to="bob")
                     for i in range(1, 21)]
            await c.stream.send_all(b"".join(c.conn.send(f) for f in burst))
            await c2.send(wire.Send(id=1, cid="order-9 ready", body="ready", to="bob"))
            got = await replies(c, range(1, 21))
            other = await c2.reply(1)
            assert {type(f).__name__ for f in got.values()} == {"Result"}, got
            assert [f.dup for f in got.values()] == [False] + [True] * 19
            assert other.dup and {(f.conv, f.seq, f.lsn) for f in got.values()} == {
                (other.conv, other.seq, other.lsn)}
            messages, _more = h.broker.store.history(other.conv, limit=100)
            assert [m["seq"] for m in messages] == [other.seq] == [1]

            # The content policy: c2's bucket has refilled; its first send of a forbidden word
            # is refused, and so are its repeats.
            await trio.sleep(1.1)
            c3 = await RawClient.connect(h.server, h.token("shop"), "d3")
            await c3.stream.send_all(b"".join(
                c3.conn.send(wire.Send(id=i, cid="bad", body="badword", to="bob"))
                for i in (1, 2, 3)))
            got = await replies(c3, (1, 2, 3))
            assert [f.name for f in got.values()] == ["rejected_content"] + ["rate_limited"] * 2

            # A first send the rules refuse (to a conversation it is not in): its repeats past
            # the rate are not repeats of anything done.
            ops = await RawClient.connect(h.server, h.token("ops"), "d1")
            await ops.stream.send_all(b"".join(
                ops.conn.send(wire.Send(id=i, cid="x", body="hi", conv=other.conv))
                for i in (1, 2)))
            got = await replies(ops, (1, 2))
            assert (got[1].name, got[2].name) == ("forbidden", "rate_limited"), got
            for client in (c, c2, c3, ops):
                await client.aclose()


async def test_a_refused_resend_answered_as_a_dup_at_the_inflight_limit_leaves_no_coroutine(
        tmp_path):
    """A resend refused by the user's send rate while its first commits is submitted once the
    first is durable, from the commit's callback, not from the connection's reader: at
    --max-inflight-requests its wait for a free place must not be made and dropped (a
    coroutine never awaited: a RuntimeWarning on the broker's stderr, not a log line, each
    time). It is answered as a dup all the same."""
    import gc
    import warnings

    from tests.faults.conftest import RawClient

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trio.fail_after(20):
            async with running_broker(tmp_path / "d", sends_per_s_per_user=0.5,
                                      max_inflight_requests=1) as h:
                c = await RawClient.connect(h.server, h.token("shop"), "d1")
                c2 = await RawClient.connect(h.server, h.token("shop"), "d2")
                send = wire.Send(id=1, cid="order-9 ready", body="ready", to="bob")
                await c.send(send)
                await c2.send(send)
                first, again = await c.reply(1), await c2.reply(1)
                assert type(first).__name__ == type(again).__name__ == "Result", (first, again)
                assert (first.dup, again.dup) == (False, True)
                for client in (c, c2):
                    await client.aclose()
        gc.collect()
    unawaited = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert unawaited == [], unawaited
