"""Random concurrent traffic against raw device sessions (window 4, acks each, lazy, never, in
bursts, stale or past what came; own sends; sessions replaced mid-stream): each session's
deliveries are checked against the store's inbox (gapless, ordered, right content)."""

from __future__ import annotations

import random

import pytest
import trio

import protocol as wire
from tests.faults.conftest import RawClient
from tests.harness import running_broker


class Rec:
    def __init__(self, device, welcome):
        self.device = device
        self.acked0 = welcome.acked
        self.head0 = welcome.head
        self.ds: list[wire.Deliver] = []
        self.acks: list[int] = []
        self.errors = []
        self.past: list[int] = []


async def bob_session(h, device, rng, recs, stop, sends_allowed, conv):
    c = await RawClient.connect(h.server, h.token("bob"), device)
    rec = Rec(device, c.welcome)
    recs.append(rec)
    lock = trio.Lock()
    life = rng.uniform(0.05, 0.6)
    policy = rng.choice(["each", "lazy", "never", "burst"])
    ids = iter(range(1000, 10**9))

    async def send(frame):
        async with lock:
            try:
                await c.send(frame)
            except (wire.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def sender():
        while True:
            await trio.sleep(rng.uniform(0.005, 0.05))
            await send(wire.Send(id=next(ids), cid=f"{device}-{rng.random()}", body="own",
                                 conv=conv))

    with trio.move_on_after(life):
        async with trio.open_nursery() as n:
            if sends_allowed:
                n.start_soon(sender)
            pending = 0
            while not stop.is_set():
                f = await c.next()
                if f is None:
                    break
                if isinstance(f, wire.Deliver):
                    rec.ds.append(f)
                    pending += 1
                    if rng.random() < 0.05:  # an ack past what it got, up to the welcome head
                        rec.past.append(max(rec.head0, f.inbox_seq))
                        await send(wire.Ack(upto=max(rec.head0, f.inbox_seq), id=next(ids)))
                    if rng.random() < 0.05:
                        await send(wire.Ack(upto=max(0, f.inbox_seq - 3)))
                    if policy == "each" or (policy == "burst" and pending >= 3) or (
                            policy == "lazy" and rng.random() < 0.2):
                        rec.acks.append(f.inbox_seq)
                        await send(wire.Ack(upto=f.inbox_seq))
                        pending = 0
                elif isinstance(f, wire.Error):
                    rec.errors.append(f)
                    if f.close:
                        break
                elif isinstance(f, wire.Bye):
                    break
            n.cancel_scope.cancel()
    await c.aclose()


def check(store, recs):
    items = store.inbox_after("bob", 0, 10**6)
    by_seq = {it.inbox_seq: it for it in items}
    assert sorted(by_seq) == list(range(1, len(items) + 1))
    problems = []
    for k, rec in enumerate(recs):
        seqs = [d.inbox_seq for d in rec.ds]
        if seqs != sorted(set(seqs)):
            problems.append((k, rec.device, "not strictly increasing", seqs))
        if seqs and seqs[0] <= rec.acked0:
            problems.append((k, rec.device, "delivered at or below welcome.acked", rec.acked0,
                             seqs[:3]))
        if seqs:
            got = set(seqs)
            for s in range(rec.acked0 + 1, max(seqs) + 1):
                it = by_seq[s]
                own = it.kind == "msg" and it.sender == "bob" and it.device == rec.device
                if s not in got and not own and not any(p >= s for p in rec.past):
                    problems.append((k, rec.device, "gap", s, rec.acked0, seqs))
                    break
        for d in rec.ds:
            it = by_seq[d.inbox_seq]
            if (d.conv, d.seq if it.kind == "msg" else 0, d.cid, d.body) != (
                    it.conv, it.seq if it.kind == "msg" else 0, it.cid, it.body):
                problems.append((k, rec.device, "wrong content", d, it))
            if it.kind == "msg" and it.sender == "bob" and it.device == rec.device:
                problems.append((k, rec.device, "own send delivered back", d))
    return problems


@pytest.mark.parametrize("seed", range(6))
async def test_random_traffic_every_session_gapless(tmp_path, seed):
    rng = random.Random(seed)
    async with running_broker(tmp_path / "data", window=4) as h:
        async with h.client("alice") as alice, h.client("carol") as carol:
            conv = await alice.create_group("g", ["bob", "carol"])
            stop = trio.Event()
            recs: list[Rec] = []

            async def traffic(c, name):
                for i in range(150):
                    if rng.random() < 0.5:
                        await c.send(f"{name}{i}", conv=conv)
                    else:
                        await c.send(f"{name}{i}", to="bob")
                    if rng.random() < 0.5:
                        await trio.sleep(rng.uniform(0, 0.02))

            async def device_loop(device, sends_allowed, pause=0.0):
                while not stop.is_set():
                    await trio.sleep(pause)
                    await bob_session(h, device, rng, recs, stop, sends_allowed, conv)

            async with trio.open_nursery() as n:
                n.start_soon(device_loop, "b1", True)
                n.start_soon(device_loop, "b2", False)
                n.start_soon(device_loop, "b1", False, 0.5)  # replaces b1's sessions at times
                async with trio.open_nursery() as t:
                    t.start_soon(traffic, alice, "a")
                    t.start_soon(traffic, carol, "c")
                await trio.sleep(0.3)
                stop.set()
            problems = check(h.broker.store, recs)
            assert sum(len(r.ds) for r in recs) > 0
            assert not problems, problems[:5]
