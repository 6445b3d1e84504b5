"""The SDK's rough edges a review left alone (2026-12-05): `done` twice while its ack is under
way, what `reconnects` counts, what `_taken` holds, an `on_inbox_reset` that raises. Each run
against a real broker; faults are injected below the SDK, in the TCP stream."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import traceback
import tracemalloc

import pytest
import trio

import protocol as wire
from broker.client import ConnectionLost
from protocol.codec import FrameBuffer
from tests.harness import running_broker
from tests.procs import BrokerProcess, homing
from tests.streams import ResetAfterWelcome, WrappedStream


class _Counted(WrappedStream):
    """A TCP stream that keeps the frames the client wrote (decoded), for the test to count."""

    frames: list[dict] = []

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.buffer = FrameBuffer(wire.MAX_FRAME_LIMIT)

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)
        self.buffer.feed(bytes(data))
        while (frame := self.buffer.next_map()) is not None:
            _Counted.frames.append(frame)


@pytest.fixture
def acks_written(monkeypatch):
    """The ack frames the SDK writes from now on: (upto, id)."""
    real_open = trio.open_tcp_stream

    async def counted_open(*args, **kwargs):
        return _Counted(await real_open(*args, **kwargs))

    monkeypatch.setattr(trio, "open_tcp_stream", counted_open)
    _Counted.frames = []
    return lambda: [(f["upto"], f.get("id")) for f in _Counted.frames if f["t"] == "ack"]


async def _alice_sends(h, n: int) -> None:
    async with h.client("alice", "a") as alice:
        for i in range(n):
            await alice.send(f"m{i}", to="bob")


# -- done twice while its ack is under way -----------------------------------------------------

@pytest.mark.parametrize("durable", [False, True])
async def test_done_twice_while_its_ack_is_under_way_writes_one_ack(tmp_path, acks_written,
                                                                    durable):
    """Two `done(d)` of one delivery, the second while the first's ack is still being written
    (or, durable, answered): each wrote an ack frame of its own, the second adding nothing.
    Now the second waits for the first's ack and returns with it."""
    async with running_broker(tmp_path / "d") as h:
        await _alice_sends(h, 1)
        async with h.client("bob", "b") as bob:
            d = await bob.deliveries().receive()
            returned = []

            async def done() -> None:
                await bob.done(d, durable=durable)
                returned.append(list(acks_written()))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(done)
                    nursery.start_soon(done)
                await bob.ping()  # a plain ack is written before this
            acks = acks_written()
            assert len(acks) == 1, acks
            assert acks[0][0] == d.inbox_seq and (acks[0][1] is not None) == durable
            assert returned == [acks, acks]  # neither returned before the ack was made
        async with h.client("bob", "b") as bob:
            assert bob.welcome.acked == d.inbox_seq


async def test_a_done_whose_ack_overlaps_one_under_way_rides_on_it(tmp_path, acks_written):
    """The second of two deliveries done first waits for the first; `done` of the first acks
    both, and `done` of the second again meanwhile made the same ack a second time."""
    async with running_broker(tmp_path / "d") as h:
        await _alice_sends(h, 2)
        async with h.client("bob", "b") as bob:
            first, second = [await bob.deliveries().receive() for _ in range(2)]
            await bob.done(second, durable=True)  # waits for the first: no ack
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: bob.done(first, durable=True))
                    await trio.lowlevel.checkpoint()  # the first's ack is written
                    nursery.start_soon(lambda: bob.done(second, durable=True))
            assert [upto for upto, _ in acks_written()] == [second.inbox_seq]


async def test_a_durable_done_does_not_ride_on_a_plain_ack(tmp_path, acks_written):
    """A plain ack under way does not promise what a durable `done` asks (the ack on disk):
    that one is made all the same."""
    async with running_broker(tmp_path / "d") as h:
        await _alice_sends(h, 1)
        async with h.client("bob", "b") as bob:
            d = await bob.deliveries().receive()
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: bob.done(d))
                    await trio.lowlevel.checkpoint()  # the plain ack is under way
                    nursery.start_soon(lambda: bob.done(d, durable=True))
            acks = acks_written()
            assert [upto for upto, _ in acks] == [d.inbox_seq] * 2, acks
            assert acks[1][1] is not None, acks


async def test_done_riding_on_an_ack_that_fails_raises_its_error(tmp_path):
    """The first `done`'s durable ack fails (the broker gone, no reconnect): the second, which
    waited for it, raises that error too, rather than return as if acked."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        async with bp.client("alice", "a") as alice:
            await alice.send("m", to="bob")
        async with bp.client("bob", "b", reconnect=False) as bob:
            d = await bob.deliveries().receive()
            errors = []

            async def done() -> None:
                try:
                    await bob.done(d, durable=True)
                except ConnectionLost as exc:
                    errors.append(exc)

            os.kill(bp.pid, signal.SIGSTOP)  # the acks wait for an answer
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(done)
                    nursery.start_soon(done)
                    await trio.sleep(0.2)
                    bp.kill()
            assert len(errors) == 2 and errors[0] is errors[1], errors
    finally:
        bp.kill()


async def test_done_riding_on_a_cancelled_ack_makes_its_own(tmp_path):
    """The first `done` is cancelled while its durable ack waits for the broker (away): the
    second, which waited for it, makes the ack itself once the broker is back."""
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        async with bp.client("alice", "a") as alice:
            await alice.send("m", to="bob")
        async with bp.client("bob", "b", reconnect_timeout=60) as bob:
            d = await bob.deliveries().receive()
            bp.kill()
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    first = trio.CancelScope()
                    nursery.start_soon(_in, first, lambda: bob.done(d, durable=True))
                    await trio.sleep(0.2)
                    second_done = trio.Event()

                    async def second() -> None:
                        await bob.done(d, durable=True)
                        second_done.set()

                    nursery.start_soon(second)
                    await trio.sleep(0.2)
                    first.cancel()
                    await trio.sleep(0.2)
                    assert not second_done.is_set()  # the broker is still away
                    await bp.astart()
        async with bp.client("bob", "b") as bob:
            assert bob.welcome.acked == d.inbox_seq
    finally:
        bp.kill()


async def _in(scope: trio.CancelScope, call) -> None:
    with scope:
        await call()


# -- reconnects ------------------------------------------------------------------------------

async def test_reconnects_counts_the_sessions_opened_again(tmp_path, monkeypatch):
    """`client.reconnects` went up when a session dropped, before any reconnect: a client
    whose broker stayed away said it had reconnected. It counts each session opened after the
    first (welcomed, its waiting requests written to it); a failed attempt is none, one whose
    resend broke right after the welcome included."""
    real_open = trio.open_tcp_stream

    async def breaking_open(*args, **kwargs):
        return ResetAfterWelcome(await real_open(*args, **kwargs))

    monkeypatch.setattr(trio, "open_tcp_stream", breaking_open)
    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        async with bp.client("bob", "b", reconnect_timeout=60) as bob:
            await bob.ping()
            bp.kill()
            while bob._link.stream is not None:
                await trio.sleep(0.01)
            await trio.sleep(0.3)  # attempts fail meanwhile
            assert bob.reconnects == 0  # none has been made
            ResetAfterWelcome.armed = True  # the first one welcomed breaks as it resends
            sent = []

            async def send_after() -> None:
                sent.append(await bob.send("after", to="alice"))

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    # Waiting before the broker is back: the first welcomed session's second
                    # write is its resend. Sent after that session opened, it would be the
                    # send itself, and the break would end a session already counted.
                    nursery.start_soon(send_after)
                    while not bob._link.inflight:
                        await trio.sleep(0.01)
                    await bp.astart()
            assert sent[0].seq == 1
            assert not ResetAfterWelcome.armed  # the resend did break once
            assert bob.reconnects == 1
        with pytest.raises(ConnectionLost):
            async with bp.client("bob", "b", reconnect_timeout=1) as bob:
                await bob.ping()
                bp.kill()
                await bob.deliveries().receive()  # gives up
        assert bob.reconnects == 0  # it gave up: no session was opened again
    finally:
        bp.kill()


# -- what `_taken` holds ---------------------------------------------------------------------

async def test_deliveries_taken_and_dropped_are_not_held_until_acked(tmp_path):
    """The client kept each delivery taken and not yet acked whole, its body too (up to
    64 KiB, up to the window of them), though it needs only to know which it handed over.
    256 deliveries of 16 KiB taken and dropped, unacked: the client held 4 MiB for them."""
    n, size = 256, 16 * 1024
    bp = BrokerProcess(tmp_path / "data", "--window", str(n))
    bp.start()
    try:
        async with bp.client("alice", "a") as alice:
            for i in range(n):
                await alice.send(f"{i:05d}" + "x" * (size - 5), to="bob")
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with bp.client("bob", "b") as bob:
                for _ in range(n):
                    await bob.deliveries().receive()  # handled, and dropped
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
                await bob.ack(n)
        finally:
            tracemalloc.stop()
        assert held < n * size // 4, f"{held} bytes held for {n} deliveries taken"
    finally:
        bp.kill()


# -- on_inbox_reset raising ------------------------------------------------------------------

async def test_an_on_inbox_reset_that_raises_comes_out_of_open_client(tmp_path):
    """The application's `on_inbox_reset` raises: the exception comes out of `open_client`,
    its traceback through the callback, the loop over the deliveries ended, and the
    connection the reset came on is closed (it stayed open, held by the traceback)."""

    def on_reset(reset) -> None:
        raise RuntimeError(f"the app's bug: {reset}")

    bp = BrokerProcess(tmp_path / "data")
    bp.start()
    try:
        async with bp.client("alice", "a") as alice:
            await alice.send("kept", to="bob")
        await trio.to_thread.run_sync(homing, "backup", str(tmp_path / "backup"),
                                      "--data", str(bp.data))
        async with bp.client("alice", "a") as alice:
            await alice.send("lost", to="bob")
        with trio.fail_after(30), pytest.raises(RuntimeError, match="the app's bug") as raised:
            async with bp.client("bob", "b", reconnect_timeout=60,
                                 on_inbox_reset=on_reset) as bob:
                async for d in bob.deliveries():
                    if d.body == "lost":
                        bp.kill()
                        shutil.move(bp.data, tmp_path / "data-aside")
                        shutil.move(tmp_path / "backup", bp.data)
                        await bp.astart()
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(raised.value.__traceback__)]
        assert "on_reset" in frames, frames
        with trio.move_on_after(10):  # the broker logs the close a moment after it
            while True:
                events = bp.log_events()
                last_start = max(i for i, e in enumerate(events)
                                 if e.get("event") == "broker_listening")
                bobs = [e for e in events[last_start:] if e.get("user") == "bob"]
                opened = sum(e["event"] == "connection_opened" for e in bobs)
                closed = sum(e["event"] == "connection_closed" for e in bobs)
                if closed:
                    break
                await trio.sleep(0.05)
        assert opened == closed == 1, bobs  # the restored broker's one session is over
    finally:
        bp.kill()
