"""Requests a client may send as fast as its socket allows, that cost a place in the commits:
each is refused before it reaches the commit, or bounded by a rate (docs/OPERATIONS.md,
"Limits"), so a flood of them does not fill the commits other users' sends wait for."""

from __future__ import annotations

import trio

import protocol as wire
from tests.faults.conftest import RawClient, replies
from tests.harness import running_broker


async def test_a_user_tokens_revokes_are_refused_without_a_commit(tmp_path):
    """A revoke with a token not an admin's is refused `forbidden` as it arrives: a flood of
    them queues nothing for the commit (until 2026-12-06 each went to the commit, whose rules
    refused it, and only --max-inflight-requests bounded them)."""
    async with running_broker(tmp_path / "data") as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("mallory"), "d")
            await raw.send(wire.Ping(id=1))
            await raw.reply(1)
            committed = h.broker.committer.commands
            for i in range(2, 302):
                await raw.send(wire.Revoke(id=i, user="alice"))
            got = await replies(raw, range(2, 302))
            assert {(f.name, f.message) for f in got.values()} == {
                ("forbidden", "only an admin token may revoke tokens")}
            assert h.broker.committer.commands == committed
            await raw.aclose()


async def test_reads_past_the_users_read_rate_are_refused_and_others_go_on(tmp_path):
    """--read-rate bounds a user's read receipts, refused by the commit's rules (a conversation
    the user is not in), at or below the mark, or not: a pipelined flood of them past the burst
    is answered `rate_limited` with `retry_ms`, counted in the stats, and never committed, the
    connection read again only once the rate allows a read (10 ms at most), while another
    user's sends are all accepted and delivered (until 2026-12-06 every read went to the
    commits)."""
    async with running_broker(tmp_path / "data", reads_per_s_per_user=20.0) as h, \
            h.client("alice") as alice, h.client("bob") as bob:
        with trio.fail_after(30):
            first = await alice.send("hi", to="bob")
            mallory = await RawClient.connect(h.server, h.token("mallory"), "d")
            await mallory.send(wire.Ping(id=1))
            await mallory.reply(1)
            committed, limited = h.broker.committer.commands, h.broker.rate_limited
            start = trio.current_time()
            for i in range(2, 302):
                await mallory.send(wire.Read(id=i, conv=first.conv, upto=1))
            sent = [await alice.send(f"m{i}", to="bob") for i in range(20)]
            got = await replies(mallory, range(2, 302))
            elapsed = trio.current_time() - start
            refused = [f for f in got.values() if f.name == "rate_limited"]
            forbidden = [f for f in got.values() if f.name == "forbidden"]
            assert len(refused) + len(forbidden) == 300
            assert 20 <= len(forbidden) <= 20 + 20 * elapsed + 1, len(forbidden)
            assert all(f.close is False and 1 <= f.retry_ms <= 50 for f in refused), refused[0]
            assert elapsed >= 0.005 * len(refused), (elapsed, len(refused))  # paced
            assert h.broker.rate_limited - limited == len(refused)
            # the reads refused by the rate queued nothing; alice's 20 sends and bob's acks did
            assert h.broker.committer.commands - committed <= len(forbidden) + 2 * len(sent)
            assert all(not r.dup for r in sent)
            bodies = []
            async for d in bob.deliveries():
                bodies.append(d.body)
                await bob.ack(d)
                if len(bodies) == 21:
                    break
            assert bodies == ["hi"] + [f"m{i}" for i in range(20)]
            await mallory.aclose()


async def test_a_read_without_an_id_past_the_rate_is_told_without_one(tmp_path):
    """A `read` without an `id` past --read-rate is answered `rate_limited` without an id, as
    its other refusals are (PROTOCOL.md §6), with `retry_ms`; the connection goes on."""
    async with running_broker(tmp_path / "data", reads_per_s_per_user=0.01) as h:
        with trio.fail_after(30):
            raw = await RawClient.connect(h.server, h.token("mallory"), "d")
            await raw.send(wire.Read(id=1, conv="dm:alice:bob", upto=1))  # the burst of one
            assert (await raw.reply(1)).name == "forbidden"
            await raw.send(wire.Read(conv="dm:alice:bob", upto=1))
            refused = await raw.next()
            assert (refused.name, refused.id, refused.close) == ("rate_limited", None, False)
            assert 90_000 <= refused.retry_ms <= 100_000, refused
            await raw.send(wire.Ping(id=2))
            assert isinstance(await raw.reply(2), wire.Pong)
            await raw.aclose()


async def test_the_sdk_raises_a_read_past_the_rate_with_when_to_retry(tmp_path):
    """`client.read` past --read-rate raises `ClientError` `rate_limited` with `retry_after`
    (nothing was marked); the same read after that pause marks it (docs/CLIENT.md). The rate is
    the user's: reads of one device spend what another device's read is refused by."""
    from broker.client import ClientError

    async with running_broker(tmp_path / "data", reads_per_s_per_user=2.0) as h, \
            h.client("alice") as alice, h.client("bob") as bob, \
            h.client("bob", "d2") as bob2:
        with trio.fail_after(30):
            sent = [await alice.send(f"m{i}", to="bob") for i in range(3)]
            await bob.read(sent[0].conv, 1)
            await bob.read(sent[0].conv, 2)
            try:
                await bob2.read(sent[0].conv, 3)
            except ClientError as exc:
                refused = exc
            else:
                raise AssertionError("a third read at once passed --read-rate 2")
            assert refused.name == "rate_limited" and 0 < refused.retry_after <= 0.5, refused
            assert [e.read for e in (await bob.conversations()).convs] == [2]
            await trio.sleep(refused.retry_after)
            await bob.read(sent[0].conv, 3)
            assert [e.read for e in (await bob.conversations()).convs] == [3]
