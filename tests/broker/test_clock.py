"""Times users see when the broker's wall clock steps back (review of time and clocks,
2026-12-05): a real broker in the test's trio run, its clock (`time.time_ns`, the outside
world) set back 5 minutes between two sends."""

from __future__ import annotations

import json
import time

import trio

from broker.cli import main
from storage.audit import ts_iso
from tests.harness import running_broker

STEP_NS = 5 * 60 * 10**9  # held by the log (storage.clock.MAX_HOLD_US: 10 min)


async def test_messages_after_a_clock_step_back_are_not_older_than_earlier_ones(
        tmp_path, monkeypatch, capsys):
    """The second message of a conversation, sent after the clock stepped back 5 minutes, was
    delivered and paged by `history` 5 minutes older than the first, and `homing audit inbox
    --at` its own time left both messages out. Now its time is the first one's."""
    step = [0]
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - step[0])
    with trio.fail_after(15):
        async with running_broker(tmp_path / "data") as h, h.client("alice") as alice, \
                h.client("bob") as bob:
            await alice.send("one", to="bob")
            first = await bob.deliveries().receive()
            step[0] = STEP_NS
            await alice.send("two", to="bob")
            second = await bob.deliveries().receive()
            page = await bob.history(first.conv, order="oldest")
    assert second.ts >= first.ts
    assert [m.ts for m in page.messages] == [first.ts, second.ts]
    capsys.readouterr()
    assert main(["audit", "inbox", "--data", str(tmp_path / "data"), "--user", "bob",
                 "--at", ts_iso(second.ts), "--json"]) == 0
    inbox = json.loads(capsys.readouterr().out)["inbox"]
    assert [m["body"] for m in inbox] == ["one", "two"]
