"""Access control from the attacker's side: refused alike, and nothing leaks existence."""

from __future__ import annotations

import time

import msgpack
import pytest
import trio

import protocol as wire
from broker import tokens
from tests.faults.conftest import RawClient
from tests.waits import wait_until

MISSING = {"grp": "grp:00000000000000ff", "chn": "chn:00000000000000ff", "dm": "dm:x1:x2"}


def _forged(token: str, **claims) -> str:
    """`token` with `claims` changed in its claims and its signature kept."""
    version, body, mac = token.split(".")
    changed = {**msgpack.unpackb(tokens._unb64(body)), **claims}
    return f"{version}.{tokens._b64(msgpack.packb(changed))}.{mac}"


async def hello_answer(server, token):
    c = await RawClient.connect(server)
    await c.send(wire.Hello(versions=(1,), token=token, device="d", id=1))
    f = await c.next()
    await c.aclose()
    return f


async def test_bad_tokens_are_unauthorized(harness, tally):
    """No, forged, expired, other-secret, wrong-shape and huge tokens: unauthorized, closed."""
    h = harness
    good = h.token("alice")
    bad = {
        "no token": "",
        "forged signature": good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),
        # alice's signature under claims changed to another user, and to the admin role ("v1"
        # reversed stood here as "forged user": a bad version, with the claims untouched)
        "forged user": _forged(good, u="root"),
        "forged role": _forged(good, r="admin"),
        "another version": good.replace("v1.", "1v.", 1),
        "expired": tokens.issue(h.broker.secret, "alice", "user", -1),
        "other secret": tokens.issue(b"s" * 32, "alice", "admin", 3600),
        "garbage": "not.a.token",
        "4096 chars": "x" * 4096,
    }
    with trio.fail_after(20):
        for what, token in bad.items():
            f = await hello_answer(h.server, token)
            assert isinstance(f, wire.Error) and f.name == "unauthorized" and f.close, (what, f)
            tally.add(f"auth: {what} token")
        assert h.broker.hub.count == 0
        # The token they were made from is welcomed: refused for what was done to it.
        assert isinstance(await hello_answer(h.server, good), wire.Welcome)


async def test_a_session_ends_when_its_token_expires(harness, tally):
    """A token is checked at hello and for as long as the session lasts: when it expires the
    session is told `unauthorized` and closed, as hello with it would be answered now; a
    session with a longer token carries on."""
    h = harness
    with trio.fail_after(30):
        # Valid for 4 s from a whole second (3 to 4 s from now): room for a busy machine to
        # get the hello answered before it expires.
        issued = time.time()
        started = trio.current_time()
        short = await RawClient.connect(h.server, tokens.issue(h.broker.secret, "alice", "user",
                                                               4), "short")
        async with h.client("bob") as bob:
            while (f := await short.next()) is not None and not isinstance(f, wire.Error):
                pass
            assert f.name == "unauthorized" and f.close and "expired" in f.message, f
            assert time.time() >= int(issued) + 4  # not before it expired (the wall clock's)
            assert trio.current_time() - started < 15  # nor long after (a look a second)
            assert await short.next() is None
            await bob.ping()  # the other session is untouched
        await short.aclose()
        tally.add("auth: a token expiring during its session")


async def test_a_device_only_ever_sees_its_own_users_inbox(harness, tally):
    """mallory, even with bob's device name, gets none of bob's deliveries; acks cannot cross."""
    h = harness
    with trio.fail_after(20):
        async with h.client("alice") as alice, h.client("bob", "b1") as b1:
            for i in range(5):
                await alice.send(f"for bob {i}", to="bob")
            got = [await b1.deliveries().receive() for _ in range(5)]
            mallory = await RawClient.connect(h.server, h.token("mallory"), "b1")
            assert mallory.welcome.user == "mallory" and mallory.welcome.head == 0
            await mallory.send(wire.Ack(upto=got[-1].inbox_seq, id=7))
            err = await mallory.reply(7)
            assert isinstance(err, wire.Error) and err.name == "invalid"
            await mallory.send(wire.Ping(id=8))
            assert isinstance(await mallory.reply(8), wire.Pong)  # nothing else came first
            assert h.broker.hub.online("bob")  # mallory's "b1" did not replace bob's b1
            assert h.broker.store.delivered("bob", "b1") == 0
            await mallory.aclose()
            tally.add("attack: read another user's inbox (device name reuse)")
            tally.add("attack: ack another user's deliveries")


async def test_acks_move_only_the_acking_devices_cursor(harness, tally):
    """b2 acking everything leaves b1's cursor and b1's deliveries untouched."""
    h = harness
    with trio.fail_after(20):
        async with h.client("alice") as alice:
            for i in range(5):
                await alice.send(f"m{i}", to="bob")
        async with h.client("bob", "b2") as b2:
            got = [await b2.deliveries().receive() for _ in range(5)]
            await b2.ack(got[-1].inbox_seq)
            await b2.ping()
        # The ack is committed with the broker's next round of acks, after the ping's answer.
        await wait_until(lambda: h.broker.store.delivered("bob", "b2") == got[-1].inbox_seq)
        assert h.broker.store.delivered("bob", "b1") == 0
        async with h.client("bob", "b1") as b1:
            assert b1.welcome.acked == 0
            again = [await b1.deliveries().receive() for _ in range(5)]
        assert [d.inbox_seq for d in again] == [d.inbox_seq for d in got]
        tally.add("attack: ack another device's deliveries")


async def test_forbidden_alike_for_existing_and_missing_conversations(harness, tally):
    """Every request on a conversation one is not in gets the same forbidden for real and fake
    ids; members of a channel cannot post or take others out; nobody invites themselves or joins
    a closed group."""
    h = harness
    with trio.fail_after(30):
        async with h.client("owner", role="service") as owner, h.client("bob"):
            grp = await owner.create_group("closed", ["bob"])
            chn = await owner.create_channel("news", ["bob"])
            dm = (await owner.send("hi", to="bob")).conv
            m = await RawClient.connect(h.server, h.token("mallory"), "m1")

            def requests(conv, i):
                return [
                    ("history", wire.History(id=i, conv=conv)),
                    ("send", wire.Send(id=i + 1, cid=f"x{i}", body="x", conv=conv)),
                    ("invite self", wire.Invite(id=i + 2, conv=conv, user="mallory")),
                    ("join", wire.Join(id=i + 3, conv=conv)),
                    ("subscribe", wire.Subscribe(id=i + 4, conv=conv)),
                    ("receipts", wire.Receipts(id=i + 5, conv=conv, seq=1)),
                    ("presence", wire.Presence(id=i + 6, conv=conv)),
                    ("read", wire.Read(id=i + 7, conv=conv, upto=1)),
                    ("mute", wire.Mute(id=i + 8, conv=conv)),
                    ("leave", wire.Leave(id=i + 9, conv=conv)),
                    ("remove a member", wire.Remove(id=i + 10, conv=conv, user="bob")),
                ]

            i = 100
            for kind, real in (("grp", grp), ("chn", chn), ("dm", dm)):
                for (what, a), (_, b) in zip(requests(real, i), requests(MISSING[kind], i + 50),
                                             strict=True):
                    await m.send(a)
                    ra = await m.reply(a.id)
                    await m.send(b)
                    rb = await m.reply(b.id)
                    assert isinstance(ra, wire.Error) and ra.name == "forbidden", (kind, what, ra)
                    assert (ra.name, ra.message) == (rb.name, rb.message), (kind, what, ra, rb)
                    tally.add(f"attack: {what} on a conversation one is not in")
                i += 100
            # A channel member cannot post, invite themself as admin, or take the owner out.
            with_err = []
            for frame in (wire.Send(id=1, cid="c1", body="spam", conv=chn),
                          wire.Invite(id=2, conv=chn, user="bob", role="admin"),
                          wire.Remove(id=3, conv=chn, user="owner")):
                r = await RawClient.connect(h.server, h.token("bob"), "braw")
                await r.send(frame)
                with_err.append(await r.reply(frame.id))
                await r.aclose()
            assert [e.name for e in with_err] == ["forbidden"] * 3, with_err
            tally.add("attack: post to a channel as a member")
            tally.add("attack: member promotes self in a channel")
            tally.add("attack: member removes the owner of a channel")
            page, _ = h.broker.store.history(chn)
            assert page == []
            assert "mallory" not in {u for u, _ in h.broker.store.members(grp)}
            await m.aclose()



def test_a_token_is_expired_from_the_second_its_expiry_names():
    """A token is good for its ttl (`tokens.issue`): its expiry `e` is issue time + ttl, the
    first second it is no longer good in. Verified the second before, refused at `e` itself
    (TokenExpired, naming its user). The tests above used tokens minutes or more from their
    expiry, so a token still good at `e` passed them."""
    secret = b"k" * 32
    keys = {tokens.key_id(secret): secret}
    token = tokens.issue(secret, "alice", "user", 3600)
    claims = tokens.verify(keys, token)
    assert claims.expires == claims.issued + 3600
    assert tokens.verify(keys, token, now=claims.expires - 1).user == "alice"
    with pytest.raises(tokens.TokenExpired) as expired:
        tokens.verify(keys, token, now=claims.expires)
    assert expired.value.user == "alice"


def test_a_genuine_token_of_a_role_this_broker_does_not_know_is_refused():
    """A token signed with the broker's key whose role is none of `tokens.ROLES` (a newer
    homing's, or a key used by another tool) is refused as malformed, never taken for a
    session of a role nothing checks. Every forged role above had a bad signature, so a broker
    that took any signed role passed."""
    import hashlib
    import hmac

    secret = b"k" * 32
    keys = {tokens.key_id(secret): secret}
    body = tokens._b64(msgpack.packb({"u": "alice", "r": "root", "e": int(time.time()) + 60,
                                      "i": int(time.time()), "k": tokens.key_id(secret)}))
    mac = hmac.new(secret, b"v1." + body.encode("ascii"), hashlib.sha256).digest()
    with pytest.raises(tokens.TokenError, match="malformed token claims"):
        tokens.verify(keys, f"v1.{body}.{tokens._b64(mac)}")
