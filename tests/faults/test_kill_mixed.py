"""Process faults under a mixed workload: `homing serve` SIGKILLed while SDK clients create
groups and channels (with cids), invite, set roles, mute, send, mark read, leave, remove and
ack with ids, and restarted on the same data directory and port each time (in half the
cycles killed once more while the clients reconnect and resend).

Each conversation is worked by one task, step after step, through the clients of its users, so
that what it holds after every step is known (a `Model`); the tasks run side by side on their
own conversations, over the same clients; every delivery is acked with an id. After each
restart the tasks are paused between steps (the step cut off by the kill is finished first:
the SDK resends it, as docs/CLIENT.md says), every device is back, and an admin client compares
what the restarted broker answers (`members`, `history`, `receipts`: read marks, and the
delivered marks of acks answered `ok`) with the model of every step answered so far. At the
end, once every device acked its last entry, with the broker stopped:

* the log holds, per conversation, exactly the events of the model's steps in their order
  (nothing answered was lost, nothing resent was applied twice, no cid stored twice);
* every accepted send is in each recipient's inbox once and was delivered (tests.faults.checker);
* each session of a device began at its welcome's `acked`, at least the last ack the broker
  had answered `ok` before it and past the last one sent by no more than the device's own
  sends (which the broker acks for it), and delivered from there (or from past an ack the
  device resent on it before its first delivery, when the broker took that first) the
  device's inbox entries in inbox_seq order with none skipped or repeated; over the run each
  device was handed every entry of its inbox (its own sends aside) once, in order; its stored
  ack is at least its last answered one;
* deliveries of a conversation the user muted carry `muted`;
* `homing audit verify` on the data directory says ok.
"""

from __future__ import annotations

import json
import random
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import pytest
import trio

import protocol as wire
from broker import client_link
from storage import records as r
from tests.faults.checker import History, check
from tests.faults.conftest import RawClient, scaled
from tests.procs import homing

USERS = ("ann", "ben", "cat", "dan")
DEVICE = "d1"  # each user's device that works the conversations
LISTENER = ("ann", "d2")  # a second device of ann's that only takes deliveries (her sends too)
AUDITOR = "ops"


# -- what the clients saw ------------------------------------------------------------------------

@dataclass
class Session:
    """One connection of a device: its welcome, the acks known at its opening, what it got."""

    welcome: wire.Welcome
    durable_before: int  # the highest ack answered ok before this connection opened
    sent_before: int  # the highest ack sent before it
    delivered: list[int] = field(default_factory=list)  # inbox_seqs of its deliver frames
    # The highest ack sent on it before its first delivery came (the SDK resends an ack cut off
    # by the drop as soon as it is back): the broker may take it before it delivers anything.
    acked_early: int = 0


@dataclass
class Device:
    user: str
    device: str
    client: Any = None
    sessions: list[Session] = field(default_factory=list)
    got: list[wire.Deliver] = field(default_factory=list)  # handed over by the SDK
    ack_ids: dict[int, int] = field(default_factory=dict)  # request id -> upto
    ack_sent: int = 0
    durable: int = 0  # the highest ack answered ok
    made: list[int] = field(default_factory=list)  # the upto of each ack frame made, resends too


@pytest.fixture
def devices(monkeypatch):
    """{(user, device): Device}, filled by spying on the SDK's connections: each welcome, and
    each frame read on a connection (deliveries, and the `ok` of an ack with an id)."""
    devs = {(u, d): Device(u, d) for u, d in [*((u, DEVICE) for u in USERS), LISTENER]}
    by_conn: dict[int, tuple[Device, Session, Any]] = {}
    connect, next_frame = client_link.Link._connect_once, client_link.next_frame

    async def spy_connect(self, *args, **kw):
        made = {key: len(d.made) for key, d in devs.items()}  # the user is the welcome's
        await connect(self, *args, **kw)
        dev = devs.get((self.user, self.device))
        if dev is not None:
            s = Session(self.welcome, dev.durable, dev.ack_sent)
            # Sent with the welcome's answer, before any delivery: the SDK's own ack past the
            # broker's, and the acks in flight at the drop, resent.
            s.acked_early = max([self.inbox.ack_to_resend(self.welcome) or 0,
                                 *dev.made[made[(dev.user, dev.device)]:]])
            dev.sessions.append(s)
            by_conn[id(self.conn)] = (dev, s, self.conn)  # keeps the conn: ids stay unique

    async def spy_next_frame(stream, conn, early=None, heard=None):
        frame = await next_frame(stream, conn, early, heard)
        seen = by_conn.get(id(conn))
        if seen is not None:
            dev, s, _ = seen
            if isinstance(frame, wire.Deliver):
                s.delivered.append(frame.inbox_seq)
            elif isinstance(frame, wire.Ok) and frame.id in dev.ack_ids:
                dev.durable = max(dev.durable, dev.ack_ids[frame.id])
        return frame

    monkeypatch.setattr(client_link.Link, "_connect_once", spy_connect)
    monkeypatch.setattr(client_link, "next_frame", spy_next_frame)
    return devs


async def ack_durably(dev: Device, upto: int) -> None:
    """`ack` with an id, answered `ok` once durable, as `Client.ack(upto, durable=True)` sends
    it, through the same request path (resent after a drop); made here so that the spy knows
    which `upto` each `ok` answers."""
    def make(i: int) -> wire.Ack:
        dev.ack_ids[i] = upto
        dev.made.append(upto)
        s = dev.sessions[-1] if dev.sessions else None
        if s is not None and not s.delivered:
            s.acked_early = max(s.acked_early, upto)
        return wire.Ack(upto=upto, id=i)

    dev.ack_sent = max(dev.ack_sent, upto)
    await dev.client._link.request(make)


async def listen(dev: Device, history: History) -> None:
    """Take the deliveries; after each burst, ack up to the last one with an id."""
    deliveries = dev.client.deliveries()
    while True:
        burst = [await deliveries.receive()]
        while True:
            try:
                burst.append(deliveries.receive_nowait())
            except trio.WouldBlock:
                break
        for d in burst:
            dev.got.append(d)
            history.deliver(dev.user, dev.device, dev.client, d)
        await ack_durably(dev, burst[-1].inbox_seq)


# -- what the conversations should hold ----------------------------------------------------------

@dataclass
class Model:
    """A conversation after the steps answered so far, and the events they logged."""

    conv: str
    kind: str
    members: dict[str, str] = field(default_factory=dict)  # user -> role
    msgs: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq, sender, cid, body
    read: dict[str, int] = field(default_factory=dict)
    muted: set[str] = field(default_factory=set)
    events: list[tuple] = field(default_factory=list)

    def add(self, user: str, role: str, actor: str) -> None:
        self.members[user] = role
        self.read[user] = max(self.read.get(user, 0), len(self.msgs))  # starts at last seq
        self.events.append((r.MEMBER_ADDED, actor, user, role))


class Gate:
    """Lets the conversation tasks be paused between steps."""

    def __init__(self) -> None:
        self.open = trio.Event()
        self.open.set()
        self.busy = 0
        self.idle = trio.Event()

    @asynccontextmanager
    async def step(self):
        while not self.open.is_set():
            await self.open.wait()
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            if not self.busy:
                self.idle.set()

    async def pause(self) -> None:
        self.open = trio.Event()
        while self.busy:
            self.idle = trio.Event()
            await self.idle.wait()

    def resume(self) -> None:
        self.open.set()


async def run_conv(devs, history: History, gate: Gate, models: list[Model], owner: str,
                   round_: int) -> None:
    """One conversation's life, step by step, recorded in its model as each is answered."""
    others = [u for u in USERS if u != owner]
    y, z, v = others[round_ % 3], others[(round_ + 1) % 3], others[(round_ + 2) % 3]
    c = {u: devs[(u, DEVICE)].client for u in USERS}
    kind = "group" if round_ % 2 == 0 else "channel"

    async with gate.step():
        conv = await c[owner].create(kind, f"{owner}-{round_}", [y], cid=f"{owner}-c{round_}")
        m = Model(conv, kind)
        m.events.append((r.CONV_CREATED, owner, None, None))
        m.add(owner, "owner", owner)
        m.add(y, "member", owner)
        models.append(m)

    async def send(sender: str, i: int) -> None:
        cid, body = f"{owner}-{round_}-{i}", f"body {owner} {round_} {i}"
        history.attempt(sender, cid, body, [u for u in m.members if u != sender])
        res = await c[sender].send(body, conv=conv, cid=cid)
        history.accept(sender, cid, res.conv, res.seq)
        m.msgs.append((res.seq, sender, cid, body))
        m.read[sender] = max(m.read[sender], res.seq)  # posting reads up to one's own message
        m.events.append((r.MESSAGE_ACCEPTED, sender, cid, None))

    async def read(user: str, upto: int) -> None:
        await c[user].read(conv, upto)
        if upto > m.read[user]:
            m.read[user] = upto
            m.events.append((r.READ_MARKED, user, upto, None))

    async def role(actor: str, user: str, role_: str) -> None:
        await c[actor].set_role(conv, user, role_)
        m.members[user] = role_
        m.events.append((r.MEMBER_ROLE_SET, actor, user, role_))

    async def gone(actor: str, user: str) -> None:
        if actor == user:
            await c[user].leave(conv)
        else:
            await c[actor].remove(conv, user)
        del m.members[user]
        m.events.append((r.MEMBER_REMOVED, actor, user, None))

    async def invite(user: str) -> None:
        await c[owner].invite(conv, user)
        m.add(user, "member", owner)

    async def mute(user: str) -> None:
        await c[user].mute(conv)
        m.muted.add(user)
        m.events.append((r.MUTE_SET, user, True, None))

    steps = [
        lambda: invite(z), lambda: role(owner, z, "admin"), lambda: invite(v),
        lambda: mute(y),
        lambda: send(owner, 1), lambda: send(z, 2), lambda: send(owner, 3),  # admins post
        lambda: read(y, 3), lambda: read(v, 2),
        lambda: gone(v, v),  # leave
        lambda: role(z, z, "member"),  # an admin steps down (its resend is `forbidden`: done)
        lambda: gone(owner, z),  # remove
        lambda: send(owner, 4),
    ]
    for step in steps:
        async with gate.step():
            await step()


async def conv_worker(devs, history, gate, models, owner: str, stop: trio.Event) -> None:
    round_ = 0
    while not stop.is_set():
        await run_conv(devs, history, gate, models, owner, round_)
        round_ += 1


# -- the checks ----------------------------------------------------------------------------------

def receipts_read(m: Model, seq: int) -> tuple[str, ...]:
    sender = m.msgs[seq - 1][1]
    return tuple(sorted(u for u in m.members if u != sender and m.read.get(u, 0) >= seq))


async def check_models(auditor, models: list[Model], devs, *, quiet: bool = False) -> None:
    """What the broker answers about every conversation equals its model. A member whose ack
    answered `ok` covers a message is among those it was delivered to (`receipts`); once
    `quiet` (every delivery acked, durably), exactly the members other than its sender are."""
    durable = {(dev.user, d.conv, d.seq) for dev in devs.values() for d in dev.got
               if d.kind == "msg" and d.inbox_seq <= dev.durable}
    problems = []
    for m in models:
        ml = await auditor.members(m.conv)
        got = {**{u: "owner" for u in ml.owners}, **{u: "admin" for u in ml.admins},
               **{u: "member" for u in ml.members}}
        if got != m.members:
            problems.append(f"{m.conv} members {got}, model {m.members}")
        page = await auditor.history(m.conv, after=0, order="oldest", limit=200)
        msgs = [(p.seq, p.sender, p.cid, p.body) for p in page.messages]
        if msgs != m.msgs:
            problems.append(f"{m.conv} history {msgs}, model {m.msgs}")
        for seq, *_ in m.msgs:
            rl = await auditor.receipts(m.conv, seq)
            if tuple(sorted(rl.read)) != receipts_read(m, seq):
                problems.append(f"{m.conv} seq {seq} read by {sorted(rl.read)}, model "
                                f"{receipts_read(m, seq)} (marks {m.read})")
            sender = m.msgs[seq - 1][1]
            others = {u for u in m.members if u != sender}
            acked = {u for u in others if (u, m.conv, seq) in durable}
            if not acked <= set(rl.delivered) or (quiet and set(rl.delivered) != others):
                problems.append(f"{m.conv} seq {seq} delivered to {sorted(rl.delivered)}, acked "
                                f"durably by {sorted(acked)}, members {sorted(others)}")
    assert not problems, "\n".join(problems[:20])


def log_by_conv(store) -> dict[str, list[tuple]]:
    """The events of each conversation as the model writes them."""
    out: dict[str, list[tuple]] = {}
    for e in store.read_events(1, store.last_lsn()):
        d = e.data
        if e.type == r.CONV_CREATED:
            row = (e.type, e.user, None, None)
        elif e.type in (r.MEMBER_ADDED, r.MEMBER_ROLE_SET):
            row = (e.type, e.user, d["user"], d["role"])
        elif e.type == r.MEMBER_REMOVED:
            row = (e.type, e.user, d["user"], None)
        elif e.type == r.MESSAGE_ACCEPTED:
            row = (e.type, e.user, d["cid"], None)
        elif e.type == r.READ_MARKED:
            row = (e.type, e.user, d["upto"], None)
        elif e.type == r.MUTE_SET:
            row = (e.type, e.user, d["muted"], None)
        else:
            continue
        out.setdefault(d["conv"], []).append(row)
    return out


def to_get(store, dev: Device) -> list[int]:
    """The inbox_seqs `dev` is to be handed: its user's inbox, less its own sends (a device
    is not sent its own messages; the user's other devices are)."""
    items, after = [], 0
    while page := store.inbox_after(dev.user, after, 1000):
        items.extend(page)
        after = page[-1].inbox_seq
    own = dev.device == DEVICE  # the user's only sending device
    return [it.inbox_seq for it in items
            if not (own and it.kind == "msg" and it.sender == dev.user)]


def check_devices(devs, store, models: list[Model]) -> None:
    problems = []
    muted = {(m.conv, u) for m in models for u in m.muted}
    for dev in devs.values():
        name = f"{dev.user}/{dev.device}"
        want = to_get(store, dev)
        got = [d.inbox_seq for d in dev.got]
        if got != want:
            first = next((a, b) for a, b in zip_longest(got, want) if a != b)
            problems.append(f"{name} was handed {len(got)} entries, is to get {len(want)}: "
                            f"first difference (handed, to get) {first}")
        for i, s in enumerate(dev.sessions):
            acked = s.welcome.acked
            if acked < s.durable_before:
                problems.append(f"{name} session {i}: welcome acked {acked}, but "
                                f"{s.durable_before} was answered ok before it: a durable ack "
                                "was lost")
            # Past the device's own acks, the broker acks its own sends for it (they are not
            # delivered to it): nothing else may lie between.
            skipped = [seq for seq in want if s.sent_before < seq <= acked]
            if skipped:
                problems.append(f"{name} session {i}: welcome acked {acked}, but only "
                                f"{s.sent_before} was ever acked: {skipped[:5]} skipped")
            # From the welcome's `acked`, or from past an ack the device sent before anything
            # was delivered on this connection (before the drop and resent with the welcome's
            # answer, or made since), if the broker took that first: the device has those
            # entries. Since 2026-12-07 a session's first read of its inbox waits its turn
            # among the others' catching up, so such an ack often comes first.
            starts = range(acked, max(acked, s.sent_before, s.acked_early) + 1)
            expected = [seq for seq in want if seq > acked][:len(s.delivered)]
            if not any(s.delivered == [seq for seq in want if seq > start][:len(s.delivered)]
                       for start in starts):
                problems.append(f"{name} session {i} (acked {acked}, acks sent before "
                                f"{s.sent_before}, on it first {s.acked_early}): delivered "
                                f"{s.delivered[:8]}..., expected {expected[:8]}...")
        stored = store.delivered(dev.user, dev.device)
        if stored < dev.durable:
            problems.append(f"{name}: stored ack {stored} below the answered {dev.durable}")
        for d in dev.got:
            if d.kind == "msg" and d.muted != ((d.conv, dev.user) in muted):
                problems.append(f"{name}: {d.conv} seq {d.seq} delivered muted={d.muted}")
    assert not problems, "\n".join(problems[:20])


async def wait_delivered(devs, bp) -> None:
    """Until each device acked, durably, the last inbox entry it is to get."""
    store = bp.open_store(readonly=True)
    try:
        want = {key: (to_get(store, dev) or [0])[-1] for key, dev in devs.items()}
    finally:
        store.close()
    while any(dev.durable < want[key] for key, dev in devs.items()):
        await trio.sleep(0.05)


# -- the run -------------------------------------------------------------------------------------

async def run_mixed_kills(bp, devs, tally, cycles: int, seed: int) -> None:
    rng = random.Random(seed)
    history, gate, models = History(), Gate(), []
    stop = trio.Event()
    async with AsyncExitStack() as stack:
        for u in USERS:
            devs[(u, DEVICE)].client = await stack.enter_async_context(bp.client(u, DEVICE))
        devs[LISTENER].client = await stack.enter_async_context(bp.client(*LISTENER))
        auditor = await stack.enter_async_context(bp.client(AUDITOR, "audit", role="admin"))
        async with trio.open_nursery() as listeners:
            for dev in devs.values():
                listeners.start_soon(listen, dev, history)
            async with trio.open_nursery() as workers:
                for u in USERS:
                    workers.start_soon(conv_worker, devs, history, gate, models, u, stop)
                for _ in range(cycles):
                    await trio.sleep(rng.uniform(0.3, 1.0))
                    before = {key: len(dev.sessions) for key, dev in devs.items()}
                    bp.kill()
                    tally.add("SIGKILL of the broker under a mixed workload")
                    await trio.sleep(rng.uniform(0.0, 0.3))
                    await bp.astart()
                    if rng.random() < 0.5:  # again, while the clients reconnect and resend
                        await trio.sleep(rng.uniform(0.0, 0.3))
                        bp.kill()
                        tally.add("SIGKILL of the broker while its clients resend")
                        await bp.astart()
                    with trio.fail_after(60):
                        await gate.pause()  # the step the kill cut off is finished first
                        while any(len(dev.sessions) == before[key] for key, dev in devs.items()):
                            await trio.sleep(0.05)  # every device is back before the next kill
                    await check_models(auditor, models, devs)
                    gate.resume()
                await trio.sleep(0.3)
                stop.set()  # each task ends its conversation's steps
            with trio.fail_after(60):
                await wait_delivered(devs, bp)
            await check_models(auditor, models, devs, quiet=True)
            listeners.cancel_scope.cancel()
    assert await bp.aterminate() == 0
    store = bp.open_store(readonly=True)
    try:
        report = check(history, store)
        logged = log_by_conv(store)
        problems = [f"{m.conv}: logged {logged.get(m.conv)}\n  model {m.events}"
                    for m in models if logged.get(m.conv) != m.events]
        assert not problems, "\n".join(problems[:10])
        assert set(logged) == {m.conv for m in models}, "a conversation nobody asked for"
        check_devices(devs, store, models)
    finally:
        store.close()
    verify = homing("audit", "verify", "--data", str(bp.data))
    assert json.loads(verify.stdout.strip().splitlines()[-1])["ok"] is True, verify.stdout
    # Each task ends the conversation it is in, four sends each; each kill ended every session.
    assert report.accepted >= 4 * len(USERS)
    assert all(len(dev.sessions) >= cycles + 1 for dev in devs.values()), \
        [len(dev.sessions) for dev in devs.values()]
    tally.add("SIGKILL mixed: conversations checked", len(models))
    tally.add("SIGKILL mixed: sends checked", report.accepted)


async def test_sigkill_mixed_workload(broker_process, devices, tally):
    """A few SIGKILLs under creates, invites, roles, mutes, sends, reads, leaves, removes and
    acks: every answered request holds after the restart, once, and delivery resumes at the
    durable ack."""
    bp = broker_process("--change-rate", "100000")
    with trio.fail_after(120):
        await run_mixed_kills(bp, devices, tally, cycles=3, seed=3)


@pytest.mark.long
async def test_sigkill_mixed_workload_many_cycles(broker_process, devices, tally):
    """The mixed workload through many SIGKILL cycles (HOMING_LONG_SCALE x 30)."""
    bp = broker_process("--change-rate", "100000")
    cycles = scaled(30, 3)
    with trio.fail_after(60 + cycles * 10):
        await run_mixed_kills(bp, devices, tally, cycles=cycles, seed=13)


async def test_ack_ok_among_own_sends_survives_sigkill(broker_process, tally):
    """An `ack` with an id whose `upto` lies among the device's own sends is answered `ok` only
    once durable: it was answered at once while the broker's ack of those sends waited for its
    next round (OWN_ACK_DELAY_S), and a SIGKILL right after the `ok` lost it."""
    bp = broker_process()
    with trio.fail_after(30):
        c = await RawClient.connect(bp.server, bp.token("ann"), "d1")
        try:
            await c.send(wire.Send(id=1, cid="m1", body="hi", to="bob"))
            assert isinstance(await c.reply(1), wire.Result)
            await trio.sleep(0.02)  # the writer passes over the own send: the cursor moves
            await c.send(wire.Ack(upto=1, id=2))
            assert isinstance(await c.reply(2), wire.Ok)
            bp.kill()
            tally.add("SIGKILL right after an ack's ok")
        finally:
            await c.aclose()
    store = bp.open_store(readonly=True)
    try:
        assert store.delivered("ann", "d1") == 1
    finally:
        store.close()
    await bp.astart()
    with trio.fail_after(30):
        c = await RawClient.connect(bp.server, bp.token("ann"), "d1")
        await c.aclose()
    assert c.welcome.acked == 1
