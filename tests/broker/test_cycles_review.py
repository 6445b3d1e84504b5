"""Review of 0efa47e: every kind of request and session end a client can make leaves nothing
of the ended session alive but by reference counting. `homing serve` makes the cyclic GC rare
(broker/serve_cli.py, `_tune_gc`): a cycle through a session (its queues, protocol state,
stream) held it for as long as the GC took to come, for every session that made one."""

from __future__ import annotations

import gc
import ssl
from collections.abc import Callable

import pytest
import trio
import trustme

import protocol as wire
from broker.client import ClientError
from broker.session import Session
from tests.faults.conftest import RawClient, raw_bytes_exchange
from tests.harness import Census, running_broker


async def _hello_refused(h):
    raw = await RawClient.connect(h.server)
    await raw.send(wire.Hello(versions=(1,), token="not a token", device="d", id=0))
    assert isinstance(await raw.next(), wire.Error)
    await raw.stream.aclose()


async def _welcome_then_close(h):
    async with h.client("a"):
        pass


async def _sends(h):
    async with h.client("a") as a:
        await a.send("hi", to="b")
        async with trio.open_nursery() as nursery:  # a cid resent while the first is on its way
            for _ in range(2):
                nursery.start_soon(lambda: a.send("again", to="b", cid="c1"))
        assert (await a.send("again", to="b", cid="c1")).dup  # and after


async def _creates(h):
    async with h.client("a") as a:
        await a.create_group("g0", ["b"])  # its SDK's fresh cid
        async with trio.open_nursery() as nursery:  # one resent while the first is on its way
            for _ in range(2):
                nursery.start_soon(lambda: a.create_group("g", ["b"], cid="x1"))
        await a.create_group("g", ["b"], cid="x1")  # and after


async def _conversation(h):
    async with h.client("a") as a, h.client("b") as b:
        g = await a.create_group("g", ["b"], open=True)
        await a.invite(g, "c")
        await a.set_role(g, "b", "admin")
        await a.remove(g, "c")
        await b.leave(g)
        await b.join(g)
        channel = await a.create_channel("ch", [], open=True)
        await b.subscribe(channel)
        await b.mute(g)
        sent = await a.send("x", conv=g)
        await b.read(g, sent.seq)
        await b.typing(g)
        await a.history(g)
        await a.receipts(g, sent.seq)
        await a.presence(g)
        await a.members(g)
        await a.conversations()
        await a.ping()
        async for d in b.deliveries():
            await b.ack(d.inbox_seq)
            await b.ack(d.inbox_seq, durable=True)
            break


async def _admin_and_revoked(h):
    async with h.client("zed") as zed, h.client("adm", role="admin") as adm:
        await adm.stats()
        await adm.stats("zed", "d1")
        await adm.revoke_tokens("zed")
        with pytest.raises(ClientError), trio.fail_after(10):
            while True:
                await zed.ping()
                await trio.sleep(0.05)


async def _refused(h):
    async with h.client("a") as a:
        with pytest.raises(ClientError):
            await a.send("x", conv="g:none")  # invalid/not found
        g = await a.create_group("g", [])
        with pytest.raises(ClientError, match="rate_limited"):
            for _ in range(50):  # --changes-rate 2 below
                await a.mute(g)


async def _replaced(h):
    async with h.client("a", "dev", reconnect=False) as first:
        async with h.client("a", "dev"):
            with trio.fail_after(10):
                while first.connected.is_set():
                    await trio.sleep(0.05)


async def _idle(h):  # a hello, then silence past --idle-timeout
    raw = await RawClient.connect(h.server, h.token("idle"), "d")
    with trio.fail_after(10):
        while await raw.next() is not None:
            pass
    await raw.stream.aclose()


async def _resent_after_a_drop(h):
    for _ in range(2):
        raw = await RawClient.connect(h.server, h.token("r"), "dev")
        await raw.send(wire.Send(id=1, cid="rc", body="x", to="b"))
        await raw.send(wire.Create(id=2, kind="group", name="g", members=("b",), open=False,
                                   cid="rcg"))
        await raw.send(wire.Send(id=3, cid="rc", body="x", to="b"))
        await raw.send(wire.Create(id=4, kind="group", name="g", members=("b",), open=False,
                                   cid="rcg"))
        await raw.stream.aclose()
    async with h.client("r", "new", start="head") as r:  # its start's durable ack
        await r.ping()


async def _tls(h):
    async with h.client("a", tls=h.tls) as a:
        await a.send("x", to="b")
        await a.create_group("g", ["b"], cid="t1")
        if h.left()[1] == 0:  # else the count of what is left sees nothing, and passes
            pytest.fail(f"{h.left()[1]} server-side ssl.SSLObject for one TLS connection: "
                        f"trio {trio.__version__}'s SSLStream no longer holds one as 0.35's "
                        "did; count what it holds instead")
    hello = wire.encode_frame({"t": "hello", "versions": [1], "token": h.token("x"),
                               "device": "d"})  # in the clear on the TLS port: no TLS begun
    assert b"speaks TLS" in await raw_bytes_exchange(h.server, hello, read_s=5)


KINDS = {"hello_refused": _hello_refused, "welcome_then_close": _welcome_then_close,
         "sends": _sends, "creates": _creates, "conversation": _conversation,
         "admin_and_revoked": _admin_and_revoked, "refused": _refused, "replaced": _replaced,
         "idle": _idle, "resent_after_a_drop": _resent_after_a_drop, "tls": _tls}
SETTINGS = {"refused": {"changes_per_s_per_user": 2}, "idle": {"idle_timeout_s": 1.0,
                                                                "heartbeat_s": 1}}


def _census() -> Callable[[], tuple[int, int]]:
    """Sessions alive, and the broker's TLS objects (server side) alive, of those made from
    now on (not another test's in this worker). Call it after `gc.collect()`."""
    sessions, tls = Census(Session), Census(ssl.SSLObject, lambda o: o.server_side)
    return lambda: (sessions(), tls())


def _layout_note(left: tuple[int, int]) -> str:
    if not left[1]:
        return ""
    return (f"; a TLS stream is left: does broker.connection._let_go still match trio "
            f"{trio.__version__}'s SSLStream (its `_handshook._afn`)?")


def _tls_pair(tmp_path) -> tuple[dict, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(cert_path), append=i > 0)
    cert.private_key_pem.write_to_path(str(key_path))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return {"tls_cert": cert_path, "tls_key": key_path}, ctx


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_an_ended_session_is_freed_by_reference_counting_alone(tmp_path, kind):
    """With the cyclic GC off, once its connections have ended no Session (and, on a TLS
    port, none of the broker's TLS streams) is alive. Until 2026-12-07 a create with a cid
    held its session in a cycle with its Pending (0efa47e), and every TLS connection its
    stream's OpenSSL state, about 24 KiB, in one trio's SSLStream makes with itself."""
    settings, tls = _tls_pair(tmp_path) if kind == "tls" else ({}, None)
    async with running_broker(tmp_path / "data", **settings, **SETTINGS.get(kind, {})) as h:
        h.tls = tls
        gc.collect()
        gc.disable()
        try:
            h.left = _census()
            await KINDS[kind](h)
            left = h.left()
            with trio.move_on_after(10):  # the connections' ends
                while left != (0, 0):
                    await trio.sleep(0.05)
                    left = h.left()
            assert left == (0, 0), f"{left} (sessions, TLS streams) left{_layout_note(left)}"
        finally:
            gc.enable()


async def test_nothing_of_a_session_outlives_a_broker_stop(tmp_path):
    """A stop with a send and a create with a cid on their way: their sessions too."""
    gc.collect()
    gc.disable()
    try:
        left = _census()
        async with running_broker(tmp_path / "data", shutdown_grace_s=1) as h:
            raw = await RawClient.connect(h.server, h.token("a"), "d")
            await raw.send(wire.Send(id=1, cid="s", body="x", to="b"))
            await raw.send(wire.Create(id=2, kind="group", name="g", members=("b",),
                                       open=False, cid="sg"))
            assert left()[0] == 1
        await raw.stream.aclose()
        assert left() == (0, 0)
    finally:
        gc.enable()


async def test_a_create_resent_around_the_moment_the_first_is_answered_is_answered(tmp_path):
    """A create's cid resent again and again while the first is on its way, as it is answered
    and after: each resend waits on the first (`Pending.when_done`) or, once it is done, is
    answered from the store; every one gets the conversation made first, none is left."""
    resends = 300
    async with running_broker(tmp_path / "data") as h:
        raw = await RawClient.connect(h.server, h.token("a"), "d")
        replies: dict[int, object] = {}

        async def write() -> None:
            for i in range(1, resends + 1):
                await raw.send(wire.Create(id=i, kind="group", name="g", members=("b",),
                                           open=False, cid="race"))
                await trio.sleep(0.0002 * (i % 7))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                while len(replies) < resends:
                    frame = await raw.next()
                    assert frame is not None, sorted(set(range(1, resends + 1)) - set(replies))
                    if getattr(frame, "id", None) is not None:
                        replies[frame.id] = frame
        assert {type(f) for f in replies.values()} == {wire.Created}, replies
        assert len({f.conv for f in replies.values()}) == 1
        assert [i for i, f in replies.items() if not f.dup] == [1]
        await raw.aclose()


def test_a_callback_asked_for_after_a_pending_is_done_is_called_at_once():
    """No caller asks it now (each finds its Pending among those still on their way, and they
    are let go before or as they are done); one that did got no call (0efa47e: a fresh list;
    before it, a list never read again), and its request no answer."""
    from broker.committer import Pending
    from storage.commands import SendMessage

    for outcome, error, told in ((type("Outcome", (), {"error": None})(), None, None),
                                 (None, ValueError("disk full"), "disk full")):
        pending = Pending(SendMessage("a", "d", "user", "c1", "hi", to="b"), None)
        pending.finish(outcome, error)
        called: list[object] = []
        pending.when_done(lambda failed, called=called: called.append(failed and str(failed)))
        assert called == [told]
