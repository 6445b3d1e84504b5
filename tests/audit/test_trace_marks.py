"""`homing audit trace` tells who got and read a message as `homing receipts` does: a read mark
and a recipient's own later post in the conversation move the marks, as an ack does."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import trio

from broker.cli import main
from storage import audit
from storage import records as r
from tests.audit.test_streaming import SEEDS, random_store
from tests.harness import running_broker


def trace(capsys, data, conv: str, seq: int) -> dict:
    """`homing audit trace --conv CONV --seq SEQ --json` in-process; its one JSON line."""
    capsys.readouterr()
    status = main(["audit", "trace", "--data", str(data), "--conv", conv, "--seq", str(seq),
                   "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    [line] = out.splitlines()
    return json.loads(line)


async def test_trace_counts_a_reply_and_a_read_mark_as_receipts_do(tmp_path, capsys):
    """bob answers in the group without acking or marking anything, carol marks it read
    without acking, dave does nothing: receipts and trace agree on each of them."""
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, h.client("alice", "a") as alice:
            group = await alice.create_group("team", ["bob", "carol", "dave"])
            posted = await alice.send("who takes the 6 am shift?", conv=group, cid="q1")
            async with h.client("bob", "b") as bob, h.client("carol", "c") as carol:
                await bob.send("me", conv=group, cid="r1")
                await carol.read(group, posted.seq)
            receipts = await alice.receipts(group, posted.seq)
    assert (set(receipts.delivered), set(receipts.read)) == ({"bob", "carol"}, {"bob", "carol"})
    assert set(receipts.unread) == {"dave"}

    t = trace(capsys, tmp_path / "data", group, posted.seq)
    life = t["recipients"]
    assert {u for u, one in life.items() if one["delivered"]} == set(receipts.delivered)
    assert {u for u, one in life.items() if one["read"]} == set(receipts.read)
    for user in ("bob", "carol"):  # neither device acked: no device received it as such
        assert life[user]["devices"] == {}
        assert t["ts"] < life[user]["delivered"] == life[user]["read"]
    assert life["dave"] == {"delivered": None, "devices": {}, "read": None}


@pytest.mark.parametrize("seed", SEEDS)
def test_trace_of_every_message_agrees_with_the_receipts_of_its_audience(tmp_path, seed):
    """On random logs (acks, read marks, posts, leaves and joins), every member of a message's
    audience is delivered and read in its trace exactly when the stored marks say so."""
    store = random_store(seed, str(tmp_path / "data"))
    try:
        seqs: Counter[str] = Counter()
        compared = 0
        for ev in audit.iter_events(store, audit.EventFilter(types=(r.MESSAGE_ACCEPTED,))):
            conv = ev.data["conv"]
            seqs[conv] += 1
            audience, got, read = store.receipts(conv, seqs[conv])
            life = audit.trace(store, conv, seqs[conv])["recipients"]
            for user in audience:
                assert (life[user]["delivered"] is not None, life[user]["read"] is not None) == (
                    user in got, user in read), (conv, seqs[conv], user)
                compared += 1
        assert compared > 100
    finally:
        store.close()


async def test_trace_does_not_count_a_post_from_outside_as_read(tmp_path, capsys):
    """An admin token may post in a channel it left: that post moves no mark of its own, so the
    trace leaves the notice unread by it, as the projections do."""
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, \
                h.client("shop", "s", role="service") as shop:
            chan = await shop.create("channel", "notices", ["ops", "till-1"])
            posted = await shop.send("stock count on Monday", conv=chan, cid="n1")
            async with h.client("ops", "o", role="admin") as ops:
                await ops.leave(chan)
                await ops.send("count moved to Tuesday", conv=chan, cid="n2")
    life = trace(capsys, tmp_path / "data", chan, posted.seq)["recipients"]
    assert life["ops"] == {"delivered": None, "devices": {}, "read": None}
    assert life["till-1"] == {"delivered": None, "devices": {}, "read": None}
