"""The broker's limits and its shutdown, against a real broker: acks with an id count against
the requests awaiting commit, a shutdown asked before the broker listens is kept, and a client
that sends but does not read holds what OPERATIONS.md says. Each test is a defect a review
found (2026-12-04, night)."""

from __future__ import annotations

import socket

import trio

import protocol as wire
from broker.config import Config
from broker.server import Broker
from storage.rules import Limits
from storage.store import Store
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until


async def test_acks_with_an_id_count_against_the_requests_awaiting_commit(tmp_path):
    """OPERATIONS.md: at most 1024 requests awaiting commit per connection, "beyond it the
    broker stops reading that connection until answers go out". An `ack` with an id awaits
    its commit (its `ok` comes once durable) and is counted in `Session.inflight`, but
    on_ack never waits: one burst of them puts many thousands past the limit."""
    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(60):
            async with h.client("alice") as alice:
                for i in range(40):
                    await alice.send(f"m{i}", to="bob")
            bob = await RawClient.connect(h.server, h.token("bob"), "d")
            session = next(iter(h.broker.hub.sessions("bob")))
            limit = h.config.max_inflight_requests
            n, peak = 40_000, 0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, session.inflight)
                    await trio.sleep(0)

            async def send():  # each ack moves the cursor a little, or repeats the last one
                await bob.stream.send_all(b"".join(
                    bob.conn.send(wire.Ack(upto=1 + i * 40 // n, id=i + 1)) for i in range(n)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                nursery.start_soon(send)
                answered, closing = 0, None
                while answered < n:  # read every answer (no flow control holds us up)
                    f = await bob.next()
                    if f is None:
                        break
                    if isinstance(f, wire.Error) and f.close:
                        closing = f
                    elif isinstance(f, (wire.Ok, wire.Error)) and f.id:
                        answered += 1
                nursery.cancel_scope.cancel()
            # A client that reads every answer is not closed...
            assert closing is None, f"closed after {answered} answers: {closing}"
            # ...and the broker held at most the documented number of requests for it.
            assert peak <= limit, f"{peak} requests awaited their commit, limit {limit}"


async def test_a_shutdown_asked_before_the_broker_listens_is_not_lost(tmp_path):
    """`homing serve` (serve_cli._serve) opens its signal receiver before `Broker.serve` has
    run, and calls `broker.shutdown()` for SIGTERM: a signal that comes before serve() set its
    `_listen_scope` finds None to cancel, and the broker then listens and serves for good
    (`stopping` is set, so every hello is refused `shutting_down`, and wait_stopped never
    returns)."""
    config = Config(data_dir=tmp_path / "data", port=0)
    store = Store.open(str(config.data_dir), limits=Limits())
    try:
        broker = Broker(config, store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.serve)
            await trio.sleep(0)  # one checkpoint, as the signal receiver's loop has
            broker.shutdown()
            with trio.move_on_after(5) as waited:
                await broker.wait_stopped()
            nursery.cancel_scope.cancel()
        assert not waited.cancelled_caught, (
            f"still listening on port {broker.port} 5 s after shutdown()")
    finally:
        store.close()


async def test_a_client_that_sends_but_does_not_read_holds_4_mib_plus_one_frame(tmp_path):
    """OPERATIONS.md: replies queued for a client that sends but does not read: the broker
    stops reading from it, "its memory stays bounded: 4 MiB plus one frame". The reader
    resumes as soon as the writer *takes* the queue (`_collect` sets `_drained`), not when
    the client has read it: the writer holds that batch twice (its chunks and their join) in
    send_all while the reader queues another 4 MiB. Measured with tracemalloc: the memory
    Python holds for each such client once they have all stalled."""
    import tracemalloc

    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(120):
            async with h.client("alice") as alice:
                conv = await alice.create_group("g", ["bob"])
                for i in range(40):
                    await alice.send(f"{i:03d}" + "y" * 60_000, conv=conv)
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                n, held = 4, []
                for k in range(n):
                    sock = trio.socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    await sock.connect(("127.0.0.1", h.broker.port))
                    c = RawClient(trio.SocketStream(sock))
                    await c.hello(h.token("carol", "admin"), f"d{k}")
                    # an admin token reads the history of a group it is not in: no deliveries
                    # (the window bounds those), only replies. Pages of ~16 messages of 60 KB
                    # (what fits 1 MiB): ~1 MB a reply
                    await c.stream.send_all(b"".join(
                        c.conn.send(wire.History(id=i + 1, conv=conv, limit=16))
                        for i in range(200)))
                    held.append(c)
                await trio.sleep(3)  # every reader has stopped: nothing moves any more
                each = (tracemalloc.get_traced_memory()[0] - base) / n / (1 << 20)
            finally:
                tracemalloc.stop()
            for c in held:
                await c.aclose()
            # 4 MiB and one 1 MiB frame; 1.5 MiB of slack for the session, its msgpack packer's
            # buffer (as large as its largest frame) and the test
            assert each <= 6.5, f"{each:.1f} MiB held for each client that does not read"


async def test_a_connection_waiting_for_its_hello_is_told_shutting_down_at_once(tmp_path):
    """A client that connected but has not sent `hello` when the broker stops is told
    `shutting_down` at once, as every other client is (PROTOCOL.md §6), instead of being
    left to the handshake timeout and holding the shutdown up until then."""
    async with running_broker(tmp_path / "data", handshake_timeout_s=30.0,
                              shutdown_grace_s=30.0) as h:
        silent = [await RawClient.connect(h.server) for _ in range(3)]
        await wait_until(lambda: h.broker.handshaking == 3)  # each is in its handshake
        with trio.fail_after(5):
            h.broker.shutdown()
            for c in silent:
                frame = await c.next()
                assert isinstance(frame, wire.Error), frame
                assert (frame.code, frame.close) == (wire.ErrorCode.SHUTTING_DOWN, True)
                await c.aclose()
            await h.broker.wait_stopped()
