"""The SDK under cancellation and concurrency: calls and closes cut short by a cancel, many
tasks on one client. Each test is a defect a review found (2026-12-05), or the cancellation
semantics docs/CLIENT.md states, run against a real broker."""

from __future__ import annotations

import os
import random
import signal

import pytest
import trio

from broker.client import ClientClosed
from storage.commands import SendMessage
from storage.store import Store
from tests.harness import running_broker
from tests.procs import BrokerProcess
from tests.waits import wait_until


async def test_a_close_cut_short_by_a_cancel_still_closes_the_client(tmp_path):
    """`aclose()` in a cancelled scope (the `finally:` of a task being cancelled, a
    `move_on_after` around it) stopped at its first checkpoint, after it had marked the client
    closed: the connection stayed open (the session online), a loop over the deliveries and a
    task waiting on `next_push` waited for ever, and a second `aclose()`, that of leaving
    `open_client`, did nothing. The bye is what a cancel skips now; the client closes all the
    same."""
    async with running_broker(tmp_path / "d") as h:
        ended = []

        async def loop(client):
            async for _ in client.deliveries():
                pass
            ended.append("deliveries")

        async def push(client):
            try:
                await client.next_push()
            except ClientClosed:
                ended.append("push")

        with trio.fail_after(10):
            async with h.client("alice") as alice:
                await alice.ping()
                async with trio.open_nursery() as n:
                    n.start_soon(loop, alice)
                    n.start_soon(push, alice)
                    await trio.sleep(0.1)
                    with trio.CancelScope() as cancelled:
                        cancelled.cancel()
                        await alice.aclose()
                    assert alice._link.stream is None
                assert sorted(ended) == ["deliveries", "push"]
                while h.broker.hub.online("alice"):  # the broker saw the connection end
                    await trio.sleep(0.01)


async def test_an_ack_waiting_to_be_written_when_the_client_closes_raises_client_closed(
        tmp_path):
    """An ack waiting for its turn to write (behind a big send the broker does not read: it is
    stopped) when the client closes was never written, yet returned as if it were: the caller
    took the entries for acked. It raises ClientClosed now, as an ack made after the close does;
    so does `typing`."""
    bp = BrokerProcess(tmp_path / "data", "--max-body-bytes", "8000000",
                       "--max-frame-bytes", "16000000")
    bp.start()
    try:
        async with bp.client("bob") as bob:
            await bob.send("hi", to="alice")
        with trio.fail_after(30):
            async with bp.client("alice") as alice:
                seq = (await alice.deliveries().receive()).inbox_seq
                outcome = {}

                async def big():
                    with pytest.raises(ClientClosed):
                        await alice.send("x" * 7_000_000, to="bob")

                async def ack():
                    try:
                        await alice.ack(seq)
                        outcome["ack"] = "returned"
                    except ClientClosed:
                        outcome["ack"] = "ClientClosed"

                os.kill(bp.pid, signal.SIGSTOP)
                async with trio.open_nursery() as n:
                    n.start_soon(big)
                    await _writing(alice)  # the big frame fills the socket's buffers
                    n.start_soon(ack)
                    await _waiting_to_write(alice, 1)  # the ack waits for the write to end
                    await alice.aclose()
                assert outcome == {"ack": "ClientClosed"}
                assert alice._inbox.acked == 0
    finally:
        os.kill(bp.pid, signal.SIGCONT)
        bp.kill()


async def _writing(client) -> None:
    """Wait until a task of `client` writes (holds its write lock): a fixed pause hoped so."""
    await wait_until(client._link.send_lock.locked, step=0.005)


async def _waiting_to_write(client, n: int) -> None:
    """Wait until `n` tasks of `client` wait for the write in progress to end."""
    await wait_until(lambda: client._link.send_lock.statistics().tasks_waiting == n, step=0.005)


async def test_a_second_close_returns_once_the_client_is_closed(tmp_path):
    """`aclose()` while another task's `aclose()` waits to say bye (behind a write the broker
    does not read: it is stopped) returned at once, the client not closed yet: a task waiting on
    `next_push` still waited, the connection was still open. It returns once the first one
    closed the client."""
    bp = BrokerProcess(tmp_path / "data", "--max-body-bytes", "8000000",
                       "--max-frame-bytes", "16000000")
    bp.start()
    try:
        with trio.fail_after(30):
            async with bp.client("alice") as alice:
                await alice.ping()
                ended = []

                async def big():
                    with pytest.raises(ClientClosed):
                        await alice.send("x" * 7_000_000, to="bob")

                async def push():
                    with pytest.raises(ClientClosed):
                        await alice.next_push()
                    ended.append("push")

                os.kill(bp.pid, signal.SIGSTOP)
                async with trio.open_nursery() as n:
                    n.start_soon(big)
                    n.start_soon(push)
                    await _writing(alice)  # the big frame fills the socket's buffers
                    n.start_soon(alice.aclose)  # it waits (up to 1 s) to write its bye
                    await _waiting_to_write(alice, 1)
                    await alice.aclose()
                    assert ended == ["push"]
    finally:
        os.kill(bp.pid, signal.SIGCONT)
        bp.kill()


async def test_cancelled_calls_leave_nothing_behind_and_answers_go_to_their_own_calls(tmp_path):
    """The cancellation semantics CLIENT.md states: a send cancelled while the client is
    disconnected is not sent by the reconnect; hundreds of sends on one client, a part of them
    cancelled at random (before their frame went out, or after), leave no pending request, and
    each answered one gets its own answer (its own cid) on a connection still usable."""
    async with running_broker(tmp_path / "d") as h:
        with trio.fail_after(30):
            async with h.client("alice") as alice, h.client("bob") as bob:
                await alice.ping()
                away = trio.CancelScope()

                async def queued():
                    with away:
                        await alice.send("never", to="bob", cid="cancelled-while-away")

                was = alice.connected
                await trio.aclose_forcefully(alice._link.stream)  # a drop; it reconnects
                while alice.connected is was:
                    await trio.sleep(0)
                async with trio.open_nursery() as n:
                    n.start_soon(queued)
                    while not alice._link.inflight:
                        await trio.sleep(0)
                    assert alice._link.stream is None  # waiting for the reconnect to send it
                    away.cancel()
                assert (await alice.send("after", to="bob")).seq == 1
                assert (await bob.deliveries().receive()).body == "after"

                answered, rng = [], random.Random(7)

                async def one(i):
                    # Every other one is cancelled, at a random point of its course.
                    with trio.move_on_after(rng.random() * 0.05 if i % 2 else 30):
                        result = await alice.send(f"m{i}", to="bob", cid=f"c{i:04d}")
                        answered.append((result.cid, f"c{i:04d}"))

                async with trio.open_nursery() as n:
                    for i in range(500):
                        n.start_soon(one, i)
                assert answered and all(got == mine for got, mine in answered)
                assert 250 <= len(answered) < 500  # some were cancelled
                assert len(alice._link.inflight) == 0
                assert (await alice.history("dm:alice:bob", limit=1)).messages
                assert alice.reconnects == 1


async def test_a_backlog_past_the_deliveries_buffer_does_not_hold_the_answers(tmp_path):
    """The SDK held at most 65,536 received deliveries: with a broker `--window` above that and
    a longer backlog, its reader stopped once the buffer was full, and the answers behind the
    deliveries with it; a loop that awaits a call per delivery (a reply, a ping) waited for
    ever, the heartbeat unable to help (the reader was not reading). The broker's window bounds
    the buffer now."""
    senders, batches, each = 4, 68, 1000  # 68,000 messages, written as the broker would
    store = Store.open(str(tmp_path / "d"))  # (sent through it, they took 25 s here)
    try:
        for b in range(batches):
            store.execute([SendMessage(f"shop-{i % senders}", "d", "service", f"c{b}-{i}",
                                       b"m", to="bob") for i in range(each)])
    finally:
        store.close()
    async with running_broker(tmp_path / "d", window=70_000) as h:
        async with h.client("bob") as bob:
            await bob.deliveries().receive()
            with trio.move_on_after(10):  # the reader takes the backlog: 65,538 of it before
                while bob._inbox.yielded < bob.welcome.head:
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                await bob.ping()
            assert bob._inbox.yielded == bob.welcome.head == batches * each
