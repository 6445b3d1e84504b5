"""A plain ack that waits for another one being written (`Client._write_ack`, 2026-12-06) must
not outlive an inbox reset: its inbox_seq names an entry of the old inbox (a review of the SDK
split and the acks made on top of it)."""

from __future__ import annotations

import os
import signal
import socket
from contextlib import AsyncExitStack

import trio

from broker.client import ClientError, ConnectionLost
from tests.procs import BrokerProcess, homing

DEVICES = [f"b{i}" for i in range(6)]  # each loses a race of trio's scheduling half the time
BODY = "x" * 60_000  # under the broker's 64 KiB bodies
STUCK_SENDS = 20  # 1.2 MB per device: more than a stopped broker's socket takes


async def _until(check, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def _send_quietly(client) -> None:
    try:
        await client.send(BODY, to="alice")
    except (ClientError, ConnectionLost):  # refused when resent (below), or cut off
        pass


async def test_a_plain_ack_waiting_across_a_restore_acks_nothing_of_the_new_inbox(
        tmp_path, monkeypatch):
    """Each device of bob holds deliveries 1..7 and acks 7, then 6, while the broker stopped
    reading (the ack of 7 waits for a write to end, the ack of 6 for the ack of 7). The
    connection drops and the device reconnects to the backup, restored elsewhere, whose inbox
    holds 6 new entries: the inbox went back. The ack of 6 then went out on the new connection
    once the ack of 7 ended (when the reconnect's task ran first), acking the 6 new entries,
    which the device never took. Now no ack made before the reset is written after it."""
    from broker import client_stream

    monkeypatch.setattr(client_stream, "WRITE_STALL_S", 5.0)  # the stuck write's bound
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    bp2: BrokerProcess | None = None
    try:
        async with AsyncExitStack() as stack:
            bobs = [await stack.enter_async_context(bp.client("bob", d, reconnect_timeout=60))
                    for d in DEVICES]
            await trio.to_thread.run_sync(homing, "backup", str(tmp_path / "backup"),
                                          "--data", str(bp.data))
            async with bp.client("alice", "a") as alice:
                for i in range(7):
                    await alice.send(f"old-{i}", to="bob")
            for bob in bobs:
                assert [(await bob.deliveries().receive()).inbox_seq
                        for _ in range(7)] == list(range(1, 8))
            # The backup, served elsewhere, takes six new entries for bob. It refuses the
            # stuck sends when they are resent: taken, they were entries of bob's inbox too,
            # and a device reconnecting after another's resend found its head past 7.
            bp2 = BrokerProcess(tmp_path / "backup", "--max-body-bytes", str(len(BODY) - 1))
            await bp2.astart()
            async with bp2.client("alice", "a") as alice:
                for i in range(6):
                    await alice.send(f"new-{i}", to="bob")
            for bob in bobs:  # a small send buffer: the sends below fill it
                bob._link.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            os.kill(bp.pid, signal.SIGSTOP)  # reads nothing more
            async with trio.open_nursery() as nursery:
                for bob in bobs:
                    for _ in range(STUCK_SENDS):
                        nursery.start_soon(_send_quietly, bob)
                    await _until(lambda b=bob: b._link.send_lock.statistics().tasks_waiting)
                    nursery.start_soon(bob.ack, 7)
                    await _until(lambda b=bob: b._inbox.plain_acks)
                    first = bob._inbox.plain_acks[0]
                    nursery.start_soon(bob.ack, 6)
                    await _until(lambda a=first: a.over.statistics().tasks_waiting == 1)
                for bob in bobs:
                    assert bob._inbox.plain_acks, "the ack of 7 was written: no race to run"
                    bob.port = bp2.port  # the restore, elsewhere
                    bob._link.stream.socket.shutdown(socket.SHUT_RD)  # the reader sees EOF
                await _until(lambda: all(b.inbox_resets == 1 and b.connected.is_set()
                                         for b in bobs), timeout=60)
            for bob in bobs:
                await bob.ping()  # read after any ack written before it
        bp.kill()
        acked = {}
        for device in DEVICES:
            async with bp2.client("bob", device) as bob:
                acked[device] = bob.welcome.acked
        assert acked == dict.fromkeys(DEVICES, 0)  # 6 for about half of them before
    finally:
        bp.kill()
        if bp2 is not None:
            bp2.kill()
