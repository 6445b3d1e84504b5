"""A model of what docs/PROTOCOL.md promises, run against a real broker through the SDK.

Hypothesis draws a list of operations (sends, creates, membership changes, reads, acks,
history and receipts queries, mutes, devices going offline, coming back and dropping their
connection); each example runs them in order, one at a time, on a fresh broker over real LMDB
(tests/harness.py) with five users and seven devices: people, a service token and an admin
token (§10). A small reference model, written from the docs, says what each request must
answer (or which error code refuses it), what every user's inbox holds (§9: `msg`, `added`,
`removed`), what history and receipts list, which read receipts are pushed, and what each
device is delivered: every inbox entry past the ack it resumed from, in inbox_seq order, but
its own sends. At the end the conversation and member lists must match the model, and the
store's projections a full replay of its log (`homing audit check`).

The operations run one after the other (each awaits its reply), so the model's order is the
broker's; nothing here depends on timing but the generous `fail_after` of a wait for deliveries.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis.strategies as st
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis.control import currently_in_test_context

import protocol as wire
from broker.client import ClientError
from storage import audit
from tests.harness import running_broker

USERS = ["ann", "bob", "cat", "dan", "eve"]
DEVICES = [("ann", "d1"), ("ann", "d2"), ("bob", "d1"), ("bob", "d2"), ("cat", "d1"),
           ("dan", "d1"), ("eve", "d1")]
# Tokens (§10): dan is a service's backend, eve an operators' tool; the others are people.
TOKEN_ROLES = {"dan": "service", "eve": "admin"}
NOWHERE = "grp:00000000deadbeef"  # a conversation that does not exist
MANAGERS = ("owner", "admin")
# More examples for a longer hunt: HOMING_MODEL_EXAMPLES=2000.
EXAMPLES = int(os.environ.get("HOMING_MODEL_EXAMPLES", "100"))
WAIT_S = 15.0  # for deliveries and reconnects; never reached unless something is lost

user = st.integers(0, len(USERS) - 1)
# Who acts on a conversation: mostly one of its members, or of its owners and admins, so that
# more requests get past the membership checks; sometimes anyone.
actor = st.tuples(st.sampled_from(["member", "manager", "manager", "anyone"]), user)
device = st.integers(0, len(DEVICES) - 1)
conv = st.integers(0, 9)  # an index into the conversations made so far, and NOWHERE
small = st.integers(0, 9)

create = st.tuples(st.just("create"), user, st.sampled_from(["group", "channel"]),
                  st.lists(user, max_size=3), st.booleans(),
                  st.one_of(st.none(), st.integers(0, 2)))
post = st.tuples(st.just("post"), actor, conv, st.integers(0, 1))
operation = st.one_of(
    st.tuples(st.just("dm"), device, user, st.booleans()),
    st.tuples(st.just("dm"), device, user, st.booleans()),
    post, post, post, post, post, create, create,
    st.tuples(st.just("invite"), actor, conv, user, st.sampled_from(["member", "admin"])),
    st.tuples(st.just("set_role"), actor, conv, user, st.sampled_from(["member", "admin"])),
    st.tuples(st.just("set_role"), actor, conv, user, st.just("admin")),
    st.tuples(st.just("join"), actor, conv, st.booleans()),
    st.tuples(st.just("leave"), actor, conv),
    st.tuples(st.just("remove"), actor, conv, user),
    st.tuples(st.just("read"), actor, conv, small),
    st.tuples(st.just("mute"), actor, conv, st.booleans()),
    st.tuples(st.just("history"), actor, conv, st.one_of(st.none(), small),
              st.one_of(st.none(), small), st.integers(1, 4),
              st.sampled_from(["newest", "oldest"])),
    st.tuples(st.just("receipts"), actor, conv, small),
    st.tuples(st.just("members"), actor, conv),
    st.tuples(st.just("resend"), small, st.one_of(st.none(), conv)),
    st.tuples(st.just("ack"), device, small),
    st.tuples(st.just("offline"), device),
    st.tuples(st.just("online"), device),
    st.tuples(st.just("drop"), device),
    st.tuples(st.just("settle")),
)


@dataclass
class Entry:
    """One inbox entry as the model expects it delivered."""

    kind: str
    conv: str
    seq: int
    sender: str
    body: str | None
    cid: str | None
    device: str | None  # the sending device of a message (it is not delivered to it)
    mute_version: int  # the user's mute changes of `conv` when it was appended


@dataclass
class Conv:
    id: str
    kind: str  # direct, group, channel
    name: str | None
    open: bool
    members: dict[str, str] = field(default_factory=dict)  # user -> role
    # user -> the conversation's last seq when they became a member this time (§9: a
    # message's audience is who has been a member since before it was posted).
    since: dict[str, int] = field(default_factory=dict)
    messages: list[tuple[str, str, str]] = field(default_factory=list)  # (from, body, cid)


@dataclass
class Device:
    user: str
    name: str
    client: object = None
    stop: trio.Event | None = None
    done: trio.Event | None = None
    start: int = 0  # the welcome's acked of the client now open: its deliveries follow it
    received: list = field(default_factory=list)  # deliveries to the client now open
    acked: int = 0  # the last ack made durable
    # Read receipts it must be pushed, (conv, user, read), and the pushes it had.
    owed: set = field(default_factory=set)
    pushes: list = field(default_factory=list)


class Model:
    """What the docs say the broker holds."""

    def __init__(self) -> None:
        self.convs: list[Conv] = []
        self.by_id: dict[str, Conv] = {}
        self.inbox: dict[str, list[Entry]] = {u: [] for u in USERS}
        self.recv: dict[tuple[str, str], int] = {}
        self.read: dict[tuple[str, str], int] = {}
        self.muted: set[tuple[str, str]] = set()
        self.mute_version: dict[tuple[str, str], int] = {}

    def conv(self, ix: int) -> str:
        """The conversation `ix` names: one made so far, or (for 9) one that does not exist."""
        if ix == 9 or not self.convs:
            return NOWHERE
        return self.convs[ix % len(self.convs)].id

    def actor(self, conv: str, who: tuple[str, int]) -> str:
        """The user `who` names in `conv`: ("member", i) one of its members, ("manager", i) one
        of its owners and admins (or anyone when it has none), ("anyone", i) any user."""
        kind, ix = who
        c = self.by_id.get(conv)
        if c is not None and kind != "anyone":
            users = sorted(u for u, r in c.members.items() if kind == "member" or r in MANAGERS)
            if users:
                return users[ix % len(users)]
        return USERS[ix]

    def role(self, conv: str, user: str) -> str | None:
        c = self.by_id.get(conv)
        return None if c is None else c.members.get(user)

    def raise_mark(self, marks: dict, conv: str, user: str, seq: int) -> None:
        if seq > marks.get((conv, user), 0):
            marks[(conv, user)] = seq

    def append(self, user: str, entry: Entry) -> None:
        self.inbox[user].append(entry)

    def add_member(self, c: Conv, user: str, role: str, by: str) -> None:
        c.members[user] = role
        last = len(c.messages)
        c.since[user] = last
        self.raise_mark(self.recv, c.id, user, last)  # joining is not reading old messages
        self.raise_mark(self.read, c.id, user, last)
        if by != user and c.kind != "direct":  # §9: added by someone else
            self.append(user, Entry("added", c.id, 0, by, None, None, None,
                                    self.mute_version.get((user, c.id), 0)))

    def managed_without(self, c: Conv, user: str) -> bool:
        """Whether someone could still invite if `user` were no owner or admin (§10)."""
        others = [r for u, r in c.members.items() if u != user]
        return not others or any(r in MANAGERS for r in others)

    def post(self, c: Conv, sender: str, dev: str, body: str, cid: str) -> int:
        c.messages.append((sender, body, cid))
        seq = len(c.messages)
        for member in c.members:
            self.append(member, Entry("msg", c.id, seq, sender, body, cid, dev,
                                      self.mute_version.get((member, c.id), 0)))
        if sender in c.members:  # posting is having read (§9)
            self.raise_mark(self.recv, c.id, sender, seq)
            self.raise_mark(self.read, c.id, sender, seq)
        return seq

    def acked(self, user: str, upto: int) -> None:
        """A device of `user` acked up to `upto`: the delivered marks of what it covers."""
        for entry in self.inbox[user][:upto]:
            if entry.kind == "msg":
                self.raise_mark(self.recv, entry.conv, user, entry.seq)


async def expect(call, error: str | None):
    """Await `call`; it must succeed when `error` is None, else raise ClientError `error`."""
    if currently_in_test_context():
        event(f"{call.__qualname__.split('.')[-1]}: {error or 'ok'}")
    if error is None:
        return await call
    try:
        await call
    except ClientError as exc:
        assert exc.name == error, f"expected {error}, got {exc}"
        return None
    raise AssertionError(f"expected {error}, the request succeeded")


class Run:
    """One example: a broker, its devices, the model, and the operations."""

    def __init__(self, h, nursery: trio.Nursery) -> None:
        self.h, self.nursery, self.m = h, nursery, Model()
        self.devices = [Device(u, d) for u, d in DEVICES]
        self.cids = iter(range(1, 1 << 30))
        self.sent: list[tuple[str, str | None, str, str, int]] = []  # (from, to, conv, cid, seq)
        self.created: dict[tuple[str, str | None], Conv] = {}  # (creator, cid) -> conv made
        self.read_moves: set[tuple[str, str, int]] = set()  # (conv, user, mark) of reads

    # -- devices ------------------------------------------------------------------------------

    async def _hold(self, dev: Device, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.h.client(dev.user, dev.name, TOKEN_ROLES.get(dev.user, "user")) as client:
            task_status.started(client)
            await dev.stop.wait()
        dev.done.set()

    async def connect(self, dev: Device) -> None:
        dev.stop, dev.done = trio.Event(), trio.Event()
        dev.client = await self.nursery.start(self._hold, dev)
        start = dev.client.welcome.acked
        # Resumed right after its last durable ack, or past it over its own sends only (the
        # broker acks those on its behalf).
        assert start >= dev.acked, (dev, start)
        for entry in self.m.inbox[dev.user][dev.acked:start]:
            assert entry.kind == "msg" and entry.sender == dev.user and entry.device == dev.name
        assert dev.client.welcome.head == len(self.m.inbox[dev.user])
        dev.start, dev.received, dev.owed, dev.pushes = start, [], set(), []

    async def disconnect(self, dev: Device) -> None:
        dev.stop.set()
        await dev.done.wait()
        dev.client = None

    def client_of(self, user: str):
        """A connected device of `user` (None if all are offline)."""
        for dev in self.devices:
            if dev.user == user and dev.client is not None:
                return dev
        return None

    def acting(self, cix: int, uix: tuple[str, int]):
        """The conversation `cix` picks, the user `uix` picks for it (`Model.actor`), and a
        connected device of that user; None when all of its devices are offline (the step is
        skipped)."""
        conv_id = self.m.conv(cix)
        user = self.m.actor(conv_id, uix)
        dev = self.client_of(user)
        return None if dev is None else (conv_id, user, dev)

    async def settle(self) -> None:
        """Every connected device is delivered every inbox entry past the ack it resumed from,
        in inbox_seq order, but its own sends; as the model has them."""
        for dev in self.devices:
            if dev.client is None:
                continue
            expected = [(i, e) for i, e in enumerate(self.m.inbox[dev.user], 1)
                        if i > dev.start and not (e.kind == "msg" and e.sender == dev.user
                                                  and e.device == dev.name)]
            with trio.fail_after(WAIT_S):
                while len(dev.received) < len(expected):
                    dev.received.append(await dev.client.deliveries().receive())
            got = [(d.inbox_seq, d.kind, d.conv, d.seq, d.sender, d.body, d.cid)
                   for d in dev.received]
            want = [(i, e.kind, e.conv, e.seq, e.sender, e.body, e.cid) for i, e in expected]
            assert got == want, (dev.user, dev.name)
            for d, (_, e) in zip(dev.received, expected, strict=True):
                key = (dev.user, e.conv)
                if self.m.mute_version.get(key, 0) == e.mute_version:  # unchanged since
                    assert d.muted == (key in self.m.muted), (dev.user, dev.name, d)
            with trio.fail_after(WAIT_S):
                while dev.owed:
                    push = await dev.client.next_push()
                    self.check_push(dev, push)
                    if isinstance(push, wire.Receipt) and push.read is not None:
                        dev.owed.discard((push.conv, push.user, push.read))
            while dev.client._inbox.pushes:  # and those that came besides
                self.check_push(dev, dev.client._inbox.pushes.popleft())

    def check_push(self, dev: Device, push) -> None:
        """A read receipt tells of a read that moved a mark (posting moves it unpushed, §9);
        a delivered one is never of the user's own marks."""
        dev.pushes.append(push)
        if isinstance(push, wire.Receipt):
            if push.read is not None:
                assert (push.conv, push.user, push.read) in self.read_moves, (dev, push)
            else:
                assert push.user != dev.user, (dev, push)

    # -- operations ---------------------------------------------------------------------------

    def cid(self) -> str:
        return f"c{next(self.cids)}"

    async def op_dm(self, dix: int, uix: int, binary: bool) -> None:
        dev, to = self.devices[dix], USERS[uix]
        if dev.client is None:
            return
        body, cid = f"dm {self.cid()}", self.cid()
        if binary:  # bin bodies come back as bytes (§2.1)
            body = body.encode()
        if to == dev.user:
            await expect(dev.client.send(body, to=to, cid=cid), "invalid")
            return
        result = await expect(dev.client.send(body, to=to, cid=cid), None)
        conv_id = "dm:{}:{}".format(*sorted((dev.user, to)))
        assert result.conv == conv_id and not result.dup
        c = self.m.by_id.get(conv_id)
        if c is None:
            c = Conv(conv_id, "direct", None, False)
            self.m.convs.append(c)
            self.m.by_id[conv_id] = c
            for u in sorted((dev.user, to)):
                self.m.add_member(c, u, "member", dev.user)
        assert result.seq == self.m.post(c, dev.user, dev.name, body, cid)
        self.sent.append((dev.user, to, conv_id, cid, result.seq))

    async def op_post(self, uix: tuple[str, int], cix: int, dix: int) -> None:
        conv_id = self.m.conv(cix)
        sender = self.m.actor(conv_id, uix)
        devs = [d for d in self.devices if d.user == sender and d.client is not None]
        if not devs:
            return
        dev = devs[dix % len(devs)]
        role = self.m.role(conv_id, dev.user)
        body, cid = f"post {self.cid()}", self.cid()
        token = TOKEN_ROLES.get(dev.user, "user")
        if token == "admin" and conv_id in self.m.by_id:
            role = "owner"  # an admin token posts anywhere, member or not
        if role is None or (conv_id.startswith("chn:") and role not in MANAGERS
                            and token != "service"):
            await expect(dev.client.send(body, conv=conv_id, cid=cid), "forbidden")
            return
        result = await expect(dev.client.send(body, conv=conv_id, cid=cid), None)
        assert (result.conv, result.cid, result.dup) == (conv_id, cid, False)
        assert result.seq == self.m.post(self.m.by_id[conv_id], dev.user, dev.name, body, cid)
        self.sent.append((dev.user, None, conv_id, cid, result.seq))

    async def op_create(self, uix: int, kind: str, members: list[int], open_: bool,
                        cid: int | None = None) -> None:
        """Create a group or channel; with a `cid` made before by the same user, a repeat:
        the first conversation (§9, "Idempotent create"), or conflict for the other kind."""
        creator = USERS[uix]
        dev = self.client_of(creator)
        if dev is None:
            return
        names = [USERS[i] for i in members]
        name = f"{kind} {len(self.m.convs)}"
        key = (creator, None if cid is None else f"k{cid}")
        first = self.created.get(key)
        if first is not None:
            error = None if first.kind == kind else "conflict"
            conv_id = await expect(dev.client.create(kind, name, names, open_, cid=key[1]),
                                   error)
            assert error is not None or conv_id == first.id
            return
        conv_id = await expect(dev.client.create(kind, name, names, open_, cid=key[1]), None)
        assert conv_id.startswith("grp:" if kind == "group" else "chn:")
        assert conv_id not in self.m.by_id
        c = Conv(conv_id, kind, name, open_)
        if cid is not None:
            self.created[key] = c
        self.m.convs.append(c)
        self.m.by_id[conv_id] = c
        self.m.add_member(c, creator, "owner", creator)
        for u in dict.fromkeys(names):
            if u != creator:
                self.m.add_member(c, u, "member", creator)

    async def op_resend(self, k: int, other_conv: int | None) -> None:
        """Send again a message sent before, with its cid, from any device of its sender: the
        first result, dup, nothing appended, even where the sender may no longer post; the
        cid for another conversation: conflict (§9, "Idempotent send")."""
        if not self.sent:
            return
        sender, to, conv_id, cid, seq = self.sent[k % len(self.sent)]
        dev = self.client_of(sender)
        if dev is None:
            return
        if other_conv is not None:
            other = self.m.conv(other_conv)
            if other != conv_id:
                await expect(dev.client.send("again", conv=other, cid=cid), "conflict")
                return
        call = (dev.client.send("again", to=to, cid=cid) if to is not None
                else dev.client.send("again", conv=conv_id, cid=cid))
        result = await expect(call, None)
        assert (result.conv, result.seq, result.cid, result.dup) == (conv_id, seq, cid, True)

    def _manager_refusal(self, actor: str, conv_id: str) -> str | None:
        """forbidden unless `actor` is an owner or admin of `conv_id` (§10; a direct
        conversation nobody owns), or has an admin token: then invalid in a direct one."""
        if TOKEN_ROLES.get(actor) == "admin" and conv_id in self.m.by_id:
            return "invalid" if conv_id.startswith("dm:") else None
        role = self.m.role(conv_id, actor)
        return None if role in MANAGERS else "forbidden"

    async def op_invite(self, aix: tuple[str, int], cix: int, tix: int, role: str) -> None:
        if (acting := self.acting(cix, aix)) is None:
            return
        (conv_id, actor, dev), target = acting, USERS[tix]
        error = self._manager_refusal(actor, conv_id)
        current = self.m.role(conv_id, target)
        if error is None and current is not None and current != role:
            error = "conflict"
        await expect(dev.client.invite(conv_id, target, role), error)
        if error is None and current is None:
            self.m.add_member(self.m.by_id[conv_id], target, role, actor)

    async def op_set_role(self, aix: tuple[str, int], cix: int, tix: int, role: str) -> None:
        if (acting := self.acting(cix, aix)) is None:
            return
        (conv_id, actor, dev), target = acting, USERS[tix]
        error = self._manager_refusal(actor, conv_id)
        current = self.m.role(conv_id, target)
        if error is None:
            c = self.m.by_id[conv_id]
            # Not a member, an owner, or the last owner or admin stepping down: conflict.
            stuck = (current != role and role == "member"
                     and not self.m.managed_without(c, target))
            if current is None or current == "owner" or stuck:
                error = "conflict"
        await expect(dev.client.set_role(conv_id, target, role), error)
        if error is None:
            self.m.by_id[conv_id].members[target] = role

    async def op_join(self, uix: tuple[str, int], cix: int, subscribe: bool) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        c = self.m.by_id.get(conv_id)
        role = self.m.role(conv_id, u)
        admin = TOKEN_ROLES.get(u) == "admin"
        if c is None or c.kind == "direct" or (role is None and not c.open and not admin):
            error = "forbidden"
        elif role is None and c.kind == "channel" and TOKEN_ROLES.get(u) == "service":
            error = "forbidden"  # a service is invited to a channel (since 2026-12-06, §5.2)
        else:
            error = None
        call = dev.client.subscribe(conv_id) if subscribe else dev.client.join(conv_id)
        await expect(call, error)
        if error is None and role is None:
            self.m.add_member(c, u, "member", u)

    async def op_leave(self, uix: tuple[str, int], cix: int) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        c = self.m.by_id.get(conv_id)
        role = self.m.role(conv_id, u)
        if role is None:
            error = "forbidden"
        elif c.kind == "direct":
            error = "invalid"
        elif role in MANAGERS and not self.m.managed_without(c, u):
            error = "conflict"
        else:
            error = None
        await expect(dev.client.leave(conv_id), error)
        if error is None:
            del c.members[u], c.since[u]  # one's own act: no inbox entry

    async def op_remove(self, aix: tuple[str, int], cix: int, tix: int) -> None:
        if (acting := self.acting(cix, aix)) is None:
            return
        (conv_id, actor, dev), target = acting, USERS[tix]
        error = self._manager_refusal(actor, conv_id)
        current = self.m.role(conv_id, target)
        c = self.m.by_id.get(conv_id)
        if error is None:
            if target == actor:
                error = "invalid"
            elif current == "owner" or (current == "admin"
                                        and not self.m.managed_without(c, target)):
                error = "conflict"
        await expect(dev.client.remove(conv_id, target), error)
        if error is None and current is not None:
            del c.members[target], c.since[target]
            self.m.append(target, Entry("removed", conv_id, 0, actor, None, None, None,
                                        self.m.mute_version.get((target, conv_id), 0)))

    async def op_read(self, uix: tuple[str, int], cix: int, upto: int) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        error = None if self.m.role(conv_id, u) is not None else "forbidden"
        await expect(dev.client.read(conv_id, upto), error)
        if error is None:
            c = self.m.by_id[conv_id]
            mark = min(upto, len(c.messages))
            if mark > self.m.read.get((conv_id, u), 0):
                self.read_moves.add((conv_id, u, mark))
                # §9: pushed to the other members online (in a channel its owners and admins)
                # and to the reader's own devices, this one included.
                hear = {m for m, r in c.members.items() if c.kind != "channel" or r in MANAGERS}
                for other in self.devices:
                    if other.client is not None and other.user in hear | {u}:
                        other.owed.add((conv_id, u, mark))
            self.m.raise_mark(self.m.read, conv_id, u, mark)
            self.m.raise_mark(self.m.recv, conv_id, u, mark)

    async def op_mute(self, uix: tuple[str, int], cix: int, muted: bool) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        error = None if self.m.role(conv_id, u) is not None else "forbidden"
        await expect(dev.client.mute(conv_id, muted), error)
        key = (u, conv_id)
        if error is None and (key in self.m.muted) != muted:
            self.m.muted.symmetric_difference_update({key})
            self.m.mute_version[key] = self.m.mute_version.get(key, 0) + 1

    async def op_history(self, uix: tuple[str, int], cix: int, before, after, limit: int,
                         order: str) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        admin = TOKEN_ROLES.get(u) == "admin" and conv_id in self.m.by_id
        if self.m.role(conv_id, u) is None and not admin:
            await expect(dev.client.history(conv_id, before=before, after=after, limit=limit,
                                            order=order), "forbidden")
            return
        page = await expect(dev.client.history(conv_id, before=before, after=after,
                                               limit=limit, order=order), None)
        msgs = self.m.by_id[conv_id].messages
        match = [(seq, *m) for seq, m in enumerate(msgs, 1)
                 if (before is None or seq < before) and (after is None or seq > after)]
        if order == "newest":
            match.reverse()
        got = [(p.seq, p.sender, p.body, p.cid) for p in page.messages]
        assert got == match[:limit], (conv_id, before, after, limit, order)
        assert page.more == (len(match) > limit)
        stamps = [p.ts for p in sorted(page.messages)]  # §4.1: ts does not go back as seq rises
        assert stamps == sorted(stamps), (conv_id, page)

    async def op_receipts(self, uix: tuple[str, int], cix: int, seq: int) -> None:
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        role = self.m.role(conv_id, u)
        c = self.m.by_id.get(conv_id)
        if c is not None and c.messages and 0 < seq < 9:  # mostly one of its messages
            seq = 1 + (seq - 1) % len(c.messages)
        token = TOKEN_ROLES.get(u, "user")
        if token == "admin" and c is not None:
            role = "owner"
        if role is None or (c.kind == "channel" and role not in MANAGERS and token == "user"):
            error = "forbidden"
        elif not 1 <= seq <= len(c.messages):
            error = "not_found"
        else:
            error = None
        reply = await expect(dev.client.receipts(conv_id, seq), error)
        if error is None:
            sender = c.messages[seq - 1][0]
            # §9: the audience, who joined before it (a later joiner's marks start at their
            # joining, past it: until 2026-12-06 they were listed as having it).
            audience = sorted(m for m in c.members if m != sender and c.since[m] < seq)
            delivered = [m for m in audience if self.m.recv.get((conv_id, m), 0) >= seq]
            read = [m for m in audience if self.m.read.get((conv_id, m), 0) >= seq]
            unread = [m for m in audience if m not in read]
            assert (list(reply.delivered), list(reply.read), list(reply.unread)) == (
                delivered, read, unread), (conv_id, seq)

    async def op_members(self, uix: tuple[str, int], cix: int) -> None:
        """Any member lists a conversation's members; in a channel only its owners, admins and
        service tokens (§5.2); an admin token any conversation."""
        if (acting := self.acting(cix, uix)) is None:
            return
        conv_id, u, dev = acting
        c = self.m.by_id.get(conv_id)
        role, token = self.m.role(conv_id, u), TOKEN_ROLES.get(u, "user")
        if token == "admin" and c is not None:
            role = "owner"
        if role is None or (c.kind == "channel" and role not in MANAGERS and token == "user"):
            await expect(dev.client.members(conv_id), "forbidden")
            return
        listed = await expect(dev.client.members(conv_id), None)
        by_role = {r: sorted(m for m, mr in c.members.items() if mr == r)
                   for r in ("owner", "admin", "member")}
        assert (listed.kind, listed.name, list(listed.owners), list(listed.admins),
                list(listed.members)) == (c.kind, c.name, by_role["owner"], by_role["admin"],
                                          by_role["member"]), conv_id

    async def op_ack(self, dix: int, k: int) -> None:
        """Ack one of the deliveries had (or all), and wait until that is durable."""
        dev = self.devices[dix]
        if dev.client is None:
            return
        await self.settle()
        had = [d.inbox_seq for d in dev.received]
        upto = max(dev.start, had[k % len(had)] if had and k else (had[-1] if had else 0))
        if upto <= dev.acked:
            return
        await dev.client.ack(upto, durable=True)  # `ok` once durable (§5.2)
        dev.acked = upto
        self.m.acked(dev.user, upto)

    async def op_offline(self, dix: int) -> None:
        dev = self.devices[dix]
        if dev.client is not None:
            await self.settle()
            await self.disconnect(dev)

    async def op_online(self, dix: int) -> None:
        dev = self.devices[dix]
        if dev.client is None:
            await self.connect(dev)

    async def op_drop(self, dix: int) -> None:
        """The connection breaks under the SDK: it reconnects by itself, and hands over each
        delivery once, with no gap."""
        dev = self.devices[dix]
        if dev.client is None or dev.client._link.stream is None:
            return
        await self.settle()  # pushes are not redelivered: those owed first
        reconnects = dev.client.reconnects
        await trio.aclose_forcefully(dev.client._link.stream)
        with trio.fail_after(WAIT_S):
            while dev.client.reconnects == reconnects or dev.client._link.stream is None:
                await trio.sleep(0.01)

    async def op_settle(self) -> None:
        await self.settle()

    # -- the end ------------------------------------------------------------------------------

    async def check_final(self) -> None:
        for dev in self.devices:
            if dev.client is None:
                await self.connect(dev)
        await self.settle()
        for u in USERS:
            dev = self.client_of(u)
            listed = await dev.client.conversations(limit=1000)
            assert not listed.more
            want = []
            for c in sorted(self.m.convs, key=lambda c: c.id.encode()):
                if u in c.members:
                    want.append(wire.ConvEntry(
                        c.id, c.kind, c.members[u], len(c.messages),
                        self.m.read.get((c.id, u), 0), (u, c.id) in self.m.muted, c.name))
            assert list(listed.convs) == want, u
        for c in self.m.convs:
            for u, role in c.members.items():
                if role in MANAGERS or c.kind != "channel":
                    dev = self.client_of(u)
                    ml = await dev.client.members(c.id)
                    by_role = {r: sorted(m for m, mr in c.members.items() if mr == r)
                               for r in ("owner", "admin", "member")}
                    assert (ml.kind, list(ml.owners), list(ml.admins), list(ml.members)) == (
                        c.kind, by_role["owner"], by_role["admin"], by_role["member"])
                    page = await dev.client.history(c.id, limit=200, order="oldest")
                    assert [(p.seq, p.sender, p.body, p.cid) for p in page.messages] == [
                        (seq, *m) for seq, m in enumerate(c.messages, 1)]
                    break


async def run_example(ops) -> None:
    with tempfile.TemporaryDirectory(prefix="homing-broker-model-") as tmp:
        async with running_broker(Path(tmp) / "data") as h, trio.open_nursery() as nursery:
            run = Run(h, nursery)
            for dev in run.devices:
                await run.connect(dev)
            for op in ops:
                await getattr(run, f"op_{op[0]}")(*op[1:])
            await run.check_final()
            for dev in run.devices:
                await run.disconnect(dev)
            h.broker.shutdown()  # all committed: the audit sees the whole log
            await h.broker.wait_stopped()
            store = h.broker.store
            assert store.check_projections() is None
            assert audit.check_projections(store)[0] is None
            assert store.verify_log() == store.last_lsn()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A late joiner (dan), and one who leaves and joins again (bob), asked of by `receipts` (§9, the
# audience): the model counted them for the messages before their joining until 2026-12-06.
@example(first=[("create", 0, "group", [1, 2], True, None)],
         ops=[("post", ("member", 0), 0, 0), ("invite", ("manager", 0), 0, 3, "member"),
              ("leave", ("anyone", 1), 0), ("post", ("member", 0), 0, 0),
              ("join", ("anyone", 1), 0, False), ("post", ("member", 0), 0, 1),
              ("read", ("anyone", 1), 0, 9), ("read", ("anyone", 3), 0, 9),
              ("receipts", ("manager", 0), 0, 1), ("receipts", ("manager", 0), 0, 2),
              ("receipts", ("manager", 0), 0, 3)])
@given(first=st.lists(create, min_size=1, max_size=3),
       ops=st.lists(operation, min_size=10, max_size=40))
def test_the_broker_keeps_the_promises_of_the_docs(first, ops):
    event(f"{len(first + ops) // 10 * 10}+ operations")
    trio.run(run_example, first + ops)


async def test_what_the_docs_now_say_of_direct_conversations_and_joins(harness):
    """The answers PROTOCOL.md did not give before this model met them (§5.2 `join`, `leave`;
    §9): a direct conversation is neither joined nor left, its first message is the first
    entry of it in both inboxes (no `added`), a member's join is `ok`, and an admin token joins
    a closed group."""
    async with harness.client("ann") as ann, harness.client("bob") as bob, \
            harness.client("cat") as cat, harness.client("eve", role="admin") as eve:
        result = await ann.send("hi", to="bob")
        with trio.fail_after(WAIT_S):
            first = await bob.deliveries().receive()
        assert (first.inbox_seq, first.kind, first.conv) == (1, "msg", result.conv)
        await expect(bob.leave(result.conv), "invalid")
        await expect(bob.join(result.conv), "forbidden")
        await expect(cat.join(result.conv), "forbidden")
        closed = await ann.create_group("closed", ["bob"])
        await bob.join(closed)  # a member already: nothing changes
        await expect(cat.join(closed), "forbidden")
        await eve.join(closed)
        listed = await ann.members(closed)
        assert (listed.owners, listed.members) == (("ann",), ("bob", "eve"))
