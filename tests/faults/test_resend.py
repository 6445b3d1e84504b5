"""A repeated send during a stop (SIGTERM) of a real broker process: answered with the first's
result when that is durable, `shutting_down` only for what was not done.

The broker's commits are held by a write transaction of this test on the data directory's
LMDB environment (its write lock is the broker's too): nothing commits until the test lets go,
so the order is set by events, not by sleeps.
"""

from __future__ import annotations

import trio

import protocol as wire
from storage import audit
from tests.faults.conftest import RawClient
from tests.stalls import held_commits


async def _handled(c: RawClient, request_id: int) -> None:
    """Every frame `c` wrote before this was handled by the broker (a ping is answered at once,
    after them)."""
    await c.send(wire.Ping(id=request_id))
    assert isinstance(await c.reply(request_id), wire.Pong)


async def _until_closed(c: RawClient) -> list:
    frames = []
    while (f := await c.next()) is not None:
        frames.append(f)
    return frames


async def test_a_repeat_of_a_durable_send_is_answered_a_dup_by_a_stop(broker_process, tally):
    """A device resends a message whose first was accepted (its result lost), and the broker is
    stopped while the repeat waits for its commit, which does not come within half the
    --shutdown-grace. The repeat was answered only by the closing `shutting_down`, though its
    result was known: the client sent it again after the restart, for nothing. Now it gets
    its `result` (`dup`) first. A new send waiting with it is not done: `shutting_down` only
    (and it is committed by the stop, as ever: a resend is then a dup)."""
    bp = broker_process("--shutdown-grace", "1")
    with trio.fail_after(30):
        c1 = await RawClient.connect(bp.server, bp.token("shop"), "d1")
        await c1.send(wire.Send(id=1, cid="order-9 ready", body="ready", to="bob"))
        first = await c1.reply(1)
        assert isinstance(first, wire.Result) and not first.dup, first
        c2 = await RawClient.connect(bp.server, bp.token("shop"), "d2")
        async with held_commits(bp.data):
            await c2.send(wire.Send(id=1, cid="order-9 ready", body="ready", to="bob"))
            await c2.send(wire.Send(id=2, cid="order-10 ready", body="ready", to="bob"))
            await _handled(c2, 3)
            bp.proc.send_signal(15)  # SIGTERM
            frames = await _until_closed(c2)
        assert await bp.aterminate() == 0
        answered = {f.id: f for f in frames if isinstance(f, wire.Result)}
        assert list(answered) == [1], frames
        assert (answered[1].dup, answered[1].lsn) == (True, first.lsn)
        assert isinstance(frames[-1], wire.Error) and frames[-1].name == "shutting_down"
        assert frames[-1].id is None and frames[-1].close
        await c1.aclose()
        await c2.aclose()
    store = bp.open_store(readonly=True)
    try:
        sent = [e.data["cid"] for e in audit.iter_events(store) if e.type == "message.accepted"]
    finally:
        store.close()
    assert sent == ["order-9 ready", "order-10 ready"]
    tally.add("SIGTERM while a repeat of a durable send waits for its commit")


async def test_a_stop_tells_thousands_of_sessions_with_sends_waiting_at_once(broker_process,
                                                                             tally):
    """At a stop, each session with requests still waiting after half the --shutdown-grace
    looks for those that repeat a durable send (`handlers.answer_known_repeats`), then says
    `shutting_down`. Each scanned every command queued or being committed: with a send
    waiting on each of n sessions, n x n steps in one go of the event loop (4,000 sessions:
    1.1 s; 8,000: 4.6 s), the broker answering nobody meanwhile, and the sessions still
    unanswered at the end of the grace were cut off without their `shutting_down` (with a
    grace of 2 s only 714 and 963 of the 4,000 were told, in two runs; with 3 s, as here,
    some were cut off too). The sends are grouped by session once (again only when a send is
    queued or a batch starts or ends): every session is told."""
    sessions, grace = 4000, 3.0
    bp = broker_process("--shutdown-grace", str(grace))
    with trio.fail_after(120):
        clients: list[RawClient] = []
        limit = trio.Semaphore(100)

        async def connect(i: int) -> None:
            async with limit:
                clients.append(await RawClient.connect(bp.server, bp.token(f"u{i}"), "d1"))

        async def send(c: RawClient) -> None:
            await c.send(wire.Send(id=1, cid="waits", body="x", to="bob"))
            await _handled(c, 2)

        told = []

        async def closing(c: RawClient) -> None:
            while (f := await c.next()) is not None:
                if isinstance(f, wire.Error) and f.name == "shutting_down":
                    told.append(c)

        async with trio.open_nursery() as nursery:
            for i in range(sessions):
                nursery.start_soon(connect, i)
        async with held_commits(bp.data):
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(send, c)
            bp.proc.send_signal(15)  # SIGTERM
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(closing, c)
        assert await bp.aterminate() == 0
        for c in clients:
            await c.aclose()
    assert len(told) == sessions, f"{sessions - len(told)} cut off without their shutting_down"
    tally.add("SIGTERM with a send waiting on each of 4,000 sessions")
