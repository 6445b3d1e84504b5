"""Repeated sends (same sender, same cid) around a connection's close: a review of 2026-12-05.

The first send is held in its batch by another write transaction that holds LMDB's write lock
(a thread of this test, released by an event: no sleep decides the order), so a repeat
arrives while the first is still being committed, as a client resending on a new connection
before the first's result came back does.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

import protocol as wire
from tests.faults.conftest import RawClient, replies
from tests.harness import running_broker


@asynccontextmanager
async def held_commits(store) -> AsyncIterator[None]:
    """While the block runs, no batch commits: a write transaction of ours holds the lock."""
    holding, release = threading.Event(), threading.Event()

    def hold(_txn) -> None:
        holding.set()
        release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, store._env.write, hold)
        await trio.to_thread.run_sync(holding.wait)
        try:
            yield
        finally:
            release.set()


async def _until(condition) -> None:
    while not condition():
        await trio.sleep(0.01)


def _sends_done(logs: list[dict]) -> list[str]:
    return [e["device"] for e in logs
            if e.get("event") == "command_done" and e.get("command") == "SendMessage"]


async def test_a_waiting_repeat_of_a_closed_connection_is_dropped_not_submitted(tmp_path):
    """A repeat past --user-send-rate waits for the sends on their way; its connection closed
    meanwhile. It was still submitted once its first was durable: one more command committed
    (in a batch of its own here) and a `command_done` logged for a session already gone, its
    `result` then dropped. Now it is dropped as its session ends: nothing submitted, nothing
    read for it."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", sends_per_s_per_user=0.01) as h:
            c1 = await RawClient.connect(h.server, h.token("shop"), "d1")
            c2 = await RawClient.connect(h.server, h.token("shop"), "d2")
            send = wire.Send(id=1, cid="order-9 ready", body="ready", to="bob")
            async with held_commits(h.broker.store):
                await c1.send(send)
                await c1.send(wire.Ping(id=2))
                assert isinstance(await c1.reply(2), wire.Pong)  # the send is on its way
                await c2.send(send)  # past the user's rate: waits for the first
                await c2.send(wire.Ping(id=2))
                assert isinstance(await c2.reply(2), wire.Pong)
                [waiting] = [s for s in h.broker.hub.sessions("shop") if s.device == "d2"]
                assert waiting.inflight == 1
                await c2.aclose()
                await _until(lambda: any(e.get("event") == "connection_closed"
                                         and e.get("device") == "d2" for e in h.logs))
            first = await c1.reply(1)
            assert isinstance(first, wire.Result) and not first.dup, first
            # A later send commits after anything the repeat's answer would have submitted.
            c3 = await RawClient.connect(h.server, h.token("bakery"), "d3")
            await c3.send(wire.Send(id=1, cid="later", body="x", to="bob"))
            assert isinstance(await c3.reply(1), wire.Result)
            assert _sends_done(h.logs) == ["d1", "d3"]
            for c in (c1, c3):
                await c.aclose()


async def test_repeats_are_the_senders_whatever_the_body_or_device(tmp_path):
    """What PROTOCOL.md §9 promises of a repeated cid: the same user's repeat is a dup from
    any of its devices, its body not compared (the first one's stays); another user's send of
    the same cid is a message of its own; the same cid to another conversation is
    `conflict`. Each arrives while the first is still being committed, and after it."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d") as h:
            store = h.broker.store
            phone = await RawClient.connect(h.server, h.token("shop"), "phone")
            laptop = await RawClient.connect(h.server, h.token("shop"), "laptop")
            other = await RawClient.connect(h.server, h.token("bakery"), "d1")
            async with held_commits(store):
                await phone.send(wire.Send(id=1, cid="c1", body="first", to="bob"))
                await laptop.send(wire.Send(id=1, cid="c1", body="second", to="bob"))
                await other.send(wire.Send(id=1, cid="c1", body="mine", to="bob"))
                await laptop.send(wire.Send(id=2, cid="c1", body="first", to="carol"))
                for c in (phone, laptop, other):
                    await c.send(wire.Ping(id=9))
                    assert isinstance(await c.reply(9), wire.Pong)
            first = (await replies(phone, [1]))[1]
            got = await replies(laptop, [1, 2])
            mine = (await replies(other, [1]))[1]
            assert (first.dup, got[1].dup, mine.dup) == (False, True, False)
            assert (got[1].conv, got[1].seq, got[1].lsn) == (first.conv, first.seq, first.lsn)
            assert mine.conv != first.conv
            assert isinstance(got[2], wire.Error) and got[2].name == "conflict", got[2]
            await laptop.send(wire.Send(id=3, cid="c1", body="third", to="bob"))
            again = (await replies(laptop, [3]))[3]
            assert again.dup and again.lsn == first.lsn
            messages, _more = store.history(first.conv, limit=10)
            assert [(m["seq"], m["body"]) for m in messages] == [(1, "first")]
            for c in (phone, laptop, other):
                await c.aclose()


async def test_a_waiting_repeated_create_of_a_closed_connection_is_dropped(tmp_path):
    """The same for a create with a cid past --change-rate, waiting for its first: it was
    submitted once the first was durable, for a session already gone."""
    with trio.fail_after(20):
        async with running_broker(tmp_path / "d", changes_per_s_per_user=0.01) as h:
            c1 = await RawClient.connect(h.server, h.token("shop"), "d1")
            c2 = await RawClient.connect(h.server, h.token("shop"), "d2")
            create = wire.Create(id=1, kind="group", name="order 9", cid="order-9")
            async with held_commits(h.broker.store):
                await c1.send(create)
                await c2.send(create)  # past the user's change rate: waits for the first
                await c2.send(wire.Ping(id=2))
                assert isinstance(await c2.reply(2), wire.Pong)
                await c2.aclose()
                await _until(lambda: any(e.get("event") == "connection_closed"
                                         and e.get("device") == "d2" for e in h.logs))
            first = await c1.reply(1)
            assert isinstance(first, wire.Created) and not first.dup, first
            c3 = await RawClient.connect(h.server, h.token("bakery"), "d3")
            await c3.send(wire.Send(id=1, cid="later", body="x", to="bob"))
            assert isinstance(await c3.reply(1), wire.Result)
            done = [e["device"] for e in h.logs if e.get("event") == "command_done"
                    and e.get("command") == "CreateConv"]
            assert done == ["d1"]
            for c in (c1, c3):
                await c.aclose()
