"""Review of what connections that end badly leave behind: a broker up for weeks sees phones
drop mid-frame, reset, hang up before their hello or in the middle of it, devices replaced in
a loop, revoked and expired tokens. None of that may leave a session, a task, a socket or an
entry of the broker's maps once it is over."""

from __future__ import annotations

import gc
import os
import socket
import struct

import trio

import protocol as wire
from broker import tokens
from broker.client import ClientError
from broker.session import Session
from tests.faults.conftest import RawClient
from tests.harness import running_broker


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _reset(stream: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a phone's radio dropping may look."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _wait_eof(c: RawClient) -> None:
    """Read until the broker closes the connection (its handshake timeout, say)."""
    while await c.next() is not None:
        pass


async def _rough(server: str, token: str, device: str, how: str) -> None:
    """One connection of `device` that ends the way `how` says."""
    host, port = server.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    c = RawClient(stream)
    try:
        if how == "before_hello":
            await stream.send_all(b"\x00\x00")  # half a length prefix
            return
        if how == "half_hello":  # then silent, until the broker gives up on it
            hello = c.conn.send(wire.Hello(versions=(1,), token=token, device=device, id=0))
            await stream.send_all(hello[:7])
            await _wait_eof(c)
            return
        await c.hello(token, device, deliver=how != "requests_only")
        await c.send(wire.Send(id=1, to="svc", body=f"from {device}", cid=f"{device}.{how}"))
        await c.send(wire.Ping(id=2))
        if how == "half_frame":
            frame = c.conn.send(wire.Send(id=3, to="svc", body="x" * 300, cid=f"{device}.h"))
            await stream.send_all(frame[:len(frame) // 2])
        elif how == "reset":
            await c.reply(1)
            _reset(stream)
        else:  # "eof", "requests_only": a clean hang-up once answered
            await c.reply(2)
    finally:
        await trio.aclose_forcefully(stream)


async def test_connections_that_end_badly_leave_nothing_behind(tmp_path):
    """Connections dropped before, during and after their hello (a reset, half a frame, half
    a hello then silence), devices replaced by their next connection in a loop, revoked and
    expired tokens, and new devices started at the inbox head: once they are over, the broker
    holds no session, no socket and no entry for any of them, but in its bounded caches
    (measured with `homing serve` over 88,560 connections of these kinds and clean ones: its
    descriptors back at 15 and its threads at 3 once idle; docs/OPERATIONS.md, "Faults and
    attacks tried")."""
    async with running_broker(tmp_path / "data", handshake_timeout_s=0.5,
                              changes_per_s_per_user=1e9) as h, \
            h.client("svc", "bot", role="service") as svc, \
            h.client("root", "console", role="admin", deliver=False) as admin:
        broker, committer = h.broker, h.broker.committer
        await svc.ping()
        before = _open_fds()
        ways = ("before_hello", "half_hello", "half_frame", "reset", "eof", "requests_only")

        async def user(i: int, room: trio.Semaphore) -> None:
            async with room:
                token = h.token(f"u{i}")
                for how in ways:
                    await _rough(h.server, token, f"d{i % 3}", how)
                async with trio.open_nursery() as nursery:  # one device, replaced in a loop
                    for _ in range(3):
                        nursery.start_soon(_replaced, h.server, token, f"d{i % 3}")
                async with h.client(f"u{i}", f"new{i}", start="head") as c:
                    await c.send("hello from a new device", to="svc")
                if i % 4 == 0:
                    await admin.revoke_tokens(f"u{i}")
                    try:
                        async with h.client(f"u{i}", "after", reconnect=False):
                            pass
                    except ClientError:
                        pass  # revoked or refused: either way it ends here
                if i % 4 == 2:  # a cron job's user, who never takes deliveries
                    await _rough(h.server, h.token(f"cron{i}"), "job", "requests_only")
                if i % 4 == 1:
                    expired = tokens.issue(broker.secret, f"u{i}", "user", -5)
                    c = await RawClient.connect(h.server)
                    await c.send(wire.Hello(versions=(1,), token=expired, device="x", id=0))
                    await _wait_eof(c)
                    await c.aclose()

        room = trio.Semaphore(8)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(user, i, room)

        def settled() -> bool:
            gc.collect()
            return (list(broker.hub._by_user) == ["svc"] and broker.hub.count == 2
                    and broker.handshaking == 0 and not broker.awaiting
                    and not broker.head_starts and not broker.revoking and not broker.own_acks
                    and not committer._acks and not committer._acks_lost
                    and not committer._gone
                    and all(len(b) <= 2 for b in broker.user_buckets)
                    and _open_fds() <= before
                    and len([o for o in gc.get_objects() if type(o) is Session]) == 2)

        # Lingers of 1 s, handshake timeouts, refilling buckets and rounds of own acks end
        # when a loaded machine gets to them: polled, then asserted one by one.
        with trio.move_on_after(30):
            while not settled():
                await trio.sleep(0.1)
        assert list(broker.hub._by_user) == ["svc"] and list(broker.hub._requesting) == ["root"]
        assert broker.hub.count == 2 and broker.handshaking == 0
        assert not broker.awaiting and not broker.head_starts and not broker.revoking
        assert not broker.creating and not broker.own_acks and not broker.presence._walking
        assert not committer._acks and not committer._acks_lost and not committer._gone
        assert set(committer._last_acks) <= {("svc", "bot")}
        assert sorted(map(len, broker.user_buckets)) == [2, 2, 2, 2]  # svc's and root's
        assert _open_fds() <= before, _open_fds() - before
        gc.collect()
        assert len([o for o in gc.get_objects() if type(o) is Session]) == 2
        ended = {e["reason"] for e in h.logs if e["event"] == "connection_closed"}
        assert ended >= {"auth_failed", "broken", "peer_eof", "protocol_error", "replaced",
                         "revoked", "timeout"}, ended  # every way above was taken


async def _replaced(server: str, token: str, device: str) -> None:
    """A connection of `device` that its next one may replace before or after its welcome."""
    try:
        c = await RawClient.connect(server)
        try:
            await c.hello(token, device)
            with trio.move_on_after(0.2):
                await _wait_eof(c)
        finally:
            await c.aclose()
    except (AssertionError, trio.BrokenResourceError, OSError):
        pass  # replaced, or refused its welcome: what this test is about
