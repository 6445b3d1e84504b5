"""An attacker's review of access control (2026-12-06), request by request: what the list of
tests/faults/test_access.py missed. Real brokers on loopback, real LMDB, raw sessions.

* A hello's token was checked as it arrived; a hello that then waited (for the device's start
  at the inbox head, behind a slow commit) was welcomed with it however its token stood by
  then: a revocation was asked again after the wait (`handshake._admitted`), a key retired or a
  token expired meanwhile were not.
* A service token that is a member of a channel posts there (PROTOCOL.md §10), and sees its
  members, who is online and the receipts: one that let itself into an open channel with
  `subscribe` could post to every subscriber and list them all.
"""

from __future__ import annotations

import time

import trio

import protocol as wire
from broker import keyring, tokens
from tests.broker.test_new_device_review import _hello, _send, _stalled
from tests.faults.conftest import RawClient
from tests.harness import running_broker
from tests.waits import wait_until

MISSING = {"grp": "grp:00000000000000ff", "chn": "chn:00000000000000ff"}


async def _answer_and_after(c: RawClient) -> list:
    """Every frame `c` gets until the broker closes it (or 10 s pass: a session left open)."""
    frames = []
    with trio.move_on_after(10):
        while (f := await c.next()) is not None:
            frames.append(f)
    return frames


async def test_a_key_retired_while_a_hello_waits_for_its_start_refuses_it(tmp_path, tally):
    """bob's new tablet says hello at the head with a token of the previous key, and its start
    waits behind a slow commit; the operator retires that key meanwhile, and the broker ends
    every session of it. The tablet's hello was welcomed when its start was durable, and its
    session lived with the retired key until its token expired (the broker ends such sessions
    only when the key files change). It is now refused `unauthorized`, as a hello with that
    token is from the retire on."""
    async with running_broker(tmp_path / "data") as h:
        data = h.config.data_dir
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 3, "bob", "old")
        old = h.token("bob")  # signed with the key about to become the previous one
        keyring.rotate(data)
        old_key = tokens.verify(h.broker.keyring.keys, old).key
        await wait_until(lambda: len(h.broker.keyring.keys) == 2)  # the rotate taken up
        async with _stalled(h.broker.store) as release:
            tablet = await _hello(h.server, old, "tablet", "head")
            await wait_until(lambda: ("bob", "tablet") in h.broker.head_starts)
            keyring.retire(data)
            await wait_until(lambda: old_key not in h.broker.keyring.keys)  # taken up
            release.set()
            frames = await _answer_and_after(tablet)
        assert frames and isinstance(frames[0], wire.Error), frames
        assert (frames[0].name, frames[0].close) == ("unauthorized", True), frames[0]
        assert not any(isinstance(f, wire.Deliver) for f in frames), frames
        assert not h.broker.hub.online("bob")
        await tablet.aclose()
        await alice.aclose()
        tally.add("attack: a hello waiting for its start while its key is retired")


async def test_a_token_that_expires_while_its_hello_waits_is_refused(tmp_path, tally):
    """A token with seconds left says hello at the head, and its start waits behind a slow
    commit past the token's expiry. The hello was welcomed with the expired token and sent the
    inbox until the idle watch's next look ended the session; it is now refused `unauthorized`
    ("token expired"), as a hello with that token is from its expiry on."""
    async with running_broker(tmp_path / "data") as h:
        alice = await RawClient.connect(h.server, h.token("alice"), "a1")
        await _send(alice, 3, "bob", "old")
        short = tokens.issue(h.broker.secret, "bob", "user", 3)
        expires = tokens.verify(h.broker.keyring.keys, short).expires
        async with _stalled(h.broker.store) as release:
            tablet = await _hello(h.server, short, "tablet", "head")
            await wait_until(lambda: ("bob", "tablet") in h.broker.head_starts)
            await wait_until(lambda: time.time() > expires)
            release.set()
            frames = await _answer_and_after(tablet)
        assert frames and isinstance(frames[0], wire.Error), frames
        assert (frames[0].name, frames[0].close) == ("unauthorized", True), frames[0]
        assert "expired" in frames[0].message, frames[0]
        assert not any(isinstance(f, wire.Deliver) for f in frames), frames
        await tablet.aclose()
        await alice.aclose()
        tally.add("attack: a hello waiting for its start while its token expires")


async def test_a_service_token_does_not_let_itself_into_a_channel(harness, tally):
    """Head office's open channel of offers has a customer subscribed; a shop's backend, a
    service token, subscribed to it as anyone may, and then, as a service member, posted to
    every subscriber and listed them (`members`, `presence`). Its `subscribe` and `join` of a
    channel are now refused `forbidden`, as for a channel that does not exist, nothing logged;
    invited by an owner or admin, it is a member as before, and posts."""
    h = harness
    async with h.client("hq") as hq, h.client("customer") as customer:
        offers = await hq.create_channel("offers", ["customer"], open=True)
        assert (await customer.deliveries().receive()).kind == "added"
        bot = await RawClient.connect(h.server, h.token("shop-42", "service"), "bot")
        logged = h.broker.store.last_lsn()
        refused = []
        for i, frame in enumerate((wire.Subscribe(id=1, conv=offers), wire.Join(id=2, conv=offers),
                                   wire.Send(id=3, cid="spam", body="50% off", conv=offers),
                                   wire.Members(id=4, conv=offers),
                                   wire.Presence(id=5, conv=offers))):
            await bot.send(frame)
            refused.append(await bot.reply(i + 1))
        assert [(type(r).__name__, getattr(r, "name", None)) for r in refused] == [
            ("Error", "forbidden")] * 5, refused
        await bot.send(wire.Subscribe(id=7, conv=MISSING["chn"]))  # as if there were none
        assert refused[0].message == (await bot.reply(7)).message
        assert h.broker.store.last_lsn() == logged
        assert "shop-42" not in {u for u, _ in h.broker.store.members(offers)}
        await hq.invite(offers, "shop-42")  # put there by the channel's owner: a member
        await bot.send(wire.Send(id=6, cid="ok", body="open till 8", conv=offers))
        assert isinstance(await bot.reply(6), wire.Result)
        got = await customer.deliveries().receive()
        assert (got.sender, got.body) == ("shop-42", "open till 8")
        await bot.aclose()
        tally.add("attack: a service token subscribes to an open channel to post in it")


def _requests(conv: str, me: str, i: int, open_: bool) -> list:
    """Every request a former member of `conv` might try, ids from `i`; `join` and
    `subscribe` only of a closed one (an open one takes them back: removing is not banning)."""
    frames = [
        wire.History(id=i, conv=conv), wire.History(id=i + 1, conv=conv, after=0,
                                                    order="oldest"),
        wire.Send(id=i + 2, cid=f"x{i}", body="x", conv=conv),
        wire.Invite(id=i + 3, conv=conv, user=me, role="admin"),
        wire.SetRole(id=i + 4, conv=conv, user=me, role="admin"),
        wire.Remove(id=i + 5, conv=conv, user="bob"), wire.Remove(id=i + 6, conv=conv, user=me),
        wire.Receipts(id=i + 7, conv=conv, seq=1), wire.Receipts(id=i + 8, conv=conv, seq=0),
        wire.Receipts(id=i + 9, conv=conv, seq=2**63 - 1), wire.Presence(id=i + 10, conv=conv),
        wire.Members(id=i + 11, conv=conv), wire.Read(id=i + 12, conv=conv, upto=2**63 - 1),
        wire.Mute(id=i + 13, conv=conv), wire.Mute(id=i + 14, conv=conv, muted=False),
        wire.Leave(id=i + 15, conv=conv)]
    if not open_:
        frames += [wire.Join(id=i + 16, conv=conv), wire.Subscribe(id=i + 17, conv=conv)]
    return frames


async def _until_pong(c: RawClient, request_id: int) -> list:
    """The frames `c` is sent before the answer to its ping `request_id`: all that was queued
    for it by then (a session's writer keeps their order)."""
    await c.send(wire.Ping(id=request_id))
    frames = []
    with trio.fail_after(10):
        while not isinstance(f := await c.next(), wire.Pong):
            assert f is not None, frames
            frames.append(f)
    return frames


async def test_former_members_are_strangers_and_hear_nothing_more(harness, tally):
    """lefty left, and remy was removed from, a closed and an open group and channel. Every
    request of theirs on one is answered as on a made-up id (the same code and message: it
    does not tell that they were there), and nothing of it is logged; their `typing` reaches
    nobody. Online, they are sent nothing more of them: no message, `typing`, `receipt` or
    `status` (of a member who comes online after they left), where stay, a member still, is
    sent each."""
    h = harness
    store = h.broker.store
    async with h.client("owner") as owner, h.client("bob") as bob:
        them = ["bob", "lefty", "remy", "stay"]
        convs = {("grp", False): await owner.create_group("g", them),
                 ("grp", True): await owner.create_group("og", them, open=True),
                 ("chn", False): await owner.create_channel("c", them),
                 ("chn", True): await owner.create_channel("oc", them, open=True)}
        for conv in convs.values():
            await owner.send("before", conv=conv)
        lefty = await RawClient.connect(h.server, h.token("lefty"), "l1")
        remy = await RawClient.connect(h.server, h.token("remy"), "r1")
        stay = await RawClient.connect(h.server, h.token("stay"), "s1")
        for i, conv in enumerate(convs.values()):
            await lefty.send(wire.Leave(id=900 + i, conv=conv))
            assert isinstance(await lefty.reply(900 + i), wire.Ok)
            await owner.remove(conv, "remy")
        for c in (lefty, remy):
            for conv in convs.values():
                await c.send(wire.Typing(conv=conv))  # dropped: nobody is told
            await _until_pong(c, 1)  # what the conversations sent them before: taken
        told = await _until_pong(stay, 1)
        assert not [f for f in told if getattr(f, "user", None) in ("lefty", "remy")], told
        start = store.last_lsn()
        for me, c in (("lefty", lefty), ("remy", remy)):
            for (kind, open_), conv in convs.items():
                real, fake = (_requests(conv, me, 1000, open_),
                              _requests(MISSING[kind], me, 2000, open_))
                for a, b in zip(real, fake, strict=True):
                    await c.send(a)
                    ra = await c.reply(a.id)
                    await c.send(b)
                    rb = await c.reply(b.id)
                    assert isinstance(ra, wire.Error) and ra.name == "forbidden", (me, a, ra)
                    assert (ra.code, ra.message, ra.close) == (rb.code, rb.message, rb.close), (
                        me, a, ra, rb)
                tally.add("attack: every request of a former member (left or removed)",
                          len(real))
        assert [e for e in store.read_events(start + 1) if e.user in ("lefty", "remy")] == []
        await owner.invite(convs[("grp", False)], "carol")
        async with h.client("carol") as carol:  # online: told to the group's members online
            sent = {conv: await owner.send("after", conv=conv) for conv in convs.values()}
            for (kind, _), conv in convs.items():
                await (bob if kind == "grp" else owner).typing(conv)
                await bob.read(conv, sent[conv].seq)
            await carol.ping()
        await bob.ping()
        await owner.ping()
        for c in (lefty, remy):
            heard = [f for f in await _until_pong(c, 2)
                     if getattr(f, "conv", None) in convs.values() or isinstance(f, wire.Status)]
            assert heard == [], heard
        frames = await _until_pong(stay, 2)
        assert not [f for f in frames if getattr(f, "user", None) in ("lefty", "remy")], frames
        heard = {(type(f).__name__, getattr(f, "conv", None) or getattr(f, "user", None))
                 for f in frames}
        assert heard >= {*(("Deliver", conv) for conv in convs.values()),
                         *(("TypingNotice", conv) for conv in convs.values()),
                         ("Receipt", convs[("grp", False)]), ("Receipt", convs[("grp", True)]),
                         ("Status", "carol")}, heard
        tally.add("attack: pushes to former members (messages, typing, receipts, status)", 2)
        for c in (lefty, remy, stay):
            await c.aclose()
